"""voxshield_verify: check a protected dataset against its clean source, trusting nothing of the export.

For every clean training case: present in the protected dataset, label byte-identical, same shape, spacing,
origin, direction and dtype per channel, finite voxels, and max |protected - clean| <= budget, the budget being
recomputed from the clean image (``budget.raw_budget``: eps x the window of ``--budget-mode`` per channel, or
``--eps-abs``; 'zscore-dataset' takes the std over the clean dataset given here).
With the export's protection manifest (``manifest.MANIFEST_FILE`` in the protected dataset) its budget settings are
the defaults (flags override them) and every voxel is checked against its own bound, recomputed from the clean
label: the budget in the support, eps_bg outside it, zero on nnU-Net's ignore label (``manifest.voxel_weight``).
Files are read with SimpleITK directly; nothing of export's code or reports is used.
"""
import argparse
import filecmp
import json
import os
import sys
from typing import List, Optional, Sequence

import nibabel
import numpy as np
import SimpleITK as sitk

from nnunetv2_voxshield.budget import (BUDGET_MODES, DEFAULT_BUDGET_MODE, DEFAULT_EPS, DEFAULT_PERCENTILES,
                                       check_budget_mode, dataset_ignore_label, dataset_std, parse_eps,
                                       parse_eps_abs, raw_budget)
from nnunetv2_voxshield.manifest import ManifestError, read_manifest, voxel_weight
from nnunetv2_voxshield.metrics import psnr, ssim

GEOMETRY_ATOL = 1e-5
BOUND_RTOL = 1e-6  # per-voxel bounds: export's float32 ROI weights against the float64 ones recomputed here


class VerifyInputError(Exception):
    """The clean dataset itself cannot be read (one line naming the file)."""


def _dataset_json(folder: str) -> dict:
    path = os.path.join(folder, 'dataset.json')
    try:
        with open(path) as f:
            dataset_json = json.load(f)
        ending = dataset_json['file_ending']
        n_channels = len(dataset_json.get('channel_names', dataset_json.get('modality')))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VerifyInputError(f'{path}: missing or invalid dataset.json ({type(e).__name__})') from None
    return {'json': dataset_json, 'ending': ending, 'channels': n_channels}


def _cases(folder: str, ending: str) -> List[str]:
    labels = os.path.join(folder, 'labelsTr')
    if not os.path.isdir(labels):
        return []
    return sorted(f[:-len(ending)] for f in os.listdir(labels) if f.endswith(ending) and not f.startswith('.'))


def _read(path: str):
    try:
        return sitk.ReadImage(path)
    except RuntimeError:
        return None


def _non_finite(path: str, array: np.ndarray) -> bool:
    """NaN/Inf voxels as stored (ITK's NIfTI reader turns them into 0, so NIfTI is read with nibabel)."""
    if path.endswith(('.nii', '.nii.gz')):
        image = nibabel.load(path)
        if not np.issubdtype(image.get_data_dtype(), np.floating):
            return False
        array = np.asanyarray(image.dataobj)
    return bool(np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)))


def _geometry_problem(clean: sitk.Image, protected: sitk.Image) -> Optional[str]:
    if clean.GetSize() != protected.GetSize():
        return f'shape {protected.GetSize()} != {clean.GetSize()}'
    for name in ('Spacing', 'Origin', 'Direction'):
        a, b = getattr(clean, 'Get' + name)(), getattr(protected, 'Get' + name)()
        if not np.allclose(a, b, rtol=0, atol=GEOMETRY_ATOL):
            return f'{name.lower()} {tuple(round(v, 6) for v in b)} != {tuple(round(v, 6) for v in a)}'
    if clean.GetPixelIDValue() != protected.GetPixelIDValue():
        return f'dtype {protected.GetPixelIDTypeAsString()} != {clean.GetPixelIDTypeAsString()}'
    return None


def _voxel_check(path: str, diff: np.ndarray, allowed: np.ndarray, weight: np.ndarray) -> tuple:
    """(violation or None, per-voxel metrics) of |delta| ``diff`` against the per-voxel bound ``allowed``."""
    over = diff > allowed * (1 + BOUND_RTOL)
    support, background, zero = weight >= 1, (weight > 0) & (weight < 1), weight == 0
    top = lambda region: float(diff[region].max()) if region.any() else 0.0  # noqa: E731
    positive = allowed > 0
    metrics = {'voxels_over_bound': int(over.sum()), 'max_abs_delta_support': top(support),
               'max_abs_delta_background': top(background), 'max_abs_delta_zero_bound': top(zero),
               'max_bound_use': float((diff[positive] / allowed[positive]).max()) if positive.any() else 0.0}
    if not over.any():
        return None, metrics
    where = [f'{int((over & region).sum())} {name}' for region, name in
             ((support, 'in the support'), (background, 'outside it (eps_bg)'), (zero, 'where the bound is 0'))
             if (over & region).any()]
    return (f'{path}: {int(over.sum())} voxel(s) exceed their per-voxel bound ({", ".join(where)}; max |delta| there '
            f'{float(diff[over].max()):.6g})'), metrics


def verify_case(case: str, clean_folder: str, protected_folder: str, ending: str, n_channels: int, eps: float,
                eps_abs: Optional[float], percentiles: Sequence[float], budget_mode: str = DEFAULT_BUDGET_MODE,
                clean_std: Optional[Sequence[float]] = None, manifest: Optional[dict] = None) -> dict:
    """Violations (one line each) and metrics of one case (``clean_std``: the dataset's, for 'zscore-dataset';
    ``manifest``: its support rule and ignore label give every voxel its own bound, ``manifest.voxel_weight``)."""
    violations, channels = [], []
    clean_label = os.path.join(clean_folder, 'labelsTr', case + ending)
    protected_label = os.path.join(protected_folder, 'labelsTr', case + ending)
    if not os.path.isfile(protected_label):
        return {'case': case, 'violations': [f'{protected_label}: case {case} missing (label)'], 'channels': []}
    if not filecmp.cmp(clean_label, protected_label, shallow=False):
        violations.append(f'{protected_label}: label differs from {clean_label}')
    label = _read(clean_label)
    if label is None:
        raise VerifyInputError(f'{clean_label}: cannot be read as an image')
    seg = sitk.GetArrayFromImage(label)
    ignore = None if manifest is None else manifest.get('ignore_label')
    roi = (seg > 0) if ignore is None else (seg > 0) & (seg != ignore)
    weight = None if manifest is None else voxel_weight(manifest['support'], seg, label.GetSpacing()[::-1], ignore)
    clean_files = [os.path.join(clean_folder, 'imagesTr', f'{case}_{c:04d}{ending}') for c in range(n_channels)]
    protected_files = [os.path.join(protected_folder, 'imagesTr', f'{case}_{c:04d}{ending}')
                       for c in range(n_channels)]
    clean_images = [_read(f) for f in clean_files]
    for f, image in zip(clean_files, clean_images):
        if image is None:
            raise VerifyInputError(f'{f}: missing or unreadable clean image')
    clean_arrays = [sitk.GetArrayFromImage(im) for im in clean_images]
    budgets = raw_budget(np.stack([a.astype(np.float64) for a in clean_arrays]), eps, eps_abs, percentiles,
                         budget_mode, clean_std)
    for c, (path, clean_image, clean, budget) in enumerate(zip(protected_files, clean_images, clean_arrays, budgets)):
        if not os.path.isfile(path):
            violations.append(f'{path}: case {case} missing (channel {c})')
            continue
        image = _read(path)
        if image is None:
            violations.append(f'{path}: cannot be read as an image')
            continue
        problem = _geometry_problem(clean_image, image)
        if problem is not None:
            violations.append(f'{path}: {problem}')
            continue
        protected = sitk.GetArrayFromImage(image)
        if _non_finite(path, protected):
            violations.append(f'{path}: NaN or Inf voxels')
            continue
        diff = np.abs(protected.astype(np.float64) - clean.astype(np.float64))
        max_delta = float(diff.max())
        if max_delta > budget:
            violations.append(f'{path}: max |delta| {max_delta:.6g} exceeds the budget {budget:.6g} '
                              f'at {int(np.sum(diff > budget))} voxel(s)')
        voxel = {}
        if weight is not None and weight.shape == diff.shape:
            problem, voxel = _voxel_check(path, diff, float(budget) * weight, weight)
            if problem is not None and max_delta <= budget:  # over the channel budget: reported above
                violations.append(problem)
        channels.append({'file': os.path.basename(path), 'budget': float(budget), 'max_abs_delta': max_delta,
                         'budget_use': max_delta / budget if budget > 0 else (0.0 if max_delta == 0 else np.inf),
                         'fraction_changed': float(np.mean(diff > 0)), 'psnr': psnr(clean, protected),
                         'psnr_roi': psnr(clean, protected, roi), 'ssim': ssim(clean, protected), **voxel})
    return {'case': case, 'violations': violations, 'channels': channels}


def _stats(values: list) -> dict:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return {'mean': float(np.mean(values)) if values else None, 'min': float(np.min(values)) if values else None}


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _clean_case(clean_folder: str, case: str, ending: str, n_channels: int) -> np.ndarray:
    """The clean channels of ``case`` stacked (c, *spatial), as ``verify_case`` reads them."""
    arrays = []
    for c in range(n_channels):
        path = os.path.join(clean_folder, 'imagesTr', f'{case}_{c:04d}{ending}')
        image = _read(path)
        if image is None:
            raise VerifyInputError(f'{path}: missing or unreadable clean image')
        arrays.append(sitk.GetArrayFromImage(image).astype(np.float64))
    try:
        return np.stack(arrays)
    except ValueError:
        raise VerifyInputError(f'{os.path.join(clean_folder, "imagesTr", case)}_*: channels differ in shape') from None


def _manifest_settings(protected_folder: str, eps, eps_abs, percentiles, budget_mode, strength) -> tuple:
    """(manifest or None, eps, eps_abs, percentiles, budget_mode, strength): the arguments given, the manifest's
    where an argument is None (an eps or eps_abs given replaces both of the manifest's), else the defaults."""
    try:
        manifest = read_manifest(protected_folder) if os.path.isdir(protected_folder) else None
    except ManifestError as e:
        raise VerifyInputError(str(e)) from None
    m = manifest or {}
    if eps is None and eps_abs is None and strength is None:
        eps, eps_abs, strength = m.get('eps'), m.get('eps_abs'), m.get('strength')
        if eps is None and eps_abs is None and strength is None:
            eps = DEFAULT_EPS
    percentiles = percentiles if percentiles is not None else m.get('percentiles') or DEFAULT_PERCENTILES
    budget_mode = budget_mode or m.get('budget_mode') or DEFAULT_BUDGET_MODE
    return manifest, eps, eps_abs, percentiles, budget_mode, strength


def verify_datasets(clean_folder: str, protected_folder: str, eps: Optional[float] = None,
                    eps_abs: Optional[float] = None, percentiles: Optional[Sequence[float]] = None,
                    budget_mode: Optional[str] = None, strength: Optional[float] = None) -> dict:
    """Report with 'violations' (empty when the protected dataset passes), per-case metrics and a summary.
    ``strength``: a conv copy (``conv_code``): no eps, the bound is strength x (max - min) per channel.
    Arguments left None come from the protected dataset's manifest, else the defaults (eps 4/255, range,
    p0.5-p99.5); with a manifest every voxel is also checked against its own bound (eps, eps_bg, 0 on the ignore
    label of the clean dataset.json)."""
    manifest, eps, eps_abs, percentiles, budget_mode, strength = _manifest_settings(
        protected_folder, eps, eps_abs, percentiles, budget_mode, strength)
    if strength is not None:  # s x the p0-p100 range: conv's bound, whatever eps / mode say
        eps, eps_abs, percentiles, budget_mode = float(strength), None, (0.0, 100.0), DEFAULT_BUDGET_MODE
    check_budget_mode(budget_mode)
    clean = _dataset_json(clean_folder)
    if manifest is not None:  # the ignore label of the clean dataset, not the export's word for it
        manifest = dict(manifest, ignore_label=dataset_ignore_label(clean['json']))
    cases = _cases(clean_folder, clean['ending'])
    if not cases:
        raise VerifyInputError(f'{os.path.join(clean_folder, "labelsTr")}: no training cases found')
    clean_std = None
    if eps_abs is None and budget_mode == 'zscore-dataset':  # from the clean dataset given here, not the export's
        clean_std = [float(s) for s in dataset_std(_clean_case(clean_folder, c, clean['ending'], clean['channels'])
                                                   for c in cases)]
    violations = []
    if not os.path.isdir(protected_folder):
        raise VerifyInputError(f'{protected_folder}: protected dataset folder not found')
    try:
        protected_json = _dataset_json(protected_folder)['json']
        if protected_json.get('numTraining') != clean['json'].get('numTraining'):
            violations.append(f'{os.path.join(protected_folder, "dataset.json")}: numTraining '
                              f'{protected_json.get("numTraining")} != {clean["json"].get("numTraining")}')
    except VerifyInputError as e:
        violations.append(str(e))
    extra = sorted(set(_cases(protected_folder, clean['ending'])) - set(cases))
    violations += [f'{os.path.join(protected_folder, "labelsTr", c + clean["ending"])}: case {c} is not in the '
                   f'clean dataset' for c in extra]
    reports = [verify_case(c, clean_folder, protected_folder, clean['ending'], clean['channels'], eps, eps_abs,
                           percentiles, budget_mode, clean_std, manifest) for c in cases]
    violations += [v for r in reports for v in r['violations']]
    channels = [ch for r in reports for ch in r['channels']]
    summary = {'cases': len(cases), 'violations': len(violations),
               'max_budget_use': max((ch['budget_use'] for ch in channels), default=0.0),
               'psnr': _stats([ch['psnr'] for ch in channels]), 'psnr_roi': _stats([ch['psnr_roi'] for ch in channels]),
               'ssim': _stats([ch['ssim'] for ch in channels]),
               'per_voxel_bounds': manifest is not None,
               'voxels_over_bound': sum(ch.get('voxels_over_bound', 0) for ch in channels),
               'max_bound_use': max((ch['max_bound_use'] for ch in channels if 'max_bound_use' in ch), default=None)}
    return _json_safe({'summary': summary, 'violations': violations, 'cases': reports, 'manifest': manifest,
                       'budget': {'eps': None if eps_abs is not None else eps, 'eps_abs': eps_abs,
                                  'mode': None if eps_abs is not None else budget_mode, 'dataset_std': clean_std,
                                  'percentiles': list(percentiles), 'strength': strength}})


def verify_entry(argv=None):
    """``voxshield_verify``: parse the arguments, verify, print the summary; non-zero exit on any violation."""
    parser = argparse.ArgumentParser(description='Check a protected dataset against its clean source: labels '
                                                 'byte-identical, geometry and dtype preserved, |delta| <= budget. '
                                                 'Reads both raw dataset folders only; prints a summary, writes the '
                                                 'full report only with -o, and exits non-zero naming each '
                                                 'violation.')
    parser.add_argument('clean', help='clean nnU-Net raw dataset folder')
    parser.add_argument('protected', help='protected nnU-Net raw dataset folder')
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument('--eps', default=None, help='budget as a fraction in (0, 1] of the window of --budget-mode '
                                                    '(default: the manifest\'s, else 4/255 of each case\'s '
                                                    'p0.5-p99.5 range)')
    budget.add_argument('--eps-abs', default=None, help='absolute budget in raw units (e.g. HU)')
    budget.add_argument('--strength', type=float, default=None,
                        help='a conv copy (voxshield_export --method conv --strength S): no eps; checks |delta| <= S x '
                             '(max - min) per channel and reports PSNR over the volume and inside the labels')
    parser.add_argument('--budget-mode', default=None, metavar='{' + ','.join(BUDGET_MODES) + '}',
                        help='what --eps is a fraction of, per channel: ' +
                             '; '.join(f'{k}: {v}' for k, v in BUDGET_MODES.items()) +
                             ' (default: the manifest\'s, else range)')
    parser.add_argument('--percentiles', type=float, nargs=2, default=None, metavar=('LOW', 'HIGH'),
                        help='the percentiles of the range window (default: the manifest\'s, else 0.5 99.5)')
    parser.add_argument('-o', default=None, help='write the full report to this JSON file')
    args = parser.parse_args(argv)
    try:
        eps = parse_eps(args.eps) if args.eps is not None else None
        eps_abs = parse_eps_abs(args.eps_abs) if args.eps_abs is not None else None
        if args.budget_mode is not None:
            check_budget_mode(args.budget_mode)
        if args.percentiles is not None and not 0 <= args.percentiles[0] < args.percentiles[1] <= 100:
            raise ValueError(f'--percentiles must satisfy 0 <= LOW < HIGH <= 100, got {args.percentiles}')
    except ValueError as e:  # one line, nothing written
        print(f'voxshield_verify: error: {e}', file=sys.stderr)
        sys.exit(1)
    try:
        if args.strength is not None and not args.strength > 0:
            raise VerifyInputError(f'--strength must be > 0, got {args.strength}')
        report = verify_datasets(args.clean, args.protected, eps, eps_abs, args.percentiles,
                                 budget_mode=args.budget_mode, strength=args.strength)
    except VerifyInputError as e:
        print(f'voxshield_verify: error: {e}', file=sys.stderr)
        sys.exit(1)
    if args.o is not None:
        tmp = os.path.join(os.path.dirname(os.path.abspath(args.o)),
                           f".partial-{os.getpid()}-{os.path.basename(args.o)}")
        with open(tmp, 'w') as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.o)
    s = report['summary']
    fmt = lambda v: 'n/a' if v is None else f'{v:.4g}'  # noqa: E731
    print(f'{s["cases"]} cases, max budget use {fmt(s["max_budget_use"])}, PSNR mean {fmt(s["psnr"]["mean"])} '
          f'min {fmt(s["psnr"]["min"])} dB, SSIM mean {fmt(s["ssim"]["mean"])} min {fmt(s["ssim"]["min"])}')
    if args.strength is not None:
        print(f'conv (strength {args.strength}): ROI PSNR mean {fmt(s["psnr_roi"]["mean"])} min '
              f'{fmt(s["psnr_roi"]["min"])} dB')
    for violation in report['violations']:
        print(f'VIOLATION: {violation}', file=sys.stderr)
    if report['violations']:
        print(f'voxshield_verify: {len(report["violations"])} violation(s)', file=sys.stderr)
        sys.exit(1)
    print('OK: every case is within budget with labels and geometry unchanged')


if __name__ == '__main__':
    verify_entry()
