"""Image-quality and segmentation metrics (maintained implementations where they exist)."""
import os
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from skimage.metrics import structural_similarity


def data_range_of(clean: np.ndarray) -> float:
    """Dynamic range used for PSNR/SSIM: max - min of the clean image (at least 1e-8)."""
    return max(float(np.max(clean)) - float(np.min(clean)), 1e-8)


SLAB_VOXELS = 1 << 20  # larger volumes are measured slab by slab along axis 0: bounded memory, same values


def _slab_rows(shape, at_least: int = 1) -> int:
    """Rows of axis 0 per slab of about SLAB_VOXELS voxels."""
    return max(at_least, SLAB_VOXELS // max(int(np.prod(shape[1:])), 1))


def slabs(shape) -> list:
    """Index slices of axis 0 of about SLAB_VOXELS voxels each (``[...]`` for a 0-d array)."""
    if len(shape) == 0:
        return [Ellipsis]
    rows = _slab_rows(shape)
    return [slice(z0, z0 + rows) for z0 in range(0, shape[0], rows)] or [slice(None)]


def _squared_error_sum(clean: np.ndarray, protected: np.ndarray, mask: Optional[np.ndarray]) -> Tuple[float, int]:
    """Sum of squared differences (float64) and voxel count, over ``mask`` if given, slab by slab."""
    total, count = 0.0, 0
    for s in slabs(clean.shape):
        diff = protected[s].astype(np.float64) - clean[s]
        if mask is not None:
            diff = diff[mask[s]]
        total += float(np.sum(diff ** 2))
        count += diff.size
    return total, count


def psnr(clean: np.ndarray, protected: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """PSNR in dB over the whole volume or inside ``mask``; inf when identical, nan for an empty mask."""
    if np.size(clean) > SLAB_VOXELS and np.ndim(clean) > 1:  # CT-sized: no full-volume float64 copies
        clean, protected = np.asarray(clean), np.asarray(protected)
        mask = None if mask is None else np.broadcast_to(mask, clean.shape)
        if mask is not None and not np.any(mask):
            return float('nan')
        total, count = _squared_error_sum(clean, protected, mask)
        return float('inf') if total == 0 else 10 * np.log10(data_range_of(clean) ** 2 / (total / count))
    clean = np.asarray(clean, dtype=np.float64)
    diff = np.asarray(protected, dtype=np.float64) - clean
    if mask is not None:
        if not np.any(mask):
            return float('nan')
        diff = diff[np.broadcast_to(mask, diff.shape)]
    mse = float(np.mean(diff ** 2))
    if mse == 0:
        return float('inf')
    return 10 * np.log10(data_range_of(clean) ** 2 / mse)


def ssim(clean: np.ndarray, protected: np.ndarray) -> float:
    """Mean SSIM (scikit-image) over the volume, data range from the clean image; window shrinks for tiny axes."""
    if np.size(clean) > SLAB_VOXELS and np.ndim(clean) == 3 and min(np.shape(clean)) >= 7:
        return _ssim_by_slabs(np.asarray(clean), np.asarray(protected))
    clean = np.asarray(clean, dtype=np.float64)
    protected = np.asarray(protected, dtype=np.float64)
    win = min(7, *[s if s % 2 else s - 1 for s in clean.shape])
    if win < 3:
        return float(np.allclose(clean, protected))
    return float(structural_similarity(clean, protected, data_range=data_range_of(clean), win_size=win))


def _ssim_by_slabs(clean: np.ndarray, protected: np.ndarray, win: int = 7) -> float:
    """``ssim`` of a large 3D volume with bounded memory: scikit-image's SSIM map of slabs along axis 0, each with a
    halo of the window radius (so the map's values are those of the whole volume), averaged over the same voxels
    (the window radius cropped at every border)."""
    pad, n = (win - 1) // 2, clean.shape[0]
    rows, data_range = max(2 * win, _slab_rows(clean.shape) // 4), data_range_of(clean)  # ~15 maps per slab
    total, count = 0.0, 0
    for z0 in range(pad, n - pad, rows):
        z1 = min(z0 + rows, n - pad)
        lo, hi = max(z0 - pad, 0), min(z1 + pad, n)
        _, smap = structural_similarity(clean[lo:hi].astype(np.float64), protected[lo:hi].astype(np.float64),
                                        data_range=data_range, win_size=win, full=True)
        core = smap[z0 - lo:z1 - lo, pad:-pad, pad:-pad]
        total += float(core.sum(dtype=np.float64))
        count += core.size
    return total / count


def ssim_in_mask(clean: np.ndarray, protected: np.ndarray, mask: np.ndarray) -> float:
    """Mean of scikit-image's local SSIM map inside ``mask`` (same window and data range as ``ssim``); nan if empty."""
    mask = np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(clean))
    if not np.any(mask):
        return float('nan')
    clean = np.asarray(clean, dtype=np.float64)
    protected = np.asarray(protected, dtype=np.float64)
    win = min(7, *[s if s % 2 else s - 1 for s in clean.shape])
    if win < 3:
        return float(np.allclose(clean[mask], protected[mask]))
    _, smap = structural_similarity(clean, protected, data_range=data_range_of(clean), win_size=win, full=True)
    return float(np.mean(smap[mask]))


# ---------------------------------------------------------------- segmentation metrics
HD95_STATUSES = ('ok', 'empty_prediction', 'empty_reference', 'both_empty')


def dice_per_label(reference: np.ndarray, prediction: np.ndarray, labels_or_regions: Sequence,
                   ignore_label: Optional[int] = None) -> Dict:
    """Dice per label (or region tuple) with nnU-Net's own mask and counting code; nan when both are empty."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
    ignore_mask = reference == ignore_label if ignore_label is not None else None
    out = {}
    for r in labels_or_regions:
        tp, fp, fn, _ = compute_tp_fp_fn_tn(region_or_label_to_mask(reference, r),
                                            region_or_label_to_mask(prediction, r), ignore_mask)
        out[r] = float('nan') if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))
    return out


def hd95(reference_mask: np.ndarray, prediction_mask: np.ndarray, spacing: Sequence[float]) -> Tuple[float, str]:
    """Symmetric 95th-percentile Hausdorff distance in mm (MONAI), spacing given per array axis.

    Returns ``(value, status)``: status 'ok'; 'both_empty' gives 0.0; 'empty_prediction' / 'empty_reference'
    give nan (the distance is undefined; callers must report these cases, see ``summarise_hd95``).
    """
    from monai.metrics import compute_hausdorff_distance

    reference_mask = np.asarray(reference_mask, dtype=bool)
    prediction_mask = np.asarray(prediction_mask, dtype=bool)
    if reference_mask.shape != prediction_mask.shape:
        raise ValueError(f'shape mismatch: reference {reference_mask.shape} vs prediction {prediction_mask.shape}')
    if len(spacing) != reference_mask.ndim:
        raise ValueError(f'spacing {tuple(spacing)} does not match a {reference_mask.ndim}-d mask')
    has_ref, has_pred = bool(reference_mask.any()), bool(prediction_mask.any())
    if not has_ref and not has_pred:
        return 0.0, 'both_empty'
    if not has_pred:
        return float('nan'), 'empty_prediction'
    if not has_ref:
        return float('nan'), 'empty_reference'
    with warnings.catch_warnings():  # MONAI's own deprecation notice about an internal argument
        warnings.simplefilter('ignore', FutureWarning)
        value = compute_hausdorff_distance(prediction_mask[None, None], reference_mask[None, None],
                                           include_background=True, percentile=95,
                                           spacing=[float(s) for s in spacing])
    return float(value.reshape(-1)[0]), 'ok'


def worst_case_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the volume in mm: the value an undefined HD95 (empty prediction) is penalised with."""
    return float(np.linalg.norm(np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)))


def score_segmentation(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float],
                       labels_or_regions: Sequence, ignore_label: Optional[int] = None) -> dict:
    """Dice and HD95 (mm) per label for one case; arrays shaped (z, y, x) or (1, z, y, x), spacing per axis.

    Per label: ``dice``, ``hd95_mm`` (None if undefined), ``hd95_status``, ``hd95_mm_penalised`` (undefined ->
    volume diagonal). Means over labels: ``mean_dice`` (nan-aware), ``mean_hd95_mm_penalised``.
    """
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.ndim == len(spacing) + 1:
        reference, prediction = reference[0], prediction[0]
    if reference.shape != prediction.shape:
        raise ValueError(f'shape mismatch: reference {reference.shape} vs prediction {prediction.shape}')
    dice = dice_per_label(reference, prediction, labels_or_regions, ignore_label)
    worst = worst_case_distance(reference.shape, spacing)
    per_label = {}
    for r in labels_or_regions:
        ref_mask = region_or_label_to_mask(reference, r)
        pred_mask = region_or_label_to_mask(prediction, r)
        if ignore_label is not None:
            keep = reference != ignore_label
            ref_mask, pred_mask = ref_mask & keep, pred_mask & keep
        value, status = hd95(ref_mask, pred_mask, spacing)
        per_label[str(r)] = {'dice': dice[r], 'hd95_mm': None if np.isnan(value) else value,
                             'hd95_status': status, 'hd95_mm_penalised': worst if np.isnan(value) else value}
    dices = [v['dice'] for v in per_label.values() if not np.isnan(v['dice'])]
    return {'labels': per_label,
            'mean_dice': float(np.mean(dices)) if dices else float('nan'),
            'mean_hd95_mm_penalised': float(np.mean([v['hd95_mm_penalised'] for v in per_label.values()])),
            'n_empty_prediction': sum(v['hd95_status'] == 'empty_prediction' for v in per_label.values()),
            'worst_case_mm': worst}


def score_case_files(reference_file: str, prediction_file: str, labels_or_regions: Sequence,
                     ignore_label: Optional[int] = None, reader=None) -> dict:
    """``score_segmentation`` on two segmentation files; spacing comes from the reference file's header."""
    if reader is None:
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending
        ending = '.nii.gz' if reference_file.endswith('.nii.gz') else os.path.splitext(reference_file)[1]
        reader = determine_reader_writer_from_file_ending(ending, reference_file)()
    ref, ref_props = reader.read_seg(reference_file)
    pred, _ = reader.read_seg(prediction_file)
    if ref.shape != pred.shape:
        raise ValueError(f'{prediction_file}: shape {pred.shape[1:]} differs from reference {ref.shape[1:]}')
    out = score_segmentation(ref, pred, ref_props['spacing'], labels_or_regions, ignore_label)
    out.update({'reference_file': reference_file, 'prediction_file': prediction_file,
                'spacing': [float(s) for s in ref_props['spacing']]})
    return out


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """{'mean', 'std', 'n'} over the finite values (population std, 0 for one value); nan when there are none."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {'mean': float('nan'), 'std': float('nan'), 'n': 0}
    return {'mean': float(v.mean()), 'std': float(v.std()), 'n': int(v.size)}
