"""benchmarks/acdc.py: victims of evaluation folders beside the predictions, and the rule refitted on two datasets."""
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import acdc  # noqa: E402
from amplitude_rule import logistic  # noqa: E402


def scores(dice_per_case):
    cases = [{'case': f'c{i}', 'mean_dice': d} for i, d in enumerate(dice_per_case)]
    mean = sum(dice_per_case) / len(dice_per_case)
    return {'trainer': 'nnUNetTrainer_5epochs', 'plans': 'nnUNetPlans_cpu', 'cases': cases,
            'summary': {'dice': mean, 'dice_per_label': {'1': mean}, 'n_cases': len(cases)}}


def eval_folder(tmp_path, name, protected):
    """An evaluation folder: clean victim seeds 0-1 at Dice 0.8, one victim per protected copy (dataset, dice)."""
    out = tmp_path / name
    clean = tmp_path / 'clean'
    copies = []
    for i, (meta, dice) in enumerate(protected):
        d = tmp_path / f'copy{name}{i}'
        d.mkdir()
        (d / 'dataset.json').write_text(json.dumps({'voxshield': meta}))
        copies.append(str(d))
        row = 'protected' if len(protected) == 1 else f'protected{i + 1}'
        for seed in (0, 1):
            f = out / 'victims' / row / '3d_fullres' / f'seed_{seed}' / 'scores.json'
            f.parent.mkdir(parents=True)
            f.write_text(json.dumps(scores([dice, dice])))
    for seed in (0, 1):
        f = out / 'victims' / 'clean' / '3d_fullres' / f'seed_{seed}' / 'scores.json'
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps(scores([0.8, 0.8])))
    (out / 'state.json').write_text(json.dumps({'clean': str(clean), 'protected': copies}))
    return out


PREDICTIONS = {'rows': [
    {'cell': 'offset:sign=levels@16/255', 'eps': '16/255', 'psnr_roi': 29.0, 'psnr_whole': 43.0,
     'predicted_ratio': 0.9, 'predicted_ratio_range': [0.85, 0.95]},
    {'cell': 'offset:sign=levels@112/255', 'eps': '112/255', 'psnr_roi': 14.0, 'psnr_whole': 28.0,
     'predicted_ratio': 0.05, 'predicted_ratio_range': [0.03, 0.08]},
    {'cell': 'conv:strength=1.12', 'eps': None, 'strength': 1.12, 'psnr_roi': 25.0, 'psnr_whole': 39.0,
     'predicted_ratio': 0.7, 'predicted_ratio_range': [0.6, 0.8]}]}


def test_collect_pairs_each_copy_with_its_prediction_and_the_clean_victims(tmp_path):
    out = eval_folder(tmp_path, 'a', [({'method': 'offset', 'eps': 16 / 255}, 0.72),
                                      ({'method': 'offset', 'eps': 112 / 255}, 0.08),
                                      ({'method': 'conv', 'eps': None, 'strength': 1.12}, 0.4)])
    result = acdc.collect([str(out)], PREDICTIONS)['3d_fullres']
    assert result['clean']['0']['dice'] == pytest.approx(0.8)
    cells = {c['cell']: c for c in result['cells']}
    assert set(cells) == {'offset:sign=levels@16/255', 'offset:sign=levels@112/255', 'conv:strength=1.12'}
    assert cells['offset:sign=levels@16/255']['ratio'] == pytest.approx(0.9)
    assert cells['offset:sign=levels@112/255']['ratio_per_seed'] == [0.1, 0.1]
    assert cells['conv:strength=1.12']['ratio'] == pytest.approx(0.5)
    assert cells['offset:sign=levels@16/255']['ci95'] == pytest.approx([0.9, 0.9])
    assert cells['offset:sign=levels@112/255']['predicted_ratio'] == 0.05


def test_a_trained_copy_finds_its_row_by_the_rows_method(tmp_path):
    """A sample-wise EM copy (dataset.json method em_samplewise) is the row named EM-samplewise@10/255."""
    rows = {'rows': PREDICTIONS['rows'] + [
        {'cell': 'EM-samplewise@10/255', 'method': 'em_samplewise', 'eps': '10/255', 'psnr_roi': 33.0,
         'psnr_whole': 47.0, 'predicted_ratio': 0.98, 'predicted_ratio_range': [0.97, 0.99]}]}
    out = eval_folder(tmp_path, 'e', [({'method': 'em_samplewise', 'eps': 10 / 255}, 0.76),
                                      ({'method': 'offset', 'eps': 16 / 255}, 0.72)])
    cells = {c['cell']: c for c in acdc.collect([str(out)], rows)['3d_fullres']['cells']}
    assert set(cells) == {'EM-samplewise@10/255', 'offset:sign=levels@16/255'}
    assert cells['EM-samplewise@10/255']['ratio'] == pytest.approx(0.95)
    assert cells['EM-samplewise@10/255']['predicted_ratio'] == 0.98
    with pytest.raises(SystemExit, match='no prediction row for method em_samplewise'):
        acdc.collect([str(eval_folder(tmp_path, 'f', [({'method': 'em_samplewise', 'eps': 16 / 255}, 0.7)]))], rows)


def test_a_copy_without_a_prediction_is_refused(tmp_path):
    out = eval_folder(tmp_path, 'b', [({'method': 'offset', 'eps': 40 / 255}, 0.5)])
    with pytest.raises(SystemExit, match='no prediction row for method offset'):
        acdc.collect([str(out)], PREDICTIONS)


def test_refit_on_points_of_one_logistic_recovers_it():
    hip_x = [10.0, 15.0, 20.0, 22.0, 25.0, 30.0, 35.0]
    rule = {'fit': {'x50': 22.0, 's': 3.0},
            'rows': [{'psnr_roi': x, 'ratio_per_seed': [float(logistic(x, 22.0, 3.0))]} for x in hip_x]}
    acdc_cells = [{'cell': f'offset:sign=levels@{e}/255', 'psnr_roi': x,
                   'ratio_per_seed': [float(logistic(x, 22.0, 3.0))] * 2} for e, x in ((112, 14.0), (40, 21.5),
                                                                                       (16, 29.0))]
    off_rule = [{'cell': c, 'psnr_roi': 21.5, 'ratio_per_seed': [1.0, 1.0]} for c in ('random@60/255',
                                                                                     'conv:strength=1.99')]
    out = acdc.refit(rule, acdc_cells + off_rule, '2d')
    assert out['points'] == {'hippocampus': 7, 'acdc': 6}  # conv and random are not codes: shown, not fitted
    assert out['config'] == '2d' and len(out['acdc_cells']) == 3
    assert out['hippocampus_fit']['rmse_acdc'] == pytest.approx(0, abs=1e-9)
    assert out['joint_fit']['x50'] == pytest.approx(22.0, abs=1e-3)
    assert out['acdc_fit']['s'] == pytest.approx(3.0, abs=1e-2)
    shifted = [{'cell': 'offset', 'psnr_roi': x, 'ratio_per_seed': [float(logistic(x, 30.0, 3.0))]}
               for x in (14.0, 21.5, 29.0)]
    assert acdc.refit(rule, shifted)['hippocampus_fit']['rmse_acdc'] > 0.2


def test_another_victim_trainer_is_its_own_profile(tmp_path):
    out = eval_folder(tmp_path, 'c', [({'method': 'offset', 'eps': 16 / 255}, 0.72)])
    for f in out.glob('victims/*/*/seed_*/scores.json'):
        data = json.loads(f.read_text())
        f.write_text(json.dumps({**data, 'trainer': 'nnUNetTrainer_20epochs'}))
    assert list(acdc.collect([str(out)], PREDICTIONS)) == ['3d_fullres nnUNetTrainer_20epochs']


def test_a_no_augmentation_victim_carries_its_own_prediction(tmp_path):
    """The rule predicts the stock victim; a cell of a NoDA victim shows the prediction written for that victim
    (``predicted_noda``) and no rule number; the stock victim of the same cell keeps the rule's."""
    rows = [{'cell': 'checkerboard:sign=levels@16/255', 'eps': '16/255', 'psnr_roi': 29.0, 'psnr_whole': 43.0,
             'predicted_ratio': 0.92, 'predicted_ratio_range': [0.89, 0.95],
             'predicted_noda': {'ratio_per_seed_below': 0.1, 'seeds': [0, 1, 2]}}]
    folders = {}
    for trainer in ('nnUNetTrainerNoDA_20epochs', 'nnUNetTrainer_20epochs'):
        (tmp_path / trainer).mkdir()
        out = eval_folder(tmp_path / trainer, 'n', [({'method': 'checkerboard', 'eps': 16 / 255}, 0.04)])
        for f in out.glob('victims/*/*/seed_*/scores.json'):
            f.write_text(json.dumps({**json.loads(f.read_text()), 'trainer': trainer}))
        folders[trainer] = str(out)
    result = acdc.collect(list(folders.values()), {'rows': rows})
    noda = result['3d_fullres nnUNetTrainerNoDA_20epochs']['cells'][0]
    assert noda['predicted_text'] == 'each seed below 0.1' and noda['predicted_ratio'] is None
    assert noda['ratio'] == pytest.approx(0.05)
    stock = result['3d_fullres nnUNetTrainer_20epochs']['cells'][0]
    assert stock['predicted_ratio'] == 0.92 and 'predicted_text' not in stock
    rows[0]['predicted_noda'] = {'text': '0.8-1.0 (does not protect)'}     # a written range, not a bound
    noda = acdc.collect(list(folders.values()), {'rows': rows})['3d_fullres nnUNetTrainerNoDA_20epochs']['cells'][0]
    assert noda['predicted_text'] == '0.8-1.0 (does not protect)' and noda['predicted_ratio'] is None


def test_a_purified_cell_is_against_the_purified_clean_victim(tmp_path):
    """Rows '<row>+blur' of an evaluation folder: the copy's purified victim is a cell of its own (the prediction row
    with that defence), its ratio against the victim on blurred clean data, with what the blur alone costs and its
    ratio to the unpurified clean victim; such a cell is not a protection-map row."""
    from protection_map import rows_of
    out = eval_folder(tmp_path, 'p', [({'method': 'checkerboard', 'eps': 16 / 255}, 0.04)])
    for row, dice in (('clean+blur', 0.6), ('protected+blur', 0.54)):
        for seed in (0, 1):
            f = out / 'victims' / row / '3d_fullres' / f'seed_{seed}' / 'scores.json'
            f.parent.mkdir(parents=True)
            f.write_text(json.dumps(scores([dice, dice])))
    base = {'cell': 'checkerboard:sign=levels@16/255', 'eps': '16/255', 'psnr_roi': 29.0, 'psnr_whole': 43.0,
            'predicted_ratio': 0.92, 'predicted_ratio_range': [0.89, 0.95]}
    rows = [base, {**base, 'cell': 'checkerboard:sign=levels@16/255+blur', 'method': 'checkerboard',
                   'defence': 'blur', 'predicted_ratio': None, 'predicted_ratio_range': None}]
    result = acdc.collect([str(out)], {'rows': rows})
    cells = {c['cell']: c for c in result['3d_fullres']['cells']}
    assert cells['checkerboard:sign=levels@16/255']['ratio'] == pytest.approx(0.05)
    blur = cells['checkerboard:sign=levels@16/255+blur']
    assert blur['ratio'] == pytest.approx(0.9) and blur['defence'] == 'blur'
    assert blur['purification_cost'] == pytest.approx(0.75) and blur['ratio_to_clean'] == pytest.approx(0.675)
    assert set(result['3d_fullres']['clean']) == {'0', '1'}
    assert result['3d_fullres']['clean']['0']['dice'] == pytest.approx(0.8)     # the unpurified clean victims
    assert [r['cell'] for r in rows_of({'configurations': result})] == ['checkerboard:sign=levels@16/255']
    with pytest.raises(SystemExit, match='purified by blur'):
        acdc.collect([str(out)], {'rows': [base]})


def test_a_stock_victim_on_a_purified_copy_carries_the_expectation_written_for_it(tmp_path):
    """No rule covers a purification: a stock victim's purified cell shows ``predicted_stock``'s text, no rule number;
    the no-augmentation victim of the same cell shows ``predicted_noda``'s."""
    base = {'cell': 'conv:strength=1.12', 'eps': None, 'strength': 1.12, 'psnr_roi': 25.0, 'psnr_whole': 39.0,
            'predicted_ratio': 0.72, 'predicted_ratio_range': [0.67, 0.77]}
    rows = [base, {**base, 'cell': 'conv:strength=1.12+blur', 'method': 'conv', 'defence': 'blur',
                   'predicted_ratio': None, 'predicted_ratio_range': None,
                   'predicted_stock': {'text': '0.7-1.0 (largely undone)'}, 'predicted_noda': {'text': '0.9-1.0'}}]
    folders = []
    for trainer in ('nnUNetTrainer_20epochs', 'nnUNetTrainerNoDA_20epochs'):
        (tmp_path / trainer).mkdir()
        out = eval_folder(tmp_path / trainer, 'c', [({'method': 'conv', 'strength': 1.12}, 0.4)])
        for row, dice in (('clean+blur', 0.6), ('protected+blur', 0.51)):
            f = out / 'victims' / row / '3d_fullres' / 'seed_0' / 'scores.json'
            f.parent.mkdir(parents=True)
            f.write_text(json.dumps(scores([dice, dice])))
        for f in out.glob('victims/*/*/seed_*/scores.json'):
            f.write_text(json.dumps({**json.loads(f.read_text()), 'trainer': trainer}))
        folders.append(str(out))
    result = acdc.collect(folders, {'rows': rows})
    stock = {c['cell']: c for c in result['3d_fullres nnUNetTrainer_20epochs']['cells']}
    assert stock['conv:strength=1.12+blur']['predicted_text'] == '0.7-1.0 (largely undone)'
    assert stock['conv:strength=1.12+blur']['predicted_ratio'] is None
    assert stock['conv:strength=1.12+blur']['ratio'] == pytest.approx(0.85)
    assert stock['conv:strength=1.12']['predicted_ratio'] == 0.72 and 'predicted_text' not in stock['conv:strength=1.12']
    noda = {c['cell']: c for c in result['3d_fullres nnUNetTrainerNoDA_20epochs']['cells']}
    assert noda['conv:strength=1.12+blur']['predicted_text'] == '0.9-1.0'


def test_two_copies_of_one_method_and_eps_are_told_apart_by_their_folders(tmp_path):
    """VoxShield at 4/255 of the range and at the paper's budget (4/255 of a z-score window) share method and eps in
    their dataset.json: the row naming a copy's folder is its cell; a row naming another folder never is."""
    out = eval_folder(tmp_path, 'v', [({'method': 'voxshield', 'eps': 4 / 255}, 0.72),
                                      ({'method': 'voxshield', 'eps': 4 / 255, 'budget_mode': 'zscore'}, 0.4)])
    row = {'eps': '4/255', 'method': 'voxshield', 'psnr_roi': 40.0, 'psnr_whole': 55.0, 'predicted_ratio': 0.99,
           'predicted_ratio_range': [0.98, 1.0]}
    rows = [{**row, 'cell': 'VoxShield@4/255', 'dataset': 'copyv0'},
            {**row, 'cell': 'VoxShield@paperBudget', 'dataset': 'copyv1', 'psnr_roi': 36.0}]
    cells = {c['cell']: c['ratio'] for c in acdc.collect([str(out)], {'rows': rows})['3d_fullres']['cells']}
    assert cells == {'VoxShield@4/255': pytest.approx(0.9), 'VoxShield@paperBudget': pytest.approx(0.5)}
    with pytest.raises(SystemExit, match='copyv1: no prediction row for method voxshield'):
        acdc.collect([str(out)], {'rows': rows[:1]})


def test_keep_carries_over_missing_configurations_and_compares_shared_seeds(tmp_path):
    out = eval_folder(tmp_path, 'k', [({'method': 'offset', 'eps': 16 / 255}, 0.72)])
    configs = acdc.collect([str(out)], PREDICTIONS)
    earlier = {'provenance': {'commit': 'abc', 'command': 'x', 'date': 'd', 'machine': 'm'}, 'configurations': {
        '2d': {'clean': {'0': {'dice': 0.3}}, 'cells': []},
        '3d_fullres': {'clean': {'0': {'dice': 0.81}, '5': {'dice': 0.5}},
                       'cells': [{'cell': 'offset:sign=levels@16/255', 'seeds': [0], 'ratio_per_seed': [0.88]}]}}}
    f = tmp_path / 'acdc_old.json'
    f.write_text(json.dumps(earlier))
    kept = acdc.keep_earlier(configs, str(f))
    assert kept['2d']['carried_from'] == 'acdc_old.json' and kept['2d']['clean'] == {'0': {'dice': 0.3}}
    f.write_text(json.dumps({**earlier, 'configurations': {'2d': kept['2d']}}))  # carried again: still named
    (tmp_path / 'acdc_newer.json').write_text(f.read_text())
    again = acdc.keep_earlier(acdc.collect([str(out)], PREDICTIONS), str(tmp_path / 'acdc_newer.json'))
    assert again['2d']['carried_from'] == 'acdc_old.json'
    [e] = kept['3d_fullres']['reruns']
    assert e['clean'] == {'0': {'earlier': 0.81, 'now': pytest.approx(0.8)}}  # seed 5 was not rerun
    assert e['offset:sign=levels@16/255'] == {'0': {'earlier': 0.88, 'now': pytest.approx(0.9)}}


def test_keep_lists_only_retrained_seeds_as_reruns(tmp_path):
    """A victim read again (another folder reusing it, or the same folder) is not a rerun: same fingerprint, no
    'earlier' line; a retrained victim of the same seed is listed even at the same value; an earlier file without
    fingerprints falls back to the values."""
    out = eval_folder(tmp_path, 'r', [({'method': 'offset', 'eps': 16 / 255}, 0.72)])
    f = tmp_path / 'acdc_old.json'
    f.write_text(json.dumps({'provenance': {'commit': 'abc'}, 'configurations': acdc.collect([str(out)], PREDICTIONS)}))
    again = acdc.keep_earlier(acdc.collect([str(out)], PREDICTIONS), str(f))['3d_fullres']
    assert 'reruns' not in again and again['clean']['0']['victim_id'] == acdc.victim_id(scores([0.8, 0.8]))
    retrained = eval_folder(tmp_path, 's', [({'method': 'offset', 'eps': 16 / 255}, 0.72)])
    for g in retrained.glob('victims/*/*/seed_0/scores.json'):      # seed 0 retrained: other cases, same mean
        g.write_text(json.dumps(scores([0.6, 1.0] if 'clean' in str(g) else [0.62, 0.82])))
    newer = acdc.keep_earlier(acdc.collect([str(retrained)], PREDICTIONS), str(f))
    [e] = newer['3d_fullres']['reruns']
    assert e['clean'] == {'0': {'earlier': pytest.approx(0.8), 'now': pytest.approx(0.8)}}
    assert list(e['offset:sign=levels@16/255']) == ['0']
    g = tmp_path / 'acdc_newer.json'                              # read again later: the rerun stays recorded
    g.write_text(json.dumps({'provenance': {'commit': 'def'}, 'configurations': newer}))
    assert acdc.keep_earlier(acdc.collect([str(retrained)], PREDICTIONS), str(g))['3d_fullres']['reruns'] == [e]
    old = json.loads(f.read_text())
    for c in old['configurations'].values():
        [x.pop('victim_id') for x in c['clean'].values()] + [x.pop('victim_ids') for x in c['cells']]
    old['configurations']['3d_fullres']['clean']['1']['dice'] = 0.7
    f.write_text(json.dumps(old))
    [e] = acdc.keep_earlier(acdc.collect([str(out)], PREDICTIONS), str(f))['3d_fullres']['reruns']
    assert e['clean'] == {'1': {'earlier': 0.7, 'now': pytest.approx(0.8)}} and len(e) == 3   # file, commit, clean


def test_keep_carries_over_the_cells_a_rerun_lacks(tmp_path):
    """A folder that reruns one configuration with a new cell keeps the earlier file's other cells of that
    configuration (marked, with their own ratios) and its clean seeds the folder did not rerun."""
    out = eval_folder(tmp_path, 'n', [({'method': 'offset', 'eps': 16 / 255}, 0.72)])
    configs = acdc.collect([str(out)], PREDICTIONS)
    earlier = {'provenance': {'commit': 'abc1234', 'command': 'x', 'date': 'd', 'machine': 'm'}, 'configurations': {
        '3d_fullres': {'clean': {'0': {'dice': 0.81}, '7': {'dice': 0.79}},
                       'cells': [{'cell': 'offset:sign=levels@112/255', 'psnr_roi': 14.2, 'seeds': [0, 1],
                                  'ratio_per_seed': [0.01, 0.02], 'ratio': 0.015}]}}}
    f = tmp_path / 'acdc_old.json'
    f.write_text(json.dumps(earlier))
    kept = acdc.keep_earlier(configs, str(f))['3d_fullres']
    assert [c['cell'] for c in kept['cells']] == ['offset:sign=levels@16/255', 'offset:sign=levels@112/255']
    carried = kept['cells'][1]
    assert carried['carried_from'] == 'acdc_old.json' and carried['carried_commit'] == 'abc1234'
    assert carried['ratio_per_seed'] == [0.01, 0.02] and 'carried_from' not in kept['cells'][0]
    assert list(kept['clean'])[-1] == '7' and kept['clean']['7']['carried_from'] == 'acdc_old.json'
    assert 'carried_from' not in kept['clean']['0'] and kept['clean']['0']['dice'] == pytest.approx(0.8)


def test_keep_lets_an_earlier_cell_with_more_seeds_stand_and_keeps_where_cells_were_measured(tmp_path):
    """A folder that retrains one seed of a two-seed cell (e.g. beside purified cells) does not shrink the cell: the
    earlier one stands, its seed-0 rerun recorded; a cell carried once stays named after its first file."""
    out = eval_folder(tmp_path, 'm', [({'method': 'offset', 'eps': 16 / 255}, 0.72)])
    for g in out.glob('victims/*/*/seed_1'):
        shutil.rmtree(g)                                          # the folder has seed 0 only
    configs = acdc.collect([str(out)], PREDICTIONS)
    assert configs['3d_fullres']['cells'][0]['seeds'] == [0]
    earlier = {'provenance': {'commit': 'abc1234'}, 'configurations': {'3d_fullres': {
        'clean': {'0': {'dice': 0.81}, '1': {'dice': 0.79}},
        'cells': [{'cell': 'offset:sign=levels@16/255', 'psnr_roi': 29.0, 'seeds': [0, 1],
                   'ratio_per_seed': [0.88, 0.86], 'ratio': 0.87},
                  {'cell': 'offset:sign=levels@112/255', 'psnr_roi': 14.0, 'seeds': [0], 'ratio_per_seed': [0.02],
                   'ratio': 0.02, 'carried_from': 'acdc_first.json', 'carried_commit': 'f1r57'}]}}}
    f = tmp_path / 'acdc_old.json'
    f.write_text(json.dumps(earlier))
    kept = acdc.keep_earlier(configs, str(f))['3d_fullres']
    cells = {c['cell']: c for c in kept['cells']}
    stands = cells['offset:sign=levels@16/255']
    assert stands['seeds'] == [0, 1] and stands['ratio'] == 0.87 and stands['carried_from'] == 'acdc_old.json'
    assert cells['offset:sign=levels@112/255']['carried_from'] == 'acdc_first.json'
    assert cells['offset:sign=levels@112/255']['carried_commit'] == 'f1r57'
    [e] = kept['reruns']
    assert e['offset:sign=levels@16/255'] == {'0': {'earlier': 0.88, 'now': pytest.approx(0.9)}}
    assert kept['clean']['1']['carried_from'] == 'acdc_old.json' and 'carried_from' not in kept['clean']['0']


def _purified_folder(tmp_path, name, seed, clean, copy, clean_blur, copy_blur):
    """An evaluation folder of one seed: clean and checkerboard victims, unpurified and blurred (Dice per row)."""
    out = eval_folder(tmp_path, name, [({'method': 'checkerboard', 'eps': 16 / 255}, copy)])
    for g in out.glob('victims/*/*/seed_*'):
        shutil.rmtree(g)
    for row, dice in (('clean', clean), ('protected', copy), ('clean+blur', clean_blur), ('protected+blur', copy_blur)):
        f = out / 'victims' / row / '3d_fullres' / f'seed_{seed}' / 'scores.json'
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps(scores([dice, dice + 0.02])))
    return out


CB = {'cell': 'checkerboard:sign=levels@16/255', 'eps': '16/255', 'psnr_roi': 29.0, 'psnr_whole': 43.0,
      'predicted_ratio': 0.92, 'predicted_ratio_range': [0.89, 0.95]}
CB_ROWS = {'rows': [CB, {**CB, 'cell': CB['cell'] + '+blur', 'method': 'checkerboard', 'defence': 'blur',
                         'predicted_ratio': None, 'predicted_ratio_range': None}]}


def test_keep_joins_a_later_seed_to_an_earlier_one_seed_cell(tmp_path):
    """A second seed run later (its own clean victims) joins the earlier file's one-seed cell instead of replacing
    it: means, seed-paired ratios and the purification's cost over both seeds; seed 0 marked where it was measured;
    no interval (seed 0 has no per-case Dice)."""
    earlier = {'provenance': {'commit': 'abc1234'}, 'configurations': {'3d_fullres': {
        'clean': {'0': {'dice': 0.80}},
        'cells': [{'cell': CB['cell'] + '+blur', 'psnr_roi': 29.0, 'seeds': [0], 'dice': 0.6, 'clean_dice': 0.75,
                   'ratio': 0.8, 'ratio_per_seed': [0.8], 'dice_per_label': {'1': 0.6}, 'defence': 'blur',
                   'purification_cost': 0.9375, 'ratio_to_clean': 0.75, 'ci95': [0.7, 0.9],
                   'victim_ids': {'0': 'aaa'}}]}}}
    f = tmp_path / 'acdc_old.json'
    f.write_text(json.dumps(earlier))
    out = _purified_folder(tmp_path, 's1', 1, clean=0.70, copy=0.1, clean_blur=0.69, copy_blur=0.49)
    kept = acdc.keep_earlier(acdc.collect([str(out)], CB_ROWS), str(f))['3d_fullres']
    blur = {c['cell']: c for c in kept['cells']}[CB['cell'] + '+blur']
    assert blur['seeds'] == [0, 1]
    assert blur['dice'] == pytest.approx((0.6 + 0.5) / 2) and blur['clean_dice'] == pytest.approx((0.75 + 0.70) / 2)
    assert blur['ratio'] == pytest.approx(0.55 / 0.725)
    assert blur['ratio_per_seed'] == [0.8, round(0.5 / 0.70, 3)]
    assert blur['purification_cost'] == pytest.approx(0.725 / ((0.8 + 0.71) / 2))
    assert blur['ratio_to_clean'] == pytest.approx(0.55 / ((0.8 + 0.71) / 2))
    assert blur['dice_per_label']['1'] == pytest.approx(0.55)
    assert blur['ci95'] is None and blur['victim_ids']['0'] == 'aaa' and set(blur['victim_ids']) == {'0', '1'}
    assert blur['carried_seeds'] == {'0': {'file': 'acdc_old.json', 'commit': 'abc1234'}}
    assert 'carried_from' not in blur
    assert set(kept['clean']) == {'0', '1'} and kept['clean']['0']['carried_from'] == 'acdc_old.json'


def test_joined_seeds_keep_their_numbers_for_the_next_run_and_an_interval_over_all(tmp_path):
    """A cell written with per-seed records (per-case Dice) takes a third seed with a bootstrap interval over all
    seeds; an earlier cell of several seeds without records cannot take new seeds (a clear error, not a guess)."""
    two = _purified_folder(tmp_path, 'a', 0, clean=0.8, copy=0.1, clean_blur=0.75, copy_blur=0.6)
    configs = acdc.collect([str(two)], CB_ROWS)
    cell = {c['cell']: c for c in configs['3d_fullres']['cells']}[CB['cell'] + '+blur']
    assert cell['per_seed']['0']['cases'] == {'c0': [0.6, 0.75], 'c1': [0.62, 0.77]}
    assert cell['per_seed']['0']['unpurified_clean_dice'] == pytest.approx(0.81)
    f = tmp_path / 'acdc_old.json'
    f.write_text(json.dumps({'provenance': {'commit': 'abc1234'}, 'configurations': configs}))
    later = _purified_folder(tmp_path, 'b', 2, clean=0.7, copy=0.1, clean_blur=0.7, copy_blur=0.35)
    kept = acdc.keep_earlier(acdc.collect([str(later)], CB_ROWS), str(f))['3d_fullres']
    blur = {c['cell']: c for c in kept['cells']}[CB['cell'] + '+blur']
    assert blur['seeds'] == [0, 2] and set(blur['per_seed']) == {'0', '2'}
    lo, hi = blur['ci95']
    assert lo <= blur['ratio'] <= hi and lo < hi
    old = json.loads(f.read_text())
    old['configurations']['3d_fullres']['cells'] = [{**c, 'seeds': [0, 1], 'per_seed': None}
                                                    for c in old['configurations']['3d_fullres']['cells']]
    f.write_text(json.dumps(old))
    with pytest.raises(SystemExit, match='no per-seed numbers'):
        acdc.keep_earlier(acdc.collect([str(later)], CB_ROWS), str(f))


def _raw_case(folder, case, image, label=None):
    import numpy as np
    import SimpleITK as sitk
    (folder / 'imagesTr').mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.float32)), str(folder / 'imagesTr' / f'{case}_0000.nii.gz'))
    if label is not None:
        (folder / 'labelsTr').mkdir(exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(label.astype(np.uint8)), str(folder / 'labelsTr' / f'{case}.nii.gz'))


def test_predict_row_appends_the_rule_at_the_copys_roi_psnr_once(tmp_path):
    """Two cases whose label voxels moved by 10 and 1 on a range of 100: ROI PSNR 20 and 40 dB, mean 30; the row holds
    the file's own logistic there and at the corners of its intervals; a second row for the cell is refused and a
    copy without a method names its dataset.json, each leaving the file as it was."""
    import numpy as np
    import predict_row
    clean, copy = tmp_path / 'Dataset001_Clean', tmp_path / 'Dataset002_Copy'
    ramp = np.linspace(0, 100, 4 * 8 * 8).reshape(4, 8, 8)
    label = np.zeros(ramp.shape)
    label[1:3, 2:6, 2:6] = 1
    for case, step in (('a', 10.0), ('b', 1.0)):
        _raw_case(clean, case, ramp, label)
        _raw_case(copy, case, ramp + step * label)
    (copy / 'dataset.json').write_text(json.dumps({'voxshield': {'method': 'em_samplewise'}}))
    rule = {'x50': 22.0, 's': 3.0, 'x50_ci': [21.0, 23.0], 's_ci': [2.5, 3.5]}
    predictions = tmp_path / 'predictions.json'
    predictions.write_text(json.dumps({'rule': rule, 'rows': [], 'provenance': {'command': 'earlier'}}))
    args = ['--predictions', str(predictions), '--clean', str(clean), '--copy', str(copy), '--cell', 'EM@4/255',
            '--eps', '4/255', '--noda', '0.3-1.0', '--noda-why', 'a guess', '--noda-written', '2026-12-07T17:50Z',
            '--command', 'voxshield_export ...']
    predict_row.main(args)
    saved = json.loads(predictions.read_text())
    (row,) = saved['rows']
    assert row['psnr_roi'] == pytest.approx(30.0) and row['psnr_roi_std'] == pytest.approx(10.0)
    assert row['method'] == 'em_samplewise' and row['dataset'] == 'Dataset002_Copy' and row['eps'] == '4/255'
    assert row['predicted_ratio'] == pytest.approx(1 / (1 + np.exp((22.0 - 30.0) / 3.0)))
    low, high = 1 / (1 + np.exp((23.0 - 30.0) / 3.5)), 1 / (1 + np.exp((21.0 - 30.0) / 2.5))  # the corners
    assert row['predicted_ratio_range'] == pytest.approx([low, high])
    assert row['predicted_noda'] == {'text': '0.3-1.0', 'why': 'a guess', 'written': '2026-12-07T17:50Z'}
    assert saved['provenance']['command'].startswith('earlier; EM@4/255 row (written ')
    before = predictions.read_text()
    with pytest.raises(SystemExit, match="cell 'EM@4/255' is already there"):
        predict_row.main(args)
    (copy / 'dataset.json').write_text('{}')
    with pytest.raises(SystemExit, match=r'Dataset002_Copy/dataset.json: no voxshield method'):
        predict_row.main([*args[:7], 'other@4/255', *args[8:]])
    assert predictions.read_text() == before


def test_predict_row_writes_a_purified_cell_with_its_written_expectation(tmp_path):
    """A purified cell keeps the copy's PSNR, holds the hand-written expectation for the stock victim (no rule value)
    and is read by collect as the stock victim's prediction; a wrong name, a missing expectation or an unknown
    purification is refused, the file unchanged."""
    import numpy as np
    import predict_row
    clean, copy = tmp_path / 'Dataset001_Clean', tmp_path / 'Dataset002_Copy'
    ramp = np.linspace(0, 100, 4 * 8 * 8).reshape(4, 8, 8)
    label = np.zeros(ramp.shape)
    label[1:3, 2:6, 2:6] = 1
    _raw_case(clean, 'a', ramp, label)
    _raw_case(copy, 'a', ramp + 10.0 * label)
    (copy / 'dataset.json').write_text(json.dumps({'voxshield': {'method': 'conv', 'strength': 1.12}}))
    predictions = tmp_path / 'predictions.json'
    predictions.write_text(json.dumps({'rule': {'x50': 22.0, 's': 3.0, 'x50_ci': [21.0, 23.0], 's_ci': [2.5, 3.5]},
                                       'rows': [], 'provenance': {'command': 'earlier'}}))
    base = ['--predictions', str(predictions), '--clean', str(clean), '--copy', str(copy), '--command', 'export']
    before = predictions.read_text()
    for extra, message in ((['--cell', 'conv+zresample', '--defence', 'zresample'], 'needs --expect and/or --noda'),
                           (['--cell', 'conv', '--defence', 'zresample', '--expect', '0.3-0.8'], 'a cell named'),
                           (['--cell', 'conv+smear', '--defence', 'smear', '--expect', '0.3-0.8'], 'unknown defence'),
                           (['--cell', 'conv', '--expect', '0.3-0.8'], '--expect is for a purified cell')):
        with pytest.raises(SystemExit, match=message):
            predict_row.main(base + extra)
        assert predictions.read_text() == before
    predict_row.main(base + ['--cell', 'conv+zresample', '--defence', 'zresample', '--expect', '0.3-0.8 (kept)',
                             '--expect-why', 'z-only', '--victims', 'stock 2d'])
    (row,) = json.loads(predictions.read_text())['rows']
    assert row['psnr_roi'] == pytest.approx(20.0) and row['defence'] == 'zresample'
    assert row['predicted_ratio'] is None and row['predicted_ratio_range'] is None
    assert row['predicted_stock']['text'] == '0.3-0.8 (kept)' and row['predicted_stock']['why'] == 'z-only'
    assert row['strength'] == 1.12 and row['dataset'] == 'Dataset002_Copy'
    out = eval_folder(tmp_path, 'z', [({'method': 'conv', 'strength': 1.12}, 0.4)])
    for row_dir in ('protected', 'clean'):                        # both rows purified, the copy's victim at 0.4
        (out / 'victims' / row_dir).rename(out / 'victims' / f'{row_dir}+zresample')
    state = json.loads((out / 'state.json').read_text())
    (out / 'state.json').write_text(json.dumps({**state, 'protected': [str(copy)]}))
    [cell] = acdc.collect([str(out)], json.loads(predictions.read_text()))['3d_fullres']['cells']
    assert cell['cell'] == 'conv+zresample' and cell['predicted_text'] == '0.3-0.8 (kept)'
    assert cell['ratio'] == pytest.approx(0.5) and cell['predicted_ratio'] is None
    predict_row.main(base + ['--cell', 'conv+quantise', '--defence', 'quantise', '--noda', '0.0-0.1',
                             '--noda-written', '2026-12-07T21:00Z'])    # a purified cell for the unaugmented victim
    row = json.loads(predictions.read_text())['rows'][1]
    assert row['predicted_noda']['text'] == '0.0-0.1' and 'predicted_stock' not in row
