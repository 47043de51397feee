"""Purification defences: simple filters an exploiter may apply to a protected dataset before training on it.

Every defence maps a 3D array shaped (z, y, x) (SimpleITK / nnU-Net axis order, z = slice axis) to a float array
of the same shape. ``purify_dataset`` applies one to every training image of an nnU-Net raw dataset and writes a
new raw dataset with the same geometry (spacing, origin, direction), the same pixel type and the same labels.
A defence is named ``NAME`` or ``NAME:PARAM`` (e.g. ``blur``, ``blur:2``, ``quantise:6``).
"""
import json
import os
import shutil
from typing import Callable, Dict, Tuple

import numpy as np
from scipy.ndimage import gaussian_filter, median_filter
from skimage.transform import resize


def gaussian_blur(volume: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """3D Gaussian blur, ``sigma`` in voxels along every axis."""
    return gaussian_filter(np.asarray(volume, dtype=np.float64), sigma=float(sigma), mode='nearest')


def z_median(volume: np.ndarray, size: int = 3) -> np.ndarray:
    """Median over ``size`` consecutive z-slices (in-plane untouched)."""
    size = int(size)
    return median_filter(np.asarray(volume, dtype=np.float64), size=(size,) + (1,) * (np.ndim(volume) - 1),
                         mode='nearest')


def z_resample(volume: np.ndarray, factor: float = 2.0) -> np.ndarray:
    """Downsample along z by ``factor`` (linear, anti-aliased) and back to the original shape (linear)."""
    volume = np.asarray(volume, dtype=np.float64)
    n_z = volume.shape[0]
    low_z = max(1, int(round(n_z / float(factor))))
    if n_z < 2 or low_z == n_z:
        return volume.copy()
    low = resize(volume, (low_z,) + volume.shape[1:], order=1, mode='edge', anti_aliasing=True,
                 preserve_range=True)
    return resize(low, volume.shape, order=1, mode='edge', anti_aliasing=False, preserve_range=True)


def quantise(volume: np.ndarray, bits: int = 8) -> np.ndarray:
    """Uniform quantisation of the case's [min, max] intensity range into 2**bits levels."""
    volume = np.asarray(volume, dtype=np.float64)
    lo, hi = float(volume.min()), float(volume.max())
    if hi <= lo:
        return volume.copy()
    step = (hi - lo) / (2 ** int(bits) - 1)
    return lo + np.round((volume - lo) / step) * step


# name -> (function, parameter name, default, parameter type, description)
DEFENCES: Dict[str, Tuple[Callable, str, float, type, str]] = {
    'blur': (gaussian_blur, 'sigma', 1.0, float, '3D Gaussian blur'),
    'zmedian': (z_median, 'size', 3, int, 'median over z-slices'),
    'zresample': (z_resample, 'factor', 2.0, float, 'down/up resampling along z'),
    'quantise': (quantise, 'bits', 8, int, 'intensity quantisation'),
}
ALIASES = {'gaussian': 'blur', 'median': 'zmedian', 'resample': 'zresample', 'quantize': 'quantise'}


def parse_defence(spec: str) -> Tuple[str, float]:
    """'blur' -> ('blur', 1.0); 'quantise:6' -> ('quantise', 6). Raises ValueError naming the valid choices."""
    name, _, param = str(spec).strip().partition(':')
    name = ALIASES.get(name.lower(), name.lower())
    if name not in DEFENCES:
        raise ValueError(f"unknown defence {spec!r}; choose from {', '.join(DEFENCES)} (optionally NAME:PARAM)")
    _, pname, default, ptype, _ = DEFENCES[name]
    if not param:
        return name, default
    try:
        value = ptype(float(param)) if ptype is int and float(param).is_integer() else ptype(param)
    except ValueError:
        raise ValueError(f"defence {spec!r}: {pname} must be a {ptype.__name__}") from None
    if not np.isfinite(value) or value <= 0 or (name == 'zmedian' and value % 2 == 0):
        raise ValueError(f"defence {spec!r}: invalid {pname} {param!r}")
    return name, value


def defence_key(spec: str) -> str:
    """Canonical short name, also usable in file names: 'blur', 'blur-s2', 'quantise-b6'."""
    name, value = parse_defence(spec)
    _, pname, default, _, _ = DEFENCES[name]
    return name if value == default else f'{name}-{pname[0]}{value:g}'


def describe_defence(spec: str) -> str:
    """Human-readable name, e.g. '3D Gaussian blur (sigma 1)'."""
    name, value = parse_defence(spec)
    _, pname, _, _, text = DEFENCES[name]
    return f'{text} ({pname} {value:g})'


def apply_defence(volume: np.ndarray, spec: str) -> np.ndarray:
    """Apply the defence ``spec`` to a (z, y, x) array; returns float64 of the same shape."""
    name, value = parse_defence(spec)
    return DEFENCES[name][0](volume, value)


def cast_like(values: np.ndarray, dtype) -> np.ndarray:
    """Back to the original pixel type: rounded and clipped for integer types."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def purify_image_file(src: str, dst: str, spec: str) -> None:
    """Read one image with SimpleITK, apply the defence, write it with the same geometry and pixel type."""
    import SimpleITK as sitk
    image = sitk.ReadImage(src)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f'{src}: multi-component (vector) images are not supported by the defences')
    array = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(cast_like(apply_defence(array, spec), array.dtype))
    out.CopyInformation(image)
    sitk.WriteImage(out, dst, True)


def purify_dataset(src_dir: str, dst_dir: str, spec: str, verbose: bool = False) -> str:
    """Write ``dst_dir``: the raw dataset ``src_dir`` with ``spec`` applied to every imagesTr file.

    labelsTr and dataset.json are copied unchanged; the source is only read. The result appears atomically
    (written to a temporary folder next to ``dst_dir``, then renamed). Returns ``dst_dir``.
    """
    parse_defence(spec)
    ds_file = os.path.join(src_dir, 'dataset.json')
    if not os.path.isfile(ds_file):
        raise ValueError(f'{ds_file}: not found (not an nnU-Net raw dataset)')
    if os.path.exists(dst_dir):
        raise ValueError(f'{dst_dir}: already exists')
    ending = json.load(open(ds_file)).get('file_ending', '.nii.gz')
    tmp = dst_dir.rstrip(os.sep) + '.tmp'
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        os.makedirs(os.path.join(tmp, 'imagesTr'))
        shutil.copytree(os.path.join(src_dir, 'labelsTr'), os.path.join(tmp, 'labelsTr'))
        shutil.copy(ds_file, os.path.join(tmp, 'dataset.json'))
        files = sorted(f for f in os.listdir(os.path.join(src_dir, 'imagesTr')) if f.endswith(ending))
        for i, f in enumerate(files):
            if verbose:
                print(f'  {spec}: {i + 1}/{len(files)} {f}', flush=True)
            purify_image_file(os.path.join(src_dir, 'imagesTr', f), os.path.join(tmp, 'imagesTr', f), spec)
        os.replace(tmp, dst_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst_dir
