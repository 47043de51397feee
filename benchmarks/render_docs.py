"""Render docs/results.md, the numbers in README.md and docs/*.md, and docs/figures/ from benchmarks/results/*.json.

    python benchmarks/render_docs.py                 # write docs/results.md, the marked blocks, docs/figures/*.png
    python benchmarks/render_docs.py --no-figures    # text only (what tests/test_docs.py compares)
    python benchmarks/render_docs.py --check         # write nothing; exit 1 naming each file that differs

Every number a reader sees in the docs comes from here. Two registries hold what is rendered:

- ``BLOCKS``: name -> function(results) returning markdown, or None when its JSON does not exist yet. A file in
  ``MARKED`` (README.md, docs/*.md) holds ``<!-- results:NAME -->`` ... ``<!-- /results -->``; everything between the
  markers is replaced by the block's text (a missing block renders as "not measured yet").
- ``SECTIONS``: the ordered (title, block name) list that makes docs/results.md. ``@section('Title')`` registers a
  function in both; ``@block`` only in ``BLOCKS`` (for text used in README or a docs page).
- ``FIGURES``: name -> function(results, png path), drawn into docs/figures/ unless ``--no-figures``.

To add a dataset's results (e.g. ACDC), write ``@section('ACDC: ...') def acdc_...(r): data = r.get('acdc_*.json')``
returning None while the file is missing; it lands in results.md in registration order (move its entry in
``SECTIONS`` to reorder). A protection map of another dataset reuses the map helpers with its file pattern:
``r.map_rows('protection_map_acdc_*.json')``, ``r.row(victim, cell, pattern)``, ``frontier_points(..., pattern)`` and,
in a ``@figure`` function, ``draw_frontier(r, png, pattern, 'ACDC')``. Every results JSON must carry ``provenance``
{command, commit, date, machine}; ``--check`` and the test fail on one that does not. Results JSONs are read from the
working tree: after committing one, run this script and commit the docs it changes.
"""
import argparse
import glob
import json
import math
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / 'results'
DOCS = ROOT / 'docs'
FIGURES_DIR = DOCS / 'figures'
MARKED = ('README.md', 'docs/method.md', 'docs/evaluation.md', 'docs/findings.md')
PROVENANCE_KEYS = ('command', 'commit', 'date', 'machine')
HIPPOCAMPUS_MAP = 'protection_map_20*.json'  # the Hippocampus protection map (Results.map_rows' default)
MARK = re.compile(r'(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results -->)', re.S)

BLOCKS: dict = {}
SECTIONS: list = []
FIGURES: dict = {}

sys.path.insert(0, str(HERE))


def block(fn: Callable) -> Callable:
    """Register ``fn(results) -> markdown | None`` under its name (usable as <!-- results:NAME --> in a doc)."""
    BLOCKS[fn.__name__] = fn
    return fn


def section(title: str) -> Callable:
    """Register a block that is also a section of docs/results.md, in registration order."""
    def wrap(fn):
        block(fn)
        SECTIONS.append((title, fn.__name__))
        return fn
    return wrap


def figure(fn: Callable) -> Callable:
    """Register ``fn(results, png)`` drawing docs/figures/<name>.png."""
    FIGURES[fn.__name__] = fn
    return fn


class Results:
    """The committed results, loaded lazily by file name or glob (the newest match by name)."""

    def __init__(self, folder: Path = RESULTS):
        self.folder, self._cache = Path(folder), {}

    def get(self, pattern: str) -> Optional[dict]:
        """The newest file matching ``pattern`` (by name), parsed; None if there is none."""
        matches = sorted(glob.glob(str(self.folder / pattern)))
        if not matches:
            return None
        if matches[-1] not in self._cache:
            self._cache[matches[-1]] = json.loads(Path(matches[-1]).read_text())
        return self._cache[matches[-1]]

    def name(self, pattern: str) -> Optional[str]:
        """The file name ``get`` would read."""
        matches = sorted(glob.glob(str(self.folder / pattern)))
        return Path(matches[-1]).name if matches else None

    def map_rows(self, pattern: str = HIPPOCAMPUS_MAP) -> Optional[list]:
        """A protection map's rows (benchmarks/protection_map.py's own aggregation), or None; ``pattern`` names
        another dataset's map file (e.g. 'protection_map_acdc_*.json')."""
        if ('map_rows', pattern) not in self._cache:
            data = self.get(pattern)
            if data is None:
                return None
            from protection_map import map_rows
            self._cache[('map_rows', pattern)] = map_rows(data)
        return self._cache[('map_rows', pattern)]

    def row(self, victim: str, cell: str, pattern: str = HIPPOCAMPUS_MAP) -> Optional[dict]:
        """The map row of (victim profile, cell name), or None."""
        return next((r for r in self.map_rows(pattern) or [] if r['victim'] == victim and r['cell'] == cell), None)


def missing_provenance(folder: Path = RESULTS) -> list:
    """Result files without a complete ``provenance`` {command, commit, date, machine}."""
    bad = []
    for f in sorted(Path(folder).glob('*.json')):
        p = json.loads(f.read_text()).get('provenance')
        if not isinstance(p, dict) or any(not p.get(k) for k in PROVENANCE_KEYS):
            bad.append(f.name)
    return bad


# --------------------------------------------------------------------------------------------------------- helpers
def f2(x) -> str:
    """Two decimals, or an en dash for a missing value."""
    return '–' if x is None else f'{x:.2f}'


def f1(x) -> str:
    """One decimal, or an en dash for a missing value."""
    return '–' if x is None else f'{x:.1f}'


def purified_cells(acdc: Optional[dict]) -> list:
    """The purified (``+defence``) cells of an ACDC results file, over its configurations."""
    return [c for v in ((acdc or {}).get('configurations') or {}).values() for c in v['cells'] if c.get('defence')]


def opt_small(v: Optional[float]) -> str:
    """``small`` or '–' for a value not measured."""
    return '–' if v is None else small(v)


def small(v: float) -> str:
    """Two decimals, three below 0.1 (where protection is decided)."""
    return f'{v:.3f}' if abs(v) < 0.1 else f'{v:.2f}'


def seeds_text(r: dict) -> str:
    """The per-seed Dice / clean of a map row, '0.31 / 0.23'."""
    return ' / '.join(small(v) for v in r['ratio_per_seed'])


def ratio_text(r: dict) -> str:
    """'0.27 (seeds 0.31 / 0.23)' or '0.83' for one seed."""
    return small(r['ratio']) + (f' (seeds {seeds_text(r)})' if len(r['ratio_per_seed']) > 1 else ' (1 seed)')


def eps_value(eps: str) -> float:
    """'16/255' -> 0.0627."""
    return float(Fraction(eps))


def spoken(items: list) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return ' and '.join([', '.join(items[:-1])] * (len(items) > 1) + items[-1:])


def table(header: list, rows: list) -> str:
    """A markdown table."""
    return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
                     + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


FAMILIES = (  # (family, predicate on the map's method name), first match wins; ':clean=' mixes are not a family
    ('VoxShield-LC', lambda m: m.startswith('VoxShield-LC')),
    ('VoxShield-EOT', lambda m: m.startswith('VoxShield-EOT')),
    ('VoxShield', lambda m: m == 'VoxShield'),
    ('offset', lambda m: m.startswith('offset')),
    ('checkerboard', lambda m: m.startswith('checkerboard')),
    ('gratings', lambda m: m.startswith(('stripes', 'diagonal'))),
    ('smooth', lambda m: m.startswith('smooth')),
    ('random', lambda m: m.startswith('random')),
    ('boundary', lambda m: m.startswith(('grow', 'edge', 'shrink'))),
)
TRAINED = ('VoxShield', 'VoxShield-EOT', 'VoxShield-LC')
PURIFICATIONS = ('blur', 'zmedian', 'zresample', 'quantise')
PURIFICATION_NAMES = {'blur': 'a Gaussian blur', 'zmedian': 'a 3-slice z-median', 'zresample': 'z-resampling',
                      'quantise': '8-bit quantisation'}
PANELS = (  # frontier panels: (title, victim, purification or None)
    ('stock 3d_fullres', 'stock', None), ('no augmentation (paper)', 'noda', None), ('stock 2d', 'stock-2d', None),
    ('ResEnc M', 'stock-ResEncM_cpu', None), ('label-aware', 'labelaware', None),
    ('blur, then stock / noDA', None, 'blur'),
    ('z-median, then ...', None, 'zmedian'), ('z-resampling, then ...', None, 'zresample'),
    ('8-bit quantisation, then ...', None, 'quantise'))


def family(method: str) -> Optional[str]:
    """The method family of a map method name ('offset:sign=plus+blur' -> 'offset'); None for clean-share mixes."""
    base = method.split('+')[0]
    if ':clean=' in base:
        return None
    return next((name for name, test in FAMILIES if test(base)), None)


def cell_psnr(r: Results, pattern: str = HIPPOCAMPUS_MAP) -> dict:
    """Whole-volume PSNR of each protected copy (the unpurified cell), for placing purified rows by protection cost."""
    return {row['cell']: row['psnr'] for row in r.map_rows(pattern) or [] if '+' not in row['method'] and row['psnr']}


def frontier_points(r: Results, victim: Optional[str], purification: Optional[str],
                    pattern: str = HIPPOCAMPUS_MAP) -> dict:
    """{family: [(psnr, ratio, lo, hi, cell, victim)]}: per family and budget the row with the lowest mean ratio."""
    psnr = cell_psnr(r, pattern)
    best = {}
    for row in r.map_rows(pattern) or []:
        fam = family(row['method'])
        if fam is None:
            continue
        purified = '+' in row['method']
        if purification is None and (purified or row['victim'] != victim):
            continue
        if purification is not None and (not purified or row['method'].split('+')[1] != purification
                                         or row['victim'] not in ('stock', 'noda')):
            continue
        base_cell = row['method'].split('+')[0] + '@' + row['eps']
        x = psnr.get(base_cell) if purified else row['psnr']
        if x is None:
            continue
        key = (fam, row['eps'], row['victim'])
        if key not in best or row['ratio'] < best[key][1]:
            best[key] = (x, row['ratio'], min(row['ratio_per_seed']), max(row['ratio_per_seed']), row['cell'],
                         row['victim'])
    out = {}
    for (fam, _, _), p in best.items():
        out.setdefault(fam, []).append(p)
    return {k: sorted(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------ sections
def audit_reports(r: Results) -> list:
    """Every committed voxshield_audit report (audit_<name>_<date>.json, not the engine's audit_engine_*.json), oldest
    name first, as (file name, report)."""
    return [(f.name, json.loads(f.read_text())) for f in sorted(r.folder.glob('audit_*.json'))
            if not f.name.startswith('audit_engine')]


def audit_report(r: Results) -> Optional[dict]:
    """The committed audit reports as one: their verdict lines and copies in file order, the first one's settings
    (thresholds and rule; None without any report)."""
    reports = [data for _, data in audit_reports(r)]
    if not reports:
        return None
    return {'verdict': [v for d in reports for v in d.get('verdict') or []],
            'settings': reports[0].get('settings') or {}, 'copies': [c for d in reports for c in d.get('copies') or []]}


def cell_name(cell: str) -> str:
    """A short name of an ACDC cell: 'offset 40/255', 'conv s=1.12', 'random 60/255'."""
    method, _, eps = cell.partition('@')
    base, _, option = method.partition(':')
    if base == 'conv':
        return f'conv s={option.split("=")[-1]}'
    return f'{base} {eps}' if eps else cell


def acdc_measured(r: Results) -> list:
    """ACDC results files that hold measurements (acdc_*.json other than predictions written before the runs)."""
    return [f for f in sorted(r.folder.glob('acdc_*.json')) if 'prediction' not in f.name]


@section('Status')
def status(r: Results) -> Optional[str]:
    """The five lines at the top of the README."""
    rows, rule = r.map_rows(), r.get('amplitude_rule_20*.json')
    if rows is None or rule is None:
        return None
    stock_trained = [x for x in rows if x['victim'] == 'stock' and family(x['method']) in TRAINED
                     and '+' not in x['method'] and eps_value(x['eps']) <= 16 / 255 and x['method'] in TRAINED]
    low = min(stock_trained, key=lambda x: x['ratio'])
    at64 = [x for x in rows if x['victim'] == 'stock' and x['method'] in TRAINED and x['eps'] == '64/255']
    rnd64 = r.row('stock', 'random@64/255')
    cb16 = r.row('noda', 'checkerboard@16/255')
    purified = [r.row('noda', f'checkerboard+{p}@16/255') for p in PURIFICATIONS]
    undone = [p for p, x in zip(PURIFICATIONS, purified) if x and x['ratio'] > 0.5]
    kept = [p for p, x in zip(PURIFICATIONS, purified) if x and x['ratio'] <= 0.5]
    lvl = rule['fit']['levels']['0.05']
    o128 = r.row('stock', 'offset@128/255')
    acdc = r.get('acdc_20*.json')
    datasets = ['Hippocampus (MSD Task04, 208 MRI crops)'] + (['ACDC (cine MRI, 3 classes, thick slices)'] if acdc
                                                              else [])
    pending = '; ACDC: runs under way, not yet in these results' if acdc is None else ''
    if acdc:
        config = acdc['refit'].get('config') or '3d_fullres'
        v = acdc['configurations'][config]
        seeds = lambda c: f'{len(c["seeds"])} seed{"s" if len(c["seeds"]) > 1 else ""}'  # noqa: E731
        cells = [f'{cell_name(c["cell"])} at {c["psnr_roi"]:.1f} dB {small(c["ratio"])} '
                 f'({seeds(c)}; predicted {small(c["predicted_ratio"])})' for c in v['cells'] if not c.get('defence')]
        clean = ' / '.join(f2(c['dice']) for c in v['clean'].values())
        pending = (f'. On ACDC, against a {config} victim (clean Dice {clean} by seed), measured Dice / clean at each '
                   f'copy\'s ROI PSNR beside the rule\'s prediction written before the run: {"; ".join(cells)}')
    from protection_map import rows_of
    em = [x for _, d in audit_reports(r) + ([('acdc', acdc)] if acdc else []) for x in rows_of(d, r.folder)
          if x['method'].startswith('EM-samplewise')]
    def em_sentence(em: list) -> str:
        parts = []
        for dataset in sorted({x['dataset'] for x in em}, key=lambda d: d != 'Hippocampus'):
            rows = [x for x in em if x['dataset'] == dataset]
            per_victim = []
            for victim in sorted({x['victim'] for x in rows}):
                ratios = [x['ratio'] for x in rows if x['victim'] == victim]
                lo, hi = small(min(ratios)), small(max(ratios))
                per_victim.append(f'{lo if lo == hi else f"{lo}-{hi}"} against {victim} ({len(ratios)} '
                                  f'cell{"s" if len(ratios) > 1 else ""})')
            budgets = sorted({x['eps'] for x in rows}, key=Fraction)
            seeds = sorted({len(x['seeds']) for x in rows})
            parts.append(f'on {dataset} at {spoken(budgets)} it keeps ' + ' and '.join(per_victim) + ' of clean, '
                         f'{"-".join(map(str, sorted({seeds[0], seeds[-1]})))} seeds each')
        return '; '.join(parts)
    stock_em = [x for x in em if x['victim'].startswith('stock')]
    noda_em = [x for x in em if not x['victim'].startswith('stock')]
    em_text = (' Sample-wise error-minimising noise (Huang et al.; short CPU protectors, see the findings): '
               + em_sentence(stock_em) + '.') if stock_em else ''
    noda_em_text = ('. Sample-wise error-minimising noise: ' + em_sentence(noda_em)) if noda_em else ''
    em_undone = [c['cell'].split('@')[1].split('+') for c in purified_cells(acdc)
                 if c['cell'].startswith('EM-samplewise') and c['ratio'] >= 0.9]
    for defence in sorted({d for _, d in em_undone}):
        budgets = sorted({eps for eps, d in em_undone if d == defence}, key=Fraction)
        noda_em_text += f'; on ACDC a {defence} undoes the {spoken(budgets)} cop{"ies" if len(budgets) > 1 else "y"}'
    acdc_cb = next((c for c in ((acdc or {}).get('configurations', {}).get('2d nnUNetTrainerNoDA_20epochs') or {})
                    .get('cells', []) if c['cell'].startswith('checkerboard') and not c.get('defence')), None)
    acdc_cb_text = (f'; on ACDC the same class-coded checkerboard protects the 20-epoch no-augmentation 2d victim: '
                    f'{ratio_text(acdc_cb)} of clean' if acdc_cb else '')
    purified = [c for c in ((acdc or {}).get('configurations', {}).get('2d nnUNetTrainerNoDA_20epochs') or {})
                .get('cells', []) if c['cell'].startswith(f'{(acdc_cb or {}).get("cell")}+')]
    if acdc_cb and purified:
        def verdict(c: dict) -> str:
            return 'undoes it' if c['ratio'] >= 0.9 else 'does not' if c['ratio'] <= 0.3 else 'partly undoes it'
        def order(c: dict) -> int:
            return PURIFICATIONS.index(c['defence']) if c['defence'] in PURIFICATIONS else len(PURIFICATIONS)
        acdc_cb_text += ' (' + ', '.join(f'{c["defence"]} {verdict(c)}: {ratio_text(c)} of the purified clean victim'
                                         for c in sorted(purified, key=order)) + ')'

    return '\n'.join([
        f'- **Against stock nnU-Net, nothing protects at a usable budget.** Up to 16/255 every trained method '
        f'(VoxShield, -EOT, -LC) keeps >= {math.floor(low["ratio"] * 100) / 100:.2f} of the clean victim\'s Dice '
        f'({len(stock_trained)} cells, 1-2 seeds each).' + em_text,
        f'- At 64/255 they cost a stock victim what uniform noise costs: '
        f'{min(x["ratio"] for x in at64):.2f}-{max(x["ratio"] for x in at64):.2f} of clean, noise '
        f'{rnd64["ratio"]:.2f}.',
        f'- **Against the paper\'s victim (no augmentation)** a fixed checkerboard in the labels at 16/255 '
        f'({cb16["psnr"]:.1f} dB) protects: {ratio_text(cb16)} of clean; '
        f'{", ".join(PURIFICATION_NAMES[p] for p in undone) or "no purification"} undo it, '
        f'{", ".join(PURIFICATION_NAMES[p] for p in kept) or "none"} does not{acdc_cb_text}{noda_em_text}.',
        f'- **The amplitude rule:** against stock, a code\'s effect follows its amplitude in the labels; 0.05 of clean '
        f'needs {lvl["psnr_whole"]["hippocampus"]:.1f} dB over the whole volume (50 dB is the goal); measured '
        f'{o128["ratio"]:.3f} at {o128["psnr"]:.1f} dB, where the labels are plain to see.',
        f'- Measured on {", ".join(datasets)}{pending}.'])


@section('Frontier: the best code per family and budget, per exploiter')
def frontier(r: Results) -> Optional[str]:
    """The frontier figure and its table: the best row per family and budget, per exploiter panel."""
    if r.map_rows() is None:
        return None
    lines = ['![frontier](figures/frontier.png)', '',
             'Victim Dice / clean of the best row per method family and budget (lowest mean over seeds; bars in the '
             'figure: lowest to highest seed). Purified panels place each row at the PSNR of the copy before '
             'purification (the protection\'s cost). Dotted lines: the goal (<= 0.05 of clean at >= 50 dB). The '
             'stock panel carries the amplitude rule\'s curve (ROI fit shifted by Hippocampus\'s whole - ROI '
             'PSNR).', '']
    body = []
    for title, victim, purification in PANELS:
        for fam, pts in sorted(frontier_points(r, victim, purification).items()):
            for x, y, lo, hi, cell, vic in pts:
                body.append([title, fam, cell if purification is None else f'{vic}: {cell}', f1(x), f2(y),
                             f'{lo:.2f}-{hi:.2f}' if hi > lo else '–'])
    head = ['exploiter', 'family', 'best cell', 'PSNR (dB)', 'Dice / clean', 'seed range']
    return '\n'.join(lines) + '\n' + table(head, body)


@section('Trained methods against fixed codes, per budget')
def trained_vs_controls(r: Results) -> Optional[str]:
    """The trained protectors beside the fixed codes at each budget, stock and NoDA victims."""
    if r.map_rows() is None:
        return None
    methods = ('VoxShield', 'VoxShield-EOT', 'VoxShield-LC', 'random', 'offset', 'checkerboard', 'smooth')
    budgets = ('4/255', '8/255', '10/255', '16/255', '64/255')
    cols = [(v, e) for v in ('stock', 'noda') for e in budgets
            if any(r.row(v, f'{m}@{e}') for m in methods)]
    body = []
    for m in methods:
        cells = [r.row(v, f'{m}@{e}') for v, e in cols]
        body.append([m] + ['–' if c is None else ratio_text(c).replace(' (1 seed)', '') for c in cells])
    head = ['method'] + [f'{"NoDA" if v == "noda" else v} {e}' for v, e in cols]
    return ('Victim Dice / clean (mean over seeds; per seed in brackets). 5-epoch victims and protectors, Hippocampus '
            'split 160 / 48, CPU preset.\n\n' + table(head, body))


@section('The paper\'s victim is bistable per seed')
def bistable(r: Results) -> Optional[str]:
    """Map rows whose seeds differ by 0.3 or more."""
    if r.map_rows() is None:
        return None
    rows = [x for x in r.map_rows() if len(x['ratio_per_seed']) > 1 and '+' not in x['method']
            and max(x['ratio_per_seed']) - min(x['ratio_per_seed']) >= 0.3]
    rows.sort(key=lambda x: (x['victim'], x['method'], eps_value(x['eps'])))
    return ('Rows whose seeds differ by 0.3 or more: the victim either takes the shortcut or learns the anatomy, and '
            'the seed decides. A "protects" verdict needs seeds that agree.\n\n'
            + table(['victim', 'cell', 'seeds', 'Dice / clean per seed', 'mean', 'PSNR (dB)'],
                    [[x['victim'], x['cell'], ','.join(map(str, x['seeds'])), seeds_text(x), f2(x['ratio']),
                      f1(x['psnr'])] for x in rows]))


@section('One code, many exploiters')
def exploiter_table(r: Results) -> Optional[str]:
    """Dice / clean of a few cells across every exploiter profile that met them."""
    if r.map_rows() is None:
        return None
    cells = ('random@16/255', 'checkerboard@16/255', 'offset@64/255', 'offset@128/255')
    victims = sorted({x['victim'] for x in r.map_rows() if x['cell'] in cells},
                     key=lambda v: (v != 'stock', v != 'noda', v))
    body = [[v] + ['–' if r.row(v, c) is None else ratio_text(r.row(v, c)).replace(' (1 seed)', '')
                   for c in cells] for v in victims]
    return ('Victim Dice / clean per exploiter profile (rows) and protected copy (columns); mean over seeds, per '
            'seed in brackets; `-2d`: the 2d configuration, `-20ep`: 20-epoch victims, `-ResEncM_cpu`: ResEnc M '
            'plans.\n\n' + table(['exploiter'] + list(cells), body))


@section('Which part of stock augmentation undoes a texture code')
def family_ablation(r: Results) -> Optional[str]:
    """checkerboard@16/255 against stock with augmentation families removed or kept alone."""
    if r.map_rows() is None:
        return None
    rows = [x for x in r.map_rows() if x['cell'] == 'checkerboard@16/255' and not x['victim'].endswith(('ep', '2d'))]
    order = ('stock', 'noSpatial', 'noNoiseBlur', 'noLowRes', 'noIntensity', 'noMirror', 'onlySpatial',
             'onlyNoiseBlur', 'onlyLowRes', 'intensityMirrorOnly', 'adam', 'noda')
    rows.sort(key=lambda x: order.index(x['victim']) if x['victim'] in order else len(order))
    return ('The period-2 checkerboard inside the labels at 16/255 against stock minus one augmentation family '
            '(`no...`), stock with one filtering family only (`only...`), stock without any filtering family '
            '(`intensityMirrorOnly`) and without any augmentation (`noda`).\n\n'
            + table(['victim', 'seeds', 'Dice / clean per seed', 'mean', 'clean Dice'],
                    [[x['victim'], ','.join(map(str, x['seeds'])), seeds_text(x), small(x['ratio']),
                      f'{x["clean_dice"]:.3f}'] for x in rows]))


@block
def clean_share(r: Results) -> Optional[str]:
    """Code-free training cases against the paper's victim: checkerboard:clean=F rows beside their base cell."""
    if r.map_rows() is None:
        return None
    rows = [x for x in r.map_rows() if ':clean=' in x['method']]
    body = []
    for x in sorted(rows, key=lambda x: (x['eps'], x['cell'])):
        base = r.row(x['victim'], x['method'].split(':clean=')[0] + '@' + x['eps'])
        body.append([x['victim'], x['cell'], ','.join(map(str, x['seeds'])), seeds_text(x),
                     '–' if base is None else seeds_text(base)])
    return table(['victim', 'cell (F = clean share)', 'seeds', 'Dice / clean', 'without clean cases, per seed'], body)


@section('Purifications')
def purifications(r: Results) -> Optional[str]:
    """Purified rows beside their unpurified cell, and the purifications' own cost (Table 1 benchmark)."""
    if r.map_rows() is None:
        return None
    body = []
    for x in sorted((x for x in r.map_rows() if '+' in x['method']), key=lambda x: (x['victim'], x['cell'])):
        base = r.row(x['victim'], x['method'].split('+')[0] + '@' + x['eps'])
        body.append([x['victim'], x['method'].split('+')[1], x['method'].split('+')[0] + '@' + x['eps'],
                     ','.join(map(str, x['seeds'])), seeds_text(x), '–' if base is None else seeds_text(base),
                     f1(x['psnr'])])
    text = ('A purification is applied to the protected copy before the victim trains; ratios are against the '
            'unpurified clean victim.\n\n' + table(['victim', 'purification', 'protected copy', 'seeds',
                                                   'Dice / clean per seed', 'unpurified, per seed',
                                                   'PSNR of purified copy (dB)'], body))
    hip = r.get('hippocampus_20*.json')
    if hip:
        from hippocampus import table_rows
        clean = [x for x in table_rows(hip) if x['method'] == 'Clean' and x['defence_spec'] != '-']
        text += ('\n\nWhat each purification costs by itself (victims on purified *clean* data, Hippocampus benchmark, '
                 'seed 0):\n\n' + table(['purification', 'victim', 'Dice / clean'],
                                        [[x['defence_spec'], x['config'], f2(x['ratio'])] for x in clean]))
    return text


@section('The amplitude rule')
def amplitude_rule(r: Results) -> Optional[str]:
    """The amplitude rule's fit and rows (benchmarks/amplitude_rule.py's own rendering)."""
    data = r.get('amplitude_rule_20*.json')
    if data is None:
        return None
    from amplitude_rule import render
    return '![amplitude rule](figures/amplitude_rule.png)\n\n' + render(data)


@section('The amplitude rule on both datasets')
def amplitude_rule_joint(r: Results) -> Optional[str]:
    """The rule fitted over Hippocampus's and ACDC's class-coded codes at once (amplitude_rule_joint_*.json:
    benchmarks/amplitude_rule.py with --rows), each dataset's RMSE against it, and the other codes' residuals."""
    data = r.get('amplitude_rule_joint_*.json')
    if data is None:
        return None
    from amplitude_rule import render
    p = data['provenance']
    return (render(data) + f'\n\nMade by `{p["command"]}` at {str(p["commit"])[:7]}, {p["date"]} '
            f'(`benchmarks/results/{r.name("amplitude_rule_joint_*.json")}`).')


@section('Protection map rows beyond the Hippocampus map')
def external_map_rows(r: Results) -> Optional[str]:
    """The map-format rows (``protection_map.rows_of``) of every ACDC results file and voxshield_audit report: the
    rows the amplitude rule's joint fit reads beside the Hippocampus map."""
    from protection_map import rows_of
    files = acdc_measured(r) + [f for f in sorted(r.folder.glob('audit_*.json')) if not f.name.startswith(
        'audit_engine')]
    rows = []
    for f in files:
        try:
            rows += [(f.name, x) for x in rows_of(json.loads(f.read_text()), r.folder)]
        except ValueError:  # a results file of another shape (no eval, configurations or copies): no map rows
            continue
    if not rows:
        return None
    body = [[x['dataset'], x['victim'], x['cell'], ','.join(map(str, x['seeds'])), f'{x["dice"]:.3f}',
             f'{x["clean_dice"]:.3f}', f'**{small(x["ratio"])}**', ' / '.join(small(v) for v in x['ratio_per_seed']),
             f1(x['psnr']), f1(x['psnr_roi']), f'`{name}`']
            for name, x in sorted(rows, key=lambda t: (t[1]['dataset'], t[1]['victim'], -(t[1]['psnr_roi'] or 0)))]
    return ('Rows of the protection map measured outside `protection_map.py` (ACDC through `voxshield_evaluate`, '
            'the Hippocampus convolution and sample-wise EM through `voxshield_audit`), in the map\'s format; '
            'victims are the map\'s profiles (`stock-2d-20ep`: stock nnU-Net 2d, 20 epochs). Each is paired seed by '
            'seed with its own clean victim.\n\n'
            + table(['dataset', 'victim', 'cell', 'seeds', 'Dice', 'clean Dice', 'Dice / clean', 'per seed',
                     'PSNR (dB)', 'ROI PSNR (dB)', 'file'], body))


@block
def amplitude_rule_joint_summary(r: Results) -> Optional[str]:
    """One paragraph of the joint fit over both datasets (findings.md)."""
    data = r.get('amplitude_rule_joint_*.json')
    if data is None:
        return None
    fit, ds = data['fit'], data['datasets']
    own = lambda o: f' (its own fit x50 {o["x50"]:.1f} dB, s {o["s"]:.2f} dB, RMSE {o["rmse"]:.3f})'  # noqa: E731
    parts = [f'{d}: {v["points"]} points, RMSE {v["rmse_joint"]:.3f}' + (own(v['own_fit']) if v.get('own_fit') else '')
             for d, v in ds.items()]
    others = [f'{o["dataset"]} {o["victim"]} {o["cell"]} {small(o["ratio"])} ({o["residual"]:+.2f})'
              for o in data['others']]
    return (f'One logistic over both datasets\' class-coded codes ({fit["points"]} per-seed points, victims '
            f'{" / ".join(data["victim"]) if isinstance(data["victim"], list) else data["victim"]}): x50 = '
            f'{fit["x50"]:.1f} dB ({fit["x50_ci"][0]:.1f}-{fit["x50_ci"][1]:.1f}), s = {fit["s"]:.2f} dB, RMSE '
            f'{fit["rmse"]:.3f}; ' + '; '.join(parts) + '. Other perturbations against it (Dice / clean, minus the '
            'fit): ' + '; '.join(others) + f' (`benchmarks/results/{r.name("amplitude_rule_joint_*.json")}`).')


@block
def em_samplewise(r: Results) -> Optional[str]:
    """Sample-wise EM's audit rows beside the predictions written before them (findings.md)."""
    from protection_map import rows_of
    rows, preds = [], {}
    for name, data in audit_reports(r):
        em = [x for x in rows_of(data, r.folder) if x['method'].startswith('EM-samplewise')]
        if em and data.get('predictions_file'):
            preds.update({p['cell']: p for p in json.loads((ROOT / data['predictions_file']).read_text())['rows']})
        rows += [(name, x) for x in em]
    acdc = r.get('acdc_20*.json')
    if not rows and not acdc:
        return None
    body = []
    for name, x in sorted(rows, key=lambda t: (Fraction(t[1]['eps']), t[1]['victim'] != 'stock')):
        p = preds.get(x['cell']) or {}
        predicted = (small(p['predicted_ratio']['stock']) + ' (the rule)' if x['victim'] == 'stock' and p
                     else (p.get('expected_noda') or '–').split(' (')[0])
        body.append([x['dataset'], x['cell'], f1(x['psnr_roi']), x['victim'], predicted, f'**{small(x["ratio"])}**',
                     ' / '.join(small(v) for v in x['ratio_per_seed']), f'`{name}`'])
    from protection_map import victim_profile
    for config, v in ((acdc or {}).get('configurations') or {}).items():
        configuration, _, trainer = config.partition(' ')
        for c in v['cells']:
            if c['cell'].startswith('EM-samplewise'):
                predicted = (c['predicted_text'].split(' (')[0] if c.get('predicted_text')
                             else f'{small(c["predicted_ratio"])} (the rule)')
                body.append(['ACDC', c['cell'], f1(c['psnr_roi']),
                             victim_profile(trainer or 'nnUNetTrainer_5epochs', configuration), predicted,
                             f'**{small(c["ratio"])}**', ' / '.join(small(x) for x in c['ratio_per_seed']),
                             f'`{r.name("acdc_20*.json")}`'])
    if not body:
        return None
    return table(['dataset', 'cell', 'ROI PSNR (dB)', 'victim', 'predicted before the run', 'Dice / clean',
                  'per seed', 'results'], body)


@block
def amplitude_rule_summary(r: Results) -> Optional[str]:
    """One paragraph of the fit's numbers (findings.md)."""
    data = r.get('amplitude_rule_20*.json')
    if data is None:
        return None
    fit, lv = data['fit'], data['fit']['levels']
    return (f'Fit over {len(data["rows"])} stock cells ({fit["points"]} seed points): x50 = {fit["x50"]:.1f} dB '
            f'({fit["x50_ci"][0]:.1f}-{fit["x50_ci"][1]:.1f}), s = {fit["s"]:.2f} dB, RMSE {fit["rmse"]:.3f}. '
            f'Dice / clean 0.05 needs ROI PSNR {lv["0.05"]["psnr_roi"]:.1f} dB '
            f'({lv["0.05"]["psnr_roi_ci"][0]:.1f}-{lv["0.05"]["psnr_roi_ci"][1]:.1f}); the labels are '
            f'{100 * data["label_fraction"]:.1f}% of Hippocampus\'s volume, so that is '
            f'{lv["0.05"]["psnr_whole"]["hippocampus"]:.1f} dB over the whole volume; where labels are 1% of it, '
            f'{lv["0.05"]["psnr_whole"]["0.01"]:.1f} dB; 0.1%, {lv["0.05"]["psnr_whole"]["0.001"]:.1f} dB.')


PROTECTED_BELOW = 0.1  # a seed counts as protected at or below this Dice / clean (prediction counts)


def prediction_rows(r: Results, data: dict) -> list:
    """Table rows of the predictions file beside what the map measured, with a verdict where one applies."""
    out = []
    for p in data['predictions']:
        row = r.row(p['victim'], p['cell']) if p.get('dataset', 'hippocampus') == 'hippocampus' else None
        if row is None:
            out.append([p['session'], p['victim'], p['cell'], p['text'], 'not in the results', '–'])
            continue
        seeds = [s for s in p.get('seeds') or row['seeds'] if s in row['seeds']]
        vals = [row['ratio_per_seed'][row['seeds'].index(s)] for s in seeds]
        measured = ' / '.join(map(small, vals)) + f' (seed{"s" if len(seeds) > 1 else ""} {",".join(map(str, seeds))})'
        verdict, lo_hi = '–', p.get('expected')
        if p.get('on') == 'mean' and lo_hi:
            measured += f', mean {small(row["ratio"])}'
            verdict = 'held' if lo_hi[0] <= row['ratio'] <= lo_hi[1] else 'failed'
        elif lo_hi and vals:
            verdict = 'held' if all(lo_hi[0] <= v <= lo_hi[1] for v in vals) else 'failed'
        elif p.get('protected_count') and vals:  # how many seeds end below PROTECTED_BELOW
            k = sum(v <= PROTECTED_BELOW for v in vals)
            measured += f'; {k} of {len(vals)} below {PROTECTED_BELOW}'
            verdict = 'held' if p['protected_count'][0] <= k <= p['protected_count'][1] else 'failed'
        out.append([p['session'], p['victim'], p['cell'], p['text'], measured, verdict])
    return out


@section('Predictions written before each run, beside the result')
def predictions(r: Results) -> Optional[str]:
    """Each prediction written before a run, beside its measurement."""
    data = r.get('predictions_hippocampus_*.json')
    if data is None or r.map_rows() is None:
        return None
    return ('The prediction is the one written down before the run (`expected` in '
            f'`benchmarks/results/{r.name("predictions_hippocampus_*.json")}`); the measurement is read from the map. '
            '"held": every listed seed inside the predicted range.\n\n'
            + table(['session', 'victim', 'cell', 'predicted', 'measured Dice / clean', 'verdict'],
                    prediction_rows(r, data)))


@section('ACDC: the amplitude rule\'s predictions, written before the victims')
def acdc_predictions(r: Results) -> Optional[str]:
    """The Hippocampus rule applied to ACDC's class-coded offsets before any ACDC victim trained
    (acdc_predictions_*.json); the measured ratios join them as the ACDC runs land."""
    data = r.get('acdc_predictions_*.json')
    if data is None:
        return None
    def noda(x: dict) -> str:
        n = x.get('predicted_noda')
        return '–' if not n else n.get('text') or f'each seed below {n["ratio_per_seed_below"]}'
    body = [[x['cell'], f1(x['psnr_whole']), f'{x["psnr_roi"]:.1f} ± {x["psnr_roi_std"]:.1f}',
             (x.get('predicted_stock') or {}).get('text', '–') if x.get('predicted_ratio') is None
             else small(x['predicted_ratio']),
             '–' if not x.get('predicted_ratio_range') else
             f'{small(x["predicted_ratio_range"][0])}-{small(x["predicted_ratio_range"][1])}', noda(x),
             '; '.join(x.get('victims') or [])] for x in data['rows']]
    return (f'Predicted Dice / clean of the stock victim from the Hippocampus fit (x50 {data["rule"]["x50"]:.1f} dB, '
            f's {data["rule"]["s"]:.2f} dB) at each copy\'s ROI PSNR (measured on the exported copies; range: the '
            'fit\'s 90% parameter intervals, not the seed spread), and what was written for the no-augmentation victim '
            '(a purified cell, `+defence`: its victim on the purified copy against the same victim on the purified '
            'clean data; no rule covers it, so what was written for the stock victim stands in the rule\'s column).\n\n'
            + table(['cell', 'PSNR (dB)', 'ROI PSNR (dB, mean ± sd)', 'predicted (stock)', 'range',
                     'written for the no-augmentation victim', 'victims to train'], body))


@section('ACDC: stock victims and the amplitude rule out of sample')
def acdc_results(r: Results) -> Optional[str]:
    """benchmarks/acdc.py's file (acdc_20*.json): clean victims per configuration and seed, each protected cell's
    measured Dice / clean beside the prediction written before it ran, and the rule refitted on both datasets."""
    data = r.get('acdc_20*.json')
    if data is None:
        return None
    out = [data['what'], '', '![ACDC against the rule](figures/acdc_rule.png)', '']
    for config, v in data['configurations'].items():
        clean = v['clean']
        carried = (f' Carried over from `{v["carried_from"]}` (commit {str(v["carried_provenance"]["commit"])[:7]}, '
                   f'{v["carried_provenance"]["date"]}; its folders are gone).' if v.get('carried_from') else '')
        out.append(f'**{config}.** Clean victim Dice (mean over labels; RV / MYO / LV): ' + '; '.join(
            f'seed {s} {f2(c["dice"])} ({" / ".join(f2(x) for x in c["dice_per_label"].values())})'
            + (' †' if c.get('carried_from') else '') for s, c in clean.items()) + '.' + carried)
        for e in v.get('reruns') or []:
            pairs = [f'clean seed {s} Dice {x["earlier"]:.3f} -> {x["now"]:.3f}' for s, x in e['clean'].items()]
            pairs += [f'{cell} seed {s} {small(x["earlier"])} -> {small(x["now"])}'
                      for cell, seeds in e.items() if cell not in ('file', 'commit', 'clean') for s, x in seeds.items()]
            out.append(f'Rerun of seeds measured before (`{e["file"]}`, commit {str(e["commit"])[:7]}; same code '
                       f'path, fresh folders): ' + '; '.join(pairs) + '.')
        if v['cells']:
            body = [[c['cell'] + (' †' if c.get('carried_from') or c.get('carried_seeds') else ''),
                     f1(c['psnr_whole']), f1(c['psnr_roi']),
                     c.get('predicted_text') or (f'{small(c["predicted_ratio"])} '
                                                f'[{small(c["predicted_ratio_range"][0])}-'
                                                f'{small(c["predicted_ratio_range"][1])}]'),
                     small(c['ratio']) + (f' [{small(c["ci95"][0])}, {small(c["ci95"][1])}]' if c.get('ci95') else ''),
                     ' / '.join(small(x) for x in c['ratio_per_seed']),
                     ' / '.join(f2(x) for x in (c.get('dice_per_label') or {}).values())] for c in v['cells']]
            out += ['', table(['cell', 'PSNR (dB)', 'ROI PSNR (dB)', 'predicted [fit range]',
                               'measured [95% CI]', 'per seed', 'Dice RV / MYO / LV'], body)]
            kept = sorted({(c['carried_from'], str(c.get('carried_commit', ''))[:7])
                           for c in list(v['cells']) + list(clean.values()) if c.get('carried_from')})
            if kept:
                out += ['', '† carried over from ' + ', '.join(f'`{f}` (commit {c})' for f, c in kept)
                        + ': measured in an earlier run, each ratio against that run\'s own clean victims.']
            joined = [c for c in v['cells'] if c.get('carried_seeds')]
            if joined:
                out += ['', '† (seeds) ' + '; '.join(
                    f'{c["cell"]}: ' + ', '.join(f'seed {s} from `{m["file"]}` (commit {str(m["commit"])[:7]})'
                                                 for s, m in c['carried_seeds'].items())
                    for c in joined) + ': seeds measured in an earlier run (each against that run\'s own clean '
                        'victim) joined by the later run\'s seeds; the interval is over all seeds where each has '
                        'per-case Dice, else not given.']
            purified = [c for c in v['cells'] if c.get('defence')]
            if purified:
                out += ['', 'A `+defence` cell: the victim trained on the copy after that purification, against the '
                        'same victim on the purified clean data; ' + '; '.join(
                            f'{c["cell"]}: the victim on purified clean data keeps '
                            f'{opt_small(c.get("purification_cost"))} of clean (the purification\'s own cost), the '
                            f'purified copy\'s victim {opt_small(c.get("ratio_to_clean"))} of the unpurified clean '
                            f'victim' for c in purified) + '.']
        out.append('')
    fit = data['refit']
    h = fit['hippocampus_fit']
    lines = [f'Refit: the Hippocampus logistic (x50 {h["x50"]:.1f} dB, s {h["s"]:.2f} dB) has RMSE '
             f'{h["rmse_hippocampus"]:.3f} on its own {fit["points"]["hippocampus"]} per-seed points']
    if 'rmse_acdc' in h:
        lines.append(f' and {h["rmse_acdc"]:.3f} on ACDC\'s {fit["points"]["acdc"]} (class-coded offsets, '
                     f'{fit.get("config") or "3d_fullres"} victim)')
    if 'joint_fit' in fit:
        j = fit['joint_fit']
        lines.append(f'; one logistic over both: x50 {j["x50"]:.1f} dB, s {j["s"]:.2f} dB (RMSE Hippocampus '
                     f'{j["rmse_hippocampus"]:.3f}, ACDC {j["rmse_acdc"]:.3f})')
    if 'acdc_fit' in fit:
        a = fit['acdc_fit']
        lines.append(f'; ACDC alone: x50 {a["x50"]:.1f} dB, s {a["s"]:.2f} dB')
    out.append(''.join(lines) + '.')
    p = data['provenance']
    out += ['', f'Made by `{p["command"]}` at {str(p["commit"])[:7]}, {p["date"]}.']
    return '\n'.join(out)


@section('Table 1 on Hippocampus: every method at 4/255 against issue 6\'s target')
def hippocampus_table1(r: Results) -> Optional[str]:
    """Dice / clean of every Table 1 method at 4/255 (benchmarks/hippocampus.py's matrix)."""
    data = r.get('hippocampus_20*.json')
    if data is None:
        return None
    from hippocampus import ratio_matrix, table_rows
    rows = table_rows(data)
    clean = {x['config']: x['dice'] for x in rows if x['method'] == 'Clean' and x['defence_spec'] == '-'}
    return ('Stock `nnUNetTrainer_5epochs` victims (seed 0, no test-time mirroring), eps = 4/255 of each case\'s '
            f'p0.5-p99.5 range; clean victims: 3d_fullres {clean.get("3d_fullres", 0):.3f}, 2d '
            f'{clean.get("2d", 0):.3f}. Columns: victim configuration, and purification before the victim; `-`: not '
            'measured.\n\n' + '\n'.join(ratio_matrix(rows)))


@section('Budget curve and a longer protector schedule (VoxShield-EOT)')
def eot_budget_and_schedule(r: Results) -> Optional[str]:
    """The EOT generator exported at 2, 4 and 8/255, and the 20-epoch protector."""
    data, longer = r.get('hippocampus_20*.json'), r.get('hippocampus_eot20ep_20*.json')
    if data is None and longer is None:
        return None
    body = []
    if data:
        from hippocampus import table_rows
        for x in table_rows(data):
            if x['config'] == '3d_fullres' and x['defence_spec'] == '-' and x['method'].startswith('VoxShield-EOT') \
                    and (' eps ' in x['method'] or x['method'] == 'VoxShield-EOT'):
                body.append([x['method'] + ('' if ' eps ' in x['method'] else ' (4/255)'), '5', x['config'],
                             f'{x["dice"]:.3f}', f2(x['ratio']), f1(x['psnr'])])
    if longer:
        clean = next(x for x in longer['rows'] if x['row'] == 'clean')['victims']
        for x in longer['rows']:
            if x['row'] == 'clean':
                continue
            for config, v in x['victims'].items():
                body.append([x['method'], '20', config, f'{v["dice"]["mean"]:.3f}',
                             f2(v['dice']['mean'] / clean[config]['dice']['mean']),
                             f1(((x.get('quality') or {}).get('psnr') or {}).get('mean'))])
    return ('The same EOT generator exported at other budgets (5-epoch protector), and a protector trained 4x longer '
            '(exported at 4/255); stock 5-epoch victims, seed 0.\n\n'
            + table(['protector', 'protector epochs', 'victim', 'DSC', 'DSC / clean', 'PSNR (dB)'], body))


@section('Quality of the protected copies (voxshield_verify)')
def copies_quality(r: Results) -> Optional[str]:
    """voxshield_verify's summary of each Table 1 copy."""
    data = r.get('hippocampus_20*.json')
    if data is None:
        return None
    body = []
    for name, p in data['protectors'].items():
        v = p.get('verify') or {}
        body.append([name, f'{v["max_budget_use"]:.3f}', f1(v['psnr']['mean']), f1(v['psnr']['min']),
                     f1(v['psnr_roi']['mean']), f'{v["ssim"]["mean"]:.5f}', v['violations'],
                     f'{p["export_seconds_per_case"]:.2f}' if p.get('export_seconds_per_case') else '–'])
    return ('160 training cases each; max budget use = max |delta| / budget.\n\n'
            + table(['copy', 'max budget use', 'PSNR mean (dB)', 'PSNR min (dB)', 'PSNR ROI mean (dB)', 'SSIM mean',
                     'violations', 'export s / case'], body))


@section('Seed spread of the clean and VoxShield victims')
def seed_spread(r: Results) -> Optional[str]:
    """Clean and VoxShield victims with two seeds each."""
    body = []
    for config in ('3d_fullres', '2d'):
        data = r.get(f'hippocampus_seeds_{config}_20*.json')
        if data is None:
            continue
        per = {x['method']: x['per_seed'][config] for x in data['rows']}
        clean, vs = per.get('Clean', {}), per.get('VoxShield', {})
        seeds = sorted(clean, key=int)
        body.append([config] + [f'{clean[s]["dice"]:.3f}' for s in seeds] + [f'{vs[s]["dice"]:.3f}' for s in seeds]
                    + [f'{vs[s]["dice"] / clean[s]["dice"]:.2f}' for s in seeds])
    if not body:
        return None
    return table(['victim', 'clean seed 0', 'clean seed 1', 'VoxShield seed 0', 'VoxShield seed 1', 'ratio seed 0',
                  'ratio seed 1'], body)


@section('Residual-only detector (does the support leak the labels?)')
def detector(r: Results) -> Optional[str]:
    """The residual-only detector's reports, each copy against its clean copy."""
    body = []
    for pattern in ('hippocampus_detector_20*.json', 'hippocampus_detector_variants_*.json',
                    'protection_map_detector_LC_*.json'):
        data = r.get(pattern)
        if data is None:
            continue
        sets = data['datasets']
        clean = next(d['mean_dice'] for d in sets if d['dataset'].endswith('Dataset004_Hippocampus'))
        body += [[r.name(pattern), Path(d['dataset']).name, f'{d["mean_dice"]:.3f}', f'{d["union_dice"]:.3f}',
                  f'{d["mean_dice"] - clean:+.3f}'] for d in sets]
    if not body:
        return None
    return ('A small CNN predicts the labels from the high-pass residual alone; a copy that scores clearly above its '
            'clean copy leaks its support.\n\n' + table(['report', 'training data', 'test Dice', 'union Dice',
                                                        'minus clean'], body))


@section('Learnability probe: cos(g_delta, g_clean) per epoch')
def probe(r: Results) -> Optional[str]:
    """The learnability probe per epoch (benchmarks/probe.py)."""
    data = r.get('probe_20*.json')
    if data is None:
        return None
    series = lambda xs: ' / '.join(f'{v:.2f}' for v in xs)  # noqa: E731
    body = [[k.replace('nnUNetTrainerVoxShieldLC', ''), series(v['align']), series(v['train_loss']),
             series(v['clean_pseudo_dice'])] for k, v in sorted(data.items()) if k != 'provenance']
    return table(['probe (+ seed)', 'cos(g_delta, g_clean)', 'train loss', 'clean pseudo Dice'], body)


@section('How much of each code survives stock augmentation')
def code_survival(r: Results) -> Optional[str]:
    """The share of augmented samples that keep less than half of each code (benchmarks/code_survival.py)."""
    files = [('stock', 'code_survival_20*.json')] + [
        (f'stock without {f.replace("_", "/")}', f'code_survival_without_{f}_*.json')
        for f in ('spatial', 'noise_blur', 'lowres', 'intensity', 'mirror')]
    loaded = [(name, r.get(p)) for name, p in files if r.get(p)]
    if not loaded:
        return None
    codes = list(dict.fromkeys(c for _, d in loaded for c in d['summary']))
    body = [[c] + [f'{d["summary"][c]["retained"]["below_0.5"]:.2f}' if c in d['summary'] else '–'
                   for _, d in loaded] for c in codes]
    s = loaded[0][1]['settings']
    return (f'Share of {s["samples"]} augmented samples ({s["cases"]} cases, {s["eps"]}) that keep less than half of '
            'the code\'s amplitude, per pipeline.\n\n' + table(['code'] + [n for n, _ in loaded], body))


@section('Class-wise convolution: strengths per target ROI PSNR')
def conv_strengths(r: Results) -> Optional[str]:
    """The conv method's strength s that reaches each target ROI PSNR, per dataset and seed
    (benchmarks/conv_strengths.py)."""
    data = r.get('conv_strengths_*.json')
    if data is None:
        return None
    body = []
    for dataset, d in data['results'].items():
        for seed, v in sorted(d['seeds'].items(), key=lambda kv: int(kv[0])):
            for target, t in sorted(v['targets'].items(), key=lambda kv: -float(kv[0])):
                body.append([dataset, d['cases'], seed, target, f'{t["strength"]:.2f}', f1(t['roi_psnr_mean']),
                             f'{f1(t["roi_psnr_min"])}-{f1(t["roi_psnr_max"])}', f1(t['psnr_mean'])])
    return ('`--method conv`: inside label c the image becomes (1 - s) x + s (k_c * x); the strength s per target '
            'mean ROI PSNR over the split\'s training cases.\n\n'
            + table(['dataset', 'cases', 'seed', 'target ROI PSNR (dB)', 'strength s', 'ROI PSNR mean (dB)',
                     'ROI PSNR range (dB)', 'whole-volume PSNR mean (dB)'], body))


@section('Export cost on CT (phantom, int16 HU)')
def ct_export(r: Results) -> Optional[str]:
    """Export against predict on the CT phantom, per case (benchmarks/ct_export.py)."""
    body = []
    for pattern in ('ct_export_256x256x60_*.json', 'ct_export_512x512x120_2*.json', 'ct_export_512x512x120_lowmem_*'):
        data = r.get(pattern)
        if data is None:
            continue
        for row in data['rows']:
            ex, pr = row['export'], row.get('predict') or {}
            body.append([r.name(pattern), ' x '.join(map(str, data['shape_zyx'][::-1])), row['case'],
                         f1(ex['cpu_seconds']), f'{ex["max_rss_mb"] / 1024:.2f}',
                         f1(pr.get('cpu_seconds')), '–' if not pr else f'{pr["max_rss_mb"] / 1024:.2f}'])
    if not body:
        return None
    return table(['report', 'size', 'case', 'export CPU s', 'export peak RSS (GiB)', 'predict CPU s',
                  'predict largest process (GiB)'], body)


def protector_minutes(r: Results) -> dict:
    """{family: (min, max, n)} minutes of 5-epoch protector training in the map (2-core CPU, shared)."""
    data = r.get('protection_map_20*.json')
    out = {}
    for p in (data or {}).get('protectors', {}).values():
        if p.get('train_seconds') and p.get('trainer', '').endswith('_5epochs'):
            fam = family(p['cell'].split('@')[0])
            out.setdefault(fam, []).append(p['train_seconds'] / 60)
    return {k: (min(v), max(v), len(v)) for k, v in out.items()}


@section('Compute')
def timing(r: Results) -> Optional[str]:
    """Protector and victim times, per-iteration cost and export time, as measured."""
    hip, minutes = r.get('hippocampus_20*.json'), protector_minutes(r)
    if hip is None and not minutes:
        return None
    lines = []
    if minutes:
        lines.append('Protector training, 5 epochs x 250 iterations, CPU preset (`nnUNetPlans_cpu`), Hippocampus, on a '
                     'shared 2-core CPU (upper bounds; GPU not measured here): ' + '; '.join(
                         f'{k} {a:.0f}-{b:.0f} min ({n} runs)' for k, (a, b, n) in sorted(minutes.items())) + '.')
    t = (hip or {}).get('timing') or {}
    if t:
        lines.append(f'Per training iteration: stock nnUNetTrainer {t["stock_s_per_iteration"]:.2f} s, '
                     f'nnUNetTrainerVoxShield {t["voxshield_s_per_iteration"]:.2f} s '
                     f'(x{t["voxshield_s_per_iteration"] / t["stock_s_per_iteration"]:.2f}). Export '
                     f'{t["export_seconds_per_case"]:.2f} s per case against nnUNetv2_predict '
                     f'{t["predict_seconds_per_case"]:.2f} s per case (no mirroring).')
    victims = [e['seconds'] / 60 for e in ((r.get('protection_map_20*.json') or {}).get('eval') or {}).values()
               if e.get('seconds') and not e.get('defences') and e.get('configuration', '3d_fullres') == '3d_fullres']
    if victims:
        victims.sort()
        lines.append(f'A protection-map cell (a 5-epoch stock or NoDA victim, its clean victim reused when present, '
                     f'and scoring): median {victims[len(victims) // 2]:.0f} min ({len(victims)} cells).')
    return '\n\n'.join(lines)


@section('Audit')
def audit(r: Results) -> Optional[str]:
    """The audits' verdict lines and Dice / clean per exploiter, one block per voxshield_audit report.json committed
    as benchmarks/results/audit_<name>_<date>.json ({'verdict': [...], 'copies': [{'name', 'exploiters': [{'name',
    'ratio': {'ratio', 'ci', 'per_seed'}, 'cost', 'status'}]}]}); one figure of every copy."""
    reports = audit_reports(r)
    if not reports:
        return None
    out = ['![audit](figures/audit.png)', '']
    ci = lambda b: '–' if not b else small(b['ratio']) + (  # noqa: E731
        f' [{small(b["ci"][0])}, {small(b["ci"][1])}]' if b.get('ci') else '')
    for name, data in reports:
        lines = [f'### `{name}`', ''] + [f'**{v}**' for v in data.get('verdict') or []] + ['']
        body = []
        for copy in data.get('copies') or []:
            for e in copy.get('exploiters') or []:
                if e.get('failed'):
                    body.append([copy['name'], e['name'], f'failed: {e["failed"]}', '–', '–', '–', '–'])
                    continue
                # a purification's victim against the same victim on purified clean data, seed by seed:
                # (copy / clean) / (purified clean / clean)
                cost = (e.get('cost') or {}).get('per_seed') or []
                body.append([copy['name'], e['name'], ci(e['ratio']),
                             ' / '.join(map(small, e['ratio'].get('per_seed') or [])), e.get('status', '–'),
                             ci(e.get('cost')), ' / '.join(small(r / c) for r, c in zip(e['ratio']['per_seed'], cost))
                             if cost else '–'])
        copies = []
        for copy in data.get('copies') or []:
            q, rule = copy.get('quality') or {}, copy.get('rule') or {}
            text = f'`{copy["name"]}`: PSNR {f1(q.get("psnr"))} dB, inside the labels {f1(q.get("psnr_roi"))} dB'
            if rule.get('predicted') is not None:
                text += (f'; the amplitude rule predicts {small(rule["predicted"])} of clean for the {rule["victim"]} '
                         f'victim' + (f', measured {small(rule["measured"])}' if rule.get('measured') is not None
                                      else ''))
            copies.append(f'- {text}.')
        if data.get('predictions_file'):
            pred = json.loads((ROOT / data['predictions_file']).read_text())
            def written(x: dict) -> str:
                """The rule's stock prediction, or for a purified cell (no rule covers it) the hand-written one."""
                stock = (small(x['predicted_ratio']['stock']) if x.get('predicted_ratio') is not None
                         else (x.get('predicted_stock') or {}).get('text', '–').split(' (')[0])
                noda = (f', no augmentation {x["expected_noda"].split(" (")[0]}'
                        if x.get('expected_noda') and x['expected_noda'][0].isdigit() else '')
                again = (f'; its second seed {x["second_seed"]["text"].split(" (")[0]} (written '
                         f'{x["second_seed"]["written"]})' if x.get('second_seed') else '')
                return f'{x["cell"]} at {x["psnr_roi"]:.1f} dB ROI: stock {stock}{noda} (written {x["written"]}){again}'
            copies.append(f'- Predictions written before the runs (`{Path(data["predictions_file"]).name}`): '
                          + '; '.join(map(written, pred['rows'])) + '.')
        p = data.get('provenance')
        made = [f'Made by `{p["command"]}` at {str(p["commit"])[:7]}, {p["date"]}.'] if p else []
        out += lines + [table(['copy', 'exploiter', 'Dice / clean [95% CI]', 'per seed', 'verdict',
                               'cost of the purification alone', 'Dice / purified clean, per seed'], body), '']
        out += copies + [''] + made + ['']
    return '\n'.join(out).rstrip('\n')


@section('The audit engine: parallel efficiency, overhead, kill and resume')
def audit_engine(r: Results) -> Optional[str]:
    """benchmarks/audit_engine.py: one panel through the local backend at 1 and 2 workers, then killed mid-training
    and rerun (audit_engine_*.json)."""
    data = r.get('audit_engine_*.json')
    if data is None:
        return None
    body = [[str(x['workers']), str(x['jobs']), f1(x['wall_s']), f1(x['sum_job_s']), f2(x['parallel_efficiency']),
             f1(x['mean_train_s']), '–' if x.get('overhead_per_job_s') is None else f1(x['overhead_per_job_s']),
             f1(x['launch_latency_s'])] for x in data['runs']]
    k = data['kill_and_rerun']
    resumed = ', '.join(f'{n.split("_nnUNet")[0]}: epoch {e}' for n, e in k['resumed_trainings_first_epoch'].items())
    return (f'Source `{data["source"]}` ({data["epochs"]}-epoch victims). Parallel efficiency = sum of the jobs\' '
            'own times / (workers x wall time); overhead per job = the 1-worker span (first job submitted to last '
            'finished) minus the sum of the jobs\' own times, per job.\n\n'
            + table(['workers', 'jobs', 'wall (s)', 'sum of jobs (s)', 'parallel efficiency', 'mean training (s)',
                     'engine overhead per job (s)', 'launch latency (s)'], body)
            + f'\n\nKilled in the middle of training ({k["workers"]} workers) and rerun: every job recorded exactly '
            f'once: {k["every_job_once"]}; jobs finished before the kill ({", ".join(k["jobs_done_before_kill"])}) '
            f'unchanged: {k["finished_before_kill_unchanged"]}; each exploiter once in the report: '
            f'{k["report_rows_once"]}; killed trainings resumed from nnU-Net\'s checkpoint at {resumed}. Wall time: '
            f'killed run {f1(k["wall_killed_run_s"])} s + rerun {f1(k["wall_rerun_s"])} s against '
            f'{f1(k["wall_uninterrupted_s"])} s uninterrupted (extra {f1(k["extra_wall_s"])} s).\n\n'
            f'Caveat recorded with the run: {data["note"]}')


@block
def audit_engine_summary(r: Results) -> Optional[str]:
    """One README sentence on what the engine costs (audit_engine_*.json)."""
    data = r.get('audit_engine_*.json')
    if data is None:
        return None
    one, two = (next(x for x in data['runs'] if x['workers'] == w) for w in (1, 2))
    k = data['kill_and_rerun']
    unchanged = (' and the jobs finished before the kill kept their numbers'
                 if k['finished_before_kill_unchanged'] else '')
    load = max((max(v) for v in (data.get('load_average_at_start') or {}).values()), default=None)
    machine = ('an otherwise idle machine' if load is not None and load < data['provenance']['machine']['nproc']
               else 'a machine shared with other runs')
    return (f'Measured on this 2-core machine with a {data["source"]} panel of {one["jobs"]} jobs (trainings of '
            f'~{one["mean_train_s"]:.0f} s): parallel efficiency {f2(one["parallel_efficiency"])} with 1 worker and '
            f'{f2(two["parallel_efficiency"])} with 2 ({f1(one["wall_s"])} s and {f1(two["wall_s"])} s wall), '
            f'{f1(one["overhead_per_job_s"])} s of engine overhead per job; killed in mid-training and rerun, every '
            f'job has {"exactly one record" if k["every_job_once"] else "NOT one record"}, the killed trainings '
            f'resumed from their checkpoints{unchanged}, and the killed run plus its rerun took '
            f'{f1(k["extra_wall_s"])} s longer than the uninterrupted run '
            f'([results](docs/results.md#the-audit-engine-parallel-efficiency-overhead-kill-and-resume); measured on '
            f'{machine}).')


@section('Provenance')
def provenance(r: Results) -> Optional[str]:
    """Every results file's provenance, one line each."""
    body = []
    for f in sorted(r.folder.glob('*.json')):
        p = json.loads(f.read_text()).get('provenance') or {}
        cmd = p.get('command')
        n = len(cmd) if isinstance(cmd, list) else 1
        first = (cmd[0] if isinstance(cmd, list) else cmd or '–').split('  #')[0].strip()
        if len(first) > 90:
            first = first[:87] + '...'
        body.append([f'`{f.name}`', str(p.get('date', '–'))[:10], str(p.get('commit', '–'))[:7],
                     f'`{first}`' + (f' (+{n - 1} more)' if n > 1 else ''), p.get('machine', '–')])
    return ('Each results file records how it was made (`provenance`: command(s), commit, date, machine); the full '
            'command lists are in the files.\n\n' + table(['file', 'date', 'commit', 'command', 'machine'], body))


# ------------------------------------------------------------------------------------------------------- figures
@figure
def frontier_png(r: Results, png: Path) -> None:
    """The Hippocampus frontier (``draw_frontier``)."""
    if r.map_rows() is not None:
        draw_frontier(r, png, HIPPOCAMPUS_MAP, 'Hippocampus', r.get('amplitude_rule_20*.json'))


def draw_frontier(r: Results, png: Path, pattern: str, dataset: str, rule: Optional[dict] = None) -> None:
    """Small multiples: one panel per exploiter of ``PANELS``, best point per family and budget of the map
    ``pattern``, seed range as bars; ``rule`` (an amplitude_rule JSON) is drawn on the stock panel."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    colours = dict(zip([f for f, _ in FAMILIES], plt.get_cmap('tab10').colors))
    fig, axes = plt.subplots(3, 3, figsize=(12, 10.5), sharex=True, sharey=True)
    for ax, (title, victim, purification) in zip(axes.flat, PANELS):
        pts = frontier_points(r, victim, purification, pattern)
        for fam, p in sorted(pts.items()):
            styles = (('stock', 'o', '-'), ('noda', 's', '--')) if purification else ((victim, 'o', '-'),)
            for vic, marker, ls in styles:
                q = [x for x in p if x[5] == vic]
                if not q:
                    continue
                x, y, lo, hi = (np.array([a[i] for a in q]) for i in range(4))
                ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], color=colours[fam],
                            marker=marker, ls=ls, ms=5, lw=1.2, capsize=2)
        if victim == 'stock' and rule:
            grid = np.linspace(15, 70, 200)
            shift, fit = rule['whole_minus_roi_db'], rule['fit']
            ax.plot(grid, 1 / (1 + np.exp((fit['x50'] - (grid - shift)) / fit['s'])), 'k--', lw=1)
        ax.axhline(0.05, color='k', lw=0.7, ls=':')
        ax.axvline(50, color='k', lw=0.7, ls=':')
        ax.set_title(title, fontsize=12)
        ax.set_xlim(24, 70)
        ax.set_ylim(-0.03, 1.1)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.25)
    for ax in axes[-1]:
        ax.set_xlabel('PSNR of the protected copy (dB)', fontsize=11)
    for ax in axes[:, 0]:
        ax.set_ylabel('victim Dice / clean', fontsize=11)
    handles = [plt.Line2D([], [], color=c, marker='o', lw=1.5, label=f) for f, c in colours.items()]
    handles += [plt.Line2D([], [], color='k', ls='--', label='amplitude rule'),
                plt.Line2D([], [], color='grey', marker='o', ls='-', label='stock victim (purified panels)'),
                plt.Line2D([], [], color='grey', marker='s', ls='--', label='no-augmentation victim')]
    fig.legend(handles=handles, loc='lower center', ncol=5, fontsize=11, frameon=False)
    fig.suptitle(f'{dataset}: best code per family and budget, per exploiter (goal: below 0.05 right of 50 dB)',
                 fontsize=13)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(png, dpi=80)
    plt.close(fig)


@figure
def amplitude_rule_png(r: Results, png: Path) -> None:
    """The amplitude rule: per-seed points of the fitted codes, the other codes' means, the fit and the goal (the
    same content as benchmarks/amplitude_rule.py's figure, at a size a repository page shows legibly)."""
    data = r.get('amplitude_rule_20*.json')
    if data is None:
        return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    fit, shift = data['fit'], data['whole_minus_roi_db']
    fig, ax = plt.subplots(figsize=(9, 5))
    x = [row['psnr_roi'] for row in data['rows'] for _ in row['ratio_per_seed']]
    ax.plot(x, [v for row in data['rows'] for v in row['ratio_per_seed']], 'o', color='tab:blue', ms=6,
            label='fitted codes: offset, gratings (per seed)')
    for k, method in enumerate(sorted({o['cell'].split('@')[0] for o in data['others']})):
        pts = sorted((o['psnr_roi'], o['ratio']) for o in data['others'] if o['cell'].split('@')[0] == method)
        ax.plot(*zip(*pts), 'x--', ms=7, lw=1, color=plt.get_cmap('tab10').colors[k + 1], label=method)
    grid = np.linspace(5, 50, 200)
    ax.plot(grid, 1 / (1 + np.exp((fit['x50'] - grid) / fit['s'])), 'k-', lw=1.5,
            label=f'fit: x50 {fit["x50"]:.1f} dB, s {fit["s"]:.2f} dB')
    ax.axhline(0.05, color='k', lw=0.8, ls=':')
    ax.axvline(50 - shift, color='tab:red', lw=1, ls=':',
               label=f'the 50 dB goal over the whole volume (ROI {50 - shift:.1f} dB here)')
    save_rule_axes(fig, ax, png, f'The amplitude rule, Hippocampus ({len(data["rows"])} fitted cells)',
                   'stock victim Dice / clean', legend_size=10)


def save_rule_axes(fig, ax, png: Path, title: str, ylabel: str, legend_size: int, outside: bool = False) -> None:
    """Label a Dice / clean against ROI PSNR panel the one way the rule's figures share, and save it (``outside``:
    the legend right of the axes, for panels whose points fill the corner)."""
    import matplotlib.pyplot as plt
    ax.set_xlabel("the code's PSNR inside the labels (dB)", fontsize=12)
    ax.set_ylabel(ylabel, fontsize=12)
    ax.set_title(title, fontsize=13)
    ax.tick_params(labelsize=11)
    ax.grid(alpha=0.25)
    if outside:
        ax.legend(fontsize=legend_size, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=legend_size, loc='lower right')
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


@figure
def acdc_rule_png(r: Results, png: Path) -> None:
    """ACDC's measured cells (one marker per victim profile, bars: the 95% bootstrap interval) against the Hippocampus
    rule that predicted them, and the joint refit."""
    data, rule = r.get('acdc_20*.json'), r.get('amplitude_rule_20*.json')
    if data is None or rule is None:
        return
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(14, 5.5))
    grid = np.linspace(5, 45, 200)
    h = rule['fit']
    ax.plot(grid, 1 / (1 + np.exp((h['x50'] - grid) / h['s'])), 'k-', lw=1.5,
            label=f'Hippocampus rule (prediction): x50 {h["x50"]:.1f} dB, s {h["s"]:.2f} dB')
    j = data['refit'].get('joint_fit')
    if j:
        ax.plot(grid, 1 / (1 + np.exp((j['x50'] - grid) / j['s'])), 'k--', lw=1,
                label=f'refit on both datasets: x50 {j["x50"]:.1f} dB, s {j["s"]:.2f} dB')
    markers = {'offset': 'o', 'conv': 's', 'random': '^', 'checkerboard': 'D', 'EM-samplewise': 'v'}
    for k, (config, v) in enumerate(data['configurations'].items()):
        if not v['cells']:
            continue
        clean = ' / '.join(f'{c["dice"]:.2f}' for c in v['clean'].values())
        colour = plt.get_cmap('tab10').colors[k]
        for method, marker in markers.items():
            cells = [c for c in v['cells'] if c['cell'].split(':')[0].split('@')[0] == method and not c.get('defence')]
            if not cells:
                continue
            err = [[c['ratio'] - c['ci95'][0] if c.get('ci95') else 0 for c in cells],
                   [c['ci95'][1] - c['ratio'] if c.get('ci95') else 0 for c in cells]]
            ax.errorbar([c['psnr_roi'] for c in cells], [c['ratio'] for c in cells], yerr=err, fmt=marker, ms=7,
                        capsize=3, color=colour, label=f'ACDC {config} (clean Dice {clean}): {method}')
    ax.axhline(0.05, color='k', lw=0.8, ls=':')
    ax.set_ylim(-0.05, 1.15)
    save_rule_axes(fig, ax, png, 'ACDC against the Hippocampus rule (markers: the method, colours: the victim)',
                   'victim Dice / clean', legend_size=9, outside=True)


@figure
def perturbations_png(r: Results, png: Path) -> None:
    """Each export-time method's delta on one phantom case (one colour scale for all) and the protected slice."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    from nnunetv2_voxshield.baselines import LSPSource
    from nnunetv2_voxshield.controls import BoundaryShiftSource, EdgeSource, LabelCodedSource
    from nnunetv2_voxshield.perturbation import RandomSource
    from nnunetv2_voxshield.phantom import synthesize_case
    image, seg, _ = synthesize_case(np.random.default_rng(0), uint8=False, spacing_z=1.0)
    image = image.astype(np.float64)
    lo, hi = np.percentile(image, (0.5, 99.5))
    b = 16 / 255 * (hi - lo)
    methods = [('random', RandomSource(seed=0)), ('LSP', LSPSource(seed=0)),
               ('offset', LabelCodedSource('offset')), ('checkerboard', LabelCodedSource('checkerboard')),
               ('stripes', LabelCodedSource('stripes', block=4)), ('diagonal', LabelCodedSource('diagonal', block=4)),
               ('smooth', LabelCodedSource('smooth')), ('edge', EdgeSource(width=1)),
               ('grow', BoundaryShiftSource('grow', width=2))]
    z = int(np.argmax((seg > 0).sum(axis=(1, 2))))
    ys, xs = np.nonzero(seg[z])
    crop = (slice(max(ys.min() - 5, 0), ys.max() + 6), slice(max(xs.min() - 5, 0), xs.max() + 6))
    image, seg = image[:, crop[0], crop[1]], seg[:, crop[0], crop[1]]
    fig, axes = plt.subplots(4, 5, figsize=(11, 9.6))
    slots = [(0, 1), (0, 2), (0, 3), (0, 4), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4)]  # delta row; protected below
    axes[0, 0].imshow(image[z], cmap='gray', vmin=lo, vmax=hi, interpolation='nearest')
    axes[0, 0].set_title('clean', fontsize=12)
    axes[1, 0].imshow(seg[z], cmap='viridis', interpolation='nearest')
    axes[1, 0].set_title('labels', fontsize=12)
    for (row, col), (name, src) in zip(slots, methods):
        if hasattr(src, 'compute_delta_raw'):
            delta = src.compute_delta_raw(image[None], seg, np.array([b]), 'phantom_000')[0]
        else:
            delta = src.compute_delta(image[None].astype(np.float32), seg[None], np.array([b], np.float32),
                                      'phantom_000')[0]
        delta = np.clip(delta, -b, b)
        im = axes[row, col].imshow(delta[z], cmap='RdBu_r', vmin=-b, vmax=b, interpolation='nearest')
        axes[row, col].set_title(f'{name}: delta', fontsize=12)
        axes[row + 1, col].imshow(np.clip(image[z] + delta[z], lo, hi), cmap='gray', vmin=lo, vmax=hi,
                                  interpolation='nearest')
        axes[row + 1, col].set_title(f'{name}: protected', fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    cbar = fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
    cbar.set_ticks([-b, 0, b])
    cbar.set_ticklabels(['-eps', '0', '+eps'])
    cbar.ax.tick_params(labelsize=11)
    fig.suptitle('Export-time methods at eps = 16/255 on one phantom slice (delta: one colour scale for all)',
                 fontsize=13)
    fig.savefig(png, dpi=80, bbox_inches='tight')
    plt.close(fig)


@figure
def audit_png(r: Results, png: Path) -> None:
    """The audit's own bars (nnunetv2_voxshield.verdict.figures) from a committed audit report; nothing until one
    exists."""
    data = audit_report(r)
    if data is None:
        return
    import tempfile
    from nnunetv2_voxshield.verdict import figures as audit_figures
    with tempfile.TemporaryDirectory() as tmp:
        bars = audit_figures(data, tmp)[0]
        Path(bars).replace(png)


# ---------------------------------------------------------------------------------------------------------- render
def render_results_md(r: Results) -> str:
    """The text of docs/results.md: every registered section whose results exist, in order."""
    parts = ['# Results', '',
             '<!-- Generated by `python benchmarks/render_docs.py` from benchmarks/results/*.json. Do not edit. -->',
             '',
             'Every table and figure here is rendered from the committed results files; each file records its '
             'command, commit, date and machine (last section). Method names and exploiter profiles: '
             '[evaluation.md](evaluation.md); what the numbers mean: [findings.md](findings.md).', '']
    for title, name in SECTIONS:
        body = BLOCKS[name](r)
        if body is not None:
            parts += [f'## {title}', '', body.rstrip('\n'), '']
    return '\n'.join(parts)


def render_marked(text: str, r: Results) -> str:
    """Replace the body of each <!-- results:NAME --> block of ``text`` with the block's rendering."""
    def sub(m):
        fn = BLOCKS.get(m.group(2))
        if fn is None:
            raise KeyError(f'unknown results block {m.group(2)!r} (known: {", ".join(sorted(BLOCKS))})')
        body = fn(r)
        body = '*(not measured yet)*' if body is None else body.rstrip('\n')
        return m.group(1) + body + '\n' + m.group(4)
    return MARK.sub(sub, text)


def render_all(root: Path = ROOT, results: Path = RESULTS) -> dict:
    """{path: text} of every generated markdown file (results.md and the files in MARKED that exist)."""
    r = Results(results)
    out = {root / 'docs' / 'results.md': render_results_md(r)}
    for rel in MARKED:
        path = root / rel
        if path.is_file():
            out[path] = render_marked(path.read_text(), r)
    return out


def draw_figures(results: Path = RESULTS, folder: Path = FIGURES_DIR) -> list:
    """Draw every registered figure into ``folder``; return the PNGs written."""
    r, written = Results(results), []
    folder.mkdir(parents=True, exist_ok=True)
    for name, fn in FIGURES.items():
        png = folder / f'{name[:-4] if name.endswith("_png") else name}.png'
        tmp = png.with_name('.' + png.name)
        fn(r, tmp)
        if tmp.is_file():
            tmp.replace(png)
            written.append(png)
    return written


def main():
    p = argparse.ArgumentParser(description='Render docs/results.md, the <!-- results:NAME --> blocks of README.md '
                                            'and docs/*.md, and docs/figures/*.png from benchmarks/results/*.json.')
    p.add_argument('--check', action='store_true', help='write nothing; exit 1 naming each file that would change '
                                                        'and each results file without provenance')
    p.add_argument('--no-figures', action='store_true', help='do not draw docs/figures/*.png')
    args = p.parse_args()
    bad = missing_provenance()
    if bad:
        print(f'benchmarks/results: no complete provenance {{{", ".join(PROVENANCE_KEYS)}}} in: {", ".join(bad)}',
              file=sys.stderr)
        if args.check:
            return 1
    rendered = render_all()
    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, t in rendered.items() if not p.is_file() or p.read_text() != t]
        if stale:
            print('out of date (run python benchmarks/render_docs.py): ' + ', '.join(stale), file=sys.stderr)
        return 1 if stale else 0
    for path, text in rendered.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_name('.' + path.name + '.tmp')
            tmp.write_text(text)
            tmp.replace(path)
            print(f'wrote {path.relative_to(ROOT)}')
    if not args.no_figures:
        for png in draw_figures():
            print(f'drew {png.relative_to(ROOT)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
