"""Pure-Python job functions for tests/test_jobs.py (importable by the job processes through PYTHONPATH)."""
import json
import os
import signal


def _count(job_dir):
    """Appends one line per call to ``<job_dir>/calls`` (counts invocations across runs)."""
    with open(os.path.join(job_dir, 'calls'), 'a') as f:
        f.write('x\n')


def write_number(job_dir, value, after=()):
    """Writes ``value`` (plus the numbers of the jobs it depends on) to number.json; returns the sum."""
    _count(job_dir)
    total = value
    for dep_dir in after:
        with open(os.path.join(dep_dir, 'number.json')) as f:
            total += json.load(f)
    with open(os.path.join(job_dir, 'number.json'), 'w') as f:
        json.dump(total, f)
    return total


def env_threads(job_dir):
    """The environment a job process sees."""
    _count(job_dir)
    return {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'VOXSHIELD_TORCH_THREADS',
                                            'OMP_WAIT_POLICY', 'CUDA_VISIBLE_DEVICES')}


def fail(job_dir, message):
    _count(job_dir)
    print('about to fail', flush=True)
    raise RuntimeError(message)


def killed_once(job_dir, steps=3):
    """Works in ``steps`` steps kept in ``partial``; dies by SIGKILL after the first step of its first call, then
    resumes from ``partial`` (as a training resumes from checkpoint_latest)."""
    _count(job_dir)
    partial = os.path.join(job_dir, 'partial')
    start = int(open(partial).read()) if os.path.exists(partial) else 0
    for step in range(start, steps):
        with open(partial, 'w') as f:
            f.write(str(step + 1))
        if step == 0 and start == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    return {'resumed_from': start, 'steps': steps}


def _wait_for(path, timeout=120.0):
    """Polls for ``path`` (a barrier between processes); raises after ``timeout`` seconds."""
    import time
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(f'{path} did not appear within {timeout:.0f} s')
        time.sleep(0.05)


def rendezvous(job_dir, me, other):
    """Marks ``me`` as started next to the job folders and waits until ``other`` has started too: both can finish
    only if two jobs run at the same time. Returns the GPU ids it was pinned to."""
    _count(job_dir)
    jobs = os.path.dirname(job_dir)
    open(os.path.join(jobs, f'started_{me}'), 'w').close()
    _wait_for(os.path.join(jobs, f'started_{other}'))
    return os.environ.get('CUDA_VISIBLE_DEVICES')


def gated(job_dir, gate):
    """Waits until the file ``gate`` exists, then returns 1."""
    _count(job_dir)
    _wait_for(gate)
    return 1


def epochs(job_dir, n=2):
    """Reports 'epoch k/n' in progress.txt and waits until the engine has shown it (``progress_seen`` creates
    ``seen_k``), as a training reports epochs in its log."""
    _count(job_dir)
    for k in range(1, n + 1):
        with open(os.path.join(job_dir, 'progress.txt'), 'w') as f:
            f.write(f'epoch {k}/{n}')
        _wait_for(os.path.join(job_dir, f'seen_{k}'))
    return n


def progress_seen(job_dir):
    """Progress probe for ``epochs``: returns its text and acknowledges it."""
    path = os.path.join(job_dir, 'progress.txt')
    if not os.path.exists(path):
        return None
    text = open(path).read()
    k = text.split()[1].split('/')[0]
    open(os.path.join(job_dir, f'seen_{k}'), 'w').close()
    return text


def preempted_once(job_dir, never):
    """First call: marks ``partial`` and waits (to be preempted); a later call resumes from ``partial``."""
    _count(job_dir)
    partial = os.path.join(job_dir, 'partial')
    if os.path.exists(partial):
        return {'resumed': True}
    open(partial, 'w').close()
    _wait_for(never, timeout=600)
    return {'resumed': False}


def gated_with_child(job_dir, gate):
    """Like ``gated``, in a child process it starts (as a train job runs nnU-Net); the child's pid in child.pid."""
    import subprocess
    import sys
    _count(job_dir)
    child = subprocess.Popen([sys.executable, '-c', f'import job_fns; job_fns._wait_for({gate!r})'])
    with open(os.path.join(job_dir, 'child.pid'), 'w') as f:
        f.write(str(child.pid))
    return child.wait()
