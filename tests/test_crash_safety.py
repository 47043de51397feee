"""Crash safety of protector training (issue 30, items 5 and 8): a checkpoint is written once and atomically, a
training killed in the middle of an epoch resumes with ``--c`` to the same next epoch as an uninterrupted run, and no
``checkpoint_best.pth`` (chosen by the surrogate's Dice) is written for protectors; export reads checkpoint_final."""
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TEST_TRAINERS, run_cli, same, snapshot, use_cpu_preset_as_default_plans
from nnunetv2_voxshield.phantom import write_phantom_dataset

DATASET = 'Dataset860_Crash'
TRAINER = 'nnUNetTrainerVoxShieldLC_crash'
HOLD_AT = 4                                         # iteration 4: the second step of epoch 1 (3 per epoch)


@pytest.fixture(scope='module')
def crash_phantom(tmp_path_factory):
    """3 phantom cases planned by stock nnU-Net (3d_fullres), the CPU preset as nnUNetPlans."""
    base = tmp_path_factory.mktemp('crash')
    roots = {name: base / name for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for d in roots.values():
        d.mkdir()
    write_phantom_dataset(860, 'Crash', n_cases=3, raw_root=str(roots['nnUNet_raw']))
    run_cli(['nnUNetv2_plan_and_preprocess', '-d', '860', '-c', '3d_fullres', '-np', '1', '-npfp', '1'],
            {**{k: str(v) for k, v in roots.items()}, 'nnUNet_n_proc_DA': None})
    use_cpu_preset_as_default_plans(roots['nnUNet_preprocessed'] / DATASET)
    return roots


@pytest.fixture
def crash_env(crash_phantom, tmp_path, monkeypatch):
    for name in ('nnUNet_raw', 'nnUNet_preprocessed'):
        monkeypatch.setenv(name, str(crash_phantom[name]))
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'nnUNet_results'))
    monkeypatch.setenv('nnUNet_n_proc_DA', '0')  # one process: the loader draws from the checkpointed generators
    entries = [str(TEST_TRAINERS)] + [p for p in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p]
    monkeypatch.setenv('nnUNet_extTrainer', os.pathsep.join(entries))
    threads = torch.get_num_threads()
    yield {**crash_phantom, 'nnUNet_results': tmp_path / 'nnUNet_results'}
    torch.set_num_threads(threads)  # the test trainer runs on one thread


def fold_folder(results: Path) -> Path:
    return Path(results) / DATASET / f'{TRAINER}__nnUNetPlans__3d_fullres' / 'fold_all'


def make_trainer():
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args('860', '3d_fullres', 'all', TRAINER, 'nnUNetPlans', device=torch.device('cpu'))
    trainer.initialize()
    return trainer


class Killed(BaseException):
    """Stands for SIGKILL inside torch.save (nothing after it runs, as after a real kill)."""


@pytest.mark.parametrize('when', ['half-written', 'written'])
def test_a_kill_while_saving_leaves_the_previous_checkpoint(crash_env, monkeypatch, when):
    """One write per checkpoint, to a temp file renamed over the target: a kill inside it (half the bytes written,
    or all of them but not yet renamed) leaves the previous checkpoint, complete and resumable."""
    trainer = make_trainer()
    folder = Path(trainer.output_folder)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / 'checkpoint_latest.pth'
    real_save, calls = torch.save, []
    monkeypatch.setattr(torch, 'save', lambda obj, f, *a, **k: calls.append(f) or real_save(obj, f, *a, **k))
    trainer.save_checkpoint(str(ckpt))
    assert len(calls) == 1, f'{len(calls)} writes for one checkpoint'
    before = ckpt.read_bytes()
    generator_before = snapshot(trainer.generator)

    with torch.no_grad():
        for p in trainer.generator.parameters():
            p.add_(1.0)
    stale = folder / f'.partial-99999999-{ckpt.name}'  # left by a writer killed earlier
    stale.write_bytes(b'partial')

    def dying_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        data = data[:len(data) // 2] if when == 'half-written' else data
        if isinstance(f, (str, os.PathLike)):
            with open(f, 'wb') as out:
                out.write(data)
        else:
            f.write(data)
            f.flush()
        raise Killed()

    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(Killed):
        trainer.save_checkpoint(str(ckpt))
    monkeypatch.setattr(torch, 'save', real_save)
    assert ckpt.read_bytes() == before
    assert not stale.exists(), 'the leftover of a killed write was not cleaned up'

    resumed = make_trainer()
    resumed.load_checkpoint(str(ckpt))
    assert same(generator_before, snapshot(resumed.generator))
    assert resumed.current_epoch == 1 and resumed.voxshield_iteration == 0


def test_export_reads_checkpoint_final_unless_told_otherwise(crash_env, capsys):
    """A protector's fold folder with checkpoint_latest.pth only: voxshield_export reads checkpoint_final.pth by
    default (``--chk`` to choose another), and says so in one line naming it."""
    from nnunetv2_voxshield import export
    trainer = make_trainer()
    folder = Path(trainer.output_folder)
    folder.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(folder / 'checkpoint_latest.pth'))
    with pytest.raises(SystemExit) as exc:
        export.export_entry(['-d', '860', '-o', '861', '-tr', TRAINER, '-f', 'all', '-device', 'cpu'])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1, err
    assert str(folder / 'checkpoint_final.pth') in err and 'not found' in err, err


def _steps(folder: Path) -> list:
    return [json.loads(line) for line in (folder / 'steps.jsonl').read_text().splitlines()]


def _train(extra=()):
    return ['nnUNetv2_train', '860', '3d_fullres', 'all', '-tr', TRAINER, '-device', 'cpu', *extra]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_next_epoch(crash_env, tmp_path):
    """SIGKILL to nnUNetv2_train in the middle of epoch 1 (after checkpoint_latest of epoch 0), then ``--c``: the
    resumed epoch draws the same cases, crops and tile phases, has the same losses, and ends with the same surrogate,
    generator, optimisers and RNG states as a run that was never interrupted. No checkpoint_best.pth is written."""
    killed_results = crash_env['nnUNet_results']
    err_file = tmp_path / 'killed.err'
    with open(err_file, 'w') as err:
        proc = subprocess.Popen([str(a) for a in _train()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, env={**os.environ, 'VOXSHIELD_TEST_HOLD': str(HOLD_AT)})
        try:
            held = any(line.strip() == 'VOXSHIELD_TEST_HOLDING' for line in proc.stdout)
            assert held, f'training ended before iteration {HOLD_AT}:\n{err_file.read_text()[-3000:]}'
            folder = fold_folder(killed_results)
            assert (folder / 'checkpoint_latest.pth').is_file() and not (folder / 'checkpoint_final.pth').exists()
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    left = torch.load(folder / 'checkpoint_latest.pth', weights_only=False)
    assert left['current_epoch'] == 1 and left['voxshield']['iteration'] == 3
    assert [s['iteration'] for s in _steps(folder)] == [0, 1, 2, 3]

    run_cli(_train(['--c']))  # resumes from checkpoint_latest (epoch 1, iteration 3)
    uninterrupted = tmp_path / 'uninterrupted'
    run_cli(_train(), {'nnUNet_results': uninterrupted})

    a, b = fold_folder(uninterrupted), folder
    steps_a, steps_b = _steps(a), _steps(b)
    assert [s['iteration'] for s in steps_b] == [0, 1, 2, 3, 3, 4, 5]
    assert steps_b[:4] == steps_a[:4], 'two fresh runs differ: the comparison below would mean nothing'
    assert steps_b[4:] == steps_a[3:], 'the resumed epoch drew other batches, tile phases or losses'
    for name in ('checkpoint_best.pth', 'checkpoint_latest.pth'):
        assert not (a / name).exists() and not (b / name).exists(), name

    final_a = torch.load(a / 'checkpoint_final.pth', weights_only=False)
    final_b = torch.load(b / 'checkpoint_final.pth', weights_only=False)
    assert final_a['current_epoch'] == final_b['current_epoch'] == 2
    assert _equal(final_a['network_weights'], final_b['network_weights']), 'surrogate'
    assert _equal(final_a['optimizer_state'], final_b['optimizer_state']), 'surrogate optimiser'
    va, vb = final_a['voxshield'], final_b['voxshield']
    assert va['iteration'] == vb['iteration'] == 6
    assert _equal(va['generator_weights'], vb['generator_weights']), 'generator'
    assert _equal(va['generator_optimizer_state'], vb['generator_optimizer_state']), 'generator optimiser'
    logs_a, logs_b = final_a['logging'], final_b['logging']
    for key in logs_a:
        if 'timestamps' not in key:
            assert _equal(logs_a[key], logs_b[key]), key
    assert _equal(final_a['rng_state'], final_b['rng_state']), 'random number generators'


def _equal(a, b) -> bool:
    """Nested dicts / lists / tuples of tensors, arrays and numbers, equal exactly (NaN equals NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (np.ndarray, np.generic, float)):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=np.asarray(a).dtype.kind == 'f')
    return a == b
