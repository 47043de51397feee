"""Evaluation report: aggregation over cases and seeds, report.json, report.md (Table-1 layout) and the figure."""
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunetv2_voxshield.dataset_io import write_atomic  # noqa: F401  (re-exported: callers import it from here)
from nnunetv2_voxshield.metrics import mean_std




def summarise_victim(case_scores: List[dict]) -> dict:
    """One victim (row, configuration, seed): means over its test cases."""
    labels = list(case_scores[0]['labels']) if case_scores else []
    hd_defined = [v['hd95_mm'] for c in case_scores for v in c['labels'].values() if v['hd95_mm'] is not None]
    return {
        'n_cases': len(case_scores),
        'dice': mean_std([c['mean_dice'] for c in case_scores])['mean'],
        'dice_per_label': {l: mean_std([c['labels'][l]['dice'] for c in case_scores])['mean'] for l in labels},
        'hd95_mm': mean_std([c['mean_hd95_mm_penalised'] for c in case_scores])['mean'],
        'hd95_mm_per_label': {l: mean_std([c['labels'][l]['hd95_mm_penalised'] for c in case_scores])['mean']
                              for l in labels},
        'hd95_mm_defined_only': mean_std(hd_defined)['mean'],
        'n_empty_prediction': int(sum(c['n_empty_prediction'] for c in case_scores)),
    }


def summarise_seeds(per_seed: Dict[int, dict]) -> dict:
    """Mean +- std over seeds of the per-seed victim summaries."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    return {
        'seeds': seeds,
        'dice': mean_std([per_seed[s]['dice'] for s in seeds]),
        'dice_per_label': {l: mean_std([per_seed[s]['dice_per_label'][l] for s in seeds])
                           for l in first['dice_per_label']},
        'hd95_mm': mean_std([per_seed[s]['hd95_mm'] for s in seeds]),
        'hd95_mm_per_label': {l: mean_std([per_seed[s]['hd95_mm_per_label'][l] for s in seeds])
                              for l in first['hd95_mm_per_label']},
        'n_empty_prediction': int(sum(per_seed[s]['n_empty_prediction'] for s in seeds)),
    }


def _pm(stat: Optional[dict], scale: float = 1.0, digits: int = 2) -> str:
    if not stat or stat.get('mean') is None or not math.isfinite(stat['mean']):
        return '–'
    if stat.get('n', 1) <= 1:
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown_report(report: dict) -> str:
    """report.md: one table row per (method/defence, configuration), as the paper's Table 1."""
    s = report['settings']
    lines = ['# VoxShield evaluation', '',
             f"Victims: `{s['trainer']}`, plans `{s['plans']}`, fold `all`, seeds {s['seeds']}, "
             f"{s['n_test_cases']} clean test cases.", '',
             '| Method | Defence | Configuration | DSC (%) | HD95 (mm) | PSNR (dB) | PSNR ROI (dB) | SSIM | SSIM ROI |',
             '|---|---|---|---|---|---|---|---|---|']
    for row in report['rows']:
        q = row.get('quality') or {}
        for config, v in row['victims'].items():
            hd = _pm(v['hd95_mm'])
            if v['n_empty_prediction']:
                hd += f" ({v['n_empty_prediction']} empty)"
            lines.append(f"| {row['method']} | {row['defence'] or '–'} | {config} | {_pm(v['dice'], 100)} | {hd} | "
                         f"{_pm(q.get('psnr'))} | {_pm(q.get('psnr_roi'))} | {_pm(q.get('ssim'), digits=4)} | "
                         f"{_pm(q.get('ssim_roi'), digits=4)} |")
    lines += ['', 'DSC: mean foreground Dice on the clean test cases (nnU-Net\'s counting), mean ± std over seeds. '
              'HD95: symmetric 95th-percentile Hausdorff distance in mm (MONAI, spacing from the image header); '
              'a class with an empty prediction has no HD95 and is counted with the volume diagonal instead '
              '("k empty" = number of such case/class pairs over all seeds). PSNR/SSIM: training images of the '
              'row\'s dataset against the clean ones (mean ± std over cases), whole volume and inside the label ROI.',
              '']
    label_names = report.get('label_names', {})
    lines += ['## Dice per class (%)', '',
              '| Method | Defence | Configuration | ' + ' | '.join(label_names.get(l, l) for l in report['labels'])
              + ' |', '|---|---|---|' + '---|' * len(report['labels'])]
    for row in report['rows']:
        for config, v in row['victims'].items():
            cells = [_pm(v['dice_per_label'].get(l), 100) for l in report['labels']]
            lines.append(f"| {row['method']} | {row['defence'] or '–'} | {config} | " + ' | '.join(cells) + ' |')
    if report.get('figure'):
        lines += ['', f"![clean, delta, protected]({os.path.basename(report['figure'])})", '']
    return '\n'.join(lines) + '\n'


def slice_spectrum_difference(clean: np.ndarray, protected: np.ndarray) -> np.ndarray:
    """Per z-slice: mean in-plane 2D amplitude spectrum of ``protected`` minus that of ``clean``."""
    amp = lambda v: np.abs(np.fft.fft2(np.asarray(v, dtype=np.float64), axes=(1, 2))).mean(axis=(1, 2))
    return amp(protected) - amp(clean)


def z_spectrum(volume: np.ndarray) -> np.ndarray:
    """Amplitude spectrum along z (rfft over axis 0), averaged over the in-plane positions."""
    return np.abs(np.fft.rfft(np.asarray(volume, dtype=np.float64), axis=0)).mean(axis=(1, 2))


def make_figure(clean: np.ndarray, protected: np.ndarray, seg: Optional[np.ndarray], out_png: str,
                title: str = '', n_slices: int = 4) -> str:
    """Fig. 3-style PNG: consecutive z-slices of clean, delta (diverging, amplified) and protected, plus spectra."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    clean = np.asarray(clean, dtype=np.float64)
    protected = np.asarray(protected, dtype=np.float64)
    delta = protected - clean
    n_z = clean.shape[0]
    n = min(n_slices, n_z)
    if seg is not None and np.any(seg > 0):
        centre = int(round(np.mean(np.nonzero(np.asarray(seg) > 0)[0])))
    else:
        centre = n_z // 2
    start = int(np.clip(centre - n // 2, 0, n_z - n))
    zs = list(range(start, start + n))
    lo, hi = np.percentile(clean, [0.5, 99.5])
    dmax = max(float(np.abs(delta).max()), 1e-12)
    amplification = (hi - lo) / dmax if hi > lo else 1.0

    fig, axes = plt.subplots(4, n, figsize=(2.6 * n, 10.4), squeeze=False)
    for j, z in enumerate(zs):
        axes[0, j].imshow(clean[z], cmap='gray', vmin=lo, vmax=hi)
        axes[0, j].set_title(f'z = {z}')
        im = axes[1, j].imshow(delta[z], cmap='RdBu_r', vmin=-dmax, vmax=dmax)
        axes[2, j].imshow(protected[z], cmap='gray', vmin=lo, vmax=hi)
        for i in range(3):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    axes[0, 0].set_ylabel('clean')
    axes[1, 0].set_ylabel(f'delta (x{amplification:.0f})')
    axes[2, 0].set_ylabel('protected')
    fig.colorbar(im, ax=list(axes[1]), fraction=0.02, pad=0.01, label='raw units')
    for j in range(n):
        axes[3, j].remove()
    ax_a = fig.add_subplot(4, 2, 7)
    ax_a.plot(np.arange(n_z), slice_spectrum_difference(clean, protected), marker='.')
    ax_a.axvspan(zs[0] - 0.5, zs[-1] + 0.5, color='0.85')
    ax_a.axhline(0, color='k', lw=0.5)
    ax_a.set_xlabel('z-slice')
    ax_a.set_ylabel('mean |F| diff (protected - clean)')
    ax_a.set_title('per-slice amplitude-spectrum difference')
    ax_b = fig.add_subplot(4, 2, 8)
    freqs = np.fft.rfftfreq(n_z)
    ax_b.semilogy(freqs, z_spectrum(clean) + 1e-12, label='clean')
    ax_b.semilogy(freqs, z_spectrum(protected) + 1e-12, label='protected', ls='--')
    ax_b.semilogy(freqs, z_spectrum(delta) + 1e-12, label='delta', ls=':')
    ax_b.set_xlabel('z-frequency (cycles/slice)')
    ax_b.set_title('amplitude spectrum along z')
    ax_b.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fd, tmp = tempfile.mkstemp(prefix='.tmp_', suffix='.png', dir=os.path.dirname(os.path.abspath(out_png)))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches='tight')
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_png


def quality_summary(per_case: Sequence[dict]) -> dict:
    """Mean +- std over cases of psnr, psnr_roi, ssim, ssim_roi."""
    return {k: mean_std([c[k] for c in per_case]) for k in ('psnr', 'psnr_roi', 'ssim', 'ssim_roi')}
