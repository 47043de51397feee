"""Export of an EOT checkpoint honours its per-voxel support: eps inside the ROI, eps_bg outside."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import requires_hippocampus, run_cli
from nnunetv2_voxshield.budget import raw_budget
from nnunetv2_voxshield.export import export_entry
from nnunetv2_voxshield.verify import verify_datasets
from test_trainer import make_trainer

pytestmark = requires_hippocampus


def case_differences(clean, protected):
    """Per training case: (image is float32, clean image, |protected - clean|, voxels outside the ROI)."""
    for label_file in sorted((clean / 'labelsTr').glob('*.nii.gz')):
        case = label_file.name[:-len('.nii.gz')]
        image = sitk.ReadImage(str(clean / 'imagesTr' / f'{case}_0000.nii.gz'))
        x = sitk.GetArrayFromImage(image).astype(np.float64)
        xp = sitk.GetArrayFromImage(sitk.ReadImage(str(protected / 'imagesTr' / f'{case}_0000.nii.gz')))
        outside = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))) == 0
        yield image.GetPixelID() == sitk.sitkFloat32, x, np.abs(xp.astype(np.float64) - x), outside


def background_bound(x, eps_bg):
    """Per voxel: eps_bg of the case's range, plus float32 storage rounding of the protected value."""
    return raw_budget(x[None], eps=eps_bg)[0] * (1 + 1e-5) + np.spacing(np.abs(x).astype(np.float32))


def test_eot_checkpoint_exports_with_background_support(hippocampus_env, test_trainers_env):
    trainer = 'nnUNetTrainerVoxShieldEOT_tiny'
    run_cli(['nnUNetv2_train', '4', '3d_fullres', '0', '-tr', trainer, '-device', 'cpu'])
    fold = hippocampus_env['nnUNet_results'] / 'Dataset004_Hippocampus' / f'{trainer}__nnUNetPlans__3d_fullres' / 'fold_0'
    state = torch.load(fold / 'checkpoint_final.pth', weights_only=False)['voxshield']
    assert state['eps_bg'] == 1 / 255 and state['method'] == 'voxshield_eot'

    raw = hippocampus_env['nnUNet_raw']
    clean, protected = raw / 'Dataset004_Hippocampus', raw / 'Dataset045_HippocampusProtected'
    run_cli(['voxshield_export', '-d', '4', '-o', '45', '-tr', trainer, '-f', '0', '-device', 'cpu'])
    try:
        run_cli(['voxshield_verify', clean, protected])
        checked_float = 0
        for is_float, x, diff, outside in case_differences(clean, protected):
            if is_float:  # integer images round to whole units
                assert np.all(diff[outside] <= background_bound(x, 1 / 255)[outside])
                assert np.count_nonzero(diff[outside]) > 0.5 * outside.sum()  # the support is not the label
                assert diff[~outside].max() > raw_budget(x[None], eps=1 / 255)[0]  # the ROI uses the full budget
                checked_float += 1
        assert checked_float > 0
    finally:
        shutil.rmtree(protected)  # the raw folder is shared by the session


@pytest.mark.parametrize('variant,eps_bg', [('nnUNetTrainerVoxShieldEOT_noBG', 0.0),
                                            ('nnUNetTrainerVoxShieldEOT_defAware', 1 / 255),
                                            ('nnUNetTrainerVoxShieldEOT_2DAware', 1 / 255)])
def test_every_eot_variant_exports_and_verifies(hippocampus_env, variant, eps_bg):
    """A checkpoint of each EOT variant (saved by the trainer itself) exports and passes voxshield_verify; outside
    the ROI delta is exactly zero for _noBG and within eps_bg (and mostly non-zero) for the others."""
    trainer = make_trainer(variant)
    with torch.no_grad():
        for p in trainer.generator.parameters():  # saturate tanh so that both bounds are reached
            p.mul_(50)
    trainer.save_checkpoint(str(Path(trainer.output_folder) / 'checkpoint_final.pth'))
    assert trainer.voxshield_state()['eps_bg'] == pytest.approx(eps_bg)

    raw = hippocampus_env['nnUNet_raw']
    clean, protected = raw / 'Dataset004_Hippocampus', raw / 'Dataset046_HippocampusVariant'
    export_entry(['-d', '4', '-o', '46', '--name', 'HippocampusVariant', '-tr', variant, '-f', '0', '-device', 'cpu'])
    try:
        report = verify_datasets(str(clean), str(protected))
        assert report['violations'] == [] and report['summary']['cases'] == len(hippocampus_env['cases'])
        assert report['summary']['max_budget_use'] > 0.9
        for is_float, x, diff, outside in case_differences(clean, protected):
            assert diff[~outside].max() > 0
            if eps_bg == 0:
                assert np.all(diff[outside] == 0)  # the support is the ROI
            elif is_float:  # integer images round to whole units
                assert np.all(diff[outside] <= background_bound(x, eps_bg)[outside])
                assert np.count_nonzero(diff[outside]) > 0.5 * outside.sum()
    finally:
        shutil.rmtree(protected, ignore_errors=True)  # the raw folder is shared by the session
