"""nnUNetTrainerVoxShield in-process (step semantics, budget, checkpoints) and through stock nnU-Net commands."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import requires_hippocampus, run_cli, same, snapshot
from nnunetv2_voxshield.budget import roi_mask
from nnunetv2_voxshield.nnunet_ext import trainer_folder

pytestmark = requires_hippocampus


def make_trainer(name='nnUNetTrainerVoxShield', configuration='3d_fullres'):
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args('4', configuration, 0, name, 'nnUNetPlans', device=torch.device('cpu'))
    trainer.on_train_start()
    return trainer




def test_generator_step_freezes_surrogate_and_surrogate_step_freezes_generator(hippocampus_env):
    trainer = make_trainer()
    batch = next(trainer.dataloader_train)
    net0, gen0 = snapshot(trainer.network), snapshot(trainer.generator)

    out = trainer.train_step(batch)  # iteration 0: surrogate step
    assert not same(net0, snapshot(trainer.network)) and same(gen0, snapshot(trainer.generator))
    assert np.isnan(out['l_spd']) and out['delta_over_budget'] <= 1 + 1e-6

    net1 = snapshot(trainer.network)
    sgd_state1 = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in trainer.optimizer.state.items()}
    out = trainer.train_step(batch)  # iteration 1: generator step
    assert same(net1, snapshot(trainer.network)), 'the generator step changed the surrogate'
    assert not same(gen0, snapshot(trainer.generator))
    assert all(torch.equal(sgd_state1[k][kk], trainer.optimizer.state[k][kk]) for k in sgd_state1 for kk in sgd_state1[k])
    assert all(p.requires_grad for p in trainer.network.parameters())
    assert out['l_spd'] <= 0 and out['l_isc'] <= 0 and np.isfinite(out['l_seg'])


def test_perturbation_respects_case_budget_and_roi(hippocampus_env):
    trainer = make_trainer()
    batch = next(trainer.dataloader_train)
    with torch.no_grad():
        for p in trainer.generator.parameters():  # saturate tanh so the clamp is exercised
            p.mul_(50)
        delta, eps = trainer.perturbation(batch['data'], batch['target'], batch['keys'])
    mask = roi_mask(batch['target'][0]).expand_as(delta)
    assert torch.all(delta.abs() <= eps + 1e-7)
    assert torch.all(delta[mask == 0] == 0)
    assert (delta.abs() / eps).max() > 0.9  # the budget is used, not just respected
    for key, e in zip(batch['keys'], eps.flatten()):
        assert e.item() == pytest.approx(trainer.case_budgets[key]['eps_norm'][0], rel=1e-6)
        b = trainer.case_budgets[key]
        assert b['eps_norm'][0] == pytest.approx(b['raw_budget'][0] * b['scale'][0])


def test_checkpoint_round_trip_resumes_exactly(hippocampus_env, tmp_path):
    a = make_trainer()
    batch = next(a.dataloader_train)
    for _ in range(3):
        a.train_step(batch)
    ckpt = str(tmp_path / 'ckpt.pth')
    a.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved['voxshield']['iteration'] == 3 and saved['trainer_name'] == 'nnUNetTrainerVoxShield'
    assert set(saved['voxshield']['case_budgets']) == set(hippocampus_env['cases'])

    from nnunetv2.run.run_training import get_trainer_from_args
    b = get_trainer_from_args('4', '3d_fullres', 0, 'nnUNetTrainerVoxShield', 'nnUNetPlans', device=torch.device('cpu'))
    b.load_checkpoint(ckpt)
    assert b.voxshield_iteration == 3 and b.case_budgets == a.case_budgets
    for trainer in (a, b):
        torch.manual_seed(123)
        trainer.train_step(batch)  # generator step (iteration 3)
        trainer.train_step(batch)  # surrogate step (iteration 4)
    assert same(snapshot(a.network), snapshot(b.network))
    assert same(snapshot(a.generator), snapshot(b.generator))


def test_loading_a_stock_checkpoint_is_refused(hippocampus_env, tmp_path):
    from nnunetv2.run.run_training import get_trainer_from_args
    stock = get_trainer_from_args('4', '3d_fullres', 0, 'nnUNetTrainer', 'nnUNetPlans', device=torch.device('cpu'))
    stock.initialize()
    ckpt = str(tmp_path / 'stock.pth')
    stock.save_checkpoint(ckpt)
    ours = get_trainer_from_args('4', '3d_fullres', 0, 'nnUNetTrainerVoxShield', 'nnUNetPlans',
                                 device=torch.device('cpu'))
    with pytest.raises(RuntimeError, match='not a VoxShield checkpoint'):
        ours.load_checkpoint(ckpt)


def test_2d_configuration_trains_without_slice_term(hippocampus_env):
    trainer = make_trainer(configuration='2d')
    batch = next(trainer.dataloader_train)
    trainer.train_step(batch)
    out = trainer.train_step(batch)
    assert trainer.generator_kwargs['dims'] == 2 and out['l_isc'] == 0.0 and np.isfinite(out['l_seg'])


def test_stock_commands_train_resume_validate_predict(hippocampus_env, test_trainers_env, tmp_path):
    results = hippocampus_env['nnUNet_results']
    run_cli(['nnUNetv2_train', '4', '3d_fullres', '0', '-tr', 'nnUNetTrainerVoxShield_tiny', '-device', 'cpu'])
    fold = results / 'Dataset004_Hippocampus' / 'nnUNetTrainerVoxShield_tiny__nnUNetPlans__3d_fullres' / 'fold_0'
    ckpt = torch.load(fold / 'checkpoint_final.pth', weights_only=False)
    assert ckpt['voxshield']['iteration'] == 4 and ckpt['voxshield']['method'] == 'voxshield'
    log = next(fold.glob('training_log_*.txt')).read_text()
    assert 'VoxShield: L_seg' in log and 'max|delta|/budget' in log
    assert (fold / 'validation' / 'summary.json').is_file()

    run_cli(['nnUNetv2_train', '4', '3d_fullres', '0', '-tr', 'nnUNetTrainerVoxShield_tiny', '-device', 'cpu', '--c'])
    run_cli(['nnUNetv2_train', '4', '3d_fullres', '0', '-tr', 'nnUNetTrainerVoxShield_tiny', '-device', 'cpu', '--val'])
    images = tmp_path / 'in'
    images.mkdir()
    case = hippocampus_env['cases'][0]
    shutil.copy(hippocampus_env['nnUNet_raw'] / 'Dataset004_Hippocampus' / 'imagesTr' / f'{case}_0000.nii.gz', images)
    run_cli(['nnUNetv2_predict', '-i', images, '-o', tmp_path / 'out', '-d', '4', '-c', '3d_fullres', '-f', '0',
             '-tr', 'nnUNetTrainerVoxShield_tiny', '-device', 'cpu'])
    assert (tmp_path / 'out' / f'{case}.nii.gz').is_file()


def test_unknown_trainer_variant_gives_nnunets_error(hippocampus_env):
    proc = run_cli(['nnUNetv2_train', '4', '3d_fullres', '0', '-tr', 'nnUNetTrainerVoxShield_nope', '-device', 'cpu'],
                   check=False)
    assert proc.returncode != 0
    assert 'Could not find requested nnunet trainer nnUNetTrainerVoxShield_nope' in proc.stderr


def test_fresh_interpreter_finds_our_trainers_without_manual_export():
    code = ('import os; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; '
            'print(os.environ["nnUNet_extTrainer"]); print(f("nnUNetTrainerVoxShield_noISC").lambda_isc)')
    proc = run_cli([sys.executable, '-c', code], {'nnUNet_extTrainer': None})
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == trainer_folder() and lines[-1] == '0.0'
    # user entries are kept in front, ours is appended once
    proc = run_cli([sys.executable, '-c', 'import os; print(os.environ["nnUNet_extTrainer"])'],
                   {'nnUNet_extTrainer': '/somewhere/else'})
    assert proc.stdout.strip() == os.pathsep.join(['/somewhere/else', trainer_folder()])
    assert sorted(p.name for p in Path(trainer_folder()).glob('*.py')) == ['__init__.py', 'voxshield_trainers.py']


def _erase_labels(raw_dataset: Path, preprocessed_config_folder: Path):
    """Make every label all background, in the raw data and in nnU-Net's preprocessed copy (stock planning cannot
    fingerprint a dataset without foreground, so the preprocessed copy is edited after planning)."""
    import SimpleITK as sitk
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    for label_file in (raw_dataset / 'labelsTr').glob('*.nii.gz'):
        image = sitk.ReadImage(str(label_file))
        empty = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * 0)
        empty.CopyInformation(image)
        sitk.WriteImage(empty, str(label_file))
    dataset_class = infer_dataset_class(str(preprocessed_config_folder))
    dataset = dataset_class(str(preprocessed_config_folder))
    for identifier in dataset.identifiers:
        data, seg, _, properties = dataset.load_case(identifier)
        data, seg = np.asarray(data), np.asarray(seg).copy()
        seg[seg > 0] = 0
        properties['class_locations'] = {k: np.zeros((0, 4), dtype=np.int64) for k in properties['class_locations']}
        for suffix in ('.b2nd', '_seg.b2nd', '.pkl'):
            (preprocessed_config_folder / f'{identifier}{suffix}').unlink()
        dataset.save_case(data, seg, properties, str(preprocessed_config_folder / identifier))


def test_all_background_labels_train_with_a_warning(planned_hippocampus, tmp_path, monkeypatch):
    for name in ('nnUNet_raw', 'nnUNet_preprocessed'):
        shutil.copytree(planned_hippocampus[name], tmp_path / name)
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'nnUNet_results'))
    name = planned_hippocampus['dataset_name']
    _erase_labels(tmp_path / 'nnUNet_raw' / name, tmp_path / 'nnUNet_preprocessed' / name / 'nnUNetPlans_3d_fullres')
    with pytest.warns(UserWarning, match='empty ROI'):
        trainer = make_trainer()
    assert all(b['empty_roi'] for b in trainer.case_budgets.values())
    batch = next(trainer.dataloader_train)
    for _ in range(2):
        out = trainer.train_step(batch)
        assert np.isfinite(out['l_seg']) and out['delta_over_budget'] == 0.0
    assert all(torch.isfinite(v).all() for v in snapshot(trainer.generator).values())
    log = Path(trainer.log_file).read_text()
    assert f'{len(planned_hippocampus["cases"])} of {len(planned_hippocampus["cases"])} cases have an empty ROI' in log
