"""The audit engine (nnunetv2_voxshield/jobs.py, job_folder.py, job_backends.py) on pure-Python jobs
(tests/job_fns.py): DAG order, parallel workers, resume, a killed job, failures, two runs sharing a root, an
interrupted run, thread / GPU pinning, bad input, and a real one-node Slurm (sbatch, preemption and requeue)."""
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import job_fns as fns
from nnunetv2_voxshield.jobs import Job, run_jobs
from slurm_fixture import local_slurm, slurm_missing

TESTS = Path(__file__).resolve().parent
SLURM_MISSING = slurm_missing()
requires_slurm = pytest.mark.skipif(bool(SLURM_MISSING), reason=SLURM_MISSING or 'Slurm available')


@pytest.fixture(autouse=True)
def importable_job_fns(monkeypatch):
    """Job processes import tests/job_fns.py through PYTHONPATH, as they would import an installed package."""
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(TESTS), os.environ.get('PYTHONPATH')])))


def run(jobs, root, **kw):
    stream = io.StringIO()
    kw.setdefault('poll_s', 0.1)
    records = run_jobs(jobs, str(root), stream=stream, **kw)
    return records, stream.getvalue()


def calls(root, name):
    path = Path(root) / 'jobs' / name / 'calls'
    return len(path.read_text().splitlines()) if path.exists() else 0


def _until(predicate, what, timeout=120.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f'timed out waiting for {what}'
        time.sleep(0.1)


def _exited(pid):
    """Whether ``pid`` has exited: gone, or a zombie (dead; a job's child orphaned by the job's own exit waits for
    init to reap it, which under load may come after the run has returned)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return True


def number_dag(root):
    jd = lambda n: str(Path(root).resolve() / 'jobs' / n)  # noqa: E731
    return [Job('c', fns.write_number, (3,), {'after': [jd('a'), jd('b')]}, deps=('a', 'b'), kind='score'),
            Job('a', fns.write_number, (1,), kind='train'),
            Job('b', fns.write_number, (2,), kind='train'),
            Job('d', fns.write_number, (4,), {'after': [jd('c')]}, deps=('c',), kind='report')]


def test_dag_order_and_records(tmp_path):
    """Dependants start after their deps (c reads a's and b's numbers; d reads c's); records and files hold them."""
    records, out = run(number_dag(tmp_path), tmp_path, workers=2)
    assert list(records) == ['c', 'a', 'b', 'd']
    assert {n: (r.state, r.result) for n, r in records.items()} == {
        'a': ('done', 1), 'b': ('done', 2), 'c': ('done', 6), 'd': ('done', 10)}
    for name, rec in records.items():
        done = json.loads((tmp_path / 'jobs' / name / 'done.json').read_text())
        assert done['name'] == name and done['result'] == rec.result and done['backend'] == 'local'
        assert rec.seconds == done['seconds'] >= 0 and not rec.reused
        assert f'=== {name}: done' in Path(rec.log).read_text()
        assert not (tmp_path / 'jobs' / name / 'claim').exists()      # released
        assert not (tmp_path / 'jobs' / name / 'running.json').exists()
    words = [line.split()[1:] for line in out.splitlines() if line[:2].isdigit()]
    assert ['c', 'queued', 'score', 'after', 'a,', 'b'] in words
    order = [w[0] for w in words if w[1] == 'done']
    assert order.index('c') > max(order.index('a'), order.index('b')) and order[-1] == 'd'
    assert out.rstrip().splitlines()[-1].startswith('4 done (0 from earlier runs), 0 failed, 0 skipped')
    assert f'records in {tmp_path / "jobs"}' in out


def test_two_workers_run_jobs_together(tmp_path):
    """With 2 workers two jobs run at once: each waits for the other to have started (pinned to distinct GPUs)."""
    jobs = [Job('p', fns.rendezvous, ('p', 'q'), gpus=1), Job('q', fns.rendezvous, ('q', 'p'), gpus=1)]
    records, _ = run(jobs, tmp_path, workers=2, gpus=[5, 7])
    assert all(r.state == 'done' for r in records.values())
    assert sorted(r.result for r in records.values()) == ['5', '7']


def test_thread_env_pinned(tmp_path):
    records, out = run([Job('e', fns.env_threads, threads=3)], tmp_path)
    assert records['e'].result == {'OMP_NUM_THREADS': '3', 'MKL_NUM_THREADS': '3', 'VOXSHIELD_TORCH_THREADS': '3',
                                   'OMP_WAIT_POLICY': 'PASSIVE', 'CUDA_VISIBLE_DEVICES': ''}
    assert '3 thread(s)' in out


def test_resume_skips_done_jobs(tmp_path):
    first, _ = run(number_dag(tmp_path), tmp_path, workers=2)
    second, out = run(number_dag(tmp_path), tmp_path, workers=2)
    assert {n: r.result for n, r in second.items()} == {n: r.result for n, r in first.items()}
    assert all(r.state == 'done' and r.reused for r in second.values())
    assert [calls(tmp_path, n) for n in 'abcd'] == [1, 1, 1, 1]
    assert '4 jobs (4 done earlier)' in out and '4 done (4 from earlier runs)' in out


def test_killed_job_reruns_from_partial_state(tmp_path):
    """A job process killed mid-way is reported, its dependant skipped; the rerun continues from its partial file."""
    jobs = [Job('k', fns.killed_once, kwargs={'steps': 3}), Job('after', fns.write_number, (1,), deps=('k',)),
            Job('free', fns.write_number, (2,))]
    first, _ = run(jobs, tmp_path, workers=2)
    assert first['k'].state == 'failed' and 'ended without a record' in first['k'].error
    assert any('=== k: started' in line for line in first['k'].log_tail)
    assert (first['after'].state, first['after'].error) == ('skipped', 'dep failed: k')
    assert (first['free'].state, first['free'].result) == ('done', 2)
    assert (tmp_path / 'jobs' / 'k' / 'partial').read_text() == '1'
    second, _ = run(jobs, tmp_path, workers=2)
    assert second['k'].state == 'done' and second['k'].result == {'resumed_from': 1, 'steps': 3}
    assert second['after'].state == 'done' and second['free'].reused
    assert (calls(tmp_path, 'k'), calls(tmp_path, 'free')) == (2, 1)


def test_failed_job_reported_others_finish(tmp_path):
    jobs = [Job('x', fns.fail, ('boom: bad input',)), Job('y', fns.write_number, (1,), deps=('x',)),
            Job('z', fns.write_number, (1,), deps=('y',)), Job('free', fns.write_number, (5,))]
    records, out = run(jobs, tmp_path, workers=2)
    x = records['x']
    assert (x.state, x.error) == ('failed', 'RuntimeError: boom: bad input')
    assert 'about to fail' in x.log_tail and x.log_tail[-1] == 'RuntimeError: boom: bad input'
    failed = json.loads((tmp_path / 'jobs' / 'x' / 'failed.json').read_text())
    assert failed['error'] == x.error and failed['log_tail'] == x.log_tail
    assert not (tmp_path / 'jobs' / 'x' / 'done.json').exists()
    assert (records['y'].state, records['y'].error) == ('skipped', 'dep failed: x')
    assert (records['z'].state, records['z'].error) == ('skipped', 'dep failed: y')
    assert (records['free'].state, records['free'].result) == ('done', 5)
    assert f'failed: x: RuntimeError: boom: bad input -- see {tmp_path / "jobs" / "x" / "log.txt"}' in out
    rerun, _ = run(jobs, tmp_path)            # a failed job is retried on rerun
    assert rerun['x'].state == 'failed' and calls(tmp_path, 'x') == 2 and calls(tmp_path, 'y') == 0


def test_progress_lines(tmp_path):
    records, out = run([Job('t', fns.epochs, kwargs={'n': 2}, kind='train', progress=fns.progress_seen)], tmp_path,
                       status_every=1e-6)
    assert records['t'].result == 2
    lines = [' '.join(line.split()[1:]) for line in out.splitlines() if line[:2].isdigit()]
    assert any(line.startswith('-- 1 running, 0 queued, 0 done (') for line in lines)    # the status line
    lines = [line for line in lines if not line.startswith('--')]
    assert lines[0] == 't queued train'
    assert lines[1].startswith('t running train, pid ')
    assert lines[2:4] == ['t running epoch 1/2', 't running epoch 2/2']
    assert lines[4].startswith('t done ')


RUNNER = """
import json, sys
from nnunetv2_voxshield.jobs import Job, run_jobs
import job_fns as fns
root, gate = sys.argv[1], sys.argv[2]
jobs = [Job('g', fns.gated, (gate,)), Job('n', fns.write_number, (1,), deps=('g',)), Job('m', fns.write_number, (2,))]
records = run_jobs(jobs, root, workers=2, poll_s=0.1, stream=open(sys.argv[3], 'w'))
print(json.dumps({n: [r.state, r.result, r.reused] for n, r in records.items()}))
"""


def test_two_runs_share_a_root(tmp_path):
    """Two audits on one root: a job claimed by one is waited for by the other; every job runs exactly once."""
    root, gate = tmp_path / 'root', tmp_path / 'gate'
    procs = [subprocess.Popen([sys.executable, '-c', RUNNER, str(root), str(gate), str(tmp_path / f'out{i}')],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.time() + 120
        seen = ''
        while time.time() < deadline:     # one run holds g (blocked on the gate), the other waits for it
            seen = ''.join((tmp_path / f'out{i}').read_text() for i in range(2) if (tmp_path / f'out{i}').exists())
            if 'g running' in ' '.join(seen.split()) and 'claimed by another run' in seen:
                break
            time.sleep(0.05)
        assert 'claimed by another run' in seen
        gate.touch()
        results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    finally:
        gate.touch()
        for p in procs:
            p.kill() if p.poll() is None else None
    for name, value in (('g', 1), ('n', 1), ('m', 2)):
        assert [r[name][:2] for r in results] == [['done', value]] * 2
        assert sorted(r[name][2] for r in results) == [False, True]   # run by one, reused by the other
        assert calls(root, name) == 1


def test_terminated_run_cancels_its_jobs_and_rerun_resumes(tmp_path):
    """SIGTERM (or Ctrl-C) to a run stops its running job processes and the processes they started, and releases
    their claims; the rerun runs the interrupted job again and its dependant after it."""
    root, gate = tmp_path / 'root', tmp_path / 'gate'
    runner = RUNNER.replace('fns.gated,', 'fns.gated_with_child,')
    proc = subprocess.Popen([sys.executable, '-c', runner, str(root), str(gate), str(tmp_path / 'out')],
                            stdout=subprocess.PIPE, text=True)
    try:
        _until(lambda: (root / 'jobs' / 'g' / 'child.pid').exists(), 'the job to start its child')
        job_pid = json.loads((root / 'jobs' / 'g' / 'running.json').read_text())['pid']
        child_pid = int((root / 'jobs' / 'g' / 'child.pid').read_text())
        proc.terminate()
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill() if proc.poll() is None else None
    for pid in (job_pid, child_pid):
        assert _exited(pid), f'process {pid} still runs after the run was terminated'
    assert not (root / 'jobs' / 'g' / 'claim').exists() and not (root / 'jobs' / 'g' / 'done.json').exists()
    assert 'g: cancelled' in (root / 'jobs' / 'g' / 'log.txt').read_text()
    assert 'interrupted; rerun to resume' in (tmp_path / 'out').read_text()
    gate.touch()
    records, _ = run([Job('g', fns.gated, (str(gate),)), Job('n', fns.write_number, (1,), deps=('g',))], root)
    assert [records['g'].state, records['n'].state] == ['done', 'done'] and calls(root, 'g') == 2


def test_job_that_cannot_start_is_reported(tmp_path, monkeypatch):
    """A job process that dies before the job's function runs (here: its module is gone when the job unpickles it)
    gets a failed.json with submitit's last lines and the error; the others finish."""
    mod = tmp_path / 'mods'
    mod.mkdir()
    (mod / 'vanishing.py').write_text('def fn(job_dir):\n    return 1\n')
    monkeypatch.syspath_prepend(str(mod))
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(mod), os.environ['PYTHONPATH']]))
    import vanishing
    (mod / 'vanishing.py').unlink()
    records, _ = run([Job('v', vanishing.fn), Job('free', fns.write_number, (1,))], tmp_path / 'root')
    v = records['v']
    assert (v.state, v.error) == ('failed', "job process ended without a record (ModuleNotFoundError: No module "
                                            "named 'vanishing')")
    failed = json.loads((tmp_path / 'root' / 'jobs' / 'v' / 'failed.json').read_text())
    assert failed['error'] == v.error and failed['log_tail'] == v.log_tail and 'Traceback' in '\n'.join(v.log_tail)
    assert records['free'].result == 1


def test_claims_of_dead_runs_are_taken_over(tmp_path):
    """A claim left by a dead process on this host, or one on another host untouched for longer than STALE_S, is
    taken over; a job process started for a claim this run no longer holds runs nothing (a late Slurm job)."""
    from nnunetv2_voxshield import job_folder as J
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    for name, claim in (('a', {'pid': dead.pid, 'host': J.HOST, 'token': 'old'}),
                        ('b', {'pid': 1, 'host': 'elsewhere', 'token': 'old'})):
        (tmp_path / 'jobs' / name).mkdir(parents=True)
        (tmp_path / 'jobs' / name / 'claim').write_text(json.dumps(claim))
    old = time.time() - J.STALE_S - 1
    os.utime(tmp_path / 'jobs' / 'b' / 'claim', (old, old))
    records, out = run([Job('a', fns.write_number, (1,)), Job('b', fns.write_number, (2,))], tmp_path)
    assert [records['a'].result, records['b'].result] == [1, 2] and 'waiting' not in out
    late = tmp_path / 'jobs' / 'late'
    late.mkdir()
    (late / 'claim').write_text(json.dumps({'pid': os.getpid(), 'host': J.HOST, 'token': 'current'}))
    assert J.job_main(str(late), 'late', 'superseded', 'slurm', fns.write_number, (1,), {}) is None
    assert sorted(p.name for p in late.iterdir()) == ['claim']


@pytest.mark.parametrize('kw, message', [
    ({'backend': 'lsf'}, "unknown backend 'lsf': choose one of local, slurm"),
    ({'workers': 0}, 'workers=0: must be a positive integer'),
    ({'jobs': [Job('a', print), Job('a', print)]}, "job name 'a' is used twice"),
    ({'jobs': [Job('a/b', print)]}, "job name 'a/b': use letters"),
    ({'jobs': [Job('a', print, deps=('nope',))]}, "job a: depends on unknown job 'nope'"),
    ({'jobs': [Job('a', print, deps=('b',)), Job('b', print, deps=('a',))]},
     'job dependencies form a cycle: a -> b -> a'),
    ({'jobs': [Job('a', print, threads=0)]}, 'job a: threads=0 must be a positive integer'),
    ({'jobs': [Job('a', print, gpus=2)], 'gpus': [0]}, 'job a: needs 2 GPU(s), 1 available ([0])'),
])
def test_bad_input_refused_before_any_job(tmp_path, kw, message):
    jobs = kw.pop('jobs', [Job('a', fns.write_number, (1,))])
    with pytest.raises(ValueError) as e:
        run_jobs(jobs, str(tmp_path / 'root'), stream=io.StringIO(), **kw)
    assert str(e.value).startswith(message) and '\n' not in str(e.value)
    assert not (tmp_path / 'root').exists()


@pytest.fixture(scope='session')
def slurm_cluster(tmp_path_factory):
    with local_slurm(tmp_path_factory.mktemp('slurm')) as conf:
        yield conf


@requires_slurm
@pytest.mark.xdist_group('slurm')  # one Slurm (and munged) per run, on one worker
def test_slurm_backend_runs_dag_through_sbatch(tmp_path, slurm_cluster):
    """The same DAG through sbatch on a real one-node Slurm: results, records, a failure, resume."""
    jobs = number_dag(tmp_path) + [Job('x', fns.fail, ('boom',)), Job('y', fns.write_number, (1,), deps=('x',)),
                                   Job('e', fns.env_threads, threads=2)]
    records, out = run(jobs, tmp_path, backend='slurm', workers=4, slurm={'timeout_min': 5})
    assert {n: records[n].result for n in 'abcd'} == {'a': 1, 'b': 2, 'c': 6, 'd': 10}
    assert records['e'].result['OMP_NUM_THREADS'] == '2'
    assert (records['x'].state, records['x'].error) == ('failed', 'RuntimeError: boom')
    assert records['y'].state == 'skipped'
    for name in 'abcd':
        done = json.loads((tmp_path / 'jobs' / name / 'done.json').read_text())
        assert done['backend'] == 'slurm'
    sbatch = list((tmp_path / 'jobs' / 'a' / 'submitit').glob('*_submission.sh'))
    assert sbatch and '#SBATCH --cpus-per-task=1' in sbatch[0].read_text()
    assert 'slurm job' in out and 'submitted' in out
    again, _ = run(jobs[:4], tmp_path, backend='slurm', workers=4)
    assert all(r.reused for r in again.values()) and calls(tmp_path, 'c') == 1


@requires_slurm
@pytest.mark.xdist_group('slurm')  # one Slurm (and munged) per run, on one worker
def test_slurm_preempted_job_requeues_and_resumes(tmp_path, slurm_cluster):
    """Slurm's preemption / time-limit signal (USR2) requeues the job through submitit's checkpoint protocol; the
    job's fn starts again and resumes from its partial state; the run reports it done, not failed."""
    import threading
    job_dir = tmp_path / 'jobs' / 'pre'
    out = {}
    runner = threading.Thread(target=lambda: out.update(run(
        [Job('pre', fns.preempted_once, (str(tmp_path / 'never'),))], tmp_path, backend='slurm')[0]))
    runner.start()
    try:
        _until(lambda: (job_dir / 'calls').exists(), 'the job to start')
        job_id = subprocess.run(['squeue', '-h', '-n', 'pre', '-o', '%i'], capture_output=True, text=True,
                                check=True).stdout.strip()
        subprocess.run(['scancel', job_id, '--signal', 'USR2'], check=True)
        _until(lambda: 'requeued' in (job_dir / 'log.txt').read_text(), 'the requeue')
        _until(lambda: subprocess.run(['squeue', '-h', '-j', job_id, '-o', '%T'], capture_output=True,
                                      text=True).stdout.strip() == 'PENDING', 'the requeued job to be pending')
        # Slurm holds a requeued job for ~2 minutes (BeginTime); release it now
        subprocess.run(['scontrol', 'update', f'JobId={job_id}', 'StartTime=now'], check=True)
    finally:
        (tmp_path / 'never').touch()     # whatever happened, let the job end
        runner.join(180)
    assert (out['pre'].state, out['pre'].result) == ('done', {'resumed': True})
    assert calls(tmp_path, 'pre') == 2 and not (job_dir / 'failed.json').exists()


@requires_slurm
@pytest.mark.xdist_group('slurm')  # one Slurm (and munged) per run, on one worker
def test_bad_slurm_options_refused_before_any_job(tmp_path):
    for options, message in (({'bogus': 1}, "slurm options ['bogus']: Parameter 'bogus' need to be prefixed"),
                             ({'timeout_min': 'abc'}, 'slurm options [\'timeout_min\']: Parameter "timeout_min"')):
        with pytest.raises(ValueError) as e:
            run_jobs([Job('a', fns.write_number, (1,))], str(tmp_path / 'root'), backend='slurm', slurm=options,
                     stream=io.StringIO())
        assert str(e.value).startswith(message) and '\n' not in str(e.value)
    assert not (tmp_path / 'root').exists()
