"""Reading and validating nnU-Net raw datasets, and writing files atomically (temp path + ``os.replace``).

Everything a user can get wrong raises ``InputError`` with one readable line naming the file and the problem.
"""
import hashlib
import json
import os
import re
import shutil
import sys
from typing import Dict, List, Optional

import nibabel
import numpy as np
import SimpleITK as sitk
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

SUPPORTED_FILE_ENDINGS = tuple(SimpleITKIO.supported_file_endings)
GEOMETRY_TOLERANCE = 1e-4  # same order as nnU-Net's dataset integrity check
TEMP_PREFIX = '.partial-'


class InputError(Exception):
    """A problem with the user's input; the message is one line naming the file and the problem."""


def env_folder(name: str) -> str:
    """``$nnUNet_raw`` etc., read at call time (nnunetv2.paths reads them once at import)."""
    folder = os.environ.get(name)
    if not folder:
        raise InputError(f'environment variable {name} is not set')
    if not os.path.isdir(folder):
        raise InputError(f'{folder}: folder of {name} does not exist')
    return folder


def dataset_id_and_name(dataset_folder: str):
    """'/x/Dataset004_Hippocampus' -> (4, 'Hippocampus'); InputError for any other folder name."""
    base = os.path.basename(os.path.normpath(dataset_folder))
    match = re.fullmatch(r'Dataset(\d{3})_(.+)', base)
    if match is None:
        raise InputError(f'{dataset_folder}: not an nnU-Net dataset folder name (DatasetXXX_Name)')
    return int(match.group(1)), match.group(2)


def find_dataset_folder(raw_root: str, dataset: str) -> str:
    """Like nnU-Net's ``maybe_convert_to_dataset_name``: '4', '004' or 'Dataset004_Hippocampus' -> its folder."""
    if dataset.startswith('Dataset'):
        folder = os.path.join(raw_root, dataset)
        if not os.path.isdir(folder):
            raise InputError(f'{folder}: dataset folder not found')
        return folder
    try:
        dataset_id = int(dataset)
    except ValueError:
        raise InputError(f'dataset must be an id (e.g. 4) or a name DatasetXXX_Name, got {dataset!r}') from None
    matches = sorted(d for d in os.listdir(raw_root) if d.startswith('Dataset%03d_' % dataset_id)
                     and os.path.isdir(os.path.join(raw_root, d)))
    if not matches:
        raise InputError(f'{raw_root}: no dataset with id {dataset_id} (Dataset{dataset_id:03d}_*)')
    if len(matches) > 1:
        raise InputError(f'{raw_root}: several datasets share id {dataset_id}: {", ".join(matches)}')
    return os.path.join(raw_root, matches[0])


def load_dataset_json(dataset_folder: str) -> dict:
    """dataset.json of an nnU-Net raw dataset folder, checked (labels, file_ending, channel_names); InputError
    naming the file otherwise."""
    path = os.path.join(dataset_folder, 'dataset.json')
    if not os.path.isfile(path):
        raise InputError(f'{path}: dataset.json is missing')
    try:
        with open(path) as f:
            dataset_json = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f'{path}: invalid JSON ({e})') from None
    if not isinstance(dataset_json, dict):
        raise InputError(f'{path}: invalid dataset.json (not a JSON object)')
    for key in ('labels', 'file_ending'):
        if key not in dataset_json:
            raise InputError(f'{path}: invalid dataset.json (no "{key}")')
    if 'channel_names' not in dataset_json and 'modality' not in dataset_json:
        raise InputError(f'{path}: invalid dataset.json (no "channel_names")')
    if dataset_json['file_ending'] not in SUPPORTED_FILE_ENDINGS:
        raise InputError(f'{path}: file_ending {dataset_json["file_ending"]!r} is not supported '
                         f'(supported: {", ".join(SUPPORTED_FILE_ENDINGS)})')
    return dataset_json


def num_channels(dataset_json: dict) -> int:
    """Number of image channels (``channel_names``, or v1's ``modality``) of a dataset.json."""
    return len(dataset_json.get('channel_names', dataset_json.get('modality', {})))


def _visible_files(folder: str) -> List[str]:
    return sorted(f for f in os.listdir(folder) if not f.startswith('.') and os.path.isfile(os.path.join(folder, f)))


def list_training_cases(dataset_folder: str, dataset_json: dict) -> Dict[str, dict]:
    """{case: {'images': [channel files], 'label': file}} after checking names, pairing and channel counts."""
    ending = dataset_json['file_ending']
    n_channels = num_channels(dataset_json)
    images_dir, labels_dir = os.path.join(dataset_folder, 'imagesTr'), os.path.join(dataset_folder, 'labelsTr')
    for folder in (images_dir, labels_dir):
        if not os.path.isdir(folder):
            raise InputError(f'{folder}: folder is missing')
    channels: Dict[str, Dict[int, str]] = {}
    pattern = re.compile(r'(.+)_(\d{4})' + re.escape(ending))
    for f in _visible_files(images_dir):
        path = os.path.join(images_dir, f)
        if not f.endswith(ending):
            raise InputError(f'{path}: unknown file ending (dataset.json file_ending is {ending!r})')
        match = pattern.fullmatch(f)
        if match is None:
            raise InputError(f'{path}: image file name must be CASE_XXXX{ending} (XXXX = channel)')
        channels.setdefault(match.group(1), {})[int(match.group(2))] = path
    labels = {}
    for f in _visible_files(labels_dir):
        path = os.path.join(labels_dir, f)
        if not f.endswith(ending):
            raise InputError(f'{path}: unknown file ending (dataset.json file_ending is {ending!r})')
        labels[f[:-len(ending)]] = path
    for case in sorted(set(channels) - set(labels)):
        raise InputError(f'{channels[case][min(channels[case])]}: image without label '
                         f'(expected {os.path.join(labels_dir, case + ending)})')
    for case in sorted(set(labels) - set(channels)):
        raise InputError(f'{labels[case]}: label without image (expected '
                         f'{os.path.join(images_dir, f"{case}_0000{ending}")})')
    cases = {}
    for case in sorted(labels):
        if sorted(channels[case]) != list(range(n_channels)):
            raise InputError(f'{channels[case][min(channels[case])]}: case {case} has channels '
                             f'{sorted(channels[case])} but dataset.json declares {n_channels} channel(s)')
        cases[case] = {'images': [channels[case][c] for c in range(n_channels)], 'label': labels[case]}
    expected = dataset_json.get('numTraining')
    if expected is not None and expected != len(cases):
        raise InputError(f'{os.path.join(dataset_folder, "dataset.json")}: numTraining is {expected} '
                         f'but labelsTr holds {len(cases)} cases')
    return cases


def read_header(path: str) -> sitk.ImageFileReader:
    """A SimpleITK reader with the image's header read (no voxels); InputError if the file is not an image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f'{path}: cannot be read as an image') from None
    return reader


def geometry(image) -> dict:
    """Shape, spacing, origin and direction of a SimpleITK image or header reader."""
    return {'shape': tuple(image.GetSize()), 'spacing': tuple(image.GetSpacing()),
            'origin': tuple(image.GetOrigin()), 'direction': tuple(image.GetDirection())}


def geometry_mismatch(a: dict, b: dict) -> Optional[str]:
    """Name of the first differing geometry entry (with tolerance for floats) or None."""
    if a['shape'] != b['shape']:
        return 'shape'
    for key in ('spacing', 'origin', 'direction'):
        if not np.allclose(a[key], b[key], rtol=0, atol=GEOMETRY_TOLERANCE):
            return key
    return None


def nnunet_geometry_problems(image: dict, label: dict) -> tuple:
    """(error, warnings) as nnU-Net's ``verify_dataset_integrity`` judges an image against its label: a shape or
    spacing mismatch (beyond ``np.allclose`` and ``GEOMETRY_TOLERANCE``) is an error (or None), an origin or
    direction mismatch beyond ``np.allclose`` only a warning (nnU-Net trains on the voxel grid either way)."""
    if image['shape'] != label['shape']:
        return 'shape', []
    if not (np.allclose(image['spacing'], label['spacing']) or
            np.allclose(image['spacing'], label['spacing'], rtol=0, atol=GEOMETRY_TOLERANCE)):
        return 'spacing', []
    return None, [key for key in ('origin', 'direction') if not np.allclose(image[key], label[key])]


def check_case_headers(case_files: dict) -> List[str]:
    """Every channel is a scalar image with the label's shape and spacing (headers only, no voxel data); an origin
    or direction that differs from the label's is accepted as nnU-Net accepts it, with one warning line on stderr
    naming the file (returned too)."""
    label = read_header(case_files['label'])
    label_geometry = geometry(label)
    warnings = []
    for path in case_files['images']:
        header = read_header(path)
        if header.GetNumberOfComponents() != 1:
            raise InputError(f'{path}: image has {header.GetNumberOfComponents()} components per voxel; '
                             f'nnU-Net expects one file per channel (_0000, _0001, ...)')
        image_geometry = geometry(header)
        error, different = nnunet_geometry_problems(image_geometry, label_geometry)
        if error is not None:
            raise InputError(f'{path}: image/label geometry mismatch ({error} {image_geometry[error]} differs from '
                             f'{label_geometry[error]} of {case_files["label"]})')
        for key in different:
            gap = float(np.max(np.abs(np.subtract(image_geometry[key], label_geometry[key]))))
            warnings.append(f'{path}: {key} differs from {case_files["label"]} by up to {gap:.4g} (nnU-Net warns '
                            f'and trains on the voxel grid; so does voxshield; check with nnUNetv2_plot_overlay_pngs)')
    for line in warnings:
        print(f'WARNING: {line}', file=sys.stderr)
    return warnings


def check_finite_files(case_files: dict) -> None:
    """NaN/Inf check of the floating-point channels as stored on disk (integer files are not read).

    ITK's NIfTI reader turns non-finite voxels into 0, so NIfTI files are checked with nibabel.
    """
    for path in case_files['images']:
        if path.endswith(('.nii', '.nii.gz')):
            image = nibabel.load(path)
            if np.issubdtype(image.get_data_dtype(), np.floating):
                check_finite(np.asanyarray(image.dataobj), path)
        elif read_header(path).GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
            check_finite(sitk.GetArrayFromImage(read_image(path)), path)


def read_image(path: str) -> sitk.Image:
    """The image as a SimpleITK image; InputError naming the file if it cannot be read."""
    try:
        return sitk.ReadImage(path)
    except RuntimeError:
        raise InputError(f'{path}: cannot be read as an image') from None


def check_finite(array: np.ndarray, path: str) -> None:
    """InputError naming ``path`` if a floating-point array holds NaN or Inf."""
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(f'{path}: image contains NaN or Inf voxels')


def temp_path(path: str) -> str:
    """A hidden temp name in the same folder that keeps the file ending (SimpleITK picks the writer by it)."""
    folder, base = os.path.split(path)
    return os.path.join(folder, f'{TEMP_PREFIX}{os.getpid()}-{base}')


def write_image_atomic(image: sitk.Image, path: str) -> None:
    """Write ``image`` (compressed) to a temp file beside ``path``, then rename: never a half-written image."""
    tmp = temp_path(path)
    sitk.WriteImage(image, tmp, True)
    os.replace(tmp, path)


def copy_atomic(src: str, dst: str) -> None:
    """Copy ``src`` to a temp file beside ``dst``, then rename: never a half-written copy."""
    tmp = temp_path(dst)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def json_safe(obj):
    """``obj`` as strict JSON: NaN/Inf -> None, numpy scalars and arrays -> Python, tuples -> lists, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json_atomic(obj, path: str, indent: int = 2) -> None:
    """``json_safe(obj)`` to ``path`` (as nnU-Net's ``save_json(obj, file)``): a hidden temp file in the same folder,
    then ``os.replace``, so ``path`` is either the old file or the complete new one."""
    write_atomic(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + '\n')  # dumps fails first


def write_atomic(path: str, text, mode: str = 'w') -> None:
    """Write ``text`` (``bytes`` with mode 'wb') to a hidden temp file next to ``path``, then ``os.replace`` it over
    ``path``; the temp file is removed if anything fails."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
