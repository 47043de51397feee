"""Residual-only detector: residual units, Dice rules, label-shaped noise found (and uniform noise not), CLI errors."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from conftest import run_cli
from nnunetv2_voxshield.budget import DEFAULT_EPS, percentile_range
from nnunetv2_voxshield.phantom import write_phantom_dataset
from nnunetv2_voxshield.residual_detector import detect_entry, foreground_dice, highpass_residual


@pytest.mark.parametrize('dtype', [np.float32, np.uint8])
def test_constant_volume_has_zero_residual(dtype):
    r = highpass_residual(np.full((1, 12, 10, 8), 100, dtype=dtype))
    assert r.dtype == np.float32 and r.shape == (1, 12, 10, 8) and np.all(r == 0)


def test_residual_is_in_range_units():
    """A +-4/255-of-range checkerboard on a linear ramp comes out as +-4/255 (the ramp itself as 0)."""
    z = np.arange(40, dtype=np.float64)[:, None, None] * np.ones((40, 20, 20))
    smooth = 1000 + 25 * z  # range ~ 1000 raw units; a Gaussian keeps a linear ramp exactly (away from edges)
    delta = DEFAULT_EPS * percentile_range(smooth[None])[0] * (-1.0) ** np.indices(smooth.shape).sum(0)
    image = (smooth + delta)[None]
    inner = (0, slice(5, -5), slice(5, -5), slice(5, -5))
    assert np.allclose(highpass_residual(smooth[None])[inner], 0, atol=1e-6)
    residual = highpass_residual(image)[inner]
    attenuation = 1 - gaussian_filter((-1.0) ** np.indices((9, 9, 9)).sum(0), 1.0, mode='wrap')[4, 4, 4]
    scale = percentile_range(smooth[None])[0] / percentile_range(image)[0]
    assert np.allclose(residual, delta[inner[1:]] / percentile_range(image)[0] * attenuation, rtol=1e-3)
    assert np.allclose(np.abs(residual), DEFAULT_EPS * attenuation * scale, rtol=1e-3)
    # as documented: 4/255, down to 4/255 / (1 + 2 x 4/255) since the range is that of x + delta
    assert np.all(np.abs(residual) <= DEFAULT_EPS * (1 + 1e-5))
    assert np.all(np.abs(residual) >= DEFAULT_EPS / (1 + 2 * DEFAULT_EPS) * (1 - 1e-3))


def test_foreground_dice_rules():
    gt, pred = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)
    gt[0, 0, :2] = 1
    pred[0, 0, 0] = 1
    pred[3, 3, 3] = 3
    assert foreground_dice(gt, pred, [1, 2, 3]) == {1: pytest.approx(2 / 3), 2: 1.0, 3: 0.0}


N_CASES, ITERATIONS, PATCH = 13, 80, 24  # 12 cases in common: 6 train, 6 test


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def _noise_datasets(root: Path):
    """Phantom labels (tube and nodule as one label) on a label-free texture, + uniform noise of +-4/255 of each
    case's range inside the label only (ROI) or everywhere. The phantom's own image is not used: its structures
    are strong edges that show the labels in the residual whatever the noise (detector Dice ~0.69 either way)."""
    phantom = Path(write_phantom_dataset(990, n_cases=N_CASES, seed=0, raw_root=str(root / 'phantom')))
    folders = {where: root / f'Dataset99{i}_Noise{where}' for i, where in enumerate(('Roi', 'Everywhere'), 1)}
    for where, folder in folders.items():
        shutil.copytree(phantom, folder)
        dataset_json = json.loads((folder / 'dataset.json').read_text())
        dataset_json['labels'] = {'background': 0, 'structure': 1}
        (folder / 'dataset.json').write_text(json.dumps(dataset_json))
        for i, label_file in enumerate(sorted((folder / 'labelsTr').iterdir())):
            label = sitk.ReadImage(str(label_file))
            mask = sitk.GetArrayFromImage(label) > 0
            rng = np.random.default_rng(i)
            texture = gaussian_filter(rng.standard_normal(mask.shape), 3)
            clean = 300 + 100 * texture / texture.std()
            clean = clean + percentile_range(clean[None])[0] / 255 * rng.standard_normal(mask.shape)
            noise = rng.uniform(-1, 1, mask.shape) * DEFAULT_EPS * percentile_range(clean[None])[0]
            for array, path in (((clean + noise * (mask if where == 'Roi' else 1)).astype(np.float32),
                                 folder / 'imagesTr' / label_file.name.replace('.nii.gz', '_0000.nii.gz')),
                                (mask.astype(np.uint8), label_file)):
                image = sitk.GetImageFromArray(array)
                image.CopyInformation(label)
                sitk.WriteImage(image, str(path))
    # one case only in the ROI copy: the split must use the common cases
    extra = sorted((folders['Everywhere'] / 'labelsTr').iterdir())[-1]
    (folders['Everywhere'] / 'imagesTr' / extra.name.replace('.nii.gz', '_0000.nii.gz')).unlink()
    extra.unlink()
    everywhere_json = json.loads((folders['Everywhere'] / 'dataset.json').read_text())
    everywhere_json['numTraining'] = N_CASES - 1
    (folders['Everywhere'] / 'dataset.json').write_text(json.dumps(everywhere_json))
    return folders['Roi'], folders['Everywhere'], extra.name[:-len('.nii.gz')]


def test_detector_finds_label_shaped_noise_not_uniform_noise(tmp_path, capsys):
    roi, everywhere, extra_case = _noise_datasets(tmp_path)
    before = {d: _digest(d) for d in (roi, everywhere)}
    report_file = tmp_path / 'report.json'
    detect_entry([str(roi), str(everywhere), '-o', str(report_file), '--iterations', str(ITERATIONS),
                  '--patch', str(PATCH), '--train-fraction', '0.5'])
    report = json.loads(report_file.read_text())
    split = report['split']
    assert len(split['train_cases']) == len(split['test_cases']) == (N_CASES - 1) // 2
    assert extra_case not in split['train_cases'] + split['test_cases']
    assert sorted(split['train_cases'] + split['test_cases']) == sorted(
        p.name[:-len('.nii.gz')] for p in (everywhere / 'labelsTr').iterdir())
    scores = {Path(r['dataset']).name: r for r in report['datasets']}
    roi_dice, everywhere_dice = scores[roi.name]['mean_dice'], scores[everywhere.name]['mean_dice']
    # seeded runs (80 iterations, seeds 0 and 1) measured ROI 0.72, everywhere 0.19-0.23
    assert roi_dice > 0.6 and everywhere_dice < 0.35 and roi_dice - everywhere_dice > 0.35, (roi_dice, everywhere_dice)
    assert sorted(scores[roi.name]['cases']) == split['test_cases']
    out = capsys.readouterr().out
    assert roi.name in out and everywhere.name in out and f'{roi_dice:.4f}' in out
    assert {d: _digest(d) for d in (roi, everywhere)} == before


def _bad_input(kind: str, root: Path):
    """A broken dataset; returns (arguments, the path the error must name)."""
    folder = Path(write_phantom_dataset(990, n_cases=1 if kind == 'one_case' else 3, seed=0, raw_root=str(root)))
    if kind == 'missing_folder':
        return [str(root / 'Dataset999_Nowhere')], root / 'Dataset999_Nowhere'
    if kind == 'no_dataset_json':
        (folder / 'dataset.json').unlink()
        return [str(folder)], folder / 'dataset.json'
    if kind == 'image_without_label':
        (folder / 'labelsTr' / 'phantom_001.nii.gz').unlink()
        return [str(folder)], folder / 'imagesTr' / 'phantom_001_0000.nii.gz'
    if kind == 'one_case':
        return [str(folder)], folder / 'labelsTr'
    raise ValueError(kind)


@pytest.mark.parametrize('kind', ['missing_folder', 'no_dataset_json', 'image_without_label', 'one_case'])
def test_bad_input_is_one_line_and_writes_nothing(kind, tmp_path, capsys):
    args, culprit = _bad_input(kind, tmp_path / 'raw')
    report_file = tmp_path / 'report.json'
    with pytest.raises(SystemExit) as exc:
        detect_entry(args + ['-o', str(report_file), '--iterations', '1'])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1 and str(culprit) in err, err
    assert not report_file.exists() and not list(tmp_path.glob('*.json'))


def test_console_script_reports_missing_dataset(tmp_path):
    proc = run_cli(['voxshield_detect', tmp_path / 'Dataset999_Nowhere', '-o', tmp_path / 'report.json'], check=False)
    assert proc.returncode != 0 and str(tmp_path / 'Dataset999_Nowhere') in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / 'report.json').exists()
