"""A job's folder ``<root>/jobs/<name>/``: its records (done.json / failed.json, written atomically), its claim (two
runs sharing a root), and what runs inside the job process (``job_main``: log.txt, the records). Standard library
only: every job process imports it.
"""
import fcntl
import json
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional

LOG_TAIL_LINES = 30
HEARTBEAT_S = 30.0   # claims and running.json are touched this often ...
STALE_S = 300.0      # ... and one untouched for this long belongs to a dead run
HOST = socket.gethostname()


def write_json(path: str, obj) -> None:
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


def read_json(path: str) -> Optional[dict]:
    """A JSON object from ``path``, or None if the file is missing, unreadable or not an object."""
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def tail(path: str, n: int = LOG_TAIL_LINES) -> List[str]:
    """The last ``n`` lines of a log file (from its last 64 KiB), [] if it cannot be read."""
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            lines = f.read().decode('utf-8', 'replace').splitlines()
        return lines[-n:]
    except OSError:
        return []


def now() -> str:
    """Local time as an ISO 8601 string with UTC offset."""
    return time.strftime('%Y-%m-%dT%H:%M:%S%z')


def pid_alive(pid) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return isinstance(pid, int)
    return True


def alive(path: str) -> Optional[dict]:
    """The marker at ``path`` (claim or running.json) if its owner is alive: touched within STALE_S and, on this
    host, its pid still running; else None."""
    info = read_json(path)
    if info is None:
        return None
    try:
        if time.time() - os.stat(path).st_mtime > STALE_S:
            return None
    except OSError:
        return None
    if info.get('host') == HOST and not pid_alive(info.get('pid')):
        return None
    return info


def job_paths(root: str, name: str) -> Dict[str, str]:
    """The files of job ``name`` under ROOT/jobs/<name>/: log, done, failed, claim, running, lock, submitit."""
    d = os.path.join(os.path.abspath(root), 'jobs', name)
    return {'dir': d, 'log': os.path.join(d, 'log.txt'), 'done': os.path.join(d, 'done.json'),
            'failed': os.path.join(d, 'failed.json'), 'claim': os.path.join(d, 'claim'),
            'running': os.path.join(d, 'running.json'), 'lock': os.path.join(d, '.claim.lock'),
            'submitit': os.path.join(d, 'submitit')}


def read_done(root: str, name: str) -> Optional[dict]:
    """A job's completion record, or None if it has not finished."""
    rec = read_json(job_paths(root, name)['done'])
    return rec if rec is not None and rec.get('name') == name else None


# ---------------------------------------------------------------------------------------------------------------
# inside the job process


def _heartbeat(path: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:
            pass


class JobCall:
    """What submitit runs: ``job_main`` of one job. Its ``checkpoint`` (submitit's checkpointable protocol) makes a
    Slurm job that is preempted or reaches its time limit requeue itself; the job's fn resumes its own partial work
    when it starts again (e.g. nnU-Net's checkpoint_latest.pth)."""

    def __init__(self):
        self.requeued = False

    def __call__(self, *args):
        return job_main(*args, call=self)

    def checkpoint(self, *args):
        """submitit's checkpoint hook: requeue the same call (the job resumes its own partial work)."""
        from submitit.helpers import DelayedSubmission
        self.requeued = True
        return DelayedSubmission(JobCall(), *args)


def job_main(job_dir: str, name: str, token: str, backend: str, fn: Callable, args: tuple, kwargs: dict,
             submitted: Optional[float] = None, call: Optional[JobCall] = None):
    """Runs in the job's own process (submitted through submitit): checks that this run still owns the job, sends
    stdout/stderr to log.txt, calls ``fn(job_dir, *args, **kwargs)`` and writes done.json or failed.json."""
    p = {k: os.path.join(job_dir, v) for k, v in
         (('log', 'log.txt'), ('done', 'done.json'), ('failed', 'failed.json'), ('claim', 'claim'),
          ('running', 'running.json'))}
    claim = read_json(p['claim'])
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
    started, t0 = now(), time.time()
    try:
        print(f'=== {name}: started {started} on {HOST} (pid {os.getpid()}, backend {backend}, '
              f'threads {os.environ.get("OMP_NUM_THREADS", "?")}, '
              f'CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "")!r})', flush=True)
        write_json(p['running'], {'pid': os.getpid(), 'host': HOST, 'token': token, 'started': started})
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
                print(f'=== {name}: preempted or out of time, requeued {now()}', flush=True)
                raise
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            error = f'{type(e).__name__}: {e}'.splitlines()[0] if str(e) else type(e).__name__
            if isinstance(e, TypeError) and 'JSON serializable' in str(e):
                error = f'result of {name} is not JSON-serialisable: {e}'
            write_json(p['failed'], dict(base, error=error, seconds=round(time.time() - t0, 3),
                                         finished=now(), finished_unix=time.time(), log_tail=tail(p['log'])))
            raise
        seconds = round(time.time() - t0, 3)
        write_json(p['done'], dict(base, result=result, seconds=seconds, finished=now(), finished_unix=time.time()))
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


def try_claim(p: Dict[str, str], token: str) -> bool:
    """Atomically claims the job for this run; a claim whose owner is dead is taken over (under a lock, so two runs
    cannot both take it over). False when a live other run holds it."""
    info = json.dumps({'pid': os.getpid(), 'host': HOST, 'token': token, 'time': now()})

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
            if claim_live(p):
                return False
            try:
                os.remove(p['claim'])
            except FileNotFoundError:
                pass
            return create()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def claim_live(p: Dict[str, str]) -> bool:
    """The claim's owner (the run that made it, or the job process it started) is alive."""
    claim = read_json(p['claim'])
    if claim is None:
        # a claim being written right now is live; an unreadable old one is not
        try:
            return time.time() - os.stat(p['claim']).st_mtime < 5
        except OSError:
            return False
    if alive(p['claim']) is not None:
        return True
    running = alive(p['running'])
    return running is not None and running.get('token') == claim.get('token')


def release(p: Dict[str, str], token: str) -> None:
    """Remove the job's claim file if ``token`` still holds it (another worker's claim is left alone)."""
    claim = read_json(p['claim'])
    if claim is not None and claim.get('token') == token:
        try:
            os.remove(p['claim'])
        except FileNotFoundError:
            pass
