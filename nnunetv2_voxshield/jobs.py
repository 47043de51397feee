"""Audit engine: a DAG of jobs run through submitit's local or Slurm executor, each job in its own folder.

``<root>/jobs/<name>/`` holds ``log.txt`` (the job's stdout and stderr), ``done.json`` (written atomically, last) or
``failed.json`` (error and the log's last lines), ``claim`` (which run owns the job), ``running.json`` (written by the
job process while it runs) and ``submitit/`` (submitit's own pickles and logs). Rerunning resumes: a job with a
``done.json`` is skipped and its recorded result reused; a failed or interrupted job runs again (its function resumes
its own partial work, e.g. nnU-Net's ``--c``). Runs sharing a root claim each job by an atomic create of ``claim``;
a job claimed by a live other run is waited for. No scheduler of our own beyond ordering the DAG: submitit starts
and watches the processes (local) or the sbatch jobs (Slurm). The folder protocol (records, claims, what runs inside
the job process) is in job_folder.py, the two submitit backends in job_backends.py.
"""
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

from nnunetv2_voxshield import job_backends as B
from nnunetv2_voxshield import job_folder as F
from nnunetv2_voxshield.job_folder import HEARTBEAT_S, job_paths, read_done

BACKENDS = ('local', 'slurm')
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
            F.release(p, self.token)
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
            ex = B.LocalSubmitter(p['submitit'], job, ids)
        else:
            ex = B.slurm_executor(p['submitit'], job, self.slurm)
        handle = ex.submit(F.JobCall(), *args)
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
        rec = F.read_json(p['failed'])
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
        if got is None:   # the process died before job_main could write a record: write one for it
            tail = F.tail(p['log']) or B.submitit_tail(handle)
            how = f'slurm job {handle.job_id}' if self.backend == 'slurm' else 'job process'
            last = next((line.strip() for line in reversed(tail) if line.strip()), '')
            why = last if re.match(r'^\w+(Error|Exception)\b', last) else 'killed or crashed'
            error = f'{how} ended without a record ({why})'
            with suppress(OSError):
                F.write_json(p['failed'], {'name': name, 'token': self.token, 'backend': self.backend,
                                           'error': error, 'finished': F.now(), 'log_tail': tail})
            self.finish(name, 'failed', error=error, log_tail=tail)
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
            self.squeue = B.squeue_states(running)
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
                claim = F.read_json(p['claim']) or {}
                got = self.outcome(name, claim.get('token'))
                if got is not None and got[0] == 'failed' and F.claim_live(p):
                    self.finish(name, 'failed', reused=True, error=got[1].get('error'),
                                log_tail=got[1].get('log_tail'), rec=got[1])
                    continue
                if F.claim_live(p):
                    continue
            if self.slots() <= 0 or len(self.free_gpus) < (job.gpus if self.backend == 'local' else 0):
                continue
            os.makedirs(p['dir'], exist_ok=True)
            if not F.try_claim(p, self.token):
                if st != 'waiting':
                    self.state[name] = 'waiting'
                    owner = F.read_json(p['claim']) or {}
                    self.say(name, 'waiting', f'claimed by another run (pid {owner.get("pid")} on '
                                              f'{owner.get("host")})')
                continue
            rec = read_done(self.root, name)
            if rec is not None:   # finished by another run between our check and our claim
                F.release(p, self.token)
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
                    B.stop_local(handle)
                else:
                    handle.cancel(check=False)
            except Exception:   # noqa: BLE001
                pass
            with suppress(OSError), open(self.paths[name]['log'], 'a') as f:
                f.write(f'=== {name}: cancelled {F.now()} (run interrupted); a rerun resumes it\n')
            self.say(name, 'cancel', 'interrupted; rerun to resume')
            F.release(self.paths[name], self.token)

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


def _duration(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f'{m}m{s:02d}s' if m else f'{s}s'


class Terminated(KeyboardInterrupt):
    """SIGTERM to run_jobs, handled as Ctrl-C: this run's jobs are cancelled, a rerun resumes."""


def _raise_terminated(signum, frame):
    raise Terminated(f'signal {signum}')


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
                B.slurm_executor(tmp, jobs[0] if jobs else Job('check', print), dict(slurm))
            except (ValueError, TypeError, NameError, AssertionError) as e:
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
