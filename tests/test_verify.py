"""voxshield_verify on real Hippocampus cases and a protected copy made here (independently of export)."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import copy_hippocampus_cases, requires_hippocampus
from nnunetv2_voxshield.budget import raw_budget
from nnunetv2_voxshield.verify import verify_entry

pytestmark = requires_hippocampus


def image_path(folder, case):
    return folder / 'imagesTr' / f'{case}_0000.nii.gz'


def rewrite(path, array, like=None, **geometry):
    """Write ``array`` to ``path`` with the geometry of ``like`` (default: the file itself), optionally changed."""
    like = like or sitk.ReadImage(str(path))
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    if 'spacing' in geometry:
        image.SetSpacing(geometry['spacing'])
    sitk.WriteImage(image, str(path))


@pytest.fixture
def pair(tmp_path):
    """Clean cases (float32 and uint8) and a protected copy with noise at up to 90 % of each case's budget."""
    clean, protected = tmp_path / 'Dataset004_Hippocampus', tmp_path / 'Dataset005_HippocampusProtected'
    cases = copy_hippocampus_cases(clean, 3)
    shutil.copytree(clean, protected)
    rng = np.random.default_rng(0)
    for case in cases:
        img = sitk.ReadImage(str(image_path(clean, case)))
        arr = sitk.GetArrayFromImage(img)
        budget = raw_budget(arr[None].astype(np.float64))[0]
        noisy = arr + np.trunc(rng.uniform(-0.9, 0.9, arr.shape) * budget)
        if not np.issubdtype(arr.dtype, np.integer):
            noisy = arr + rng.uniform(-0.9, 0.9, arr.shape) * budget
        rewrite(image_path(protected, case), np.clip(noisy, arr.min(), arr.max()).astype(arr.dtype), img)
    dtypes = {case: sitk.GetArrayFromImage(sitk.ReadImage(str(image_path(clean, case)))).dtype for case in cases}
    assert len(set(dtypes.values())) == 2
    return clean, protected, cases, dtypes


def test_verify_passes_and_reports(pair, tmp_path, capsys):
    clean, protected, cases, _ = pair
    verify_entry([str(clean), str(protected), '-o', str(tmp_path / 'report.json')])
    out = capsys.readouterr().out
    assert '3 cases' in out and 'OK' in out
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['violations'] == [] and report['summary']['cases'] == 3
    assert 0.5 < report['summary']['max_budget_use'] <= 0.9
    assert report['summary']['psnr']['min'] > 30 and 0.9 < report['summary']['ssim']['mean'] <= 1
    assert [c['case'] for c in report['cases']] == sorted(cases)


def tamper(kind, clean, protected, cases, dtypes):
    """Apply one violation; return the offending file and the words the message must contain."""
    case = next(c for c in cases if dtypes[c] == np.float32)
    path = image_path(protected, case)
    if kind == 'voxel_over_budget':
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path(clean, case))))
        budget = raw_budget(arr[None].astype(np.float64))[0]
        tampered = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        tampered[5, 10, 10] = arr[5, 10, 10] + 1.01 * budget
        rewrite(path, tampered)
        return path, 'at 1 voxel(s)'
    if kind == 'uint8_voxel_over_budget':
        case = next(c for c in cases if dtypes[c] == np.uint8)
        path = image_path(protected, case)
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path(clean, case))))
        budget = raw_budget(arr[None].astype(np.float64))[0]
        tampered = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        i = np.unravel_index(np.argmin(arr), arr.shape)
        tampered[i] = arr[i] + int(np.floor(budget)) + 1
        rewrite(path, tampered)
        return path, 'exceeds the budget'
    if kind == 'label_voxel_changed':
        path = protected / 'labelsTr' / f'{case}.nii.gz'
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        label[label.shape[0] // 2, label.shape[1] // 2, label.shape[2] // 2] ^= 1
        rewrite(path, label)
        return path, 'label differs'
    if kind == 'spacing_changed':
        img = sitk.ReadImage(str(path))
        rewrite(path, sitk.GetArrayFromImage(img), img, spacing=[img.GetSpacing()[0] * 1.1, *img.GetSpacing()[1:]])
        return path, 'spacing'
    if kind == 'dtype_changed':
        rewrite(path, sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64))
        return path, 'dtype'
    if kind == 'nan_voxel':
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        arr[1, 2, 3] = np.nan
        rewrite(path, arr)  # ITK's NIfTI reader would show 0 here; verify must still see the NaN
        return path, 'NaN'
    if kind == 'case_missing':
        path.unlink()
        (protected / 'labelsTr' / f'{case}.nii.gz').unlink()
        return protected / 'labelsTr' / f'{case}.nii.gz', 'missing'
    raise ValueError(kind)


@pytest.mark.parametrize('kind', ['voxel_over_budget', 'uint8_voxel_over_budget', 'label_voxel_changed',
                                  'spacing_changed', 'dtype_changed', 'nan_voxel', 'case_missing'])
def test_verify_fails_on_tampered_copy(pair, kind, capsys):
    clean, protected, cases, dtypes = pair
    culprit, words = tamper(kind, clean, protected, cases, dtypes)
    with pytest.raises(SystemExit) as exc:
        verify_entry([str(clean), str(protected)])
    assert exc.value.code == 1
    violations = [line for line in capsys.readouterr().err.splitlines() if line.startswith('VIOLATION')]
    assert len(violations) == 1 and str(culprit) in violations[0] and words in violations[0], violations


def test_absolute_budget(pair):
    clean, protected, _, _ = pair
    verify_entry([str(clean), str(protected), '--eps-abs', '1000'])
    with pytest.raises(SystemExit):
        verify_entry([str(clean), str(protected), '--eps-abs', '0.5'])


def test_unreadable_clean_dataset_is_one_line(pair, capsys):
    clean, protected, _, _ = pair
    (clean / 'dataset.json').unlink()
    with pytest.raises(SystemExit) as exc:
        verify_entry([str(clean), str(protected)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1 and str(clean / 'dataset.json') in err
