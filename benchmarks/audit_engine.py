"""The audit engine (nnunetv2_voxshield/jobs.py) on a `quick` panel: parallel efficiency at 1 and 2 local workers,
the engine's overhead per job against a victim's time, and a run killed in the middle of a training and rerun.

Three sources of jobs, one measurement:
- ``--source audit``: the real audit, ``voxshield_audit <args after -->`` (panel, epochs, datasets as you give them),
  run as a subprocess per measurement with ``-o <work>/<run> -w W``;
- ``--source phantom``: the real audit on the phantom (6 training cases, 2 test cases, a copy with a label-keyed
  offset) with the quick panel's two exploiters as short victims (stock and no-augmentation nnU-Net, --epochs
  epochs of 3 iterations: benchmarks/engine_trainers), CPU plans;
- ``--source synthetic``: the quick panel's DAG shape (plan x2 -> train x4 -> predict x4 -> score x4, quality)
  with pure-Python CPU work instead of nnU-Net (each 'epoch' a fixed amount of work, a checkpoint file after each),
  to validate the measurement in seconds.

Per run, from the jobs' done.json (the engine's own clock): span = last finished - first submitted, the jobs' own
time (sum of ``seconds``), wall / sum (1 / parallel efficiency at 1 worker; efficiency = sum / (workers x span)),
and at 1 worker the engine's overhead per job = (span - sum) / jobs (process start, polling, claims). The kill
test: a fresh run at 2 workers is sent SIGTERM (as Ctrl-C) once a training has passed half of its epochs, then the
same command is rerun; reported: the extra wall time against the uninterrupted 2-worker run, that every job has
exactly one completion record, how often each job was started (from its log.txt), and whether the jobs that had
finished before the kill kept their records and numbers unchanged.

    python benchmarks/audit_engine.py --source synthetic --work /tmp/engine_bench
    python benchmarks/audit_engine.py --source phantom --work /tmp/engine_bench
    python benchmarks/audit_engine.py --source audit --work /tmp/engine_bench -- --clean C --protected P --epochs 4
"""
import argparse
import datetime
import glob
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# --------------------------------------------------------------------------------------------- synthetic jobs
def _work(units: int) -> float:
    """A fixed amount of single-threaded CPU work (so contention for the cores shows, as for a real victim)."""
    x = 0.0
    for i in range(units * 100000):
        x += (i % 7) * 1e-9
    return x


def syn_job(job_dir: str, units: int) -> dict:
    _work(units)
    return {'units': units}


def syn_train(job_dir: str, epochs: int, units: int) -> dict:
    """'Epochs' of work, a checkpoint after each; continues from the checkpoint, as nnU-Net's --c does."""
    ckpt = os.path.join(job_dir, 'checkpoint_latest.json')
    start = json.load(open(ckpt))['epoch'] if os.path.exists(ckpt) else 0
    for epoch in range(start, epochs):
        print(f'Epoch {epoch}', flush=True)
        _work(units)
        tmp = ckpt + '.tmp'
        with open(tmp, 'w') as f:
            json.dump({'epoch': epoch + 1}, f)
        os.replace(tmp, ckpt)
    return {'epochs': epochs, 'resumed_from_epoch': start, 'dice': round(0.5 + (sum(map(ord, job_dir)) % 97) / 200, 4)}


def syn_progress(job_dir: str):
    ckpt = os.path.join(job_dir, 'checkpoint_latest.json')
    try:
        return f'epoch {json.load(open(ckpt))["epoch"]}'
    except (OSError, ValueError):
        return None


def synthetic_jobs(epochs: int, units: int, threads: int = 1):
    """The quick panel's DAG (exploiters stock and noda, rows clean and copy, seed 0) with synthetic work."""
    from nnunetv2_voxshield.jobs import Job
    jobs = [Job(f'plan_{row}', syn_job, (units,), kind='plan', threads=threads) for row in ('clean', 'copy')]
    for exploiter in ('stock', 'noda'):
        for row in ('clean', 'copy'):
            tag = f'{exploiter}_{row}_s0'
            jobs += [Job(f'train_{tag}', syn_train, (epochs, units), deps=(f'plan_{row}',), kind='train',
                         threads=threads, progress=syn_progress),
                     Job(f'predict_{tag}', syn_job, (units,), deps=(f'train_{tag}',), kind='predict', threads=threads),
                     Job(f'score_{tag}', syn_job, (max(1, units // 4),), deps=(f'predict_{tag}',), kind='score',
                         threads=threads)]
    jobs.append(Job('quality_copy', syn_job, (units,), kind='score', threads=threads))
    return jobs


def run_synthetic(root: str, workers: int, epochs: int, units: int) -> None:
    """One run of the synthetic panel (the subprocess a measurement times)."""
    from nnunetv2_voxshield.jobs import run_jobs
    records = run_jobs(synthetic_jobs(epochs, units), root, workers=workers, stream=sys.stderr, status_every=30)
    sys.exit(0 if all(r.state == 'done' for r in records.values()) else 1)


# --------------------------------------------------------------------------------------------- phantom audit
ENGINE_TRAINERS = os.path.join(REPO, 'benchmarks', 'engine_trainers')


def phantom_audit_args(work: str) -> list:
    """A clean phantom and a protected copy (a +-40 offset inside labels 1 / 2) under ``work``; the audit's args."""
    import shutil
    import numpy as np
    import SimpleITK as sitk
    from nnunetv2_voxshield.phantom import write_phantom_dataset
    raw = os.path.join(work, 'raw')
    os.makedirs(raw, exist_ok=True)
    clean = os.path.join(raw, 'Dataset201_EngineClean')
    copy = os.path.join(raw, 'Dataset202_EngineCopy')
    if not os.path.isdir(clean):
        write_phantom_dataset(201, 'EngineClean', n_cases=6, n_test=2, raw_root=raw)
    if not os.path.isdir(copy):
        tmp = copy + '.tmp'
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(clean, tmp, ignore=shutil.ignore_patterns('*Ts'))
        for f in sorted(glob.glob(os.path.join(tmp, 'imagesTr', '*.nii.gz'))):
            image = sitk.ReadImage(f)
            a = sitk.GetArrayFromImage(image)
            lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(tmp, 'labelsTr',
                                                                     os.path.basename(f).replace('_0000', ''))))
            b = a.astype(np.float64) + np.where(lab == 1, 40.0, np.where(lab == 2, -40.0, 0.0))
            if a.dtype.kind in 'iu':
                b = np.clip(b, np.iinfo(a.dtype).min, np.iinfo(a.dtype).max)
            out = sitk.GetImageFromArray(b.astype(a.dtype))
            out.CopyInformation(image)
            sitk.WriteImage(out, f, True)
        os.replace(tmp, copy)
    return ['--clean', clean, '--protected', copy, '-p', 'nnUNetPlans_cpu', '--exploiter', 'stock=nnUNetTrainer_engine',
            '--exploiter', 'noda=nnUNetTrainerNoDA_engine', '--disable-tta', '--boot', '200', '--no-detector']


# --------------------------------------------------------------------------------------------- measuring
def command(args, root: str, workers: int) -> list:
    if args.source == 'synthetic':
        return [sys.executable, os.path.abspath(__file__), '_run', root, str(workers), str(args.epochs),
                str(args.units)]
    return [sys.executable, '-c', 'from nnunetv2_voxshield.audit import audit_entry; audit_entry()',
            *args.audit_args, '-o', root, '-w', str(workers)]


def records(root: str) -> dict:
    out = {}
    for path in sorted(glob.glob(os.path.join(root, 'jobs', '*', 'done.json'))):
        with open(path) as f:
            rec = json.load(f)
        out[rec['name']] = rec
    return out


def starts(root: str) -> dict:
    """How often each job's function was started (the '=== name: started' lines of its log.txt)."""
    n = {}
    for log in glob.glob(os.path.join(root, 'jobs', '*', 'log.txt')):
        name = os.path.basename(os.path.dirname(log))
        n[name] = sum(line.startswith(f'=== {name}: started') for line in open(log, errors='replace'))
    return n


def first_epoch_of_last_start(root: str, name: str):
    """The first 'Epoch N' nnU-Net (or the synthetic training) logged after the job's last start: N > 0 when the
    training continued from its checkpoint."""
    text = open(os.path.join(root, 'jobs', name, 'log.txt'), errors='replace').read()
    last = text.split(f'=== {name}: started')[-1]
    m = re.search(r'^.*Epoch (\d+)\s*$', last, re.M)
    return int(m.group(1)) if m else None


def summarise(recs: dict, workers: int, wall: float) -> dict:
    own = sum(r['seconds'] for r in recs.values())
    span = max(r['finished_unix'] for r in recs.values()) - min(r['submitted_unix'] for r in recs.values())
    train = [r['seconds'] for n, r in recs.items() if n.startswith('train_')]
    row = {'workers': workers, 'jobs': len(recs), 'wall_s': round(wall, 2), 'span_s': round(span, 2),
           'sum_job_s': round(own, 2), 'span_over_sum': round(span / own, 3),
           'parallel_efficiency': round(own / (workers * span), 3),
           'mean_train_s': round(sum(train) / len(train), 2) if train else None,
           'overhead_per_job_s': round((span - own) / len(recs), 2) if workers == 1 else None,
           'launch_latency_s': round(sum(r['started_unix'] - r['submitted_unix'] for r in recs.values())
                                     / len(recs), 2)}
    return row


load = {}   # 1/5/15-min load average at the start of each run


def timed_run(args, root: str, workers: int, kill_when=None) -> tuple:
    """Runs the command; with ``kill_when(root)`` sends SIGTERM once it returns True. -> (wall s, return code)."""
    log = open(root + '.log', 'a')
    key = os.path.basename(root) + ('_rerun' if os.path.basename(root) in load else '')
    load[key] = [round(x, 2) for x in os.getloadavg()]   # other work on the machine
    t0 = time.time()
    proc = subprocess.Popen(command(args, root, workers), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    killed = False
    while proc.poll() is None:
        if kill_when is not None and not killed and kill_when(root):
            proc.send_signal(signal.SIGTERM)
            killed = True
        time.sleep(0.2)
    return time.time() - t0, proc.returncode, killed


def last_epoch(root: str, name: str):
    """The last 'Epoch N' (0-based) nnU-Net (or the synthetic training) logged since the job's last start, from its
    log.txt (flushed as it goes), or None."""
    try:
        text = open(os.path.join(root, 'jobs', name, 'log.txt'), errors='replace').read()
    except OSError:
        return None
    found = re.findall(r'^.*Epoch (\d+)\s*$', text.split(f'=== {name}: started')[-1], re.M)
    return int(found[-1]) if found else None


def half_trained(total: int):
    """True once some training has passed half of its ``total`` epochs."""
    def check(root: str) -> bool:
        for d in glob.glob(os.path.join(root, 'jobs', 'train_*')):
            epoch = last_epoch(root, os.path.basename(d))
            if epoch is not None and epoch >= max(1, total // 2):
                return True
        return False
    return check


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--source', choices=('synthetic', 'phantom', 'audit'), default='synthetic')
    parser.add_argument('--work', required=True, help='scratch folder (one sub-folder per run)')
    parser.add_argument('--epochs', type=int, default=6, help='victim epochs (synthetic and phantom; audit: taken '
                                                              'from its --epochs). Default: 6')
    parser.add_argument('--units', type=int, default=20, help='synthetic work per epoch / step (units of ~0.05 s)')
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2])
    parser.add_argument('-o', '--output', default=None, help='results JSON (default: benchmarks/results/'
                                                             'audit_engine[_synthetic]_<date>.json)')
    if argv is None:
        argv = sys.argv[1:]
    audit_args = argv[argv.index('--') + 1:] if '--' in argv else []
    args = parser.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
    args.audit_args = audit_args
    if args.source == 'audit' and not audit_args:
        parser.error('--source audit: give the audit\'s arguments after -- (e.g. -- --clean C --protected P)')
    if args.source == 'audit' and '--epochs' in audit_args:
        args.epochs = int(audit_args[audit_args.index('--epochs') + 1])
    os.makedirs(args.work, exist_ok=True)
    if args.source == 'phantom':
        args.audit_args = phantom_audit_args(os.path.abspath(args.work))
        os.environ['VOXSHIELD_ENGINE_EPOCHS'] = str(args.epochs)   # engine_trainers.Short
        os.environ['nnUNet_extTrainer'] = os.pathsep.join(
            [ENGINE_TRAINERS] + [p for p in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p])
    stamp = datetime.datetime.utcnow().strftime('%Y%m%dT%H%M%S')

    runs = []
    for w in args.workers:
        root = os.path.join(args.work, f'{stamp}_w{w}')
        wall, rc, _ = timed_run(args, root, w)
        recs = records(root)
        row = summarise(recs, w, wall)
        row.update(returncode=rc, root=root)
        runs.append(row)
        print(json.dumps(row), flush=True)

    # killed in the middle of a training, then rerun
    w = max(args.workers)
    root = os.path.join(args.work, f'{stamp}_killed_w{w}')
    wall_a, rc_a, killed = timed_run(args, root, w, kill_when=half_trained(args.epochs))
    before = records(root)
    mtimes = {n: os.path.getmtime(os.path.join(root, 'jobs', n, 'done.json')) for n in before}
    wall_b, rc_b, _ = timed_run(args, root, w)
    after = records(root)
    started = starts(root)
    reference = next((r['root'] for r in runs if r['workers'] == w), None)
    expected = sorted(records(reference)) if reference else [j.name for j in synthetic_jobs(args.epochs, args.units)]
    uninterrupted = next((r['wall_s'] for r in runs if r['workers'] == w), None)
    resumed = {n: first_epoch_of_last_start(root, n) for n, k in started.items() if k > 1 and n.startswith('train_')}
    kill = {'workers': w, 'killed': killed, 'returncode_killed': rc_a, 'returncode_rerun': rc_b,
            'wall_killed_run_s': round(wall_a, 2), 'wall_rerun_s': round(wall_b, 2),
            'wall_uninterrupted_s': uninterrupted,
            'extra_wall_s': round(wall_a + wall_b - uninterrupted, 2) if uninterrupted else None,
            'jobs_done_before_kill': sorted(before),
            'every_job_once': sorted(after) == sorted(expected) and all(r.get('name') == n for n, r in after.items()),
            'starts_per_job': dict(sorted(started.items())),
            'finished_before_kill_unchanged': all(after[n]['result'] == before[n]['result']
                                                  and os.path.getmtime(os.path.join(root, 'jobs', n, 'done.json'))
                                                  == mtimes[n] for n in before),
            'resumed_trainings_first_epoch': resumed, 'root': root}
    report = os.path.join(root, 'report.json')
    if os.path.isfile(report):   # the audit's report: each copy's exploiters, once each
        with open(report) as f:
            rows = [(c.get('name'), e.get('name'))
                    for c in json.load(f).get('copies', []) for e in c.get('exploiters', [])]
        kill['report_rows'] = [list(r) for r in rows]
        kill['report_rows_once'] = len(rows) == len(set(rows)) > 0
    print(json.dumps(kill), flush=True)

    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=REPO).stdout.strip()
    except OSError:
        commit = None
    result = {'provenance': {'command': 'python ' + ' '.join(shlex.quote(a) for a in [sys.argv[0]] + list(argv)),
                             'commit': commit, 'date': datetime.datetime.utcnow().isoformat(timespec='seconds') + 'Z',
                             'machine': {'nproc': os.cpu_count(), 'platform': platform.platform()}},
              'source': args.source, 'epochs': args.epochs, 'units': args.units if args.source == 'synthetic' else None,
              'runs': runs, 'kill_and_rerun': kill, 'load_average_at_start': load}
    tag = '_synthetic' if args.source == 'synthetic' else ''
    out = args.output or os.path.join(REPO, 'benchmarks', 'results',
                                      f'audit_engine{tag}_{datetime.date.today().isoformat()}.json')
    from nnunetv2_voxshield.job_folder import write_json
    write_json(os.path.abspath(out), result)
    print(f'results: {out}')


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '_run':
        run_synthetic(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
