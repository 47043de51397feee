"""ACDC (issue 29): collect the victims of ``voxshield_evaluate`` folders into one results file, beside the amplitude
rule's predictions written before they ran, and refit the rule on Hippocampus and ACDC together.

    python benchmarks/acdc.py --eval OUT [OUT ...] --predictions benchmarks/results/acdc_predictions_<date>.json \
        --command "..." -o benchmarks/results/acdc_<date>.json

Each OUT is a ``voxshield_evaluate`` folder on the split of benchmarks/acdc_split.json (clean dataset: its 128
training volumes; test: its 32 held-out volumes). Finished victims are read from OUT/victims/<row>/<config>/seed_S/
scores.json, so a folder whose evaluation is still running contributes what it has. A protected copy is named by the
prediction row with the same method and eps (its dataset.json's ``voxshield`` entry); its ROI PSNR is the one in the
predictions file. Per configuration and cell: seed-paired Dice / clean (``verdict.seed_ratio``), a 95% bootstrap
interval over test cases and seeds (``verdict.bootstrap_ratio``), per-label Dice, and the prediction beside it.
The refit (``--hippocampus-rule``, the Hippocampus fit's JSON) fits one logistic in ROI PSNR to the Hippocampus
family's per-seed points plus the class-coded offsets' points of one ACDC victim (``--refit-config``; conv and random
copies are shown against the rule, not fitted), and ACDC's points alone where there are two PSNRs.
``--keep`` an earlier results file: its configurations that the folders do not have are carried over (with their
provenance); in those the folders do have, its cells the folders lack are carried over (against their own clean
victims), as is an earlier cell with seeds the folders' one lacks (the folders' retrained seeds are then the rerun);
an earlier cell and the folders' one of other seeds (a second seed run later) become one cell of all their seeds, each
seed paired with its own run's clean victim; the earlier run's per-seed numbers are kept beside the new ones (a rerun
of the same seed on the same code should reproduce them). A carried cell, or seed, keeps naming the file and commit
where it was first measured. Each cell keeps its per-seed numbers (``per_seed``) for a later run's seeds to join.
"""
import argparse
import hashlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from amplitude_rule import fit_logistic, logistic  # noqa: E402

from nnunetv2_voxshield.dataset_io import write_json_atomic  # noqa: E402
from nnunetv2_voxshield.verdict import bootstrap_ratio, seed_ratio  # noqa: E402

DEFAULT_VICTIM = 'nnUNetTrainer_5epochs'  # the map's victim; others are keyed '<configuration> <trainer>'


def victim_id(scores: dict) -> str:
    """A victim's fingerprint: its per-case Dice (a victim reused by another folder has the same, a retrained one,
    even with the same seed, does not on CPU)."""
    cases = sorted((c['case'], c['mean_dice']) for c in scores.get('cases', []))
    return hashlib.sha1(json.dumps(cases).encode()).hexdigest()[:12]


def victims(out: Path) -> list:
    """Every finished victim of one evaluation folder: (dataset folder, configuration, seed, scores, defence); the
    defence is None, or the purification its row applied first (rows '<row>+<defence>')."""
    state = json.loads((out / 'state.json').read_text())
    protected = state['protected'] if isinstance(state['protected'], list) else [state['protected']]
    rows = {'clean': state['clean'], 'protected': protected[0] if len(protected) == 1 else None,
            **{f'protected{i + 1}': p for i, p in enumerate(protected)}}
    found = []
    for scores in sorted(out.glob('victims/*/*/seed_*/scores.json')):
        (row, _, defence), config = scores.parts[-4].partition('+'), scores.parts[-3]
        if rows.get(row) is None:
            continue
        found.append((rows[row], config, int(scores.parts[-2].split('_')[1]), json.loads(scores.read_text()),
                      defence or None))
    return found


def cell_of(dataset: str, predictions: list, defence: Optional[str] = None) -> str:
    """The prediction row naming the copy's folder (``dataset``), else the one whose method and eps are the protected
    copy's (its dataset.json) and that names no other folder; either way its ``defence`` is the victim's purification
    (None: unpurified). A row's method is its ``method`` field, else its cell's name (a trained export's method, e.g.
    em_samplewise, is not the cell's name)."""
    meta = json.loads((Path(dataset) / 'dataset.json').read_text()).get('voxshield') or {}
    name = Path(dataset).name
    for p in predictions:  # a row naming the copy's folder first (two copies of one method and eps, e.g. budgets)
        if p.get('dataset') == name and p.get('defence') == defence:
            return p['cell']
    for p in predictions:
        if p.get('defence') != defence or p.get('dataset') not in (None, name):
            continue
        method = p.get('method') or p['cell'].split(':')[0].split('@')[0]
        same = (math.isclose(float(Fraction(p['eps'])), meta.get('eps') or -1) if p.get('eps')
                else math.isclose(p.get('strength', -1), meta.get('strength') or -2))
        if method == meta.get('method') and same:
            return p['cell']
    raise SystemExit(f'{dataset}: no prediction row for method {meta.get("method")} at eps {meta.get("eps")} '
                     f'(strength {meta.get("strength")})' + (f' purified by {defence}' if defence else ''))


def per_seed_records(victims_: dict, clean: dict, unpurified: Optional[dict] = None) -> dict:
    """Per seed both have: the victim's and the clean victim's Dice, per-label Dice and per-case Dice ({case: [victim,
    clean]}, 4 decimals), and for a purified cell the unpurified clean victim's Dice: what a later run's seeds need to
    join this cell (``merge_seeds``)."""
    out = {}
    for s in sorted(set(victims_) & set(clean), key=int):
        v, c = victims_[s], clean[s]
        cases = {x['case']: x['mean_dice'] for x in c.get('cases', [])}
        out[str(s)] = {'dice': v['summary']['dice'], 'clean_dice': c['summary']['dice'],
                       'dice_per_label': v['summary'].get('dice_per_label'),
                       'cases': {x['case']: [round(x['mean_dice'], 4), round(cases[x['case']], 4)]
                                 for x in v.get('cases', []) if x['case'] in cases}}
        if unpurified is not None and s in unpurified:
            out[str(s)]['unpurified_clean_dice'] = unpurified[s]['summary']['dice']
    return out


def seed_records(cell: dict) -> dict:
    """A cell's per-seed numbers: its ``per_seed`` records, or, for a one-seed cell written before they were kept,
    its means (which are that seed's; no per-case Dice)."""
    if cell.get('per_seed'):
        return cell['per_seed']
    if len(cell['seeds']) == 1:
        rec = {'dice': cell['dice'], 'clean_dice': cell['clean_dice'], 'dice_per_label': cell.get('dice_per_label')}
        if cell.get('ratio_to_clean'):
            rec['unpurified_clean_dice'] = cell['dice'] / cell['ratio_to_clean']
        return {str(cell['seeds'][0]): rec}
    raise SystemExit(f'{cell["cell"]}: an earlier cell of seeds {cell["seeds"]} has no per-seed numbers; a run of '
                     'other seeds cannot join it')


def merge_seeds(earlier: dict, now: dict, mark: dict) -> dict:
    """``now`` (a run's cell) with the seeds of ``earlier`` (the same cell in an earlier file) that it lacks: means,
    seed-paired ratios and, for a purified cell, the purification's cost over the union (as ``verdict.seed_ratio``
    computes them); the 95% bootstrap interval over seeds and cases where every seed has per-case Dice, else None.
    ``carried_seeds`` names where each earlier seed was measured (``mark``: {'file', 'commit'}, unless the earlier
    cell names its own)."""
    old = {s: r for s, r in seed_records(earlier).items() if int(s) not in now['seeds']}
    records = dict(sorted({**old, **seed_records(now)}.items(), key=lambda kv: int(kv[0])))
    victim = {s: {'dice': r['dice'], **({'dice_per_label': r['dice_per_label']} if r.get('dice_per_label') else {})}
              for s, r in records.items()}
    clean = {s: {'dice': r['clean_dice']} for s, r in records.items()}
    merged = {**now, 'dice_per_label': None, **seed_ratio(victim, clean), 'per_seed': records,
              'victim_ids': {**(earlier.get('victim_ids') or {}), **(now.get('victim_ids') or {})}}
    if now.get('defence'):
        unpurified = {s: {'dice': r['unpurified_clean_dice']} for s, r in records.items()
                      if r.get('unpurified_clean_dice')}
        whole = len(unpurified) == len(records)
        merged['purification_cost'] = seed_ratio(clean, unpurified)['ratio'] if whole else None
        merged['ratio_to_clean'] = seed_ratio(victim, unpurified)['ratio'] if whole else None
    if all(r.get('cases') for r in records.values()):
        boot = bootstrap_ratio({s: {c: d[0] for c, d in r['cases'].items()} for s, r in records.items()},
                               {s: {c: d[1] for c, d in r['cases'].items()} for s, r in records.items()})
        merged['ci95'] = boot['ci'] if boot else None
    else:
        merged['ci95'] = None
    where = {'file': earlier.get('carried_from', mark['file']), 'commit': earlier.get('carried_commit', mark['commit'])}
    merged['carried_seeds'] = {**{s: (earlier.get('carried_seeds') or {}).get(s, where) for s in old},
                               **(now.get('carried_seeds') or {})}
    return merged


def collect(outs: list, predictions: dict) -> dict:
    """Per configuration: the clean victims and, per cell, the ratio against them beside the prediction. A purified
    cell (its victim trained on the copy after a defence) is against the same victim on the purified clean data, and
    carries what the purification alone costs (``purification_cost``: purified clean / clean) and its ratio to the
    unpurified clean victim (``ratio_to_clean``)."""
    by_cell = {p['cell']: p for p in predictions['rows']}
    runs = {}  # (config, cell, 'clean' or 'clean+<defence>') -> {seed: scores}
    for out in outs:
        for dataset, config, seed, scores, defence in victims(Path(out)):
            if scores.get('trainer') not in (None, DEFAULT_VICTIM):  # another victim is its own profile
                config = f'{config} {scores["trainer"]}'
            key = ('clean' + (f'+{defence}' if defence else '')
                   if dataset == json.loads((Path(out) / 'state.json').read_text())['clean']
                   else cell_of(dataset, predictions['rows'], defence))
            runs.setdefault((config, key), {})[seed] = scores
    summaries = lambda runs_: {s: v['summary'] for s, v in runs_.items()}  # noqa: E731
    per_case = lambda runs_: {s: {c['case']: c['mean_dice'] for c in v['cases']} for s, v in runs_.items()}  # noqa
    result = {}
    for (config, key), seeds in sorted(runs.items()):
        if key.split('+')[0] == 'clean':
            continue
        p = by_cell[key]
        clean = runs.get((config, 'clean' + (f'+{p["defence"]}' if p.get('defence') else '')), {})
        ratio = seed_ratio(summaries(seeds), summaries(clean))
        if ratio is None:
            continue
        boot = bootstrap_ratio(per_case(seeds), per_case(clean))
        # the rule is the stock victim's; a written expectation replaces it for the no-augmentation victim
        # (predicted_noda) and for a stock victim on a purified copy (predicted_stock)
        written = p.get('predicted_noda') if 'NoDA' in config else p.get('predicted_stock')
        purified = {}
        if p.get('defence'):
            unpurified = runs.get((config, 'clean'), {})
            cost, to_clean = seed_ratio(summaries(clean), summaries(unpurified)), \
                seed_ratio(summaries(seeds), summaries(unpurified))
            purified = {'defence': p['defence'], 'purification_cost': cost and cost['ratio'],
                        'ratio_to_clean': to_clean and to_clean['ratio']}
        result.setdefault(config, {'clean': {}, 'cells': []})['cells'].append({
            'cell': key, 'psnr_roi': p['psnr_roi'], 'psnr_whole': p['psnr_whole'], **ratio,
            'ci95': boot['ci'] if boot else None, 'predicted_ratio': None if written else p['predicted_ratio'],
            'predicted_ratio_range': None if written else p['predicted_ratio_range'],
            **({'predicted_text': written.get('text') or f'each seed below {written["ratio_per_seed_below"]}'}
               if written else {}), **purified, 'victim_ids': {str(s): victim_id(v) for s, v in sorted(seeds.items())},
            'per_seed': per_seed_records(seeds, clean, runs.get((config, 'clean'), {}) if p.get('defence') else None)})
    for v in result.values():
        v['cells'].sort(key=lambda c: -c['psnr_roi'])
    for (config, key), seeds in sorted(runs.items()):
        if key == 'clean':
            result.setdefault(config, {'clean': {}, 'cells': []})['clean'] = {
                str(s): {'dice': v['summary']['dice'], 'dice_per_label': v['summary']['dice_per_label'],
                         'trainer': v.get('trainer'), 'plans': v.get('plans'), 'n_cases': v['summary']['n_cases'],
                         'victim_id': victim_id(v)}
                for s, v in sorted(seeds.items())}
    return result


def refit(hippocampus_rule: dict, acdc_cells: list, config: Optional[str] = None) -> dict:
    """One logistic over Hippocampus's fitted per-seed points and ACDC's class-coded offsets (``acdc_cells`` of
    victim ``config``); ACDC's alone; the residual of each dataset's points against the joint fit and the
    Hippocampus fit."""
    acdc_cells = [c for c in acdc_cells if c['cell'].startswith('offset')]
    hip = [(r['psnr_roi'], v) for r in hippocampus_rule['rows'] for v in r['ratio_per_seed']]
    acdc = [(c['psnr_roi'], v) for c in acdc_cells for v in c['ratio_per_seed'] if v is not None]
    rmse = lambda pts, a, b: math.sqrt(sum((float(logistic(x, a, b)) - y) ** 2 for x, y in pts) / len(pts))  # noqa
    h = hippocampus_rule['fit']
    out = {'hippocampus_fit': {'x50': h['x50'], 's': h['s'], 'rmse_hippocampus': rmse(hip, h['x50'], h['s'])},
           'points': {'hippocampus': len(hip), 'acdc': len(acdc)}, 'config': config,
           'acdc_cells': [c['cell'] for c in acdc_cells]}
    if acdc:
        out['hippocampus_fit']['rmse_acdc'] = rmse(acdc, h['x50'], h['s'])
        x50, s = fit_logistic(*zip(*(hip + acdc)))
        out['joint_fit'] = {'x50': x50, 's': s, 'rmse_hippocampus': rmse(hip, x50, s), 'rmse_acdc': rmse(acdc, x50, s)}
    if len({x for x, _ in acdc}) >= 2:
        x50, s = fit_logistic(*zip(*acdc))
        out['acdc_fit'] = {'x50': x50, 's': s, 'rmse_acdc': rmse(acdc, x50, s)}
    return out


def keep_earlier(configs: dict, earlier_file: str) -> dict:
    """Carry over the earlier file's configurations the folders lack; in the others, the earlier cells the folders
    lack (each with ``carried_from``: its ratios stay paired with the earlier run's clean victims, whose seeds the
    folders do not have are kept too, marked the same way; a mark already there stays: where it was measured; an
    earlier cell whose seeds are a strict superset of the folders' stands in its place; one with other seeds than the
    folders' joins theirs, ``merge_seeds``, each carried seed named in ``carried_seeds``), and beside the rest the
    earlier run's per-seed clean Dice and ratios for the seeds both have and retrained, appended to the earlier
    file's ``reruns`` (a list of {'file', 'commit', 'clean': {seed: {'earlier', 'now'}}, cell: {seed: {'earlier',
    'now'}}}): a seed whose victim is the same (same ``victim_id``; for an earlier file without ids, the same value)
    is the same run read again, not a rerun, and a retraining that reproduces a victim bit for bit cannot be told
    from it."""
    earlier = json.loads(Path(earlier_file).read_text())
    name = os.path.basename(earlier_file)
    for config, v in earlier['configurations'].items():
        if config not in configs:  # carried once: where it was measured stays named
            configs[config] = v if v.get('carried_from') else {**v, 'carried_from': name,
                                                                'carried_provenance': earlier['provenance']}
            continue
        new = configs[config]
        def retrained(then_id, now_id, then_value, now_value) -> bool:
            return then_id != now_id if then_id and now_id else then_value != now_value
        same = {'clean': {s: {'earlier': c['dice'], 'now': new['clean'][s]['dice']}
                          for s, c in v['clean'].items() if s in new['clean']
                          and retrained(c.get('victim_id'), new['clean'][s].get('victim_id'), c['dice'],
                                        new['clean'][s]['dice'])}}
        # carried once, a cell or clean victim stays named where it was measured
        here = {'file': name, 'commit': earlier['provenance']['commit']}
        def carried(x: dict) -> dict:
            if x.get('carried_seeds'):  # a cell of seeds from several runs: each seed keeps where it was measured
                return {**x, 'carried_seeds': {str(s): x['carried_seeds'].get(str(s), here) for s in x['seeds']}}
            return {**x, 'carried_from': x.get('carried_from', here['file']),
                    'carried_commit': x.get('carried_commit', here['commit'])}
        now_cells = {c['cell']: c for c in new['cells']}
        for c in v['cells']:
            if c['cell'] in now_cells:
                n = now_cells[c['cell']]
                pairs = {str(s): {'earlier': r, 'now': rn} for s, r in zip(c['seeds'], c['ratio_per_seed'])
                         for sn, rn in zip(n['seeds'], n['ratio_per_seed'])
                         if sn == s and retrained((c.get('victim_ids') or {}).get(str(s)),
                                                  (n.get('victim_ids') or {}).get(str(s)), r, rn)}
                if pairs:
                    same[c['cell']] = pairs
                if set(c['seeds']) > set(n['seeds']):  # the earlier cell has seeds the folders lack: it stands
                    new['cells'][new['cells'].index(n)] = carried(c)
                elif set(c['seeds']) - set(n['seeds']):  # each has seeds the other lacks: one cell of all seeds
                    new['cells'][new['cells'].index(n)] = merge_seeds(c, n, here)
            else:
                new['cells'].append(carried(c))
        new['cells'].sort(key=lambda c: -c['psnr_roi'])
        for s, c in v['clean'].items():
            if s not in new['clean']:
                new['clean'][s] = carried(c)
        new['clean'] = dict(sorted(new['clean'].items(), key=lambda kv: int(kv[0])))
        reruns = list(v.get('reruns') or [])   # every rerun recorded so far stays
        if same['clean'] or len(same) > 1:
            reruns.append({'file': name, 'commit': earlier['provenance']['commit'], **same})
        if reruns:
            new['reruns'] = reruns
    return configs


def main():
    parser = argparse.ArgumentParser(description='ACDC: victims of voxshield_evaluate folders beside the amplitude '
                                                 "rule's predictions; the rule refitted on both datasets. Reads the "
                                                 'folders and JSONs named; writes -o.')
    parser.add_argument('--eval', nargs='+', required=True, help='voxshield_evaluate output folders')
    parser.add_argument('--predictions', required=True, help='acdc_predictions_<date>.json (written before the runs)')
    parser.add_argument('--hippocampus-rule', default=str(HERE / 'results' / 'amplitude_rule_2026-12-02.json'))
    parser.add_argument('--command', required=True, help='the commands that made the folders (provenance)')
    parser.add_argument('--keep', default=None, help='an earlier results file of this script (see the module doc)')
    parser.add_argument('--refit-config', default=None,
                        help='the victim whose offset cells join the refit. Default: "2d nnUNetTrainer_20epochs" if '
                             'collected, else 3d_fullres')
    parser.add_argument('-o', required=True, help='results JSON to write')
    args = parser.parse_args()
    predictions = json.loads(Path(args.predictions).read_text())
    configs = collect(args.eval, predictions)
    if args.keep:
        configs = keep_earlier(configs, args.keep)
    refit_config = args.refit_config or next(c for c in ('2d nnUNetTrainer_20epochs', '3d_fullres') if c in configs)
    stock = (configs.get(refit_config) or {}).get('cells', [])
    commit = subprocess.check_output(['git', 'rev-parse', 'HEAD'], cwd=HERE, text=True).strip()
    result = {'what': 'ACDC victims (stock nnUNetTrainer_<N>epochs, or the trainer named per configuration, e.g. '
                      'the no-augmentation nnUNetTrainerNoDA_<N>epochs; 5 epochs if unnamed; nnUNetPlans_cpu, fold '
                      'all, no TTA) on the clean training volumes of benchmarks/acdc_split.json and on class-coded '
                      'offset and checkerboard, class-wise convolution, uniform random noise and sample-wise '
                      'error-minimising noise copies (a `+defence` cell: purified before training, against the same '
                      'victim on the purified clean volumes), scored on its 32 held-out volumes; each cell beside the '
                      'prediction written before it ran.',
              'predictions_file': os.path.relpath(args.predictions, HERE.parent),
              'configurations': configs,
              'refit': refit(json.loads(Path(args.hippocampus_rule).read_text()), stock, refit_config),
              'provenance': {'command': args.command, 'commit': commit,
                             'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%MZ'),
                             'machine': f'{os.cpu_count()}-core CPU ({platform.machine()}), 24 GiB, no GPU'}}
    write_json_atomic(result, args.o)
    for config, v in configs.items():
        print(config, 'clean', {s: round(c['dice'], 3) for s, c in v['clean'].items()})
        for c in v['cells']:
            print(f"  {c['cell']:28s} ROI {c['psnr_roi']:.1f} dB  measured {c['ratio']:.3f} {c['ratio_per_seed']} "
                  f"ci {c['ci95']}  predicted {c.get('predicted_text') or round(c['predicted_ratio'], 3)}")
    print(json.dumps(result['refit'], indent=1))


if __name__ == '__main__':
    main()
