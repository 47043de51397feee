"""Positive controls (issue 12): fixed label-coded patterns at the full budget, computed on the raw image.

Each writes +-b on the voxels of each foreground class and 0 elsewhere, b = the case's raw budget per channel; the
sign of class k is s_k = (-1)^(k-1) (+, -, +, ... for labels 1, 2, 3, ...). i, j, k index the raw array (SimpleITK
order), from its origin, so the pattern is exactly the same whatever nnU-Net's plans do to the case.

``sign`` 'plus' or 'minus' replaces s_k by +1 or -1 for every class (one polarity for the whole foreground, not a
class code); 'levels' by a different level per class, +1, -1, +1/2, -1/2, ... (with three classes 'alternate' gives
labels 1 and 3 the same +1).

``offset``: delta = s_y b.  ``checkerboard``: delta = s_y b (-1)^(i//n + j//n + k//n) (``block`` n voxels per
square, period 2n).  ``stripes``: delta = b (-1)^(i_a//n), a square wave of period 2n along ONE axis, a = (y - 1) mod
dims: the class is coded by the stripes' orientation, not by a sign or phase (a grating of period 2n keeps more of
its amplitude through blur and resampling than a 3D checkerboard of the same period, whose frequency is sqrt(3)
times higher).  ``diagonal``: delta = b (-1)^((d_y . r) // n), the same square wave across a diagonal
d_y = DIAGONALS[(y - 1) mod 4] (r = (i, j, k)): per axis its period is 2n as for ``stripes``, but its power sits
in the local-DFT bin (1, -1, 1) (block 4) where the Hippocampus anatomy has 25 times less power than in the
(1, 0, 0) of axis stripes (``benchmarks/code_strength.py --spectrum 1``); mirroring maps each diagonal to another,
so the orientation codes the class only within a sample.  ``smooth``: delta = b F_y, F_y a fixed low-pass random
field per class (white noise on a ``SMOOTH_TILE``^3 tile seeded by (seed, class), Gaussian-filtered with sigma
voxels and periodic boundaries, scaled to max |F_y| = 1) tiled from the origin.

Boundary displacement (``BoundaryShiftSource``) is not a shortcut but a bias that every augmentation keeps (spatial
transforms move image and label together; blur, noise and intensity changes leave an edge where it is). ``grow``:
each background voxel within ``width`` voxels of the foreground moves towards the intensity of its nearest foreground
voxel, delta = clip(x[nearest fg] - x, -b, b), so the visible structure extends up to ``width`` voxels beyond its label
and a victim learns to put the boundary inside the visible edge (it erodes on clean scans). ``shrink``: the same from
the inside (foreground voxels within ``width`` of the background move towards their nearest background voxel).
Distances are Euclidean: in raw voxel units with ``unit`` 'voxels' (a 1-voxel band is 10 mm thick across 10 mm
slices), in mm with ``unit`` 'mm' (``distance_transform_edt(..., sampling=spacing)``, the case's voxel spacing).

Edge reversal (``EdgeSource``, ``edge``): a fixed code on both sides of the label boundary, delta = s_y b on the
labelled voxels within ``width`` voxels of the background and -s_y b on the background voxels within ``width`` voxels
of the foreground (y: the class of the voxel, or of its nearest labelled voxel), so the edge's contrast moves by 2b
while the interior keeps its own. With ``sign`` plus it brightens the inside of every edge and darkens the outside:
on a structure darker than its surroundings (the Hippocampus, by 0.12 of the range: ``benchmarks/code_strength.py
--contrast``) it erases the edge at 2b = the contrast and inverts it beyond. No augmentation inverts contrast.
"""
from typing import Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter

from nnunetv2_voxshield.dataset_io import InputError

LABEL_CODE_METHODS = ('offset', 'checkerboard', 'stripes', 'diagonal', 'smooth')
BOUNDARY_METHODS = ('grow', 'shrink')
EDGE_METHODS = ('edge',)
CONTROL_METHODS = LABEL_CODE_METHODS + BOUNDARY_METHODS + EDGE_METHODS
DEFAULT_BLOCK = 1
DEFAULT_WIDTH = 1
WIDTH_UNITS = ('voxels', 'mm')
SIGNS = {'alternate': None, 'plus': 1.0, 'minus': -1.0, 'levels': None}
DEFAULT_SMOOTH_SIGMA = 4.0
SMOOTH_TILE = 64
DIAGONALS = ((1, -1, 1), (1, -1, -1), (1, 1, 1), (1, 1, -1))  # class y: DIAGONALS[(y - 1) % 4]


def class_sign(label: int) -> float:
    """s_k = (-1)^(k-1): +1 for label 1, -1 for label 2, +1 for label 3, ..."""
    return 1.0 if int(label) % 2 == 1 else -1.0


def class_level(label: int) -> float:
    """(-1)^(k-1) / 2^floor((k-1)/2): +1, -1, +1/2, -1/2, +1/4, ... a different level for each class (three
    classes: levels 1, -1, 1/2 and the background's 0 at least 1/2 apart)."""
    return class_sign(label) / 2.0 ** ((int(label) - 1) // 2)


def code_sign(label: int, sign: str) -> float:
    """The sign of class ``label`` under ``--sign``: s_k for 'alternate', the level for 'levels', else the one
    fixed sign."""
    if sign == 'levels':
        return class_level(label)
    return class_sign(label) if SIGNS[sign] is None else SIGNS[sign]


def checkerboard(shape: Sequence[int], block: int = DEFAULT_BLOCK) -> np.ndarray:
    """(-1)^(sum_d i_d // block) over an array of ``shape``."""
    parity = sum(np.arange(int(s)).reshape([-1 if d == a else 1 for d in range(len(shape))]) // int(block)
                 for a, s in enumerate(shape))
    return np.where(parity % 2 == 0, 1.0, -1.0)


def stripes(shape: Sequence[int], axis: int, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """(-1)^(i_axis // block) over an array of ``shape``: a square wave of period 2 x block along ``axis``."""
    return diagonal_stripes(shape, [int(a == axis) for a in range(len(shape))], block)


def diagonal_stripes(shape: Sequence[int], direction: Sequence[int], block: int = DEFAULT_BLOCK) -> np.ndarray:
    """(-1)^((d . r) // block) over an array of ``shape`` (r: voxel index, d: ``direction``, its first len(shape)
    components): a square wave of period 2 x block along s = d . r."""
    s = sum(int(d) * np.arange(int(n)).reshape([-1 if a == b else 1 for b in range(len(shape))])
            for a, (n, d) in enumerate(zip(shape, direction)))
    return np.broadcast_to(np.where((s // int(block)) % 2 == 0, 1.0, -1.0), tuple(int(n) for n in shape))


def smooth_field(label: int, seed: int = 0, sigma: float = DEFAULT_SMOOTH_SIGMA, dims: int = 3,
                 tile: int = SMOOTH_TILE) -> np.ndarray:
    """The fixed low-pass tile F_k (tile^dims, max |F_k| = 1) of class ``label``."""
    rng = np.random.default_rng([int(seed), int(label), 0x5E0])
    field = gaussian_filter(rng.standard_normal((tile,) * dims), float(sigma), mode='wrap')
    return field / np.abs(field).max()


def tiled(pattern: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``pattern`` repeated from the origin to cover ``shape``."""
    reps = [-(-int(s) // p) for s, p in zip(shape, pattern.shape)]
    return np.tile(pattern, reps)[tuple(slice(0, int(s)) for s in shape)]


class LabelCodedSource:
    """A positive control: delta (raw units) = sign and pattern of each voxel's class x b, zero on background."""
    raw_space = True  # case_protection calls delta_and_support_raw on the raw arrays

    def __init__(self, method: str, seed: int = 0, block: int = DEFAULT_BLOCK,
                 sigma: float = DEFAULT_SMOOTH_SIGMA, sign: str = 'alternate'):
        if method not in LABEL_CODE_METHODS:
            raise InputError(f'unknown control method {method!r} (choose from {", ".join(LABEL_CODE_METHODS)})')
        if int(block) < 1:
            raise InputError(f'--block must be >= 1, got {block}')
        if not float(sigma) > 0:
            raise InputError(f'--smooth-sigma must be > 0, got {sigma}')
        if sign not in SIGNS:
            raise InputError(f'--sign must be one of {", ".join(SIGNS)}, got {sign!r}')
        self.method, self.seed, self.block, self.sigma = method, int(seed), int(block), float(sigma)
        self.sign = sign
        self.roi, self.eps_bg = {'dilation': 0, 'soft_edge': 0.0}, 0.0

    def pattern(self, label: int, shape: Sequence[int]) -> np.ndarray:
        """The unit pattern (values in [-1, 1]) of class ``label`` over an array of ``shape``."""
        sign = code_sign(label, self.sign)
        if self.method == 'offset':
            return np.full(tuple(shape), sign)
        if self.method == 'checkerboard':
            return sign * checkerboard(shape, self.block)
        if self.method == 'stripes':
            return stripes(shape, (int(label) - 1) % len(shape), self.block)
        if self.method == 'diagonal':
            return diagonal_stripes(shape, DIAGONALS[(int(label) - 1) % len(DIAGONALS)], self.block)
        return sign * tiled(smooth_field(label, self.seed, self.sigma, len(shape)), shape)

    def support(self, seg: np.ndarray) -> np.ndarray:
        """Where delta may be non-zero: the labelled voxels."""
        return seg > 0

    def delta_and_support_raw(self, images: np.ndarray, seg: np.ndarray, budget: np.ndarray, case: str) -> tuple:
        """(``compute_delta_raw``, ``support``): what case_protection asks of a raw-space source."""
        return self.compute_delta_raw(images, seg, budget, case), self.support(seg)

    def compute_delta_raw(self, images: np.ndarray, seg: np.ndarray, budget: np.ndarray, case: str) -> np.ndarray:
        """delta (c, *spatial) in raw units for raw ``images`` (c, *spatial) and raw labels ``seg`` (*spatial)."""
        unit = np.zeros(seg.shape, dtype=np.float64)
        for label in np.unique(seg[seg > 0]):
            unit = np.where(seg == label, self.pattern(int(label), seg.shape), unit)
        return np.stack([unit * float(b) for b in np.asarray(budget).reshape(-1)])


def boundary_band(seg: np.ndarray, method: str, width: float, spacing=None):
    """(band, nearest): the voxels ``grow`` (background) or ``shrink`` (foreground) moves, those within ``width``
    of the other side, and for every voxel the index tuple of its nearest voxel on the other side. ``width`` is in
    voxels if ``spacing`` is None, else in mm (Euclidean distance with ``sampling=spacing``, array axis order)."""
    fg = np.asarray(seg) > 0
    inside = ~fg if method == 'grow' else fg  # the side that moves; its distance to the other side
    if not inside.any() or inside.all():
        return np.zeros(fg.shape, dtype=bool), None
    distance, nearest = distance_transform_edt(inside, sampling=spacing, return_indices=True)
    return inside & (distance <= width * (1 + 1e-9)), tuple(nearest)


def _width(width, unit: str) -> float:
    if unit not in WIDTH_UNITS:
        raise InputError(f'width unit must be one of {", ".join(WIDTH_UNITS)}, got {unit!r}')
    if unit == 'voxels' and (float(width) != int(width) or int(width) < 1):
        raise InputError(f'--width must be a whole number of voxels >= 1, got {width}')
    if not float(width) > 0:
        raise InputError(f'--width-mm must be > 0, got {width}')
    return int(width) if unit == 'voxels' else float(width)


def _band_spacing(unit: str, spacing):
    """The sampling of the band's distance transform: None (voxels) or the case's spacing (mm)."""
    if unit == 'voxels':
        return None
    if spacing is None:
        raise InputError('a width in mm needs the voxel spacing of the case')
    return tuple(float(s) for s in spacing)


class BoundaryShiftSource:
    """Boundary displacement: delta = clip(x[nearest voxel across the label boundary] - x, -b, b) on the band of
    ``width`` (``width_unit``: voxels or mm) outside (``grow``) or inside (``shrink``) the foreground, zero elsewhere."""
    raw_space = True
    spacing_aware = True  # case_protection passes the case's spacing (array axis order)

    def __init__(self, method: str, width: float = DEFAULT_WIDTH, unit: str = 'voxels'):
        if method not in BOUNDARY_METHODS:
            raise InputError(f'unknown boundary method {method!r} (choose from {", ".join(BOUNDARY_METHODS)})')
        self.method, self.width, self.width_unit = method, _width(width, unit), unit
        dilation = self.width if method == 'grow' and unit == 'voxels' else 0
        self.roi = {'dilation': dilation, 'soft_edge': 0.0}
        self.eps_bg = 0.0

    def support(self, seg: np.ndarray, spacing=None) -> np.ndarray:
        """Where delta may be non-zero: the band."""
        return boundary_band(seg, self.method, self.width, _band_spacing(self.width_unit, spacing))[0]

    def compute_delta_raw(self, images: np.ndarray, seg: np.ndarray, budget: np.ndarray, case: str,
                          spacing=None) -> np.ndarray:
        """delta (c, *spatial) in raw units for raw ``images`` (c, *spatial) and raw labels ``seg`` (*spatial)."""
        return self.delta_and_support_raw(images, seg, budget, case, spacing)[0]

    def delta_and_support_raw(self, images: np.ndarray, seg: np.ndarray, budget: np.ndarray, case: str,
                              spacing=None) -> tuple:
        """(delta, band) from one distance transform (``spacing``: the case's, array order; used for mm)."""
        band, nearest = boundary_band(seg, self.method, self.width, _band_spacing(self.width_unit, spacing))
        delta = np.zeros(np.shape(images), dtype=np.float64)
        if nearest is None:
            return delta, band
        for c, (image, b) in enumerate(zip(np.asarray(images, dtype=np.float64), np.asarray(budget).reshape(-1))):
            delta[c][band] = np.clip(image[nearest][band] - image[band], -float(b), float(b))
        return delta, band


class EdgeSource:
    """Edge reversal: delta = s_y b on the labelled voxels within ``width`` of the background, -s_y b on the
    background voxels within ``width`` of the foreground (y: their nearest labelled voxel's class), 0 elsewhere;
    s_y as ``LabelCodedSource`` (``sign``: alternate, plus or minus); ``width_unit``: voxels or mm."""
    raw_space = True
    spacing_aware = True

    def __init__(self, width: float = DEFAULT_WIDTH, sign: str = 'alternate', unit: str = 'voxels'):
        width = _width(width, unit)
        if sign not in SIGNS:
            raise InputError(f'--sign must be one of {", ".join(SIGNS)}, got {sign!r}')
        self.width, self.sign, self.width_unit = width, sign, unit
        self.roi, self.eps_bg = {'dilation': self.width if unit == 'voxels' else 0, 'soft_edge': 0.0}, 0.0

    def unit(self, seg: np.ndarray, spacing=None) -> np.ndarray:
        """The code in units of b: +-1 on the two bands, 0 elsewhere."""
        seg = np.asarray(seg)
        sampling = _band_spacing(self.width_unit, spacing)
        inner = boundary_band(seg, 'shrink', self.width, sampling)[0]
        outer, nearest = boundary_band(seg, 'grow', self.width, sampling)
        classes = np.where(outer, seg[nearest], seg) if nearest is not None else seg
        unit = np.zeros(seg.shape)
        for label in np.unique(classes[inner | outer]):
            unit[inner & (classes == label)] = code_sign(label, self.sign)
            unit[outer & (classes == label)] = -code_sign(label, self.sign)
        return unit

    def support(self, seg: np.ndarray, spacing=None) -> np.ndarray:
        """Where delta may be non-zero: the two bands."""
        return self.unit(seg, spacing) != 0

    def compute_delta_raw(self, images: np.ndarray, seg: np.ndarray, budget: np.ndarray, case: str,
                          spacing=None) -> np.ndarray:
        """delta (c, *spatial) in raw units for raw ``images`` (c, *spatial) and raw labels ``seg`` (*spatial)."""
        return self.delta_and_support_raw(images, seg, budget, case, spacing)[0]

    def delta_and_support_raw(self, images: np.ndarray, seg: np.ndarray, budget: np.ndarray, case: str,
                              spacing=None) -> tuple:
        """(delta, support) from one pair of distance transforms."""
        unit = self.unit(seg, spacing)
        return np.stack([unit * float(b) for b in np.asarray(budget).reshape(-1)]), unit != 0
