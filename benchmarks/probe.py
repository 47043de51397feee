"""Learnability probe (issue 13): does cos(g_delta, g_clean) tell a protecting code from a useless one?

    python benchmarks/probe.py -o benchmarks/out/map --trainers nnUNetTrainerVoxShieldLC_probe_noDA_cb_eps10_5epochs \
        nnUNetTrainerVoxShieldLC_probe_noDA_eps10_5epochs

Each trainer trains on fold all of the map's Dataset004_Hippocampus (protection_map.py prepares it; -o is the map's
folder) with nnU-Net's trainer API, unless its checkpoint_final.pth exists. The ``_probe`` trainers only train the
surrogate, on x + a fixed class code, and log per epoch: the mean cos(g_delta, g_clean) of its steps, the training
loss (on x + delta) and nnU-Net's online pseudo Dice, which is computed on clean (unperturbed) patches of the training
cases: a fresh network's clean Dice while it learns from the code. Any trainer that logs 'voxshield_align' (the
``_align`` protectors) is read the same way. Prints a table, writes -o/probe.json.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hippocampus as hb  # noqa: E402
from protection_map import MapFile  # noqa: E402


def read_logging(checkpoint: Path) -> dict:
    """Per-epoch curves from nnU-Net's checkpoint ('logging'): cos, train loss, clean pseudo Dice per label."""
    import torch
    logging = torch.load(checkpoint, map_location='cpu', weights_only=False)['logging']
    as_list = lambda key: [float(v) for v in logging.get(key, [])]  # noqa: E731
    return {'align': as_list('voxshield_align'), 'train_loss': as_list('train_losses'),
            'clean_pseudo_dice': as_list('mean_fg_dice'),
            'clean_pseudo_dice_per_label': [[float(v) for v in e] for e in logging.get('dice_per_class_or_region', [])]}


def table(results: dict) -> str:
    fmt = lambda xs: ' / '.join('-' if not np.isfinite(x) else f'{x:.2f}' for x in xs)  # noqa: E731
    lines = ['| trainer, seed | cos(g_delta, g_clean) per epoch | train loss per epoch | clean pseudo Dice per epoch |',
             '| --- | --- | --- | --- |']
    for name, r in sorted(results.items()):
        lines.append(f'| {name} | {fmt(r["align"])} | {fmt(r["train_loss"])} | {fmt(r["clean_pseudo_dice"])} |')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-o', default=str(HERE / 'out' / 'map'), help="the protection map's output folder")
    parser.add_argument('--trainers', nargs='+', required=True)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    out = Path(args.o)
    roots = {k: out / k for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    if not (roots['nnUNet_preprocessed'] / 'Dataset004_Hippocampus' / f'{hb.PLANS}.json').is_file():
        raise SystemExit(f'{out}: no preprocessed Dataset004_Hippocampus; run benchmarks/protection_map.py -o {out} '
                         f'first')
    env = {**hb.bench_env(roots), 'nnUNet_n_proc_DA': '0'}
    (out / 'logs').mkdir(exist_ok=True)
    new = {}
    for trainer in args.trainers:
        # seed 0 trains in the protection map's results folder (a protector's place); other seeds in their own
        results_root = roots['nnUNet_results'] if args.seed == 0 else out / f'probe_seed{args.seed}' / 'nnUNet_results'
        fold = results_root / 'Dataset004_Hippocampus' / f'{trainer}__{hb.PLANS}__3d_fullres' / 'fold_all'
        if not (fold / 'checkpoint_final.pth').is_file():
            hb.log(f'training {trainer}')
            hb.run([sys.executable, '-m', 'nnunetv2_voxshield.victims', 'run', '4', '3d_fullres', '--seed',
                    str(args.seed), '-tr', trainer, '-p', hb.PLANS, '-device', 'cpu'],
                   {**env, 'nnUNet_results': str(results_root)}, out / 'logs' / f'probe_{trainer}_seed{args.seed}.log')
        new[f'{trainer} seed {args.seed}'] = {**read_logging(fold / 'checkpoint_final.pth'), 'seed': args.seed}
    results = MapFile(out / 'probe.json').update(lambda data: data.update(new))  # keeps parallel runs' rows
    print(table(results))
    (out / 'probe.md').write_text(table(results) + '\n')


if __name__ == '__main__':
    main()
