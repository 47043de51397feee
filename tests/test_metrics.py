"""Dice / HD95 on hand-made segmentations with known answers; SSIM inside a mask."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_voxshield.metrics import (dice_per_label, hd95, mean_std, psnr, score_case_files,
                                        score_segmentation, ssim, ssim_in_mask, worst_case_distance)


def box(shape=(12, 20, 20), z=(4, 8), y=(5, 11), x=(6, 12), label=1, seg=None):
    seg = np.zeros(shape, np.uint8) if seg is None else seg
    seg[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = label
    return seg


def test_identical_prediction():
    ref = box(label=1)
    box(z=(4, 8), y=(13, 17), x=(6, 12), label=2, seg=ref)
    s = score_segmentation(ref, ref.copy(), (2.5, 0.7, 0.7), [1, 2])
    assert s['mean_dice'] == 1.0
    for v in s['labels'].values():
        assert v['dice'] == 1.0 and v['hd95_mm'] == 0.0 and v['hd95_status'] == 'ok'
    assert s['n_empty_prediction'] == 0


def test_disjoint_prediction_dice_zero_and_distance():
    ref = box(z=(0, 2), y=(0, 2), x=(0, 2))
    pred = box(z=(0, 2), y=(0, 2), x=(10, 12))
    assert dice_per_label(ref, pred, [1])[1] == 0.0
    value, status = hd95(ref, pred, (1.0, 1.0, 2.0))
    # farthest surface voxels: x 0 -> 11 or 1 -> 10; every boundary voxel of each box is 9 or 10 voxels away along x
    assert status == 'ok'
    assert value == pytest.approx(10 * 2.0, abs=1e-4)


@pytest.mark.parametrize('axis,spacing,k', [(0, (3.0, 0.8, 0.8), 2), (1, (3.0, 0.8, 0.8), 3), (2, (1.0, 1.0, 0.5), 1)])
def test_shift_by_k_voxels_anisotropic(axis, spacing, k):
    ref = box(shape=(16, 24, 24), z=(4, 10), y=(6, 14), x=(6, 14))
    pred = np.roll(ref, k, axis=axis)
    s = score_segmentation(ref, pred, spacing, [1])['labels']['1']
    n_along = ref.any(axis=tuple(a for a in range(3) if a != axis)).sum()
    assert s['dice'] == pytest.approx((n_along - k) / n_along)
    assert s['hd95_mm'] == pytest.approx(k * spacing[axis], abs=1e-4)


def test_empty_prediction_is_reported_not_dropped():
    ref = box()
    s = score_segmentation(ref, np.zeros_like(ref), (2.0, 1.0, 1.0), [1])
    lab = s['labels']['1']
    assert lab['dice'] == 0.0
    assert lab['hd95_mm'] is None and lab['hd95_status'] == 'empty_prediction'
    assert lab['hd95_mm_penalised'] == pytest.approx(worst_case_distance(ref.shape, (2.0, 1.0, 1.0)))
    assert lab['hd95_mm_penalised'] == pytest.approx(np.sqrt(24 ** 2 + 20 ** 2 + 20 ** 2))
    assert s['n_empty_prediction'] == 1


def test_both_empty_and_empty_reference():
    empty = np.zeros((5, 6, 7), np.uint8)
    assert hd95(empty, empty, (1, 1, 1)) == (0.0, 'both_empty')
    assert np.isnan(dice_per_label(empty, empty, [1])[1])
    value, status = hd95(empty, box(shape=(5, 6, 7), z=(1, 2), y=(1, 2), x=(1, 2)), (1, 1, 1))
    assert np.isnan(value) and status == 'empty_reference'


def test_regions_and_ignore_label():
    ref = box(label=1)
    box(z=(4, 8), y=(13, 17), x=(6, 12), label=2, seg=ref)
    pred = ref.copy()
    pred[pred == 2] = 1
    d = dice_per_label(ref, pred, [(1, 2), 2])
    assert d[(1, 2)] == 1.0 and d[2] == 0.0
    ref_ign = ref.copy()
    ref_ign[ref == 2] = 3  # ignore label: disagreement there does not count
    assert dice_per_label(ref_ign, pred, [1], ignore_label=3)[1] == 1.0


def test_score_case_files_takes_spacing_from_header(tmp_path):
    ref = box(shape=(16, 24, 24), z=(4, 10), y=(6, 14), x=(6, 14))
    files = []
    for name, arr in (('ref', ref), ('pred', np.roll(ref, 2, axis=0))):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((0.5, 0.5, 4.0))  # SimpleITK order x, y, z -> array axis 0 has 4 mm
        files.append(str(tmp_path / f'{name}.nii.gz'))
        sitk.WriteImage(im, files[-1])
    s = score_case_files(files[0], files[1], [1])
    assert s['spacing'] == [4.0, 0.5, 0.5]
    assert s['labels']['1']['hd95_mm'] == pytest.approx(8.0, abs=1e-4)
    assert s['labels']['1']['dice'] == pytest.approx(4 / 6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match='shape mismatch'):
        score_segmentation(np.zeros((3, 4, 5)), np.zeros((3, 4, 6)), (1, 1, 1), [1])


def test_ssim_in_mask_and_unchanged_psnr_ssim():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(9, 16, 16))
    noisy = clean.copy()
    mask = np.zeros(clean.shape, bool)
    mask[2:6, 4:12, 4:12] = True
    noisy[~mask] += rng.normal(scale=0.5, size=(~mask).sum())  # noise only outside the ROI
    assert ssim_in_mask(clean, clean, mask) == pytest.approx(1.0)
    assert ssim_in_mask(clean, noisy, mask) > ssim(clean, noisy)
    assert np.isnan(ssim_in_mask(clean, noisy, np.zeros_like(mask)))
    assert psnr(clean, noisy, mask) == float('inf')
    assert psnr(clean, clean) == float('inf') and ssim(clean, clean) == pytest.approx(1.0)


def test_mean_std_ignores_missing():
    assert mean_std([1.0, 3.0, None, float('nan')]) == {'mean': 2.0, 'std': 1.0, 'n': 2}
    assert mean_std([])['n'] == 0
