"""UMed-3D building blocks and the trainer-based baselines (EM, UMed)."""
import shutil

import numpy as np
import pytest
import torch

from conftest import requires_hippocampus, run_cli
from nnunetv2_voxshield.umed import (CentralDifferenceConv2d, CentralDifferenceConv3d, contour_band, lbp_texture_map,
                                     umed_perturbation)


def direct_cdc(x: np.ndarray, w: np.ndarray, theta: float) -> np.ndarray:
    """UMed Eq. 3 voxel by voxel: sum_n w(p_n) x(p0 + p_n) + theta * (-x(p0) sum_n w(p_n)), zero padding 1."""
    c_out, c_in, k = w.shape[0], w.shape[1], w.shape[2]
    spatial = x.shape[1:]
    xp = np.pad(x, [(0, 0)] + [(1, 1)] * len(spatial))
    out = np.zeros((c_out, *spatial))
    for o in range(c_out):
        for p0 in np.ndindex(*spatial):
            acc = 0.0
            for n in np.ndindex(*([k] * len(spatial))):
                acc += np.sum(w[(o, slice(None), *n)] * xp[(slice(None), *[a + b for a, b in zip(p0, n)])])
            acc += theta * -np.sum(x[(slice(None), *p0)] * w[o].reshape(c_in, -1).sum(1))
            out[(o, *p0)] = acc
    return out


@pytest.mark.parametrize('conv_class, shape', [(CentralDifferenceConv3d, (2, 4, 5, 3)),
                                               (CentralDifferenceConv2d, (2, 6, 5))])
def test_central_difference_conv_matches_direct_computation(conv_class, shape):
    torch.manual_seed(0)
    conv = conv_class(2, 3, 3, padding=1, bias=False).double()
    x = torch.randn(1, *shape, dtype=torch.float64)
    expected = direct_cdc(x[0].numpy(), conv.weight.detach().numpy(), conv.theta)
    np.testing.assert_allclose(conv(x)[0].detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    conv.theta = 0.0
    np.testing.assert_allclose(conv(x)[0].detach().numpy(), direct_cdc(x[0].numpy(), conv.weight.detach().numpy(), 0),
                               rtol=1e-10, atol=1e-10)


def test_contour_band_is_dilation_minus_erosion():
    mask = torch.zeros(1, 1, 11, 11, 11)
    mask[0, 0, 3:8, 3:8, 3:8] = 1
    band = contour_band(mask, width=1)[0, 0]
    assert band[5, 5, 5] == 0          # deep inside
    assert band[3, 5, 5] == 1 and band[2, 5, 5] == 1  # inner and outer boundary layers
    assert band[1, 5, 5] == 0 and band[0, 0, 0] == 0
    assert band.sum().item() == 7 ** 3 - 3 ** 3


def test_lbp_texture_map_in_unit_range_and_flat_is_constant():
    rng = np.random.default_rng(0)
    texture = lbp_texture_map(rng.normal(size=(4, 12, 12)))
    assert texture.shape == (4, 12, 12) and texture.min() >= 0 and texture.max() <= 1 and texture.std() > 0
    flat = lbp_texture_map(np.ones((3, 8, 8)))
    assert np.all(flat == flat.flat[0])


def test_umed_perturbation_support_and_bounds():
    torch.manual_seed(0)
    roi = torch.zeros(2, 1, 12, 12, 12)
    roi[:, :, 3:9, 3:9, 3:9] = 1
    eps = torch.tensor([0.1, 0.2]).view(2, 1, 1, 1, 1)
    texture_map = torch.rand(2, 1, 12, 12, 12)
    big_c, big_t = 10 * torch.randn(2, 1, 12, 12, 12), 10 * torch.randn(2, 1, 12, 12, 12)
    band = contour_band(roi, 2)
    inner = roi * (1 - band)
    contour_only = umed_perturbation(big_c, big_t, roi, texture_map, eps, 2, use_texture=False)
    assert torch.all(contour_only[band == 0] == 0) and torch.all(contour_only.abs() <= eps)
    assert contour_only.abs().max() == pytest.approx(0.2)
    texture_only = umed_perturbation(big_c, big_t, roi, texture_map, eps, 2, use_contour=False)
    assert torch.all(texture_only[inner == 0] == 0)
    assert torch.all(texture_only.abs() <= eps * texture_map + 1e-7)
    both = umed_perturbation(big_c, big_t, roi, texture_map, eps, 2)
    torch.testing.assert_close(both, contour_only + texture_only)
    assert torch.all(both.abs() <= eps) and torch.all(both[(roi + band) == 0] == 0)


@requires_hippocampus
def test_umed_trainer_step_holds_support_and_trains_both_generators(hippocampus_env):
    from conftest import same, snapshot
    from test_trainer import make_trainer
    trainer = make_trainer('nnUNetTrainerUMed')
    batch = next(trainer.dataloader_train)
    with torch.no_grad():
        delta, eps = trainer.perturbation(batch['data'], batch['target'], batch['keys'])
    roi = (batch['target'][0] > 0).float()
    assert torch.all(delta.abs() <= eps + 1e-7)
    assert torch.all(delta[(roi + contour_band(roi, trainer.contour_band_width)) == 0] == 0)
    trainer.train_step(batch)  # surrogate
    contour0, texture0 = snapshot(trainer.generator.contour), snapshot(trainer.generator.texture)
    net0 = snapshot(trainer.network)
    for _ in range(4):  # 4 generator steps per surrogate step
        trainer.train_step(batch)
    assert same(net0, snapshot(trainer.network))
    assert not same(contour0, snapshot(trainer.generator.contour))
    assert not same(texture0, snapshot(trainer.generator.texture))
    assert trainer.voxshield_state()['method'] == 'umed'


@requires_hippocampus
@pytest.mark.parametrize('trainer, method', [('nnUNetTrainerEM_tiny', 'em'), ('nnUNetTrainerUMed_tiny', 'umed')])
def test_baseline_trainers_run_through_stock_nnunet_and_export(hippocampus_env, test_trainers_env, trainer, method):
    import SimpleITK as sitk
    run_cli(['nnUNetv2_train', '4', '3d_fullres', '0', '-tr', trainer, '-device', 'cpu'])
    fold = hippocampus_env['nnUNet_results'] / 'Dataset004_Hippocampus' / f'{trainer}__nnUNetPlans__3d_fullres' / 'fold_0'
    state = torch.load(fold / 'checkpoint_final.pth', weights_only=False)['voxshield']
    assert state['method'] == method and state['lambda_isc'] == 0.0 and state['lambda_spd'] == 0.0

    run_cli(['voxshield_export', '-d', '4', '-o', '44', '-tr', trainer, '-f', '0', '-device', 'cpu'])
    raw = hippocampus_env['nnUNet_raw']
    clean, protected = raw / 'Dataset004_Hippocampus', raw / 'Dataset044_HippocampusProtected'
    try:
        run_cli(['voxshield_verify', clean, protected])
        if method == 'umed':  # support: the ROI and its outer contour band, nothing else
            from scipy.ndimage import binary_dilation
            for label_file in sorted((clean / 'labelsTr').glob('*.nii.gz')):
                case = label_file.name[:-len('.nii.gz')]
                read = lambda f: sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(np.float64)
                diff = read(protected / 'imagesTr' / f'{case}_0000.nii.gz') - read(clean / 'imagesTr' / f'{case}_0000.nii.gz')
                support = binary_dilation(read(label_file) > 0, np.ones((5, 5, 5)))
                assert np.all(diff[~support] == 0) and np.any(diff != 0)
    finally:
        shutil.rmtree(protected)  # the raw folder is shared by the session
    assert (fold / 'export_Dataset044_HippocampusProtected' / 'report.json').is_file()
