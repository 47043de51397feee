"""Checkpoints of protector trainers: one dict, written once and atomically, with what ``--c`` needs to resume exactly.

``nnUNetTrainer.save_checkpoint`` writes ``filename`` in place; a protector keeps more (its generator and optimiser),
and a kill between two writes left a checkpoint that ``--c`` refuses. Here nnU-Net's own entries, the protector's
state and the random number generators' states go into one dict, which is written to a hidden temp file in the same
folder, synced, and renamed over ``filename``: a kill at any moment leaves the previous checkpoint or the new one.
"""
import os
import random

import numpy as np
import torch
from torch._dynamo import OptimizedModule

from nnunetv2_voxshield.dataset_io import TEMP_PREFIX, temp_path
from nnunetv2_voxshield.distributed import unwrap


def stock_entries(trainer) -> dict:
    """The entries of ``nnUNetTrainer.save_checkpoint`` (nnU-Net 2.x), so that stock code loads our checkpoints."""
    network = unwrap(trainer.network)
    network = network._orig_mod if isinstance(network, OptimizedModule) else network
    return {'network_weights': network.state_dict(),
            'optimizer_state': trainer.optimizer.state_dict(),
            'grad_scaler_state': trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
            'logging': trainer.logger.get_checkpoint(),
            '_best_ema': trainer._best_ema,
            'current_epoch': trainer.current_epoch + 1,
            'init_args': trainer.my_init_kwargs,
            'trainer_name': trainer.__class__.__name__,
            'inference_allowed_mirroring_axes': trainer.inference_allowed_mirroring_axes}


def rng_state() -> dict:
    """The global generators nnU-Net's single-process data loader, its augmentation and our trainers draw from."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the python, numpy, torch (and CUDA, if present and available) RNG states saved by ``rng_state``."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'].cpu())
    if state.get('cuda') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


def save_atomic(checkpoint: dict, filename: str) -> None:
    """``torch.save`` to a hidden temp file beside ``filename`` (synced), then ``os.replace``; leftovers of a killed
    earlier write of the same file are removed first (one writer per file: nnU-Net's rank 0)."""
    folder, base = os.path.split(os.path.abspath(filename))
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX) and name.endswith('-' + base) and \
                name[len(TEMP_PREFIX):-len(base) - 1].isdigit():
            os.remove(os.path.join(folder, name))
    tmp = temp_path(os.path.join(folder, base))
    try:
        with open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
