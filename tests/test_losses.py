import numpy as np
import pytest
import torch

from nnunetv2_voxshield.budget import bound_perturbation, roi_mask
from nnunetv2_voxshield.generator import NoiseGenerator
from nnunetv2_voxshield.losses import (generator_objective, gradient_alignment, inter_slice_spectral_loss,
                                      spectral_divergence_loss)


def numpy_isc(delta: np.ndarray, slice_axis: int) -> float:
    """Independent Eq. 4: -mean over (b, c, z pairs) of the L2 norm of adjacent-slice amplitude differences."""
    d = np.moveaxis(delta, 2 + slice_axis, 2)
    norms = []
    for b in range(d.shape[0]):
        for c in range(d.shape[1]):
            amp = [np.abs(np.fft.fft2(d[b, c, z], norm='ortho')) for z in range(d.shape[2])]
            norms += [np.sqrt(np.sum((amp[z + 1] - amp[z]) ** 2)) for z in range(d.shape[2] - 1)]
    return -float(np.mean(norms))


def test_isc_is_zero_for_identical_slices():
    one_slice = torch.randn(2, 1, 1, 8, 9)
    delta = one_slice.expand(2, 1, 6, 8, 9).contiguous()
    assert inter_slice_spectral_loss(delta).item() == pytest.approx(0.0, abs=1e-6)


def test_isc_is_negative_for_flicker_and_grows_with_it():
    base = torch.randn(1, 1, 1, 8, 8)
    signs = torch.tensor([1., -1., 1., -1., 1.]).view(1, 1, 5, 1, 1)
    flicker = base * signs
    weak = inter_slice_spectral_loss(0.5 * torch.randn(1, 1, 5, 8, 8) + flicker)
    assert inter_slice_spectral_loss(flicker).item() == pytest.approx(0.0, abs=1e-5)  # sign flips keep |FFT|
    assert weak.item() < -0.1
    assert inter_slice_spectral_loss(2 * torch.randn(1, 1, 5, 8, 8)).item() < weak.item()


@pytest.mark.parametrize('slice_axis', [0, 1, 2])
def test_isc_matches_numpy(slice_axis):
    rng = np.random.default_rng(slice_axis)
    delta = rng.normal(size=(2, 2, 5, 6, 7))
    ours = inter_slice_spectral_loss(torch.from_numpy(delta), slice_axis).item()
    assert ours == pytest.approx(numpy_isc(delta, slice_axis), rel=1e-9)


def test_isc_is_zero_without_slice_pairs():
    assert inter_slice_spectral_loss(torch.randn(2, 1, 8, 8)).item() == 0.0
    assert inter_slice_spectral_loss(torch.randn(2, 1, 1, 8, 8)).item() == 0.0


def test_spd_is_minus_mean_absolute_logit_difference():
    a, b = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    assert spectral_divergence_loss(a, a).item() == 0.0
    assert spectral_divergence_loss(a, b).item() == pytest.approx(-(a - b).abs().mean().item())
    assert spectral_divergence_loss(a, b).item() < 0


def test_generator_objective_weights():
    total = generator_objective(torch.tensor(1.0), torch.tensor(-2.0), torch.tensor(-3.0), 0.2, 0.05)
    assert total.item() == pytest.approx(1.0 - 0.4 - 0.15)


def test_gradients_reach_the_generator_through_budget_and_mask():
    torch.manual_seed(0)
    g = NoiseGenerator(3, 1, [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]])
    x = torch.randn(2, 1, 8, 8, 8)
    seg = torch.zeros(2, 1, 8, 8, 8)
    seg[:, :, 2:6, 2:6, 2:6] = 1
    eps = torch.full((2, 1, 1, 1, 1), 0.05)
    delta = bound_perturbation(g(x) * eps, roi_mask(seg), eps)
    loss = generator_objective(delta.square().mean(), inter_slice_spectral_loss(delta), torch.tensor(0.), 0.2, 0.05)
    loss.backward()
    grads = [p.grad for p in g.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum().item() for gr in grads) > 0


def test_isc_gradient_is_finite_for_an_all_zero_perturbation():
    delta = torch.zeros(1, 1, 4, 8, 8, requires_grad=True)
    inter_slice_spectral_loss(delta).backward()
    assert torch.isfinite(delta.grad).all()


def test_gradient_alignment_is_the_cosine_of_the_two_parameter_gradients_and_differentiable_in_the_input():
    """Linear losses w.a and w.b (+ v.c on a second tensor) have gradients (a, c) and (b, 0): the cosine is exact;
    a parameter neither loss uses is left out; the cosine's gradient in the perturbed input matches finite
    differences."""
    w, v, unused = (torch.randn(5, requires_grad=True) for _ in range(3))
    a, b, c = torch.randn(5), torch.randn(5), torch.randn(5)
    cos = gradient_alignment((w * a).sum() + (v * c).sum(), (w * b).sum() + 0 * v.sum(), [w, v, unused])
    expected = torch.dot(a, b) / (torch.cat([a, c]).norm() * b.norm())
    assert cos.item() == pytest.approx(expected.item(), rel=1e-5)
    assert gradient_alignment((w * a).sum(), (w * a).sum(), [w]).item() == pytest.approx(1.0, abs=1e-6)
    assert gradient_alignment((w * a).sum(), -(w * a).sum(), [w]).item() == pytest.approx(-1.0, abs=1e-6)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(3, 2, 1))
    net.double()
    x = torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    ce = torch.nn.CrossEntropyLoss()

    def f(delta, create_graph=True):
        return gradient_alignment(ce(net(x + delta), y), ce(net(x), y), list(net.parameters()), create_graph)
    delta = (0.3 * torch.randn_like(x)).requires_grad_(True)
    value = f(delta)
    assert -1 <= value.item() < 1 - 1e-4
    grad, = torch.autograd.grad(value, delta)
    direction = torch.randn_like(x)
    h = 1e-5
    numeric = (f(delta + h * direction, False) - f(delta - h * direction, False)).item() / (2 * h)
    assert (grad * direction).sum().item() == pytest.approx(numeric, rel=1e-4, abs=1e-8)
