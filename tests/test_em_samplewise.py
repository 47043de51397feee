"""Sample-wise error-minimising noise (Huang et al. 2021; issue 29.3): crop mapping, budgets in normalised and raw
units, PGD lowers the loss, one atomic checkpoint (deltas and RNG states) every epoch and no checkpoint_best, --c
resumes bit for bit, the stop rule, export + verify (phantom)."""
import os
import random
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TEST_TRAINERS, run_cli, use_cpu_preset_as_default_plans
from nnunetv2_voxshield.export import export_entry
from nnunetv2_voxshield.phantom import write_phantom_dataset
from nnunetv2_voxshield.samplewise import (DeltaStore, SampleWiseSource, crop_delta, full_case_bound, insert_delta,
                                           inside_case, pgd_step)
from nnunetv2_voxshield.verify import verify_datasets

NAME = 'Dataset981_EMPhantom'


# ----------------------------------------------------------------------------------------- math, no data
def test_crop_and_insert_map_a_box_partly_outside_the_case():
    delta = torch.arange(2 * 5 * 6 * 7, dtype=torch.float32).view(2, 5, 6, 7)
    box = [[-2, 3], [4, 9], [1, 5]]  # leaves the case before axis 0 and after axis 1
    patch = crop_delta(delta, box)
    assert patch.shape == (2, 5, 5, 4)
    torch.testing.assert_close(patch[:, 2:, :2], delta[:, 0:3, 4:6, 1:5])
    assert torch.all(patch[:, :2] == 0) and torch.all(patch[:, :, 2:] == 0)
    inside = inside_case(delta.shape[1:], box)
    assert inside.shape == (1, 5, 5, 4) and inside.sum() == 3 * 2 * 4 and torch.all(inside[:, 2:, :2] == 1)
    copy = delta.clone()
    insert_delta(copy, box, patch * -1 - 1000)
    changed = copy != delta
    assert changed[:, 0:3, 4:6, 1:5].all() and changed.sum() == 2 * 3 * 2 * 4  # only the overlap is written
    torch.testing.assert_close(copy[:, 0:3, 4:6, 1:5], -delta[:, 0:3, 4:6, 1:5] - 1000)


def test_initial_delta_fills_the_bound_seeded_per_case():
    seg = np.zeros((1, 6, 8, 9), dtype=np.int16)
    seg[0, 1:4, 2:6, 3:7], seg[0, 4, 1, 1], seg[0, 5, 5, 5] = 1, 2, 3  # 3: the ignore label, outside the ROI
    bound = full_case_bound(seg, [0.2], 0.25, labels=[1, 2])
    roi = (seg == 1) | (seg == 2)
    torch.testing.assert_close(bound[torch.from_numpy(roi)], torch.full((int(roi.sum()),), 0.2))
    torch.testing.assert_close(bound[torch.from_numpy(~roi)], torch.full((int((~roi).sum()),), 0.05))
    a, b = DeltaStore(), DeltaStore()
    a.initialise('case_1', bound, 0)
    b.initialise('case_0', bound, 0)
    b.initialise('case_1', bound, 0)
    assert torch.equal(a.deltas['case_1'], b.deltas['case_1']) and not torch.equal(b.deltas['case_0'],
                                                                                     b.deltas['case_1'])
    d = a.deltas['case_1']
    assert torch.all(d.abs() <= bound) and d[torch.from_numpy(roi)].abs().max() > 0.15  # U(-b, b)


def test_pgd_step_descends_and_projects():
    """loss = sum(w * (x + d)): the signed step moves d by -step sign(w), clipped to the bound."""
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    x = torch.zeros(1, 4)
    bound = torch.tensor([[0.1, 0.1, 0.0, 0.1]])
    delta = torch.tensor([[0.0, 0.095, 0.0, -0.1]])
    new, loss = pgd_step(lambda d: (w * (x + d)).sum(), delta, bound, 0.01 * torch.ones(1, 4))
    assert loss == pytest.approx(float((w * delta).sum()))
    torch.testing.assert_close(new, torch.tensor([[-0.01, 0.1, 0.0, -0.1]]))


# ----------------------------------------------------------------------------------------- the trainer (phantom)
@pytest.fixture(scope='module')
def phantom(tmp_path_factory):
    """3 phantom cases (two labels, ~32-40 voxels per axis: larger than the CPU preset's 32^3 patch along some axes),
    planned by stock nnU-Net, with the CPU preset as nnUNetPlans."""
    base = tmp_path_factory.mktemp('em_samplewise')
    roots = {name: base / name for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for d in roots.values():
        d.mkdir()
    write_phantom_dataset(981, name='EMPhantom', n_cases=3, raw_root=str(roots['nnUNet_raw']))
    run_cli(['nnUNetv2_plan_and_preprocess', '-d', '981', '-c', '3d_fullres', '-np', '1', '-npfp', '1'],
            {**{k: str(v) for k, v in roots.items()}, 'nnUNet_n_proc_DA': None})
    use_cpu_preset_as_default_plans(roots['nnUNet_preprocessed'] / NAME)
    return roots


@pytest.fixture
def em_env(phantom, tmp_path, monkeypatch):
    for name in ('nnUNet_raw', 'nnUNet_preprocessed'):
        monkeypatch.setenv(name, str(phantom[name]))
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'nnUNet_results'))
    monkeypatch.setenv('nnUNet_n_proc_DA', '0')  # one process: the loader draws from the checkpointed generators
    entries = [str(TEST_TRAINERS)] + [p for p in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p]
    monkeypatch.setenv('nnUNet_extTrainer', os.pathsep.join(entries))
    return {**phantom, 'nnUNet_results': tmp_path / 'nnUNet_results'}


def make_trainer(name='nnUNetTrainerEMSampleWise', **attributes):
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args('981', '3d_fullres', 'all', name, 'nnUNetPlans', device=torch.device('cpu'))
    for key, value in attributes.items():
        setattr(trainer, key, value)
    trainer.on_train_start()
    return trainer


def _case_bounds(trainer):
    """Each case's bound b (c, *shape) in normalised units, from its whole preprocessed label map."""
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, sorted(trainer.deltas.deltas))
    bounds = {}
    for key in sorted(trainer.deltas.deltas):
        seg = np.asarray(dataset.load_case(key)[1])
        bounds[key] = (seg, full_case_bound(seg[:1], trainer.case_budgets[key]['eps_norm'], trainer.bg_weight,
                                            [1, 2], 0))
    return bounds


def _steps(trainer, n):
    return [trainer.train_step(next(trainer.dataloader_train)) for _ in range(n)]


@pytest.mark.parametrize('name, bg', [('nnUNetTrainerEMSampleWise_eps16', 0.0),
                                      ('nnUNetTrainerEMSampleWiseEOT', 1 / 255)])
def test_deltas_stay_within_the_budget_everywhere_in_normalised_units(em_env, name, bg):
    trainer = make_trainer(name, pgd_steps=3)
    assert trainer.eps_bg == bg and set(trainer.deltas.deltas) == set(trainer.case_budgets)
    outs = _steps(trainer, 6)
    assert [o['kind'] for o in outs] == ['surrogate', 'pgd'] * 3
    assert all(0 < o['delta_over_budget'] <= 1 + 1e-6 for o in outs)
    for key, (seg, bound) in _case_bounds(trainer).items():
        delta = trainer.deltas.deltas[key]
        assert delta.shape == seg.shape and delta.dtype == torch.float32  # the whole case, not a patch
        assert torch.all(delta.abs() <= bound * (1 + 1e-6))
        roi = torch.from_numpy(seg > 0)
        eps = trainer.case_budgets[key]['eps_norm'][0]
        assert delta[roi].abs().max() > 0.9 * eps  # the budget is used inside the ROI
        outside = delta[~roi].abs()
        if bg == 0:
            assert torch.all(outside == 0)
        else:
            assert 0 < outside.max() <= eps * bg / trainer.eps * (1 + 1e-6)


def test_pgd_batch_lowers_the_frozen_surrogates_loss_and_touches_only_the_crops(em_env):
    trainer = make_trainer(pgd_steps=5)
    _steps(trainer, 1)  # one surrogate step: a surrogate that has seen the data
    batch = next(trainer.dataloader_train)
    keys, boxes = batch['keys'], batch['bbox']
    bound = trainer._batch_bound(keys, batch['target']) * trainer.deltas.inside(keys, boxes)
    delta = trainer.deltas.crop(keys, boxes)
    before = {k: v.clone() for k, v in trainer.deltas.deltas.items()}
    weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}

    def loss(d):  # NoDA's T is deterministic: the same batch gives the same loss
        with torch.no_grad():
            x_t, y_t = trainer.victim_view(batch['data'] + d, batch['target'])
            trainer.network.eval()
            return float(trainer.loss(trainer.network(x_t), y_t))

    start = loss(delta)
    trainer.network.train()
    trainer.em_iteration = 1  # a PGD batch
    out = trainer.train_step(batch)
    assert all(p.requires_grad for p in trainer.network.parameters()) and trainer.network.training  # restored
    new = trainer.deltas.crop(keys, boxes)
    assert out['kind'] == 'pgd' and out['pgd_loss'] == pytest.approx(start, rel=0.2)  # PGD's mean loss on it
    assert loss(new) < start - 1e-3  # the min-min step lowers the loss on this very batch
    assert torch.all(new.abs() <= bound * (1 + 1e-6)) and not torch.equal(new, delta)
    assert all(torch.equal(v, trainer.network.state_dict()[k]) for k, v in weights.items())  # surrogate frozen
    for key, value in before.items():  # outside this batch's boxes nothing moved
        mask = torch.ones_like(value, dtype=torch.bool)
        for k, box in zip(keys, boxes):
            if k == key:
                mask[(slice(None), *[slice(max(a, 0), max(b, 0)) for a, b in box])] = False
        assert torch.equal(value[mask], trainer.deltas.deltas[key][mask])


def test_checkpoint_is_one_write_holds_deltas_and_rng_and_resumes_bit_for_bit(em_env, tmp_path, monkeypatch):
    """One torch.save per checkpoint (deltas, nnU-Net's entries, RNG states); load restores the deltas exactly, and
    the first epoch after --c (``on_train_epoch_start``) continues as the run that was never interrupted."""
    a = make_trainer(pgd_steps=2)
    _steps(a, 4)
    ckpt = str(tmp_path / 'checkpoint.pth')
    real_save, calls = torch.save, []
    monkeypatch.setattr(torch, 'save', lambda obj, f, *args, **kw: calls.append(f) or real_save(obj, f, *args, **kw))
    a.save_checkpoint(ckpt)
    monkeypatch.setattr(torch, 'save', real_save)
    assert len(calls) == 1, f'{len(calls)} writes for one checkpoint'
    assert sorted(os.listdir(tmp_path)) == ['checkpoint.pth', 'nnUNet_results']  # no side files left
    checkpoint = torch.load(ckpt, weights_only=False)
    state, rng = checkpoint['voxshield'], checkpoint['rng_state']
    assert state['method'] == 'em_samplewise' and state['iteration'] == 4 and state['foreground_labels'] == [1, 2]
    assert checkpoint['current_epoch'] == 1 and 'network_weights' in checkpoint and 'optimizer_state' in checkpoint
    assert torch.equal(rng['torch'], torch.get_rng_state())  # the generators' states at the save
    assert np.array_equal(rng['numpy'][1], np.random.get_state()[1]) and rng['python'] == random.getstate()
    # the uninterrupted run: nnU-Net's next epoch, from the generators as they were at the save
    a.current_epoch += 1
    a.on_train_epoch_start()
    outs_a = _steps(a, 2)
    b = make_trainer(pgd_steps=2)  # draws from the global generators (network init, the loaders' first batch)
    assert not all(torch.equal(a.deltas.deltas[k], b.deltas.deltas[k]) for k in a.deltas.deltas)  # moved by PGD
    b.load_checkpoint(ckpt)
    assert set(b.deltas.deltas) == set(a.deltas.deltas)
    assert all(torch.equal(state['deltas'][k], b.deltas.deltas[k]) for k in state['deltas'])
    assert b.em_iteration == 4 and b.case_budgets == a.case_budgets and not b.em_stopped and b.current_epoch == 1
    b.on_train_epoch_start()  # restores the checkpoint's RNG states
    outs_b = _steps(b, 2)
    assert [o['kind'] for o in outs_b] == ['surrogate', 'pgd']
    assert [float(o['loss']) for o in outs_a] == [float(o['loss']) for o in outs_b]
    assert all(torch.equal(a.deltas.deltas[k], b.deltas.deltas[k]) for k in a.deltas.deltas)
    assert not all(torch.equal(state['deltas'][k], b.deltas.deltas[k]) for k in state['deltas'])  # PGD moved them
    weights_b = b.network.state_dict()
    assert all(torch.equal(v, weights_b[k]) for k, v in a.network.state_dict().items())


def test_checkpoint_latest_every_epoch_and_never_checkpoint_best(em_env):
    """nnU-Net's ``on_epoch_end`` with a rising pseudo Dice (stock writes checkpoint_best, and checkpoint_latest every
    50 epochs): checkpoint_latest.pth after every epoch, checkpoint_best.pth never."""
    trainer = make_trainer(pgd_steps=1)
    folder = Path(trainer.output_folder)
    outputs = [{'loss': np.float32(0.5), 'kind': 'surrogate', 'delta_over_budget': 0.5},
               {'loss': np.float32(0.4), 'kind': 'pgd', 'pgd_loss': 0.4, 'delta_over_budget': 0.5}]
    for epoch in range(2):
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        trainer.on_train_epoch_end(outputs)
        for key, value in (('val_losses', 0.5), ('dice_per_class_or_region', [0.1, 0.2]),
                           ('mean_fg_dice', 0.2 + 0.3 * epoch)):
            trainer.logger.log(key, value, epoch)
        trainer.on_epoch_end()
        latest = torch.load(folder / 'checkpoint_latest.pth', weights_only=False)
        assert latest['current_epoch'] == epoch + 1 and set(latest['rng_state']) >= {'python', 'numpy', 'torch'}
        assert set(latest['voxshield']['deltas']) == set(trainer.case_budgets)
        assert not (folder / 'checkpoint_best.pth').exists()
    assert trainer._best_ema is not None and trainer.logger.get_value('em_pgd_loss', step=-1) == pytest.approx(0.4)
    assert not [n for n in os.listdir(folder) if n.startswith('.partial') or n.endswith(('.part', '.tmp'))]


def _export_and_verify(em_env, trainer_name, out_id=982, eps='4/255'):
    """voxshield_export of the trainer's checkpoint, then voxshield_verify's check (``verify_datasets``) and ours."""
    raw = em_env['nnUNet_raw']
    clean = raw / NAME
    protected = raw / f'Dataset{out_id}_EMPhantomProtected'
    export_entry(['-d', NAME, '-o', str(out_id), '-tr', trainer_name, '-f', 'all', '-device', 'cpu'])
    try:
        report = verify_datasets(str(clean), str(protected), float(Fraction(eps)))
        assert report['violations'] == [] and report['summary']['cases'] == 3
        uses = []
        for label_file in sorted((clean / 'labelsTr').glob('*.nii.gz')):
            case = label_file.name[:-len('.nii.gz')]
            assert (protected / 'labelsTr' / label_file.name).read_bytes() == label_file.read_bytes()
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
            x = sitk.GetArrayFromImage(sitk.ReadImage(str(clean / 'imagesTr' / f'{case}_0000.nii.gz')))
            xp = sitk.GetArrayFromImage(sitk.ReadImage(str(protected / 'imagesTr' / f'{case}_0000.nii.gz')))
            diff = np.abs(xp.astype(np.float64) - x)
            assert np.all(diff[seg == 0] == 0)  # eps_bg = 0: nothing outside the labels
            budget = float(Fraction(eps)) * np.subtract(*np.percentile(x, (99.5, 0.5)))
            assert diff.max() <= budget * (1 + 1e-9)
            uses.append(diff[seg > 0].max() / budget)
        assert min(uses) > 0.5  # every case carries its delta at a good part of the budget
    finally:
        shutil.rmtree(protected, ignore_errors=True)


def test_final_validation_skipped_only_when_asked_and_a_bad_value_fails_at_once(em_env, monkeypatch):
    """``VOXSHIELD_SKIP_VALIDATION``: unset or 0 runs nnU-Net's validation, 1 writes a log line and no validation
    folder, anything else fails when the trainer is built, naming the trainer and the variable."""
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    calls = []
    monkeypatch.setattr(nnUNetTrainer, 'perform_actual_validation', lambda self, save=False: calls.append(save))
    args = ('981', '3d_fullres', 'all', 'nnUNetTrainerEMSampleWise', 'nnUNetPlans')
    for value, expected in ((None, [True]), ('0', [True]), ('1', [])):
        if value is None:
            monkeypatch.delenv('VOXSHIELD_SKIP_VALIDATION', raising=False)
        else:
            monkeypatch.setenv('VOXSHIELD_SKIP_VALIDATION', value)
        calls.clear()
        trainer = get_trainer_from_args(*args, device=torch.device('cpu'))
        trainer.perform_actual_validation(True)
        assert calls == expected
    assert not (Path(trainer.output_folder) / 'validation').exists()
    assert 'final validation skipped (VOXSHIELD_SKIP_VALIDATION=1)' in Path(trainer.log_file).read_text()
    monkeypatch.setenv('VOXSHIELD_SKIP_VALIDATION', 'yes')
    with pytest.raises(ValueError, match=r"^nnUNetTrainerEMSampleWise: VOXSHIELD_SKIP_VALIDATION='yes': expected 0 or 1$"):
        get_trainer_from_args(*args, device=torch.device('cpu'))


@pytest.mark.slow
def test_stock_nnunetv2_train_stops_by_the_rule_and_resumes_exactly(em_env):
    """``_tinyStop``: 3 epochs planned, stop_loss above any loss, so stock nnUNetv2_train ends after epoch 0 with
    checkpoint_final; what ``--c`` does (``maybe_load_checkpoint``, then ``run_training``) restores the deltas
    exactly and stays stopped."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    name = 'nnUNetTrainerEMSampleWise_tinyStop'
    run_cli(['nnUNetv2_train', '981', '3d_fullres', 'all', '-tr', name, '-device', 'cpu'])
    fold = em_env['nnUNet_results'] / NAME / f'{name}__nnUNetPlans__3d_fullres' / 'fold_all'
    first = torch.load(fold / 'checkpoint_final.pth', weights_only=False)
    assert first['current_epoch'] == 1 and first['voxshield']['stopped'] and first['voxshield']['iteration'] == 4
    assert set(first['rng_state']) >= {'python', 'numpy', 'torch'}
    assert not (fold / 'checkpoint_best.pth').exists() and not (fold / 'checkpoint_latest.pth').exists()
    log = next(fold.glob('training_log_*.txt')).read_text()
    assert 'stop rule met' in log and 'Epoch 1' not in log and 'validation skipped' in log  # the run completed
    trainer = get_trainer_from_args('981', '3d_fullres', 'all', name, 'nnUNetPlans', device=torch.device('cpu'))
    maybe_load_checkpoint(trainer, True, False)
    deltas = first['voxshield']['deltas']
    assert set(deltas) == set(trainer.deltas.deltas) and len(deltas) == 3
    assert all(torch.equal(deltas[k], trainer.deltas.deltas[k]) for k in deltas)
    trainer.run_training()  # stopped: no epoch runs, checkpoint_final is written again
    again = torch.load(fold / 'checkpoint_final.pth', weights_only=False)
    assert again['current_epoch'] == 1 and again['voxshield']['iteration'] == 4 and 'rng_state' in again
    assert not (fold / 'checkpoint_best.pth').exists()
    assert all(torch.equal(deltas[k], again['voxshield']['deltas'][k]) for k in deltas)


def test_checkpoint_exports_and_passes_verify(em_env):
    trainer = make_trainer(pgd_steps=2)
    _steps(trainer, 2)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, 'checkpoint_final.pth'))
    _export_and_verify(em_env, 'nnUNetTrainerEMSampleWise')


def test_export_source_clamps_to_the_export_budget_and_names_a_missing_case():
    seg = np.zeros((1, 4, 5, 6), dtype=np.int16)
    seg[0, 1:3, 1:4, 2:5] = 1
    state = {'method': 'em_samplewise', 'foreground_labels': [1], 'eps': 4 / 255, 'eps_bg': 0.0,
             'roi': {'dilation': 0}, 'deltas': {'a': torch.full((1, 4, 5, 6), 0.3)}}
    source = SampleWiseSource(state)
    out = source.compute_delta(np.zeros((1, 4, 5, 6), np.float32), seg, np.array([0.1], np.float32), 'a')
    assert np.all(out[seg > 0] == pytest.approx(0.1)) and np.all(out[seg == 0] == 0)
    from nnunetv2_voxshield.dataset_io import InputError
    with pytest.raises(InputError, match='b: the checkpoint holds no delta'):
        source.compute_delta(np.zeros((1, 4, 5, 6), np.float32), seg, np.array([0.1], np.float32), 'b')
    with pytest.raises(InputError, match='shape'):
        source.compute_delta(np.zeros((1, 4, 5, 7), np.float32), seg, np.array([0.1], np.float32), 'a')


# ------------------------------------------------------------- several classes: the three-class phantom and ACDC
def em_train_export_verify(roots: dict, dataset_id: int, source: Path, out_id: int, labels=(1, 2, 3),
                           eps: str = '4/255') -> None:
    """Preprocess a planned dataset (3d_fullres, the CPU preset's network), train ``nnUNetTrainerEMSampleWise_tiny``
    with stock nnUNetv2_train, voxshield_export its deltas and check the copy: voxshield_verify passes at ``eps``,
    labels byte-identical, dtype and spacing kept, nothing outside the labels (eps_bg = 0), |delta| within each
    case's budget, and every class of ``labels`` carries a delta."""
    env = {**{k: str(v) for k, v in roots.items() if k.startswith('nnUNet')}, 'nnUNet_n_proc_DA': '0',
           'nnUNet_extTrainer': os.pathsep.join([str(TEST_TRAINERS)] + [
               p for p in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p])}
    run_cli(['nnUNetv2_preprocess', '-d', str(dataset_id), '-c', '3d_fullres', '-np', '1'], env)
    use_cpu_preset_as_default_plans(roots['nnUNet_preprocessed'] / source.name)
    run_cli(['nnUNetv2_train', str(dataset_id), '3d_fullres', 'all', '-tr', 'nnUNetTrainerEMSampleWise_tiny',
             '-device', 'cpu'], env)
    protected = roots['nnUNet_raw'] / f'Dataset{out_id}_{source.name.split("_", 1)[1]}Protected'
    export_entry(['-d', str(dataset_id), '-o', str(out_id), '-tr', 'nnUNetTrainerEMSampleWise_tiny', '-f', 'all',
                  '-device', 'cpu'])
    try:
        report = verify_datasets(str(source), str(protected), float(Fraction(eps)))
        assert report['violations'] == [] and report['summary']['max_budget_use'] <= 1 + 1e-6
        touched = set()
        for label_file in sorted((source / 'labelsTr').glob('*.nii.gz')):
            case = label_file.name[:-len('.nii.gz')]
            assert (protected / 'labelsTr' / label_file.name).read_bytes() == label_file.read_bytes()
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
            clean = sitk.ReadImage(str(source / 'imagesTr' / f'{case}_0000.nii.gz'))
            prot = sitk.ReadImage(str(protected / 'imagesTr' / f'{case}_0000.nii.gz'))
            assert prot.GetPixelIDValue() == clean.GetPixelIDValue() and prot.GetSpacing() == clean.GetSpacing()
            x = sitk.GetArrayFromImage(clean).astype(np.float64)
            diff = sitk.GetArrayFromImage(prot).astype(np.float64) - x
            assert np.all(diff[seg == 0] == 0)
            assert np.abs(diff).max() <= float(Fraction(eps)) * np.subtract(*np.percentile(x, (99.5, 0.5))) * (1 + 1e-6)
            touched |= {k for k in labels if np.count_nonzero(diff[seg == k]) > 0.5 * np.count_nonzero(seg == k) > 0}
        assert touched == set(labels)
    finally:
        shutil.rmtree(protected, ignore_errors=True)


def test_three_class_phantom_trains_exports_and_verifies(tmp_path, monkeypatch):
    """The sample-wise trainer on the three-class phantom (float32 and uint8 cases, thick slices): a delta in each of
    the three classes, within budget, verify passes."""
    from conftest import write_three_class_dataset
    roots = {name: tmp_path / name for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for name, folder in roots.items():
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    source = roots['nnUNet_raw'] / 'Dataset934_ThreeClassEM'
    write_three_class_dataset(source)
    run_cli(['nnUNetv2_plan_and_preprocess', '-d', '934', '-c', '3d_fullres', '-np', '1', '-npfp', '1'],
            {**{k: str(v) for k, v in roots.items()}, 'nnUNet_n_proc_DA': None})
    em_train_export_verify(roots, 934, source, 935)
