"""Which conv strengths give a target ROI PSNR on the real training cases (issue 29.4).

    python benchmarks/conv_strengths.py --seeds 0 1 2 --targets 30 25 20

Class-wise convolution (``voxshield_export --method conv --strength s``) has no eps; the issue measures it at ROI
PSNR ~30, ~25 and ~20 dB. For each dataset (its committed split's training cases, read from ``../shared/data``) and
seed (the key: its per-class kernels), one convolution per case gives the delta at s = 1 (it is linear in s);
``conv_code.strength_for_prepared`` bisects on log s for the mean ROI PSNR over the cases, the voxels computed as the
export writes them (clipped to the case's range, cast to its dtype). Per target: s, the mean / min / max ROI PSNR
over the cases and the whole-volume PSNR (delta is zero off the labels, so it is the ROI PSNR plus 10 log10 of
voxels / labelled voxels). Writes benchmarks/results/conv_strengths_<date>.json (``-o`` elsewhere).
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_voxshield.conv_code import DEFAULT_BLUR, KERNEL_SIZE, prepare_cases, roi_psnr, strength_for_prepared
from nnunetv2_voxshield.dataset_io import write_json_atomic

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / 'shared' / 'data'
DATASETS = {'hippocampus': ('Dataset004_Hippocampus', 'hippocampus_split.json'),
            'acdc': ('Dataset027_ACDC', 'acdc_split.json')}


def training_cases(name: str, limit: int = 0) -> list:
    """(images (1, *spatial) as stored, seg) of the split's training cases of dataset ``name``."""
    folder, split = DATASETS[name]
    root = Path(os.environ.get(f'VOXSHIELD_{name.upper()}', DATA / folder))
    cases = json.loads((HERE / split).read_text())['train']
    cases = cases[:limit] if limit else cases
    read = lambda p: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))  # noqa: E731
    return [(read(root / 'imagesTr' / f'{c}_0000.nii.gz')[None], read(root / 'labelsTr' / f'{c}.nii.gz'))
            for c in cases]


def measure(prepared: list, targets: list) -> dict:
    """Per target: s and the ROI / whole-volume PSNR over the cases at s."""
    out = {}
    for target in targets:
        s = strength_for_prepared(prepared, target)
        roi = np.array(roi_psnr(prepared, s))
        whole = roi + 10 * np.log10([p[4] / max(p[0].size, 1) for p in prepared])
        out[f'{target:g}'] = {'strength': round(s, 4), 'roi_psnr_mean': float(np.mean(roi)),
                              'roi_psnr_min': float(np.min(roi)), 'roi_psnr_max': float(np.max(roi)),
                              'psnr_mean': float(np.mean(whole))}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--datasets', nargs='+', default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--targets', nargs='+', type=float, default=[30.0, 25.0, 20.0])
    parser.add_argument('--limit', type=int, default=0, help='only the first N training cases (0: all)')
    parser.add_argument('-o', default=None, help='output JSON (default benchmarks/results/conv_strengths_<date>.json)')
    args = parser.parse_args(argv)
    results = {}
    for name in args.datasets:
        cases = training_cases(name, args.limit)
        per_seed = {}
        for seed in args.seeds:
            prepared = prepare_cases(cases, seed)
            per_seed[str(seed)] = {'at_strength_1': float(np.mean(roi_psnr(prepared, 1.0))),
                                   'targets': measure(prepared, args.targets)}
            print(name, seed, json.dumps(per_seed[str(seed)]), flush=True)
        first = str(args.seeds[0])
        results[name] = {'cases': len(cases), 'label_share': float(np.mean([(seg > 0).mean() for _, seg in cases])),
                         'seeds': per_seed,
                         'strength_by_target': {t: {f'seed{first}': per_seed[first]['targets'][t]['strength'],
                                                    'min': min(v['targets'][t]['strength'] for v in per_seed.values()),
                                                    'max': max(v['targets'][t]['strength'] for v in per_seed.values())}
                                                for t in per_seed[first]['targets']}}
    memory_gib = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=HERE).stdout.strip()
    report = {'provenance': {'command': 'python ' + ' '.join(shlex.quote(a) for a in ['benchmarks/conv_strengths.py']
                                                             + list(argv if argv is not None else sys.argv[1:])),
                             'commit': commit or None,
                             'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                             'machine': f'{os.cpu_count()}-core CPU, {memory_gib:.0f} GiB'},
              'method': {'name': 'conv', 'kernel': f'{KERNEL_SIZE}x{KERNEL_SIZE}x{KERNEL_SIZE} voxels',
                         'blur': DEFAULT_BLUR,
                         'psnr': 'metrics.psnr: data range max - min of the clean case; ROI = labelled voxels; mean '
                                 'over the training cases of the committed split'},
              'results': results}
    out = args.o or str(HERE / 'results' / f'conv_strengths_{datetime.date.today().isoformat()}.json')
    write_json_atomic(report, out)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
