"""The paper's budget definition (issue 12.2): modes 'zscore' / 'zscore-dataset' next to 'range', in the trainer,
export and verify; bad eps / mode refused with one line; eps variants of the trainers."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import private_nnunet_roots, run_cli
from nnunetv2_voxshield import export
from nnunetv2_voxshield.budget import (BUDGET_MODES, check_budget, dataset_std, parse_eps, parse_eps_abs,
                                       percentile_range, raw_budget)
from nnunetv2_voxshield.verify import verify_entry

SRC_ID, SRC = 851, 'Dataset851_Phantom'
EPS = 4 / 255


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def exact_std_channel(mean: float, std: float, n: int = 1000) -> np.ndarray:
    """n values (n even) with population mean and std exactly ``mean`` and ``std``: mean +- std, alternating."""
    return mean + std * np.tile([-1.0, 1.0], n // 2)


# ---------------------------------------------------------------------------------------------------- budget.py
def test_zscore_budget_is_eps_times_ten_case_std_per_channel():
    img = np.stack([exact_std_channel(100, 7.0), exact_std_channel(-3, 0.25)]).reshape(2, 10, 10, 10)
    np.testing.assert_allclose(raw_budget(img, eps=0.02, mode='zscore'), [0.02 * 10 * 7.0, 0.02 * 10 * 0.25])
    assert BUDGET_MODES.keys() == {'range', 'zscore', 'zscore-dataset'}


def test_zscore_dataset_budget_uses_the_pooled_std_of_all_cases():
    a = np.full((2, 4, 5, 5), 10.0)
    a[1] = exact_std_channel(0, 2.0, 100).reshape(4, 5, 5)
    b = np.full((2, 6, 5, 5), 30.0)
    b[1] = exact_std_channel(0, 2.0, 150).reshape(6, 5, 5)
    # channel 0: 100 voxels at 10 and 150 at 30 -> std 20 x sqrt(0.4 x 0.6); channel 1: both cases mean 0, std 2
    std = dataset_std([a, b])
    np.testing.assert_allclose(std, [20 * np.sqrt(0.4 * 0.6), 2.0])
    rng = np.random.default_rng(0)
    cases = [rng.normal(m, s, (1, n)) for m, s, n in ((0, 1, 500), (5, 3, 2000), (-2, 0.5, 33))]
    np.testing.assert_allclose(dataset_std(cases), [np.concatenate(cases, axis=1).std()])
    np.testing.assert_allclose(raw_budget(a, eps=0.1, mode='zscore-dataset', dataset_std=std), 0.1 * 10 * std)
    with pytest.raises(ValueError, match='dataset'):
        raw_budget(a, eps=0.1, mode='zscore-dataset')  # the dataset std is not optional


def test_range_mode_is_unchanged_and_the_default_and_eps_abs_ignores_the_mode():
    img = np.stack([np.linspace(0, 1000, 10001), np.linspace(-5, 5, 10001)])
    np.testing.assert_allclose(raw_budget(img, eps=0.1), [99.0, 0.99])
    np.testing.assert_allclose(raw_budget(img, eps=0.1, mode='range'), 0.1 * percentile_range(img))
    np.testing.assert_allclose(raw_budget(img, eps=0.1, eps_abs=3.0, mode='zscore'), [3.0, 3.0])
    with pytest.raises(ValueError, match="unknown budget mode 'foo'"):
        raw_budget(img, eps=0.1, mode='foo')


def test_eps_is_a_fraction_and_eps_abs_an_absolute_value():
    assert parse_eps('4/255') == pytest.approx(4 / 255) and parse_eps('1') == 1.0
    for bad in ('0', '1.5', '-1', 'abc', 'nan', '1/0'):
        with pytest.raises(ValueError, match=r'eps must be a fraction in \(0, 1\]'):
            parse_eps(bad)
    assert parse_eps_abs('300') == 300.0  # HU: not a fraction
    for bad in ('0', '-5', 'inf', 'x'):
        with pytest.raises(ValueError, match='eps_abs must be'):
            parse_eps_abs(bad)
    check_budget(EPS, None, 'zscore-dataset')
    with pytest.raises(ValueError, match='budget mode'):
        check_budget(EPS, None, 'zscore_dataset')


# ---------------------------------------------------------------------------------------------------- trainers
def test_eps_variants_have_their_eps_mode_and_schedules():
    import nnunetv2_voxshield.trainers as exported
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2_voxshield.trainers import nnUNetTrainerVoxShield, nnUNetTrainerVoxShieldEOT
    for base in (nnUNetTrainerVoxShield, nnUNetTrainerVoxShieldEOT):
        for n in (10, 16, 64):
            cls = getattr(exported, f'{base.__name__}_eps{n}')
            assert issubclass(cls, base) and cls.eps == n / 255 and cls.budget_mode == 'range'
        paper = getattr(exported, f'{base.__name__}_paperBudget')
        assert issubclass(paper, base) and paper.eps == 4 / 255 and paper.budget_mode == 'zscore'
        for epochs in (1, 5, 10, 20):
            for variant in (f'eps16_{epochs}epochs', f'paperBudget_{epochs}epochs'):
                cls = getattr(exported, f'{base.__name__}_{variant}')
                assert cls.epochs == epochs and cls.eps == getattr(exported, cls.__name__.rsplit('_', 1)[0]).eps
                assert cls.__module__ == 'nnunetv2_voxshield.trainers.eps_variants'
    assert exported.nnUNetTrainerVoxShieldEOT_paperBudget_5epochs.budget_mode == 'zscore'
    lc = exported.nnUNetTrainerVoxShieldLC_paperBudget_20epochs  # the label-conditioned trainer at the paper's budget
    assert issubclass(lc, exported.nnUNetTrainerVoxShieldLC) and lc.epochs == 20
    assert lc.eps == 4 / 255 and lc.budget_mode == 'zscore' and lc.__module__ == 'nnunetv2_voxshield.trainers.lc'
    assert recursive_find_trainer_class_by_name('nnUNetTrainerVoxShieldEOT_eps64_20epochs') is \
        exported.nnUNetTrainerVoxShieldEOT_eps64_20epochs


@pytest.mark.parametrize('attributes, words', [({'eps': 0}, 'eps must be a fraction'),
                                               ({'eps': 1.5}, 'eps must be a fraction'),
                                               ({'budget_mode': 'foo'}, "unknown budget mode 'foo'"),
                                               ({'eps_abs': -1.0}, 'eps_abs must be')])
def test_trainer_with_a_bad_budget_attribute_is_refused(attributes, words):
    from nnunetv2_voxshield.trainers import nnUNetTrainerVoxShield
    bad = type('nnUNetTrainerVoxShield_bad', (nnUNetTrainerVoxShield,), attributes)
    with pytest.raises(ValueError, match=words) as exc:
        bad({}, '3d_fullres', 0, {}, torch.device('cpu'))
    assert str(exc.value).startswith('nnUNetTrainerVoxShield_bad: ') and '\n' not in str(exc.value)


# ---------------------------------------------------------------------------------------------------- phantom
@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """3 phantom cases (float32 and uint8; 1.0 and 1.5 mm slices), stock plans (planning only, no preprocessing)."""
    from nnunetv2_voxshield.phantom import write_phantom_dataset
    base = tmp_path_factory.mktemp('paper_budget')
    with private_nnunet_roots(base) as (roots, mp):
        src = Path(write_phantom_dataset(SRC_ID, 'Phantom', n_cases=3, raw_root=str(roots['nnUNet_raw'])))
        run_cli(['nnUNetv2_plan_and_preprocess', '-d', SRC_ID, '-c', '3d_fullres', '--no_pp', '-np', '1'],
                {**{k: str(v) for k, v in roots.items()}, 'nnUNet_n_proc_DA': None})
        cases = sorted(p.name[:-len('.nii.gz')] for p in (src / 'labelsTr').glob('*.nii.gz'))
        clean = {c: read(src / 'imagesTr' / f'{c}_0000.nii.gz') for c in cases}
        assert {str(a.dtype) for a in clean.values()} == {'float32', 'uint8'}
        yield {**roots, 'src': src, 'cases': cases, 'clean': clean,
               'plans': roots['nnUNet_preprocessed'] / SRC / 'nnUNetPlans.json'}


def export_entry(argv):
    export.export_entry(argv + ['-device', 'cpu'])


def expected_budgets(env, mode: str, eps: float = EPS) -> dict:
    """Budget per case recomputed here from the definition (not with budget.py): eps x 10 x std."""
    if mode == 'zscore-dataset':
        std = np.concatenate([a.astype(np.float64).ravel() for a in env['clean'].values()]).std()
        return {c: eps * 10 * std for c in env['cases']}
    return {c: eps * 10 * a.astype(np.float64).std() for c, a in env['clean'].items()}


def budget_use(env, out: Path, budgets: dict) -> dict:
    return {c: np.abs(read(out / 'imagesTr' / f'{c}_0000.nii.gz').astype(np.float64) - a.astype(np.float64)).max()
            / budgets[c] for c, a in env['clean'].items()}


def verify_fails(capsys, *args) -> list:
    with pytest.raises(SystemExit) as exc:
        verify_entry([str(a) for a in args])
    assert exc.value.code == 1
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith('VIOLATION')]


@pytest.mark.parametrize('mode, out_id', [('zscore', 852), ('zscore-dataset', 853)])
def test_export_in_zscore_mode_passes_verify_at_the_full_budget(env, mode, out_id, capsys):
    export_entry(['-d', str(SRC_ID), '-o', str(out_id), '--method', 'random', '--budget-mode', mode])
    out = env['nnUNet_raw'] / f'Dataset{out_id}_PhantomProtected'
    note = json.loads((out / 'dataset.json').read_text())['voxshield']
    assert note['budget_mode'] == mode and note['eps'] == pytest.approx(EPS) and note['method'] == 'random'
    report = env['nnUNet_results'] / SRC / 'voxshield_random__nnUNetPlans__3d_fullres' / f'export_{out.name}'
    for case in env['cases']:
        assert json.loads((report / 'cases' / f'{case}.json').read_text())['budget_mode'] == mode

    use = budget_use(env, out, expected_budgets(env, mode))
    assert max(use.values()) <= 1.0, use  # never exceeds the zscore budget
    float_cases = [c for c in env['cases'] if env['clean'][c].dtype == np.float32]
    assert max(use[c] for c in float_cases) > 0.99, use  # ... and reaches it

    verify_entry([str(env['src']), str(out), '--budget-mode', mode, '-o', str(out.parent / f'v{out_id}.json')])
    assert 'OK' in capsys.readouterr().out
    checked = json.loads((out.parent / f'v{out_id}.json').read_text())
    assert checked['budget']['mode'] == mode and checked['summary']['max_budget_use'] > 0.99
    assert len(verify_fails(capsys, env['src'], out, '--budget-mode', mode, '--eps', '2/255')) >= 1
    # verify really uses the mode: under 'range' at the same eps it flags exactly when the range budget is smaller
    range_use = budget_use(env, out, {c: EPS * percentile_range(a[None])[0] for c, a in env['clean'].items()})
    if max(range_use.values()) > 1:
        assert len(verify_fails(capsys, env['src'], out, '--budget-mode', 'range')) == \
            sum(u > 1 for u in range_use.values())
    else:
        verify_entry([str(env['src']), str(out), '--budget-mode', 'range'])


def test_export_defaults_to_the_checkpoint_budget_mode(env, capsys):
    """A checkpoint saved by nnUNetTrainerVoxShield_paperBudget (state as its voxshield_state writes it): export
    without --eps / --budget-mode uses the trainer's 4/255 in zscore mode."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_voxshield.generator import NoiseGenerator, generator_kwargs_from_plans
    from nnunetv2_voxshield.trainers import nnUNetTrainerVoxShield_paperBudget as trainer
    plans = json.loads(env['plans'].read_text())
    kwargs = generator_kwargs_from_plans(PlansManager(plans).get_configuration('3d_fullres'), 1)
    torch.manual_seed(0)
    generator = NoiseGenerator(**kwargs)
    with torch.no_grad():  # saturate tanh: delta at the budget
        generator.unet.decoder.seg_layers[-1].weight.mul_(20.0)
    fold = env['nnUNet_results'] / SRC / f'{trainer.__name__}__nnUNetPlans__3d_fullres' / 'fold_0'
    fold.mkdir(parents=True)
    shutil.copy(env['plans'], fold.parent / 'plans.json')
    shutil.copy(env['src'] / 'dataset.json', fold.parent / 'dataset.json')
    torch.save({'trainer_name': trainer.__name__, 'network_weights': {},
                'init_args': {'plans': plans, 'configuration': '3d_fullres', 'fold': 0},
                'voxshield': {'method': trainer.method, 'generator_kwargs': kwargs,
                              'generator_weights': generator.state_dict(), 'eps': trainer.eps, 'eps_abs': None,
                              'budget_mode': trainer.budget_mode, 'percentiles': list(trainer.percentiles),
                              'roi': {'dilation': 0, 'soft_edge': 0.0}, 'eps_bg': 0.0, 'slice_axis': 0}},
               fold / 'checkpoint_final.pth')
    export_entry(['-d', str(SRC_ID), '-o', '854', '-tr', trainer.__name__])
    out = env['nnUNet_raw'] / 'Dataset854_PhantomProtected'
    note = json.loads((out / 'dataset.json').read_text())['voxshield']
    assert note['budget_mode'] == 'zscore' and note['eps'] == pytest.approx(4 / 255)
    use = budget_use(env, out, expected_budgets(env, 'zscore'))
    assert 0.5 < max(use.values()) <= 1.0, use
    verify_entry([str(env['src']), str(out), '--budget-mode', 'zscore'])
    assert len(verify_fails(capsys, env['src'], out, '--budget-mode', 'zscore', '--eps', '1/255')) >= 1


@pytest.mark.parametrize('mode', ['zscore', 'zscore-dataset'])
def test_trainer_budgets_follow_the_mode(env, mode):
    """What the trainer computes per case (case_budgets): the same raw budget, and in nnU-Net's z-score units the
    paper's eps x 10 (x case std / dataset std)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_voxshield.case_budgets import compute_case_budgets
    pm = PlansManager(json.loads(env['plans'].read_text()))
    cm = pm.get_configuration('3d_fullres')
    dataset_json = json.loads((env['src'] / 'dataset.json').read_text())
    budgets = compute_case_budgets(str(env['src']), dataset_json, pm, cm, env['cases'], EPS, mode=mode)
    expected = expected_budgets(env, mode)
    for case in env['cases']:
        b = budgets[case]
        assert b['raw_budget'][0] == pytest.approx(expected[case], rel=1e-6)
        assert b['eps_norm'][0] == pytest.approx(b['raw_budget'][0] * b['scale'][0])
        if mode == 'zscore' and cm.normalization_schemes[0] == 'ZScoreNormalization' \
                and not cm.use_mask_for_norm[0]:
            assert b['eps_norm'][0] == pytest.approx(EPS * 10, rel=1e-3)  # the phantom has no zero crop


# ---------------------------------------------------------------------------------------------------- bad input
BAD = [('--eps', '0', 'eps must be a fraction in (0, 1]'), ('--eps', '1.5', 'eps must be a fraction in (0, 1]'),
       ('--eps', 'abc', 'eps must be a fraction in (0, 1]'), ('--budget-mode', 'foo', "unknown budget mode 'foo'"),
       ('--eps-abs', '0', 'eps_abs must be a finite number > 0')]


@pytest.mark.parametrize('flag, value, words', BAD, ids=lambda v: str(v))
@pytest.mark.parametrize('command', ['export', 'verify'])
def test_bad_budget_input_is_one_line_and_writes_nothing(env, command, flag, value, words, capsys):
    before = {k: tree(env[k]) for k in ('nnUNet_raw', 'nnUNet_results')}
    report = env['nnUNet_raw'].parent / 'report.json'
    with pytest.raises(SystemExit) as exc:
        if command == 'export':
            export_entry(['-d', str(SRC_ID), '-o', '859', '--method', 'random', flag, value])
        else:
            verify_entry([str(env['src']), str(env['src']), flag, value, '-o', str(report)])
    assert exc.value.code not in (0, None)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and words in err and repr(value) in err, err
    assert err.startswith(f'voxshield_{command}: error: ') and captured.out == ''
    assert {k: tree(env[k]) for k in ('nnUNet_raw', 'nnUNet_results')} == before, 'something was written'
    assert not report.exists()
