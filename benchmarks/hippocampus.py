"""Benchmark on MSD Hippocampus: protectors trained with stock nnUNetv2_train, exported, verified, then stock nnU-Net
victims on clean / protected / purified data, scored on 48 clean held-out cases.

    python benchmarks/hippocampus.py -o benchmarks/out/hippocampus [--protector-epochs 5] [--victim-epochs 5]

Protectors train with nnU-Net's own trainer API on fold all (as `nnUNetv2_train D 3d_fullres all -tr ...` does, minus
its end-of-training validation on the training cases). Reads ../shared/data/Dataset004_Hippocampus (or --data) with the committed split (160 train / 48 test); everything
is written under -o (private nnUNet_raw/_preprocessed/_results). Rerunning resumes. Prints a table and writes
benchmark.json; the victims' full reports are in -o/eval_<method> (report.md, figure.png).
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
    'LSP': (None, 'lsp', 16),
    'TAP': (None, 'tap', 17),  # PGD against a clean stock surrogate (nnUNetTrainer_<protector epochs>epochs)
    'VoxShield-EOT-defAware': ('nnUNetTrainerVoxShieldEOT_defAware', None, 18),
    'VoxShield-EOT-2DAware': ('nnUNetTrainerVoxShieldEOT_2DAware', None, 19),
    'VoxShield-EOT-noBG': ('nnUNetTrainerVoxShieldEOT_noBG', None, 10),  # 20+: eps curve, 30+: detector
}
EPS_CURVE_IDS = 20  # protected copies at other budgets: dataset ids 20, 21, ...
DETECTOR_CONTROL_IDS = 30  # Random at larger budgets, positive controls of the residual-only detector


def log(msg):
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def bench_env(roots: dict) -> dict:
    """The environment of a benchmark's subprocesses: its private nnU-Net folders and the CPU settings, without a
    caller's nnUNet_n_proc_DA (the planner fails with 0 workers; training adds it back)."""
    base = {k: v for k, v in os.environ.items() if k != 'nnUNet_n_proc_DA'}
    return {**base, **{k: str(v) for k, v in roots.items()}, 'nnUNet_def_n_proc': '1',
            'nnUNet_compile': 'false', 'OMP_WAIT_POLICY': 'PASSIVE'}


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


def prepare_raw(data: Path, raw: Path, split: dict, name: str = 'Dataset004_Hippocampus') -> Path:
    """``name`` (a copy of ``data``) with the split's training cases in imagesTr/labelsTr and its test cases in
    imagesTs/labelsTs."""
    dst = raw / name
    if (dst / 'dataset.json').is_file():
        return dst
    tmp = raw / f'.{name}.partial'
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


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        base[k] = deep_update(base.get(k) or {}, v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-o', default=str(HERE / 'out' / 'hippocampus'), help='output folder')
    parser.add_argument('--data', default=str(DEFAULT_DATA), help='Dataset004_Hippocampus raw folder')
    parser.add_argument('--protector-epochs', type=int, default=5, choices=(1, 5, 10, 20, 50, 100))
    parser.add_argument('--victim-epochs', type=int, default=5, choices=(1, 5, 10, 20, 50, 100))
    parser.add_argument('--methods', nargs='*', default=list(METHODS), choices=list(METHODS))
    parser.add_argument('--main-methods', nargs='*', choices=list(METHODS),
                        default=['VoxShield', 'Random'] + [m for m in METHODS if m.startswith('VoxShield-EOT')],
                        help='methods also evaluated with defences (one eval_<method> folder each)')
    parser.add_argument('--defences', nargs='*', default=['blur', 'zmedian', 'zresample', 'quantise'])
    parser.add_argument('--defence-configs', nargs='+', default=['3d_fullres', '2d'],
                        help='victim configurations of the defence rows')
    parser.add_argument('--eps-curve', nargs='*', default=['2/255', '8/255'],
                        help='other budgets at which the --eps-curve-methods are exported (same trained generator) '
                             'and scored by a 3d_fullres victim')
    parser.add_argument('--eps-curve-methods', nargs='*', default=['VoxShield-EOT'], choices=list(METHODS))
    parser.add_argument('--detector-methods', nargs='*', default=['VoxShield', 'VoxShield-EOT', 'Random'],
                        choices=list(METHODS), help='protected copies scored by the residual-only detector '
                                                    '(voxshield_detect), next to the clean data')
    parser.add_argument('--detector-controls', nargs='*', default=['64/255'],
                        help='budgets at which Random (noise in the label only) is exported as the detector\'s '
                             'positive control')
    parser.add_argument('--others-eval', default='baselines',
                        help='name of the evaluation folder (eval_<name>) of the methods that are not main methods')
    parser.add_argument('--others-configs', nargs='+', default=['3d_fullres', '2d'], choices=('3d_fullres', '2d'),
                        help='victim configurations of the methods that are not main methods')
    parser.add_argument('--clean-defences', action=argparse.BooleanOptionalAction, default=True,
                        help='victims on the purified clean data (eval_Clean): what each defence costs by itself')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0])
    parser.add_argument('--skip-timing', action='store_true')
    parser.add_argument('--skip-victims', action='store_true', help='only protectors, exports, verify and detector')
    parser.add_argument('--table-only', action='store_true', help='print the table of -o/benchmark.json (as written '
                                                                  'by earlier runs) and write benchmark.md')
    args = parser.parse_args()
    if args.table_only:
        result_file = Path(args.o).resolve() / 'benchmark.json'
        if not result_file.is_file():
            parser.error(f'{result_file}: not found (run the benchmark first)')
        return print_table(json.loads(result_file.read_text()), result_file.with_suffix('.md'))

    out = Path(args.o).resolve()
    roots = {k: out / k for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for d in roots.values():
        d.mkdir(parents=True, exist_ok=True)
    env = bench_env(roots)
    train_env = {**env, 'nnUNet_n_proc_DA': '0'}
    os.environ.update(train_env)
    logs = out / 'logs'
    logs.mkdir(exist_ok=True)
    result_file = out / 'benchmark.json'
    results = json.loads(result_file.read_text()) if result_file.is_file() else {}

    evaluated = set()  # eval folders (re)computed by this run: only these replace their entry in benchmark.json

    def save():
        """Merge into benchmark.json (partial runs with disjoint --methods may run side by side; an evaluation
        another run finished meanwhile is not overwritten by this run's copy from its start)."""
        from nnunetv2_voxshield.dataset_io import write_json_atomic
        mine = {**results, 'eval': {k: v for k, v in results.get('eval', {}).items() if k in evaluated}}
        write_json_atomic(deep_update(json.loads(result_file.read_text()) if result_file.is_file() else {}, mine),
                          str(result_file))

    results.setdefault('settings', {}).update(
        {'protector_epochs': args.protector_epochs, 'victim_epochs': args.victim_epochs, 'plans': PLANS,
         'seeds': args.seeds, 'split': str(SPLIT.relative_to(HERE.parent)), 'defence_configs': args.defence_configs})

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

    def train(name, trainer):
        """nnU-Net's own training on fold all, seeded, without the end-of-training validation (on fold all it
        predicts all 160 training cases with mirroring: ~20 min on CPU, and no protection number needs it)."""
        fold = roots['nnUNet_results'] / 'Dataset004_Hippocampus' / f'{trainer}__{PLANS}__3d_fullres' / 'fold_all'
        if not (fold / 'checkpoint_final.pth').is_file():
            log(f'{name}: training {trainer} (nnU-Net training API, fold all, seed 0)')
            seconds = run([sys.executable, '-m', 'nnunetv2_voxshield.victims', 'run', '4', '3d_fullres', '--seed',
                           '0', '-tr', trainer, '-p', PLANS, '-device', 'cpu'], train_env, logs / f'train_{name}.log')
            results.setdefault('protectors', {}).setdefault(name, {})['train_seconds'] = seconds
            save()

    def protect(name, eps=None, dataset_id=None):
        """Train the protector, export (at its own budget or ``eps``) and verify; resumable. Returns the dataset."""
        trainer, method, default_id = METHODS[name]
        tag = name if eps is None else f'{name}@{eps}'
        label = tag.replace('-', '').replace('@', '_eps').replace('/', '_')
        dataset_id = dataset_id or default_id
        dst = roots['nnUNet_raw'] / f'Dataset{dataset_id:03d}_Hippocampus{label}'
        entry = results.setdefault('protectors', {}).setdefault(tag, {})
        export_cmd = ['voxshield_export', '-d', '4', '-o', dataset_id, '--name', f'Hippocampus{label}',
                      '-p', PLANS, '-c', '3d_fullres', '-device', 'cpu']
        if eps is not None:
            export_cmd += ['--eps', eps]
        if trainer is not None:
            trainer = f'{trainer}_{args.protector_epochs}epochs'
            train(name, trainer)
            export_cmd += ['-tr', trainer, '-f', 'all']
        else:
            export_cmd += ['--method', method]
            if method == 'tap':
                surrogate = f'nnUNetTrainer_{args.protector_epochs}epochs'
                train('TAP-surrogate', surrogate)
                export_cmd += ['--surrogate-tr', surrogate, '--surrogate-f', 'all']
        if not dst.is_dir():
            log(f'{tag}: export')
            entry['export_seconds'] = run(export_cmd, env, logs / f'export_{label}.log')
            entry['export_seconds_per_case'] = entry['export_seconds'] / len(split['train'])
            save()
        if 'verify' not in entry:
            report = out / f'verify_{label}.json'
            run(['voxshield_verify', clean, dst, '-o', report] + (['--eps', eps] if eps else []), env,
                logs / f'verify_{label}.log')
            entry['verify'] = json.loads(report.read_text()).get('summary')
            save()
        return dst

    from nnunetv2_voxshield.evaluate import evaluate
    common = dict(test_images=str(clean / 'imagesTs'), test_labels=str(clean / 'labelsTs'), plans=PLANS,
                  epochs=args.victim_epochs, seeds=args.seeds, device='cpu', disable_tta=True)
    evals = results.setdefault('eval', {})

    def evaluation(key, datasets, names, **kwargs):
        """One voxshield_evaluate folder; identical victims (e.g. the clean ones) are reused from the other folders
        of this benchmark."""
        folder = out / f'eval_{key}'
        others = [str(d) for d in sorted(out.glob('eval_*')) if d != folder and (d / 'state.json').is_file()]
        log(f'victims: clean vs {", ".join(names) or "the purified clean data"} -> {folder}')
        evals[key] = evaluate('4', [str(d) for d in datasets], str(folder), method_name=names,
                              reuse_from=others, **common, **kwargs)
        evaluated.add(key)
        save()

    detector_sets = [protect(m) for m in args.detector_methods] + [
        protect('Random', eps, DETECTOR_CONTROL_IDS + i) for i, eps in enumerate(args.detector_controls)]
    detector_file = out / 'detector.json'
    if detector_sets and not (detector_file.is_file() and [d['dataset'] for d in json.loads(
            detector_file.read_text())['datasets']] == [str(clean)] + [str(d) for d in detector_sets]):
        log(f'residual-only detector on clean + {len(detector_sets)} protected copies')
        run(['voxshield_detect', clean, *detector_sets, '-o', detector_file], env, logs / 'detector.log')
    if detector_file.is_file():
        report = json.loads(detector_file.read_text())
        results['detector'] = {'settings': report['settings'], 'n_train': len(report['split']['train_cases']),
                               'n_test': len(report['split']['test_cases']),
                               'datasets': {Path(d['dataset']).name: {k: d[k] for k in ('mean_dice', 'union_dice',
                                                                                       'dice_per_label')}
                                            for d in report['datasets']}}
        save()
    if args.skip_victims:
        return

    main_methods = [m for m in args.main_methods if m in args.methods]
    for name in main_methods:
        dataset = protect(name)
        if not args.skip_timing and name == 'VoxShield' and 'predict_seconds_per_case' not in timing:
            log('timing nnUNetv2_predict (protector surrogate, no TTA) on the test images')
            pred_out = out / 'timing_predictions'
            shutil.rmtree(pred_out, ignore_errors=True)
            seconds = run(['nnUNetv2_predict', '-i', clean / 'imagesTs', '-o', pred_out, '-d', '4', '-c',
                           '3d_fullres', '-p', PLANS, '-f', 'all', '-tr', f'{METHODS[name][0]}_{args.protector_epochs}'
                           'epochs', '-device', 'cpu', '--disable_tta', '-npp', '1', '-nps', '1'], env,
                          logs / 'predict_timing.log')
            timing['predict_seconds_per_case'] = seconds / len(split['test'])
            timing['export_seconds_per_case'] = results['protectors'][name].get('export_seconds_per_case')
            save()
        evaluation(name, [dataset], [name], configurations=('3d_fullres', '2d'), defences=args.defences,
                   defence_configurations=args.defence_configs)
    for name in [m for m in args.eps_curve_methods if m in args.methods and METHODS[m][0] and args.eps_curve]:
        datasets = [protect(name, eps, EPS_CURVE_IDS + i) for i, eps in enumerate(args.eps_curve)]
        evaluation(f'{name}_eps', datasets, [f'{name} eps {e}' for e in args.eps_curve])
    others = [m for m in args.methods if m not in main_methods]
    if others:
        datasets = [protect(m) for m in others]
        evaluation(args.others_eval, datasets, others, configurations=args.others_configs)
    if args.clean_defences and args.defences:
        evaluation('Clean', [], [], configurations=args.defence_configs, defences=args.defences, defend_clean=True)
    print_table(json.loads(result_file.read_text()), out / 'benchmark.md')  # with what parallel runs merged


def table_rows(results: dict) -> list:
    """One row per (method, defence, victim configuration) over all eval folders, each once (the first found: clean
    victims, and victims reused from another folder, appear in several), with the Dice ratio to the clean victim of
    the same configuration, paired by seed as everywhere (``verdict.seed_ratio``: the seeds both have); for reports
    without per-seed summaries, the ratio of the mean Dice."""
    from nnunetv2_voxshield.verdict import seed_ratio
    rows, clean, seen = [], {}, set()
    for report in (results.get('eval') or {}).values():
        for row in report.get('rows', []):
            for config, v in row['victims'].items():
                key = (row['method'], row.get('defence_spec'), config)
                if key in seen:
                    continue
                seen.add(key)
                per_seed = (row.get('per_seed') or {}).get(config) or {}
                if row['row'] == 'clean':
                    clean[config] = (per_seed, v['dice']['mean'])
                q = row.get('quality') or {}
                rows.append({'method': row['method'], 'defence': row['defence'] or '-',
                             'defence_spec': row.get('defence_spec') or '-', 'config': config,
                             'dice': v['dice']['mean'], 'hd95': v['hd95_mm']['mean'], 'per_seed': per_seed,
                             'psnr': (q.get('psnr') or {}).get('mean'), 'psnr_roi': (q.get('psnr_roi') or {}).get('mean'),
                             'ssim': (q.get('ssim') or {}).get('mean')})
    for r in rows:
        clean_seeds, clean_dice = clean.get(r['config'], ({}, None))
        paired = seed_ratio(r.pop('per_seed'), clean_seeds)
        if paired:
            r['ratio'] = paired['ratio']
        else:  # reports written before per-seed summaries: the ratio of the means
            r['ratio'] = r['dice'] / clean_dice if clean_dice else None
    return sorted(rows, key=lambda r: (r['config'] != '3d_fullres', r['defence'] != '-'))


TARGET = {'3d_fullres': 0.05, '2d': 0.20, 'defence': 0.30}  # issue 6: victim Dice / clean at most this


def ratio_matrix(rows: list) -> list:
    """Markdown lines: one row per method (budget-curve rows left out), one column per victim configuration and per
    (defence, configuration), each cell the victim's Dice / clean ('-': not measured); the header's second line
    gives issue 6's target of the column. 'Clean' is a row only if it has purified victims (the defence's own
    cost)."""
    clean_defended = any(r['method'] == 'Clean' and r['defence_spec'] != '-' for r in rows)
    rows = [r for r in rows if (r['method'] != 'Clean' or clean_defended) and ' eps ' not in r['method']]
    specs = list(dict.fromkeys(r['defence_spec'] for r in rows if r['defence_spec'] != '-'))
    columns = [c for c in [('-', '3d_fullres'), ('-', '2d')] + [(s, c) for c in ('3d_fullres', '2d') for s in specs]
               if any((r['defence_spec'], r['config']) == c for r in rows)]
    cells = {(r['method'], r['defence_spec'], r['config']): r['ratio'] for r in rows}
    methods = list(dict.fromkeys(r['method'] for r in rows))
    name = lambda spec, config: config if spec == '-' else f'{config} + {spec}'
    target = lambda spec, config: TARGET[config] if spec == '-' else TARGET['defence']
    lines = ['| method | ' + ' | '.join(name(*c) for c in columns) + ' |',
             '| --- |' + ' --- |' * len(columns),
             '| *target* | ' + ' | '.join(f'*<= {target(*c):.2f}*' for c in columns) + ' |']
    for m in methods:
        values = [cells.get((m, *c)) for c in columns]
        lines.append(f'| {m} | ' + ' | '.join('-' if v is None else f'{v:.2f}' for v in values) + ' |')
    return lines


def eps_curve_figure(rows: list, methods: list, png: Path) -> None:
    """3d_fullres victim Dice ratio vs whole-volume PSNR of each method at its budgets (the default budget is the
    method's own row, the others are rows named '<method> eps <eps>')."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in methods:
        points = []
        for r in rows:
            if r['config'] == '3d_fullres' and r['defence'] == '-' and r['psnr'] is not None and (
                    r['method'] == method or r['method'].startswith(f'{method} eps ')):
                points.append((r['psnr'], r['ratio'], r['method'][len(method) + 5:] or '4/255'))
        points.sort()
        if len(points) < 2:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], 'o-', label=method)
        for x, y, eps in points:
            ax.annotate(eps, (x, y), textcoords='offset points', xytext=(4, 4), fontsize=8)
    ax.axhline(1.0, color='grey', lw=0.5)
    ax.axvline(50.0, color='grey', lw=0.5, ls='--')
    ax.set_xlabel('PSNR of the protected training images (dB)')
    ax.set_ylabel('3d_fullres victim Dice / clean')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def print_table(results: dict, markdown_file: Path):
    rows = table_rows(results)
    curve_methods = sorted({r['method'].split(' eps ')[0] for r in rows if ' eps ' in r['method']})
    if curve_methods:
        eps_curve_figure(rows, curve_methods, markdown_file.with_name('eps_curve.png'))
    fmt = lambda v, d: f'{v:.{d}f}' if isinstance(v, (int, float)) else '-'
    print(f'{"method":<26}{"defence":<38}{"config":<12}{"DSC":>8}{"/clean":>8}{"HD95 mm":>10}{"PSNR dB":>10}'
          f'{"SSIM":>8}')
    for r in rows:
        print(f'{r["method"]:<26}{r["defence"]:<38}{r["config"]:<12}{fmt(r["dice"], 4):>8}{fmt(r["ratio"], 2):>8}'
              f'{fmt(r["hd95"], 2):>10}{fmt(r["psnr"], 2):>10}{fmt(r["ssim"], 4):>8}')
    lines = ['| method | defence | victim | DSC | DSC / clean | HD95 (mm) | PSNR (dB) | PSNR ROI (dB) | SSIM |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    lines += [f'| {r["method"]} | {r["defence"]} | {r["config"]} | {fmt(r["dice"], 3)} | {fmt(r["ratio"], 2)} | '
              f'{fmt(r["hd95"], 2)} | {fmt(r["psnr"], 1)} | {fmt(r["psnr_roi"], 1)} | {fmt(r["ssim"], 4)} |'
              for r in rows]
    matrix = ratio_matrix(rows)
    print('\n'.join(matrix))
    lines += ['', 'Victim Dice / clean, per victim configuration and defence:', ''] + matrix
    t = results.get('timing') or {}
    if t.get('voxshield_s_per_iteration'):
        line = (f'train s/iteration: stock {t["stock_s_per_iteration"]:.3f}, VoxShield '
                f'{t["voxshield_s_per_iteration"]:.3f} (x{t["voxshield_s_per_iteration"] / t["stock_s_per_iteration"]:.2f})')
        print(line)
        lines += ['', line]
    if t.get('predict_seconds_per_case') and t.get('export_seconds_per_case'):
        line = f's/case: export {t["export_seconds_per_case"]:.2f}, nnUNetv2_predict {t["predict_seconds_per_case"]:.2f}'
        print(line)
        lines += ['', line]
    detector = results.get('detector')
    if detector:
        print(f'residual-only detector ({detector["n_train"]} train / {detector["n_test"]} test cases): test Dice')
        lines += ['', f'Residual-only detector ({detector["n_train"]} train / {detector["n_test"]} test cases, '
                      f'{detector["settings"]["iterations"]} iterations, sigma {detector["settings"]["sigma"]}):', '',
                  '| dataset | test Dice | union Dice |', '| --- | --- | --- |']
        for name, d in detector['datasets'].items():
            print(f'  {name:<45}{d["mean_dice"]:.4f}  (union {d["union_dice"]:.4f})')
            lines.append(f'| {name} | {d["mean_dice"]:.3f} | {d["union_dice"]:.3f} |')
    markdown_file.write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    sys.exit(main())
