"""Perturbation support that does not draw the label: a small background budget eps_bg outside the ROI M.

With eps_bg = 0 the support of delta is exactly the (dilated) annotation, which a victim could read off the
noise. With eps_bg > 0 every voxel may move: by at most eps inside M and eps_bg outside (both fractions of the
case's intensity range, like eps). Export must apply the same per-voxel bound.
"""
import torch


def background_eps(eps: torch.Tensor, eps_fraction: float, eps_bg_fraction: float) -> torch.Tensor:
    """Budget outside M in the units of ``eps``: eps x eps_bg / eps_fraction (= eps_bg x range x scale)."""
    if eps_bg_fraction <= 0 or eps_fraction <= 0:
        return torch.zeros_like(eps)
    return eps * (eps_bg_fraction / eps_fraction)


def support_bound(mask: torch.Tensor, eps: torch.Tensor, eps_bg: torch.Tensor) -> torch.Tensor:
    """Per-voxel bound b = max(eps * M, eps_bg): eps inside the ROI, eps_bg outside (soft edges in between)."""
    return torch.maximum(mask * eps, eps_bg)


def bounded_delta(pattern: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Eq. 3 with a per-voxel bound: delta = clamp(G(x) * b, -b, b); equals Eq. 3 for eps_bg = 0 and binary M."""
    return torch.maximum(torch.minimum(pattern * bound, bound), -bound)
