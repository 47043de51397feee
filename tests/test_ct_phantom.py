"""The CT phantom (int16 HU, anisotropic) through the whole CPU workflow: stock planning (CTNormalization), the CPU
preset, a tiny VoxShield protector, export with an absolute HU budget, verify."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import private_nnunet_roots, run_cli
from nnunetv2_voxshield.phantom import CT_LABELS, synthesize_ct_case, write_phantom_dataset
from nnunetv2_voxshield.verify import verify_entry

SHAPE = (24, 64, 64)  # (z, y, x): small enough for the test suite, same 0.8 x 0.8 x 2.5 mm voxels
DATASET = 'Dataset850_CTPhantom'


def read(path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def test_ct_case_anatomy_and_units():
    image, labels, spacing = synthesize_ct_case(np.random.default_rng([0, 0, 0]), SHAPE)
    assert image.dtype == np.int16 and image.shape == labels.shape == SHAPE and spacing == (0.8, 0.8, 2.5)
    assert set(np.unique(labels)) == set(CT_LABELS.values())
    mean = lambda m: float(image[m].mean())  # noqa: E731
    assert mean(labels == 1) == pytest.approx(60, abs=15) and mean(labels == 3) == pytest.approx(150, abs=15)
    assert mean(image < -500) < -950  # air around the body
    assert image.max() >= 450  # the unlabelled spine
    again, _, _ = synthesize_ct_case(np.random.default_rng([0, 0, 0]), SHAPE)
    assert np.array_equal(image, again)


def test_cli_ct_shape(tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path))
    r = subprocess.run([sys.executable, '-m', 'nnunetv2_voxshield.phantom', '-d', '851', '-n', '1', '--ct',
                        '--shape', '10', '20', '30'], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    image, array = read(tmp_path / 'Dataset851_VoxShieldPhantom' / 'imagesTr' / 'phantom_000_0000.nii.gz')
    assert array.shape == (10, 20, 30) and array.dtype == np.int16
    assert image.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))  # stored as float32 by NIfTI
    r = subprocess.run([sys.executable, '-m', 'nnunetv2_voxshield.phantom', '-d', '852', '--shape', '10', '20', '30'],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0 and 'CT phantom only' in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope='module')
def ct(tmp_path_factory):
    """3 small CT cases (+1 test), planned by stock nnU-Net, CPU preset, a tiny VoxShield protector on fold all."""
    root = tmp_path_factory.mktemp('ct')
    with private_nnunet_roots(root) as (roots, mp):
        tiny = str(Path(__file__).resolve().parent / 'nnunet_test_trainers')
        mp.setenv('nnUNet_extTrainer', os.pathsep.join([tiny, os.environ.get('nnUNet_extTrainer', '')]))
        src = Path(write_phantom_dataset(850, 'CTPhantom', n_cases=3, n_test=1, ct=True, shape=SHAPE))
        run_cli(['nnUNetv2_plan_and_preprocess', '-d', '850', '-c', '3d_fullres', '-np', '1', '-npfp', '1'],
                {'nnUNet_n_proc_DA': None})
        run_cli(['voxshield_plans', '-d', '850', '--preset', 'cpu'])
        run_cli([sys.executable, '-m', 'nnunetv2_voxshield.victims', 'run', '850', '3d_fullres', '-tr',
                 'nnUNetTrainerVoxShield_tiny', '-p', 'nnUNetPlans_cpu', '-device', 'cpu'])
        run_cli(['voxshield_export', '-d', '850', '-o', '853', '-tr', 'nnUNetTrainerVoxShield_tiny',
                 '-p', 'nnUNetPlans_cpu', '-f', 'all', '--eps-abs', '10'])
        yield {**roots, 'src': src, 'out': roots['nnUNet_raw'] / 'Dataset853_CTPhantomProtected'}


def test_planner_uses_ct_normalisation(ct):
    plans = json.loads((ct['nnUNet_preprocessed'] / DATASET / 'nnUNetPlans_cpu.json').read_text())
    config = plans['configurations']['3d_fullres']
    assert config['normalization_schemes'] == ['CTNormalization']
    assert config['spacing'] == pytest.approx([2.5, 0.8, 0.8])
    assert config['patch_size'][0] < config['patch_size'][1]  # anisotropic: fewer slices than in-plane voxels


def _pairs(ct, out):
    for f in sorted((ct['src'] / 'imagesTr').iterdir()):
        case = f.name[:-len('_0000.nii.gz')]
        yield case, read(f), read(out / 'imagesTr' / f.name), read(ct['src'] / 'labelsTr' / f'{case}.nii.gz')[1]


def test_int16_round_trip_hu_budget_and_geometry(ct):
    verify_entry([str(ct['src']), str(ct['out']), '--eps-abs', '10'])
    changed = 0
    for case, (a, clean), (b, protected), label in _pairs(ct, ct['out']):
        assert protected.dtype == np.int16 and b.GetPixelID() == a.GetPixelID() == sitk.sitkInt16
        assert b.GetSpacing() == a.GetSpacing() and a.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))  # anisotropic
        assert b.GetOrigin() == a.GetOrigin() and b.GetDirection() == a.GetDirection()
        delta = protected.astype(np.int32) - clean
        assert np.abs(delta).max() <= 10 and np.all(delta[label == 0] == 0)
        changed += int(np.count_nonzero(delta))
    assert changed > 0
    report = json.loads((ct['nnUNet_results'] / DATASET / 'nnUNetTrainerVoxShield_tiny__nnUNetPlans_cpu__3d_fullres'
                         / 'fold_all' / 'export_Dataset853_CTPhantomProtected' / 'report.json').read_text())
    assert report['settings']['eps_abs'] == 10 and all(ch['budget'] == 10 for c in report['cases']
                                                       for ch in c['channels'])


def test_fractional_hu_budget_after_rounding(ct):
    """2.5 HU of random noise at the full budget: rounding to int16 must never reach 3 HU."""
    run_cli(['voxshield_export', '-d', '850', '-o', '854', '-p', 'nnUNetPlans_cpu', '--method', 'random',
             '--eps-abs', '2.5'])
    out = ct['nnUNet_raw'] / 'Dataset854_CTPhantomProtected'
    values = set()
    for case, (a, clean), (b, protected), label in _pairs(ct, out):
        delta = protected.astype(np.int32) - clean
        assert protected.dtype == np.int16 and np.abs(delta).max() <= 2
        values |= set(np.unique(delta[label > 0]).tolist())
    assert values == {-2, -1, 0, 1, 2}
    verify_entry([str(ct['src']), str(out), '--eps-abs', '2.5'])
    with pytest.raises(SystemExit):
        verify_entry([str(ct['src']), str(out), '--eps-abs', '1.5'])


def test_large_volume_metrics_by_slabs_equal_whole_volume(monkeypatch):
    """CT-sized volumes get PSNR/SSIM slab by slab (bounded memory); the values are the whole-volume ones."""
    from nnunetv2_voxshield import metrics
    rng = np.random.default_rng(0)
    clean, _, _ = synthesize_ct_case(rng, (30, 48, 40))
    protected = (clean + rng.integers(-10, 11, clean.shape)).astype(np.int16)
    mask = rng.random(clean.shape) > 0.5
    whole = (metrics.ssim(clean, protected), metrics.psnr(clean, protected), metrics.psnr(clean, protected, mask))
    monkeypatch.setattr(metrics, 'SLAB_VOXELS', 4000)  # slabs of a few slices
    slabs = (metrics.ssim(clean, protected), metrics.psnr(clean, protected), metrics.psnr(clean, protected, mask))
    assert slabs == pytest.approx(whole, rel=1e-12, abs=1e-12) and whole[0] < 1
