"""Victims: stock nnU-Net plan/preprocess, training (fold 'all', seeded) and prediction, run as subprocesses.

Every step runs in its own process with ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` pointing at
private folders (see ``nnunet_env``), so the user's nnU-Net folders are never touched. nnU-Net has no seed flag:
``python -m nnunetv2_voxshield.victims train ...`` seeds random/numpy/torch, then runs the stock trainer through
nnU-Net's own ``get_trainer_from_args`` / ``maybe_load_checkpoint`` / ``run_training`` (continuing an interrupted
run from ``checkpoint_latest.pth``). The final validation on the training cases is skipped: victims are scored on
held-out test cases instead.
"""
import argparse
import os
import shutil
import subprocess
import sys
from collections import deque
from typing import Dict, Optional, Sequence


class VictimError(RuntimeError):
    """A stock nnU-Net step failed; the message names the log file and ends with its last lines."""


def nnunet_env(raw: str, preprocessed: str, results: str, device: str = 'cpu') -> Dict[str, str]:
    """A copy of os.environ with private nnU-Net folders (and CPU-friendly defaults when ``device`` is cpu)."""
    env = dict(os.environ)
    env.update({'nnUNet_raw': raw, 'nnUNet_preprocessed': preprocessed, 'nnUNet_results': results})
    if device == 'cpu':
        env.setdefault('nnUNet_n_proc_DA', '0')
        env.setdefault('nnUNet_compile', 'false')
    return env


def victim_trainer_name(epochs: Optional[int] = None, trainer: Optional[str] = None) -> str:
    """``-tr`` wins; else stock ``nnUNetTrainer_{N}epochs`` (``nnUNetTrainer_1epoch``); else ``nnUNetTrainer``."""
    if trainer:
        return trainer
    if epochs is None:
        return 'nnUNetTrainer'
    return 'nnUNetTrainer_1epoch' if int(epochs) == 1 else f'nnUNetTrainer_{int(epochs)}epochs'


def nnunet_command(name: str) -> list:
    """A stock nnU-Net console command, or the same entry point through this interpreter if it is not on PATH."""
    entry_points = {
        'nnUNetv2_plan_and_preprocess': ('nnunetv2.experiment_planning.plan_and_preprocess_entrypoints',
                                         'plan_and_preprocess_entry'),
        'nnUNetv2_predict': ('nnunetv2.inference.predict_from_raw_data', 'predict_entry_point'),
    }
    found = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    if found:
        return [found]
    module, func = entry_points[name]
    return [sys.executable, '-c', f'import sys; sys.argv[0] = {name!r}; from {module} import {func}; {func}()']


def run_logged(cmd: Sequence[str], env: Dict[str, str], log_file: str, verbose: bool = False) -> None:
    """Run ``cmd``, appending its output to ``log_file`` (and echoing it if ``verbose``); VictimError on failure."""
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    tail = deque(maxlen=15)
    with open(log_file, 'a') as log:
        log.write('$ ' + ' '.join(cmd) + '\n')
        log.flush()
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors='replace')
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip())
            if verbose:
                print('    ' + line, end='', flush=True)
        rc = proc.wait()
    if rc != 0:
        raise VictimError(f"{cmd[0] if not cmd[0].endswith('python') else ' '.join(cmd[:3])} failed (exit {rc}); "
                          f"log: {log_file}\n" + '\n'.join('    ' + t for t in tail))


def plan_and_preprocess(dataset_id: int, configurations: Sequence[str], env: Dict[str, str], log_file: str,
                        verbose: bool = False) -> None:
    """Stock ``nnUNetv2_plan_and_preprocess`` (fingerprint, plans, preprocessing) for ``configurations``."""
    env = dict(env)
    env.pop('nnUNet_n_proc_DA', None)  # the planner fails with nnUNet_n_proc_DA=0
    n_proc = env.get('nnUNet_def_n_proc', '2')
    cmd = nnunet_command('nnUNetv2_plan_and_preprocess') + [
        '-d', str(dataset_id), '-c', *configurations, '-np', *([n_proc] * len(configurations)),
        '-npfp', n_proc, '--verify_dataset_integrity']
    run_logged(cmd, env, log_file, verbose)


def apply_preset(dataset_id: int, preset: str, plans_name: str, env: Dict[str, str], log_file: str,
                 verbose: bool = False) -> None:
    """Derive ``plans_name`` from the victim's own ``nnUNetPlans`` with our plans preset (``plans.py``)."""
    cmd = [sys.executable, '-m', 'nnunetv2_voxshield.plans', '-d', str(dataset_id), '--preset', preset,
           '-p', 'nnUNetPlans', '-o', plans_name]
    run_logged(cmd, env, log_file, verbose)


def train(dataset_id: int, configuration: str, seed: int, trainer: str, plans: str, device: str,
          env: Dict[str, str], log_file: str, verbose: bool = False) -> None:
    """Train one victim on all training cases (fold 'all') in a subprocess seeded with ``seed``."""
    cmd = [sys.executable, '-m', 'nnunetv2_voxshield.victims', 'train', str(dataset_id), configuration,
           '--seed', str(seed), '-tr', trainer, '-p', plans, '-device', device]
    run_logged(cmd, env, log_file, verbose)


def predict(dataset_id: int, configuration: str, trainer: str, plans: str, input_dir: str, output_dir: str,
            device: str, env: Dict[str, str], log_file: str, disable_tta: bool = False,
            verbose: bool = False) -> None:
    """Stock ``nnUNetv2_predict -f all`` of the victim on ``input_dir`` into ``output_dir``."""
    n_proc = env.get('nnUNet_def_n_proc', '1')
    cmd = nnunet_command('nnUNetv2_predict') + [
        '-i', input_dir, '-o', output_dir, '-d', str(dataset_id), '-c', configuration, '-tr', trainer, '-p', plans,
        '-f', 'all', '-device', device, '-npp', n_proc, '-nps', n_proc, '--disable_progress_bar']
    if disable_tta:
        cmd.append('--disable_tta')
    run_logged(cmd, env, log_file, verbose)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (what nnU-Net's data loading and init draw from)."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_seeded(dataset_name_or_id: str, configuration: str, seed: int, trainer_name: str = 'nnUNetTrainer',
                 plans_identifier: str = 'nnUNetPlans', device: str = 'cpu') -> str:
    """In-process: seeded stock training on fold 'all', resumed from checkpoint_latest; returns the output folder."""
    import multiprocessing

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    if device == 'cpu':
        torch.set_num_threads(multiprocessing.cpu_count())
    seed_everything(seed)
    trainer = get_trainer_from_args(str(dataset_name_or_id), configuration, 'all', trainer_name, plans_identifier,
                                    False, device=torch.device(device))
    if os.path.isfile(os.path.join(trainer.output_folder, 'checkpoint_final.pth')):
        print(f'{trainer.output_folder}: already trained')
        return trainer.output_folder
    resume = os.path.isfile(os.path.join(trainer.output_folder, 'checkpoint_latest.pth'))
    maybe_load_checkpoint(trainer, resume, False)
    trainer.run_training()
    return trainer.output_folder


def victims_entry():
    parser = argparse.ArgumentParser(description='Seeded stock nnU-Net victim training on fold "all" (used by '
                                                 'voxshield_evaluate; nnUNet_* folders come from the environment).')
    sub = parser.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train')
    t.add_argument('dataset_name_or_id', type=str)
    t.add_argument('configuration', type=str)
    t.add_argument('--seed', type=int, default=0)
    t.add_argument('-tr', type=str, default='nnUNetTrainer')
    t.add_argument('-p', type=str, default='nnUNetPlans')
    t.add_argument('-device', type=str, default='cpu', choices=('cpu', 'cuda', 'mps'))
    args = parser.parse_args()
    train_seeded(args.dataset_name_or_id, args.configuration, args.seed, args.tr, args.p, args.device)


if __name__ == '__main__':
    victims_entry()
