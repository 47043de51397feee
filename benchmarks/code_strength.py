"""How strong each fixed class code is against the image's own content in its frequency band (issue 13).

    python benchmarks/code_strength.py -o benchmarks/out/map --eps 16/255

The protection map says that against a victim without augmentation (NoDA) a fine code protects and a coarse one does
not (checkerboard at 16/255: period 2 -> 0.02 of clean, period 4 -> 0.70, period 8 -> 0.99). This asks why without
training anything: in a Hann-windowed ``--window``^3 neighbourhood of every labelled voxel, the power of the code's
band (the window's DFT bin where the code's unit pattern has its peak, per class) in the code, b x pattern, and in
the clean image. The ratio of their means over the labelled voxels of the training cases is the code's local SNR:
how far a linear detector tuned to the code stands above what the anatomy puts in the same band.

Images are the raw training cases of the map's Dataset004_Hippocampus (``-o``/nnUNet_raw; ``--dataset`` another raw
folder; channel 0), in units of each case's p0.5-p99.5 range minus its mean (b = eps, the export's rule; the mean
does not matter to any band but the offset's). The offset's band is bin 0 (the local mean), so its image power is
how much the local mean intensity varies over the labels and cases. Prints a table, writes -o/code_strength.json.

``--spectrum K``: also the image's mean power in every bin of the local DFT with |k_i| <= K on each axis (one of each
pair k, -k), lowest first, relative to the bin of the period-n grating along the first axis ((1, 0, 0)); with K = 1
and n = 8 that is every direction of period >= 8 voxels per axis, the band stock augmentation leaves (the codes in
it lose at most 4% of samples). A single-bin code in the least anatomical bin stands at most 1 / that ratio above
the grating's SNR at the same code power. Written to the JSON as ``spectrum``.

``--contrast W``: the anatomy's own contrast, per label and case: the mean of the label's voxels minus the mean of
the background shell within W voxels of the foreground, in units of the case's p0.5-p99.5 range (the unit of eps),
median and p10 / p90 over the cases. An offset of sign s on a class of contrast c leaves it at c + s eps: a code of
the opposite sign erases the class's edge at eps = |c| and inverts it beyond. Written to the JSON as ``contrast``.
"""
import argparse
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CODES = {'checkerboard': ('checkerboard', 1), 'checkerboard:block=2': ('checkerboard', 2),
         'checkerboard:block=4': ('checkerboard', 4), 'stripes': ('stripes', 1), 'stripes:block=2': ('stripes', 2),
         'stripes:block=4': ('stripes', 4), 'diagonal:block=4': ('diagonal', 4), 'offset': ('offset', 1),
         'smooth': ('smooth', 1)}
DEFAULT_WINDOW = 8


def hann3(n: int) -> np.ndarray:
    """The separable n^3 Hann window (no zero end points)."""
    h = np.hanning(n + 2)[1:-1]
    return h[:, None, None] * h[None, :, None] * h[None, None, :]


def window_kernel(k: tuple, n: int) -> np.ndarray:
    """Hann window x exp(-2 pi i k.w / n) over an n^3 block: correlating with it gives bin k of the local DFT."""
    grids = np.meshgrid(*[np.arange(n)] * 3, indexing='ij')
    return hann3(n) * np.exp(-2j * np.pi * sum(ki * g for ki, g in zip(k, grids)) / n)


def canonical(k) -> tuple:
    """The one of k, -k whose first nonzero component is positive (a real signal has the same power in both)."""
    k = tuple(int(i) for i in k)
    return tuple(-i for i in k) if next((i for i in k if i), 0) < 0 else k


def peak_bin(pattern: np.ndarray, n: int) -> tuple:
    """The DFT bin (of a Hann-windowed n^3 block of ``pattern``, taken at its origin) with the most power: in 0..n/2
    on every axis if one there has it (ties go to the lowest in C order), else the strongest bin anywhere as signed
    frequencies whose first nonzero component is positive (a real pattern's power is symmetric under k -> -k)."""
    power = np.round(np.abs(np.fft.fftn(pattern[:n, :n, :n] * hann3(n))) ** 2, 9)
    half = power[:n // 2 + 1, :n // 2 + 1, :n // 2 + 1]
    if half.max() >= power.max():
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(half)), half.shape))
    return canonical(i if i <= n // 2 else i - n for i in np.unravel_index(int(np.argmax(power)), power.shape))


def band_power(v: np.ndarray, k: tuple, n: int) -> np.ndarray:
    """Power of bin ``k`` of the Hann-windowed local n^3 DFT of ``v`` around every voxel (the block from n/2 voxels
    before it on each axis; mirrored at the edges)."""
    from scipy.signal import fftconvolve
    padded = np.pad(np.asarray(v, dtype=np.float64), [(n // 2, n - 1 - n // 2)] * np.ndim(v), mode='symmetric')
    return np.abs(fftconvolve(padded, window_kernel(k, n)[::-1, ::-1, ::-1], mode='valid')) ** 2


def code_strength(cases, method: str, block: int, eps: float, n: int = DEFAULT_WINDOW) -> dict:
    """For ``cases`` (pairs of a 3D image in range units and its labels): per class, the code's bin, and over the
    labelled voxels of every case the mean band power of the image and of the code, and their ratio (SNR)."""
    from nnunetv2_voxshield.controls import LabelCodedSource
    source = LabelCodedSource(method, block=block)
    image, code, bins = [], [], {}
    for x, seg in cases:
        delta = source.compute_delta_raw(x[None], seg, np.array([eps]), 'case')[0]
        for label in np.unique(seg[seg > 0]):
            label = int(label)
            if label not in bins:
                bins[label] = peak_bin(source.pattern(label, (n, n, n)), n)
            where = seg == label
            image.append(band_power(x, bins[label], n)[where])
            code.append(band_power(delta, bins[label], n)[where])
    if not image:
        raise ValueError('no labelled voxels in any case')
    image_power, code_power = float(np.mean(np.concatenate(image))), float(np.mean(np.concatenate(code)))
    return {'bins': {str(k): list(v) for k, v in sorted(bins.items())}, 'image_power': image_power,
            'code_power': code_power, 'snr': code_power / image_power}


def image_spectrum(cases, n: int = DEFAULT_WINDOW, max_bin: int = 1) -> dict:
    """Mean power of every bin k of the Hann-windowed local n^3 DFT (``band_power``'s block) over the labelled
    voxels of ``cases``, for |k_i| <= ``max_bin`` (k and -k have the same power in a real image: the first nonzero
    component of each bin kept is positive). Returns {bin: power}."""
    from itertools import product
    from numpy.lib.stride_tricks import sliding_window_view
    bins = sorted({canonical(k) for k in product(range(-max_bin, max_bin + 1), repeat=3)})
    index = tuple(np.array([k[a] % n for k in bins]) for a in range(3))
    total, count = np.zeros(len(bins)), 0
    for x, seg in cases:
        padded = np.pad(np.asarray(x, dtype=np.float64), [(n // 2, n - 1 - n // 2)] * 3, mode='symmetric')
        blocks = sliding_window_view(padded, (n, n, n))[seg > 0]
        for start in range(0, len(blocks), 4096):
            spectra = np.fft.fftn(blocks[start:start + 4096] * hann3(n), axes=(1, 2, 3))
            total += (np.abs(spectra[(slice(None),) + index]) ** 2).sum(axis=0)
        count += len(blocks)
    if not count:
        raise ValueError('no labelled voxels in any case')
    return dict(zip(bins, (total / count).tolist()))


def anatomy_contrast(cases, width: int = 2) -> dict:
    """{label: per-case (mean of the label's voxels - mean of the background within ``width`` voxels of the
    foreground)}, in the cases' own units (``load_cases``: the p0.5-p99.5 range). A case without that label or
    without a shell is skipped."""
    from nnunetv2_voxshield.controls import boundary_band
    contrast = {}
    for x, seg in cases:
        shell = boundary_band(seg, 'grow', width)[0]
        if not shell.any():
            continue
        for label in np.unique(seg[seg > 0]):
            contrast.setdefault(int(label), []).append(float(x[seg == label].mean() - x[shell].mean()))
    return contrast


def load_cases(dataset: Path, n_cases: int) -> list:
    """(channel 0 in units of its p0.5-p99.5 range, minus its mean; labels) of the first ``n_cases`` training cases
    (sorted), read and checked as the export does."""
    import SimpleITK as sitk
    from nnunetv2_voxshield.budget import percentile_range
    from nnunetv2_voxshield.dataset_io import list_training_cases, load_dataset_json, read_image
    files = list_training_cases(str(dataset), load_dataset_json(str(dataset)))
    cases = []
    for case in sorted(files)[:n_cases]:
        x = sitk.GetArrayFromImage(read_image(files[case]['images'][0])).astype(np.float64)
        seg = sitk.GetArrayFromImage(read_image(files[case]['label'])).astype(np.int16)
        cases.append(((x - x.mean()) / max(float(percentile_range(x[None])[0]), 1e-12), seg))
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-o', default=str(HERE / 'out' / 'map'), help="the protection map's output folder")
    parser.add_argument('--dataset', default=None, help='a raw nnU-Net dataset folder (default: the map\'s '
                                                        'nnUNet_raw/Dataset004_Hippocampus)')
    parser.add_argument('--eps', default='16/255')
    parser.add_argument('--cases', type=int, default=40, help='training cases (sorted, first N)')
    parser.add_argument('--window', type=int, default=DEFAULT_WINDOW, help='local DFT block edge (voxels)')
    parser.add_argument('--codes', nargs='+', default=list(CODES), choices=list(CODES))
    parser.add_argument('--spectrum', type=int, default=None, metavar='K',
                        help="also the image's power in every bin with |k_i| <= K, lowest first")
    parser.add_argument('--contrast', type=int, default=None, metavar='W',
                        help="also each label's mean contrast against the background within W voxels, per case")
    args = parser.parse_args()
    out = Path(args.o).resolve()
    dataset = Path(args.dataset) if args.dataset else out / 'nnUNet_raw' / 'Dataset004_Hippocampus'
    if not dataset.is_dir():
        parser.error(f'{dataset}: not a folder (run protection_map.py first, or pass --dataset)')
    from nnunetv2_voxshield.dataset_io import InputError, write_json_atomic
    try:
        cases = load_cases(dataset, args.cases)
    except InputError as e:
        parser.error(str(e))
    eps = float(Fraction(args.eps))
    results = {name: code_strength(cases, *CODES[name], eps, args.window) for name in args.codes}
    lines = [f'Local band power in the labels ({len(cases)} cases, {args.window}^3 Hann window, eps {args.eps})', '',
             '| code | bin per class | image power | code power | SNR |', '| --- | --- | --- | --- | --- |']
    for name, r in results.items():
        bins = ', '.join(f'{k}: {tuple(v)}' for k, v in r['bins'].items())
        lines.append(f'| {name} | {bins} | {r["image_power"]:.3g} | {r["code_power"]:.3g} | {r["snr"]:.3g} |')
    report = {'settings': {'dataset': str(dataset), 'eps': args.eps, 'cases': len(cases), 'window': args.window},
              'codes': results}
    if args.spectrum is not None:
        spectrum = image_spectrum(cases, args.window, args.spectrum)
        ref = spectrum.get((1, 0, 0))
        lines += ['', f'Image power per bin in the labels (|k_i| <= {args.spectrum}), lowest first; '
                      'ratio: to bin (1, 0, 0)', '', '| bin | image power | ratio |', '| --- | --- | --- |']
        for k, v in sorted(spectrum.items(), key=lambda kv: kv[1]):
            lines.append(f'| {k} | {v:.3g} | {v / ref:.3g} |' if ref else f'| {k} | {v:.3g} | - |')
        report['spectrum'] = [{'bin': list(k), 'image_power': v} for k, v in sorted(spectrum.items())]
    if args.contrast is not None:
        contrast = anatomy_contrast(cases, args.contrast)
        lines += ['', f'Contrast of each label against the background within {args.contrast} voxels (units: the '
                      'case\'s p0.5-p99.5 range = eps), over the cases', '',
                  '| label | cases | median | p10 | p90 | median as eps |', '| --- | --- | --- | --- | --- | --- |']
        report['contrast'] = {'width': args.contrast, 'labels': {}}
        for label, values in sorted(contrast.items()):
            med, p10, p90 = (float(v) for v in np.percentile(values, [50, 10, 90]))
            lines.append(f'| {label} | {len(values)} | {med:.3f} | {p10:.3f} | {p90:.3f} | {abs(med) * 255:.0f}/255 |')
            report['contrast']['labels'][str(label)] = {'cases': len(values), 'median': med, 'p10': p10,
                                                        'p90': p90, 'per_case': values}
    print('\n'.join(lines))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, str(out / 'code_strength.json'))


if __name__ == '__main__':
    sys.exit(main())
