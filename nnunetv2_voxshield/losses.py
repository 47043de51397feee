"""VoxShield's generator losses as pure functions of tensors (arXiv 2605.17345, Sec. 3)."""
import torch


def inter_slice_spectral_loss(delta: torch.Tensor, slice_axis: int = 0) -> torch.Tensor:
    """Eq. 4, L_ISC = -mean_z || |FFT2(delta_{z+1})| - |FFT2(delta_z)| ||_2.

    ``delta`` is (b, c, *spatial) with three spatial axes; ``slice_axis`` indexes the spatial axes (0 = the first
    spatial axis of nnU-Net's array order). The 2D FFT runs over the two in-plane axes with orthonormal scaling
    (Parseval: amplitudes are in the units of delta). The L2 norm is taken per slice pair, batch element and
    channel; the mean runs over all of them. Returns 0 for 2D inputs or a single slice (no slice pairs).
    """
    if delta.ndim != 5 or delta.shape[2 + slice_axis] < 2:
        return delta.sum() * 0.0
    slices_first = delta.movedim(2 + slice_axis, 2)
    amplitude = torch.fft.fft2(slices_first, dim=(-2, -1), norm='ortho').abs()
    flicker = amplitude[:, :, 1:] - amplitude[:, :, :-1]
    return -torch.linalg.vector_norm(flicker, ord=2, dim=(-2, -1)).mean()


def spectral_divergence_loss(logits_perturbed: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """Eq. 5, L_SPD = -|| F_s(x + delta) - F_s(x) ||_1, as the mean absolute logit difference per voxel.

    The mean (instead of the sum) keeps the weight lambda_SPD independent of the patch size.
    ``logits_clean`` carries no gradient (computed under no_grad with the surrogate frozen).
    """
    return -(logits_perturbed - logits_clean.detach()).abs().mean()


def generator_objective(seg_loss: torch.Tensor, isc_loss: torch.Tensor, spd_loss: torch.Tensor,
                        lambda_isc: float, lambda_spd: float) -> torch.Tensor:
    """Eq. 6: L_G = L_seg + lambda_SPD * L_SPD + lambda_ISC * L_ISC (minimised by the generator)."""
    return seg_loss + lambda_spd * spd_loss + lambda_isc * isc_loss


def gradient_alignment(loss_perturbed: torch.Tensor, loss_clean: torch.Tensor, params, create_graph: bool = True
                       ) -> torch.Tensor:
    """cos(g_delta, g_clean), g = grad_theta L_seg over all of ``params`` (one flattened vector).

    One SGD step of lr on x + delta changes the clean loss by -lr <g_delta, g_clean> to first order, so a
    perturbation that drives this cosine to 0 (or below) is one a network trains on without learning the clean task
    (the poisoning view of an unlearnable dataset; the error-minimising L_seg alone cannot tell such a code from a
    useless one). Parameters without a gradient in either loss are left out. ``loss_perturbed``'s graph is kept (``create_graph``) so the cosine is differentiable in delta;
    g_clean carries no gradient. Not part of the paper's Eq. 6.
    """
    params = list(params)
    g_delta = torch.autograd.grad(loss_perturbed, params, create_graph=create_graph, retain_graph=True,
                                  allow_unused=True)
    g_clean = torch.autograd.grad(loss_clean, params, allow_unused=True)
    pairs = [(a, b) for a, b in zip(g_delta, g_clean) if a is not None and b is not None]  # unused heads: no gradient
    g_delta, g_clean = [a for a, _ in pairs], [b for _, b in pairs]
    dot = sum((a * b.detach()).sum() for a, b in zip(g_delta, g_clean))
    norm_delta = torch.sqrt(sum((a * a).sum() for a in g_delta))
    norm_clean = torch.sqrt(sum((b.detach() * b.detach()).sum() for b in g_clean))
    return dot / (norm_delta * norm_clean).clamp_min(1e-12)
