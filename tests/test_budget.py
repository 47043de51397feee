import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_voxshield.budget import (bound_perturbation, normalisation_scale, parse_eps, percentile_range,
                                       raw_budget, roi_mask)
from nnunetv2_voxshield.case_budgets import case_budget


def test_parse_eps():
    assert parse_eps('4/255') == pytest.approx(4 / 255)
    assert parse_eps(0.02) == 0.02
    for bad in ('abc', '1/0', '-1', 'nan'):
        with pytest.raises(ValueError, match='eps'):
            parse_eps(bad)


def test_raw_budget_is_eps_times_percentile_range_per_channel():
    img = np.stack([np.linspace(0, 1000, 10001), np.linspace(-5, 5, 10001)])
    np.testing.assert_allclose(percentile_range(img), [990.0, 9.9])
    np.testing.assert_allclose(raw_budget(img, eps=0.1), [99.0, 0.99])
    np.testing.assert_allclose(raw_budget(img, eps=0.1, eps_abs=3.0), [3.0, 3.0])


def test_bound_perturbation_holds_budget_and_support():
    g = torch.randn(2, 2, 6, 6, 6) * 10
    seg = torch.zeros(2, 1, 6, 6, 6)
    seg[0, 0, 1:3, 1:3, 1:3] = 2
    eps = torch.tensor([[0.1, 0.2], [0.3, 0.4]]).view(2, 2, 1, 1, 1)
    mask = roi_mask(seg)
    delta = bound_perturbation(g, mask, eps)
    assert torch.all(delta.abs() <= eps)
    assert torch.all(delta[mask.expand_as(delta) == 0] == 0)
    assert delta[0, 1].abs().max().item() == pytest.approx(0.2)
    assert torch.all(delta[1] == 0)  # empty ROI -> no perturbation


def test_roi_mask_labels_dilation_and_soft_edge():
    seg = torch.zeros(1, 1, 9, 9, 9)
    seg[0, 0, 4, 4, 4] = 1
    seg[0, 0, 0, 0, 0] = 2
    assert roi_mask(seg).sum().item() == 2
    assert roi_mask(seg, foreground_labels=[1]).sum().item() == 1
    assert roi_mask(seg, foreground_labels=[1], dilation=1).sum().item() == 27
    soft = roi_mask(seg, foreground_labels=[1], soft_edge=2.0)
    assert soft[0, 0, 4, 4, 4] == 1 and 0 < soft[0, 0, 4, 4, 5] < 1 and soft[0, 0, 4, 4, 6] < soft[0, 0, 4, 4, 5]
    assert soft[0, 0, 4, 4, 8] == 0
    regions = torch.zeros(1, 2, 4, 4)
    regions[0, 1, 0, 0] = 1
    assert roi_mask(regions).shape == (1, 1, 4, 4) and roi_mask(regions).sum().item() == 1


def _plans(scheme, use_mask=False, ct_std=50.0):
    return PlansManager({
        'dataset_name': 'Dataset999_X', 'plans_name': 'p', 'original_median_spacing_after_transp': [1, 1, 1],
        'original_median_shape_after_transp': [8, 8, 8], 'image_reader_writer': 'SimpleITKIO',
        'transpose_forward': [0, 1, 2], 'transpose_backward': [0, 1, 2], 'experiment_planner_used': 'x',
        'label_manager': 'LabelManager',
        'foreground_intensity_properties_per_channel': {'0': {'mean': 0., 'std': ct_std, 'percentile_00_5': -1000,
                                                              'percentile_99_5': 1000}},
        'configurations': {'3d_fullres': {
            'data_identifier': 'x', 'preprocessor_name': 'DefaultPreprocessor', 'batch_size': 2,
            'patch_size': [8, 8, 8], 'spacing': [1, 1, 1], 'normalization_schemes': [scheme],
            'use_mask_for_norm': [use_mask], 'resampling_fn_data': 'resample_data_or_seg_to_shape',
            'resampling_fn_seg': 'resample_data_or_seg_to_shape', 'resampling_fn_data_kwargs': {},
            'resampling_fn_seg_kwargs': {}, 'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
            'resampling_fn_probabilities_kwargs': {}, 'architecture': {}, 'batch_dice': False}}})


def test_budget_translation_zscore_uses_the_case_std():
    rng = np.random.default_rng(0)
    data = (100 + 7.0 * rng.standard_normal((1, 20, 20, 20))).astype(np.float32)
    seg = np.zeros((1, 20, 20, 20), np.uint8)
    seg[0, 5:10, 5:10, 5:10] = 1
    pm = _plans('ZScoreNormalization')
    b = case_budget(data, seg, pm, pm.get_configuration('3d_fullres'), eps=4 / 255)
    assert b['scale'][0] == pytest.approx(1 / data.std(), rel=1e-5)
    assert b['raw_budget'][0] == pytest.approx(4 / 255 * percentile_range(data)[0])
    assert b['eps_norm'][0] == pytest.approx(b['raw_budget'][0] / data.std(), rel=1e-5)
    assert not b['empty_roi']
    # the same budget in units of the image itself: nnU-Net's own normalisation maps raw budget -> eps_norm
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    normed = ZScoreNormalization(False, {}).run(data[0].copy())
    assert (normed.max() - normed.min()) * b['raw_budget'][0] / (data.max() - data.min()) == \
        pytest.approx(b['eps_norm'][0], rel=1e-4)


def test_budget_translation_ct_uses_the_dataset_std_and_masked_zscore_the_mask():
    rng = np.random.default_rng(1)
    data = rng.uniform(-500, 500, (1, 10, 10, 10)).astype(np.float32)
    seg = np.zeros((1, 10, 10, 10), np.uint8)
    pm = _plans('CTNormalization', ct_std=50.0)
    b = case_budget(data, seg, pm, pm.get_configuration('3d_fullres'), eps=0, eps_abs=10.0)
    assert b['raw_budget'] == [10.0] and b['scale'][0] == pytest.approx(1 / 50.0) and b['empty_roi']
    cropped_seg = np.where(np.arange(1000).reshape(10, 10, 10) < 500, 0, -1)
    scale = normalisation_scale(data[0], cropped_seg, 'ZScoreNormalization', True, None)
    assert scale == pytest.approx(1 / data[0][cropped_seg >= 0].std(), rel=1e-5)
    with pytest.raises(ValueError, match='not supported'):
        normalisation_scale(data[0], None, 'MyOwnNormalization', False, None)
