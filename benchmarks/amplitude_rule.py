"""The amplitude rule, fitted: how much code a stock victim needs to lose its Dice (issue 13).

    python benchmarks/amplitude_rule.py -o benchmarks/out/map

Sessions 14 and 15 found that against the stock victim the loss from every fixed code that survives its augmentation
(a class-wise offset of either sign, axis or diagonal gratings of period 8) follows the code's amplitude, not its
band or sign. This fits that rule to the protection map's rows (``-o``/map.json, no training) and extrapolates it to
the product's goal: per-seed Dice / clean against the code's PSNR inside the labels (x, dB; where the code lives, so
codes of different support compare), with a logistic in dB,

    ratio(x) = 1 / (1 + exp((x50 - x) / s)),

least squares over the seeds' points (``--exclude`` leaves cells out, e.g. to repeat a fit made before they were
measured), and a bootstrap over the cells (``--boot`` resamples, each cell with all its seeds) for the 5th-95th
percentiles of x50, s and of the ROI PSNR at which the fit reaches ``--levels`` (default 0.3 and 0.05:
x_r = x50 + s ln(r / (1 - r))). For a code confined to the labels the whole-volume PSNR is its ROI PSNR plus
10 log10(1 / f) dB, f the labels' share of the volume: Hippocampus's share is read off the fitted rows (their mean
whole-volume minus ROI PSNR), and the table repeats each x_r for f = 1% and 0.1% (larger fields of view; the
victim's behaviour there is not measured). Rows of other codes (``--others``: the period-2 and period-4
checkerboards, the learned protectors) are listed with their residual against the fit, not fitted.

Other datasets (issue 29): ``--rows`` adds the rows of ACDC results files (benchmarks/acdc.py), voxshield_audit
reports or another dataset's map, in the map's format (``protection_map.rows_of``), and ``--victim`` names one profile
per dataset (e.g. ``stock ACDC:stock-2d-20ep``: ACDC's stock victim is the 20-epoch 2d one); the family is fitted
over all of them at once, and each dataset's RMSE against that one logistic and its own fit are reported beside it:

    python benchmarks/amplitude_rule.py --map benchmarks/results/protection_map_<date>.json \
        --rows benchmarks/results/acdc_<date>.json --victim stock ACDC:stock-2d-20ep \
        --family offset offset:sign=plus offset:sign=minus offset:sign=levels stripes:block=4 diagonal:block=4 \
        --others conv random checkerboard:sign=levels -o OUT

Prints a table, writes -o/amplitude_rule.{json,md} and the points with the fit, -o/amplitude_rule.png.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from nnunetv2_voxshield.dataset_io import write_json_atomic
from nnunetv2_voxshield.report import write_atomic

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from protection_map import rows_of  # noqa: E402  (map-format rows of a map, ACDC results or an audit report)

FAMILY = ('offset', 'offset:sign=plus', 'offset:sign=minus', 'stripes:block=4', 'diagonal:block=4')
OTHERS = ('checkerboard', 'checkerboard:block=2', 'VoxShield', 'VoxShield-EOT', 'VoxShield-LC')
LEVELS = (0.3, 0.05)
FRACTIONS = (0.01, 0.001)


def logistic(x, x50: float, s: float):
    return 1.0 / (1.0 + np.exp((x50 - np.asarray(x, dtype=float)) / s))


def fit_logistic(x, y, start=None) -> tuple:
    """Least-squares (x50, s) of ``logistic`` to the points (x, y), s > 0: Nelder-Mead from ``start`` (x50, s), or from
    the best of a coarse grid."""
    from scipy.optimize import minimize
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f'the fit needs points at two PSNRs at least (got {len(x)} at {sorted(set(x.tolist()))})')
    sse = lambda p: float(np.sum((logistic(x, p[0], math.exp(p[1])) - y) ** 2))  # noqa: E731
    if start is None:
        grid = [(a, b) for a in np.linspace(x.min() - 20, x.max() + 20, 81) for b in np.log(np.linspace(0.5, 20, 40))]
        start = min(grid, key=sse)
    else:
        start = (start[0], math.log(start[1]))
    best = minimize(sse, start, method='Nelder-Mead', options={'xatol': 1e-6, 'fatol': 1e-10, 'maxiter': 4000})
    return float(best.x[0]), float(math.exp(best.x[1]))


def level_psnr(x50: float, s: float, level: float) -> float:
    """The x at which ``logistic`` equals ``level``."""
    return x50 + s * math.log(level / (1.0 - level))


def points(rows: list, victim, methods, exclude=()) -> list:
    """The rows of ``victim`` whose method is in ``methods``, whose cell is not in ``exclude`` and that have a ROI PSNR
    and a whole-volume one. ``victim``: a profile name or several, each 'PROFILE' (any dataset not named otherwise)
    or 'DATASET:PROFILE' (that dataset's rows only: e.g. 'ACDC:stock-2d-20ep')."""
    named, plain = {}, set()
    for v in ([victim] if isinstance(victim, str) else victim):
        dataset, _, profile = v.rpartition(':')
        (named.setdefault(dataset, set()).add(profile) if dataset else plain.add(profile))
    return [r for r in rows if r['victim'] in named.get(r.get('dataset', 'Hippocampus'), plain)
            and r['method'] in methods and r['cell'] not in exclude
            and r.get('psnr_roi') is not None and r.get('psnr') is not None]


def fit_rows(cells: list, levels=LEVELS, boot: int = 1000, seed: int = 0) -> dict:
    """The fit over the cells' per-seed points and its bootstrap over cells."""
    def xy(cs):
        pts = [(c['psnr_roi'], r) for c in cs for r in c['ratio_per_seed']]
        return [p[0] for p in pts], [p[1] for p in pts]
    x, y = xy(cells)
    x50, s = fit_logistic(x, y)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(int(boot)):
        pick = [cells[i] for i in rng.integers(0, len(cells), len(cells))]
        try:
            draws.append(fit_logistic(*xy(pick), start=(x50, s)))
        except ValueError:  # every pick at one PSNR
            continue
    band = lambda v: [float(np.percentile(v, 5)), float(np.percentile(v, 95))] if v else None  # noqa: E731
    out = {'x50': x50, 's': s, 'x50_ci': band([d[0] for d in draws]), 's_ci': band([d[1] for d in draws]),
           'boot': len(draws), 'levels': {}}
    for level in levels:
        out['levels'][str(level)] = {'psnr_roi': level_psnr(x50, s, level),
                                     'psnr_roi_ci': band([level_psnr(a, b, level) for a, b in draws])}
    out['rmse'] = float(np.sqrt(np.mean((logistic(x, x50, s) - np.asarray(y)) ** 2)))
    out['points'] = len(x)
    return out


def analyse(rows: list, victim, family, others, levels=LEVELS, boot: int = 1000, exclude=()) -> dict:
    """The fit over the victim's family rows, each level's PSNR inside the labels and over the whole volume (at each
    dataset's label share and at ``FRACTIONS``), the fitted rows and the other codes' residuals. Rows from several
    datasets (``dataset``; Hippocampus where a row names none) are fitted together; ``datasets`` then holds, per
    dataset, its points' RMSE against the joint fit and its own fit where it has points at two PSNRs."""
    cells = points(rows, victim, set(family), set(exclude))
    fit = fit_rows(cells, levels, boot)
    name = lambda c: c.get('dataset', 'Hippocampus')  # noqa: E731
    names = sorted({name(c) for c in cells}, key=lambda d: (d != 'Hippocampus', d))
    shifts = {d: float(np.mean([c['psnr'] - c['psnr_roi'] for c in cells if name(c) == d])) for d in names}
    shift = shifts.get('Hippocampus', next(iter(shifts.values())))
    for level in fit['levels'].values():
        roi = level['psnr_roi']
        level['psnr_whole'] = {**{d.lower(): roi + shifts[d] for d in names},
                               **{str(f): roi + 10 * math.log10(1 / f) for f in FRACTIONS}}
    model = lambda x: float(logistic(x, fit['x50'], fit['s']))  # noqa: E731
    fitted = [{'dataset': name(c), 'victim': c['victim'], 'cell': c['cell'], 'seeds': c['seeds'], 'psnr': c['psnr'],
               'psnr_roi': c['psnr_roi'], 'ratio_per_seed': c['ratio_per_seed'], 'fit': model(c['psnr_roi'])}
              for c in sorted(cells, key=lambda c: (names.index(name(c)), -c['psnr_roi']))]
    listed = [{'dataset': name(c), 'victim': c['victim'], 'cell': c['cell'], 'seeds': c['seeds'],
               'psnr_roi': c['psnr_roi'], 'ratio': c['ratio'], 'ratio_per_seed': c['ratio_per_seed'],
               'residual': c['ratio'] - model(c['psnr_roi'])}
              for c in sorted(points(rows, victim, set(others), set(exclude)),
                              key=lambda c: (name(c) != 'Hippocampus', name(c), c['method'], -c['psnr_roi']))]
    result = {'victim': victim if isinstance(victim, str) else list(victim), 'family': list(family),
              'excluded': sorted(exclude), 'fit': fit, 'label_fraction': 10 ** (-shift / 10),
              'whole_minus_roi_db': shift, 'rows': fitted, 'others': listed}
    if len(names) > 1:
        result['datasets'] = {d: dataset_fit(fitted, d, fit, shifts[d]) for d in names}
    return result


def dataset_fit(fitted: list, dataset: str, fit: dict, shift: float) -> dict:
    """One dataset's points: their RMSE against the joint fit, its label share and, with points at two PSNRs, its own
    fit."""
    pts = [(r['psnr_roi'], v) for r in fitted if r['dataset'] == dataset for v in r['ratio_per_seed']]
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    out = {'points': len(pts), 'cells': sum(r['dataset'] == dataset for r in fitted),
           'rmse_joint': float(np.sqrt(np.mean((logistic(x, fit['x50'], fit['s']) - y) ** 2))),
           'label_fraction': 10 ** (-shift / 10), 'whole_minus_roi_db': shift}
    if len(set(x.tolist())) >= 2:
        x50, s = fit_logistic(x, y)
        out['own_fit'] = {'x50': x50, 's': s, 'rmse': float(np.sqrt(np.mean((logistic(x, x50, s) - y) ** 2)))}
    return out


def render(result: dict) -> str:
    """The markdown the CLI prints and writes (with a dataset and a victim column when the fit spans datasets)."""
    fit, shift, multi = result['fit'], result['whole_minus_roi_db'], 'datasets' in result
    seeds = lambda r: ','.join(map(str, r['seeds']))  # noqa: E731
    band = lambda ci, f='{:.1f}': '–' if ci is None else f'{f.format(ci[0])}-{f.format(ci[1])}'  # noqa: E731
    victim = result['victim'] if isinstance(result['victim'], str) else ' / '.join(result['victim'])
    lines = [f'Victim {victim}: Dice / clean = 1 / (1 + exp((x50 - x) / s)), x = the code\'s PSNR in the '
             f'labels; {fit["points"]} points from {len(result["rows"])} cells ({", ".join(result["family"])}); '
             f'RMSE {fit["rmse"]:.3f}.' + (f' Left out: {", ".join(result["excluded"])}.' if result['excluded']
                                           else ''),
             f'x50 = {fit["x50"]:.1f} dB (5-95%: {band(fit["x50_ci"])}), s = {fit["s"]:.2f} dB '
             f'({band(fit["s_ci"], "{:.2f}")}); {fit["boot"]} bootstrap fits over cells.']
    if multi:
        for d, v in result['datasets'].items():
            own = v.get('own_fit')
            lines.append(f'{d}: {v["points"]} points from {v["cells"]} cells, RMSE against this fit '
                         f'{v["rmse_joint"]:.3f}' + (f'; its own fit x50 {own["x50"]:.1f} dB, s {own["s"]:.2f} dB, '
                                                      f'RMSE {own["rmse"]:.3f}' if own else '') +
                         f'; the labels are {100 * v["label_fraction"]:.1f}% of the volume (whole-volume PSNR = ROI + '
                         f'{v["whole_minus_roi_db"]:.1f} dB).')
    else:
        lines.append(f'Hippocampus: the labels are {100 * result["label_fraction"]:.1f}% of the volume (whole-volume '
                     f'PSNR = ROI + {shift:.1f} dB).')
    whole_keys = [k for k in next(iter(fit['levels'].values()))['psnr_whole'] if k not in map(str, FRACTIONS)]
    title = lambda k: 'ACDC' if k == 'acdc' else k.capitalize()  # noqa: E731
    lines += ['', '| Dice / clean | ROI PSNR (dB) | ' + ''.join(f'whole volume, {title(k)} (dB) | ' for k in whole_keys)
              + 'whole volume, labels 1% (dB) | whole volume, labels 0.1% (dB) |',
              '| --- | --- | ' + '--- | ' * len(whole_keys) + '--- | --- |']
    for level, v in fit['levels'].items():
        whole = v['psnr_whole']
        lines.append(f'| {level} | {v["psnr_roi"]:.1f} ({band(v["psnr_roi_ci"])}) | '
                     + ''.join(f'{whole[k]:.1f} | ' for k in whole_keys) + f'{whole["0.01"]:.1f} | '
                     f'{whole["0.001"]:.1f} |')
    where = lambda r: f'{r["dataset"]} | {r["victim"]} | ' if multi else ''  # noqa: E731
    head = '| dataset | victim ' if multi else ''
    lines += ['', f'{head}| cell | seeds | ROI PSNR (dB) | PSNR (dB) | Dice / clean per seed | fit |',
              '| --- ' * (6 + 2 * multi) + '|']
    lines += [f'| {where(r)}{r["cell"]} | {seeds(r)} | {r["psnr_roi"]:.1f} | {r["psnr"]:.1f} | '
              f'{" / ".join(f"{v:.2f}" for v in r["ratio_per_seed"])} | {r["fit"]:.2f} |' for r in result['rows']]
    if result['others']:
        lines += ['', 'Not fitted (other codes):', '',
                  f'{head}| cell | seeds | ROI PSNR (dB) | Dice / clean | minus the fit |', '| --- ' * (5 + 2 * multi)
                  + '|']
        lines += [f'| {where(r)}{r["cell"]} | {seeds(r)} | {r["psnr_roi"]:.1f} | {r["ratio"]:.2f} | '
                  f'{r["residual"]:+.2f} |' for r in result['others']]
    return '\n'.join(lines)


def figure(result: dict, png: Path) -> None:
    """Per-seed points of the fitted cells, the other codes' mean ratios, the fit and the goal's lines."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fit, shift, others = result['fit'], result['whole_minus_roi_db'], result['others']
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [r['psnr_roi'] for r in result['rows'] for _ in r['ratio_per_seed']]
    ax.plot(x, [v for r in result['rows'] for v in r['ratio_per_seed']], 'o', color='tab:blue', ms=4,
            label='fitted codes (per seed)')
    for method in sorted({r['cell'].split('@')[0] for r in others}):
        pts = sorted((r['psnr_roi'], r['ratio']) for r in others if r['cell'].split('@')[0] == method)
        ax.plot(*zip(*pts), 'x--', ms=5, lw=0.8, label=method)
    grid = np.linspace(5, 50, 200)
    ax.plot(grid, logistic(grid, fit['x50'], fit['s']), 'k-', lw=1,
            label=f'fit: x50 {fit["x50"]:.1f} dB, s {fit["s"]:.2f} dB')
    ax.axhline(0.05, color='k', lw=0.8, ls=':')
    ax.axvline(50 - shift, color='tab:red', lw=0.8, ls=':',
               label=f'50 dB whole volume (Hippocampus: ROI {50 - shift:.1f} dB)')
    ax.set_xlabel("the code's PSNR inside the labels (dB)")
    ax.set_ylabel('victim Dice / clean victim Dice')
    ax.legend(fontsize=6.5, loc='lower right')
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0] + ' Fits Dice / clean against the code\'s ROI '
                                'PSNR over the protection map\'s rows and extrapolates to the goal.')
    p.add_argument('-o', '--out', type=Path, required=True, help='the protection map folder (its map.json); the '
                   'fit is written here')
    p.add_argument('--map', type=Path, default=None, help='the protection map to read instead of -o/map.json (e.g. '
                   'a committed benchmarks/results/protection_map_<date>.json)')
    p.add_argument('--rows', nargs='*', type=Path, default=[], metavar='FILE',
                   help="more rows: ACDC results files of benchmarks/acdc.py, voxshield_audit reports (their "
                        "predictions files are read beside them) or other datasets' maps; fitted together")
    p.add_argument('--victim', nargs='+', default=['stock'], help="victim profiles of the rows: PROFILE for every "
                   "dataset not named otherwise, DATASET:PROFILE for one (default: stock; e.g. stock "
                   "ACDC:stock-2d-20ep)")
    p.add_argument('--family', nargs='+', default=list(FAMILY), help='methods fitted (default: %(default)s)')
    p.add_argument('--others', nargs='*', default=list(OTHERS), help='methods listed with their residual')
    p.add_argument('--exclude', nargs='*', default=[], metavar='CELL',
                   help='cells left out (e.g. offset@128/255: the fit before that cell was measured)')
    p.add_argument('--levels', nargs='+', type=float, default=list(LEVELS))
    p.add_argument('--boot', type=int, default=1000)
    a = p.parse_args()
    path = a.map or a.out / 'map.json'
    rows = []
    for source in [path] + a.rows:
        try:
            rows += rows_of(json.loads(source.read_text()), source.parent)
        except (OSError, ValueError) as e:
            sys.exit(f'{source}: cannot read ' + ('the protection map' if source == path else 'its rows') + f' ({e})')
    if any(not 0 < level < 1 for level in a.levels):
        sys.exit(f'--levels: each must lie in (0, 1) (got {a.levels})')
    if a.boot < 0:
        sys.exit(f'--boot: a number of bootstrap fits >= 0 (got {a.boot})')
    try:
        result = analyse(rows, a.victim[0] if len(a.victim) == 1 else a.victim, a.family, a.others, a.levels, a.boot,
                         a.exclude)
    except ValueError as e:
        sys.exit(f'{path}: {" / ".join(a.victim)} rows of {", ".join(a.family)}: {e}')
    a.out.mkdir(parents=True, exist_ok=True)
    text = render(result)
    print(text)
    write_json_atomic(result, str(a.out / 'amplitude_rule.json'))
    write_atomic(str(a.out / 'amplitude_rule.md'), text + '\n')
    figure(result, a.out / 'amplitude_rule.png')


if __name__ == '__main__':
    main()
