"""benchmarks/protection_map.py: cell parsing, protector names, and the per-seed aggregation of the map's rows."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location('protection_map', BENCH / 'protection_map.py')
pmap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pmap)


def test_parse_cell_and_names():
    cell = pmap.parse_cell('checkerboard:block=2@16/255')
    assert cell['method'] == 'checkerboard' and cell['options'] == {'block': '2'}
    assert cell['eps_value'] == pytest.approx(16 / 255)
    assert pmap.cell_label(cell) == 'checkerboard-block2_eps16_255'
    assert pmap.protector_trainer(pmap.parse_cell('VoxShield@4/255'), 5) == 'nnUNetTrainerVoxShield_5epochs'
    assert pmap.protector_trainer(pmap.parse_cell('VoxShield-EOT@16/255'), 5) == \
        'nnUNetTrainerVoxShieldEOT_eps16_5epochs'
    for bad in ('waves@16/255', 'offset@abc', 'offset@0', 'offset@2'):
        with pytest.raises(SystemExit):
            pmap.parse_cell(bad)
    from nnunetv2_voxshield.trainers import baselines, em_samplewise, eot, lc, voxshield  # each method's trainer
    shipped = {**vars(voxshield), **vars(eot), **vars(lc), **vars(baselines), **vars(em_samplewise)}
    assert all(name in shipped for name in pmap.TRAINED.values())
    assert pmap.protector_trainer(pmap.parse_cell('VoxShield-LC-align-noDA@10/255'), 5) in shipped
    assert pmap.protector_trainer(pmap.parse_cell('EM-samplewise@10/255'), 5) == \
        'nnUNetTrainerEMSampleWise_eps10_5epochs' in shipped
    assert pmap.protector_trainer(pmap.parse_cell('EM-samplewise-EOT@16/255'), 5) in shipped
    # a residual-encoder victim is its own profile: its rows never pool with the plain U-Net's
    assert pmap.plans_tag('nnUNetResEncUNetMPlans_cpu') == 'ResEncM_cpu'
    assert pmap.plans_tag('nnUNetResEncUNetLPlans') == 'ResEncL'
    # so is every other victim setting; the map's defaults (stock plans, 3d_fullres, 5 epochs) add no suffix
    assert pmap.profile_name('stock', pmap.hb.PLANS, '3d_fullres', 5) == 'stock'
    assert pmap.profile_name('stock', pmap.hb.PLANS, '3d_fullres', 20) == 'stock-20ep'
    assert pmap.profile_name('noda', 'nnUNetResEncUNetMPlans_cpu', '2d', 20) == 'noda-ResEncM_cpu-2d-20ep'


def _entry(victim, cell, seeds, clean, protected):
    per_seed = lambda d: {'3d_fullres': {str(s): {'dice': x, 'dice_per_label': {'1': x, '2': x}}  # noqa: E731
                                         for s, x in zip(seeds, d)}}
    return {'victim': victim, 'cell': cell, 'report': {'rows': [
        {'row': 'clean', 'per_seed': per_seed(clean)},
        {'row': 'protected', 'per_seed': per_seed(protected), 'quality': {'psnr': {'mean': 44.0}}}]}}


def test_rows_pool_seeds_across_folders_and_profiles_stay_apart(tmp_path):
    data = {'eval': {'a': _entry('stock', 'offset@64/255', [0], [0.8], [0.2]),
                     'b': _entry('stock', 'offset@64/255', [1], [0.7], [0.07]),
                     'c': _entry('noda', 'offset@64/255', [0], [0.9], [0.9])},
            'protectors': {'offset_eps64_255': {'cell': 'offset@64/255', 'verify': {'psnr': {'min': 40.0}}}}}
    rows = {(r['victim'], r['cell']): r for r in pmap.map_rows(data)}
    stock = rows[('stock', 'offset@64/255')]
    assert stock['seeds'] == [0, 1] and stock['ratio_per_seed'] == [0.25, 0.1]
    assert stock['dice'] == pytest.approx(0.135) and stock['clean_dice'] == pytest.approx(0.75)
    assert stock['ratio'] == pytest.approx(0.18) and stock['psnr_min'] == 40.0
    assert rows[('noda', 'offset@64/255')]['ratio'] == pytest.approx(1.0)
    pmap.print_table(data, tmp_path)
    table = (tmp_path / 'map.md').read_text()
    assert '**0.18**' in table and '0.25 / 0.1' in table
    import matplotlib.image
    image = matplotlib.image.imread(str(tmp_path / 'frontier.png'))
    assert image.shape[:2] == (600, 1320) and image[..., :3].std() > 0.05  # a drawn figure, not a blank canvas


def test_purified_and_2d_rows_are_their_own_cells(tmp_path):
    """A defence folder gives '<method>+<defence>@<eps>' rows and the purification's own cost 'clean+<defence>@0',
    each against the unpurified clean victim; its unpurified row stays out (the cell's own folder has it); a 2d
    entry reads its own configuration's victims."""
    def victims(config, d):
        return {config: {s: {'dice': x, 'dice_per_label': {'1': x, '2': x}} for s, x in d.items()}}
    rows = [{'row': 'clean', 'per_seed': victims('3d_fullres', {'0': 0.8})},
            {'row': 'clean+blur', 'defence_spec': 'blur', 'per_seed': victims('3d_fullres', {'0': 0.72})},
            {'row': 'protected', 'defence_spec': None, 'per_seed': victims('3d_fullres', {'0': 0.04})},
            {'row': 'protected+blur', 'defence_spec': 'blur', 'per_seed': victims('3d_fullres', {'0': 0.4})}]
    twod = [{'row': 'clean', 'per_seed': victims('2d', {'0': 0.5})},
            {'row': 'protected', 'per_seed': victims('2d', {'0': 0.25})}]
    data = {'eval': {
        'a': {'victim': 'noda', 'cell': 'checkerboard@10/255', 'defences': ['blur'], 'report': {'rows': rows}},
        'b': {'victim': 'noda-2d', 'cell': 'checkerboard@10/255', 'configuration': '2d', 'report': {'rows': twod}}}}
    got = {(r['victim'], r['cell']): round(r['ratio'], 3) for r in pmap.map_rows(data)}
    # the defence folder's unpurified victim (0.04) is not pooled into the cell's own row
    assert got == {('noda', 'checkerboard+blur@10/255'): 0.5, ('noda', 'clean+blur@0'): 0.9,
                   ('noda-2d', 'checkerboard@10/255'): 0.5}
    data['eval']['a']['overlap'] = {'0': {'volume_ratio': 9.0, 'precision': 0.0, 'recall': 0.0}}
    data['eval']['c'] = _entry('noda', 'checkerboard@10/255', [0], [0.8], [0.024])
    assert {(r['victim'], r['cell']): round(r['ratio'], 3) for r in pmap.map_rows(data)}[
        ('noda', 'checkerboard@10/255')] == 0.03
    assert all(r['overlap'] is None for r in pmap.map_rows(data))
    pmap.print_table(data, tmp_path)
    assert '| noda | clean+blur@0 | 0 |' in (tmp_path / 'map.md').read_text()


def test_overlap_of_predictions_is_recorded_per_seed(tmp_path):
    """Foreground volume / GT, precision and recall summed over the cases, for protected victims (per seed) and for
    the clean victim where its predictions are; a row shows the mean over its seeds."""
    import numpy as np
    import SimpleITK as sitk

    def write(array, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))

    ref = np.zeros((4, 4, 4))
    ref[:2, :2, :2] = 1  # 8 voxels
    labels = tmp_path / 'labelsTs'
    write(ref, labels / 'c1.nii.gz')
    write(ref * 2, labels / 'c2.nii.gz')
    shifted = np.zeros_like(ref)
    shifted[1:3, :2, :2] = 1  # 4 of its 8 voxels on the reference
    folder = tmp_path / 'eval_stock_offset_eps64_255_seed0-1' / 'victims'
    write(shifted, folder / 'protected' / '3d_fullres' / 'seed_0' / 'predictions' / 'c1.nii.gz')
    write(np.zeros_like(ref), folder / 'protected' / '3d_fullres' / 'seed_0' / 'predictions' / 'c2.nii.gz')
    write(ref, folder / 'protected' / '3d_fullres' / 'seed_1' / 'predictions' / 'c1.nii.gz')
    write(ref, folder / 'protected' / '3d_fullres' / 'seed_1' / 'predictions' / 'c2.nii.gz')
    write(ref, folder / 'clean' / '3d_fullres' / 'seed_0' / 'predictions' / 'c1.nii.gz')
    write(ref, folder / 'clean' / '3d_fullres' / 'seed_0' / 'predictions' / 'c2.nii.gz')
    assert pmap.overlap_stats(folder / 'protected' / '3d_fullres' / 'seed_0' / 'predictions', labels) == \
        {'volume_ratio': 0.5, 'precision': 0.5, 'recall': 0.25, 'n_cases': 2}
    assert pmap.overlap_stats(tmp_path / 'nothing', labels) is None
    data = {'eval': {'stock_offset_eps64_255_seed0-1': _entry('stock', 'offset@64/255', [0, 1], [0.8, 0.8],
                                                              [0.2, 0.8])}}
    pmap.record_overlap(data, tmp_path, labels)
    assert data['eval']['stock_offset_eps64_255_seed0-1']['overlap']['1']['recall'] == 1.0
    assert data['clean_overlap'] == {'stock': {'0': {'volume_ratio': 1.0, 'precision': 1.0, 'recall': 1.0,
                                                     'n_cases': 2}}}
    row = pmap.map_rows(data)[0]
    assert row['overlap'] == pytest.approx({'volume_ratio': 0.75, 'precision': 0.75, 'recall': 0.625})
    pmap.print_table(data, tmp_path)
    table = (tmp_path / 'map.md').read_text()
    assert '0.75, 0.75, 0.62' in table and 'stock seed 0: 1.00, 1.00, 1.00' in table


def test_map_file_merges(tmp_path):
    f = pmap.MapFile(tmp_path / 'map.json')
    f.update(lambda d: d.setdefault('eval', {}).__setitem__('a', 1))
    f.update(lambda d: d.setdefault('eval', {}).__setitem__('b', 2))
    assert json.loads((tmp_path / 'map.json').read_text()) == {'eval': {'a': 1, 'b': 2}}


def test_clean_fraction_cell_mixes_a_fixed_share_of_clean_cases(tmp_path, monkeypatch):
    """``:clean=F`` copies the base cell's export with round(F x cases) images taken from the clean dataset,
    the same ones every run; the base export stays as it was."""
    def dataset(root, value):
        for sub in ('imagesTr', 'labelsTr'):
            (root / sub).mkdir(parents=True)
        for i in range(8):
            (root / 'imagesTr' / f'hippocampus_{i:03d}_0000.nii.gz').write_text(value)
            (root / 'labelsTr' / f'hippocampus_{i:03d}.nii.gz').write_text('label')
        return root
    clean, raw = dataset(tmp_path / 'clean', 'clean'), tmp_path / 'raw'
    base = dataset(raw / 'Dataset100_Hippocampus_checkerboard_eps10_255', 'protected')
    calls = []
    monkeypatch.setattr(pmap, 'protect', lambda cell, *a: calls.append(cell['cell']) or base)
    monkeypatch.setattr(pmap.hb, 'run', lambda cmd, env, log: Path(cmd[cmd.index('-o') + 1]).write_text(
        json.dumps({'summary': {'violations': 0}})))
    mapfile = pmap.MapFile(tmp_path / 'map.json')
    cell = pmap.parse_cell('checkerboard:clean=0.25@10/255')
    (tmp_path / 'logs').mkdir()
    dst = pmap.mix_clean(cell, {'nnUNet_raw': raw}, {}, tmp_path / 'logs', mapfile, clean, 5)
    assert calls == ['checkerboard@10/255'] and dst.name.endswith('_checkerboard-clean0.25_eps10_255')
    images = {p.name: p.read_text() for p in (dst / 'imagesTr').iterdir()}
    assert sorted(images.values()).count('clean') == 2 and len(images) == 8
    assert {p.read_text() for p in (base / 'imagesTr').iterdir()} == {'protected'}
    entry = json.loads(mapfile.path.read_text())['protectors']['checkerboard-clean0.25_eps10_255']
    assert entry['clean_cases'] == 2 and entry['verify'] == {'violations': 0}
    again = pmap.mix_clean(cell, {'nnUNet_raw': raw}, {}, tmp_path / 'logs', mapfile, clean, 5)
    assert {p.name: p.read_text() for p in (again / 'imagesTr').iterdir()} == images
    with pytest.raises(SystemExit):
        pmap.mix_clean(pmap.parse_cell('checkerboard:clean=1.5@10/255'), {'nnUNet_raw': raw}, {}, tmp_path / 'logs',
                       mapfile, clean, 5)


def test_bench_env_leaves_the_planner_its_workers(tmp_path, monkeypatch):
    """nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): a caller's nnUNet_n_proc_DA=0 (the CPU
    training setting) must not reach it."""
    monkeypatch.setenv('nnUNet_n_proc_DA', '0')
    env = pmap.hb.bench_env({'nnUNet_raw': tmp_path / 'raw'})
    assert 'nnUNet_n_proc_DA' not in env
    assert env['nnUNet_raw'] == str(tmp_path / 'raw') and env['nnUNet_def_n_proc'] == '1'


def _fake_clean(root: Path, cases: list) -> Path:
    for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        (root / sub).mkdir(parents=True)
    for c in cases:
        (root / 'imagesTr' / f'{c}_0000.nii.gz').write_text('image')
        (root / 'labelsTr' / f'{c}.nii.gz').write_text('label')
    (root / 'dataset.json').write_text(json.dumps({'labels': {'background': 0, 'a': 1, 'b': 2}, 'file_ending': '.nii.gz',
                                                   'channel_names': {'0': 'MRI'}, 'numTraining': len(cases)}))
    return root


def test_cells_are_jobs_of_one_dag_without_locks(tmp_path):
    """A cell is a protect job (a clean=F cell after its base cell's), its victims are the audit's jobs; the clean
    victim of a profile and seed is one job for all cells; finished jobs' results become map.json entries that
    map_rows reads as before; no lock files."""
    from argparse import Namespace
    from nnunetv2_voxshield.jobs import JobRecord
    cases = [f'hippocampus_{i:03d}' for i in range(4)]
    roots = {k: tmp_path / k for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    clean = _fake_clean(roots['nnUNet_raw'] / 'Dataset004_Hippocampus', cases)
    cells = [pmap.parse_cell('offset@16/255'), pmap.parse_cell('checkerboard:clean=0.25@10/255')]
    assert [c['cell'] for c in pmap.cells_with_bases(cells)] == ['offset@16/255', 'checkerboard@10/255',
                                                                  'checkerboard:clean=0.25@10/255']
    ids = {'offset_eps16_255': 100, 'checkerboard_eps10_255': 101, 'checkerboard-clean0.25_eps10_255': 102}
    args = Namespace(configuration='3d_fullres', victim_plans='nnUNetPlans_cpu', defences=['blur'], seeds=[0, 1],
                     protector_epochs=5, victim_epochs=5, threads=2)
    victims = tmp_path / 'victims'
    jobs, scores, panel = pmap.map_jobs(cells, roots, {}, clean, args, ids, victims, 'nnUNetTrainer_5epochs', 'stock',
                                        {'train': cases, 'test': []})
    by = {j.name: j for j in jobs}
    assert len(by) == len(jobs)
    assert by['protect_checkerboard-clean0.25_eps10_255'].deps == ['plan', 'protect_checkerboard_eps10_255']
    assert by['plan_offset_eps16_255'].deps == ['protect_offset_eps16_255']
    assert by['purify_offset_eps16_255+blur'].deps == ['protect_offset_eps16_255']
    assert 'plan_checkerboard_eps10_255' not in by  # a base cell only made for its clean=F cell has no victims
    train = [n for n in by if n.startswith('train_')]
    assert len(train) == 6 * 2  # rows clean, 2 copies, clean+blur, 2 purified copies; 2 seeds each
    assert len([n for n in train if n.startswith('train_clean_')]) == 2  # one clean victim per seed, for all cells
    assert {by[n].threads for n in train + ['plan', 'protect_offset_eps16_255']} == {2}  # --threads per job
    target = os.readlink(next(p for p in (victims / 'nnUNet_raw').iterdir() if p.name.endswith('_offset_eps16_255')))
    assert target == str(roots['nnUNet_raw'] / 'Dataset100_Hippocampus_offset_eps16_255')
    assert not list(tmp_path.rglob('*.lock'))

    summary = lambda d: {'dice': d, 'dice_per_label': {'1': d, '2': d}}  # noqa: E731
    dice = {'clean': 0.8, 'offset_eps16_255': 0.2, 'clean+blur': 0.7, 'offset_eps16_255+blur': 0.6,
            'checkerboard-clean0.25_eps10_255': 0.4, 'checkerboard-clean0.25_eps10_255+blur': 0.4}
    records = {n: JobRecord(n, 'done', {'summary': summary(dice[row])}, 1.0)
               for (row, _, _), n in scores.items()}
    records.update({n: JobRecord(n, 'done', {'summary': {'psnr': {'mean': 40.0}, 'psnr_roi': {'mean': 30.0}}}, 1.0)
                    for n in by if n.startswith('quality_')})
    entries = pmap.map_entries(cells, records, scores, panel, args, 'stock', 'nnUNetTrainer_5epochs', victims,
                               clean / 'labelsTs')
    assert sorted(entries) == ['stock_checkerboard-clean0.25_eps10_255+blur_seed0-1',
                               'stock_checkerboard-clean0.25_eps10_255_seed0-1',
                               'stock_offset_eps16_255+blur_seed0-1', 'stock_offset_eps16_255_seed0-1']
    rows = {r['cell']: r for r in pmap.map_rows({'eval': entries})}
    assert rows['offset@16/255']['ratio'] == pytest.approx(0.25) and rows['offset@16/255']['seeds'] == [0, 1]
    assert rows['offset+blur@16/255']['ratio'] == pytest.approx(0.75)  # against the unpurified clean victim
    assert rows['clean+blur@0']['ratio'] == pytest.approx(0.875) and rows['offset@16/255']['psnr'] == 40.0
    del records[scores[('clean', 'stock', 1)]]  # a victim not finished: no entry with it
    assert pmap.map_entries(cells, records, scores, panel, args, 'stock', 'nnUNetTrainer_5epochs', victims,
                            clean / 'labelsTs') == {}


def test_frontier_figure_draws_seed_bars(tmp_path, monkeypatch):
    """The point is the ratio of mean Dice; it may lie just outside the per-seed ratios, which must not break the
    bars."""
    rows = [{'method': 'offset', 'victim': 'stock', 'psnr': 31.7, 'ratio': 0.27, 'ratio_per_seed': [0.308, 0.234]},
            {'method': 'offset', 'victim': 'stock', 'psnr': 43.9, 'ratio': 0.905, 'ratio_per_seed': [0.908, 0.918]},
            {'method': 'random', 'victim': 'noda', 'psnr': 36.5, 'ratio': 0.21, 'ratio_per_seed': [0.209]},
            {'method': 'random', 'victim': 'noda', 'psnr': None, 'ratio': 1.0, 'ratio_per_seed': [1.0]}]
    png = tmp_path / 'frontier.png'
    figures = []
    import matplotlib.pyplot as plt
    close = plt.close
    monkeypatch.setattr(plt, 'close', lambda fig=None: figures.append(fig))
    pmap.frontier_figure(rows, png)
    monkeypatch.setattr(plt, 'close', close)
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000
    import matplotlib.image
    assert matplotlib.image.imread(str(png)).shape[:2] == (600, 1320)  # 11 x 5 inches at 120 dpi
    ax, = figures[0].axes
    drawn = {}
    for container in ax.containers:  # one errorbar per (method, victim): points, then bars from seed min to max
        line, _, (bars,) = container
        drawn[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()),
                                        [tuple(np.round(seg[:, 1], 6)) for seg in bars.get_segments()])
    assert drawn == {'offset (stock)': ([31.7, 43.9], [0.27, 0.905], [(0.234, 0.308), (0.905, 0.918)]),
                     'random (noda)': ([36.5], [0.21], [(0.209, 0.21)])}  # the row without a PSNR is not drawn
    close(figures[0])
