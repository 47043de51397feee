"""nnUNetTrainerVoxShieldLC (issue 13): bound and support, the shared class code, the band limit, surrogate resets and
resume, the same math in training and export, stock nnUNetv2_train, export + verify (2- and 3-class phantoms)."""
import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TEST_TRAINERS, run_cli, same, snapshot, use_cpu_preset_as_default_plans, validation_summary
from nnunetv2_voxshield.budget import roi_mask
from nnunetv2_voxshield.export import export_entry
from nnunetv2_voxshield.lc import (LabelCodedPerturbator, LCSource, band_limit, band_mask, intensity_window, lc_bound,
                                   periodic_upsample, tile_pattern)
from nnunetv2_voxshield.phantom import write_phantom_dataset
from nnunetv2_voxshield.verify import verify_datasets

KWARGS = {'dims': 3, 'in_channels': 1, 'features_per_stage': [4, 8], 'kernel_sizes': [[3, 3, 3]] * 2,
          'strides': [[1, 1, 1], [2, 2, 2]], 'n_conv_per_stage': 1, 'foreground_labels': [1, 2, 3], 'band': 2.0,
          'pattern_grid': 4, 'pattern_tile': 8}
TWO, THREE = 'Dataset990_LCPhantom', 'Dataset991_LCPhantom3'


def _state(use_generator=True, eps_bg=0.0, multiplicative=False, dilation=2, saturate=False):
    torch.manual_seed(0)
    model = LabelCodedPerturbator(**KWARGS, use_generator=use_generator)
    if saturate:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(50)
    return {'method': 'voxshield_lc', 'generator_kwargs': dict(KWARGS, use_generator=use_generator),
            'generator_weights': model.state_dict(), 'eps': 4 / 255, 'eps_bg': eps_bg,
            'roi': {'dilation': dilation, 'soft_edge': 0.0}, 'lc': {'multiplicative': multiplicative}}


def _case(seed, shape):
    """A normalised image (1, *shape) and labels (1, *shape) with three classes in blocks (-1 outside a border)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, *shape)).astype(np.float32)
    seg = np.zeros((1, *shape), dtype=np.int8)
    seg[0, 3:9, 4:12, 2:10], seg[0, 10:15, 3:9, 6:14], seg[0, 4:12, 13:18, 11:17] = 1, 2, 3
    seg[0, 0] = -1
    return x, seg


def _source(state):
    return LCSource(state, [16, 16, 16], torch.device('cpu'))


# ----------------------------------------------------------------------------------------- math, no data
def test_band_option_leaves_no_energy_outside_its_band():
    x = torch.randn(2, 1, 20, 23, 18, dtype=torch.float64)
    for band in (2.0, 3.0):
        out = band_limit(x, band)
        spectrum = torch.fft.rfftn(out, dim=(2, 3, 4)).abs() ** 2
        keep = band_mask(x.shape[2:], band)
        assert spectrum[..., ~keep].sum() < 1e-20 * spectrum.sum()
        torch.testing.assert_close(spectrum[..., keep], torch.fft.rfftn(x, dim=(2, 3, 4)).abs()[..., keep] ** 2)
    torch.testing.assert_close(band_limit(x, 1.0), x)
    # the generator's output itself (periods < 2 * band voxels removed) and the period-4 texture kept at band 2
    model = LabelCodedPerturbator(**KWARGS)
    xc, seg = _case(0, (17, 20, 19))
    onehot = torch.cat([torch.from_numpy(seg == k) for k in (1, 2, 3)])[None].float()
    g = model.generated(torch.from_numpy(xc)[None], onehot).detach().double()
    spectrum = torch.fft.rfftn(g, dim=(2, 3, 4)).abs() ** 2
    assert spectrum[..., ~band_mask(g.shape[2:], 2.0)].sum() < 1e-9 * spectrum.sum() and spectrum.sum() > 0
    wave = torch.cos(torch.arange(16, dtype=torch.float64) * np.pi / 2).view(1, 1, 16, 1, 1).expand(1, 1, 16, 8, 8)
    torch.testing.assert_close(band_limit(wave, 2.0), wave)


def test_tile_wraps_around_and_phase_shifts_it():
    grid = torch.randn(2, 1, 4, 4, 4)
    tile = periodic_upsample(grid, 16)
    assert tile.shape == (2, 1, 16, 16, 16)
    wide = tile_pattern(tile, (40, 40, 40), (0, 0, 0))
    torch.testing.assert_close(wide[:, :, 16:32, 3:19, 21:37], tile_pattern(tile, (16, 16, 16), (0, 3, 5)))
    torch.testing.assert_close(wide[:, :, :, :, 16:32], wide[:, :, :, :, :16])
    # periodic interpolation: the jump across a tile edge is no larger than inside the tile
    inner = (tile[:, :, 1:] - tile[:, :, :-1]).abs().max()
    assert (tile[:, :, 0] - tile[:, :, -1]).abs().max() <= inner + 1e-6
    with pytest.raises(ValueError, match='multiple of pattern_grid'):
        periodic_upsample(grid, 10)


@pytest.mark.parametrize('eps_bg,multiplicative', [(0.0, False), (1 / 255, False), (0.0, True)])
def test_delta_is_zero_where_the_bound_is_zero_and_within_the_bound(eps_bg, multiplicative):
    source = _source(_state(eps_bg=eps_bg, multiplicative=multiplicative, saturate=True))
    x, seg = _case(1, (18, 21, 19))
    eps = np.array([0.3], dtype=np.float32)
    delta = source.compute_delta(x, seg, eps, 'c')
    assert delta.shape == x.shape and delta.dtype == np.float32
    roi = roi_mask(torch.from_numpy(seg).float()[None], dilation=2)[0].numpy() > 0
    standard = np.where(roi, eps[0], eps[0] * eps_bg / (4 / 255))
    assert np.all(np.abs(delta) <= standard * (1 + 1e-6))  # never above the standard per-case bound
    assert np.abs(delta[roi]).max() > 0.9 * eps[0]  # saturated: the budget is used
    if eps_bg == 0:
        assert np.all(delta[~roi] == 0) and roi.sum() < roi.size
    else:
        assert np.count_nonzero(delta[~roi]) > 0.5 * (~roi).sum()
    if multiplicative:  # b = eps x clip((x - p_low) / (p_high - p_low), 0, 1): zero at and below p_low
        low, high = np.percentile(x[0], (0.5, 99.5))
        weight = np.clip((x - low) / (high - low), 0, 1)
        assert np.all(np.abs(delta) <= standard * weight + 1e-7)
        assert np.all(delta[x <= low] == 0) and np.any(x <= low)
    bound = lc_bound(torch.from_numpy(roi[None]).float(), torch.tensor(0.3), torch.tensor(0.0))
    assert torch.equal(bound[0] == 0, torch.from_numpy(~roi))


def test_without_g_the_code_is_the_same_for_every_case_at_the_same_class_and_tile_position():
    state = _state(use_generator=False)
    source = _source(state)
    tile = torch.tanh(periodic_upsample(state['generator_weights']['pattern'], 8)).numpy()  # (K, C, 8, 8, 8)
    eps = np.array([0.25], dtype=np.float32)
    codes = []
    for seed, shape in ((2, (18, 21, 19)), (3, (20, 19, 24))):
        x, seg = _case(seed, shape)
        delta = source.compute_delta(x, seg, eps, f'case{seed}') / eps[0]
        idx = np.indices(shape)
        for k in (1, 2, 3):
            at = seg[0] == k
            expected = tile[k - 1, 0][tuple(i[at] % 8 for i in idx)]
            np.testing.assert_allclose(delta[0][at], expected, rtol=1e-5, atol=1e-6)
        assert np.all(delta[0][seg[0] <= 0] == 0)  # no code outside the classes, no G
        codes.append({(k, *(i[z] % 8 for i in idx)): delta[0][z] for k in (1, 2, 3)
                      for z in zip(*np.nonzero(seg[0] == k))})
    shared = set(codes[0]) & set(codes[1])
    assert len(shared) > 100
    assert all(abs(codes[0][key] - codes[1][key]) < 1e-6 for key in shared)
    assert len({round(float(v), 5) for v in codes[0].values()}) > 50  # a pattern, not a constant


# ----------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope='module')
def phantoms(tmp_path_factory):
    """A 2-class phantom (tube, nodule) and a 3-class one (tube split at mid-z into labels 1 and 3), 3 cases each,
    planned by stock nnU-Net in one call, with the CPU preset as nnUNetPlans."""
    base = tmp_path_factory.mktemp('lc')
    roots = {name: base / name for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for d in roots.values():
        d.mkdir()
    write_phantom_dataset(990, name='LCPhantom', n_cases=3, raw_root=str(roots['nnUNet_raw']))
    three = Path(write_phantom_dataset(991, name='LCPhantom3', n_cases=3, seed=1, raw_root=str(roots['nnUNet_raw'])))
    for label_file in (three / 'labelsTr').glob('*.nii.gz'):
        image = sitk.ReadImage(str(label_file))
        seg = sitk.GetArrayFromImage(image)
        seg[seg.shape[0] // 2:][seg[seg.shape[0] // 2:] == 1] = 3
        out = sitk.GetImageFromArray(seg)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(label_file), useCompression=True)
    ds = json.loads((three / 'dataset.json').read_text())
    ds['labels'] = {'background': 0, 'tube': 1, 'nodule': 2, 'tube_upper': 3}
    (three / 'dataset.json').write_text(json.dumps(ds, indent=4))
    run_cli(['nnUNetv2_plan_and_preprocess', '-d', '990', '991', '-c', '3d_fullres', '-np', '1', '-npfp', '1'],
            {**{k: str(v) for k, v in roots.items()}, 'nnUNet_n_proc_DA': None})
    for name in (TWO, THREE):
        use_cpu_preset_as_default_plans(roots['nnUNet_preprocessed'] / name)
    return roots


@pytest.fixture
def lc_env(phantoms, tmp_path, monkeypatch):
    for name in ('nnUNet_raw', 'nnUNet_preprocessed'):
        monkeypatch.setenv(name, str(phantoms[name]))
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'nnUNet_results'))
    entries = [str(TEST_TRAINERS)] + [p for p in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p]
    monkeypatch.setenv('nnUNet_extTrainer', os.pathsep.join(entries))
    return {**phantoms, 'nnUNet_results': tmp_path / 'nnUNet_results'}


def make_trainer(dataset='991', name='nnUNetTrainerVoxShieldLC', **attributes):
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(dataset, '3d_fullres', 'all', name, 'nnUNetPlans', device=torch.device('cpu'))
    for key, value in attributes.items():
        setattr(trainer, key, value)
    trainer.on_train_start()
    return trainer




def test_noDA_variant_optimises_through_no_augmentation(lc_env):
    """``_tile4_noDA``: T is stock NoDA's pipeline (no spatial, intensity, noise/blur, low-res or mirror transform),
    the loader crops the final patch, inference does not mirror, and a step of it trains the code."""
    from nnunetv2_voxshield.trainers.victim_profiles import FAMILIES
    trainer = make_trainer(name='nnUNetTrainerVoxShieldLC_tile4_noDA_eps10')
    assert trainer.eps == pytest.approx(10 / 255) and trainer.pattern_tile == 4

    def classes(t):
        inner = getattr(t, 'transform', None)
        return [type(t)] + sum((classes(c) for c in getattr(t, 'transforms', [])), []) + \
            (classes(inner) if inner is not None else [])
    augmenting = tuple(c for family in FAMILIES.values() for c in family)
    assert not any(issubclass(c, augmenting) for c in classes(trainer.eot_transform))
    loader = trainer.dataloader_train.data_loader  # nnU-Net's loader inside the single-threaded augmenter
    assert list(loader.patch_size) == list(loader.final_patch_size) == list(trainer.configuration_manager.patch_size)
    assert trainer.inference_allowed_mirroring_axes is None
    batch = next(trainer.dataloader_train)
    before = trainer.generator.pattern.detach().clone()
    assert torch.is_tensor(batch['target'])  # the loader only crops; T (NoDA) runs inside the step
    trainer.voxshield_iteration = trainer.surrogate_steps_per_cycle  # a generator step
    trainer.train_step({'data': batch['data'][:1], 'target': batch['target'][:1], 'keys': batch['keys'][:1]})
    assert not torch.equal(before, trainer.generator.pattern.detach())


@pytest.mark.parametrize('name, regularised', [('nnUNetTrainerVoxShieldLC_noReg_eps64', False),
                                                ('nnUNetTrainerVoxShieldLC_eps64', True)])
def test_noReg_generator_minimises_L_seg_alone(lc_env, name, regularised):
    """``_noReg`` (issue 13.2): a generator step's objective is L_seg alone; the plain trainer's adds 0.2 L_ISC +
    0.05 L_SPD (Eq. 6). Both at 64/255, and the checkpoint records the lambdas."""
    trainer = make_trainer(name=name)
    assert trainer.eps == pytest.approx(64 / 255)
    objectives = []
    trainer.update_generator = lambda l_g: objectives.append(float(l_g))
    batch = next(trainer.dataloader_train)
    out = trainer.generator_step(batch['data'][:1], batch['target'][:1], batch['keys'][:1])
    expected = out['l_seg'] + (0.2 * out['l_isc'] + 0.05 * out['l_spd'] if regularised else 0.0)
    assert objectives == [pytest.approx(expected, rel=1e-5)]
    assert abs(0.2 * out['l_isc'] + 0.05 * out['l_spd']) > 1e-3  # so the two objectives differ measurably
    state = trainer.voxshield_state()
    assert (state['lambda_isc'], state['lambda_spd']) == ((0.2, 0.05) if regularised else (0.0, 0.0))


def test_fast_pattern_rate_moves_the_code(lc_env):
    """``_fastP``: P in its own Adam group at 1e-2, G at generator_lr; one generator step moves P by ~1e-2 (Adam's
    first step is lr x sign(grad)), 100x what the plain trainer allows."""
    trainer = make_trainer(name='nnUNetTrainerVoxShieldLC_tile4_noDA_fastP_eps10')
    groups = trainer.generator_optimizer.param_groups
    assert [g['lr'] for g in groups] == [1e-2, trainer.generator_lr] and groups[0]['params'][0] is \
        trainer.generator.pattern
    assert sum(p.numel() for g in groups for p in g['params']) == sum(p.numel() for p in trainer.generator.parameters())
    batch = next(trainer.dataloader_train)
    before = trainer.generator.pattern.detach().clone()
    trainer.voxshield_iteration = trainer.surrogate_steps_per_cycle  # a generator step
    trainer.train_step({'data': batch['data'][:1], 'target': batch['target'][:1], 'keys': batch['keys'][:1]})
    moved = (trainer.generator.pattern.detach() - before).abs().max().item()
    assert 5e-3 < moved < 2e-2
    plain = make_trainer(name='nnUNetTrainerVoxShieldLC_tile4_noDA_eps10')
    assert len(plain.generator_optimizer.param_groups) == 1


def test_checkerboard_init_starts_from_the_control(lc_env):
    """``_cbInit``: b tanh(P) starts as +-0.95 b (-1)^(i+j+k), sign +, -, + for labels 1, 2, 3."""
    trainer = make_trainer(name='nnUNetTrainerVoxShieldLC_tile4_noDA_cbInit_eps10')
    tile = torch.tanh(periodic_upsample(trainer.generator.pattern.detach(), trainer.pattern_tile))
    i, j, k = np.indices((4, 4, 4))
    parity = torch.from_numpy(np.where((i + j + k) % 2 == 0, 0.95, -0.95)).float()
    for index, sign in enumerate((1, -1, 1)):
        assert torch.allclose(tile[index, 0], sign * parity, atol=1e-6)


@pytest.mark.parametrize('multiplicative', [False, True])
def test_training_and_export_compute_the_same_delta(lc_env, multiplicative):
    # random_phase off: the tile at the patch's origin, as export puts it at the array's origin
    trainer = make_trainer(random_phase=False, multiplicative=multiplicative)
    assert trainer.generator_kwargs['foreground_labels'] == [1, 2, 3] and trainer.roi_dilation == 2
    key = sorted(trainer.case_budgets)[0]
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, [key])
    data, seg, _, _ = dataset.load_case(key)
    # a crop the size of one sliding window, a multiple of G's stride: export then runs G exactly once, unpadded
    patch = [min(p, s) // 8 * 8 for p, s in zip(trainer.configuration_manager.patch_size, data.shape[1:])]
    crop = tuple(slice(0, p) for p in patch)
    x, y = np.asarray(data)[(slice(None), *crop)].copy(), np.asarray(seg)[(slice(None), *crop)].copy()
    assert set(np.unique(y)) >= {1, 3}
    if multiplicative:  # the trainer's window is the whole case's; export's, that of the array it is given
        assert set(trainer.intensity_windows) == set(trainer.case_budgets)
        assert trainer.intensity_windows[key] == intensity_window(np.asarray(data), trainer.percentiles)
        trainer.intensity_windows[key] = intensity_window(x, trainer.percentiles)
    else:
        assert trainer.intensity_windows is None
    with torch.no_grad():
        for p in trainer.generator.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # trained-looking weights: G's part is not negligible
        delta, bound = trainer.perturbation(torch.from_numpy(x)[None], torch.from_numpy(y)[None].float(), [key])
    source = LCSource(trainer.voxshield_state(), patch, torch.device('cpu'))
    exported = source.compute_delta(x, y, np.asarray(trainer.case_budgets[key]['eps_norm'], np.float32), key)
    eps = trainer.case_budgets[key]['eps_norm'][0]
    np.testing.assert_allclose(exported, delta[0].numpy(), atol=2e-4 * eps)
    assert np.abs(exported).max() > 0.5 * eps and np.all(np.abs(delta.numpy()) <= bound.numpy() + 1e-7)


def test_surrogate_reset_on_schedule_and_resume_reaches_the_same_next_step(lc_env, tmp_path):
    a = make_trainer()
    a.surrogate_reset_every = 3
    batch = next(a.dataloader_train)
    batch = {'data': batch['data'][:1], 'target': batch['target'][:1], 'keys': batch['keys'][:1]}  # CPU time
    resets = []
    reset = a.reset_surrogate

    def spy(index):
        rng = torch.get_rng_state()
        reset(index)
        assert torch.equal(rng, torch.get_rng_state())  # the global RNG is not consumed
        resets.append((a.voxshield_iteration, index, snapshot(a.network), len(a.optimizer.state)))

    a.reset_surrogate = spy
    for _ in range(2):
        a.train_step(batch)
    ckpt = str(tmp_path / 'ckpt.pth')
    a.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)['voxshield']['lc']['surrogate_reset_every'] == 3
    assert 'pattern' in torch.load(ckpt, weights_only=False)['voxshield']['generator_weights']
    b = make_trainer()
    b.surrogate_reset_every = 3
    b.load_checkpoint(ckpt)
    assert b.voxshield_iteration == 2
    for trainer in (a, b):
        torch.manual_seed(123)
        np.random.seed(123)
        for _ in range(5):  # iterations 2..6: resets before iterations 3 and 6
            trainer.train_step(batch)
    assert [(i, k) for i, k, _, _ in resets] == [(3, 1), (6, 2)]
    assert all(n == 0 for *_, n in resets)  # fresh optimiser state
    assert not same(resets[0][2], resets[1][2])  # each reset draws new weights
    c = make_trainer()  # the re-initialised weights depend only on (surrogate_seed, reset index)
    c.reset_surrogate(1)
    assert same(resets[0][2], snapshot(c.network))
    assert same(snapshot(a.network), snapshot(b.network)) and same(snapshot(a.generator), snapshot(b.generator))
    assert 'surrogate re-initialised (reset 2, iteration 6)' in Path(a.log_file).read_text()


def _check_export(lc_env, source_name, out_id, trainer_name, eps='4/255'):
    raw = lc_env['nnUNet_raw']
    clean = raw / source_name
    protected = raw / f'Dataset{out_id}_{source_name.split("_", 1)[1]}Protected'
    export_entry(['-d', source_name, '-o', str(out_id), '-tr', trainer_name, '-f', 'all', '-device', 'cpu'])
    try:
        run_cli(['voxshield_verify', clean, protected, '--eps', eps])  # exits non-zero on any violation
        report = verify_datasets(str(clean), str(protected), float(Fraction(eps)))
        assert report['violations'] == [] and report['summary']['cases'] == 3
        labels = set()
        for label_file in sorted((clean / 'labelsTr').glob('*.nii.gz')):
            assert (protected / 'labelsTr' / label_file.name).read_bytes() == label_file.read_bytes()
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
            case = label_file.name[:-len('.nii.gz')]
            x = sitk.GetArrayFromImage(sitk.ReadImage(str(clean / 'imagesTr' / f'{case}_0000.nii.gz')))
            xp = sitk.GetArrayFromImage(sitk.ReadImage(str(protected / 'imagesTr' / f'{case}_0000.nii.gz')))
            diff = np.abs(xp.astype(np.float64) - x)
            for k in np.unique(seg[seg > 0]):
                assert diff[seg == k].max() > 0  # every class carries its code
                labels.add(int(k))
        return report, labels
    finally:
        shutil.rmtree(protected, ignore_errors=True)


@pytest.mark.slow
def test_stock_nnunetv2_train_runs_the_lc_trainer_and_its_checkpoint_exports(lc_env):
    trainer = 'nnUNetTrainerVoxShieldLC_tiny'  # 6 iterations, a reset after 4 (tests/nnunet_test_trainers)
    run_cli(['nnUNetv2_train', '990', '3d_fullres', 'all', '-tr', trainer, '-device', 'cpu'])
    fold = lc_env['nnUNet_results'] / TWO / f'{trainer}__nnUNetPlans__3d_fullres' / 'fold_all'
    state = torch.load(fold / 'checkpoint_final.pth', weights_only=False)['voxshield']
    assert state['method'] == 'voxshield_lc' and state['iteration'] == 6
    assert state['generator_kwargs']['foreground_labels'] == [1, 2] and state['roi']['dilation'] == 2
    log = next(fold.glob('training_log_*.txt')).read_text()
    assert 'surrogate re-initialised (reset 1, iteration 4)' in log and 'VoxShield: L_seg' in log
    validation_summary(fold, {'1', '2'})
    assert not (fold / 'checkpoint_best.pth').exists()  # chosen by the surrogate's Dice: not written for protectors
    report, labels = _check_export(lc_env, TWO, 992, trainer)
    assert labels == {1, 2} and 0 < report['summary']['max_budget_use'] <= 1


def test_three_class_phantom_exports_and_verifies(lc_env):
    trainer = make_trainer('991', 'nnUNetTrainerVoxShieldLC_eps16')
    with torch.no_grad():
        for p in trainer.generator.parameters():  # saturate tanh so that the bounds are reached
            p.mul_(50)
    trainer.save_checkpoint(str(Path(trainer.output_folder) / 'checkpoint_final.pth'))
    report, labels = _check_export(lc_env, THREE, 993, 'nnUNetTrainerVoxShieldLC_eps16', '16/255')
    assert labels == {1, 2, 3} and report['summary']['max_budget_use'] > 0.9


def test_align_step_trains_the_code_on_the_gradient_cosine_and_leaves_the_surrogate(lc_env):
    """``_align``: a generator step moves P, reports cos(g_delta, g_clean) in [-1, 1], and leaves the surrogate's
    weights and gradients untouched; surrogate steps log the cosine every ``align_log_every`` iterations."""
    trainer = make_trainer(name='nnUNetTrainerVoxShieldLC_align_noDA_eps10', align_log_every=4)
    batch = next(trainer.dataloader_train)
    one = {'data': batch['data'][:1], 'target': batch['target'][:1], 'keys': batch['keys'][:1]}
    weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    before = trainer.generator.pattern.detach().clone()
    trainer.voxshield_iteration = trainer.surrogate_steps_per_cycle  # a generator step
    out = trainer.train_step(one)
    assert -1 <= out['align'] <= 1 and np.isfinite(out['l_seg'])
    assert not torch.equal(before, trainer.generator.pattern.detach())
    assert all(torch.equal(v, trainer.network.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in trainer.network.parameters())
    logged = [trainer.train_step(one) for _ in range(4)]  # steps 3..6: surrogate, generator, surrogate, generator
    assert not all(torch.equal(v, trainer.network.state_dict()[k]) for k, v in weights.items())
    assert 'align' not in logged[0] and 'align' in logged[2]  # surrogate steps log at 1, 5, 9, ...
    assert all(-1 <= o['align'] <= 1 for o in logged[1:])


def test_probe_trains_only_the_surrogate_on_a_fixed_code(lc_env):
    """``_probe_noDA``: no generator steps (P never moves), no re-initialisation; ``_cb``: the checkerboard code."""
    trainer = make_trainer(name='nnUNetTrainerVoxShieldLC_probe_noDA_cb_eps10', align_log_every=1)
    assert trainer.surrogate_reset_every == 0 and not trainer.use_generator
    batch = next(trainer.dataloader_train)
    one = {'data': batch['data'][:1], 'target': batch['target'][:1], 'keys': batch['keys'][:1]}
    before = trainer.generator.pattern.detach().clone()
    outs = [trainer.train_step(one) for _ in range(3)]
    assert torch.equal(before, trainer.generator.pattern.detach())
    assert all('align' in o and np.isnan(o['l_spd']) for o in outs)
    tile = torch.tanh(periodic_upsample(before, trainer.pattern_tile))
    assert tile.abs().min().item() == pytest.approx(0.95, abs=1e-6)
