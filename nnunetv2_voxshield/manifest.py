"""The protection manifest: what an export promised, written into the protected dataset (``voxshield_manifest.json``).

It holds the method, the budget (eps or eps_abs, budget mode, percentiles), the background budget eps_bg, the
support rule (where delta may be non-zero, with its widths and their unit), nnU-Net's ignore label and the project's
version: everything ``voxshield_verify`` needs to recompute each voxel's bound from the clean dataset, nothing that
helps undo the perturbation (no seed, key, weights or delta). nnU-Net ignores extra files at a dataset's root.

Per-voxel bound (``voxel_weight`` x the channel's budget): 1 in the support, ``background_weight`` (eps_bg / eps)
outside it, 0 on the ignore label. Support rules: 'roi' (nnU-Net-space sources: the foreground, dilated by
``dilation`` with a ``soft_edge`` ramp, in voxels, per slice along ``slice_axis`` for 2D configurations), 'labels'
(the labelled voxels), 'grow' / 'shrink' / 'edge' (``controls.boundary_band`` of ``width`` in ``width_unit``).
"""
import json
import os
from typing import Optional, Sequence

import numpy as np

from nnunetv2_voxshield import __version__
from nnunetv2_voxshield.budget import roi_mask_np, without_ignore

MANIFEST_FILE = 'voxshield_manifest.json'
MANIFEST_VERSION = 1
SUPPORT_RULES = ('roi', 'labels', 'grow', 'shrink', 'edge')


class ManifestError(Exception):
    """An unreadable or invalid manifest (one line naming the file)."""


def build_manifest(method: str, eps: Optional[float], eps_abs: Optional[float], budget_mode: Optional[str],
                   percentiles: Sequence[float], support: dict, ignore_label: Optional[int],
                   strength: Optional[float] = None) -> dict:
    """The manifest of one export; ``support``: ``support_rule`` of its source (with 'background_weight')."""
    weight = float(support.get('background_weight', 0.0))
    manifest = {'manifest_version': MANIFEST_VERSION, 'voxshield_version': __version__, 'method': method,
                'eps': eps, 'eps_abs': eps_abs,
                'eps_bg': None if eps is None else weight * eps,
                'eps_bg_abs': None if eps_abs is None else weight * eps_abs,
                'budget_mode': budget_mode, 'percentiles': [float(p) for p in percentiles],
                'support': dict(support), 'roi_dilation': support.get('dilation'),
                'ignore_label': ignore_label,
                'labels_unchanged': True}
    if strength is not None:
        manifest['strength'] = float(strength)
    return manifest


def read_manifest(dataset_folder: str) -> Optional[dict]:
    """The manifest of a protected dataset, None if it has none; ManifestError if it is unreadable or invalid."""
    path = os.path.join(dataset_folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        rule = manifest['support']['rule']
        version = int(manifest['manifest_version'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ManifestError(f'{path}: invalid protection manifest ({type(e).__name__})') from None
    if version > MANIFEST_VERSION:
        raise ManifestError(f'{path}: manifest version {version} is newer than this voxshield_verify '
                            f'({MANIFEST_VERSION}); update nnunetv2-voxshield')
    if rule not in SUPPORT_RULES:
        raise ManifestError(f'{path}: unknown support rule {rule!r} (known: {", ".join(SUPPORT_RULES)})')
    return manifest


def voxel_weight(support: dict, seg: np.ndarray, spacing: Sequence[float], ignore_label: Optional[int]) -> np.ndarray:
    """Per-voxel bound in units of the channel's budget for a raw label map ``seg`` (*spatial, array order;
    ``spacing`` in the same order): 1 in the support, the background weight outside, 0 on the ignore label."""
    from nnunetv2_voxshield.controls import EdgeSource, boundary_band  # controls imports this package's budget only
    seg = np.asarray(seg)
    labelled = without_ignore(seg, ignore_label)
    rule = support['rule']
    if rule == 'roi':
        dims, axis = int(support.get('dims', 3)), support.get('slice_axis')
        roi = {'dilation': support.get('dilation', 0), 'soft_edge': float(support.get('soft_edge', 0.0))}
        if dims == 2:  # nnU-Net's 2D configurations: the mask of each slice along the slice axis
            moved = np.moveaxis(labelled, int(axis or 0), 0)
            mask = np.moveaxis(roi_mask_np(moved[None], roi, 2)[0], 0, int(axis or 0))
        else:
            mask = roi_mask_np(labelled[None], roi, 3)[0]
        weight = mask.astype(np.float64)
    elif rule == 'labels':
        weight = (labelled > 0).astype(np.float64)
    else:
        unit = support.get('width_unit', 'voxels')
        sampling = tuple(float(s) for s in spacing) if unit == 'mm' else None
        width = float(support['width'])
        if rule == 'edge':
            weight = (EdgeSource(width, 'plus', unit).unit(labelled, sampling) != 0).astype(np.float64)
        else:
            weight = boundary_band(labelled, rule, width, sampling)[0].astype(np.float64)
    weight = np.maximum(weight, float(support.get('background_weight', 0.0)))
    if ignore_label is not None:
        weight[seg == ignore_label] = 0.0
    return weight
