"""Class-wise convolution (``--method conv``, issue 29): CUDA (Sadasivan et al. 2023, arXiv 2303.04278) on labels.

Inside label c the image becomes x' = (1 - s) x + s (k_c * x): its convolution with a random kernel k_c of class c,
mixed with the identity by the strength s; the background is unchanged. k_c is drawn as CUDA's
``get_filter_unlearnable`` draws its per-class filters: every weight uniform in [0, blur] (CUDA's "blur parameter",
0.3 by default), one weight at a random position set to 1 (its "center parameter"), the same kernel for every
channel; here it is also divided by its sum (CUDA instead divides each convolved image by its maximum), so k_c * x
is a weighted mean of the 3 x 3 x 3 neighbourhood and keeps the image's range. The kernels are the key: they depend
only on (seed, class). The kernel is 3 voxels wide along every axis of the raw array (in voxels, not mm: on ACDC's
1.5625 x 1.5625 x 10 mm voxels it spans 4.7 mm in-plane and 30 mm across slices); the volume's border is
replicated (``mode='nearest'``).

s may exceed 1 (up to ``MAX_STRENGTH``): x' = ((1 - s) delta_0 + s k_c) * x is still one sum-1 kernel per class,
its centre weight 1 - s + s k_c(0) turning negative as s grows (a sharpening along k_c's pattern); the export clips
x' to the channel's [min, max]. A 3 x 3 x 3 sum-1 kernel moves the ROI little: at s = 1 the mean ROI PSNR of the
training cases is 26 dB (ACDC) and 28 dB (Hippocampus), so ~25 and ~20 dB need s > 1
(``benchmarks/results/conv_strengths_2026-12-07.json``: s = 0.63 / 1.12 / 1.99 on ACDC and 0.79 / 1.40 / 2.49 on
Hippocampus for 30 / 25 / 20 dB, seed 0).

Budget: not an eps. Because k_c is non-negative with sum 1, |x' - x| <= s (max - min) per channel, the bound the
export clamps to and ``voxshield_verify --strength s`` checks (for s >= 1 it says no more than the range clip); the
distortion is reported as PSNR over the volume and inside the labels. delta scales with s, so PSNR(s) =
PSNR(1) - 20 log10 s until the range clip and the file's dtype bend it: ``strength_for_psnr`` bisects on the values
the export writes.
"""
import zlib
from typing import Iterable, Tuple

import numpy as np
from scipy.ndimage import convolve

from nnunetv2_voxshield.dataset_io import InputError

METHOD = 'conv'
KERNEL_SIZE = 3
DEFAULT_BLUR = 0.3  # CUDA's --blur-parameter default
MAX_STRENGTH = 4.0


def class_kernel(label: int, seed: int = 0, dims: int = 3, size: int = KERNEL_SIZE,
                 blur: float = DEFAULT_BLUR) -> np.ndarray:
    """k_c of class ``label``: weights U(0, blur), one at a random position set to 1, divided by the sum."""
    rng = np.random.default_rng([int(seed), int(label), zlib.crc32(METHOD.encode())])
    kernel = rng.uniform(0.0, float(blur), size=(int(size),) * int(dims))
    kernel[tuple(rng.integers(int(size), size=int(dims)))] = 1.0
    return kernel / kernel.sum()


def check_strength(strength) -> float:
    """s as a float in (0, ``MAX_STRENGTH``]; InputError otherwise."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        value = float('nan')
    if not 0 < value <= MAX_STRENGTH:
        raise InputError(f'--strength must be in (0, {MAX_STRENGTH:g}] (the weight of the convolved image), got '
                         f'{strength!r}')
    return value


def conv_bound(images: np.ndarray, strength: float) -> np.ndarray:
    """The per-channel bound of |x' - x|: s (max - min) of each channel of ``images`` (c, *spatial)."""
    flat = np.asarray(images).reshape(np.shape(images)[0], -1)
    return float(strength) * (flat.max(axis=1).astype(np.float64) - flat.min(axis=1).astype(np.float64))


class ConvSource:
    """delta (raw units) = s (k_y * x - x) on the labelled voxels (y: the voxel's class), zero on background."""
    method = METHOD
    raw_space = True  # case_protection calls delta_and_support_raw on the raw arrays

    def __init__(self, strength, seed: int = 0, blur: float = DEFAULT_BLUR):
        self.strength, self.seed = check_strength(strength), int(seed)
        if not float(blur) > 0:
            raise InputError(f'conv: blur must be > 0, got {blur}')
        self.blur = float(blur)
        self.roi, self.eps_bg = {'dilation': 0, 'soft_edge': 0.0}, 0.0

    def kernel(self, label: int, dims: int = 3) -> np.ndarray:
        """k_c: the random kernel of class ``label`` (KERNEL_SIZE voxels per axis), drawn from this source's seed."""
        return class_kernel(label, self.seed, dims, KERNEL_SIZE, self.blur)

    def raw_budget(self, images: np.ndarray) -> np.ndarray:
        """The bound the export clamps to (instead of an eps budget): ``conv_bound``."""
        return conv_bound(images, self.strength)

    def support(self, seg: np.ndarray) -> np.ndarray:
        """Where delta may be non-zero: the labelled voxels."""
        return np.asarray(seg) > 0

    def compute_delta_raw(self, images: np.ndarray, seg: np.ndarray, budget=None, case: str = '') -> np.ndarray:
        """delta (c, *spatial; float64) for raw ``images`` (c, *spatial) and raw labels ``seg`` (*spatial)."""
        images, seg = np.asarray(images, dtype=np.float64), np.asarray(seg)
        delta = np.zeros(images.shape)
        for label in np.unique(seg[seg > 0]):
            inside = seg == label
            k = self.kernel(int(label), seg.ndim)
            for c, image in enumerate(images):
                delta[c][inside] = self.strength * (convolve(image, k, mode='nearest')[inside] - image[inside])
        return delta

    def delta_and_support_raw(self, images: np.ndarray, seg: np.ndarray, budget: np.ndarray, case: str) -> tuple:
        """(``compute_delta_raw``, ``support``): what case_protection asks of a raw-space source."""
        return self.compute_delta_raw(images, seg, budget, case), self.support(seg)


def prepare_cases(cases: Iterable[Tuple[np.ndarray, np.ndarray]], seed: int = 0,
                  blur: float = DEFAULT_BLUR) -> list:
    """Per case and channel: (clean voxels inside the labels as stored, their delta at s = 1, min, max of the
    channel, its number of voxels). delta is linear in s, so one convolution per case serves every strength."""
    unit, out = ConvSource(1.0, seed, blur), []
    for images, seg in cases:
        images, inside = np.asarray(images), np.asarray(seg) > 0
        delta = unit.compute_delta_raw(images, seg)
        out += [(image[inside], d[inside], float(image.min()), float(image.max()), image.size)
                for image, d in zip(images, delta)]
    return out


def roi_psnr(prepared: list, strength: float) -> list:
    """ROI PSNR (dB, as ``metrics.psnr`` inside the labels: data range max - min of the clean channel) of each entry
    of ``prepare_cases`` at ``strength``, the voxels as the export writes them (clipped to the channel's range, cast
    to its dtype within ``conv_bound``)."""
    from nnunetv2_voxshield.case_protection import cast_within_budget
    out = []
    for clean, unit, low, high, _ in prepared:
        target = np.clip(clean.astype(np.float64) + float(strength) * unit, low, high)
        written = cast_within_budget(clean, target, float(strength) * (high - low))
        mse = float(np.mean((written.astype(np.float64) - clean) ** 2)) if clean.size else float('nan')
        out.append(float('inf') if mse == 0 else 10 * np.log10(max(high - low, 1e-8) ** 2 / mse))
    return out


def strength_for_psnr(cases: Iterable[Tuple[np.ndarray, np.ndarray]], target_db: float, seed: int = 0,
                      blur: float = DEFAULT_BLUR, tolerance_db: float = 0.01) -> float:
    """s in (0, ``MAX_STRENGTH``] whose mean ROI PSNR over ``cases`` ((images, seg) pairs) is ``target_db``, by
    bisection on log s (the mean falls by 20 dB per decade of s while the copy stays inside its range);
    InputError when even ``MAX_STRENGTH`` stays above the target."""
    return strength_for_prepared(prepare_cases(cases, seed, blur), target_db, tolerance_db)


def strength_for_prepared(prepared: list, target_db: float, tolerance_db: float = 0.01) -> float:
    """``strength_for_psnr`` on the output of ``prepare_cases``."""
    mean = lambda s: float(np.mean([v for v in roi_psnr(prepared, s) if np.isfinite(v)] or [np.inf]))  # noqa: E731
    low, high = np.log(1e-4), np.log(MAX_STRENGTH)
    if mean(MAX_STRENGTH) > target_db:
        raise InputError(f'strength_for_psnr: even s = {MAX_STRENGTH} gives a mean ROI PSNR of '
                         f'{mean(MAX_STRENGTH):.2f} dB, above the target {target_db} dB')
    for _ in range(60):
        mid = (low + high) / 2
        value = mean(float(np.exp(mid)))
        if abs(value - target_db) < tolerance_db:
            break
        low, high = (mid, high) if value > target_db else (low, mid)
    return float(np.exp(mid))
