"""Victims: stock nnU-Net plan/preprocess, training (fold 'all', seeded) and prediction, run as subprocesses.

Each step runs in its own process with ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` pointing at
private folders (see ``nnunet_env``), so the user's nnU-Net folders are never touched, and calls nnU-Net's own APIs:
``prepare`` = what ``nnUNetv2_plan_and_preprocess`` does (+ our plans preset); ``run`` = seeding (nnU-Net has no
seed flag) of random/numpy/torch, the stock trainer through ``get_trainer_from_args`` / ``maybe_load_checkpoint`` /
``run_training`` on fold 'all' (continuing from ``checkpoint_latest.pth``), then ``nnUNetPredictor`` (what
``nnUNetv2_predict -f all`` does, without worker processes). The trainer's final validation on its own training
cases is skipped: victims are scored on held-out test cases instead.
"""
import argparse
import os
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


def run_logged(cmd: Sequence[str], env: Dict[str, str], log_file: str, verbose: bool = False) -> None:
    """Run ``cmd``, appending its output to ``log_file`` line by line as it comes (so a reader sees nnU-Net's
    epochs while it trains; echoed if ``verbose``); VictimError on failure."""
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    tail = deque(maxlen=15)
    with open(log_file, 'a', buffering=1) as log:
        log.write('$ ' + ' '.join(cmd) + '\n')
        proc = subprocess.Popen(list(cmd), env={**env, 'PYTHONUNBUFFERED': '1'}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors='replace')
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip())
            if verbose:
                print('    ' + line, end='', flush=True)
        rc = proc.wait()
    if rc != 0:
        raise VictimError(f"'{' '.join(cmd[2:6])}' failed (exit {rc}); log: {log_file}\n"
                          + '\n'.join('    ' + t for t in tail))


def _python_m(*args) -> list:
    return [sys.executable, '-m', 'nnunetv2_voxshield.victims', *[str(a) for a in args]]


def prepare(dataset_id: int, configurations: Sequence[str], plans: str, env: Dict[str, str], log_file: str,
            verbose: bool = False) -> None:
    """Subprocess: the victim's own fingerprint, stock plans and preprocessing (+ our preset if ``plans`` names one)."""
    env = dict(env)
    env.pop('nnUNet_n_proc_DA', None)  # the planner fails with nnUNet_n_proc_DA=0
    run_logged(_python_m('prepare', dataset_id, '-c', *configurations, '-p', plans), env, log_file, verbose)


def train_and_predict(dataset_id: int, configuration: str, seed: int, trainer: str, plans: str, device: str,
                      input_dir: str, output_dir: str, env: Dict[str, str], log_file: str,
                      disable_tta: bool = False, verbose: bool = False) -> None:
    """Subprocess: seeded training on fold 'all' (resumable), then stock prediction of ``input_dir``."""
    cmd = _python_m('run', dataset_id, configuration, '--seed', seed, '-tr', trainer, '-p', plans, '-device', device,
                    '-i', input_dir, '-o', output_dir) + (['--disable_tta'] if disable_tta else [])
    run_logged(cmd, env, log_file, verbose)


def prepare_dataset(dataset_id: int, configurations: Sequence[str], plans: str = 'nnUNetPlans') -> None:
    """In-process, as ``nnUNetv2_plan_and_preprocess -d ID -c CONFIGS -np N -npfp N``, then the plans preset.

    ``plans`` is stock plans ('nnUNetPlans' or a residual-encoder preset such as 'nnUNetResEncUNetMPlans', planned
    with its own nnU-Net planner) or those + '_<preset>' (written by ``plans.apply_plans_preset``; the preset keeps
    the data identifiers, so it reuses the stock preprocessed data).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, \
        preprocess
    from nnunetv2_voxshield.plans import split_plans_name

    n_proc = int(os.environ.get('nnUNet_def_n_proc', '2'))
    extract_fingerprints([dataset_id], num_processes=n_proc, clean=False, show_progress_bar=False)
    plans_identifier = plan_experiments([dataset_id], split_plans_name(plans)[1])
    preprocess([dataset_id], plans_identifier, list(configurations), [n_proc] * len(configurations),
               show_progress_bar=False)
    if plans != plans_identifier:
        from nnunetv2_voxshield.plans import apply_plans_preset
        apply_plans_preset(dataset_id, plans[len(plans_identifier) + 1:], plans_identifier, plans)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (what nnU-Net's data loading and init draw from)."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_threads() -> int:
    """Torch threads for training on CPU: ``$VOXSHIELD_TORCH_THREADS`` if set (e.g. 1 per run when several runs
    share the cores), else every core, as ``nnUNetv2_train`` does."""
    import multiprocessing

    value = os.environ.get('VOXSHIELD_TORCH_THREADS', '')
    if not value:
        return multiprocessing.cpu_count()
    if not value.isdigit() or int(value) < 1:
        raise VictimError(f'VOXSHIELD_TORCH_THREADS={value!r}: must be a positive integer')
    return int(value)


def train_seeded(dataset_name_or_id: str, configuration: str, seed: int, trainer_name: str = 'nnUNetTrainer',
                 plans_identifier: str = 'nnUNetPlans', device: str = 'cpu') -> str:
    """In-process: seeded stock training on fold 'all', resumed from checkpoint_latest; returns the output folder."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    if device == 'cpu':
        torch.set_num_threads(cpu_threads())
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


def predict_folder(model_folder: str, input_dir: str, output_dir: str, device: str = 'cpu',
                   disable_tta: bool = False) -> None:
    """Stock nnU-Net inference (``nnUNetPredictor``, fold_all of ``model_folder``, final checkpoint), no workers."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=not disable_tta, perform_everything_on_device=device != 'cpu',
                                device=torch.device(device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, ('all',), 'checkpoint_final.pth')
    os.makedirs(output_dir, exist_ok=True)  # the sequential variant does not create it
    predictor.predict_from_files_sequential(input_dir, output_dir, save_probabilities=False, overwrite=True)


def victims_entry():
    """Internal command of the victims' subprocesses (prepare / run / predict), run as
    ``python -m nnunetv2_voxshield.victims`` by evaluate and the audit's jobs."""
    parser = argparse.ArgumentParser(description='Stock nnU-Net steps of a voxshield_evaluate victim (nnUNet_* '
                                                 'folders come from the environment). prepare: reads $nnUNet_raw, '
                                                 'writes plans and preprocessed data to $nnUNet_preprocessed; run: '
                                                 'trains into $nnUNet_results/<dataset>/<-tr>__<-p>__<c>/fold_all '
                                                 'and writes predictions of -i to -o; predict: reads a model folder, '
                                                 'writes -o.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('prepare', help='fingerprint, plans, preprocessing (+ plans preset)')
    p.add_argument('dataset_id', type=int)
    p.add_argument('-c', nargs='+', required=True)
    p.add_argument('-p', type=str, default='nnUNetPlans')
    r = sub.add_parser('run', help='seeded training on fold all, then prediction')
    r.add_argument('dataset_name_or_id', type=str)
    r.add_argument('configuration', type=str)
    r.add_argument('--seed', type=int, default=0)
    r.add_argument('-tr', type=str, default='nnUNetTrainer')
    r.add_argument('-p', type=str, default='nnUNetPlans')
    r.add_argument('-device', type=str, default='cpu', choices=('cpu', 'cuda', 'mps'))
    r.add_argument('-i', type=str, default=None, help='images to predict (CASE_XXXX files)')
    r.add_argument('-o', type=str, default=None, help='output folder of the predictions')
    r.add_argument('--disable_tta', action='store_true')
    q = sub.add_parser('predict', help='prediction with a trained victim (fold all, final checkpoint)')
    q.add_argument('model_folder', type=str, help='<trainer>__<plans>__<configuration> folder')
    q.add_argument('-i', type=str, required=True, help='images to predict (CASE_XXXX files)')
    q.add_argument('-o', type=str, required=True, help='output folder of the predictions')
    q.add_argument('-device', type=str, default='cpu', choices=('cpu', 'cuda', 'mps'))
    q.add_argument('--disable_tta', action='store_true')
    args = parser.parse_args()
    if args.command == 'prepare':
        prepare_dataset(args.dataset_id, args.c, args.p)
    elif args.command == 'predict':
        predict_folder(args.model_folder, args.i, args.o, args.device, args.disable_tta)
    else:
        folder = train_seeded(args.dataset_name_or_id, args.configuration, args.seed, args.tr, args.p, args.device)
        if args.i:
            predict_folder(os.path.dirname(folder.rstrip(os.sep)), args.i, args.o, args.device, args.disable_tta)


if __name__ == '__main__':
    victims_entry()
