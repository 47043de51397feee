"""Work spread over processes or machines.

Training: DDP wrapping of the generator, device-agnostic (NCCL on CUDA as nnU-Net does, gloo on CPU in tests).

Export: ``voxshield_export -num_parts N -part_id K`` protects part K of the cases, as ``nnUNetv2_predict`` splits its
input: the sorted case ids ``[K::N]``. Every part writes into the same hidden ``.partial`` folder and records its
settings there (``.parts/part_K_of_N.json``); a part whose settings or N differ from a recorded part is refused.
Setup and publication run under an exclusive lock, a file in the report folder created with ``O_CREAT | O_EXCL``
(atomic on the shared file systems of clusters, unlike ``flock``, which several of them keep node-local): the first
part to find every case present and checked renames the folder, any other part then finds it published. The lock
records its holder (host, pid); a lock whose holder is gone (a dead process on this host, or older than
``LOCK_STALE_SECONDS`` if held from another host) is taken over, so a killed part leaves no lock behind for long.
"""
import json
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_voxshield.dataset_io import TEMP_PREFIX, InputError, write_json_atomic

PARTS_FOLDER = '.parts'  # inside the .partial folder, removed before it is published
LOCK_FILE = '.export.lock'
LOCK_STALE_SECONDS = 3600  # a lock held from another host this long is taken over (setup and publication take seconds)
LOCK_POLL_SECONDS = 0.2


def wrap_ddp(module: nn.Module, device: torch.device) -> DDP:
    """Wrap ``module`` (already on ``device``) for data-parallel training; gradients are all-reduced on backward."""
    return DDP(module, device_ids=[device.index if device.index is not None else 0] if device.type == 'cuda' else None)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DDP) else module


# ----------------------------------------------------------------------------------------- sharded export
def check_part_arguments(num_parts: int, part_id: int) -> None:
    """InputError unless -num_parts >= 1 and 0 <= -part_id < -num_parts."""
    if num_parts < 1:
        raise InputError(f'-num_parts {num_parts}: must be >= 1')
    if not 0 <= part_id < num_parts:
        raise InputError(f'-part_id {part_id}: must be in 0..{num_parts - 1} for -num_parts {num_parts}')


def part_cases(cases: Dict[str, dict], num_parts: int, part_id: int) -> Dict[str, dict]:
    """Part ``part_id`` of ``num_parts``: the sorted case ids [part_id::num_parts] (nnUNetv2_predict's split)."""
    check_part_arguments(num_parts, part_id)
    return {case: cases[case] for case in sorted(cases)[part_id::num_parts]}


@contextmanager
def export_lock(folder: str, timeout: Optional[float] = None, stale_after: float = None):
    """Exclusive lock: ``folder/.export.lock``, created with ``O_CREAT | O_EXCL`` and holding {host, pid, token};
    removed on exit. Blocks while another live holder has it; a stale lock (``lock_is_stale``) is taken over.
    InputError naming the lock and its holder after ``timeout`` seconds (None: wait)."""
    stale_after = LOCK_STALE_SECONDS if stale_after is None else stale_after
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'token': uuid.uuid4().hex}
    start, told = time.monotonic(), False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _take_over_if_stale(path, stale_after)
            if holder is None:
                continue
            if timeout is not None and time.monotonic() - start >= timeout:
                raise InputError(f'{path}: held by {_describe(holder)} for more than {timeout:g} s (delete it if '
                                 f'that process is gone)') from None
            if not told:
                print(f'waiting for {path} (held by {_describe(holder)})', file=sys.stderr, flush=True)
                told = True
            time.sleep(LOCK_POLL_SECONDS)
            continue
        with os.fdopen(fd, 'w') as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        break
    try:
        yield
    finally:
        holder, _ = _read_lock(path)
        if holder == me:  # not taken over meanwhile
            os.remove(path)


def lock_is_stale(holder: Optional[dict], age: float, stale_after: float) -> bool:
    """A lock of this host whose process is gone; one of another host (or unreadable) older than ``stale_after``."""
    if isinstance(holder, dict) and holder.get('host') == socket.gethostname():
        return not _process_alive(holder.get('pid'))
    return age > stale_after


def _process_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: str):
    """(holder dict or None if unreadable, age in seconds); (None, 0) if there is no lock."""
    try:
        with open(path) as f:
            text = f.read()
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None, 0.0
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None  # being written, or garbage
    return holder, age


def _take_over_if_stale(path: str, stale_after: float) -> Optional[dict]:
    """None if the lock is gone or was stale and is removed now (try again); else its holder (wait)."""
    holder, age = _read_lock(path)
    if not os.path.exists(path):
        return None
    if not lock_is_stale(holder, age, stale_after):
        return holder if holder is not None else {}
    aside = f'{path}.stale-{uuid.uuid4().hex}'
    try:
        os.rename(path, aside)  # atomic: of several parts taking over, one moves it
    except FileNotFoundError:
        return None
    moved, _ = _read_lock(aside)
    if moved != holder:  # a new holder's lock, created since we read: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    os.remove(aside)
    return None


def _describe(holder: dict) -> str:
    return f'{holder.get("host", "?")}:{holder.get("pid", "?")}' if holder else 'a process that is still writing it'


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
