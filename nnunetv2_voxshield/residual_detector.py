"""voxshield_detect: does the perturbation's support leak the annotation?

A small 3D CNN learns to predict the label map from the high-pass residual r = x - G_sigma * x alone (in units of
the case's p0.5-p99.5 range) and is scored (foreground Dice) on held-out cases. On clean data it sees only what
anatomy leaves in the residual; a protected copy that scores clearly higher on the same held-out cases carries a
perturbation whose support marks the labels (e.g. noise placed only inside the label mask). Always compare with the
clean copy on the same split: anatomy alone can score high (clean Hippocampus ~0.84, position alone ~0.10). Inference
runs on whole volumes in memory, which suits small crops such as Hippocampus rather than full CT scans.
"""
import argparse
import os
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from nnunetv2_voxshield.budget import DEFAULT_EPS, percentile_range
from nnunetv2_voxshield.dataset_io import (InputError, check_case_headers, list_training_cases, load_dataset_json,
                                           read_image, write_json_atomic)
from nnunetv2_voxshield.metrics import dice_per_label


def highpass_residual(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """r = (x - gaussian_filter(x, sigma)) / (p99.5 - p0.5) per channel of an image shaped (c, *spatial), float32.

    ``sigma`` is in voxels (spacing is ignored). A voxel-scale perturbation of 4/255 of the range shows up as about
    4/255 (down to 4/255 / (1 + 2 x 4/255): the range is measured on the perturbed image, which is all we see).
    """
    x = np.asarray(image, dtype=np.float32)
    scale = np.maximum(percentile_range(x), 1e-8)
    lowpass = np.stack([gaussian_filter(channel, sigma, mode='nearest') for channel in x])
    return ((x - lowpass) / scale.reshape(-1, *[1] * (x.ndim - 1))).astype(np.float32)


class ResidualDetector(nn.Module):
    """Fully convolutional 3D CNN without downsampling: dilated 3x3x3 convs + InstanceNorm + LeakyReLU, 1x1x1 head.

    The input is multiplied by 1 / (4/255), so a perturbation at the default budget enters with magnitude ~1.
    """

    def __init__(self, in_channels: int, num_classes: int, features: int = 16,
                 dilations: Sequence[int] = (1, 2, 4, 2, 1)):
        super().__init__()
        layers, channels = [], in_channels
        for d in dilations:
            layers += [nn.Conv3d(channels, features, 3, padding=d, dilation=d),
                       nn.InstanceNorm3d(features, affine=True), nn.LeakyReLU(0.01, inplace=True)]
            channels = features
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv3d(features, num_classes, 1)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        """Logits (b, n_classes, *spatial) from the high-pass residual (b, c, *spatial), scaled by 1 / (4/255)."""
        return self.head(self.body(residual / DEFAULT_EPS))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, batch Dice (sums over batch and space)."""
    probs = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
    dims = (0, *range(2, logits.ndim))
    dice = (2 * (probs * onehot).sum(dims) + 1) / (probs.sum(dims) + onehot.sum(dims) + 1)
    return 1 - dice.mean()


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the last three axes up to ``size`` where they are smaller."""
    pad = [(0, 0)] * (array.ndim - 3) + [(0, max(0, size - n)) for n in array.shape[-3:]]
    return np.pad(array, pad)


def train_detector(residuals: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int,
                   iterations: int = 400, patch: int = 32, batch_size: int = 2, seed: int = 0,
                   device: str = 'cpu') -> ResidualDetector:
    """Adam (lr 1e-3), CE + soft Dice on random ``patch``^3 crops (zero-padded volumes), seeded."""
    device = torch.device(device)
    residuals = [_pad_to(r, patch) for r in residuals]
    labels = [_pad_to(l, patch).astype(np.int64) for l in labels]
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResidualDetector(residuals[0].shape[0], num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(iterations):
        xs, ys = [], []
        for i in rng.integers(len(residuals), size=batch_size):
            z, y, x = (int(rng.integers(n - patch + 1)) for n in labels[i].shape)
            xs.append(residuals[i][:, z:z + patch, y:y + patch, x:x + patch])
            ys.append(labels[i][z:z + patch, y:y + patch, x:x + patch])
        inputs, target = torch.from_numpy(np.stack(xs)).to(device), torch.from_numpy(np.stack(ys)).to(device)
        logits = model(inputs)
        loss = F.cross_entropy(logits, target) + soft_dice_loss(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict_labels(model: ResidualDetector, residual: np.ndarray, device: str = 'cpu') -> np.ndarray:
    """Whole-volume argmax label map of one residual (c, *spatial)."""
    logits = model(torch.from_numpy(np.ascontiguousarray(residual))[None].to(torch.device(device)))
    return logits[0].argmax(0).cpu().numpy().astype(np.uint8)


def foreground_dice(reference: np.ndarray, prediction: np.ndarray, labels: Sequence[int]) -> Dict[int, float]:
    """Dice per foreground label; absent in both -> 1, absent in the reference but predicted -> 0."""
    return {k: 1.0 if np.isnan(v) else v for k, v in dice_per_label(reference, prediction, list(labels)).items()}


def detector_dice(images: Dict[str, np.ndarray], labels: Dict[str, np.ndarray], train_cases: Sequence[str],
                  test_cases: Sequence[str], num_classes: Optional[int] = None, iterations: int = 400,
                  patch: int = 32, sigma: float = 1.0, batch_size: int = 2, seed: int = 0,
                  device: str = 'cpu') -> dict:
    """Train on the residuals of ``train_cases``, score the held-out ``test_cases``.

    ``images[case]`` is (c, *spatial) in raw units, ``labels[case]`` the integer label map. Returns 'mean_dice'
    (mean over test cases of the per-case mean over foreground labels 1..num_classes-1), 'dice_per_label' (mean
    over test cases), 'union_dice' (all foreground labels as one: where the support is, whichever label) and
    'cases' ({case: {'dice', 'dice_per_label', 'union_dice'}}).
    """
    if num_classes is None:
        num_classes = 1 + max(int(labels[c].max()) for c in (*train_cases, *test_cases))
    foreground = range(1, num_classes)
    model = train_detector([highpass_residual(images[c], sigma) for c in train_cases],
                           [labels[c] for c in train_cases], num_classes, iterations, patch, batch_size, seed, device)
    cases = {}
    for c in test_cases:
        prediction = predict_labels(model, highpass_residual(images[c], sigma), device)
        per_label = foreground_dice(labels[c], prediction, foreground)
        cases[c] = {'dice': float(np.mean(list(per_label.values()))), 'dice_per_label': per_label,
                    'union_dice': foreground_dice(labels[c] > 0, prediction > 0, [1])[1]}
    return {'mean_dice': float(np.mean([v['dice'] for v in cases.values()])),
            'dice_per_label': {k: float(np.mean([v['dice_per_label'][k] for v in cases.values()]))
                               for k in foreground},
            'union_dice': float(np.mean([v['union_dice'] for v in cases.values()])), 'cases': cases}


# ---------------------------------------------------------------- datasets and command line
def dataset_cases(folder: str) -> dict:
    """Validated listing of a raw dataset (names, pairing, headers): {'json', 'cases', 'num_classes'}."""
    if not os.path.isdir(folder):
        raise InputError(f'{folder}: dataset folder not found')
    dataset_json = load_dataset_json(folder)
    json_path = os.path.join(folder, 'dataset.json')
    values = list(dataset_json['labels'].values())
    if not all(isinstance(v, int) and v >= 0 for v in values) or 0 not in values:
        raise InputError(f'{json_path}: labels must be non-negative integers with background 0 '
                         f'(region-based labels are not supported)')
    cases = list_training_cases(folder, dataset_json)
    for files in cases.values():
        check_case_headers(files)
    return {'json': dataset_json, 'cases': cases, 'num_classes': max(values) + 1}


def read_case(files: dict, num_classes: int):
    """(image (c, *spatial) float32, label uint8) of one case; labels outside 0..num_classes-1 are an error."""
    image = np.stack([sitk.GetArrayFromImage(read_image(p)).astype(np.float32) for p in files['images']])
    label = sitk.GetArrayFromImage(read_image(files['label']))
    if label.min() < 0 or label.max() >= num_classes:
        raise InputError(f'{files["label"]}: label values {int(label.min())}..{int(label.max())} outside the '
                         f'0..{num_classes - 1} declared in dataset.json')
    return image, label.astype(np.uint8)


def split_cases(cases: Sequence[str], train_fraction: float, seed: int):
    """Deterministic (train, test) split of the sorted case ids; both parts non-empty."""
    cases = sorted(cases)
    order = np.random.default_rng(seed).permutation(len(cases))
    n_train = min(max(int(round(train_fraction * len(cases))), 1), len(cases) - 1)
    return sorted(cases[i] for i in order[:n_train]), sorted(cases[i] for i in order[n_train:])


def detect(folders: Sequence[str], train_fraction: float = 0.75, iterations: int = 400, sigma: float = 1.0,
           patch: int = 32, batch_size: int = 2, seed: int = 0, device: str = 'cpu', log=print) -> dict:
    """Detector Dice of each dataset on the same split of their common cases (all inputs validated first)."""
    listings = [dataset_cases(f) for f in folders]
    common = sorted(set.intersection(*[set(d['cases']) for d in listings]))
    if len(common) < 2:
        where = (os.path.join(folders[0], 'labelsTr') if len(folders) == 1
                 else ', '.join(folders) + ' (cases in common)')
        raise InputError(f'{where}: {len(common)} case(s), need at least 2 to train and test')
    train_cases, test_cases = split_cases(common, train_fraction, seed)
    results = []
    for folder, listing in zip(folders, listings):
        start = time.time()
        images, labels = {}, {}
        for c in common:
            images[c], labels[c] = read_case(listing['cases'][c], listing['num_classes'])
        scores = detector_dice(images, labels, train_cases, test_cases, listing['num_classes'], iterations, patch,
                               sigma, batch_size, seed, device)
        names = {v: k for k, v in listing['json']['labels'].items()}

        def named(per_label: dict) -> dict:
            return {names[k]: v for k, v in per_label.items()}
        results.append({'dataset': os.path.abspath(folder), 'mean_dice': scores['mean_dice'],
                        'dice_per_label': named(scores['dice_per_label']), 'union_dice': scores['union_dice'],
                        'cases': {c: {**s, 'dice_per_label': named(s['dice_per_label'])}
                                  for c, s in scores['cases'].items()},
                        'seconds': round(time.time() - start, 1)})
        log(f'{os.path.basename(os.path.normpath(folder))}: test Dice {scores["mean_dice"]:.4f} '
            f'({results[-1]["seconds"]:.0f} s)')
    return {'settings': {'train_fraction': train_fraction, 'iterations': iterations, 'sigma': sigma, 'patch': patch,
                         'batch_size': batch_size, 'seed': seed, 'device': device, 'lr': 1e-3,
                         'input': 'all channels, (x - gaussian_filter(x, sigma)) / (p99.5 - p0.5) per channel'},
            'split': {'train_cases': train_cases, 'test_cases': test_cases}, 'datasets': results}


def detect_entry(argv=None):
    """``voxshield_detect``: parse the arguments, train and score the detector, write the -o report."""
    parser = argparse.ArgumentParser(description='Residual-only detector: train a small 3D CNN to predict the labels '
                                                 'from the high-pass residual x - lowpass(x) alone and report its '
                                                 'foreground Dice on held-out cases (same split for every dataset). '
                                                 'Reads the raw dataset folders (imagesTr, labelsTr); writes only '
                                                 'the -o report JSON.')
    parser.add_argument('datasets', nargs='+', metavar='DATASET', help='nnU-Net raw dataset folder(s)')
    parser.add_argument('-o', required=True, help='report JSON file')
    parser.add_argument('--train-fraction', type=float, default=0.75,
                        help='share of the cases (common to all datasets) the detector trains on; the rest are held '
                             'out. Default: 0.75')
    parser.add_argument('--iterations', type=int, default=400, help='training iterations. Default: 400')
    parser.add_argument('--sigma', type=float, default=1.0, help='Gaussian low-pass sigma in voxels. Default: 1.0')
    parser.add_argument('--patch', type=int, default=32, help='cubic training patch edge. Default: 32')
    parser.add_argument('--batch-size', type=int, default=2, help='patches per training step. Default: 2')
    parser.add_argument('--seed', type=int, default=0, help='split, patch and initialisation seed. Default: 0')
    parser.add_argument('-device', default='cpu', help='torch device (cpu, cuda, cuda:1, mps). Default: cpu')
    args = parser.parse_args(argv)
    if not 0 < args.train_fraction < 1:
        parser.error(f'--train-fraction must be in (0, 1), got {args.train_fraction}')
    if args.iterations < 1 or args.patch < 1 or args.batch_size < 1 or args.sigma <= 0:
        parser.error('--iterations, --patch and --batch-size must be >= 1 and --sigma > 0')
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f'-device: unknown torch device {args.device!r}')
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('-device: CUDA is not available on this machine')
    try:
        output = os.path.abspath(args.o)
        if not os.path.isdir(os.path.dirname(output)):
            raise InputError(f'{args.o}: folder of the report does not exist')
        for folder in args.datasets:
            if output.startswith(os.path.abspath(folder) + os.sep):
                raise InputError(f'{args.o}: report would be written inside the input dataset {folder}')
        report = detect(args.datasets, args.train_fraction, args.iterations, args.sigma, args.patch,
                        args.batch_size, args.seed, args.device, log=lambda m: print(m, file=sys.stderr, flush=True))
    except InputError as e:
        print(f'voxshield_detect: error: {e}', file=sys.stderr)
        sys.exit(1)
    write_json_atomic(report, output)
    print(f'{len(report["split"]["train_cases"])} train / {len(report["split"]["test_cases"])} test cases, '
          f'{args.iterations} iterations, sigma {args.sigma}')
    print(f'{"dataset":<40} {"test Dice":>9} {"union Dice":>10}  per label')
    for r in report['datasets']:
        per_label = ', '.join(f'{k} {v:.3f}' for k, v in r['dice_per_label'].items())
        print(f'{os.path.basename(r["dataset"]):<40} {r["mean_dice"]:>9.4f} {r["union_dice"]:>10.4f}  {per_label}  '
              f'({r["seconds"]:.0f} s)')
    print(f'report: {args.o}')


if __name__ == '__main__':
    detect_entry()
