"""The synthetic phantom dataset: determinism, structure, geometry, dtypes, overwrite refusal, CLI errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_voxshield.phantom import LABELS, write_phantom_dataset

N_CASES, N_TEST = 4, 1


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def _read(path: Path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


@pytest.fixture(scope='module')
def phantoms(tmp_path_factory):
    """Seed 0 written twice (in different folders) and seed 1 once."""
    root = tmp_path_factory.mktemp('phantom')
    a = write_phantom_dataset(990, n_cases=N_CASES, n_test=N_TEST, seed=0, raw_root=str(root / 'a'))
    b = write_phantom_dataset(990, n_cases=N_CASES, n_test=N_TEST, seed=0, raw_root=str(root / 'b'))
    c = write_phantom_dataset(990, n_cases=N_CASES, n_test=N_TEST, seed=1, raw_root=str(root / 'c'))
    return Path(a), Path(b), Path(c)


def test_same_seed_gives_identical_bytes(phantoms):
    a, b, _ = phantoms
    fa, fb = _files(a), _files(b)
    assert len(fa) == 1 + 2 * (N_CASES + N_TEST)
    assert fa.keys() == fb.keys()
    assert all(fa[k] == fb[k] for k in fa)


def test_different_seed_differs(phantoms):
    a, _, c = phantoms
    fa, fc = _files(a), _files(c)
    assert fa.keys() == fc.keys()
    different = [k for k in fa if k.endswith('.nii.gz') and fa[k] != fc[k]]
    assert len(different) == 2 * (N_CASES + N_TEST)


def test_layout_and_dataset_json(phantoms):
    a = phantoms[0]
    assert a.name == 'Dataset990_VoxShieldPhantom'
    ds = json.loads((a / 'dataset.json').read_text())
    assert ds['channel_names'] == {'0': 'MRI'}
    assert ds['labels'] == {'background': 0, 'tube': 1, 'nodule': 2}
    assert ds['numTraining'] == N_CASES and ds['file_ending'] == '.nii.gz'
    assert ds['licence'] and ds['description']
    assert sorted(p.name for p in (a / 'imagesTr').iterdir()) == [f'phantom_{i:03d}_0000.nii.gz' for i in range(N_CASES)]
    assert sorted(p.name for p in (a / 'labelsTr').iterdir()) == [f'phantom_{i:03d}.nii.gz' for i in range(N_CASES)]
    assert sorted(p.name for p in (a / 'imagesTs').iterdir()) == [f'phantomts_{j:03d}_0000.nii.gz' for j in range(N_TEST)]
    assert sorted(p.name for p in (a / 'labelsTs').iterdir()) == [f'phantomts_{j:03d}.nii.gz' for j in range(N_TEST)]
    assert [p.name for p in a.parent.iterdir()] == [a.name]  # no temp folders left behind


def _cases(folder: Path):
    for images, labels in (('imagesTr', 'labelsTr'), ('imagesTs', 'labelsTs')):
        for lab in sorted((folder / labels).iterdir()):
            yield folder / images / lab.name.replace('.nii.gz', '_0000.nii.gz'), lab


def test_structure_geometry_and_dtypes(phantoms):
    dtypes, spacings = set(), set()
    for image_file, label_file in _cases(phantoms[0]):
        img, image = _read(image_file)
        lab, seg = _read(label_file)
        # geometry: image and labels agree, spacing as declared, small shapes
        assert img.GetSize() == lab.GetSize()
        assert img.GetSpacing() == lab.GetSpacing() and img.GetOrigin() == lab.GetOrigin()
        assert img.GetDirection() == lab.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        assert img.GetSpacing() in ((1.0, 1.0, 1.0), (1.0, 1.0, 1.5))
        assert all(20 <= n <= 40 for n in image.shape), image.shape
        spacings.add(img.GetSpacing())
        dtypes.add(image.dtype)
        # labels: both structures present, nothing else
        assert seg.dtype == np.uint8
        assert set(np.unique(seg)) == set(LABELS.values())
        assert np.isfinite(image).all() and image.min() >= 0
        # the tube is in every slice and drifts/changes along z
        area = (seg == 1).sum((1, 2))
        assert (area > 0).all()
        centroids = np.array([np.argwhere(s == 1).mean(0) for s in seg])
        assert np.ptp(centroids, axis=0).max() > 2, 'tube centre should move along z'
        assert area.max() > 1.3 * area.min(), 'tube radius should change along z'
        # per-structure intensities: tube brighter than tissue, nodule darker
        means = [float(image[seg == k].astype(np.float64).mean()) for k in (0, 1, 2)]
        assert means[1] > 1.15 * means[0] and means[2] < 0.9 * means[0], means
        # texture and noise: the background is not flat
        assert image[seg == 0].astype(np.float64).std() > 0.05 * means[0]
    assert dtypes == {np.dtype(np.float32), np.dtype(np.uint8)}
    assert spacings == {(1.0, 1.0, 1.0), (1.0, 1.0, 1.5)}


def test_case_depends_only_on_seed_and_index(tmp_path, phantoms):
    """Case i is the same whether 2 or 4 cases are written (so small and large phantoms agree)."""
    small = Path(write_phantom_dataset(990, n_cases=2, seed=0, raw_root=str(tmp_path)))
    for name in ('imagesTr/phantom_001_0000.nii.gz', 'labelsTr/phantom_001.nii.gz'):
        assert (small / name).read_bytes() == (phantoms[0] / name).read_bytes()


def test_refuses_to_overwrite(tmp_path):
    target = Path(write_phantom_dataset(991, name='P', n_cases=1, raw_root=str(tmp_path)))
    (target / 'marker.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='already exists'):
        write_phantom_dataset(991, name='P', n_cases=1, raw_root=str(tmp_path))
    assert (target / 'marker.txt').read_text() == 'keep me'
    # another dataset with the same id would make nnU-Net's id lookup ambiguous
    with pytest.raises(FileExistsError, match='another dataset already uses id 991'):
        write_phantom_dataset(991, name='Other', n_cases=1, raw_root=str(tmp_path))
    # overwrite replaces the folder
    write_phantom_dataset(991, name='P', n_cases=2, raw_root=str(tmp_path), overwrite=True)
    assert not (target / 'marker.txt').exists()
    assert len(list((target / 'imagesTr').iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['Dataset991_P']


@pytest.mark.parametrize('kwargs, message', [
    ({'dataset_id': 0}, 'dataset id'),
    ({'dataset_id': 1000}, 'dataset id'),
    ({'name': 'bad name'}, 'dataset name'),
    ({'n_cases': 0}, 'n_cases'),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_phantom_dataset(raw_root=str(tmp_path), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_and_refuses(tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path))
    cmd = [sys.executable, '-c', 'from nnunetv2_voxshield.phantom import phantom_entry; phantom_entry()',
           '-d', '992', '-n', '2', '--test', '1', '--seed', '3']
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    target = tmp_path / 'Dataset992_VoxShieldPhantom'
    assert str(target) in ok.stdout
    assert len(list((target / 'imagesTs').iterdir())) == 1
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode != 0
    assert again.stderr.strip().count('\n') == 0 and 'already exists' in again.stderr and str(target) in again.stderr
    forced = subprocess.run(cmd + ['--overwrite'], env=env, capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
