"""The audit's verdict: victim Dice / clean victim Dice per exploiter with bootstrap intervals, seed agreement, the
purification's own cost, the amplitude rule's prediction, and report.json / report.md / PNGs.

Ratios are ratios of means (mean protected-victim Dice over seeds and test cases / the same mean of the clean
victims), paired by seed: a seed's protected victim is compared with the clean victim of the same seed (and
profile), and only seeds both have count. ``seed_ratio`` is the one aggregator of this rule, used by the audit,
the protection map and the Hippocampus benchmark.
"""
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from nnunetv2_voxshield.panel import Panel

PROTECTS, KEEPS = 0.3, 0.9     # default thresholds: "protects" at <= 0.3 of clean, "does not" at >= 0.9


# ----------------------------------------------------------------------------------------- aggregation
def seed_ratio(victim: Mapping, clean: Mapping) -> Optional[dict]:
    """Seed-paired Dice / clean of per-seed victim summaries ({seed: {'dice', 'dice_per_label'?}}): seeds both have,
    mean Dice over them, the clean mean over the same seeds, their ratio and the per-seed ratios (3 decimals).
    None without a common seed."""
    seeds = sorted((s for s in victim if s in clean), key=lambda s: int(s))
    if not seeds:
        return None
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    dice, clean_dice = mean([victim[s]['dice'] for s in seeds]), mean([clean[s]['dice'] for s in seeds])
    out = {'seeds': [int(s) for s in seeds], 'dice': dice, 'clean_dice': clean_dice,
           'ratio': dice / clean_dice if clean_dice else None,
           'ratio_per_seed': [round(victim[s]['dice'] / clean[s]['dice'], 3) if clean[s]['dice'] else None
                              for s in seeds]}
    if all('dice_per_label' in victim[s] for s in seeds):
        out['dice_per_label'] = {k: mean([victim[s]['dice_per_label'][k] for s in seeds])
                                 for k in victim[seeds[0]]['dice_per_label']}
    return out


def bootstrap_ratio(victim: Mapping[int, Mapping[str, float]], clean: Mapping[int, Mapping[str, float]],
                    n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Optional[dict]:
    """Dice / clean over {seed: {case: Dice}} of protected and clean victims, with a percentile bootstrap interval
    that resamples seeds and test cases (both with replacement, the same cases for both victims). None without a
    common seed and case."""
    seeds = sorted(s for s in victim if s in clean)
    cases = sorted(set.intersection(*[set(victim[s]) & set(clean[s]) for s in seeds])) if seeds else []
    if not cases:
        return None
    p = np.array([[victim[s][c] for c in cases] for s in seeds], dtype=float)
    c = np.array([[clean[s][c] for c in cases] for s in seeds], dtype=float)
    ratio = lambda a, b: float(a.mean() / b.mean()) if b.mean() > 0 else float('nan')  # noqa: E731
    out = {'ratio': ratio(p, c), 'per_seed': [ratio(p[i], c[i]) for i in range(len(seeds))], 'seeds': seeds,
           'n_cases': len(cases), 'ci': None}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        si = rng.integers(0, len(seeds), (n_boot, len(seeds)))
        ci = rng.integers(0, len(cases), (n_boot, len(cases)))
        pm = p[si[:, :, None], ci[:, None, :]].mean(axis=(1, 2))
        cm = c[si[:, :, None], ci[:, None, :]].mean(axis=(1, 2))
        boots = np.where(cm > 0, pm / np.where(cm > 0, cm, 1), np.nan)
        boots = boots[np.isfinite(boots)]
        if len(boots):
            q = (1 - level) / 2 * 100
            out['ci'] = [float(np.percentile(boots, q)), float(np.percentile(boots, 100 - q))]
    return out


# ----------------------------------------------------------------------------------------- verdict
def classify(per_seed: Sequence[float], protects: float = PROTECTS, keeps: float = KEEPS) -> str:
    """'protects' (>= 2 seeds, all <= protects), 'unconfirmed' (one seed <= protects), 'split' (some seeds
    <= protects, some not), 'keeps' (all >= keeps) or 'partial'."""
    low = [r <= protects for r in per_seed]
    if per_seed and all(low):
        return 'protects' if len(per_seed) >= 2 else 'unconfirmed'
    if any(low):
        return 'split'
    return 'keeps' if all(r >= keeps for r in per_seed) else 'partial'


def verdict_line(exploiters: Sequence[dict], protects: float = PROTECTS, keeps: float = KEEPS) -> str:
    """The report's first line from [{'name', 'status', 'per_seed'}] (``classify``'s statuses), e.g. 'Protects
    against 5 of 7 exploiters (<= 0.3 of clean); not against: blur, 2d' or 'Does not protect: 7 of 7 exploiters keep
    >= 0.9 of clean Dice'; exploiters with one seed or disagreeing seeds are named as such."""
    n = len(exploiters)
    by = lambda status: [e for e in exploiters if e['status'] == status]  # noqa: E731
    fmt = lambda e: ' / '.join(f'{r:.2f}' for r in e['per_seed'])  # noqa: E731
    notes = []
    if by('unconfirmed'):
        notes.append('unconfirmed: 1 seed (' + ', '.join(f'{e["name"]} {fmt(e)}' for e in by('unconfirmed')) + ')')
    notes += [f'split: {e["name"]} seeds {fmt(e)}' for e in by('split')]
    if by('protects'):
        line = f'Protects against {len(by("protects"))} of {n} exploiters (<= {protects:g} of clean)'
        others = [e['name'] for e in exploiters if e['status'] in ('keeps', 'partial')]
        if others:
            line += '; not against: ' + ', '.join(others)
    else:
        line = f'Does not protect: {len(by("keeps"))} of {n} exploiters keep >= {keeps:g} of clean Dice'
        if by('partial'):
            notes.insert(0, 'partial: ' + ', '.join(f'{e["name"]} {fmt(e)}' for e in by('partial')))
    return '; '.join([line] + notes)


# ----------------------------------------------------------------------------------------- amplitude rule
def load_rule(path: Optional[str]) -> Optional[dict]:
    """The amplitude rule's fit (benchmarks/amplitude_rule.py: {'fit': {'x50', 's', ...}, 'victim'}), or None."""
    import json
    if not path or not os.path.isfile(path):
        return None
    data = json.load(open(path))
    return {'file': os.path.abspath(path), 'victim': data.get('victim'), 'x50': data['fit']['x50'],
            's': data['fit']['s']}


def rule_ratio(psnr_roi: float, x50: float, s: float) -> float:
    """The amplitude rule: stock victim Dice / clean = 1 / (1 + exp((x50 - x) / s)), x the code's ROI PSNR (dB)."""
    return 1.0 / (1.0 + math.exp((x50 - psnr_roi) / s))


# ----------------------------------------------------------------------------------------- report
def _f(x, d=2) -> str:
    return '–' if x is None or (isinstance(x, float) and not math.isfinite(x)) else f'{x:.{d}f}'


def _ci(b: Optional[dict]) -> str:
    if not b:
        return '–'
    return _f(b['ratio']) + (f' [{_f(b["ci"][0])}, {_f(b["ci"][1])}]' if b.get('ci') else '')


def markdown(report: dict) -> str:
    """report.md: the verdict line(s) first, then one table per protected copy."""
    s = report['settings']
    lines = [f'**{v}**' for v in report['verdict']] + ['', '# VoxShield audit', '',
             f'Panel `{s["panel"]["name"]}`: seeds {s["panel"]["seeds"]}, victim epochs '
             f'{s["panel"]["epochs"] or "trainer default"}, plans `{s["panel"]["plans"]}`; {s["n_test_cases"]} clean '
             f'test cases; thresholds: protects <= {s["protects"]:g}, keeps >= {s["keeps"]:g} of clean Dice. '
             'Ratios: victim Dice / clean victim Dice (same profile, same seeds), 95% bootstrap interval over test '
             'cases and seeds. A purification row\'s "cost" is its victim on purified clean data against the clean '
             'victim.', '']
    for copy in report['copies']:
        q, r, d = copy.get('quality') or {}, copy.get('rule') or {}, copy.get('detector')
        lines += [f'## {copy["name"]}', '', f'`{copy["dataset"]}`', '', copy['verdict'], '',
                  f'PSNR {_f(q.get("psnr"), 1)} dB (inside the labels {_f(q.get("psnr_roi"), 1)} dB), max budget use '
                  f'{_f(q.get("max_budget_use"))}' + (f', verify violations {q["violations"]}'
                                                       if q.get('violations') is not None else '') + '.']
        if r.get('predicted') is not None:
            lines.append(f'Amplitude rule (stock victim, x50 {r["x50"]:.1f} dB, s {r["s"]:.2f}): predicted '
                         f'{_f(r["predicted"])} at ROI PSNR {_f(r["psnr_roi"], 1)} dB, measured '
                         f'{_f(r.get("measured"))}.')
        if d is not None:
            lines.append(f'Residual-only detector: test Dice {_f(d.get("mean_dice"))} (clean data '
                         f'{_f(d.get("clean_mean_dice"))}).')
        labels = copy['labels']
        lines += ['', '| exploiter | trainer | config | Dice | clean Dice | Dice / clean [95% CI] | per seed | '
                  'verdict | cost of purification | ' + ' | '.join(f'{l} / clean' for l in labels) + ' |',
                  '|' + ' --- |' * (9 + len(labels))]
        for e in copy['exploiters']:
            if e.get('failed'):
                lines.append(f'| {e["name"]} | {e["trainer"]} | {e["configuration"]} | failed: {e["failed"]} |'
                             + ' |' * (5 + len(labels)))
                continue
            lines.append(f'| {e["name"]} | {e["trainer"]} | {e["configuration"]} | {_f(e["dice"], 3)} | '
                         f'{_f(e["clean_dice"], 3)} | {_ci(e["ratio"])} | '
                         f'{" / ".join(_f(x) for x in e["ratio"]["per_seed"])} | {e["status"]} | '
                         f'{_ci(e.get("cost"))} | ' + ' | '.join(_ci(e['per_label'].get(l)) for l in labels) + ' |')
    if report.get('failed'):
        lines += ['', '## Failed jobs', ''] + [f'- {f["name"]}: {f["error"]} (log: {f["log"]})'
                                                for f in report['failed']]
    lines += ['', '![Dice / clean per exploiter](bars.png)', '', '![the copy against the amplitude rule](frontier.png)']
    return '\n'.join(lines) + '\n'


def _finish(fig, ax, path: str) -> str:
    """Legend, tight layout, ``_save`` to ``path`` and close: the last steps every audit figure shares."""
    import matplotlib.pyplot as plt
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: str) -> None:
    """Save a figure atomically (temporary file next to ``path``, then rename)."""
    tmp = os.path.join(os.path.dirname(path), f'.tmp_{os.getpid()}_{os.path.basename(path)}')
    fig.savefig(tmp, dpi=110, format='png')
    os.replace(tmp, path)


def figures(report: dict, out_dir: str) -> List[str]:
    """bars.png (Dice / clean per exploiter and copy with intervals, the purification's cost beside it) and
    frontier.png (each copy's stock-victim ratio at its ROI PSNR on the amplitude rule's curve)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    s = report['settings']
    names = list(dict.fromkeys(e['name'] for c in report['copies'] for e in c['exploiters'] if not e.get('failed')))
    n_copies = max(len(report['copies']), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 3.6))
    width = 0.8 / (n_copies + 1)
    x = np.arange(len(names))
    for k, copy in enumerate(report['copies'] + [None]):
        entries = {} if copy else {e['name']: e['cost'] for c in report['copies'] for e in c['exploiters']
                                  if e.get('cost')}
        if copy:
            entries = {e['name']: e['ratio'] for e in copy['exploiters'] if not e.get('failed')}
        if not entries:
            continue
        xs = [x[names.index(n)] + (k - n_copies / 2) * width for n in entries]
        ys = [b['ratio'] for b in entries.values()]
        err = [[max(b['ratio'] - (b['ci'] or [b['ratio']] * 2)[0], 0) for b in entries.values()],
               [max((b['ci'] or [b['ratio']] * 2)[1] - b['ratio'], 0) for b in entries.values()]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=copy['name'] if copy else 'purification alone (clean)',
               color=None if copy else '0.75')
    ax.axhline(s['protects'], color='g', lw=0.8, ls=':')
    ax.axhline(s['keeps'], color='r', lw=0.8, ls=':')
    ax.set_xticks(x, names, rotation=30, ha='right', fontsize=8)
    ax.set_ylabel('victim Dice / clean')
    bars = _finish(fig, ax, os.path.join(out_dir, 'bars.png'))

    fig, ax = plt.subplots(figsize=(5, 3.6))
    rule = s.get('rule')
    pts = [(c['name'], c['rule']) for c in report['copies'] if (c.get('rule') or {}).get('psnr_roi') is not None]
    if rule:
        lo = min([rule['x50'] - 4 * rule['s']] + [r['psnr_roi'] - 3 for _, r in pts])
        hi = max([rule['x50'] + 6 * rule['s']] + [r['psnr_roi'] + 3 for _, r in pts])
        xx = np.linspace(lo, hi, 200)
        ax.plot(xx, [rule_ratio(v, rule['x50'], rule['s']) for v in xx], 'k-', lw=1, label='amplitude rule (stock)')
    for name, r in pts:
        if r.get('measured') is not None:
            ax.plot([r['psnr_roi']], [r['measured']], 'o', label=f'{name}: measured')
        if r.get('predicted') is not None:
            ax.plot([r['psnr_roi']], [r['predicted']], 'x', color='k')
    ax.axhline(s['protects'], color='g', lw=0.8, ls=':')
    ax.set_xlabel('PSNR of the copy inside the labels (dB)')
    ax.set_ylabel('stock victim Dice / clean')
    frontier = _finish(fig, ax, os.path.join(out_dir, 'frontier.png'))
    return [bars, frontier]


# ----------------------------------------------------------------------------------------- the report of an audit
def build_report(out: str, records: dict, panel: Panel, trainers: Dict[str, str], rows: Dict[str, str],
                 copies: List[str], victims: Dict[tuple, str], settings: dict, boot: int) -> dict:
    """The report dict: per copy its verdict line and per exploiter the seed-paired ratio with its interval, per
    label, the purification's cost, quality, detector and the amplitude rule."""
    from nnunetv2_voxshield.audit_jobs import _safe
    from nnunetv2_voxshield.defences import defence_key
    result = lambda name: records[name].result if name in records and records[name].state == 'done' else None  # noqa
    protects, keeps = settings['protects'], settings['keeps']

    def per_seed(row, profile, label=None):
        got = {}
        for s in panel.seeds:
            r = result(victims[(row, profile, s)])
            if r:
                got[s] = {c: (v['dice'] if label is None else v['labels'][label]) for c, v in r['cases'].items()}
        return got

    rule = settings.get('rule')
    det = result('detector') if 'detector' in records else None
    report_copies = []
    labels = []
    for copy in copies:
        exploiters = []
        for p in panel.profiles:
            row = copy if p.defence is None else f'{copy}+{defence_key(p.defence)}'
            prot, clean = per_seed(row, p.name), per_seed('clean', p.name)
            entry = {'name': p.name, 'trainer': trainers[p.name], 'configuration': p.configuration,
                     'plans': panel.plans_of(p), 'defence': p.defence}
            b = bootstrap_ratio(prot, clean, boot)
            if b is None:
                failed = [victims[(r, p.name, s)] for r in (row, 'clean') for s in panel.seeds
                          if not result(victims[(r, p.name, s)])]
                entry['failed'] = ', '.join(failed)
                exploiters.append(entry)
                continue
            first = result(victims[(row, p.name, b['seeds'][0])])
            labels = list(next(iter(first['cases'].values()))['labels'])
            entry.update(ratio=b, status=classify(b['per_seed'], protects, keeps),
                         seeds=b['seeds'], per_seed=b['per_seed'],
                         dice=sum(sum(v.values()) / len(v) for v in prot.values()) / len(prot),
                         clean_dice=sum(sum(v.values()) / len(v) for v in clean.values()) / len(clean),
                         per_label={l: bootstrap_ratio(per_seed(row, p.name, l), per_seed('clean', p.name, l), boot)
                                    for l in labels})
            if p.defence is not None:
                entry['cost'] = bootstrap_ratio(per_seed(f'clean+{defence_key(p.defence)}', p.name), clean, boot)
            exploiters.append(entry)
        done = [e for e in exploiters if not e.get('failed')]
        line = verdict_line(done, protects, keeps) if done else 'No verdict: every exploiter failed'
        if len(done) < len(exploiters):
            line += f'; failed: {", ".join(e["name"] for e in exploiters if e.get("failed"))}'
        q = result(f'quality_{_safe(copy)}') or {}
        stock = next((e for e in done if e['trainer'].startswith('nnUNetTrainer') and e['configuration'] ==
                      '3d_fullres' and not e['defence'] and e['name'] == 'stock'), None)
        copy_rule = None
        if rule and q.get('psnr_roi') is not None:
            copy_rule = {**rule, 'psnr_roi': q['psnr_roi'], 'predicted': rule_ratio(q['psnr_roi'], rule['x50'],
                                                                                      rule['s']),
                         'measured': stock['ratio']['ratio'] if stock else None}
        detector = None
        if det:
            detector = {'mean_dice': det[rows[copy]]['mean_dice'], 'clean_mean_dice': det[rows['clean']]['mean_dice']}
        report_copies.append({'name': copy, 'dataset': settings['protected'][copies.index(copy)],
                              'verdict': (f'{copy}: ' if len(copies) > 1 else '') + line, 'labels': labels,
                              'quality': q, 'rule': copy_rule, 'detector': detector, 'exploiters': exploiters})
    failed = [{'name': n, 'state': r.state, 'error': r.error, 'log': r.log} for n, r in records.items()
              if r.state != 'done']
    return {'verdict': [c['verdict'] for c in report_copies], 'settings': settings, 'copies': report_copies,
            'failed': failed}


def write_report(out: str, report: dict) -> List[str]:
    """Write report.json, report.md and the figures to ``out`` (each atomically); returns their paths."""
    from nnunetv2_voxshield.dataset_io import write_json_atomic
    from nnunetv2_voxshield.report import write_atomic
    write_json_atomic(report, os.path.join(out, 'report.json'))
    write_atomic(os.path.join(out, 'report.md'), markdown(report))
    return [os.path.join(out, 'report.json'), os.path.join(out, 'report.md')] + figures(report, out)
