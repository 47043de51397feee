"""The two engines behind ``jobs.run_jobs``, both submitit: ``LocalSubmitter`` (submitit.LocalExecutor, one fresh
process per job, environment pinned to its threads and GPUs) and ``slurm_executor`` (submitit.AutoExecutor on Slurm,
one sbatch job per job); squeue for Slurm state; stopping a local job.
"""
import os
import signal
import subprocess
import threading
import time
from contextlib import suppress
from typing import Dict, List, Optional, Sequence

from nnunetv2_voxshield.job_folder import LOG_TAIL_LINES, pid_alive


def thread_env(threads: int) -> Dict[str, str]:
    """Environment variables that pin a job's process to ``threads`` CPU threads (OpenMP, MKL, OpenBLAS, torch)."""
    t = str(threads)
    return {'OMP_NUM_THREADS': t, 'MKL_NUM_THREADS': t, 'OPENBLAS_NUM_THREADS': t, 'VOXSHIELD_TORCH_THREADS': t,
            'OMP_WAIT_POLICY': 'PASSIVE'}


def _setup_lines(env: Dict[str, str]) -> List[str]:
    return [f'export {k}={v}' for k, v in env.items()]


def slurm_executor(folder: str, job, slurm: dict):
    """submitit's AutoExecutor on Slurm: one sbatch job; the user's options (AutoExecutor names, e.g.
    slurm_partition, timeout_min, mem_gb, gpus_per_node, slurm_additional_parameters) win over the job's."""
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster='slurm')
    params = {'name': job.name, 'cpus_per_task': job.threads, 'timeout_min': 60 * 24, 'tasks_per_node': 1,
              'nodes': 1}   # submitit's own default time is 5 minutes
    if job.gpus:
        params['gpus_per_node'] = job.gpus
    params.update(slurm)
    setup = _setup_lines(thread_env(int(params.get('cpus_per_task', job.threads))))
    params['slurm_setup'] = setup + list(params.get('slurm_setup', []))
    ex.update_parameters(**params)
    return ex


_ENV_LOCK = threading.Lock()


class LocalSubmitter:
    """submitit's LocalExecutor for one job: a fresh process whose environment is pinned to the job's threads and
    GPUs (none: CUDA_VISIBLE_DEVICES=''). The environment is set on ours while submitit starts the process (it
    copies os.environ), not through ``setup`` shell lines, so that cancelling signals the job's own controller."""

    def __init__(self, folder: str, job, gpu_ids: Sequence[int]):
        import submitit

        self.env = thread_env(job.threads)
        self.ex = submitit.LocalExecutor(folder=folder)
        self.ex.update_parameters(timeout_min=60 * 24 * 30, gpus_per_node=len(gpu_ids), visible_gpus=tuple(gpu_ids))

    def submit(self, fn, *args):
        """Submit ``fn(*args)`` as a local submitit job with the job's thread environment; returns submitit's job."""
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in self.env}
            os.environ.update(self.env)
            try:
                return self.ex.submit(fn, *args)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def squeue_states(job_ids: Sequence[str]) -> Optional[Dict[str, str]]:
    """Slurm state ('PENDING', 'RUNNING', ...) of each job squeue still lists (one call for all), None if squeue
    could not be asked. Read from squeue, not sacct: sacct needs accounting, which a small cluster may not run."""
    try:
        out = subprocess.run(['squeue', '-h', '-j', ','.join(map(str, job_ids)), '-o', '%i %T'],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return {} if 'Invalid job id' in out.stderr else None
    return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)


def submitit_tail(handle) -> List[str]:
    """The last lines submitit logged for a job (where an error before the job's own log.txt shows, e.g. a job
    function that can no longer be unpickled because its module changed)."""
    try:
        return (handle.stderr() or handle.stdout() or '').splitlines()[-LOG_TAIL_LINES:]
    except Exception:   # noqa: BLE001
        return []


def _children(pid: int) -> List[int]:
    kids = []
    for tid in os.listdir(f'/proc/{pid}/task') if os.path.isdir(f'/proc/{pid}/task') else []:
        try:
            with open(f'/proc/{pid}/task/{tid}/children') as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return kids


def _wait_gone(pids: Sequence[int], timeout: float) -> List[int]:
    deadline = time.time() + timeout
    alive = list(pids)
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if pid_alive(p) and not _zombie(p)]
    return alive


def _zombie(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return False


def _tree(pid: int) -> List[int]:
    """``pid``'s descendants (children first), read from /proc."""
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def stop_local(handle, grace: float = 10.0) -> None:
    """Stops a local job and every process it started (e.g. the nnU-Net training it runs): SIGINT to them
    (KeyboardInterrupt, as Ctrl-C), SIGKILL after ``grace`` s; then its submitit controller, which exits once its
    task has. (submitit's own cancel only signals the controller, which cannot stop a task that ignores SIGINT,
    e.g. one started in the background, nor the task's own children.)"""
    controller = handle._process
    if controller is None or controller.poll() is not None:
        return
    tree = _tree(controller.pid)
    for pid in tree:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    for pid in _wait_gone(tree, grace):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        controller.wait(timeout=5)
    except subprocess.TimeoutExpired:
        controller.kill()
        controller.wait()
