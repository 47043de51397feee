"""Per-case perturbation budgets and ROI masks.

The budget is defined in raw intensity units: ``eps`` times the case's 0.5-99.5 percentile range, per channel
(or an absolute value, e.g. HU). nnU-Net trains on normalised intensities, so the trainer multiplies the raw
budget by the case's normalisation scale (normalised units per raw unit) as nnU-Net's own normalisation
schemes define it. Export maps the perturbation back and clamps it in raw units again.
"""
from fractions import Fraction
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_EPS = 4 / 255
DEFAULT_PERCENTILES = (0.5, 99.5)


def parse_eps(text: Union[str, float]) -> float:
    """'4/255' -> 0.01568..., '0.02' -> 0.02. Raises ValueError with a readable message."""
    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"eps must be a number or a fraction such as 4/255, got {text!r}") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"eps must be a finite non-negative number, got {text!r}")
    return value


def percentile_range(image: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Per-channel intensity range (p_high - p_low) of an image shaped (c, *spatial)."""
    flat = np.asarray(image, dtype=np.float64).reshape(image.shape[0], -1)
    low, high = np.percentile(flat, percentiles, axis=1)
    return high - low


def raw_budget(image: np.ndarray, eps: float = DEFAULT_EPS, eps_abs: Optional[float] = None,
               percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Budget in raw units per channel: ``eps_abs`` if given, else eps x percentile range."""
    if eps_abs is not None:
        return np.full(image.shape[0], float(eps_abs))
    return eps * percentile_range(image, percentiles)


def normalisation_scale(image: np.ndarray, seg: Optional[np.ndarray], scheme: str, use_mask_for_norm: bool,
                        intensity_properties: Optional[dict]) -> float:
    """Normalised units per raw unit for one channel, exactly as nnU-Net's normalisation ``scheme`` computes it.

    ``image`` and ``seg`` are the transposed, cropped (``crop_to_nonzero``) arrays that nnU-Net normalises;
    ``seg < 0`` marks the region outside the nonzero mask.
    """
    eps = 1e-8
    if scheme == 'ZScoreNormalization':
        values = image[seg >= 0] if (use_mask_for_norm and seg is not None) else image
        return 1.0 / max(float(np.asarray(values, dtype=np.float32).std()), eps)
    if scheme == 'CTNormalization':
        return 1.0 / max(float(intensity_properties['std']), eps)
    if scheme == 'NoNormalization':
        return 1.0
    if scheme == 'RescaleTo01Normalization':
        return 1.0 / max(float(image.max() - image.min()), eps)
    if scheme == 'RGBTo01Normalization':
        return 1.0 / 255.0
    raise ValueError(f"normalisation scheme {scheme!r} is not supported by the budget translation; "
                     f"supported: ZScore, CT, No, RescaleTo01, RGBTo01")


def roi_mask(seg: torch.Tensor, foreground_labels: Optional[Sequence[int]] = None, dilation: int = 0,
             soft_edge: float = 0.0) -> torch.Tensor:
    """ROI mask M from labels, shaped like ``seg`` (b, 1 or regions, *spatial) -> (b, 1, *spatial), values in [0, 1].

    M = union of the foreground classes (``seg > 0`` if ``foreground_labels`` is None; for region one-hot
    targets, the union of the channels), dilated by ``dilation`` voxels (cube), with an optional soft edge:
    a linear ramp ``soft_edge`` voxels wide outside the (dilated) mask.
    """
    seg = seg.detach()
    if seg.shape[1] > 1:
        mask = (seg > 0).any(1, keepdim=True)
    elif foreground_labels is None:
        mask = seg > 0
    else:
        mask = torch.zeros_like(seg, dtype=torch.bool)
        for label in foreground_labels:
            mask |= seg == label
    mask = mask.float()
    pool = F.max_pool3d if mask.ndim == 5 else F.max_pool2d
    if dilation > 0:
        mask = pool(mask, 2 * dilation + 1, stride=1, padding=dilation)
    if soft_edge > 0:
        width = int(np.ceil(soft_edge))
        ramp = mask.clone()
        for step in range(1, width + 1):
            grown = pool(mask, 2 * step + 1, stride=1, padding=step)
            ramp = torch.maximum(ramp, grown * max(0.0, 1.0 - step / (soft_edge + 1)))
        mask = ramp
    return mask


def roi_mask_np(seg: np.ndarray, roi: dict, dims: int) -> np.ndarray:
    """``budget.roi_mask`` for a numpy seg (1, *spatial) in nnU-Net's axis order; 2D configs mask slice by slice."""
    t = torch.from_numpy(np.ascontiguousarray(seg)).float()
    if dims == 2 and t.ndim == 4:
        return roi_mask(t.transpose(0, 1), **roi).transpose(0, 1).numpy()  # slices along axis 0 as the batch
    return roi_mask(t[None], **roi)[0].numpy()


def bound_perturbation(raw: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 3: delta = clamp(G(x) * M, -eps, eps); ``eps`` broadcasts per sample and channel (b, c, 1, ...)."""
    return torch.maximum(torch.minimum(raw * mask, eps), -eps)
