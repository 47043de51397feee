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
