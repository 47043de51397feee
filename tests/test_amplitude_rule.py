"""benchmarks/amplitude_rule.py: the logistic fit of Dice / clean against the code's ROI PSNR, and its CLI."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'
spec = importlib.util.spec_from_file_location('amplitude_rule', BENCH / 'amplitude_rule.py')
amp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(amp)


def test_fit_recovers_a_known_logistic_and_its_levels():
    x = np.linspace(15, 45, 13)
    x50, s = amp.fit_logistic(x, amp.logistic(x, 22.0, 3.0))
    assert x50 == pytest.approx(22.0, abs=1e-3) and s == pytest.approx(3.0, abs=1e-3)
    # the level's PSNR is the logistic's inverse: 0.05 sits s ln(19) below x50
    assert amp.level_psnr(22.0, 3.0, 0.05) == pytest.approx(22.0 - 3.0 * math.log(19))
    assert amp.logistic(amp.level_psnr(22.0, 3.0, 0.3), 22.0, 3.0) == pytest.approx(0.3)
    # started from elsewhere (the bootstrap's start), the same optimum
    assert amp.fit_logistic(x, amp.logistic(x, 22.0, 3.0), start=(30.0, 8.0))[0] == pytest.approx(22.0, abs=1e-3)
    with pytest.raises(ValueError, match='two PSNRs'):
        amp.fit_logistic([30.0, 30.0], [0.5, 0.6])


def _entry(victim, cell, psnr_roi, ratios):
    per_seed = lambda d: {'3d_fullres': {str(s): {'dice': x, 'dice_per_label': {'1': x, '2': x}}  # noqa: E731
                                         for s, x in enumerate(d)}}
    return {'victim': victim, 'cell': cell, 'report': {'rows': [
        {'row': 'clean', 'per_seed': per_seed([0.8] * len(ratios))},
        {'row': 'protected', 'per_seed': per_seed([0.8 * r for r in ratios]),
         'quality': {'psnr': {'mean': psnr_roi + 13.0}, 'psnr_roi': {'mean': psnr_roi}}}]}}


def test_cli_fits_the_family_lists_the_others_and_reports_the_goal(tmp_path):
    truth = lambda x: float(amp.logistic(x, 22.0, 3.0))  # noqa: E731
    ev = {f'o{e}': _entry('stock', f'offset@{e}/255', x, [truth(x) - 0.02, truth(x) + 0.02])
          for e, x in ((4, 44.0), (16, 31.0), (32, 25.0), (48, 21.4), (64, 19.0))}
    ev['cb'] = _entry('stock', 'checkerboard@64/255', 19.0, [0.64])  # an other code: listed, not fitted
    ev['noda'] = _entry('noda', 'offset@64/255', 19.0, [0.4])          # another victim: left out
    (tmp_path / 'map.json').write_text(json.dumps({'eval': ev}))
    done = subprocess.run([sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path), '--boot', '50'],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / 'amplitude_rule.json').read_text())
    fit = data['fit']
    assert fit['points'] == 10 and len(data['rows']) == 5 and fit['boot'] == 50
    assert fit['x50'] == pytest.approx(22.0, abs=0.1) and fit['s'] == pytest.approx(3.0, abs=0.2)
    assert fit['x50_ci'][0] <= fit['x50'] <= fit['x50_ci'][1]
    low = fit['levels']['0.05']
    assert low['psnr_roi'] == pytest.approx(22.0 - 3.0 * math.log(19), abs=0.6)
    # whole volume: ROI + the rows' 13 dB (labels 5% of the volume), + 20 dB at 1%, + 30 dB at 0.1%
    assert data['whole_minus_roi_db'] == pytest.approx(13.0) and data['label_fraction'] == pytest.approx(10 ** -1.3)
    assert low['psnr_whole']['hippocampus'] == pytest.approx(low['psnr_roi'] + 13.0)
    assert low['psnr_whole']['0.001'] == pytest.approx(low['psnr_roi'] + 30.0)
    assert [o['cell'] for o in data['others']] == ['checkerboard@64/255']
    assert data['others'][0]['residual'] == pytest.approx(0.64 - truth(19.0), abs=0.02)
    assert '| 0.05 |' in done.stdout and '| checkerboard@64/255 |' in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ['amplitude_rule.json', 'amplitude_rule.md',
                                                          'amplitude_rule.png', 'map.json']
    # --exclude repeats a fit without some cells: the lowest PSNR's cell left out, 8 points, the same truth
    left = subprocess.run([sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path), '--boot', '20',
                           '--exclude', 'offset@64/255', 'checkerboard@64/255'], capture_output=True, text=True)
    assert left.returncode == 0, left.stderr
    data = json.loads((tmp_path / 'amplitude_rule.json').read_text())
    assert data['fit']['points'] == 8 and data['others'] == [] and data['excluded'] == ['checkerboard@64/255',
                                                                                        'offset@64/255']
    assert data['fit']['x50'] == pytest.approx(22.0, abs=0.2) and 'Left out: checkerboard@64/255' in left.stdout
    noboot = subprocess.run([sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path), '--boot', '0'],
                            capture_output=True, text=True)
    assert noboot.returncode == 0, noboot.stderr
    assert json.loads((tmp_path / 'amplitude_rule.json').read_text())['fit']['x50_ci'] is None
    assert '(5-95%: –)' in noboot.stdout
    bad = subprocess.run([sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path / 'nope')],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and 'map.json: cannot read the protection map' in bad.stderr
    none = subprocess.run([sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path), '--victim', 'adam'],
                          capture_output=True, text=True)
    assert none.returncode != 0 and 'adam rows of' in none.stderr and 'two PSNRs' in none.stderr


def _acdc_cell(cell, psnr_roi, ratios):
    return {'cell': cell, 'psnr_roi': psnr_roi, 'psnr_whole': psnr_roi + 14.0, 'seeds': list(range(len(ratios))),
            'dice': 0.7 * sum(ratios) / len(ratios), 'clean_dice': 0.7, 'ratio': sum(ratios) / len(ratios),
            'ratio_per_seed': ratios, 'dice_per_label': {'1': 0.5, '2': 0.6, '3': 0.8}}


def test_audit_copies_at_one_eps_are_told_apart_by_their_prediction_rows_dataset(tmp_path):
    """Two sample-wise EM copies at 10/255 (a 5-epoch and a 20-epoch protector) in one audit report: each copy's
    cell is the predictions row naming its dataset folder; a copy no row names falls back to the eps match."""
    from protection_map import rows_of
    exploiter = {'name': 'stock', 'trainer': 'nnUNetTrainer_5epochs', 'configuration': '3d_fullres',
                 'plans': 'nnUNetPlans_cpu', 'defence': None, 'seeds': [0], 'per_seed': [1.0], 'dice': 0.8,
                 'clean_dice': 0.8, 'ratio': {'ratio': 1.0}}
    copy = lambda name, folder: {'name': name, 'dataset': f'/raw/{folder}', 'exploiters': [exploiter],  # noqa: E731
                                 'quality': {'psnr': 49.0, 'psnr_roi': 36.0, 'budget': {'eps': 10 / 255}}}
    audit = {'settings': {'clean': '/raw/Dataset004_Hippocampus'}, 'predictions_file': 'benchmarks/results/p.json',
             'copies': [copy('em10', 'Dataset610_H_EM10'), copy('em10c', 'Dataset611_H_EM10_20ep'),
                        copy('other', 'Dataset612_H_EM10_x')]}
    (tmp_path / 'p.json').write_text(json.dumps({'rows': [
        {'cell': 'EM-samplewise@10/255', 'eps': '10/255', 'dataset': 'Dataset610_H_EM10'},
        {'cell': 'EM-samplewise:epochs=20@10/255', 'eps': '10/255', 'dataset': 'Dataset611_H_EM10_20ep'}]}))
    assert [r['cell'] for r in rows_of(audit, tmp_path)] == [
        'EM-samplewise@10/255', 'EM-samplewise:epochs=20@10/255', 'EM-samplewise@10/255']


def test_rows_of_other_datasets_fit_with_the_map_and_report_each_dataset(tmp_path):
    """--rows: an ACDC results file (benchmarks/acdc.py) and a voxshield_audit report join the map's rows; the
    ``DATASET:PROFILE`` victim picks ACDC's own victim; each dataset gets its RMSE against the joint fit."""
    from protection_map import rows_of
    truth = lambda x: float(amp.logistic(x, 22.0, 3.0))  # noqa: E731
    ev = {f'o{e}': _entry('stock', f'offset@{e}/255', x, [truth(x)]) for e, x in ((4, 44.0), (32, 25.0), (64, 19.0))}
    (tmp_path / 'map.json').write_text(json.dumps({'eval': ev}))
    acdc = {'configurations': {
        '2d nnUNetTrainer_20epochs': {'cells': [_acdc_cell(f'offset:sign=levels@{e}/255', x, [truth(x) + 0.1])
                                                for e, x in ((16, 29.0), (40, 21.5))]
                                      + [_acdc_cell('conv:strength=1.99', 20.0, [0.95])]},
        '3d_fullres': {'cells': [_acdc_cell('offset:sign=levels@40/255', 21.5, [0.1])]}}}   # another victim
    (tmp_path / 'acdc_x.json').write_text(json.dumps(acdc))
    rows = rows_of(acdc)
    assert {(r['dataset'], r['victim']) for r in rows} == {('ACDC', 'stock-2d-20ep'), ('ACDC', 'stock')}
    assert [r['method'] for r in rows][:3] == ['offset:sign=levels', 'offset:sign=levels', 'conv']
    assert rows[2]['eps'] is None and rows[0]['eps'] == '16/255' and rows[0]['psnr'] == pytest.approx(43.0)
    exploiter = lambda name, trainer, ratios: {  # noqa: E731
        'name': name, 'trainer': trainer, 'configuration': '3d_fullres', 'plans': 'nnUNetPlans_cpu', 'defence': None,
        'seeds': [0, 1], 'per_seed': ratios, 'dice': 0.7, 'clean_dice': 0.8, 'ratio': {'ratio': sum(ratios) / 2}}
    audit = {'settings': {'clean': '/x/raw/Dataset004_Hippocampus'}, 'predictions_file': 'benchmarks/results/p.json',
             'copies': [{'name': 'conv25dB', 'quality': {'psnr': 37.8, 'psnr_roi': 25.0, 'budget': {'strength': 1.4}},
                         'exploiters': [exploiter('stock', 'nnUNetTrainer_5epochs', [0.9, 0.92]),
                                        exploiter('noda', 'nnUNetTrainerNoDA_5epochs', [0.94, 0.93]),
                                        {**exploiter('stock', 'nnUNetTrainer_5epochs', [0.99, 0.99]),
                                         'defence': 'blur'}]}]}
    (tmp_path / 'p.json').write_text(json.dumps({'rows': [{'cell': 'conv:strength=1.4', 'strength': 1.4}]}))
    (tmp_path / 'audit_x.json').write_text(json.dumps(audit))
    arows = rows_of(audit, tmp_path)
    assert [(r['dataset'], r['victim'], r['cell'], r['ratio_per_seed']) for r in arows] == [
        ('Hippocampus', 'stock', 'conv:strength=1.4', [0.9, 0.92]),
        ('Hippocampus', 'noda', 'conv:strength=1.4', [0.94, 0.93])]          # the purified row is not a map row
    assert rows_of(audit)[0]['cell'] == 'conv25dB'                           # no predictions file: the copy's name
    with pytest.raises(ValueError, match='not a protection map'):
        rows_of({'what': 'else'})
    cmd = [sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path / 'fit'), '--map',
           str(tmp_path / 'map.json'), '--rows', str(tmp_path / 'acdc_x.json'), str(tmp_path / 'audit_x.json'),
           '--victim', 'stock', 'ACDC:stock-2d-20ep', '--family', 'offset', 'offset:sign=levels', '--others', 'conv',
           '--boot', '20']
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / 'fit' / 'amplitude_rule.json').read_text())
    assert data['fit']['points'] == 5   # 3 Hippocampus + 2 ACDC: ACDC's 3d_fullres 'stock' is not its victim
    assert [(r['dataset'], r['victim']) for r in data['rows']][-2:] == [('ACDC', 'stock-2d-20ep')] * 2
    acdc_fit = data['datasets']['ACDC']
    assert acdc_fit['points'] == 2 and acdc_fit['whole_minus_roi_db'] == pytest.approx(14.0)
    assert acdc_fit['rmse_joint'] == pytest.approx(float(np.sqrt(np.mean(
        [(float(amp.logistic(r['psnr_roi'], data['fit']['x50'], data['fit']['s'])) - r['ratio_per_seed'][0]) ** 2
         for r in data['rows'][-2:]]))))
    assert 'own_fit' in acdc_fit and data['datasets']['Hippocampus']['points'] == 3
    assert {(o['dataset'], o['victim'], o['cell']) for o in data['others']} == {
        ('Hippocampus', 'stock', 'conv:strength=1.4'), ('ACDC', 'stock-2d-20ep', 'conv:strength=1.99')}
    assert '| ACDC | stock-2d-20ep | offset:sign=levels@16/255 |' in done.stdout
    assert 'whole volume, ACDC (dB)' in done.stdout and 'ACDC: 2 points from 2 cells' in done.stdout
    bad = subprocess.run(cmd[:5] + [str(tmp_path / 'map.json'), '--rows', str(tmp_path / 'nope.json')],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and 'nope.json: cannot read its rows' in bad.stderr
