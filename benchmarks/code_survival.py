"""How much of each fixed class code survives stock nnU-Net's augmentation, sample by sample (issue 13).

    python benchmarks/code_survival.py -o benchmarks/out/map --eps 16/255 --samples 400

The protection map says a code protects a stock victim only if it is readable in nearly every augmented sample
(the victim learns the anatomy from the rest). This measures it without training anything: for training cases of
the map's preprocessed Dataset004_Hippocampus (protection_map.py prepares it; -o is the map's folder), a patch of
stock's initial patch size around a random foreground voxel, the control's delta on it (``controls``, budget b = eps
x the normalised case's p0.5-p99.5 range, the export's rule in normalised units), and one draw T of stock
``nnUNetTrainer.get_training_transforms`` (the CPU plans' patch size, rotation and mirror axes) applied to x + delta
and, replayed with the same random state, to x. Per sample and code, in the labels of T's output:

- retained = RMS(band(T(x + delta) - T(x))) / RMS(band(delta)) (before T, in the labels): the share of the code's
  amplitude that T keeps; additive noise cancels in the difference, so it does not count here;
- readable = retained x RMS(band(x)) / RMS(band(T(x))): the code against the image's own content in the same band,
  relative to before T (noise and blur change the denominator).

band: textures (checkerboard, stripes) keep the detail v - Gaussian(v, 2 voxels); for offset and smooth it is the
code itself, and the image minus its mean over the labels. The same draws of T serve every code. ``--without
FAMILY``: the same with stock minus one augmentation family (the victim profiles ``nnUNetTrainerDA_no<Family>``).
Prints a table (median, share of samples below 0.5 and 0.25), writes -o/code_survival[_without_<family>].json;
``--table-only`` prints the share below 0.5 of every run in -o side by side.
"""
import argparse
import json
import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
CODES = {'checkerboard': ('checkerboard', 1), 'checkerboard:block=2': ('checkerboard', 2),
         'stripes': ('stripes', 1), 'stripes:block=2': ('stripes', 2), 'stripes:block=4': ('stripes', 4),
         'diagonal:block=4': ('diagonal', 4),
         'offset': ('offset', 1), 'smooth': ('smooth', 1)}
TEXTURES = ('checkerboard', 'stripes', 'diagonal')


def band(v: np.ndarray, mask: np.ndarray, texture: bool, image: bool = False) -> np.ndarray:
    """The code's band of ``v`` on ``mask``: detail above a 2-voxel Gaussian (textures); else ``v`` itself (a code)
    or minus the mask's mean (``image``: the image's own variation there)."""
    from scipy.ndimage import gaussian_filter
    if texture:
        return (v - gaussian_filter(v, 2.0, mode='nearest'))[mask]
    return v[mask] - v[mask].mean() if image else v[mask]


def rms(v: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(v)))) if v.size else float('nan')


def survival(x: np.ndarray, delta: np.ndarray, seg: np.ndarray, x_t: np.ndarray, xd_t: np.ndarray,
             seg_t: np.ndarray, texture: bool) -> tuple:
    """(retained, readable) of one sample: x, delta, seg before T (3D arrays), x_t = T(x), xd_t = T(x + delta),
    seg_t = T(seg), same draw of T."""
    before, after = seg > 0, seg_t > 0
    if not before.any() or not after.any():
        return float('nan'), float('nan')
    code_before = rms(band(delta, before, texture))
    retained = rms(band(xd_t - x_t, after, texture)) / code_before
    image_before, image_after = rms(band(x, before, texture, True)), rms(band(x_t, after, texture, True))
    return retained, retained * image_before / image_after


def crop_around(arrays, centre, size):
    """Crops of ``size`` centred on ``centre`` (zero padding outside each array)."""
    out = []
    for a in arrays:
        pad = [(s, s) for s in size]
        padded = np.pad(a, pad)
        out.append(padded[tuple(slice(c + s - s // 2, c + s - s // 2 + s) for c, s in zip(centre, size))])
    return out


def combined_table(out: Path, metric: str = 'retained') -> str:
    """One row per code, one column per pipeline (stock, then stock without each family measured in -o): the share
    of samples that keep < 0.5 of the code's amplitude (``metric``)."""
    runs = {'stock': out / 'code_survival.json'}
    runs.update({f'without {f.stem[len("code_survival_without_"):]}': f
                 for f in sorted(out.glob('code_survival_without_*.json'))})
    summaries = {k: json.loads(f.read_text())['summary'] for k, f in runs.items() if f.is_file()}
    codes = list(next(iter(summaries.values()))) if summaries else []
    lines = [f'Share of samples with {metric} < 0.5', '', '| code | ' + ' | '.join(summaries) + ' |',
             '| --- |' + ' --- |' * len(summaries)]
    for code in codes:
        cells = [f'{s[code][metric]["below_0.5"]:.2f}' if code in s else '-' for s in summaries.values()]
        lines.append(f'| {code} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-o', default=str(HERE / 'out' / 'map'), help="the protection map's output folder")
    parser.add_argument('--eps', default='16/255')
    parser.add_argument('--samples', type=int, default=400)
    parser.add_argument('--cases', type=int, default=40, help='training cases drawn from (sorted, first N)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--codes', nargs='+', default=list(CODES), choices=list(CODES))
    parser.add_argument('--table-only', action='store_true',
                        help='print the share below 0.5 of every run in -o (stock and each --without)')
    parser.add_argument('--without', default=None,
                        help='stock minus one augmentation family (spatial, noise_blur, intensity, lowres, '
                             'mirror: the victim profiles nnUNetTrainerDA_no<Family>)')
    args = parser.parse_args()
    out = Path(args.o).resolve()
    if args.table_only:
        if not (out / 'code_survival.json').is_file():
            parser.error(f'{out / "code_survival.json"}: not found (run without --table-only first)')
        return print(combined_table(out))
    for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[k] = str(out / k)
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2_voxshield.controls import LabelCodedSource
    from nnunetv2_voxshield.diff_augment import replay_rng

    torch.set_num_threads(1)
    eps = float(Fraction(args.eps))
    trainer = get_trainer_from_args('4', '3d_fullres', 'all', 'nnUNetTrainer', 'nnUNetPlans_cpu',
                                    device=torch.device('cpu'))
    patch = trainer.configuration_manager.patch_size
    rotation, dummy_2d, initial, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    transform = trainer.get_training_transforms(
        patch, rotation, None, mirror, dummy_2d, use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm,
        is_cascaded=False, foreground_labels=trainer.label_manager.foreground_labels, regions=None, ignore_label=None)
    if args.without is not None:
        from nnunetv2_voxshield.trainers.victim_profiles import FAMILIES, without
        if args.without not in FAMILIES:
            parser.error(f'--without: one of {", ".join(FAMILIES)}, got {args.without!r}')
        transform = without(transform, FAMILIES[args.without])
    folder = trainer.preprocessed_dataset_folder
    keys = sorted(infer_dataset_class(folder).get_identifiers(folder))[:args.cases]
    dataset = infer_dataset_class(folder)(folder, keys)
    codes = {name: CODES[name] for name in args.codes}
    cases = {}  # key: (x, y, foreground voxels, {code: delta}), each code's delta computed once per case
    for key in keys:
        data, seg, _, _ = dataset.load_case(key)
        x, y = np.asarray(data[0], dtype=np.float32), np.asarray(seg[0]).astype(np.int16)
        b = np.array([eps * np.subtract(*np.percentile(x, [99.5, 0.5]))])
        deltas = {name: LabelCodedSource(method, block=block).compute_delta_raw(x[None], y, b, key)[0]
                  .astype(np.float32) for name, (method, block) in codes.items()}
        cases[key] = (x, y, np.argwhere(y > 0), deltas)
    rng = np.random.default_rng(args.seed)
    results = {name: {'retained': [], 'readable': []} for name in codes}
    for i in range(args.samples):
        key = keys[rng.integers(len(keys))]
        x, y, fg, deltas = cases[key]
        centre = fg[rng.integers(len(fg))]
        xc, yc = crop_around((x, y), centre, initial)
        torch.manual_seed(args.seed * 100003 + i)
        np.random.seed((args.seed * 100003 + i) % 2 ** 32)
        with replay_rng() as rewind:
            clean = transform(image=torch.from_numpy(xc[None].copy()), segmentation=torch.from_numpy(yc[None].copy()))
            for name, (method, block) in codes.items():
                dc = crop_around((deltas[name],), centre, initial)[0]
                rewind()
                coded = transform(image=torch.from_numpy((xc + dc)[None].copy()),
                                  segmentation=torch.from_numpy(yc[None].copy()))
                r, q = survival(xc, dc, yc, clean['image'][0].numpy(), coded['image'][0].numpy(),
                                clean['segmentation'][0].numpy(), method in TEXTURES)
                results[name]['retained'].append(r)
                results[name]['readable'].append(q)
    summary = {}
    pipeline = 'Stock augmentation' + (f' without {args.without}' if args.without else '')
    lines = [f'{pipeline}, {args.samples} draws, eps {args.eps} (per sample, in the labels after T)', '',
             '| code | retained: median | < 0.5 | < 0.25 | readable: median | < 0.5 | < 0.25 |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    for name, r in results.items():
        row = {}
        for metric in ('retained', 'readable'):
            v = np.asarray(r[metric], dtype=float)
            v = v[np.isfinite(v)]
            row[metric] = {'median': float(np.median(v)), 'below_0.5': float(np.mean(v < 0.5)),
                           'below_0.25': float(np.mean(v < 0.25)), 'n': int(v.size)}
        summary[name] = row
        cells = [f'{row[m]["median"]:.2f} | {row[m]["below_0.5"]:.2f} | {row[m]["below_0.25"]:.2f}'
                 for m in ('retained', 'readable')]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    print('\n'.join(lines))
    name = 'code_survival' + (f'_without_{args.without}' if args.without else '') + '.json'
    (out / name).write_text(json.dumps({
        'settings': {'without': args.without, 'eps': args.eps, 'samples': args.samples, 'cases': args.cases,
                     'seed': args.seed,
                     'patch_size': list(patch), 'initial_patch_size': [int(s) for s in initial],
                     'plans': 'nnUNetPlans_cpu'},
        'summary': summary,
        'per_sample': {n: {m: [round(v, 4) for v in r[m]] for m in r} for n, r in results.items()}}, indent=1))


if __name__ == '__main__':
    main()
