"""CT at full size: export time and peak memory per case against stock nnUNetv2_predict (not a test).

Writes a CT phantom (``voxshield_phantom --ct``: int16 HU, 512 x 512 x 120 voxels at 0.8 x 0.8 x 2.5 mm by
default), plans it with stock nnU-Net (CTNormalization), applies the CPU preset, trains a 1-epoch VoxShield
protector on fold all (``python -m nnunetv2_voxshield.victims run``, no end-of-training validation), then, per case:

- export: ``voxshield_export ... --eps-abs HU -num_parts N -part_id K`` (N = number of cases, so part K is case K;
  the last part also publishes the dataset);
- predict: ``nnUNetv2_predict -i <that case> ... --disable_tta -npp 1 -nps 1`` with the same model.

Each command runs in its own process: wall time, CPU time and peak memory (``max_rss_mb``: largest single process,
from ``os.wait4``; ``peak_tree_rss_mb``: sum over the command's process tree, sampled every 0.1 s). Prints a table
and writes ``benchmarks/results/ct_export_<date>.json``. Steps already done in ``-o`` are reused (delete the folder to
start again); exports and predictions are always measured afresh.

    nice -n 10 python benchmarks/ct_export.py -o benchmarks/out/ct --cases 2
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET_ID, NAME, OUT_ID = 870, 'CTBench', 871
CPU_ENV = {'OMP_NUM_THREADS': '1', 'OMP_WAIT_POLICY': 'PASSIVE', 'nnUNet_def_n_proc': '1', 'nnUNet_compile': 'false'}


def _tree_rss_kb(root: int) -> int:
    """Sum of VmRSS over ``root`` and its descendants (Linux /proc)."""
    children, rss = {}, {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/status') as f:
                fields = dict(line.split(':', 1) for line in f if ':' in line)
            children.setdefault(int(fields['PPid']), []).append(int(pid))
            rss[int(pid)] = int(fields.get('VmRSS', '0 kB').split()[0])
        except (OSError, KeyError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total


def measure(cmd, env, log: Path) -> dict:
    """Run ``cmd``; wall and CPU seconds, max RSS of its largest process and the sampled peak of its process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, 'w') as out:
        t0 = time.time()
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=out, stderr=subprocess.STDOUT)
        peak, done = [0], threading.Event()

        def sample():
            while not done.wait(0.1):
                peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f'{" ".join(map(str, cmd))} failed ({proc.returncode}); log: {log}')
    return {'seconds': round(time.time() - t0, 2), 'cpu_seconds': round(usage.ru_utime + usage.ru_stime, 2),
            'max_rss_mb': round(usage.ru_maxrss / 1024, 1), 'peak_tree_rss_mb': round(peak[0] / 1024, 1)}


def run(cmd, env, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, 'w') as out:
        if subprocess.run([str(c) for c in cmd], env=env, stdout=out, stderr=subprocess.STDOUT).returncode:
            sys.exit(f'{" ".join(map(str, cmd))} failed; log: {log}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-o', default=str(REPO / 'benchmarks' / 'out' / 'ct'), help='work folder')
    parser.add_argument('--cases', type=int, default=2, help='CT phantom cases (each measured). Default: 2')
    parser.add_argument('--shape', type=int, nargs=3, default=[120, 512, 512], metavar=('Z', 'Y', 'X'),
                        help='voxels per case (z y x). Default: 120 512 512')
    parser.add_argument('-tr', default='nnUNetTrainerVoxShield_1epochs', help='protector trainer')
    parser.add_argument('--eps-abs', default='20', help='export budget in HU. Default: 20')
    parser.add_argument('--results', default=str(REPO / 'benchmarks' / 'results'), help='where the JSON goes')
    parser.add_argument('--no-predict', action='store_true',
                        help='measure the exports only (nnUNetv2_predict of a full-size case with the CPU preset\'s '
                             '32^3 patches takes ~7000 sliding-window steps)')
    args = parser.parse_args()

    out = Path(args.o).resolve()
    logs = out / 'logs'
    env = dict(os.environ, **CPU_ENV)
    for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (out / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(out / name)
    raw, dataset = out / 'nnUNet_raw', f'Dataset{DATASET_ID:03d}_{NAME}'
    plans, model = 'nnUNetPlans_cpu', f'{args.tr}__nnUNetPlans_cpu__3d_fullres'
    steps = {}
    if not (raw / dataset).is_dir():
        print(f'phantom: {args.cases} CT cases of {args.shape} voxels', flush=True)
        steps['phantom'] = measure(['voxshield_phantom', '-d', DATASET_ID, '--name', NAME, '-n', args.cases, '--ct',
                                    '--shape', *args.shape], env, logs / 'phantom.log')
    if not (out / 'nnUNet_preprocessed' / dataset / f'{plans}.json').is_file():
        print('stock plan and preprocess (3d_fullres), CPU preset', flush=True)
        planner_env = {k: v for k, v in env.items() if k != 'nnUNet_n_proc_DA'}
        steps['plan_and_preprocess'] = measure(['nnUNetv2_plan_and_preprocess', '-d', DATASET_ID, '-c', '3d_fullres',
                                                '-np', '1', '-npfp', '1'], planner_env, logs / 'plan.log')
        run(['voxshield_plans', '-d', DATASET_ID, '--preset', 'cpu'], env, logs / 'plans_preset.log')
    if not (out / 'nnUNet_results' / dataset / model / 'fold_all' / 'checkpoint_final.pth').is_file():
        print(f'protector: {args.tr} on fold all', flush=True)
        steps['train'] = measure([sys.executable, '-m', 'nnunetv2_voxshield.victims', 'run', DATASET_ID, '3d_fullres',
                                  '-tr', args.tr, '-p', plans, '-device', 'cpu'],
                                 dict(env, nnUNet_n_proc_DA='0'), logs / 'train.log')

    cases = sorted(p.name[:-len('.nii.gz')] for p in (raw / dataset / 'labelsTr').glob('*.nii.gz'))
    protected = raw / f'Dataset{OUT_ID:03d}_{NAME}Protected'
    report_folder = out / 'nnUNet_results' / dataset / model / 'fold_all' / f'export_{protected.name}'
    for stale in (protected, raw / f'.{protected.name}.partial', report_folder, out / 'predict'):
        shutil.rmtree(stale, ignore_errors=True)
    rows = []
    for k, case in enumerate(cases):
        print(f'[{case}] export (part {k} of {len(cases)}) and predict', flush=True)
        export = measure(['voxshield_export', '-d', DATASET_ID, '-o', OUT_ID, '-tr', args.tr, '-p', plans, '-f', 'all',
                          '--eps-abs', args.eps_abs, '-num_parts', len(cases), '-part_id', k, '-device', 'cpu'],
                         env, logs / f'export_{case}.log')
        if args.no_predict:
            rows.append({'case': case, 'export': export, 'predict': None})
            continue
        inputs = out / 'predict' / f'in_{case}'
        inputs.mkdir(parents=True)
        os.symlink(raw / dataset / 'imagesTr' / f'{case}_0000.nii.gz', inputs / f'{case}_0000.nii.gz')
        predict = measure(['nnUNetv2_predict', '-i', inputs, '-o', out / 'predict' / f'out_{case}', '-d', DATASET_ID,
                           '-c', '3d_fullres', '-f', 'all', '-tr', args.tr, '-p', plans, '--disable_tta',
                           '-npp', '1', '-nps', '1', '-device', 'cpu'], env, logs / f'predict_{case}.log')
        rows.append({'case': case, 'export': export, 'predict': predict})
    verify = out / 'verify.json'
    run(['voxshield_verify', raw / dataset, protected, '--eps-abs', args.eps_abs, '-o', verify], env,
        logs / 'verify.log')

    header = ('case', 'export s', 'export CPU s', 'export max RSS MB', 'export tree MB', 'predict s', 'predict CPU s',
              'predict max RSS MB', 'predict tree MB')
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for r in rows:
        e, p = r['export'], r['predict'] or {k: float('nan') for k in r['export']}
        lines.append(f"| {r['case']} | {e['seconds']:.1f} | {e['cpu_seconds']:.1f} | {e['max_rss_mb']:.0f} | "
                     f"{e['peak_tree_rss_mb']:.0f} | {p['seconds']:.1f} | {p['cpu_seconds']:.1f} | "
                     f"{p['max_rss_mb']:.0f} | {p['peak_tree_rss_mb']:.0f} |")
    print('\n'.join(lines))
    result = {'date': datetime.date.today().isoformat(), 'shape_zyx': args.shape, 'spacing_xyz_mm': [0.8, 0.8, 2.5],
              'cases': len(cases), 'trainer': args.tr, 'plans': plans, 'eps_abs_hu': float(args.eps_abs),
              'load_average': os.getloadavg(), 'steps': steps, 'rows': rows, 'table': lines,
              'verify': json.loads(verify.read_text()).get('summary')}
    size = 'x'.join(map(str, args.shape[::-1]))
    target = Path(args.results) / f'ct_export_{size}_{result["date"]}.json'
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {target}')


if __name__ == '__main__':
    main()
