"""Benchmark on MSD Hippocampus: protectors trained with stock nnUNetv2_train, exported, verified, then stock nnU-Net
victims on clean / protected / purified data, scored on 48 clean held-out cases.

    python benchmarks/hippocampus.py -o benchmarks/out/hippocampus [--protector-epochs 5] [--victim-epochs 5]

Protectors train with nnU-Net's own trainer API on fold all (as `nnUNetv2_train D 3d_fullres all -tr ...` does, minus
its end-of-training validation on the training cases). Reads ../shared/data/Dataset004_Hippocampus (or --data) with the committed split (160 train / 48 test); everything
is written under -o (private nnUNet_raw/_preprocessed/_results). Rerunning resumes. Prints a table and writes
benchmark.json; the victims' full reports are in -o/eval_main and -o/eval_baselines (report.md, figure.png).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLIT = HERE / 'hippocampus_split.json'
DEFAULT_DATA = HERE.parent.parent / 'shared' / 'data' / 'Dataset004_Hippocampus'
PLANS = 'nnUNetPlans_cpu'
# method name -> (protector trainer or None for an export-time method, export --method or None, dataset id)
METHODS = {
    'VoxShield': ('nnUNetTrainerVoxShield', None, 11),
    'Random': (None, 'random', 12),
    'EM': ('nnUNetTrainerEM', None, 13),
    'UMed-3D': ('nnUNetTrainerUMed', None, 14),
    'VoxShield-EOT': ('nnUNetTrainerVoxShieldEOT', None, 15),
}


def log(msg):
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def run(cmd, env, log_file):
    """Run a command, output to log_file; raise with the log's tail on failure. Returns seconds taken."""
    t0 = time.time()
    with open(log_file, 'a') as f:
        f.write(f'\n$ {" ".join(map(str, cmd))}\n')
        f.flush()
        proc = subprocess.run([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = Path(log_file).read_text()[-3000:]
        raise SystemExit(f'{cmd[0]} failed (exit {proc.returncode}); see {log_file}:\n{tail}')
    return time.time() - t0


def prepare_raw(data: Path, raw: Path, split: dict) -> Path:
    """Dataset004 with the split's training cases in imagesTr/labelsTr and its test cases in imagesTs/labelsTs."""
    dst = raw / 'Dataset004_Hippocampus'
    if (dst / 'dataset.json').is_file():
        return dst
    tmp = raw / '.Dataset004_Hippocampus.partial'
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        (tmp / sub).mkdir(parents=True)
    for part, suffix in (('train', 'Tr'), ('test', 'Ts')):
        for case in split[part]:
            shutil.copy(data / 'imagesTr' / f'{case}_0000.nii.gz', tmp / f'images{suffix}')
            shutil.copy(data / 'labelsTr' / f'{case}.nii.gz', tmp / f'labels{suffix}')
    ds = json.loads((data / 'dataset.json').read_text())
    ds['numTraining'] = len(split['train'])
    (tmp / 'dataset.json').write_text(json.dumps(ds, indent=2))
    os.replace(tmp, dst)
    return dst


def seconds_per_iteration(trainer_name: str, n: int = 20) -> float:
    """Mean wall time of ``n`` train_steps (after 2 warm-up steps) of a trainer on the CPU plan, in-process."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args('4', '3d_fullres', 0, trainer_name, PLANS, device=torch.device('cpu'))
    trainer.on_train_start()
    for _ in range(2):
        trainer.train_step(next(trainer.dataloader_train))
    batches = [next(trainer.dataloader_train) for _ in range(n)]
    t0 = time.time()
    for b in batches:
        trainer.train_step(b)
    return (time.time() - t0) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-o', default=str(HERE / 'out' / 'hippocampus'), help='output folder')
    parser.add_argument('--data', default=str(DEFAULT_DATA), help='Dataset004_Hippocampus raw folder')
    parser.add_argument('--protector-epochs', type=int, default=5, choices=(1, 5, 10, 20, 50, 100))
    parser.add_argument('--victim-epochs', type=int, default=5, choices=(1, 5, 10, 20, 50, 100))
    parser.add_argument('--methods', nargs='+', default=['VoxShield', 'Random', 'EM', 'UMed-3D'],
                        choices=list(METHODS))
    parser.add_argument('--main-method', default='VoxShield', help='the method also evaluated with defences and 2d')
    parser.add_argument('--defences', nargs='*', default=['blur', 'zmedian', 'zresample', 'quantise'])
    parser.add_argument('--seeds', nargs='+', type=int, default=[0])
    parser.add_argument('--skip-timing', action='store_true')
    args = parser.parse_args()

    out = Path(args.o).resolve()
    roots = {k: out / k for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for d in roots.values():
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in roots.items()}, 'nnUNet_def_n_proc': '1',
           'nnUNet_compile': 'false', 'OMP_WAIT_POLICY': 'PASSIVE'}
    train_env = {**env, 'nnUNet_n_proc_DA': '0'}
    os.environ.update(train_env)
    logs = out / 'logs'
    logs.mkdir(exist_ok=True)
    result_file = out / 'benchmark.json'
    results = json.loads(result_file.read_text()) if result_file.is_file() else {}
    save = lambda: result_file.write_text(json.dumps(results, indent=2))
    results['settings'] = {'protector_epochs': args.protector_epochs, 'victim_epochs': args.victim_epochs,
                           'plans': PLANS, 'methods': args.methods, 'defences': args.defences, 'seeds': args.seeds,
                           'split': str(SPLIT.relative_to(HERE.parent))}

    split = json.loads(SPLIT.read_text())
    clean = prepare_raw(Path(args.data), roots['nnUNet_raw'], split)
    if not (roots['nnUNet_preprocessed'] / 'Dataset004_Hippocampus' / f'{PLANS}.json').is_file():
        log('plan and preprocess (stock), CPU preset')
        run(['nnUNetv2_plan_and_preprocess', '-d', '4', '-c', '3d_fullres', '-np', '1'], env, logs / 'plan.log')
        run(['voxshield_plans', '-d', '4', '--preset', 'cpu'], env, logs / 'plan.log')

    timing = results.setdefault('timing', {})
    if not args.skip_timing and 'voxshield_s_per_iteration' not in timing:
        log('timing train steps: stock nnUNetTrainer vs nnUNetTrainerVoxShield (20 steps each)')
        timing['stock_s_per_iteration'] = seconds_per_iteration('nnUNetTrainer')
        timing['voxshield_s_per_iteration'] = seconds_per_iteration('nnUNetTrainerVoxShield')
        save()

    protected = {}

    def protect(name):
        """Train the protector (stock nnUNetv2_train), export and verify; resumable."""
        trainer, method, dataset_id = METHODS[name]
        dst_name = f'Dataset{dataset_id:03d}_Hippocampus{name.replace("-", "")}'
        protected[name] = roots['nnUNet_raw'] / dst_name
        entry = results.setdefault('protectors', {}).setdefault(name, {})
        export_cmd = ['voxshield_export', '-d', '4', '-o', dataset_id, '--name', f'Hippocampus{name.replace("-", "")}',
                      '-p', PLANS, '-c', '3d_fullres', '-device', 'cpu']
        if trainer is not None:
            trainer = f'{trainer}_{args.protector_epochs}epochs'
            fold = roots['nnUNet_results'] / 'Dataset004_Hippocampus' / f'{trainer}__{PLANS}__3d_fullres' / 'fold_all'
            if not (fold / 'checkpoint_final.pth').is_file():
                # nnU-Net's own training on fold all, seeded, without the end-of-training validation (on fold all it
                # predicts all 160 training cases with mirroring: ~20 min on CPU, and no protection number needs it)
                log(f'{name}: training protector {trainer} (nnU-Net training API, fold all, seed 0)')
                entry['train_seconds'] = run([sys.executable, '-m', 'nnunetv2_voxshield.victims', 'run', '4',
                                              '3d_fullres', '--seed', '0', '-tr', trainer, '-p', PLANS,
                                              '-device', 'cpu'], train_env, logs / f'train_{name}.log')
                save()
            export_cmd += ['-tr', trainer, '-f', 'all']
        else:
            export_cmd += ['--method', method]
        if not protected[name].is_dir():
            log(f'{name}: export')
            entry['export_seconds'] = run(export_cmd, env, logs / f'export_{name}.log')
            entry['export_seconds_per_case'] = entry['export_seconds'] / len(split['train'])
            save()
        if 'verify' not in entry:
            report = out / f'verify_{name}.json'
            run(['voxshield_verify', clean, protected[name], '-o', report], env, logs / f'verify_{name}.log')
            entry['verify'] = json.loads(report.read_text()).get('summary')
            save()

    if args.main_method in args.methods:
        protect(args.main_method)
    main_trainer = f'{METHODS[args.main_method][0]}_{args.protector_epochs}epochs'
    if not args.skip_timing and 'predict_seconds_per_case' not in timing and args.main_method in protected:
        log('timing nnUNetv2_predict (protector surrogate, no TTA) on the test images')
        pred_out = out / 'timing_predictions'
        shutil.rmtree(pred_out, ignore_errors=True)
        seconds = run(['nnUNetv2_predict', '-i', clean / 'imagesTs', '-o', pred_out, '-d', '4', '-c', '3d_fullres',
                       '-p', PLANS, '-f', 'all', '-tr', main_trainer, '-device', 'cpu', '--disable_tta',
                       '-npp', '1', '-nps', '1'], env, logs / 'predict_timing.log')
        timing['predict_seconds_per_case'] = seconds / len(split['test'])
        timing['export_seconds_per_case'] = results['protectors'][args.main_method].get('export_seconds_per_case')
        save()

    from nnunetv2_voxshield.evaluate import evaluate
    common = dict(test_images=str(clean / 'imagesTs'), test_labels=str(clean / 'labelsTs'), plans=PLANS,
                  epochs=args.victim_epochs, seeds=args.seeds, device='cpu', disable_tta=True)
    if args.main_method in protected:
        log(f'victims: clean vs {args.main_method} (+ defences), 3d_fullres and 2d')
        results['eval_main'] = evaluate('4', [str(protected[args.main_method])], str(out / 'eval_main'),
                                        configurations=('3d_fullres', '2d'), defences=args.defences,
                                        method_name=[args.main_method], **common)
        save()
    others = [m for m in args.methods if m != args.main_method]
    for name in others:
        protect(name)
    if others:
        log(f'victims: clean vs {", ".join(others)}, 3d_fullres')
        results['eval_baselines'] = evaluate('4', [str(protected[m]) for m in others], str(out / 'eval_baselines'),
                                             configurations=('3d_fullres',), method_name=others, **common)
        save()
    print_table(results)


def print_table(results: dict):
    rows = []
    for key in ('eval_main', 'eval_baselines'):
        for row in (results.get(key) or {}).get('rows', []):
            if key == 'eval_baselines' and row['row'] == 'clean':
                continue
            q = row.get('quality') or {}
            for config, v in row['victims'].items():
                rows.append((row['method'], row['defence'] or '-', config, v['dice']['mean'], v['hd95_mm']['mean'],
                             (q.get('psnr') or {}).get('mean'), (q.get('ssim') or {}).get('mean')))
    print(f'{"method":<15}{"defence":<28}{"config":<12}{"DSC":>8}{"HD95 mm":>10}{"PSNR dB":>10}{"SSIM":>8}')
    fmt = lambda v, d: f'{v:.{d}f}' if isinstance(v, (int, float)) else '-'
    for m, d, c, dsc, hd, p, s in rows:
        print(f'{m:<15}{d:<28}{c:<12}{fmt(dsc, 4):>8}{fmt(hd, 2):>10}{fmt(p, 2):>10}{fmt(s, 4):>8}')
    t = results.get('timing') or {}
    if t.get('voxshield_s_per_iteration'):
        print(f'train s/iteration: stock {t["stock_s_per_iteration"]:.3f}, VoxShield {t["voxshield_s_per_iteration"]:.3f}'
              f' (x{t["voxshield_s_per_iteration"] / t["stock_s_per_iteration"]:.2f})')
    if t.get('predict_seconds_per_case') and t.get('export_seconds_per_case'):
        print(f's/case: export {t["export_seconds_per_case"]:.2f}, nnUNetv2_predict {t["predict_seconds_per_case"]:.2f}')


if __name__ == '__main__':
    sys.exit(main())
