"""Protection map (issue 12, any dataset with a split): victim Dice / clean against budget (PSNR) per method and
exploiter.

    python benchmarks/protection_map.py -o benchmarks/out/map --victim stock --cells offset@16/255 checkerboard@16/255
    python benchmarks/protection_map.py -o benchmarks/out/map --table-only

A cell is ``METHOD[:key=value]@EPS``: an export-time method (random, offset[:sign=S], checkerboard[:block=N],
stripes[:block=N], diagonal[:block=N], smooth[:sigma=S], grow[:width=N], shrink[:width=N], edge[:width=N][:sign=S],
lsp) exported at EPS, or a protector trained at EPS with nnU-Net's trainer API and exported at its own budget
(VoxShield, VoxShield-EOT, VoxShield-LC, EM-samplewise, EM-samplewise-EOT: ``<trainer>[_eps<N>]_<E>epochs``; at
4/255 the plain trainer). Any method takes ``:clean=F``: its copy with a fixed share F of the training cases left
clean.
``--victim`` is an exploiter profile (stock: ``nnUNetTrainer_5epochs``; noda: ``nnUNetTrainerNoDA_5epochs``;
adam, labelaware, noSpatial, noNoiseBlur, noIntensity, noLowRes, noMirror, intensityMirrorOnly, onlySpatial,
onlyNoiseBlur, onlyLowRes: the profiles of ``trainers/victim_profiles.py``; or any trainer class with
``--victim-trainer``); ``--victim-plans``: a residual-encoder victim, profile ``<victim>-ResEncM_cpu``;
``--configuration 2d``: profile ``<victim>-2d``; ``--victim-epochs N`` other than 5: profile ``<victim>-<N>ep``;
``--defences``: the exploiter purifies the protected copy first, one row ``<method>+<defence>@<eps>`` each, next to
``clean+<defence>@0``, its victim on the purified clean data (what the purification alone costs).

Any dataset with a split: ``--dataset 4`` (Hippocampus, benchmarks/hippocampus_split.json, the default) or
``--dataset 27`` (ACDC, benchmarks/acdc_split.json, both frames of a patient on one side), or ``--data``/``--split``.
Cells are jobs on the audit's engine (``nnunetv2_voxshield.jobs``, ``-w`` workers or ``--backend slurm``): one
protect job per cell (train the protector, export, verify), then the audit's victim jobs (plan, purify, train,
predict, score, quality) under -o/victims, where a clean victim of a profile and seed is one job shared by all cells;
rerunning resumes, runs sharing -o claim jobs instead of waiting on locks. Results merge into -o/map.json in the
format ``map_rows`` (and benchmarks/amplitude_rule.py) read; the table prints, map.md and frontier.png are written.
"""
import argparse
import fcntl
import json
import os
import random
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hippocampus as hb  # noqa: E402  (split, raw preparation, command runner)

DEFAULT_VICTIM_EPOCHS = 5
EXPORT_METHODS = ('random', 'offset', 'checkerboard', 'stripes', 'diagonal', 'smooth', 'grow', 'shrink', 'edge',
                  'lsp')
TRAINED = {'VoxShield': 'nnUNetTrainerVoxShield', 'VoxShield-EOT': 'nnUNetTrainerVoxShieldEOT',
           'VoxShield-LC': 'nnUNetTrainerVoxShieldLC', 'VoxShield-LC-noReg': 'nnUNetTrainerVoxShieldLC_noReg',
           'VoxShield-LC-tile4': 'nnUNetTrainerVoxShieldLC_tile4',
           'VoxShield-LC-tile4-noDA': 'nnUNetTrainerVoxShieldLC_tile4_noDA',
           'VoxShield-LC-tile4-noDA-cbInit': 'nnUNetTrainerVoxShieldLC_tile4_noDA_cbInit',
           'VoxShield-LC-tile4-fastP': 'nnUNetTrainerVoxShieldLC_tile4_fastP',
           'VoxShield-LC-tile4-noDA-fastP': 'nnUNetTrainerVoxShieldLC_tile4_noDA_fastP',
           'VoxShield-LC-align': 'nnUNetTrainerVoxShieldLC_align',
           'VoxShield-LC-align-noDA': 'nnUNetTrainerVoxShieldLC_align_noDA',
           'VoxShield-LC-align-noDA-smallInit': 'nnUNetTrainerVoxShieldLC_align_noDA_smallInit',
           'EM-samplewise': 'nnUNetTrainerEMSampleWise', 'EM-samplewise-EOT': 'nnUNetTrainerEMSampleWiseEOT'}
VICTIMS = {'stock': 'nnUNetTrainer_{e}epochs', 'noda': 'nnUNetTrainerNoDA_{e}epochs',
           'adam': 'nnUNetTrainerVanillaAdam5en4_{e}epochs', 'labelaware': 'nnUNetTrainerLabelAware_{e}epochs',
           **{f'no{f}': f'nnUNetTrainerDA_no{f}_{{e}}epochs'
              for f in ('Spatial', 'NoiseBlur', 'Intensity', 'LowRes', 'Mirror')},
           'intensityMirrorOnly': 'nnUNetTrainerDA_intensityMirrorOnly_{e}epochs',
           **{f'only{f}': f'nnUNetTrainerDA_only{f}_{{e}}epochs' for f in ('Spatial', 'NoiseBlur', 'LowRes')}}
FIRST_ID = 100  # protected copies get dataset ids from here, one per cell (recorded in map.json)
DATASETS = {  # --dataset: raw folder in ../shared/data, split, patient grouping of the case ids
    4: ('Dataset004_Hippocampus', HERE / 'hippocampus_split.json', None),
    27: ('Dataset027_ACDC', HERE / 'acdc_split.json', r'(patient\d+)_frame\d+'),
}
DATASET = {'id': 4, 'name': 'Dataset004_Hippocampus'}  # the map's clean dataset (set by main / protect_job)


def parse_cell(text: str) -> dict:
    """'checkerboard:block=2@16/255' -> {'method': 'checkerboard', 'options': {'block': '2'}, 'eps': '16/255'}."""
    head, _, eps = text.partition('@')
    method, *opts = head.split(':')
    if method not in EXPORT_METHODS and method not in TRAINED:
        raise SystemExit(f'cell {text!r}: unknown method {method!r} (export-time: {", ".join(EXPORT_METHODS)}; '
                         f'trained: {", ".join(TRAINED)})')
    try:
        value = float(Fraction(eps))
    except (ValueError, ZeroDivisionError):
        raise SystemExit(f'cell {text!r}: eps must be a fraction such as 16/255') from None
    if not 0 < value <= 1:
        raise SystemExit(f'cell {text!r}: eps must be in (0, 1]')
    return {'cell': text, 'method': method, 'options': dict(o.split('=', 1) for o in opts), 'eps': eps,
            'eps_value': value}


def cell_label(cell: dict) -> str:
    """A file-name-safe label: 'checkerboard-block2_eps16_255'."""
    opts = ''.join(f'-{k}{v}' for k, v in sorted(cell['options'].items()))
    return f'{cell["method"].replace("-", "")}{opts}_eps{cell["eps"].replace("/", "_")}'


def protector_trainer(cell: dict, epochs: int) -> str:
    """``<trainer>_<E>epochs`` at 4/255, else ``<trainer>_eps<N>_<E>epochs`` (N: eps x 255)."""
    n = cell['eps_value'] * 255
    if abs(n - 4) < 1e-9:
        return f'{TRAINED[cell["method"]]}_{epochs}epochs'
    return f'{TRAINED[cell["method"]]}_eps{round(n)}_{epochs}epochs'


def plans_tag(plans: str) -> str:
    """'nnUNetResEncUNetMPlans_cpu' -> 'ResEncM_cpu' (the victim profile's suffix for non-default victim plans)."""
    return plans.replace('nnUNet', '').replace('UNet', '').replace('Plans', '').strip('_')


def profile_name(victim: str, plans: str, configuration: str, victim_epochs: int) -> str:
    """The table's victim profile: ``victim`` [-<plans tag>] [-<configuration>] [-<N>ep], each suffix only where it
    differs from the map's default (stock plans, 3d_fullres, ``DEFAULT_VICTIM_EPOCHS``), so a longer or other victim
    never pools with the default one."""
    profile = victim if plans == hb.PLANS else f'{victim}-{plans_tag(plans)}'
    if configuration != '3d_fullres':
        profile = f'{profile}-{configuration}'
    return profile if victim_epochs == DEFAULT_VICTIM_EPOCHS else f'{profile}-{victim_epochs}ep'


class MapFile:
    """A JSON file (map.json, probe.json) merged under a lock, so that runs side by side keep each other's entries."""

    def __init__(self, path: Path):
        self.path, self.lock = path, path.with_suffix('.lock')

    def update(self, fn) -> dict:
        with open(self.lock, 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(self.path.read_text()) if self.path.is_file() else {}
            fn(data)
            tmp = self.path.with_suffix('.tmp')
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path)
            return data


def copy_folder(label: str, roots: dict, mapfile: MapFile) -> tuple:
    """(dataset id, raw folder) of a cell's protected copy; ids assigned once, under the lock."""
    def assign(data):
        ids = data.setdefault('dataset_ids', {})
        ids.setdefault(label, FIRST_ID + len(ids))
    dataset_id = mapfile.update(assign)['dataset_ids'][label]
    return dataset_id, roots['nnUNet_raw'] / f'Dataset{dataset_id:03d}_{DATASET["name"][11:]}_{label}'


def protect(cell: dict, roots: dict, env: dict, logs: Path, mapfile: MapFile, clean: Path, epochs: int) -> Path:
    """Export (after training the protector where the method trains) and verify one cell; resumable. Option
    ``clean=F`` (any method): the cell's copy with a fixed random fraction F of its training cases left clean. Runs as
    one job per cell (``protect_job``): the engine's claim, not a lock, keeps two runs from making one copy twice."""
    label = cell_label(cell)
    if 'clean' in cell['options']:
        return mix_clean(cell, roots, env, logs, mapfile, clean, epochs)
    return _protect(cell, label, roots, env, logs, mapfile, clean, epochs)


def _protect(cell: dict, label: str, roots: dict, env: dict, logs: Path, mapfile: MapFile, clean: Path,
             epochs: int) -> Path:
    dataset_id, dst = copy_folder(label, roots, mapfile)
    cmd = ['voxshield_export', '-d', str(DATASET['id']), '-o', dataset_id, '--name', dst.name, '-p', hb.PLANS, '-c',
           '3d_fullres', '-device', 'cpu']
    if cell['method'] in TRAINED:
        trainer = protector_trainer(cell, epochs)
        fold = roots['nnUNet_results'] / DATASET['name'] / f'{trainer}__{hb.PLANS}__3d_fullres' / 'fold_all'
        if not (fold / 'checkpoint_final.pth').is_file():
            hb.log(f'{label}: training {trainer}')
            seconds = hb.run([sys.executable, '-m', 'nnunetv2_voxshield.victims', 'run', str(DATASET['id']),
                              '3d_fullres', '--seed', '0', '-tr', trainer, '-p', hb.PLANS, '-device', 'cpu'], env,
                             logs / f'train_{label}.log')
            mapfile.update(lambda d: d.setdefault('protectors', {}).setdefault(label, {}).update(
                trainer=trainer, train_seconds=seconds))
        cmd += ['-tr', trainer, '-f', 'all']
    else:
        cmd += ['--method', cell['method'], '--eps', cell['eps']]
        flags = {'block': '--block', 'sigma': '--smooth-sigma', 'patch': '--lsp-patch', 'width': '--width',
                 'sign': '--sign'}
        for key, value in cell['options'].items():
            cmd += [flags[key], value]
    if not dst.is_dir():
        hb.log(f'{label}: export')
        hb.run(cmd, env, logs / f'export_{label}.log')
    record_verified(cell, dst, env, logs, mapfile, clean)
    return dst


def record_verified(cell: dict, dst: Path, env: dict, logs: Path, mapfile: MapFile, clean: Path, **extra) -> None:
    """voxshield_verify the cell's copy at its eps (once) and record the summary in map.json."""
    label = cell_label(cell)
    report = logs.parent / f'verify_{label}.json'
    if not report.is_file():
        hb.run(['voxshield_verify', clean, dst, '-o', report, '--eps', cell['eps']], env, logs / f'verify_{label}.log')
    summary = json.loads(report.read_text()).get('summary')
    mapfile.update(lambda d: d.setdefault('protectors', {}).setdefault(label, {}).update(
        cell=cell['cell'], dataset=str(dst), verify=summary, **extra))


def mix_clean(cell: dict, roots: dict, env: dict, logs: Path, mapfile: MapFile, clean: Path, epochs: int) -> Path:
    """The protected copy of the cell without ``clean=F``, with round(F x cases) training cases (drawn with seed 0)
    replaced by their clean images: how much code-free data undoes a code (augmentation that erases a code in some
    samples acts like this)."""
    base = parse_cell(cell['cell'].replace(f':clean={cell["options"]["clean"]}', ''))
    fraction = float(cell['options']['clean'])
    if not 0 <= fraction <= 1:
        raise SystemExit(f'cell {cell["cell"]!r}: clean=F needs F in [0, 1]')
    src = protect(base, roots, env, logs, mapfile, clean, epochs)
    label = cell_label(cell)
    dst = copy_folder(label, roots, mapfile)[1]
    cases = sorted(p.name[:-len('_0000.nii.gz')] for p in (src / 'imagesTr').glob('*_0000.nii.gz'))
    chosen = sorted(random.Random(0).sample(cases, round(fraction * len(cases))))
    if not dst.is_dir():
        tmp = dst.parent / f'.{dst.name}.partial'
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        for case in chosen:
            shutil.copy(clean / 'imagesTr' / f'{case}_0000.nii.gz', tmp / 'imagesTr' / f'{case}_0000.nii.gz')
        os.replace(tmp, dst)
    record_verified(cell, dst, env, logs, mapfile, clean, clean_cases=len(chosen), cases=len(cases))
    return dst


def overlap_stats(pred_dir: Path, labels_dir: Path) -> Optional[dict]:
    """Foreground (any label) of a victim's test predictions against the reference, summed over the cases: predicted
    volume / reference volume, precision and recall (a shortcut victim predicts little; a boundary bias moves the
    edge and keeps the location). None without predictions."""
    import SimpleITK as sitk
    files = sorted(pred_dir.glob('*.nii.gz'))
    if not files:
        return None
    tp = predicted = reference = 0
    for f in files:
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(f))) > 0
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_dir / f.name))) > 0
        tp, predicted, reference = tp + int((p & r).sum()), predicted + int(p.sum()), reference + int(r.sum())
    return {'volume_ratio': predicted / reference, 'precision': tp / predicted if predicted else None,
            'recall': tp / reference, 'n_cases': len(files)}


def record_overlap(data: dict, out: Path, labels_dir: Path) -> dict:
    """``overlap``: {seed: overlap_stats} of the protected victims of every eval entry that lacks it."""
    for key, entry in (data.get('eval') or {}).items():
        if 'overlap' not in entry:
            seeds = out / f'eval_{key}' / 'victims' / 'protected' / entry.get('configuration', '3d_fullres')
            stats = {d.name.split('_')[-1]: overlap_stats(d / 'predictions', labels_dir)
                     for d in sorted(seeds.glob('seed_*'))}
            if stats and all(stats.values()):
                entry['overlap'] = stats
        clean = data.setdefault('clean_overlap', {}).setdefault(entry['victim'], {})
        for d in sorted((out / f'eval_{key}' / 'victims' / 'clean' / entry.get('configuration', '3d_fullres'))
                        .glob('seed_*')):
            if d.name.split('_')[-1] not in clean:  # the clean victim's predictions sit where it was trained
                stats = overlap_stats(d / 'predictions', labels_dir)
                if stats:
                    clean[d.name.split('_')[-1]] = stats
    return data


def row_cell(entry: dict, row: dict) -> str:
    """The map's cell name of one report row: the entry's cell, '<method>+<defence>@<eps>' for its purified copy and
    'clean+<defence>@0' for the purified clean data."""
    if not row.get('defence_spec'):
        return entry['cell']
    if row['row'].startswith('clean+'):
        return f'clean+{row["defence_spec"]}@0'
    method, eps = entry['cell'].split('@')
    return f'{method}+{row["defence_spec"]}@{eps}'


def map_rows(data: dict) -> list:
    """One row per (victim profile, cell) over every eval folder and seed: mean Dice over the seeds, the clean
    victim's mean Dice over the same seeds (same profile), their ratio, the per-seed ratios and the PSNR. A purified
    row's ratio is against the clean victim on unpurified data. Seeds are paired by ``verdict.seed_ratio``."""
    from nnunetv2_voxshield.verdict import seed_ratio
    cells = {}
    for entry in (data.get('eval') or {}).values():
        rows, config = entry['report']['rows'], entry.get('configuration', '3d_fullres')
        clean = next(r for r in rows if r['row'] == 'clean')['per_seed'].get(config, {})
        for r in rows:
            if r['row'] == 'clean' or not r['per_seed'].get(config) or (entry.get('defences')
                                                                         and not r.get('defence_spec')):
                continue
            cell = cells.setdefault((entry['victim'], row_cell(entry, r)),
                                    {'victim': {}, 'clean': {}, 'quality': r.get('quality')})
            for seed, v in r['per_seed'][config].items():
                if seed in clean:
                    cell['victim'][int(seed)], cell['clean'][int(seed)] = v, clean[seed]
    verify = {p.get('cell'): p.get('verify') or {} for p in (data.get('protectors') or {}).values()}
    overlap = {}  # (victim, cell): mean over the recorded seeds of the protected victims' overlap_stats
    for entry in (data.get('eval') or {}).values():
        if entry.get('defences'):  # its unpurified victim is not the row's (as above)
            continue
        for seed, st in (entry.get('overlap') or {}).items():
            overlap.setdefault((entry['victim'], entry['cell']), {})[seed] = st
    overlap = {k: {m: sum((st[m] or 0) for st in v.values()) / len(v) for m in ('volume_ratio', 'precision', 'recall')}
               for k, v in overlap.items()}
    out = []
    for (victim, name), cell in cells.items():
        q, paired = cell['quality'] or {}, seed_ratio(cell['victim'], cell['clean'])
        out.append({'victim': victim, 'cell': name, 'method': name.split('@')[0], 'eps': name.split('@')[1],
                    **{k: paired[k] for k in ('seeds', 'dice', 'clean_dice', 'ratio_per_seed', 'dice_per_label')},
                    'psnr': (q.get('psnr') or {}).get('mean'),
                    'psnr_min': (verify.get(name, {}).get('psnr') or {}).get('min'),
                    'psnr_roi': (q.get('psnr_roi') or {}).get('mean'), 'overlap': overlap.get((victim, name)),
                    'ratio': paired['ratio']})
    return out


def victim_profile(trainer: str, configuration: str, plans: str = hb.PLANS) -> str:
    """The map's profile name of a victim trainer class ('nnUNetTrainerNoDA_20epochs', '2d' -> 'noda-2d-20ep');
    a trainer no profile names keeps its class name (with the configuration suffix)."""
    for victim, pattern in VICTIMS.items():
        head, _, tail = pattern.partition('{e}')
        epochs = trainer[len(head):len(trainer) - len(tail)]
        if trainer.startswith(head) and trainer.endswith(tail) and epochs.isdigit():
            return profile_name(victim, plans, configuration, int(epochs))
    return trainer if configuration == '3d_fullres' else f'{trainer}-{configuration}'


def _external_row(dataset: str, victim: str, cell: str, seeds: list, dice: float, clean_dice: float,
                  ratio: float, ratio_per_seed: list, psnr: Optional[float], psnr_roi: Optional[float],
                  dice_per_label: Optional[dict] = None) -> dict:
    method = cell.split('@')[0]
    return {'dataset': dataset, 'victim': victim, 'cell': cell,
            'method': 'conv' if method.startswith('conv:') else method,
            'eps': cell.split('@')[1] if '@' in cell else None, 'seeds': list(seeds), 'dice': dice,
            'clean_dice': clean_dice, 'ratio': ratio, 'ratio_per_seed': list(ratio_per_seed),
            'dice_per_label': dice_per_label or {}, 'psnr': psnr, 'psnr_min': None, 'psnr_roi': psnr_roi,
            'overlap': None}


def _audit_cell(copy: dict, predictions: Optional[dict]) -> str:
    """The cell of an audited copy: the predictions file's row naming the copy's dataset folder, else its row with
    the copy's strength (conv) or eps, else the copy's name. (Two copies at one eps, e.g. sample-wise EM from a
    5-epoch and from a longer protector, are told apart by their rows' ``dataset``.)"""
    budget = (copy.get('quality') or {}).get('budget') or {}
    folder = os.path.basename(str(copy.get('dataset') or '').rstrip('/'))
    for p in (predictions or {}).get('rows', []):
        if folder and p.get('dataset') == folder:
            return p['cell']
    for p in (predictions or {}).get('rows', []):
        if budget.get('strength') is not None and p.get('strength') is not None:
            if abs(p['strength'] - budget['strength']) < 1e-9:
                return p['cell']
        elif budget.get('eps') is not None and p.get('eps') and abs(float(Fraction(p['eps'])) - budget['eps']) < 1e-6:
            return p['cell']
    return copy['name']


def rows_of(data: dict, folder: Optional[Path] = None) -> list:
    """Map-format rows (``map_rows``' keys plus ``dataset``) of any results file: a protection map (Hippocampus
    unless its settings name another dataset), an ACDC results file of benchmarks/acdc.py (each configuration's cells;
    a configuration is '<configuration>' for the 5-epoch stock victim or '<configuration> <trainer>') or a
    voxshield_audit report (each copy against each exploiter without a purification; its cells named by the
    report's predictions file, read from ``folder``)."""
    if 'eval' in data:
        dataset = str((data.get('settings') or {}).get('dataset') or 'Dataset004_Hippocampus')
        return [{'dataset': dataset.split('_', 1)[1], **r} for r in map_rows(data)]
    rows = []
    if 'configurations' in data:
        for key, config in data['configurations'].items():
            configuration, _, trainer = key.partition(' ')
            victim = victim_profile(trainer or 'nnUNetTrainer_5epochs', configuration)
            for c in config['cells']:
                if c.get('defence'):   # a purified cell is not a map row (as an audit's purified rows)
                    continue
                rows.append(_external_row('ACDC', victim, c['cell'], c['seeds'], c['dice'], c['clean_dice'],
                                          c['ratio'], c['ratio_per_seed'], c.get('psnr_whole'), c.get('psnr_roi'),
                                          c.get('dice_per_label')))
        return rows
    if 'copies' in data:
        predictions, name = None, Path(data.get('predictions_file') or '').name
        if name and folder is not None and (folder / name).is_file():
            predictions = json.loads((folder / name).read_text())
        clean = Path((data.get('settings') or {}).get('clean', '')).name
        dataset = clean.split('_', 1)[1] if '_' in clean else clean
        for copy in data['copies']:
            q = copy.get('quality') or {}
            for e in copy.get('exploiters') or []:
                if e.get('defence') or not e.get('ratio') or e.get('dice') is None or not e.get('trainer'):
                    continue  # a purified copy, or a report without the victim's Dice: not a map row
                rows.append(_external_row(dataset, victim_profile(e['trainer'], e['configuration'], e['plans']),
                                          _audit_cell(copy, predictions), e['seeds'], e['dice'], e['clean_dice'],
                                          e['ratio']['ratio'], [round(v, 3) for v in e['per_seed']],
                                          q.get('psnr'), q.get('psnr_roi')))
        return rows
    raise ValueError('not a protection map, ACDC results file or audit report (no eval, configurations or copies)')


def print_table(data: dict, out: Path) -> None:
    rows = map_rows(data)
    lines = ['| victim | cell | seeds | Dice | clean Dice | Dice / clean | per seed | per label | PSNR mean / min (dB) |'
             ' PSNR ROI (dB) | fg volume / GT, precision, recall |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    fmt = lambda x, f='{:.1f}': '–' if x is None else f.format(x)  # noqa: E731
    for r in sorted(rows, key=lambda r: (r['victim'], r['method'], Fraction(r['eps']))):
        labels = ' / '.join(f'{x:.2f}' for x in r['dice_per_label'].values())
        ov = '–' if not r['overlap'] else ', '.join(f'{r["overlap"][m]:.2f}' for m in ('volume_ratio', 'precision',
                                                                                         'recall'))
        lines.append(f'| {r["victim"]} | {r["cell"]} | {",".join(map(str, r["seeds"]))} | {r["dice"]:.3f} | '
                     f'{r["clean_dice"]:.3f} | **{r["ratio"]:.2f}** | {" / ".join(map(str, r["ratio_per_seed"]))} | '
                     f'{labels} | {fmt(r["psnr"])} / {fmt(r["psnr_min"])} | {fmt(r["psnr_roi"])} | {ov} |')
    clean = [f'{victim} seed {seed}: ' + ', '.join(f'{st[m]:.2f}' for m in ('volume_ratio', 'precision', 'recall'))
             for victim, seeds in sorted((data.get('clean_overlap') or {}).items())
             for seed, st in sorted(seeds.items())]
    if clean:
        lines += ['', 'Clean victims, foreground volume / GT, precision, recall: ' + '; '.join(clean) + '.']
    text = '\n'.join(lines)
    print(text)
    (out / 'map.md').write_text(text + '\n')
    frontier_figure(rows, out / 'frontier.png')


def frontier_figure(rows: list, png: Path) -> None:
    """Victim Dice / clean against whole-volume PSNR: one curve per method and victim profile (a colour per method,
    a marker and line style per profile), bars from the lowest to the highest seed's ratio where a row has several
    (the point is the ratio of the mean Dice, which may lie a little outside them). Purified rows ('+' in the
    method) stay in the table only: their PSNR is the purified copy's, not the protection's cost."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 5))
    groups = {}
    for r in rows:
        if r['psnr'] is not None and '+' not in r['method']:
            groups.setdefault((r['method'], r['victim']), []).append(
                (r['psnr'], r['ratio'], min(r['ratio_per_seed']), max(r['ratio_per_seed'])))
    methods = sorted({m for m, _ in groups})
    victims = sorted({v for _, v in groups}, key=lambda v: (v != 'stock', v != 'noda', v))
    palette = [c for name in ('tab10', 'Dark2', 'tab20b', 'Set1') for c in plt.get_cmap(name).colors]  # 47 colours
    markers, styles = 'osD^v<>ph*', ['-', '--', ':', '-.']
    for (method, victim), pts in sorted(groups.items()):
        pts.sort()
        x, y, lo, hi = (list(c) for c in zip(*pts))
        k = victims.index(victim)
        ax.errorbar(x, y, yerr=[[max(a - b, 0) for a, b in zip(y, lo)], [max(b - a, 0) for a, b in zip(y, hi)]],
                    color=palette[methods.index(method) % len(palette)], marker=markers[k % len(markers)],
                    linestyle=styles[k % len(styles)], markersize=4, capsize=2, lw=1, label=f'{method} ({victim})')
    ax.axhline(0.05, color='k', lw=0.8, ls=':')
    ax.axvline(50, color='k', lw=0.8, ls=':')
    ax.set_xlabel('PSNR of the protected training images (dB, whole volume)')
    ax.set_ylabel('victim Dice / clean victim Dice')
    ax.set_title(f'Protection map, {DATASET["name"][11:]} (goal: lower right of the dotted lines)', fontsize=9)
    ax.legend(fontsize=6.5, ncol=2, loc='center left', bbox_to_anchor=(1.01, 0.5))  # outside: the points stay visible
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- cells as jobs
def plan_job(job_dir: str, env: dict, dataset: dict) -> dict:
    """Stock plan and preprocess of the map's clean dataset (3d_fullres) and the CPU preset, for the protectors."""
    logs = Path(job_dir)
    if not (Path(env['nnUNet_preprocessed']) / dataset['name'] / f'{hb.PLANS}.json').is_file():
        hb.run(['nnUNetv2_plan_and_preprocess', '-d', dataset['id'], '-c', '3d_fullres', '-np', '1'], env,
               logs / 'plan.log')
        hb.run(['voxshield_plans', '-d', dataset['id'], '--preset', 'cpu'], env, logs / 'plan.log')
    return {'plans': hb.PLANS}


def protect_job(job_dir: str, cell_text: str, roots: dict, env: dict, clean: str, epochs: int, dataset: dict,
                dataset_ids: dict) -> dict:
    """One cell's protected copy (``protect``) in its own job; its map.json entries (protector, verify summary) go to
    the job's record and are merged into map.json by the run that started it."""
    DATASET.update(dataset)
    part = MapFile(Path(job_dir) / 'map_part.json')
    part.update(lambda d: d.setdefault('dataset_ids', {}).update(dataset_ids))
    logs = Path(roots['nnUNet_raw']).parent / 'logs'
    dst = protect(parse_cell(cell_text), {k: Path(v) for k, v in roots.items()}, env, logs, part, Path(clean), epochs)
    return {'dataset': str(dst), 'map': json.loads(part.path.read_text())}


def _merge(base: dict, new: dict) -> dict:
    for k, v in new.items():
        base[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def cells_with_bases(cells: list) -> list:
    """The cells and the base cell of each ``clean=F`` cell (made by its own job, first), each once."""
    out = {}
    for cell in cells:
        if 'clean' in cell['options']:
            base = parse_cell(cell['cell'].replace(f':clean={cell["options"]["clean"]}', ''))
            out.setdefault(base['cell'], base)
        out.setdefault(cell['cell'], cell)
    return list(out.values())


def map_jobs(cells: list, roots: dict, env: dict, clean: Path, args, dataset_ids: dict, victims: Path,
             victim_trainer: str, profile: str, split: dict) -> tuple:
    """The map's DAG: plan, one protect job per cell, and the audit's victim jobs (plan / purify / train / predict /
    score / quality) for the clean data and each cell's copy, under ``victims``; (jobs, victims, rows)."""
    from nnunetv2_voxshield.audit import build_jobs, link_cases, row_dataset_id
    from nnunetv2_voxshield.dataset_io import list_training_cases, load_dataset_json
    from nnunetv2_voxshield.jobs import Job
    from nnunetv2_voxshield.panel import Panel, Profile
    import protection_map as this  # job functions by their module's name (not __main__), so job processes find them
    str_roots = {k: str(v) for k, v in roots.items()}
    jobs = [Job('plan', this.plan_job, (env, dict(DATASET)), kind='plan', threads=args.threads)]
    copies, rows, row_deps = [], {}, {}
    for cell in cells_with_bases(cells):
        label = cell_label(cell)
        base = cell['cell'].replace(f':clean={cell["options"].get("clean")}', '')
        deps = ['plan'] + ([f'protect_{cell_label(parse_cell(base))}'] if 'clean' in cell['options'] else [])
        jobs.append(Job(f'protect_{label}', this.protect_job, (cell['cell'], str_roots, env, str(clean),
                                                          args.protector_epochs, dict(DATASET), dataset_ids),
                        deps=deps, kind='protect', threads=args.threads))
        if cell in cells:
            copies.append(label)
            row_deps[label] = [f'protect_{label}']
    for sub in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (victims / sub).mkdir(parents=True, exist_ok=True)
    ds_json = load_dataset_json(str(clean))
    rows['clean'] = str(victims / 'nnUNet_raw' / f'Dataset{row_dataset_id(str(victims), "clean"):03d}_clean')
    link_cases(list_training_cases(str(clean), ds_json), split['train'], ds_json, rows['clean'])
    for label in copies:  # a link to the copy the cell's protect job makes
        rows[label] = str(victims / 'nnUNet_raw' / f'Dataset{row_dataset_id(str(victims), label):03d}_{label}')
        target = roots['nnUNet_raw'] / f'Dataset{dataset_ids[label]:03d}_{DATASET["name"][11:]}_{label}'
        if not os.path.lexists(rows[label]):
            os.symlink(target, rows[label])
    profiles = [Profile(profile, victim_trainer, args.configuration, args.victim_plans, scheduled=False)]
    profiles += [Profile(f'{profile}+{d}', victim_trainer, args.configuration, args.victim_plans, d, scheduled=False)
                 for d in args.defences]
    panel = Panel('map', profiles, list(dict.fromkeys(args.seeds)), None, args.victim_plans)
    tests = {'train': split['train'], 'test': sorted(split['test']), 'images': str(clean / 'imagesTs'),
             'labels': str(clean / 'labelsTs')}
    victim_jobs, scores = build_jobs(str(victims), panel, {p.name: victim_trainer for p in profiles}, rows, copies,
                                     tests, ds_json['file_ending'], ds_json, 'cpu', True, None, False, str(clean),
                                     threads=args.threads, row_deps=row_deps)
    return jobs + victim_jobs, scores, panel


def map_entries(cells: list, records: dict, scores: dict, panel, args, profile: str, victim_trainer: str,
                victims: Path, labels_dir: Path) -> dict:
    """map.json's ``eval`` entries (the format voxshield_evaluate's reports had, read by ``map_rows``) of every cell
    whose victims finished, with the protected victims' ``overlap``; {key: entry}."""
    from nnunetv2_voxshield.audit import _safe
    from nnunetv2_voxshield.defences import defence_key
    done = lambda name: records[name].result if name in records and records[name].state == 'done' else None  # noqa
    config, entries = args.configuration, {}
    for cell in cells:
        label = cell_label(cell)
        for defences in [[]] + ([args.defences] if args.defences else []):  # the cell alone, then with the defences
            bases = [('clean', None, profile), (label, None, profile)]
            bases += [(f'{b}+{defence_key(d)}', d, f'{profile}+{d}') for d in defences for b in ('clean', label)]
            rows = []
            for row, spec, prof in bases:
                per_seed = {str(s): (done(scores[(row, prof, s)]) or {}).get('summary') for s in panel.seeds}
                if not all(per_seed.values()):
                    break
                quality = done(f'quality_{_safe(row)}') if row != 'clean' else None
                rows.append({'row': 'protected' + row[len(label):] if row.startswith(label) else row,
                             'method': cell['cell'] if row.startswith(label) else 'Clean', 'defence_spec': spec,
                             'per_seed': {config: per_seed}, 'quality': (quality or {}).get('summary')})
            else:
                purified = ''.join('+' + defence_key(d) for d in defences)
                key = f'{profile}_{label}{purified}_seed{"-".join(map(str, args.seeds))}'
                entry = {'victim': profile, 'victim_trainer': victim_trainer, 'victim_plans': args.victim_plans,
                         'configuration': config, 'victim_epochs': args.victim_epochs, 'defences': defences,
                         'cell': cell['cell'], 'seeds': args.seeds, 'report': {'rows': rows}}
                if not defences:
                    tag = lambda row, s: scores[(row, profile, s)].replace('score_', 'predict_', 1)  # noqa: E731
                    overlap = {str(s): overlap_stats(victims / 'jobs' / tag(label, s) / 'predictions', labels_dir)
                               for s in panel.seeds}
                    if all(overlap.values()):
                        entry['overlap'] = overlap
                    entry['clean_overlap'] = {str(s): overlap_stats(victims / 'jobs' / tag('clean', s) /
                                                                    'predictions', labels_dir) for s in panel.seeds}
                entries[key] = entry
    return entries


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-o', default=str(HERE / 'out' / 'map'), help='output folder')
    parser.add_argument('--dataset', type=int, default=4, help='the clean dataset\'s id: 4 (Hippocampus, default) or '
                                                               '27 (ACDC, patient split), or another with --data/--split')
    parser.add_argument('--data', default=None, help='its raw folder (default: ../shared/data/<the dataset>)')
    parser.add_argument('--split', default=None, help='split file {"train": [...], "test": [...]} (default: the '
                                                      'dataset\'s committed split)')
    parser.add_argument('--cells', nargs='*', default=[], help='METHOD[:key=value]@EPS, e.g. offset@16/255')
    parser.add_argument('--victim', default='stock', help='exploiter profile name: stock, noda, or a name of your '
                                                          'choice with --victim-trainer')
    parser.add_argument('--victim-trainer', default=None, help='victim trainer class (default: from --victim)')
    parser.add_argument('--victim-epochs', type=int, default=DEFAULT_VICTIM_EPOCHS,
                        help='victim schedule (default 5); another is its own profile <victim>-<N>ep')
    parser.add_argument('--protector-epochs', type=int, default=5)
    parser.add_argument('--victim-plans', default=hb.PLANS,
                        help=f'victim plans (default {hb.PLANS}); e.g. nnUNetResEncUNetMPlans_cpu for a residual-encoder '
                             'victim (the profile is then named <victim>-ResEncM_cpu in the table)')
    parser.add_argument('--configuration', default='3d_fullres',
                        help='victim configuration (default 3d_fullres); another is its own profile <victim>-<config>')
    parser.add_argument('--defences', nargs='*', default=[],
                        help='the exploiter purifies the protected copy (and, as a control, the clean data) first: '
                             'blur, zmedian, zresample, quantise (NAME:PARAM); one row each')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0])
    from nnunetv2_voxshield.audit_inputs import add_engine_arguments
    add_engine_arguments(parser)
    parser.add_argument('--table-only', action='store_true', help='print the table of -o/map.json, draw the figure')
    args = parser.parse_args()
    out = Path(args.o).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mapfile = MapFile(out / 'map.json')
    name, default_split, _ = DATASETS.get(args.dataset, (None, None, None))
    data = Path(args.data) if args.data else (HERE.parent.parent / 'shared' / 'data' / name if name else None)
    if data is None or not (data / 'dataset.json').is_file():
        parser.error(f'--dataset {args.dataset}: give its raw folder with --data (dataset.json not found at {data})')
    DATASET.update(id=args.dataset, name=f'Dataset{args.dataset:03d}_{data.name.split("_", 1)[1]}')
    if args.table_only:
        if not mapfile.path.is_file():
            parser.error(f'{mapfile.path}: not found (run some cells first)')
        labels_dir = out / 'nnUNet_raw' / DATASET['name'] / 'labelsTs'
        if labels_dir.is_dir():  # victims' foreground volume, precision and recall where not yet recorded
            mapfile.update(lambda d: record_overlap(d, out, labels_dir))
        return print_table(json.loads(mapfile.path.read_text()), out)
    split_file = Path(args.split) if args.split else default_split
    if split_file is None or not split_file.is_file():
        parser.error(f'--split: no split file for dataset {args.dataset} ({split_file})')
    cells = [parse_cell(c) for c in args.cells]
    if args.victim_trainer is None and args.victim not in VICTIMS:
        parser.error(f'--victim {args.victim!r} needs --victim-trainer (built in: {", ".join(VICTIMS)})')
    victim_trainer = args.victim_trainer or VICTIMS[args.victim].format(e=args.victim_epochs)
    profile = profile_name(args.victim, args.victim_plans, args.configuration, args.victim_epochs)
    from nnunetv2_voxshield.audit_inputs import AuditError, engine_options
    from nnunetv2_voxshield.defences import defence_key
    from nnunetv2_voxshield.panel import missing_trainers
    try:  # checked before any job starts
        [defence_key(d) for d in args.defences]
        engine = engine_options(args)
    except (ValueError, AuditError) as e:
        parser.error(str(e))
    if missing_trainers([victim_trainer]):
        parser.error(f'--victim-trainer {victim_trainer}: trainer class not found')

    roots = {k: out / k for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for d in roots.values():
        d.mkdir(parents=True, exist_ok=True)
    env = {**hb.bench_env(roots), 'PYTHONPATH': os.pathsep.join([str(HERE)] + [p for p in os.environ.get(
        'PYTHONPATH', '').split(os.pathsep) if p])}
    os.environ['PYTHONPATH'] = env['PYTHONPATH']  # the job processes import this module by name
    (out / 'logs').mkdir(exist_ok=True)
    split = json.loads(split_file.read_text())
    clean = hb.prepare_raw(data, roots['nnUNet_raw'], split, DATASET['name'])

    def assign(d):  # copy ids: assigned here, once, by the only writer of map.json
        ids = d.setdefault('dataset_ids', {})
        for c in cells_with_bases(cells):
            ids.setdefault(cell_label(c), FIRST_ID + len(ids))
        d.setdefault('settings', {}).update(
            split=str(split_file.resolve().relative_to(HERE.parent)) if HERE.parent in split_file.resolve().parents
            else str(split_file), plans=hb.PLANS, victim_epochs=DEFAULT_VICTIM_EPOCHS,
            protector_epochs=args.protector_epochs, victim_configuration='3d_fullres', tta=False,
            dataset=DATASET['name'])
    dataset_ids = mapfile.update(assign)['dataset_ids']
    victims = out / 'victims'
    jobs, scores, panel = map_jobs(cells, roots, env, clean, args, dataset_ids, victims, victim_trainer, profile, split)
    from nnunetv2_voxshield.jobs import run_jobs
    records = run_jobs(jobs, str(victims), backend=engine['backend'], workers=engine['workers'],
                       slurm=engine['slurm'])
    entries = map_entries(cells, records, scores, panel, args, profile, victim_trainer, victims, clean / 'labelsTs')
    parts = [r.result['map'] for n, r in records.items() if n.startswith('protect_') and r.state == 'done']

    def merge(d):
        for part in parts:
            _merge(d, {k: v for k, v in part.items() if k != 'dataset_ids'})
        for entry in entries.values():  # the clean victims' overlap, per profile and seed (as record_overlap keeps it)
            for seed, st in (entry.pop('clean_overlap', None) or {}).items():
                if st:
                    d.setdefault('clean_overlap', {}).setdefault(entry['victim'], {}).setdefault(seed, st)
        d.setdefault('eval', {}).update(entries)
    mapfile.update(merge)
    print_table(json.loads(mapfile.path.read_text()), out)
    failed = [n for n, r in records.items() if r.state != 'done']
    if failed:
        sys.exit(f'protection_map: {len(failed)} job(s) failed or skipped: {", ".join(failed[:5])}; rerun to resume')


if __name__ == '__main__':
    main()
