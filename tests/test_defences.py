"""Defences on synthetic volumes, and purified nnU-Net raw datasets (geometry, dtype, labels preserved)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_voxshield.defences import (apply_defence, defence_key, describe_defence, gaussian_blur,
                                         parse_defence, purify_dataset, quantise, z_median, z_resample)


def smooth_volume(shape=(16, 24, 20)):
    z, y, x = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing='ij')
    return 100 + 50 * np.sin(2 * np.pi * y) * np.cos(np.pi * x) + 20 * z


def test_z_median_removes_single_slice_spike():
    vol = smooth_volume()
    spiked = vol.copy()
    spiked[7] += 500.0
    out = z_median(spiked)
    assert np.abs(out[7] - vol[7]).max() < np.abs(vol[8] - vol[7]).max() + 1e-9
    assert np.abs(out - vol).max() < 2.0  # nothing left of the spike anywhere
    assert np.allclose(z_median(vol)[3:-3], vol[3:-3])  # monotone along z: untouched inside


def test_blur_reduces_flicker_energy():
    vol = smooth_volume()
    flicker = 5.0 * (-1.0) ** np.arange(vol.shape[0])[:, None, None] * np.ones_like(vol)
    before = np.abs(np.fft.rfft(flicker, axis=0))[-1].mean()
    out = gaussian_blur(vol + flicker) - gaussian_blur(vol)
    after = np.abs(np.fft.rfft(out, axis=0))[-1].mean()
    assert after < 0.1 * before  # > 10x less energy at the z-Nyquist frequency
    assert np.abs(gaussian_blur(vol) - vol)[2:-2, 2:-2, 2:-2].max() < 5.0  # smooth content kept


def test_resampling_keeps_shape_and_smooth_content():
    vol = smooth_volume((15, 24, 20))
    out = z_resample(vol)
    assert out.shape == vol.shape
    assert np.abs(out - vol)[1:-1].max() < 2.0
    flicker = (-1.0) ** np.arange(16)[:, None, None] * np.ones((16, 4, 4))
    assert np.abs(z_resample(flicker)).mean() < 0.1  # alternating slices do not survive 2x down/up


def test_quantise_levels():
    vol = np.linspace(-1.0, 1.0, 10000).reshape(10, 10, 100)
    out = quantise(vol, 3)
    assert len(np.unique(out)) == 8
    assert np.abs(out - vol).max() <= (2.0 / 7) / 2 + 1e-12
    assert out.min() == -1.0 and out.max() == 1.0
    assert np.allclose(quantise(np.arange(256.0).reshape(4, 8, 8), 8), np.arange(256.0).reshape(4, 8, 8))


def test_parse_and_names():
    assert parse_defence('blur') == ('blur', 1.0)
    assert parse_defence('quantize:6') == ('quantise', 6)
    assert defence_key('blur') == 'blur' and defence_key('blur:2') == 'blur-s2'
    assert describe_defence('zmedian') == 'median over z-slices (size 3)'
    for bad in ('sharpen', 'blur:abc', 'zmedian:2', 'blur:-1'):
        with pytest.raises(ValueError):
            parse_defence(bad)
    assert apply_defence(np.ones((3, 4, 5)), 'zresample').shape == (3, 4, 5)


def write_image(path, array, spacing=(0.8, 0.9, 3.0), origin=(1.0, -2.0, 5.0)):
    im = sitk.GetImageFromArray(array)
    im.SetSpacing(spacing)
    im.SetOrigin(origin)
    im.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(im, str(path))


@pytest.mark.parametrize('spec', ['blur', 'zmedian', 'zresample', 'quantise'])
def test_purify_dataset_preserves_geometry_dtype_labels(tmp_path, spec):
    src = tmp_path / 'Dataset001_X'
    (src / 'imagesTr').mkdir(parents=True)
    (src / 'labelsTr').mkdir()
    rng = np.random.default_rng(0)
    arrays = {'a': (smooth_volume((8, 12, 10)) + rng.normal(size=(8, 12, 10))).astype(np.float32),
              'b': np.clip(smooth_volume((9, 12, 10)) + rng.normal(scale=5, size=(9, 12, 10)), 0, 255).astype(np.uint8)}
    for case, arr in arrays.items():
        write_image(src / 'imagesTr' / f'{case}_0000.nii.gz', arr)
        write_image(src / 'labelsTr' / f'{case}.nii.gz', (arr > arr.mean()).astype(np.uint8))
    (src / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'MRI'}, 'labels': {'background': 0, 'x': 1},
                                                  'numTraining': 2, 'file_ending': '.nii.gz'}))
    before = {p: p.read_bytes() for p in src.rglob('*') if p.is_file()}
    dst = tmp_path / 'out' / 'Dataset002_Y'
    (tmp_path / 'out').mkdir()
    purify_dataset(str(src), str(dst), spec)
    assert {p: p.read_bytes() for p in src.rglob('*') if p.is_file()} == before  # input untouched
    assert not (tmp_path / 'out' / 'Dataset002_Y.tmp').exists()
    for case, arr in arrays.items():
        a = sitk.ReadImage(str(src / 'imagesTr' / f'{case}_0000.nii.gz'))
        b = sitk.ReadImage(str(dst / 'imagesTr' / f'{case}_0000.nii.gz'))
        assert b.GetSize() == a.GetSize() and b.GetPixelID() == a.GetPixelID()
        assert np.allclose(b.GetSpacing(), a.GetSpacing()) and np.allclose(b.GetOrigin(), a.GetOrigin())
        assert np.allclose(b.GetDirection(), a.GetDirection())
        assert (dst / 'labelsTr' / f'{case}.nii.gz').read_bytes() == (src / 'labelsTr' / f'{case}.nii.gz').read_bytes()
        diff = np.abs(sitk.GetArrayFromImage(b).astype(float) - arr.astype(float))
        assert diff.max() < 0.5 * np.ptp(arr)
        assert diff.max() > 0 or (spec == 'quantise' and arr.dtype == np.uint8)  # 8 bits: lossless for uint8
    assert json.loads((dst / 'dataset.json').read_text())['numTraining'] == 2
    with pytest.raises(ValueError, match='already exists'):
        purify_dataset(str(src), str(dst), spec)
