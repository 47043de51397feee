"""Protect one raw case: preprocess as nnU-Net, compute delta, map it back to raw units, clamp, round, write.

Budgets are per channel in raw units (``budget.raw_budget``); each voxel's bound is the channel's budget times its
weight (``support_weight``: 1 in the support, the background weight eps_bg / eps outside, 0 on nnU-Net's ignore
label), and rounding to the image's dtype stays within that per-voxel bound. The returned report is for the
protector only.
"""
import os
from typing import List

import numpy as np
import SimpleITK as sitk

from nnunetv2_voxshield.budget import (DEFAULT_BUDGET_MODE, dataset_ignore_label, dataset_std, raw_budget,
                                       roi_mask_np, without_ignore)
from nnunetv2_voxshield.dataset_io import (InputError, check_finite, copy_atomic, read_image, sha256_of,
                                           write_image_atomic)
from nnunetv2_voxshield.geometry import normalisation_scales, preprocess_case, to_raw_geometry
from nnunetv2_voxshield.metrics import psnr, slabs, ssim


def cast_within_budget(clean: np.ndarray, target: np.ndarray, budget) -> np.ndarray:
    """Cast ``target`` (float64) to ``clean``'s dtype with rounding, keeping |result - clean| <= budget per voxel
    (``budget``: a number or an array like ``clean``; integer voxels whose bound is below one grey level from the
    rounded value round towards the clean value, so a bound below half a grey level leaves them unchanged)."""
    clean64 = clean.astype(np.float64)
    budget = np.broadcast_to(np.asarray(budget, dtype=np.float64), clean.shape)
    if np.issubdtype(clean.dtype, np.integer):
        out = np.rint(target)
        over = np.abs(out - clean64) > budget
        out[over] = clean64[over] + np.trunc(target[over] - clean64[over])  # round towards the clean value
        out = out.astype(clean.dtype)
    else:
        out = target.astype(clean.dtype)
        over = np.abs(out.astype(np.float64) - clean64) > budget
        out[over] = np.nextafter(out[over], clean[over])  # float rounding crossed the budget: one ulp back
    over = np.abs(out.astype(np.float64) - clean64) > budget
    out[over] = clean[over]  # last resort, keeps the guarantee whatever the dtype
    return out


def _finite(value: float):
    return float(value) if np.isfinite(value) else None


def channel_report(path: str, clean: np.ndarray, protected: np.ndarray, budget: float, roi: np.ndarray) -> dict:
    """One channel's report entry: max |protected - clean| (raw units, float64), its share of ``budget``, fraction of
    voxels changed, PSNR over the volume and inside ``roi``, SSIM."""
    max_delta, changed = 0.0, 0
    for s in slabs(clean.shape):  # |protected - clean| in float64, slab by slab: bounded memory, same values
        diff = np.abs(protected[s].astype(np.float64) - clean[s].astype(np.float64))
        if diff.size:
            max_delta = float(np.maximum(max_delta, diff.max()))  # NaN propagates as in diff.max()
        changed += int(np.count_nonzero(diff > 0))
    fraction_changed = changed / clean.size if clean.size else float('nan')  # np.mean of a bool array, exactly
    return {'file': os.path.basename(path), 'dtype': str(clean.dtype), 'budget': float(budget),
            'max_abs_delta': max_delta, 'budget_use': max_delta / budget if budget > 0 else 0.0,
            'fraction_changed': float(fraction_changed), 'psnr': _finite(psnr(clean, protected)),
            'psnr_roi': _finite(psnr(clean, protected, roi)), 'ssim': _finite(ssim(clean, protected))}


def _nnunet_arrays(files: dict, clean: List[np.ndarray], plans_manager):
    """Data, seg and properties read with the plans' reader (as nnU-Net preprocesses), in SimpleITK's array order."""
    reader = plans_manager.image_reader_writer_class()
    data, properties = reader.read_images(files['images'])
    seg, _ = reader.read_seg(files['label'])
    if data.size != clean[0].size * len(clean) or not np.array_equal(
            data.reshape(len(clean), *clean[0].shape), np.stack(clean).astype(np.float32)):
        raise InputError(f'{files["images"][0]}: the plans\' reader {type(reader).__name__} orders voxels '
                         f'differently from SimpleITK; export supports SimpleITK-ordered readers only')
    return data, seg, properties


def _delta_through_nnunet(case: str, files: dict, clean: List[np.ndarray], budget: np.ndarray, shape, ctx: dict):
    """delta in raw units (c, *spatial; float32) and the budget weight: preprocess as nnU-Net, compute, map back.
    Sources see nnU-Net's ignore label as background (no code, no ROI there)."""
    source, pm, cm = ctx['source'], ctx['plans_manager'], ctx['configuration_manager']
    data, seg, properties = _nnunet_arrays(files, clean, pm)
    scales = normalisation_scales(data, seg, pm, cm)
    data_pre, seg_pre, properties = preprocess_case(data, seg, properties, pm, cm, ctx['dataset_json'])
    del data  # preprocess_case works on its own copy
    ignore = dataset_ignore_label(ctx['dataset_json'])
    seg, seg_pre = without_ignore(seg, ignore), without_ignore(seg_pre, ignore)
    eps_norm = (budget * scales).astype(np.float32)
    delta_pre = source.compute_delta(data_pre, seg_pre, eps_norm, case)
    del data_pre, seg_pre
    scales_b = scales.reshape(-1, *([1] * (delta_pre.ndim - 1)))
    if delta_pre.dtype == np.float32 and delta_pre.flags.writeable and \
            tuple(delta_pre.shape[1:]) == tuple(properties['shape_after_cropping_and_before_resampling']):
        # no resampling: to_raw_geometry would round the float64 quotient to float32; divide in place instead
        np.divide(delta_pre, scales_b, out=delta_pre)  # float64 loop, rounded to float32 on store: same values
    else:
        delta_pre = delta_pre / scales_b
    delta = to_raw_geometry(delta_pre, properties, pm, cm)  # float32
    del delta_pre
    delta = delta.reshape(len(clean), *shape)
    forward = [0, *[i + 1 for i in pm.transpose_forward]]
    backward = [0, *[i + 1 for i in pm.transpose_backward]]
    mask = roi_mask_np(seg.transpose(forward), source.roi, len(cm.patch_size)).transpose(backward)
    return delta, np.maximum(mask.reshape(shape), source.eps_bg)


def array_spacing(image_spacing) -> tuple:
    """SimpleITK's (x, y, z) spacing in the array's (z, y, x) axis order."""
    return tuple(float(s) for s in reversed(tuple(image_spacing)))


def _raw_space_delta(source, clean: List[np.ndarray], seg: np.ndarray, budget: np.ndarray, case: str, spacing):
    """(delta, weight) of a raw-space source (controls, conv) on the raw arrays; widths in mm get the spacing."""
    kwargs = {'spacing': spacing} if getattr(source, 'spacing_aware', False) else {}
    delta, support = source.delta_and_support_raw(np.stack(clean).astype(np.float64), seg, budget, case, **kwargs)
    return delta, support.astype(np.float64)


def clean_dataset_std(cases: dict) -> List[float]:
    """Per-channel std over every training case's voxels, read as ``protect_case`` reads (mode 'zscore-dataset')."""
    return [float(s) for s in dataset_std(np.stack([sitk.GetArrayFromImage(read_image(f)) for f in files['images']])
                                          for files in cases.values())]


def protect_case(case: str, files: dict, output_folder: str, ctx: dict) -> dict:
    """Write the protected images and the unchanged label of ``case`` into ``output_folder``; return its report.

    ``ctx``: source (a ``perturbation.DeltaSource``), plans_manager, configuration_manager, dataset_json, eps,
    eps_abs, percentiles, budget_mode (None with eps_abs), dataset_std (for 'zscore-dataset').
    """
    clean, geometries = [], []  # the arrays and what CopyInformation copies: no SimpleITK image stays alive
    for f in files['images']:
        image = read_image(f)
        clean.append(sitk.GetArrayFromImage(image))
        geometries.append((image.GetOrigin(), image.GetSpacing(), image.GetDirection()))
        del image
    for array, path in zip(clean, files['images']):
        check_finite(array, path)
    seg_raw = sitk.GetArrayFromImage(read_image(files['label']))
    mode = ctx.get('budget_mode')
    own_budget = getattr(ctx['source'], 'raw_budget', None)  # a source with its own bound, not an eps (conv_code)
    budget = own_budget(np.stack(clean)) if own_budget is not None else raw_budget(
        np.stack(clean), ctx['eps'], ctx['eps_abs'], ctx['percentiles'], mode or DEFAULT_BUDGET_MODE,
        ctx.get('dataset_std'))
    out_images = [os.path.join(output_folder, 'imagesTr', os.path.basename(f)) for f in files['images']]
    out_label = os.path.join(output_folder, 'labelsTr', os.path.basename(files['label']))
    ignore = dataset_ignore_label(ctx['dataset_json'])
    annotated = None if ignore is None else seg_raw != ignore  # nnU-Net's ignore label: no ROI, no code, no budget
    roi = (seg_raw > 0) if annotated is None else (seg_raw > 0) & annotated

    if not np.any(roi):  # all background: passed through unchanged
        protected = clean
        for src, dst in zip(files['images'], out_images):
            copy_atomic(src, dst)
        status = 'unchanged_empty_roi'
    else:
        source = ctx['source']
        if getattr(source, 'raw_space', False):  # fixed controls: delta and its support computed on the raw arrays
            delta, weight = _raw_space_delta(source, clean, without_ignore(seg_raw, ignore), budget, case,
                                             array_spacing(geometries[0][1]))
        else:
            delta, weight = _delta_through_nnunet(case, files, clean, budget, roi.shape, ctx)
        if annotated is not None:
            weight = weight * annotated
        protected = []
        for c, image in enumerate(clean):  # elementwise in float64, slab by slab (bounded memory, same values)
            low, high = float(image.min()), float(image.max())
            result = np.empty_like(image)
            for s in slabs(image.shape):
                allowed = budget[c] * weight[s]  # the per-voxel bound, kept through rounding
                target = image[s].astype(np.float64) + np.clip(delta[c][s].astype(np.float64), -allowed, allowed)
                result[s] = cast_within_budget(image[s], np.clip(target, low, high), allowed)
            protected.append(result)
        del delta, weight
        for array, (origin, spacing, direction), dst in zip(protected, geometries, out_images):
            out = sitk.GetImageFromArray(array)
            out.SetOrigin(origin)
            out.SetSpacing(spacing)
            out.SetDirection(direction)
            write_image_atomic(out, dst)
            del out
        status = 'protected'
    copy_atomic(files['label'], out_label)
    del seg_raw

    channels = [channel_report(p, c, q, b, roi) for p, c, q, b in zip(files['images'], clean, protected, budget)]
    if max(ch['budget_use'] for ch in channels) > 1:
        raise RuntimeError(f'{case}: budget exceeded after rounding (bug)')
    written = out_images + [out_label]
    return {'case': case, 'status': status, 'budget_mode': mode, 'channels': channels,
            'files': {os.path.relpath(f, output_folder): sha256_of(f) for f in written}}
