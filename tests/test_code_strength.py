"""benchmarks/code_strength.py: a code's local band power against the image's in the same band."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from nnunetv2_voxshield.controls import LabelCodedSource, checkerboard

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'
spec = importlib.util.spec_from_file_location('code_strength', BENCH / 'code_strength.py')
cst = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cst)


def _seg():
    seg = np.zeros((24, 24, 24), dtype=np.int16)
    seg[4:20, 4:12, 4:20], seg[4:20, 12:20, 4:20] = 1, 2
    return seg


@pytest.mark.parametrize('method, block, bins', [
    ('checkerboard', 1, {1: (4, 4, 4), 2: (4, 4, 4)}), ('checkerboard', 2, {1: (2, 2, 2), 2: (2, 2, 2)}),
    ('checkerboard', 4, {1: (1, 1, 1), 2: (1, 1, 1)}),
    ('stripes', 1, {1: (4, 0, 0), 2: (0, 4, 0)}), ('stripes', 4, {1: (1, 0, 0), 2: (0, 1, 0)}),
    ('offset', 1, {1: (0, 0, 0), 2: (0, 0, 0)})])
def test_peak_bin_is_each_class_pattern_frequency(method, block, bins):
    source = LabelCodedSource(method, block=block)
    assert {k: cst.peak_bin(source.pattern(k, (8, 8, 8)), 8) for k in (1, 2)} == bins


def test_band_power_is_the_local_dft_bin():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((12, 12, 12))
    power = cst.band_power(v, (2, 1, 0), 8)
    h = np.hanning(10)[1:-1]
    block = v[2:10, 3:11, 1:9] * h[:, None, None] * h[None, :, None] * h[None, None, :]
    # the block of voxel c starts n/2 before it: voxel (6, 7, 5) has the block starting at (2, 3, 1)
    assert power[6, 7, 5] == pytest.approx(np.abs(np.fft.fftn(block)[2, 1, 0]) ** 2)


def test_an_image_that_is_the_code_gives_snr_one_and_a_smooth_image_a_high_one():
    seg = _seg()
    same = checkerboard(seg.shape) * np.where(seg == 1, 0.1, -0.1) * (seg > 0)
    assert cst.code_strength([(same, seg)], 'checkerboard', 1, 0.1)['snr'] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    smooth = gaussian_filter(rng.standard_normal(seg.shape), 3.0)
    smooth /= np.ptp(smooth)
    fine = cst.code_strength([(smooth, seg)], 'checkerboard', 1, 16 / 255)
    coarse = cst.code_strength([(smooth, seg)], 'checkerboard', 4, 16 / 255)
    offset = cst.code_strength([(smooth, seg)], 'offset', 1, 16 / 255)
    # a smooth image has almost no power at the period-2 corner, much more at period 8 and at the local mean
    assert fine['snr'] > 1e3 and coarse['snr'] < fine['snr'] / 100 and offset['snr'] < fine['snr'] / 100
    # the code's power scales with b^2, the image's not at all
    double = cst.code_strength([(smooth, seg)], 'checkerboard', 4, 32 / 255)
    assert double['image_power'] == pytest.approx(coarse['image_power'])
    assert double['snr'] == pytest.approx(4 * coarse['snr'])
    with pytest.raises(ValueError, match='no labelled voxels'):
        cst.code_strength([(smooth, np.zeros_like(seg))], 'offset', 1, 0.1)


def test_cli_writes_json_for_a_raw_dataset(tmp_path):
    import SimpleITK as sitk
    dataset = tmp_path / 'Dataset900_T'
    (dataset / 'imagesTr').mkdir(parents=True)
    (dataset / 'labelsTr').mkdir()
    (dataset / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'MRI'}, 'file_ending': '.nii.gz',
                                                      'labels': {'background': 0, 'a': 1, 'b': 2}, 'numTraining': 2}))
    rng = np.random.default_rng(1)
    for i in range(2):
        sitk.WriteImage(sitk.GetImageFromArray(gaussian_filter(rng.standard_normal((24, 24, 24)), 2.0)),
                        str(dataset / 'imagesTr' / f'c{i}_0000.nii.gz'))
        sitk.WriteImage(sitk.GetImageFromArray(_seg()), str(dataset / 'labelsTr' / f'c{i}.nii.gz'))
    out = tmp_path / 'out'
    done = subprocess.run([sys.executable, str(BENCH / 'code_strength.py'), '-o', str(out), '--dataset', str(dataset),
                           '--codes', 'checkerboard', 'offset', '--spectrum', '1', '--contrast', '2'],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = json.loads((out / 'code_strength.json').read_text())
    assert data['settings']['cases'] == 2 and set(data['codes']) == {'checkerboard', 'offset'}
    assert data['codes']['checkerboard']['snr'] > data['codes']['offset']['snr']
    assert len(data['spectrum']) == 14 and '| (1, 0, 0) |' in done.stdout
    assert data['contrast']['width'] == 2 and set(data['contrast']['labels']) == {'1', '2'}
    assert data['contrast']['labels']['1']['cases'] == 2 and '| 2 | 2 |' in done.stdout
    # a smooth image: the local mean carries the most power of all bins
    powers = {tuple(r['bin']): r['image_power'] for r in data['spectrum']}
    assert max(powers, key=powers.get) == (0, 0, 0)
    assert '| checkerboard |' in done.stdout and not list(out.glob('*.partial'))
    assert sorted(p.name for p in out.iterdir()) == ['code_strength.json']  # no temp file left behind
    missing = subprocess.run([sys.executable, str(BENCH / 'code_strength.py'), '-o', str(out), '--dataset',
                              str(tmp_path / 'nope')], capture_output=True, text=True)
    assert missing.returncode != 0 and 'nope: not a folder' in missing.stderr


def test_image_spectrum_is_band_power_averaged_over_the_labels():
    rng = np.random.default_rng(1)
    seg = _seg()
    cases = [(gaussian_filter(rng.standard_normal(seg.shape), 1.5), seg) for _ in range(2)]
    spectrum = cst.image_spectrum(cases, 8, 1)
    # one of each pair k, -k: 13 bins (27 minus the origin, halved) and the origin
    assert len(spectrum) == 14 and (0, 0, 0) in spectrum and (1, -1, 0) in spectrum and (-1, 1, 0) not in spectrum
    for k in [(0, 0, 0), (1, 0, 0), (0, 1, -1), (1, 1, 1)]:
        expected = np.mean(np.concatenate([cst.band_power(x, k, 8)[s > 0] for x, s in cases]))
        assert spectrum[k] == pytest.approx(expected, rel=1e-9)
    # k and -k carry the same power in a real image
    x = cases[0][0]
    assert np.mean(cst.band_power(x, (0, -1, 1), 8)[seg > 0]) == pytest.approx(
        np.mean(cst.band_power(x, (0, 1, -1), 8)[seg > 0]), rel=1e-9)
    with pytest.raises(ValueError, match='no labelled voxels'):
        cst.image_spectrum([(x, np.zeros_like(seg))], 8, 1)


def test_anatomy_contrast_is_each_label_against_the_shell_around_the_foreground():
    """Labels 1 and 2 at 0.2 and -0.3 on a ground of 0, with a far-away bright block that is not in the 2-voxel
    shell: contrasts 0.2 and -0.3 exactly; the 1-voxel shell of a second case that touches the border is the voxels
    inside the array only; an all-background case is skipped."""
    seg = _seg()
    x = np.where(seg == 1, 0.2, np.where(seg == 2, -0.3, 0.0))
    x[22:, 22:, 22:] = 5.0  # > 2 voxels from the foreground (which ends at index 19)
    border = np.zeros_like(seg)
    border[:3, :3, :3] = 1
    xb = np.where(border == 1, 1.0, 0.25)
    contrast = cst.anatomy_contrast([(x, seg), (xb, border), (x, np.zeros_like(seg))], width=2)
    assert contrast[1] == pytest.approx([0.2, 0.75]) and contrast[2] == pytest.approx([-0.3])
    shifted = cst.anatomy_contrast([(x + 0.1 * (seg == 1), seg)], width=2)  # an offset moves its class only
    assert shifted[1] == pytest.approx([0.3]) and shifted[2] == pytest.approx([-0.3])
