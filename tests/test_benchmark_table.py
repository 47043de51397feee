"""The benchmark's tables: Dice ratios to the clean victim of the same configuration, one matrix row per method."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location('hippocampus_benchmark',
                                              Path(__file__).resolve().parents[1] / 'benchmarks' / 'hippocampus.py')
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def victim(dice):
    return {'dice': {'mean': dice}, 'hd95_mm': {'mean': 1.0}}


def row(kind, method, victims, spec=None):
    return {'row': kind, 'method': method, 'defence': None if spec is None else f'{spec} (long name)',
            'defence_spec': spec, 'quality': None, 'victims': {c: victim(d) for c, d in victims.items()}}


RESULTS = {'eval': {
    'A': {'rows': [row('clean', 'Clean', {'3d_fullres': 0.8, '2d': 0.5}),
                   row('protected', 'A', {'3d_fullres': 0.4, '2d': 0.45}),
                   row('protected+blur', 'A', {'3d_fullres': 0.2}, 'blur')]},
    'others': {'rows': [row('clean', 'Clean', {'3d_fullres': 0.7}),  # a second clean copy: the first one counts
                        row('protected', 'B', {'3d_fullres': 0.8}),
                        row('protected', 'B eps 8/255', {'3d_fullres': 0.1})]}}}


def test_ratios_use_the_first_clean_victim_of_each_configuration():
    rows = bench.table_rows(RESULTS)
    assert sum(r['method'] == 'Clean' for r in rows) == 2
    ratio = {(r['method'], r['defence_spec'], r['config']): r['ratio'] for r in rows}
    assert ratio[('A', '-', '3d_fullres')] == pytest.approx(0.5)
    assert ratio[('A', '-', '2d')] == pytest.approx(0.9)
    assert ratio[('A', 'blur', '3d_fullres')] == pytest.approx(0.25)
    assert ratio[('B', '-', '3d_fullres')] == pytest.approx(1.0)


def test_ratio_matrix_has_a_target_row_and_marks_unmeasured_cells():
    lines = bench.ratio_matrix(bench.table_rows(RESULTS))
    assert lines[0] == '| method | 3d_fullres | 2d | 3d_fullres + blur |'
    assert lines[2] == '| *target* | *<= 0.05* | *<= 0.20* | *<= 0.30* |'
    assert lines[3:] == ['| A | 0.50 | 0.90 | 0.25 |', '| B | 1.00 | - | - |']  # budget-curve rows left out


def test_a_victim_reused_in_another_folder_is_listed_once():
    reused = {'eval': {**RESULTS['eval'], 'A2': {'rows': [row('clean', 'Clean', {'3d_fullres': 0.8}),
                                                          row('protected', 'A', {'3d_fullres': 0.4}),
                                                          row('protected+zmedian', 'A', {'3d_fullres': 0.6}, 'zmedian')]}}}
    rows = bench.table_rows(reused)
    keys = [(r['method'], r['defence_spec'], r['config']) for r in rows]
    assert len(keys) == len(set(keys)) == len(bench.table_rows(RESULTS)) + 1
    assert [r['ratio'] for r in rows if r['defence_spec'] == 'zmedian'] == [pytest.approx(0.75)]


def test_purified_clean_victims_make_a_clean_matrix_row():
    with_clean = {'eval': {**RESULTS['eval'], 'Clean': {'rows': [row('clean', 'Clean', {'3d_fullres': 0.8}),
                                                                 row('clean+blur', 'Clean', {'3d_fullres': 0.6}, 'blur')]}}}
    lines = bench.ratio_matrix(bench.table_rows(with_clean))
    assert lines[3:] == ['| Clean | 1.00 | 1.00 | 0.75 |', '| A | 0.50 | 0.90 | 0.25 |', '| B | 1.00 | - | - |']
