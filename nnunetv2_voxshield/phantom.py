"""A small, deterministic synthetic 3D segmentation dataset in nnU-Net raw format (for tests, demos and CI).

Each case shows two labelled structures inside a textured "tissue" volume: a tube (label 1) whose centre and
radius drift smoothly along z, and an ellipsoidal nodule (label 2) attached to its side, plus an unlabelled bright
vessel as a distractor. Images get partial-volume edges, a smooth multiplicative bias field, smoothed texture and
Rician noise. Most cases are float32, about one in four is uint8 (like the real Hippocampus data), about one in
three has 1.5 mm slices. Case ``i`` depends only on (seed, i): the same seed gives byte-identical files.

``ct=True`` writes an abdominal CT phantom instead: int16 Hounsfield units, by default 512 x 512 x 120 voxels at
0.8 x 0.8 x 2.5 mm (``shape`` sets the size, in SimpleITK's (z, y, x) array order), air around a body of fat and
soft tissue with liver (1), spleen (2) and kidneys (3) labelled and an unlabelled spine, plus noise. Its channel is
'CT', so nnU-Net's planner picks CTNormalization.

``cardiac=True`` writes a small cine-MRI-like phantom shaped as ACDC: three classes (RV 1, MYO 2, LV 3) on
1.5 x 1.5 x 10 mm voxels (``CARDIAC_SPACING``; ``shape`` (z, y, x), default ``CARDIAC_SHAPE``), cases cycling through
float32, uint8 and int16 images; ``ignore=True`` adds nnU-Net's ignore label (4, 'ignore' in dataset.json) on the
last slice and on a background box, as unannotated regions.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

LABELS = {'background': 0, 'tube': 1, 'nodule': 2}
CT_LABELS = {'background': 0, 'liver': 1, 'spleen': 2, 'kidney': 3}
CT_SHAPE = (120, 512, 512)          # (z, y, x)
CT_SPACING = (0.8, 0.8, 2.5)        # (x, y, z) mm, as SimpleITK
CARDIAC_LABELS = {'background': 0, 'RV': 1, 'MYO': 2, 'LV': 3}
CARDIAC_IGNORE = 4
CARDIAC_SHAPE = (8, 40, 40)         # (z, y, x)
CARDIAC_SPACING = (1.5, 1.5, 10.0)  # (x, y, z) mm, as ACDC
CARDIAC_DTYPES = ('float32', 'uint8', 'int16')


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    field = gaussian_filter(rng.standard_normal(shape), sigma, mode='wrap')
    return field / max(float(field.std()), 1e-8)


def _partial_volume(signed_distance: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Tissue fraction in [0, 1] from a signed distance in mm (negative inside), linear over ``width`` mm."""
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0)


def synthesize_case(rng: np.random.Generator, uint8: bool, spacing_z: float) -> Tuple[np.ndarray, np.ndarray, tuple]:
    """One case: image (z, y, x), labels (z, y, x) uint8 and the spacing as (x, y, z) mm for SimpleITK."""
    spacing = np.array([spacing_z, 1.0, 1.0])  # (z, y, x)
    fov = np.array([rng.uniform(32, 40), rng.uniform(32, 40), rng.uniform(28, 36)])  # mm
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing))
    z, y, x = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing='ij')
    length_z = shape[0] * spacing[0]
    t = z / length_z  # 0..1 along z

    # tube (label 1): centre and radius drift smoothly with z
    centre = fov[1:] / 2 + rng.uniform(-3, 3, 2)
    amp, freq, phase = rng.uniform(2, 5, 2), rng.uniform(0.5, 1.2), rng.uniform(0, 2 * np.pi, 2)
    cy = centre[0] + amp[0] * np.sin(2 * np.pi * freq * t + phase[0])
    cx = centre[1] + amp[1] * np.cos(2 * np.pi * freq * t + phase[1])
    radius = rng.uniform(3.5, 5) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 1) * t + rng.uniform(0, 6)))
    d_tube = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) - radius

    # nodule (label 2): ellipsoid touching the tube at a random height, on a random side
    zc = rng.uniform(0.35, 0.65) * length_z
    tc = zc / length_z
    axes = rng.uniform([5, 3.5, 3.5], [9, 5.5, 5.5])
    r_here = float(np.interp(tc, t[:, 0, 0], radius[:, 0, 0]))
    cy_here = centre[0] + amp[0] * np.sin(2 * np.pi * freq * tc + phase[0])
    cx_here = centre[1] + amp[1] * np.cos(2 * np.pi * freq * tc + phase[1])
    offset = r_here + 0.7 * axes[1]
    for angle in rng.uniform(0, 2 * np.pi, 16):  # first side that keeps the nodule inside the field of view
        ny, nx = cy_here + offset * np.sin(angle), cx_here + offset * np.cos(angle)
        if axes[1] + 1 < ny < fov[1] - axes[1] - 1 and axes[2] + 1 < nx < fov[2] - axes[2] - 1:
            break
    scaled = np.sqrt(((z - zc) / axes[0]) ** 2 + ((y - ny) / axes[1]) ** 2 + ((x - nx) / axes[2]) ** 2)
    d_nodule = (scaled - 1) * axes.min()

    # unlabelled distractor: a thin bright vessel crossing the volume obliquely
    vy0, vx0 = rng.uniform(0.15, 0.3) * fov[1], rng.uniform(0.7, 0.85) * fov[2]
    vy = vy0 + rng.uniform(-6, 6) * t
    d_vessel = np.sqrt((y - vy) ** 2 + (x - vx0) ** 2) - rng.uniform(1.2, 2.0)

    labels = np.zeros(shape, dtype=np.uint8)
    labels[d_tube < 0] = 1
    labels[d_nodule < 0] = 2

    # intensities: tissue texture + partial-volume structures, PSF blur, bias field, Rician noise
    f_tube, f_nodule, f_vessel = _partial_volume(d_tube), _partial_volume(d_nodule), _partial_volume(d_vessel)
    f_tube = f_tube * (1 - f_nodule)
    f_vessel = f_vessel * (1 - f_tube - f_nodule)
    tissue = 300 * rng.uniform(0.9, 1.1) + 25 * _smooth_noise(rng, shape, 2.5)
    image = (tissue * (1 - f_tube - f_nodule) + f_tube * 560 * rng.uniform(0.9, 1.1)
             + f_nodule * (150 + 15 * _smooth_noise(rng, shape, 1.5)) * rng.uniform(0.9, 1.1))
    image = image * (1 - f_vessel) + f_vessel * 700
    image = gaussian_filter(image, 0.6 / spacing * spacing.min(), mode='nearest')
    bias = np.exp(0.12 * _smooth_noise(rng, shape, 10) + rng.uniform(-0.15, 0.15) * (t - 0.5))
    sigma = 18.0
    image = np.sqrt((image * bias + sigma * rng.standard_normal(shape)) ** 2 + (sigma * rng.standard_normal(shape)) ** 2)
    if uint8:
        image = np.clip(np.round(image * 230 / np.percentile(image, 99.9)), 0, 255).astype(np.uint8)
    else:
        image = (image * rng.uniform(0.8, 1.5)).astype(np.float32)
    return image, labels, (1.0, 1.0, float(spacing_z))


def synthesize_ct_case(rng: np.random.Generator, shape: Sequence[int] = CT_SHAPE,
                       spacing: Sequence[float] = CT_SPACING) -> Tuple[np.ndarray, np.ndarray, tuple]:
    """One CT case: int16 HU image (z, y, x), labels (z, y, x) uint8 and the spacing (x, y, z) for SimpleITK.

    Sizes are fractions of the field of view, so a small ``shape`` gives the same anatomy at a coarser scale."""
    shape = tuple(int(n) for n in shape)
    fov = np.array(shape) * np.array(spacing[::-1])  # (z, y, x) mm
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    z = ((z + 0.5) / shape[0]).astype(np.float32)  # 0..1 along each axis
    y = ((y + 0.5) / shape[1]).astype(np.float32)
    x = ((x + 0.5) / shape[2]).astype(np.float32)

    def ellipsoid(centre, radii) -> np.ndarray:  # centre, radii as fractions of the field of view
        return (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                + ((x - centre[2]) / radii[2]) ** 2) < 1

    jitter = lambda *v: np.asarray(v, dtype=np.float32) * rng.uniform(0.9, 1.1, len(v))  # noqa: E731
    body_r = jitter(0.36, 0.44)  # (y, x) half axes of the elliptic body cross-section
    body_d = ((y - 0.5) / body_r[0]) ** 2 + ((x - 0.5) / body_r[1]) ** 2
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[np.broadcast_to(body_d < 1, shape)] = -100.0  # subcutaneous fat
    image[np.broadcast_to(body_d < 0.8, shape)] = 40.0   # soft tissue
    labels = np.zeros(shape, dtype=np.uint8)
    organs = [(1, jitter(0.55, 0.45, 0.30), jitter(0.35, 0.20, 0.16), 60.0),   # liver: patient's right
              (2, jitter(0.45, 0.45, 0.72), jitter(0.20, 0.09, 0.07), 45.0),   # spleen
              (3, jitter(0.50, 0.66, 0.38), jitter(0.16, 0.07, 0.05), 150.0),  # kidneys (contrast)
              (3, jitter(0.50, 0.66, 0.62), jitter(0.16, 0.07, 0.05), 150.0)]
    for label, centre, radii, hu in organs:
        inside = ellipsoid(centre, radii)
        labels[inside] = label
        image[inside] = hu + rng.normal(0, 5)
    spine = np.broadcast_to(((y - 0.72) / 0.05) ** 2 + ((x - 0.5) / 0.05) ** 2 < 1, shape)  # unlabelled bone
    image[spine] = 500.0
    image += rng.normal(0, 12, shape).astype(np.float32)  # quantum noise
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return image, labels, tuple(float(s) for s in spacing)


def synthesize_cardiac_case(rng: np.random.Generator, shape: Sequence[int] = CARDIAC_SHAPE,
                            spacing: Sequence[float] = CARDIAC_SPACING, dtype: str = 'float32',
                            ignore: bool = False) -> Tuple[np.ndarray, np.ndarray, tuple]:
    """One ACDC-like case: image (z, y, x) of ``dtype``, labels (LV 3 inside MYO 2, RV 1 beside them; 4 = ignore
    on the last slice and a background box if ``ignore``) and the spacing (x, y, z) for SimpleITK."""
    shape = tuple(int(n) for n in shape)
    sz, sy, sx = spacing[2], spacing[1], spacing[0]
    z, y, x = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, (sz, sy, sx))], indexing='ij')
    fov_y, fov_x = shape[1] * sy, shape[2] * sx
    taper = 1 - 0.5 * (z / (shape[0] * sz))  # the heart narrows towards the apex
    cy, cx = fov_y / 2 + rng.uniform(-2, 2), fov_x / 2 + rng.uniform(-2, 2)
    r_lv = rng.uniform(5, 7) * taper
    r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[r < r_lv + rng.uniform(3, 4)] = 2
    labels[r < r_lv] = 3
    rv = np.sqrt(((y - cy) / 1.2) ** 2 + (x - cx - (r_lv + 8)) ** 2) < rng.uniform(5, 6) * taper
    labels[rv & (labels == 0)] = 1
    image = 200 + 20 * _smooth_noise(rng, shape, 1.5)
    image = np.where(labels == 3, 420, np.where(labels == 2, 120, np.where(labels == 1, 380, image)))
    image = gaussian_filter(image.astype(np.float64), 0.5) + 10 * rng.standard_normal(shape)
    if ignore:
        labels[-1] = CARDIAC_IGNORE
        labels[:, :4, :4] = CARDIAC_IGNORE
    if dtype == 'uint8':
        image = np.clip(np.rint(image * 200 / np.percentile(image, 99.9)), 0, 255).astype(np.uint8)
    elif dtype == 'int16':
        image = np.clip(np.rint(image * 3 - 300), -1024, 3071).astype(np.int16)
    else:
        image = image.astype(np.float32)
    return image, labels, tuple(float(s) for s in spacing)


def _write_nifti(array: np.ndarray, spacing: tuple, origin: tuple, path: str) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, path, useCompression=True)


def _write_case(folder: str, images: str, labels: str, identifier: str, rng: np.random.Generator, index: int,
                ct_shape: Optional[Sequence[int]] = None, cardiac: Optional[dict] = None) -> str:
    if cardiac is not None:
        image, seg, spacing = synthesize_cardiac_case(rng, cardiac['shape'], CARDIAC_SPACING,
                                                      CARDIAC_DTYPES[index % len(CARDIAC_DTYPES)], cardiac['ignore'])
    elif ct_shape is not None:
        image, seg, spacing = synthesize_ct_case(rng, ct_shape)
    else:
        image, seg, spacing = synthesize_case(rng, index % 4 == 1, 1.5 if index % 3 == 2 else 1.0)
    origin = tuple(float(o) for o in np.round(rng.uniform(-50, 50, 3), 2))
    _write_nifti(image, spacing, origin, os.path.join(folder, images, f'{identifier}_0000.nii.gz'))
    _write_nifti(seg, spacing, origin, os.path.join(folder, labels, f'{identifier}.nii.gz'))
    return identifier


def write_phantom_dataset(dataset_id: int = 990, name: str = 'VoxShieldPhantom', n_cases: int = 8, n_test: int = 0,
                          seed: int = 0, raw_root: Optional[str] = None, overwrite: bool = False, ct: bool = False,
                          shape: Optional[Sequence[int]] = None, cardiac: bool = False, ignore: bool = False) -> str:
    """Write ``<raw_root>/Dataset<id>_<name>`` (default raw_root: $nnUNet_raw) atomically; return its path.

    ``ct``: the CT phantom (``synthesize_ct_case``) with ``shape`` (z, y, x; default ``CT_SHAPE``); ``cardiac``: the
    ACDC-like phantom (``synthesize_cardiac_case``, ``shape`` default ``CARDIAC_SHAPE``), ``ignore``: with nnU-Net's
    ignore label."""
    raw_root = raw_root or os.environ.get('nnUNet_raw')
    if not raw_root:
        raise ValueError('nnUNet_raw is not set; set it or pass raw_root')
    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ValueError(f'dataset id must be an integer in 1..999, got {dataset_id!r}')
    if not name or not all(c.isalnum() or c in '-_' for c in name):
        raise ValueError(f'dataset name must be letters, digits, - or _, got {name!r}')
    if n_cases < 1 or n_test < 0:
        raise ValueError(f'need n_cases >= 1 and n_test >= 0, got {n_cases} and {n_test}')
    if ct and cardiac:
        raise ValueError('choose one of the CT (--ct) and the cardiac (--cardiac) phantom')
    if ignore and not cardiac:
        raise ValueError('the ignore label applies to the cardiac phantom only (cardiac=True / --cardiac)')
    if shape is not None and not (ct or cardiac):
        raise ValueError('shape applies to the CT phantom only (ct=True / --ct) or the cardiac one (--cardiac)')
    cardiac_options = {'shape': tuple(int(n) for n in (shape or CARDIAC_SHAPE)), 'ignore': bool(ignore)} \
        if cardiac else None
    if cardiac and (len(cardiac_options['shape']) != 3 or min(cardiac_options['shape']) < 4):
        raise ValueError(f'cardiac shape must be 3 sizes (z, y, x) of at least 4 voxels, got {shape!r}')
    ct_shape = tuple(int(n) for n in (shape or CT_SHAPE)) if ct else None
    if ct and (len(ct_shape) != 3 or min(ct_shape) < 8):
        raise ValueError(f'CT shape must be 3 sizes (z, y, x) of at least 8 voxels, got {shape!r}')
    dataset_name = f'Dataset{dataset_id:03d}_{name}'
    target = os.path.join(raw_root, dataset_name)
    os.makedirs(raw_root, exist_ok=True)
    clashes = [d for d in os.listdir(raw_root) if d.startswith(f'Dataset{dataset_id:03d}_') and d != dataset_name
               and not d.startswith('.')]
    if clashes:
        raise FileExistsError(f'{os.path.join(raw_root, clashes[0])}: another dataset already uses id {dataset_id}')
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f'{target}: already exists (use overwrite=True / --overwrite to replace it)')

    tmp = tempfile.mkdtemp(prefix=f'.tmp_{dataset_name}_', dir=raw_root)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; the dataset folder gets the usual permissions
    try:
        for sub in ('imagesTr', 'labelsTr') + (('imagesTs', 'labelsTs') if n_test else ()):
            os.makedirs(os.path.join(tmp, sub))
        for i in range(n_cases):
            _write_case(tmp, 'imagesTr', 'labelsTr', f'phantom_{i:03d}', np.random.default_rng([seed, 0, i]), i,
                        ct_shape, cardiac_options)
        for j in range(n_test):
            _write_case(tmp, 'imagesTs', 'labelsTs', f'phantomts_{j:03d}', np.random.default_rng([seed, 1, j]), j,
                        ct_shape, cardiac_options)
        dataset_json = {
            'name': name,
            'description': 'Synthetic phantom: a tube drifting along z (label 1) and an attached nodule (label 2) '
                           'in textured tissue with an unlabelled vessel, bias field and Rician noise; '
                           'mixed float32/uint8 images and 1.0/1.5 mm slices.',
            'licence': 'CC0-1.0 (synthetic, generated by nnunetv2-voxshield)',
            'reference': f'nnunetv2_voxshield.phantom.write_phantom_dataset(seed={seed})',
            'channel_names': {'0': 'MRI'},
            'labels': LABELS,
            'numTraining': n_cases,
            'file_ending': '.nii.gz',
        }
        if ct:
            dataset_json.update({
                'description': f'Synthetic abdominal CT phantom (int16 HU, {ct_shape[2]} x {ct_shape[1]} x '
                               f'{ct_shape[0]} voxels at {" x ".join(map(str, CT_SPACING))} mm): liver, spleen and '
                               f'kidneys in fat and soft tissue, an unlabelled spine, noise.',
                'reference': f'nnunetv2_voxshield.phantom.write_phantom_dataset(seed={seed}, ct=True, '
                             f'shape={list(ct_shape)})',
                'channel_names': {'0': 'CT'}, 'labels': CT_LABELS})
        if cardiac:
            shape_zyx = cardiac_options['shape']
            dataset_json.update({
                'description': f'Synthetic cine-MRI-like phantom (ACDC-shaped: {shape_zyx[2]} x {shape_zyx[1]} x '
                               f'{shape_zyx[0]} voxels at {" x ".join(map(str, CARDIAC_SPACING))} mm): RV, MYO and '
                               f'LV; float32, uint8 and int16 cases' + ('; ignore label 4 on unannotated voxels'
                                                                        if ignore else '') + '.',
                'reference': f'nnunetv2_voxshield.phantom.write_phantom_dataset(seed={seed}, cardiac=True, '
                             f'shape={list(shape_zyx)}, ignore={bool(ignore)})',
                'labels': dict(CARDIAC_LABELS, **({'ignore': CARDIAC_IGNORE} if ignore else {}))})
        with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
            json.dump(dataset_json, f, indent=4)
        if os.path.exists(target):  # overwrite: move the old folder aside first, delete it after the swap
            old = tempfile.mkdtemp(prefix=f'.old_{dataset_name}_', dir=raw_root)
            os.replace(target, os.path.join(old, dataset_name))
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def phantom_entry():
    """``voxshield_phantom``: parse the arguments and write the phantom dataset to $nnUNet_raw."""
    parser = argparse.ArgumentParser(description='Write the synthetic VoxShield phantom dataset (nnU-Net raw format) '
                                                 'to $nnUNet_raw/DatasetXXX_<--name> (imagesTr, labelsTr, '
                                                 'dataset.json; imagesTs/labelsTs with --test). Reads nothing.')
    parser.add_argument('-d', type=int, default=990, help='dataset id. Default: 990')
    parser.add_argument('--name', type=str, default='VoxShieldPhantom', help='dataset name. Default: VoxShieldPhantom')
    parser.add_argument('-n', type=int, default=8, help='number of training cases. Default: 8')
    parser.add_argument('--test', type=int, default=0, help='number of held-out cases (imagesTs/labelsTs). Default: 0')
    parser.add_argument('--seed', type=int, default=0, help='random seed. Default: 0')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing dataset folder')
    parser.add_argument('--ct', action='store_true',
                        help='abdominal CT phantom: int16 HU, channel CT (nnU-Net picks CTNormalization), '
                             '0.8 x 0.8 x 2.5 mm voxels, labels liver/spleen/kidney')
    parser.add_argument('--shape', type=int, nargs=3, default=None, metavar=('Z', 'Y', 'X'),
                        help=f'--ct / --cardiac: voxels per axis (z y x). Default: {" ".join(map(str, CT_SHAPE))} (CT), '
                             f'{" ".join(map(str, CARDIAC_SHAPE))} (cardiac)')
    parser.add_argument('--cardiac', action='store_true',
                        help='ACDC-like phantom: RV/MYO/LV on 1.5 x 1.5 x 10 mm voxels, float32/uint8/int16 cases')
    parser.add_argument('--ignore', action='store_true', help='--cardiac: add nnU-Net\'s ignore label (4)')
    args = parser.parse_args()
    try:
        path = write_phantom_dataset(args.d, args.name, args.n, args.test, args.seed, overwrite=args.overwrite,
                                     ct=args.ct, shape=args.shape, cardiac=args.cardiac, ignore=args.ignore)
    except (ValueError, OSError) as e:
        sys.exit(f'voxshield_phantom: error: {e}')
    print(f'wrote {args.n} training and {args.test} test cases to {path}')


if __name__ == '__main__':
    phantom_entry()
