"""Class-wise convolution (issue 29, ``--method conv``): per-class kernels from the seed, the delta on each label,
its bound, the strength for a target ROI PSNR, and export + verify on a three-class anisotropic phantom."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import private_nnunet_roots, run_cli, three_class_case, write_three_class_dataset
from nnunetv2_voxshield import export
from nnunetv2_voxshield.conv_code import (MAX_STRENGTH, ConvSource, check_strength, class_kernel, conv_bound,
                                          prepare_cases, roi_psnr, strength_for_psnr)
from nnunetv2_voxshield.dataset_io import InputError
from nnunetv2_voxshield.verify import verify_entry

def _delta_by_hand(image: np.ndarray, seg: np.ndarray, strength: float, seed: int) -> np.ndarray:
    """s (k_c * x - x) on label c, the convolution written out: sum over offsets o of k[1 + o] x[i - o], borders
    replicated."""
    padded = np.pad(image, 1, mode='edge')
    delta = np.zeros(image.shape)
    for label in (1, 2, 3):
        k, conv = class_kernel(label, seed), np.zeros(image.shape)
        for o in np.ndindex(3, 3, 3):
            shift = tuple(slice(1 - (oi - 1), 1 - (oi - 1) + n) for oi, n in zip(o, image.shape))
            conv += k[o] * padded[shift]
        delta[seg == label] = strength * (conv - image)[seg == label]
    return delta


def test_kernels_are_reproducible_from_the_seed_and_differ_per_class():
    """k_c: 3x3x3, non-negative, sum 1, one weight 1/sum (CUDA's centre parameter) and the rest U(0, 0.3)/sum;
    the same (seed, class) gives the same kernel, another class or seed another one."""
    k = class_kernel(2, seed=7)
    assert k.shape == (3, 3, 3) and np.all(k >= 0) and k.sum() == pytest.approx(1.0)
    top = k.max()
    assert np.sum(k == top) == 1 and np.all(np.delete(k.ravel(), k.argmax()) <= 0.3 * top)
    assert np.array_equal(k, class_kernel(2, seed=7)) and np.array_equal(k, ConvSource(0.5, 7).kernel(2))
    others = [class_kernel(1, 7), class_kernel(3, 7), class_kernel(2, 8)]
    assert all(not np.allclose(k, o) for o in others)
    assert class_kernel(1, 0, dims=2).shape == (3, 3)


def test_delta_is_the_class_convolution_inside_each_label_and_zero_outside():
    """delta = s (k_y * x - x) on every labelled voxel (checked against the convolution written out), 0 on the
    background; the bound s (max - min) holds, and at s = 1 the voxel lands inside its 3x3x3 neighbourhood's range."""
    image, seg = three_class_case(0)
    images = np.stack([image, 2 * image + 5])  # two channels, one kernel per class for both
    for strength in (0.3, 1.0, 2.5):
        delta = ConvSource(strength, seed=3).compute_delta_raw(images, seg)
        assert np.all(delta[:, seg == 0] == 0)
        assert np.allclose(delta[0], _delta_by_hand(image, seg, strength, 3), atol=1e-12)
        assert np.allclose(delta[1], 2 * delta[0], atol=1e-12)
        assert np.all(np.abs(delta).reshape(2, -1).max(axis=1) <= conv_bound(images, strength) + 1e-12)
    from scipy.ndimage import maximum_filter, minimum_filter
    out = image + ConvSource(1.0, seed=3).compute_delta_raw(image[None], seg)[0]
    assert np.all(out >= minimum_filter(image, 3, mode='nearest') - 1e-12)
    assert np.all(out <= maximum_filter(image, 3, mode='nearest') + 1e-12)
    assert np.count_nonzero(delta[0]) > 0.9 * np.count_nonzero(seg)


def test_strength_checked():
    for bad in (0, -0.1, MAX_STRENGTH + 0.5, float('nan'), None, 'a'):
        with pytest.raises(InputError, match='--strength'):
            check_strength(bad)
    assert check_strength('0.25') == 0.25


def test_strength_for_psnr_hits_the_target():
    """The bisection's s gives the target mean ROI PSNR (as the export writes: range clip, dtype); in the linear
    regime halving s adds 20 log10 2 dB; a target below what MAX_STRENGTH reaches is refused."""
    cases = [three_class_case(i) for i in range(2)]
    cases = [(cases[0][0][None].astype(np.float32), cases[0][1]),
             (np.rint(cases[1][0] * 100)[None].astype(np.uint8), cases[1][1])]
    prepared = prepare_cases(cases, seed=1)
    for target in (30.0, 24.0):
        s = strength_for_psnr(cases, target, seed=1)
        assert np.mean(roi_psnr(prepared, s)) == pytest.approx(target, abs=0.05)
    float_only = prepare_cases(cases[:1], seed=1)
    assert roi_psnr(float_only, 0.1)[0] - roi_psnr(float_only, 0.2)[0] == pytest.approx(20 * np.log10(2), abs=0.01)
    with pytest.raises(InputError, match='above the target'):
        strength_for_psnr(cases, 1.0)


@pytest.fixture(scope='module')
def phantom_env(tmp_path_factory):
    """Three cases of the three-class phantom (float32, uint8, float32), 0.8 x 0.8 x 3 mm, fingerprinted and planned
    with stock nnU-Net (export-time methods read only the plans)."""
    with private_nnunet_roots(tmp_path_factory.mktemp('conv_phantom')) as (roots, mp):
        folder = roots['nnUNet_raw'] / 'Dataset931_ThreeClass'
        cases = write_three_class_dataset(folder)
        env = {**{k: str(v) for k, v in roots.items()}, 'nnUNet_n_proc_DA': None}
        run_cli(['nnUNetv2_extract_fingerprint', '-d', '931', '-np', '1'], env)
        run_cli(['nnUNetv2_plan_experiment', '-d', '931'], env)
        yield {**roots, 'source': folder, 'cases': cases}


def test_conv_export_verify_on_three_class_phantom(phantom_env, capsys):
    """voxshield_export --method conv on the phantom: verify --strength passes, labels / geometry / dtype kept,
    the background untouched, each label moved by its class's convolution (to the file's dtype); dataset.json
    records conv with no eps; another --seed gives another copy; --eps with conv and conv without --strength are
    refused before anything is written."""
    raw, src = phantom_env['nnUNet_raw'], phantom_env['source']
    for bad in (['--strength', '0.5', '--eps', '4/255'], []):
        with pytest.raises(SystemExit) as exc:
            export.export_entry(['-d', '931', '-o', '932', '--method', 'conv', *bad])
        assert exc.value.code != 0 and '--strength' in capsys.readouterr().err
    assert not (raw / 'Dataset932_ThreeClassProtected').exists()
    copies = {}
    try:
        for out_id, seed in ((932, 0), (933, 1)):
            export.export_entry(['-d', '931', '-o', str(out_id), '--method', 'conv', '--strength', '0.8', '--seed',
                                 str(seed), '-device', 'cpu'])
            out = raw / f'Dataset{out_id}_ThreeClassProtected'
            verify_entry([str(src), str(out), '--strength', '0.8', '-o', str(raw.parent / f'v{out_id}.json')])
            assert 'ROI PSNR mean' in capsys.readouterr().out
            report = json.loads((raw.parent / f'v{out_id}.json').read_text())
            assert report['summary']['violations'] == 0 and report['summary']['psnr_roi']['mean'] < 60
            published = json.loads((out / 'dataset.json').read_text())['voxshield']
            assert (published['method'], published['eps'], published['strength']) == ('conv', None, 0.8)
            for case in phantom_env['cases']:
                clean = sitk.ReadImage(str(src / 'imagesTr' / f'{case}_0000.nii.gz'))
                prot = sitk.ReadImage(str(out / 'imagesTr' / f'{case}_0000.nii.gz'))
                assert prot.GetPixelIDValue() == clean.GetPixelIDValue()
                assert prot.GetSpacing() == clean.GetSpacing() and prot.GetOrigin() == clean.GetOrigin()
                seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / 'labelsTr' / f'{case}.nii.gz')))
                x = sitk.GetArrayFromImage(clean).astype(np.float64)
                delta = sitk.GetArrayFromImage(prot).astype(np.float64) - x
                expected = _delta_by_hand(x, seg, 0.8, seed)
                tol = 0.5 if clean.GetPixelIDTypeAsString() == '8-bit unsigned integer' else 1e-5
                assert np.all(delta[seg == 0] == 0) and np.abs(delta - expected).max() <= tol
                assert np.count_nonzero(delta) > 0.5 * np.count_nonzero(seg)
                copies.setdefault(case, []).append(delta)
        assert all(not np.array_equal(*deltas) for deltas in copies.values())
        with pytest.raises(SystemExit) as exc:  # a conv copy is no 4/255 copy
            verify_entry([str(src), str(raw / 'Dataset932_ThreeClassProtected'), '--eps', '4/255'])
        assert exc.value.code == 1
    finally:
        for out_id in (932, 933):
            shutil.rmtree(raw / f'Dataset{out_id}_ThreeClassProtected', ignore_errors=True)
