"""Work spread over processes or machines.

Training: DDP wrapping of the generator, device-agnostic (NCCL on CUDA as nnU-Net does, gloo on CPU in tests).

Export: ``voxshield_export -num_parts N -part_id K`` protects part K of the cases, as ``nnUNetv2_predict`` splits its
input: the sorted case ids ``[K::N]``. Every part writes into the same hidden ``.partial`` folder and records its
settings there (``.parts/part_K_of_N.json``); a part whose settings or N differ from a recorded part is refused.
Setup and publication run under an exclusive lock (``fcntl.flock`` on a file in the report folder, released by
the kernel when a process dies, so a killed part leaves no stale lock): the first part to find every case present
and checked renames the folder, any other part then finds it published.
"""
import fcntl
import json
import os
from contextlib import contextmanager
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_voxshield.dataset_io import TEMP_PREFIX, InputError, write_json_atomic

PARTS_FOLDER = '.parts'  # inside the .partial folder, removed before it is published
LOCK_FILE = '.export.lock'


def wrap_ddp(module: nn.Module, device: torch.device) -> DDP:
    """Wrap ``module`` (already on ``device``) for data-parallel training; gradients are all-reduced on backward."""
    return DDP(module, device_ids=[device.index if device.index is not None else 0] if device.type == 'cuda' else None)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DDP) else module


# ----------------------------------------------------------------------------------------- sharded export
def check_part_arguments(num_parts: int, part_id: int) -> None:
    if num_parts < 1:
        raise InputError(f'-num_parts {num_parts}: must be >= 1')
    if not 0 <= part_id < num_parts:
        raise InputError(f'-part_id {part_id}: must be in 0..{num_parts - 1} for -num_parts {num_parts}')


def part_cases(cases: Dict[str, dict], num_parts: int, part_id: int) -> Dict[str, dict]:
    """Part ``part_id`` of ``num_parts``: the sorted case ids [part_id::num_parts] (nnUNetv2_predict's split)."""
    check_part_arguments(num_parts, part_id)
    return {case: cases[case] for case in sorted(cases)[part_id::num_parts]}


@contextmanager
def export_lock(folder: str):
    """Exclusive lock on ``folder/.export.lock`` (blocking); released on exit or when the process dies."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_FILE), 'a') as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def part_records(partial: str) -> Dict[str, dict]:
    """{record file: {'num_parts', 'part_id', 'settings'}} of the parts that worked on ``partial``."""
    folder = os.path.join(partial, PARTS_FOLDER)
    records = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith('.json') and not name.startswith(TEMP_PREFIX):
            path = os.path.join(folder, name)
            try:
                with open(path) as f:
                    records[path] = json.load(f)
            except (OSError, ValueError):
                raise InputError(f'{path}: unreadable part record (delete the .partial folder to start '
                                 f'again)') from None
    return records


FIRST_COMPARED = ('method', 'eps', 'eps_abs', 'checkpoint', 'checkpoint_sha256', 'configuration', 'plans_file')


def _first_difference(a: dict, b: dict) -> Optional[str]:
    """The first differing key, the user-facing settings (method, budget, model) first."""
    keys = set(a) | set(b)
    for key in [k for k in FIRST_COMPARED if k in keys] + sorted(keys - set(FIRST_COMPARED)):
        if a.get(key) != b.get(key):
            return key
    return None


def check_parts(partial: str, settings: dict, num_parts: Optional[int]) -> None:
    """InputError (one line, naming the record) if a recorded part used other settings or another -num_parts
    (``num_parts`` None: any)."""
    for path, record in part_records(partial).items():
        key = _first_difference(record.get('settings', {}), settings)
        if key is not None:
            raise InputError(f'{path}: part {record.get("part_id")} of {record.get("num_parts")} was run with '
                             f'{key}={record.get("settings", {}).get(key)!r}, this one has {key}='
                             f'{settings.get(key)!r}; run every part with the same arguments')
        if num_parts is not None and record.get('num_parts') != num_parts:
            raise InputError(f'{path}: part {record.get("part_id")} was run with -num_parts '
                             f'{record.get("num_parts")}, this one has -num_parts {num_parts}')


def record_part(partial: str, settings: dict, num_parts: int, part_id: int) -> None:
    """Write this part's record (once: a rerun of the part leaves the folder untouched)."""
    folder = os.path.join(partial, PARTS_FOLDER)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'part_{part_id}_of_{num_parts}.json')
    record = {'num_parts': num_parts, 'part_id': part_id, 'settings': settings}
    if part_records(partial).get(path) != record:
        write_json_atomic(record, path)


def temp_file_target(name: str) -> Optional[str]:
    """'.partial-<pid>-<base>' (``dataset_io.temp_path``) -> base; None for any other name."""
    if not name.startswith(TEMP_PREFIX):
        return None
    pid, sep, base = name[len(TEMP_PREFIX):].partition('-')
    return base if sep and pid.isdigit() else None
