"""Audit engine: a DAG of jobs run through submitit's local or Slurm executor, each job in its own folder.

``<root>/jobs/<name>/`` holds ``log.txt`` (the job's stdout and stderr), ``done.json`` (written atomically, last) or
``failed.json`` (error and the log's last lines), ``claim`` (which run owns the job), ``running.json`` (written by the
job process while it runs) and ``submitit/`` (submitit's own pickles and logs). Rerunning resumes: a job with a
``done.json`` is skipped and its recorded result reused; a failed or interrupted job runs again (its function resumes
its own partial work, e.g. nnU-Net's ``--c``). Runs sharing a root claim each job by an atomic create of ``claim``;
a job claimed by a live other run is waited for. No scheduler of our own beyond ordering the DAG: submitit starts
and watches the processes (local) or the sbatch jobs (Slurm).
"""
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

BACKENDS = ('local', 'slurm')
LOG_TAIL_LINES = 30
HEARTBEAT_S = 30.0   # claims and running.json are touched this often ...
STALE_S = 300.0      # ... and one untouched for this long belongs to a dead run
HOST = socket.gethostname()
_SAFE_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.+=@-]*$')


@dataclass
class Job:
    """One step of an audit: ``fn(job_dir, *args, **kwargs)`` in a fresh process, after the jobs named in ``deps``."""
    name: str
    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    deps: Sequence[str] = ()
    threads: int = 1
    gpus: int = 0
    kind: str = 'job'
    progress: Optional[Callable[[str], Optional[str]]] = None


@dataclass
class JobRecord:
    """Outcome of one job in one run. ``reused``: finished by an earlier (or a concurrent) run, not by this one."""
    name: str
    state: str                       # 'done' | 'failed' | 'skipped'
    result: Any = None
    seconds: Optional[float] = None
    log: str = ''
    error: Optional[str] = None
    log_tail: List[str] = field(default_factory=list)
    reused: bool = False


# ---------------------------------------------------------------------------------------------------------------
# small file helpers (standard library only: this module is imported by every job process)

def _write_json(path: str, obj) -> None:
    """Temporary file next to ``path``, then rename: readers see the whole record or none."""
    fd, tmp = tempfile.mkstemp(prefix='.tmp_', dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def _tail(path: str, n: int = LOG_TAIL_LINES) -> List[str]:
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            lines = f.read().decode('utf-8', 'replace').splitlines()
        return lines[-n:]
    except OSError:
        return []


def _now() -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%S%z')


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return isinstance(pid, int)
    return True


def _alive(path: str) -> Optional[dict]:
    """The marker at ``path`` (claim or running.json) if its owner is alive: touched within STALE_S and, on this
    host, its pid still running; else None."""
    info = _read_json(path)
    if info is None:
        return None
    try:
        if time.time() - os.stat(path).st_mtime > STALE_S:
            return None
    except OSError:
        return None
    if info.get('host') == HOST and not _pid_alive(info.get('pid')):
        return None
    return info


def job_paths(root: str, name: str) -> Dict[str, str]:
    d = os.path.join(os.path.abspath(root), 'jobs', name)
    return {'dir': d, 'log': os.path.join(d, 'log.txt'), 'done': os.path.join(d, 'done.json'),
            'failed': os.path.join(d, 'failed.json'), 'claim': os.path.join(d, 'claim'),
            'running': os.path.join(d, 'running.json'), 'lock': os.path.join(d, '.claim.lock'),
            'submitit': os.path.join(d, 'submitit')}


def read_done(root: str, name: str) -> Optional[dict]:
    """A job's completion record, or None if it has not finished."""
    rec = _read_json(job_paths(root, name)['done'])
    return rec if rec is not None and rec.get('name') == name else None


# ---------------------------------------------------------------------------------------------------------------
# inside the job process

def _heartbeat(path: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:
            pass


class _JobCall:
    """What submitit runs: ``_job_main`` of one job. Its ``checkpoint`` (submitit's checkpointable protocol) makes a
    Slurm job that is preempted or reaches its time limit requeue itself; the job's fn resumes its own partial work
    when it starts again (e.g. nnU-Net's checkpoint_latest.pth)."""

    def __init__(self):
        self.requeued = False

    def __call__(self, *args):
        return _job_main(*args, call=self)

    def checkpoint(self, *args):
        from submitit.helpers import DelayedSubmission
        self.requeued = True
        return DelayedSubmission(_JobCall(), *args)


def _job_main(job_dir: str, name: str, token: str, backend: str, fn: Callable, args: tuple, kwargs: dict,
              submitted: Optional[float] = None, call: Optional[_JobCall] = None):
    """Runs in the job's own process (submitted through submitit): checks that this run still owns the job, sends
    stdout/stderr to log.txt, calls ``fn(job_dir, *args, **kwargs)`` and writes done.json or failed.json."""
    p = {k: os.path.join(job_dir, v) for k, v in
         (('log', 'log.txt'), ('done', 'done.json'), ('failed', 'failed.json'), ('claim', 'claim'),
          ('running', 'running.json'))}
    claim = _read_json(p['claim'])
    if claim is None or claim.get('token') != token:
        print(f'{name}: superseded (claimed by another run), not running it', flush=True)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = open(p['log'], 'a')
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    stop = threading.Event()
    started, t0 = _now(), time.time()
    try:
        print(f'=== {name}: started {started} on {HOST} (pid {os.getpid()}, backend {backend}, '
              f'threads {os.environ.get("OMP_NUM_THREADS", "?")}, '
              f'CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "")!r})', flush=True)
        _write_json(p['running'], {'pid': os.getpid(), 'host': HOST, 'token': token, 'started': started})
        threading.Thread(target=_heartbeat, args=(p['running'], stop), daemon=True).start()
        if 'torch' in sys.modules and os.environ.get('VOXSHIELD_TORCH_THREADS', '').isdigit():
            sys.modules['torch'].set_num_threads(int(os.environ['VOXSHIELD_TORCH_THREADS']))
        base = {'name': name, 'started': started, 'host': HOST, 'backend': backend, 'token': token,
                'submitted_unix': submitted, 'started_unix': t0}
        try:
            result = fn(job_dir, *args, **kwargs)
            json.dumps(result)
        except (Exception, SystemExit) as e:
            if call is not None and call.requeued:
                print(f'=== {name}: preempted or out of time, requeued {_now()}', flush=True)
                raise
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            error = f'{type(e).__name__}: {e}'.splitlines()[0] if str(e) else type(e).__name__
            if isinstance(e, TypeError) and 'JSON serializable' in str(e):
                error = f'result of {name} is not JSON-serialisable: {e}'
            _write_json(p['failed'], dict(base, error=error, seconds=round(time.time() - t0, 3),
                                          finished=_now(), finished_unix=time.time(), log_tail=_tail(p['log'])))
            raise
        seconds = round(time.time() - t0, 3)
        _write_json(p['done'], dict(base, result=result, seconds=seconds, finished=_now(), finished_unix=time.time()))
        print(f'=== {name}: done in {seconds:.1f} s', flush=True)
        return result
    finally:
        stop.set()
        if os.path.exists(p['running']):
            os.remove(p['running'])
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        log.close()


# ---------------------------------------------------------------------------------------------------------------
# claims (two runs sharing a root)

def _try_claim(p: Dict[str, str], token: str) -> bool:
    """Atomically claims the job for this run; a claim whose owner is dead is taken over (under a lock, so two runs
    cannot both take it over). False when a live other run holds it."""
    info = json.dumps({'pid': os.getpid(), 'host': HOST, 'token': token, 'time': _now()})

    def create() -> bool:
        try:
            fd = os.open(p['claim'], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'w') as f:
            f.write(info)
        return True

    if create():
        return True
    with open(p['lock'], 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _claim_live(p):
                return False
            try:
                os.remove(p['claim'])
            except FileNotFoundError:
                pass
            return create()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _claim_live(p: Dict[str, str]) -> bool:
    """The claim's owner (the run that made it, or the job process it started) is alive."""
    claim = _read_json(p['claim'])
    if claim is None:
        # a claim being written right now is live; an unreadable old one is not
        try:
            return time.time() - os.stat(p['claim']).st_mtime < 5
        except OSError:
            return False
    if _alive(p['claim']) is not None:
        return True
    running = _alive(p['running'])
    return running is not None and running.get('token') == claim.get('token')


def _release(p: Dict[str, str], token: str) -> None:
    claim = _read_json(p['claim'])
    if claim is not None and claim.get('token') == token:
        try:
            os.remove(p['claim'])
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# executors

def _thread_env(threads: int) -> Dict[str, str]:
    t = str(threads)
    return {'OMP_NUM_THREADS': t, 'MKL_NUM_THREADS': t, 'OPENBLAS_NUM_THREADS': t, 'VOXSHIELD_TORCH_THREADS': t,
            'OMP_WAIT_POLICY': 'PASSIVE'}


def _setup_lines(env: Dict[str, str]) -> List[str]:
    return [f'export {k}={v}' for k, v in env.items()]


def _slurm_executor(folder: str, job: Job, slurm: dict):
    """submitit's AutoExecutor on Slurm: one sbatch job; the user's options (AutoExecutor names, e.g.
    slurm_partition, timeout_min, mem_gb, gpus_per_node, slurm_additional_parameters) win over the job's."""
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster='slurm')
    params = {'name': job.name, 'cpus_per_task': job.threads, 'timeout_min': 60 * 24, 'tasks_per_node': 1,
              'nodes': 1}   # submitit's own default time is 5 minutes
    if job.gpus:
        params['gpus_per_node'] = job.gpus
    params.update(slurm)
    setup = _setup_lines(_thread_env(int(params.get('cpus_per_task', job.threads))))
    params['slurm_setup'] = setup + list(params.get('slurm_setup', []))
    ex.update_parameters(**params)
    return ex


_ENV_LOCK = threading.Lock()


class _LocalSubmitter:
    """submitit's LocalExecutor for one job: a fresh process whose environment is pinned to the job's threads and
    GPUs (none: CUDA_VISIBLE_DEVICES=''). The environment is set on ours while submitit starts the process (it
    copies os.environ), not through ``setup`` shell lines, so that cancelling signals the job's own controller."""

    def __init__(self, folder: str, job: Job, gpu_ids: Sequence[int]):
        import submitit

        self.env = _thread_env(job.threads)
        self.ex = submitit.LocalExecutor(folder=folder)
        self.ex.update_parameters(timeout_min=60 * 24 * 30, gpus_per_node=len(gpu_ids), visible_gpus=tuple(gpu_ids))

    def submit(self, fn, *args):
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


def _squeue_states(job_ids: Sequence[str]) -> Optional[Dict[str, str]]:
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


# ---------------------------------------------------------------------------------------------------------------
# checks (before any job starts)

def check_jobs(jobs: Sequence[Job], backend: str, workers: int, slurm: Optional[dict] = None) -> None:
    """Raises ValueError with one line naming the culprit: unknown backend, bad workers, duplicate or unsafe
    names, unknown deps, cycles, bad thread/GPU budgets, no Slurm here."""
    if backend not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}: choose one of {", ".join(BACKENDS)}')
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f'workers={workers!r}: must be a positive integer')
    names = {}
    for j in jobs:
        if not isinstance(j.name, str) or not _SAFE_NAME.match(j.name):
            raise ValueError(f'job name {j.name!r}: use letters, digits and _ . + = @ - (it names a folder)')
        if j.name in names:
            raise ValueError(f'job name {j.name!r} is used twice')
        if not callable(j.fn):
            raise ValueError(f'job {j.name}: fn {j.fn!r} is not callable')
        if not isinstance(j.threads, int) or j.threads < 1:
            raise ValueError(f'job {j.name}: threads={j.threads!r} must be a positive integer')
        if not isinstance(j.gpus, int) or j.gpus < 0:
            raise ValueError(f'job {j.name}: gpus={j.gpus!r} must be a non-negative integer')
        names[j.name] = j
    for j in jobs:
        for d in j.deps:
            if d not in names:
                raise ValueError(f'job {j.name}: depends on unknown job {d!r}')
    state: Dict[str, int] = {}

    def visit(n: str, path: List[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ValueError(f'job dependencies form a cycle: {" -> ".join(path[path.index(n):] + [n])}')
        state[n] = 1
        for d in names[n].deps:
            visit(d, path + [n])
        state[n] = 2

    for n in names:
        visit(n, [])
    if backend == 'slurm':
        if shutil.which('sbatch') is None or shutil.which('srun') is None:
            raise ValueError("backend 'slurm': sbatch/srun not found on PATH (is this a Slurm login node?)")
        if slurm is not None and not isinstance(slurm, dict):
            raise ValueError(f'slurm options must be a dict, not {type(slurm).__name__}')


def _gpu_pool(jobs: Sequence[Job], gpus: Optional[Sequence[int]]) -> List[int]:
    need = max((j.gpus for j in jobs), default=0)
    if need == 0:
        return []
    if gpus is None:
        visible = os.environ.get('CUDA_VISIBLE_DEVICES')
        if visible:
            gpus = [int(g) for g in visible.split(',') if g.strip().isdigit()]
        else:
            import torch
            gpus = list(range(torch.cuda.device_count()))
    gpus = list(gpus)
    if need > len(gpus):
        culprit = next(j for j in jobs if j.gpus == need)
        raise ValueError(f'job {culprit.name}: needs {need} GPU(s), {len(gpus)} available ({gpus})')
    return gpus


# ---------------------------------------------------------------------------------------------------------------
# the run

class _Run:
    """One invocation of run_jobs: orders the DAG, claims and submits ready jobs, watches them, prints progress."""

    def __init__(self, jobs, root, backend, workers, slurm, stream, gpus, poll_s, status_every):
        self.jobs = {j.name: j for j in jobs}
        self.order = [j.name for j in jobs]
        self.root = os.path.abspath(root)
        self.backend, self.workers, self.slurm = backend, workers, dict(slurm or {})
        self.stream, self.poll_s, self.status_every = stream, poll_s, status_every
        self.token = uuid.uuid4().hex
        self.paths = {n: job_paths(self.root, n) for n in self.order}
        self.state = {n: 'queued' for n in self.order}   # queued | waiting | running | done | failed | skipped
        self.records: Dict[str, JobRecord] = {}
        self.handles: Dict[str, Any] = {}
        self.free_gpus = list(gpus)
        self.job_gpus: Dict[str, List[int]] = {}
        self.progress_text: Dict[str, Optional[str]] = {}
        self.gone_since: Dict[str, float] = {}
        self.slurm_state: Dict[str, str] = {}
        self.squeue: Optional[Dict[str, str]] = {}
        self.last_squeue = 0.0
        self.submitted_at: Dict[str, float] = {}
        self.started = time.time()
        self.width = max((len(n) for n in self.order), default=4)

    # -- output
    def say(self, name: str, state: str, detail: str = '') -> None:
        line = f'{time.strftime("%H:%M:%S")} {name:<{self.width}} {state:<8} {detail}'.rstrip()
        self.stream.write(line + '\n')
        self.stream.flush()

    def status_line(self) -> None:
        counts = {s: sum(v == s for v in self.state.values())
                  for s in ('running', 'queued', 'waiting', 'done', 'failed', 'skipped')}
        parts = ', '.join(f'{v} {k}' for k, v in counts.items() if v or k in ('running', 'queued', 'done'))
        self.stream.write(f'{time.strftime("%H:%M:%S")} -- {parts} ({_duration(time.time() - self.started)})\n')
        self.stream.flush()

    # -- records
    def finish(self, name: str, state: str, reused: bool = False, error: Optional[str] = None,
               log_tail: Optional[List[str]] = None, rec: Optional[dict] = None) -> None:
        p = self.paths[name]
        rec = rec or {}
        self.state[name] = state
        self.records[name] = JobRecord(name=name, state=state, result=rec.get('result'), seconds=rec.get('seconds'),
                                       log=p['log'], error=error, log_tail=list(log_tail or []), reused=reused)
        for g in self.job_gpus.pop(name, []):
            self.free_gpus.append(g)
        self.handles.pop(name, None)
        if not reused:
            _release(p, self.token)
        if state == 'done':
            when = 'earlier run' if reused else None
            self.say(name, 'done', f'{rec.get("seconds", 0):.1f} s' + (f' ({when})' if when else ''))
        elif state == 'failed':
            self.say(name, 'failed', f'{error}  [log: {p["log"]}]')
        else:
            self.say(name, state, error or '')

    # -- submitting
    def submit(self, name: str) -> None:
        job, p = self.jobs[name], self.paths[name]
        if os.path.exists(p['failed']):
            os.remove(p['failed'])
        args = (p['dir'], name, self.token, self.backend, job.fn, tuple(job.args), dict(job.kwargs), time.time())
        if self.backend == 'local':
            ids = [self.free_gpus.pop(0) for _ in range(job.gpus)]
            self.job_gpus[name] = ids
            ex = _LocalSubmitter(p['submitit'], job, ids)
        else:
            ex = _slurm_executor(p['submitit'], job, self.slurm)
        handle = ex.submit(_JobCall(), *args)
        self.handles[name] = handle
        self.submitted_at[name] = time.time()
        self.state[name] = 'running'
        if self.backend == 'slurm':
            self.slurm_state[name] = 'PENDING'
            self.say(name, 'queued', f'{job.kind}, slurm job {handle.job_id} submitted')
        else:
            gpu = f', GPU {",".join(map(str, self.job_gpus[name]))}' if self.job_gpus.get(name) else ''
            self.say(name, 'running', f'{job.kind}, pid {handle.job_id}, {job.threads} thread(s){gpu}')

    def slots(self) -> int:
        return self.workers - sum(s == 'running' for s in self.state.values())

    # -- watching
    def outcome(self, name: str, token: str) -> Optional[tuple]:
        """('done', rec) / ('failed', rec) when the job's record for ``token`` is on disk."""
        p = self.paths[name]
        rec = read_done(self.root, name)
        if rec is not None:
            return 'done', rec
        rec = _read_json(p['failed'])
        if rec is not None and rec.get('token') == token:
            return 'failed', rec
        return None

    def watch_running(self, name: str) -> None:
        p, handle = self.paths[name], self.handles[name]
        got = self.outcome(name, self.token)
        if self.backend == 'local':
            ended = handle.done()
            if got is None and not ended:
                return self.show_progress(name)
            if got is not None and not ended:   # record written, the process is exiting: wait for its slot
                try:
                    handle._process.wait(timeout=30)
                except Exception:   # noqa: BLE001 (a stuck exit does not hold the audit)
                    pass
        elif got is None:
            if self.squeue is None or self.last_squeue <= self.submitted_at[name]:   # no news since submission
                return
            state = self.squeue.get(str(handle.job_id))
            if state is not None:
                self.gone_since.pop(name, None)
                before = self.slurm_state.get(name)
                if state != 'PENDING' and before == 'PENDING':
                    self.say(name, 'running', f'slurm job {handle.job_id} {state.lower()}')
                elif state in ('PENDING', 'REQUEUED') and before not in ('PENDING', 'REQUEUED'):
                    self.say(name, 'queued', f'slurm job {handle.job_id} requeued')
                    state = 'PENDING'
                self.slurm_state[name] = state
                if state != 'PENDING':
                    self.show_progress(name)
                return
            first = self.gone_since.setdefault(name, time.time())
            if time.time() - first < 10:   # the record may still be on its way (shared filesystem)
                return
        if got is None:
            tail = _tail(p['log']) or _submitit_tail(handle)
            how = f'slurm job {handle.job_id}' if self.backend == 'slurm' else 'job process'
            self.finish(name, 'failed', error=f'{how} ended without a record (killed or crashed)', log_tail=tail)
        elif got[0] == 'done':
            self.finish(name, 'done', rec=got[1])
        else:
            self.finish(name, 'failed', error=got[1].get('error'), log_tail=got[1].get('log_tail'), rec=got[1])

    def show_progress(self, name: str) -> None:
        fn = self.jobs[name].progress
        if fn is None:
            return
        try:
            text = fn(self.paths[name]['dir'])
        except Exception:   # noqa: BLE001 (a progress probe must never break the run)
            text = None
        if text and text != self.progress_text.get(name):
            self.progress_text[name] = text
            self.say(name, 'running', text)

    # -- main loop
    def step(self) -> None:
        running = [self.handles[n].job_id for n, s in self.state.items() if s == 'running']
        if self.backend == 'slurm' and running and time.time() - self.last_squeue > 5 * self.poll_s:
            self.squeue = _squeue_states(running)
            self.last_squeue = time.time()
        for name in self.order:
            st = self.state[name]
            if st in ('done', 'failed', 'skipped'):
                continue
            if st == 'running':
                self.watch_running(name)
                continue
            job, p = self.jobs[name], self.paths[name]
            bad = [d for d in job.deps if self.state[d] in ('failed', 'skipped')]
            if bad:
                self.finish(name, 'skipped', error=f'dep failed: {", ".join(bad)}')
                continue
            if any(self.state[d] != 'done' for d in job.deps):
                continue
            rec = read_done(self.root, name)
            if rec is not None:
                self.finish(name, 'done', reused=True, rec=rec)
                continue
            if st == 'waiting':
                claim = _read_json(p['claim']) or {}
                got = self.outcome(name, claim.get('token'))
                if got is not None and got[0] == 'failed' and _claim_live(p):
                    self.finish(name, 'failed', reused=True, error=got[1].get('error'),
                                log_tail=got[1].get('log_tail'), rec=got[1])
                    continue
                if _claim_live(p):
                    continue
            if self.slots() <= 0 or len(self.free_gpus) < (job.gpus if self.backend == 'local' else 0):
                continue
            os.makedirs(p['dir'], exist_ok=True)
            if not _try_claim(p, self.token):
                if st != 'waiting':
                    self.state[name] = 'waiting'
                    owner = _read_json(p['claim']) or {}
                    self.say(name, 'waiting', f'claimed by another run (pid {owner.get("pid")} on '
                                              f'{owner.get("host")})')
                continue
            rec = read_done(self.root, name)
            if rec is not None:   # finished by another run between our check and our claim
                _release(p, self.token)
                self.finish(name, 'done', reused=True, rec=rec)
                continue
            self.submit(name)

    def heartbeat(self) -> None:
        for name, st in self.state.items():
            if st == 'running':
                try:
                    os.utime(self.paths[name]['claim'])
                except OSError:
                    pass

    def cancel_all(self) -> None:
        for name, handle in list(self.handles.items()):
            try:
                if self.backend == 'local':
                    _stop_local(handle)
                else:
                    handle.cancel(check=False)
            except Exception:   # noqa: BLE001
                pass
            with suppress(OSError), open(self.paths[name]['log'], 'a') as f:
                f.write(f'=== {name}: cancelled {_now()} (run interrupted); a rerun resumes it\n')
            self.say(name, 'cancel', 'interrupted; rerun to resume')
            _release(self.paths[name], self.token)

    def run(self) -> Dict[str, JobRecord]:
        todo = [n for n in self.order if read_done(self.root, n) is None]
        self.stream.write(f'{len(self.order)} jobs ({len(self.order) - len(todo)} done earlier), backend '
                          f'{self.backend}, {self.workers} worker(s), root {self.root}\n')
        for n in todo:
            self.say(n, 'queued', self.jobs[n].kind + (f' after {", ".join(self.jobs[n].deps)}'
                                                         if self.jobs[n].deps else ''))
        last_beat = last_status = time.time()
        try:
            while True:
                self.step()
                if all(s in ('done', 'failed', 'skipped') for s in self.state.values()):
                    break
                now = time.time()
                if now - last_beat > HEARTBEAT_S:
                    self.heartbeat()
                    last_beat = now
                if self.status_every and now - last_status > self.status_every:
                    self.status_line()
                    last_status = now
                time.sleep(self.poll_s)
        except BaseException:
            self.cancel_all()
            raise
        self.summary()
        return {n: self.records[n] for n in self.order}

    def summary(self) -> None:
        recs = self.records.values()
        done = [r for r in recs if r.state == 'done']
        failed = [r.name for r in recs if r.state == 'failed']
        skipped = [r.name for r in recs if r.state == 'skipped']
        line = (f'{len(done)} done ({sum(r.reused for r in done)} from earlier runs), {len(failed)} failed, '
                f'{len(skipped)} skipped in {_duration(time.time() - self.started)}; records in '
                f'{os.path.join(self.root, "jobs")}/<job>/ (done.json, failed.json, log.txt)')
        self.stream.write(line + '\n')
        for n in failed:
            self.stream.write(f'  failed: {n}: {self.records[n].error} -- see {self.paths[n]["log"]}\n')
        self.stream.flush()


def _submitit_tail(handle) -> List[str]:
    try:
        return (handle.stderr() or handle.stdout() or '').splitlines()[-LOG_TAIL_LINES:]
    except Exception:   # noqa: BLE001
        return []


def _duration(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f'{m}m{s:02d}s' if m else f'{s}s'


class Terminated(KeyboardInterrupt):
    """SIGTERM to run_jobs, handled as Ctrl-C: this run's jobs are cancelled, a rerun resumes."""


def _raise_terminated(signum, frame):
    raise Terminated(f'signal {signum}')


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
        alive = [p for p in alive if _pid_alive(p) and not _zombie(p)]
    return alive


def _zombie(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return False


def _stop_local(handle, grace: float = 10.0) -> None:
    """Stops a local job: SIGINT to its process (KeyboardInterrupt, as Ctrl-C), SIGKILL after ``grace`` s; then
    its submitit controller, which exits once its task has. (submitit's own cancel only signals the controller,
    which cannot stop a task that ignores SIGINT, e.g. one started in the background.)"""
    controller = handle._process
    if controller is None or controller.poll() is not None:
        return
    tasks = _children(controller.pid)
    for pid in tasks:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    for pid in _wait_gone(tasks, grace):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        controller.wait(timeout=5)
    except subprocess.TimeoutExpired:
        controller.kill()
        controller.wait()


def run_jobs(jobs: Sequence[Job], root: str, backend: str = 'local', workers: int = 1,
             slurm: Optional[dict] = None, stream: TextIO = sys.stderr, gpus: Optional[Sequence[int]] = None,
             poll_s: float = 1.0, status_every: float = 60.0) -> Dict[str, JobRecord]:
    """Runs ``jobs`` (a DAG through ``deps``) under ``<root>/jobs/`` and returns their records, in input order.

    backend 'local': at most ``workers`` jobs at a time, each in a fresh process (submitit.LocalExecutor) with
    OMP/MKL/torch threads pinned to ``job.threads`` and CUDA_VISIBLE_DEVICES to ``job.gpus`` free ids from ``gpus``
    (default: $CUDA_VISIBLE_DEVICES or every device torch sees; none for CPU jobs). backend 'slurm': one sbatch job
    per ready job through submitit.AutoExecutor, at most ``workers`` in flight; ``slurm`` holds AutoExecutor
    options (slurm_partition, timeout_min, mem_gb, gpus_per_node, cpus_per_task, slurm_additional_parameters, ...).
    Bad jobs or options raise ValueError (one line) before any job starts. A failed job does not stop the others;
    its dependants are skipped. Ctrl-C / SIGTERM cancels this run's jobs; rerunning resumes.
    """
    check_jobs(jobs, backend, workers, slurm)
    if backend == 'slurm' and slurm:   # unknown options refused now, not at the first submission
        with tempfile.TemporaryDirectory(prefix='voxshield_slurm_check_') as tmp:
            try:
                _slurm_executor(tmp, jobs[0] if jobs else Job('check', print), dict(slurm))
            except (ValueError, TypeError, AssertionError) as e:
                raise ValueError(f'slurm options {sorted(slurm)}: {str(e).splitlines()[0]}') from None
    gpu_ids = _gpu_pool(jobs, gpus) if backend == 'local' else []
    os.makedirs(os.path.join(os.path.abspath(root), 'jobs'), exist_ok=True)
    run = _Run(jobs, root, backend, workers, slurm, stream, gpu_ids, poll_s, status_every)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
