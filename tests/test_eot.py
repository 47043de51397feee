"""nnUNetTrainerVoxShieldEOT: differentiable stock augmentation, the eps_bg support, and training through stock CLI."""
import copy

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from conftest import requires_hippocampus, run_cli, same, snapshot, validation_summary
from nnunetv2_voxshield.budget import roi_mask
from nnunetv2_voxshield.diff_augment import (DiffContrastTransform, DiffGammaTransform, DiffGaussianBlurTransform,
                                             augment_batch, differentiable, replay_rng)
from nnunetv2_voxshield.defences import gaussian_blur, z_median, z_resample
from nnunetv2_voxshield.diff_defences import GaussianBlur3DTransform, ZMedianTransform, ZResampleTransform
from test_trainer import make_trainer

SHAPE = (10, 12, 10)


def stock_pipeline():
    return nnUNetTrainer.get_training_transforms(SHAPE, (-0.5, 0.5), [[1, 1, 1], [0.5, 0.5, 0.5]], (0, 1, 2), False)


def _inner(t):
    return t.transform if isinstance(t, RandomTransform) else t


def _pairs():
    """(name, stock transform, its differentiable counterpart), forced to apply (probabilities 1)."""
    stock, diff = stock_pipeline(), differentiable(stock_pipeline())
    pairs = []
    for s, d in zip(stock.transforms, diff.transforms):
        s, d = copy.deepcopy(_inner(s)), _inner(d)
        if isinstance(s, SpatialTransform):
            s.p_rotation = s.p_scaling = d.p_rotation = d.p_scaling = 1
        for t in (s, d):
            if hasattr(t, 'p_per_channel'):
                t.p_per_channel = 1
        pairs.append((f'{type(s).__name__}_{len(pairs)}', s, d))
    return pairs


PAIRS = _pairs()


def _sample(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, *SHAPE), generator=g, dtype=dtype) * 3 + 1
    seg = torch.zeros((1, *SHAPE), dtype=torch.int16)
    seg[:, 3:7, 4:8, 3:7] = 1
    return x, seg


def _run(transform, x, seg, seed=3):
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transform(image=x, segmentation=seg.clone())


def test_pipeline_keeps_stock_families_ranges_and_probabilities():
    stock, diff = stock_pipeline(), differentiable(stock_pipeline())
    assert len(stock.transforms) == len(diff.transforms)
    replaced = 0
    for s, d in zip(stock.transforms, diff.transforms):
        assert isinstance(d, type(s)) and getattr(s, 'apply_probability', 1) == getattr(d, 'apply_probability', 1)
        s, d = _inner(s), _inner(d)
        assert isinstance(d, type(s))
        replaced += type(d) is not type(s)
        keys = set(vars(s)) - {'benchmark_use_fft', '_grid_cache'}
        assert {k: repr(vars(s)[k]) for k in keys} == {k: repr(vars(d)[k]) for k in keys}
    assert replaced == 4  # blur, contrast, gamma (inverted), gamma


@pytest.mark.parametrize('name,stock,diff', PAIRS, ids=[p[0] for p in PAIRS])
def test_differentiable_transform_matches_stock_and_has_gradients(name, stock, diff):
    x, seg = _sample()
    expected = _run(stock, x.clone(), seg)
    leaf = x.clone().requires_grad_()
    got = _run(diff, leaf * 1, seg)
    for key in ('image', 'segmentation'):
        e, o = expected[key], got[key]
        for a, b in zip(e if isinstance(e, list) else [e], o if isinstance(o, list) else [o]):
            assert a.shape == b.shape
            torch.testing.assert_close(b.detach().to(a.dtype), a, atol=1e-5, rtol=1e-5)
    assert got['image'].requires_grad
    w = torch.randn(got['image'].shape, generator=torch.Generator().manual_seed(1))
    (got['image'] * w).sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    # the gradient is the transform's derivative: central difference along a random direction (in float64 where
    # the stock transform allows it; grid_sample and the blur kernel are float32 but linear in the image)
    linear_float32 = isinstance(diff, (SpatialTransform, DiffGaussianBlurTransform))
    dtype, h = (torch.float32, 1e-2) if linear_float32 else (torch.float64, 1e-6)
    x64, w64 = x.to(dtype), w.to(dtype)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    leaf = x64.clone().requires_grad_()
    (_run(diff, leaf * 1, seg)['image'] * w64).sum().backward()
    plus = (_run(diff, x64 + h * v, seg)['image'] * w64).sum()
    minus = (_run(diff, x64 - h * v, seg)['image'] * w64).sum()
    assert ((plus - minus) / (2 * h)).item() == pytest.approx((leaf.grad * v).sum().item(), rel=1e-3, abs=1e-3)


@pytest.mark.parametrize('cls', [DiffContrastTransform, DiffGammaTransform])
def test_rewritten_intensity_transforms_pass_gradcheck(cls):
    stock = next(d for _, _, d in PAIRS if type(d) is cls)
    x, seg = _sample(torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _run(stock, t * 1, seg)['image'], (x,), fast_mode=True)


def test_gamma_gradient_is_finite_at_the_channel_minimum():
    gamma = copy.deepcopy(next(d for _, _, d in PAIRS if type(d) is DiffGammaTransform))
    gamma.gamma, gamma.p_retain_stats = 0.7, 0  # d/db b^0.7 is infinite at b = 0 (the minimum voxel)
    x, seg = _sample()
    x.requires_grad_()
    _run(gamma, x * 1, seg)['image'].sum().backward()
    assert torch.isfinite(x.grad).all()


def test_blur_is_direct_convolution_and_linear():
    blur = next(d for _, _, d in PAIRS if type(d) is DiffGaussianBlurTransform)
    x, seg = _sample()
    a, b = _run(blur, x, seg)['image'], _run(blur, 2 * x, seg)['image']
    torch.testing.assert_close(b, 2 * a)


def test_replay_rng_applies_the_same_transform_to_x_plus_delta_and_x():
    diff = differentiable(stock_pipeline())
    x, seg = _sample()
    x, seg = x[None].repeat(2, 1, 1, 1, 1), seg[None].repeat(2, 1, 1, 1, 1)
    np.random.seed(0)
    torch.manual_seed(0)
    with replay_rng() as rewind:
        first = augment_batch(diff, x, seg)
        rewind()
        second = augment_batch(diff, x, seg)
    torch.testing.assert_close(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert first[0].shape == (2, 2, *SHAPE) and [t.shape[2:] for t in first[1]] == [SHAPE, (5, 6, 5)]


DEFENCES = [('zmedian', lambda axis: ZMedianTransform(3, axis), lambda v: z_median(v, 3)),
            ('blur', lambda axis: GaussianBlur3DTransform(1.0), lambda v: gaussian_blur(v, 1.0)),
            ('zresample', lambda axis: ZResampleTransform(2.0, axis), lambda v: z_resample(v, 2.0))]


@pytest.mark.parametrize('axis', [0, 2])
@pytest.mark.parametrize('name,make,reference', DEFENCES, ids=[d[0] for d in DEFENCES])
def test_differentiable_defence_matches_purification_and_has_gradients(name, make, reference, axis):
    volume = np.random.default_rng(0).normal(300, 100, size=(9, 12, 11))  # (z, y, x) as the defences read it
    x = torch.from_numpy(np.moveaxis(volume, 0, axis).copy())[None].requires_grad_()  # z at spatial ``axis``
    out = make(axis)(image=x * 1)['image']
    np.testing.assert_allclose(np.moveaxis(out[0].detach().numpy(), axis, 0), reference(volume), atol=1e-8)
    w, v = torch.randn_like(out), torch.randn_like(x)
    (out * w).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    h = 1e-6
    diff = ((make(axis)(image=x.detach() + h * v)['image'] - make(axis)(image=x.detach() - h * v)['image']) * w)
    assert (diff.sum() / (2 * h)).item() == pytest.approx((x.grad * v).sum().item(), rel=1e-4)


@requires_hippocampus
def test_defence_aware_eot_puts_the_defences_first_in_T(hippocampus_env):
    trainer = make_trainer('nnUNetTrainerVoxShieldEOT_defAware')
    defence = trainer.eot_transform.transforms[0]
    assert defence.apply_probability == 0.5
    options = defence.transform.list_of_transforms
    assert [type(t).__name__ for t in options] == ['ZMedianTransform', 'GaussianBlur3DTransform', 'ZResampleTransform']
    assert options[0].axis == options[2].axis == 0  # Hippocampus: transpose_forward is the identity
    assert trainer.voxshield_state()['eot'] == {'p_defence': 0.5}
    batch = next(trainer.dataloader_train)
    defence.apply_probability = 1
    x = batch['data'].clone().requires_grad_()
    x_t, y_t = trainer.victim_view(x, batch['target'])
    assert list(x_t.shape[2:]) == list(trainer.configuration_manager.patch_size) and isinstance(y_t, list)
    x_t.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@requires_hippocampus
def test_eot_trainer_perturbs_unaugmented_crops_within_roi_and_background_budgets(hippocampus_env):
    trainer = make_trainer('nnUNetTrainerVoxShieldEOT')
    batch = next(trainer.dataloader_train)
    data, target = batch['data'], batch['target']
    assert isinstance(target, torch.Tensor) and target.min() >= -1  # un-augmented: no deep-supervision list yet
    assert all(s > p for s, p in zip(data.shape[2:], trainer.configuration_manager.patch_size))  # nnU-Net's
    # initial (larger) patch, from which T samples the patch exactly as stock's SpatialTransform does
    with torch.no_grad():
        for p in trainer.generator.parameters():  # saturate tanh so both bounds are exercised
            p.mul_(50)
        delta, bound = trainer.perturbation(data, target, batch['keys'])
    eps = trainer._batch_eps(batch['keys'], data)
    eps_bg = eps * (trainer.eps_bg / trainer.eps)
    inside = roi_mask(target).expand_as(delta) > 0
    eps, eps_bg = eps.expand_as(delta), eps_bg.expand_as(delta)
    assert torch.all(delta[inside].abs() <= eps[inside] * (1 + 1e-6))
    assert torch.all(delta[~inside].abs() <= eps_bg[~inside] * (1 + 1e-6))
    assert (delta[inside].abs() / eps[inside]).max() > 0.9
    assert (delta[~inside].abs() / eps_bg[~inside]).max() > 0.9  # the support is no longer the annotation
    assert (delta[~inside] != 0).float().mean() > 0.5
    assert trainer.voxshield_state()['eps_bg'] == pytest.approx(1 / 255)

    trainer.eps_bg = 0.0  # as nnUNetTrainerVoxShieldEOT_noBG: the support is the ROI again
    with torch.no_grad():
        delta, _ = trainer.perturbation(data, target, batch['keys'])
    assert torch.all(delta[~inside] == 0) and delta[inside].abs().max() > 0
    assert trainer.voxshield_state()['eps_bg'] == 0


@requires_hippocampus
def test_eot_steps_train_through_the_augmentation(hippocampus_env):
    trainer = make_trainer('nnUNetTrainerVoxShieldEOT')
    batch = next(trainer.dataloader_train)
    batch = {'data': batch['data'][:1], 'target': batch['target'][:1], 'keys': batch['keys'][:1]}  # CPU time
    net0, gen0 = snapshot(trainer.network), snapshot(trainer.generator)
    out = trainer.train_step(batch)  # surrogate step on T(x + delta)
    assert not same(net0, snapshot(trainer.network)) and same(gen0, snapshot(trainer.generator))
    assert np.isfinite(out['l_seg']) and out['delta_over_budget'] <= 1 + 1e-6
    net1 = snapshot(trainer.network)
    out = trainer.train_step(batch)  # generator step through T
    assert same(net1, snapshot(trainer.network)) and not same(gen0, snapshot(trainer.generator))
    assert np.isfinite(out['l_seg']) and out['l_spd'] <= 0 and out['delta_over_budget'] <= 1 + 1e-6
    grads = [p.grad for p in trainer.generator.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


@requires_hippocampus
def test_stock_nnunetv2_train_runs_the_eot_trainer(hippocampus_env, test_trainers_env):
    run_cli(['nnUNetv2_train', '4', '3d_fullres', '0', '-tr', 'nnUNetTrainerVoxShieldEOT_tiny', '-device', 'cpu'])
    folder = hippocampus_env['nnUNet_results'] / 'Dataset004_Hippocampus' / \
        'nnUNetTrainerVoxShieldEOT_tiny__nnUNetPlans__3d_fullres' / 'fold_0'
    checkpoint = torch.load(folder / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    state = checkpoint['voxshield']
    assert state['method'] == 'voxshield_eot' and state['eps_bg'] == pytest.approx(1 / 255)
    assert state['iteration'] == 2 and set(state['case_budgets']) == set(hippocampus_env['cases'])
    assert all(torch.isfinite(v).all() for v in state['generator_weights'].values())
    validation_summary(folder, {'1', '2'})
    assert not (folder / 'checkpoint_best.pth').exists()  # chosen by the surrogate's Dice: not written for protectors


@requires_hippocampus
def test_2d_aware_eot_trains_a_2d_surrogate_and_the_generator_through_it(hippocampus_env, tmp_path):
    trainer = make_trainer('nnUNetTrainerVoxShieldEOT_2DAware')
    batch = next(trainer.dataloader_train)
    batch = {'data': batch['data'][:1], 'target': batch['target'][:1], 'keys': batch['keys'][:1]}  # CPU time
    x2, y2 = trainer.victim_view_2d(batch['data'], batch['target'])
    assert x2.shape == (trainer.slices_per_sample, 1, *trainer.configuration_manager_2d.patch_size)
    assert y2.shape == (trainer.slices_per_sample, 1, *trainer.configuration_manager_2d.patch_size)
    net2d0, gen0 = snapshot(trainer.network_2d), snapshot(trainer.generator)
    trainer.train_step(batch)  # surrogate step: both surrogates learn, G does not
    net2d1 = snapshot(trainer.network_2d)
    assert not same(net2d0, net2d1) and same(gen0, snapshot(trainer.generator))
    with torch.no_grad():
        delta, _ = trainer.perturbation(batch['data'], batch['target'], batch['keys'])
    x = (batch['data'] + delta).requires_grad_()
    trainer.optimizer_2d.zero_grad(set_to_none=True)
    trainer.extra_surrogate_loss(x, batch['target']).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in trainer.network_2d.parameters())  # frozen in the generator's loss
    out = trainer.train_step(batch)  # generator step: the 2D surrogate is untouched
    assert same(net2d1, snapshot(trainer.network_2d)) and not same(gen0, snapshot(trainer.generator))
    assert np.isfinite(out['l_seg'])
    ckpt = str(tmp_path / 'ckpt.pth')
    trainer.save_checkpoint(ckpt)
    resumed = make_trainer('nnUNetTrainerVoxShieldEOT_2DAware')
    resumed.load_checkpoint(ckpt)
    assert same(net2d1, snapshot(resumed.network_2d))
