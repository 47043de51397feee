"""Per-case perturbation budgets and ROI masks.

The budget is defined in raw intensity units, per channel: ``eps`` (a fraction in (0, 1]) times a window that
the budget mode defines (``BUDGET_MODES``), or an absolute value ``eps_abs`` (e.g. HU). nnU-Net trains on
normalised intensities, so the trainer multiplies the raw budget by the case's normalisation scale (normalised
units per raw unit) as nnU-Net's own normalisation schemes define it. Export maps the perturbation back and clamps
it in raw units again; verify recomputes the budget with the same ``raw_budget``.
"""
from fractions import Fraction
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_EPS = 4 / 255
DEFAULT_PERCENTILES = (0.5, 99.5)
ZSCORE_WINDOW = 10.0  # the paper clips z-scored volumes to +-5 sigma: a window of 10 std
BUDGET_MODES = {  # what eps is a fraction of, per channel
    'range': "the case's p0.5-p99.5 intensity range",
    'zscore': "10 x the case's std over all voxels (the paper: z-score, clip to +-5 sigma)",
    'zscore-dataset': "10 x the dataset's std over all training cases' voxels",
}
DEFAULT_BUDGET_MODE = 'range'


def _number(text: Union[str, float]) -> float:
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):
        return float('nan')


def parse_eps(text: Union[str, float]) -> float:
    """'4/255' -> 0.01568..., '0.02' -> 0.02: a fraction of the budget window in (0, 1]; ValueError otherwise."""
    value = _number(text)
    if not (np.isfinite(value) and 0 < value <= 1):
        raise ValueError(f'eps must be a fraction in (0, 1] of the budget window, such as 4/255, got {text!r}')
    return value


def parse_eps_abs(text: Union[str, float]) -> float:
    """An absolute budget in raw units (e.g. HU): any finite number > 0; ValueError otherwise."""
    value = _number(text)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f'eps_abs must be a finite number > 0 in raw intensity units, got {text!r}')
    return value


def check_budget_mode(mode: str) -> str:
    """``mode`` if it is one of ``BUDGET_MODES``; ValueError otherwise."""
    if mode not in BUDGET_MODES:
        raise ValueError(f'unknown budget mode {mode!r}; choose one of {", ".join(BUDGET_MODES)}')
    return mode


def check_budget(eps: Optional[float], eps_abs: Optional[float] = None, mode: str = DEFAULT_BUDGET_MODE) -> None:
    """ValueError (one line) for an eps outside (0, 1], an eps_abs that is not finite and > 0, or an unknown mode."""
    if eps is not None:
        parse_eps(eps)
    if eps_abs is not None:
        parse_eps_abs(eps_abs)
    check_budget_mode(mode)


def percentile_range(image: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Per-channel intensity range (p_high - p_low) of an image shaped (c, *spatial)."""
    flat = np.asarray(image, dtype=np.float64).reshape(image.shape[0], -1)
    low, high = np.percentile(flat, percentiles, axis=1)
    return high - low


def channel_std(image: np.ndarray) -> np.ndarray:
    """Per-channel standard deviation over all voxels (population std) of an image shaped (c, *spatial)."""
    return np.asarray(image, dtype=np.float64).reshape(image.shape[0], -1).std(axis=1)


def dataset_std(images: Iterable[np.ndarray]) -> np.ndarray:
    """Per-channel std over all voxels of all ``images`` (each (c, *spatial)), pooled exactly (Chan et al.)."""
    n, mean, m2 = 0, None, None
    for image in images:
        flat = np.asarray(image, dtype=np.float64).reshape(image.shape[0], -1)
        n_b, mean_b = flat.shape[1], flat.mean(axis=1)
        m2_b = ((flat - mean_b[:, None]) ** 2).sum(axis=1)
        if mean is None:
            n, mean, m2 = n_b, mean_b, m2_b
            continue
        if mean_b.shape != mean.shape:
            raise ValueError(f'dataset std: cases have {mean.shape[0]} and {mean_b.shape[0]} channels')
        delta, total = mean_b - mean, n + n_b
        mean = mean + delta * n_b / total
        m2 = m2 + m2_b + delta ** 2 * n * n_b / total
        n = total
    if mean is None or n == 0:
        raise ValueError('dataset std: no voxels (no training cases)')
    return np.sqrt(m2 / n)


def raw_budget(image: np.ndarray, eps: float = DEFAULT_EPS, eps_abs: Optional[float] = None,
               percentiles: Sequence[float] = DEFAULT_PERCENTILES, mode: str = DEFAULT_BUDGET_MODE,
               dataset_std: Optional[Sequence[float]] = None) -> np.ndarray:
    """Budget in raw units per channel: ``eps_abs`` if given, else eps x the window of ``mode``:
    'range': p_high - p_low of the case; 'zscore': 10 x the case's std; 'zscore-dataset': 10 x ``dataset_std``."""
    check_budget_mode(mode)
    if eps_abs is not None:
        return np.full(image.shape[0], float(eps_abs))
    if mode == 'range':
        return eps * percentile_range(image, percentiles)
    if mode == 'zscore':
        return eps * ZSCORE_WINDOW * channel_std(image)
    if dataset_std is None:
        raise ValueError("budget mode 'zscore-dataset' needs the dataset's std per channel (budget.dataset_std)")
    std = np.asarray(dataset_std, dtype=np.float64).reshape(-1)
    if std.shape[0] != image.shape[0]:
        raise ValueError(f'dataset std has {std.shape[0]} channel(s), the image {image.shape[0]}')
    return eps * ZSCORE_WINDOW * std


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


def dataset_ignore_label(dataset_json: dict) -> Optional[int]:
    """nnU-Net's ignore label (``labels['ignore']`` of dataset.json, as ``LabelManager``) or None."""
    value = (dataset_json.get('labels') or {}).get('ignore')
    return None if value is None else int(value)


def without_ignore(seg: np.ndarray, ignore_label: Optional[int]) -> np.ndarray:
    """``seg`` with the ignore label set to background (0): no code, no ROI and no band grows from it."""
    seg = np.asarray(seg)
    return seg if ignore_label is None else np.where(seg == ignore_label, 0, seg).astype(seg.dtype)


def _radii(width: float, spacing: Optional[Sequence[float]], dims: int) -> list:
    """Per-axis radius in voxels of a box ``width`` wide: voxels if ``spacing`` is None, else mm (floor(w / s_a))."""
    if spacing is None:
        return [int(width)] * dims
    return [int(np.floor(float(width) / float(s) + 1e-9)) for s in spacing]


def _dilate(mask: torch.Tensor, radii: Sequence[int]) -> torch.Tensor:
    """Max-pool dilation of (b, 1, *spatial) by a box with per-axis ``radii`` (voxels)."""
    if not any(radii):
        return mask
    pool = F.max_pool3d if mask.ndim == 5 else F.max_pool2d
    return pool(mask, [2 * r + 1 for r in radii], stride=1, padding=list(radii))


def roi_mask(seg: torch.Tensor, foreground_labels: Optional[Sequence[int]] = None, dilation: float = 0,
             soft_edge: float = 0.0, ignore_label: Optional[int] = None,
             spacing: Optional[Sequence[float]] = None) -> torch.Tensor:
    """ROI mask M from labels, shaped like ``seg`` (b, 1 or regions, *spatial) -> (b, 1, *spatial), values in [0, 1].

    M = union of the foreground classes (``seg > 0`` if ``foreground_labels`` is None; for region one-hot
    targets, the union of the channels), dilated by ``dilation`` (box), with an optional soft edge: a linear ramp
    ``soft_edge`` wide outside the (dilated) mask. Widths are in voxels of ``seg`` (cube) if ``spacing`` is None,
    else in mm (``spacing``: per spatial axis; radius floor(width / spacing) voxels per axis, so 10 mm slices get no
    dilation across slices from a 2 mm width).
    ``ignore_label`` (nnU-Net's, ``dataset_ignore_label``) is not foreground and never in M, dilated or not; for
    region targets with an ignore label, the last channel is nnU-Net's ignore channel.
    """
    seg = seg.detach()
    ignored = None
    if seg.shape[1] > 1:
        if ignore_label is not None:  # nnU-Net appends the ignore label as the last region
            seg, ignored = seg[:, :-1], seg[:, -1:] > 0
        mask = (seg > 0).any(1, keepdim=True)
    elif foreground_labels is None:
        mask = seg > 0
    else:
        mask = torch.zeros_like(seg, dtype=torch.bool)
        for label in foreground_labels:
            mask |= seg == label
    if ignore_label is not None and ignored is None:
        ignored = seg == ignore_label
        mask &= ~ignored
    mask = mask.float()
    dims = mask.ndim - 2
    if dilation > 0:
        mask = _dilate(mask, _radii(dilation, spacing, dims))
    if soft_edge > 0:
        unit = 1.0 if spacing is None else float(min(spacing))  # ramp steps: one voxel (of the finest axis)
        ramp = mask.clone()
        for step in range(1, int(np.ceil(soft_edge / unit - 1e-9)) + 1):
            grown = _dilate(mask, _radii(step * unit, spacing, dims))
            ramp = torch.maximum(ramp, grown * max(0.0, 1.0 - step * unit / (soft_edge + unit)))
        mask = ramp
    if ignored is not None:
        mask = mask * (~ignored).float()
    return mask


def roi_mask_np(seg: np.ndarray, roi: dict, dims: int, ignore_label: Optional[int] = None,
                spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """``budget.roi_mask`` for a numpy seg (1, *spatial) in nnU-Net's axis order; 2D configs mask slice by slice
    (``spacing``: of the spatial axes, for widths in mm; 2D uses its in-plane part)."""
    t = torch.from_numpy(np.ascontiguousarray(seg)).float()
    if dims == 2 and t.ndim == 4:
        plane = None if spacing is None else list(spacing)[1:]
        return roi_mask(t.transpose(0, 1), **roi, ignore_label=ignore_label, spacing=plane).transpose(0, 1).numpy()
    return roi_mask(t[None], **roi, ignore_label=ignore_label, spacing=spacing)[0].numpy()


def bound_perturbation(raw: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 3: delta = clamp(G(x) * M, -eps, eps); ``eps`` broadcasts per sample and channel (b, c, 1, ...)."""
    return torch.maximum(torch.minimum(raw * mask, eps), -eps)
