"""``voxshield_audit``: does a protected copy of a dataset protect it against an exploiter panel of stock nnU-Net
victims? One command, a DAG of jobs (plan / purify / train / predict / score / quality / detector) on
``jobs.run_jobs`` (local worker processes or Slurm through submitit), a verdict line and report.json / report.md /
bars.png / frontier.png in OUT.

Layout of OUT (the inputs are only read): audit.json (the inputs this folder is pinned to), nnUNet_raw/ (links to
the training cases of the clean data and of each copy, purified copies), nnUNet_preprocessed/, nnUNet_results/seed_S/,
test/ (links to the held-out test cases of a split), jobs/<name>/ (log.txt, done.json: the engine's records).
Rerunning the same command resumes: finished jobs are skipped, a killed training continues from its checkpoint.
"""
import argparse
import functools
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

from nnunetv2_voxshield import audit_jobs as J
from nnunetv2_voxshield import verdict as VD
from nnunetv2_voxshield.dataset_io import (InputError, find_dataset_folder, geometry, geometry_mismatch,
                                           list_training_cases, load_dataset_json, read_header, sha256_of,
                                           write_json_atomic)
from nnunetv2_voxshield.panel import Panel, PanelError, build_panel, check_trainers

BACKENDS = ('local', 'slurm')
RULE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'results',
                         'amplitude_rule_2026-12-02.json')


class AuditError(ValueError):
    """Bad input to the audit, refused before any job starts; one line naming the culprit."""


# ----------------------------------------------------------------------------------------- inputs
def resolve_dataset(text: str) -> str:
    """A raw dataset folder, or an id / DatasetXXX_Name in $nnUNet_raw (nnU-Net's lookup; two folders with one id
    are refused) -> absolute folder."""
    if os.path.isdir(text):
        return os.path.abspath(text)
    raw = os.environ.get('nnUNet_raw')
    if not raw or not os.path.isdir(raw):
        raise AuditError(f'{text}: not a folder, and nnUNet_raw is not set to a folder')
    try:
        return os.path.abspath(find_dataset_folder(raw, str(text)))
    except InputError as e:
        raise AuditError(str(e)) from None


def patient_of(case: str, group_regex: Optional[str]) -> str:
    """The patient of a case id under ``group_regex`` (its first group, e.g. '(patient\\d+)_frame\\d+'), else the
    case itself."""
    if not group_regex:
        return case
    m = re.match(group_regex, case)
    return m.group(1) if m and m.groups() else case


def check_no_overlap(train: Sequence[str], test: Sequence[str], group_regex: Optional[str], where: str) -> None:
    """Refuse a test set sharing a case (or, under a patient grouping, a patient) with the training cases."""
    same = sorted(set(train) & set(test))
    if same:
        raise AuditError(f'{where}: test case(s) {", ".join(same[:3])} are also training cases')
    if group_regex:
        patients = {patient_of(c, group_regex) for c in train}
        shared = sorted({patient_of(c, group_regex) for c in test} & patients)
        if shared:
            raise AuditError(f'{where}: patient(s) {", ".join(shared[:3])} have cases on both sides of the split '
                             f'(--group-regex {group_regex})')


def case_geometry(files: dict) -> dict:
    return geometry(read_header(files['images'][0]))


def check_copy(clean: dict, copy_dir: str, train_cases: Sequence[str]) -> None:
    """Refuse a protected copy whose labels (dataset.json and label files), cases or per-case geometry (shape,
    spacing) differ from the clean dataset's training cases."""
    try:
        copy_json = load_dataset_json(copy_dir)
        cases = list_training_cases(copy_dir, copy_json)
    except InputError as e:
        raise AuditError(str(e)) from None
    if copy_json['labels'] != clean['json']['labels']:
        raise AuditError(f'{os.path.join(copy_dir, "dataset.json")}: labels {copy_json["labels"]} differ from the '
                         f'clean dataset\'s {clean["json"]["labels"]}')
    missing = [c for c in train_cases if c not in cases]
    if missing:
        raise AuditError(f'{copy_dir}: training case(s) {", ".join(missing[:3])} of the clean dataset are missing')
    for c in train_cases:
        a, b = clean['cases'][c], cases[c]
        if len(a['images']) != len(b['images']):
            raise AuditError(f'{b["images"][0]}: {len(b["images"])} channels, the clean case has {len(a["images"])}')
        ga, gb = case_geometry(a), case_geometry(b)
        bad = 'shape' if ga['shape'] != gb['shape'] else geometry_mismatch(ga, gb)
        if bad in ('shape', 'spacing'):
            raise AuditError(f'{b["images"][0]}: {bad} {gb[bad]} differs from the clean case\'s {ga[bad]}')
        if sha256_of(a['label']) != sha256_of(b['label']) and not _same_label(a['label'], b['label']):
            raise AuditError(f'{b["label"]}: label differs from the clean label {a["label"]}')


def _same_label(a: str, b: str) -> bool:
    import numpy as np
    import SimpleITK as sitk
    x, y = (sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in (a, b))
    return x.shape == y.shape and bool(np.array_equal(x, y))


def test_set(clean_dir: str, clean: dict, test_images: Optional[str], test_labels: Optional[str],
             split: Optional[str], group_regex: Optional[str]) -> dict:
    """{'train': training case ids, 'test': test case ids, 'images'/'labels': test folders or None (a split's
    cases of the clean dataset, linked into OUT/test)}, checked for overlap."""
    ending = clean['json']['file_ending']
    if split:
        try:
            data = json.load(open(split))
            train, test = list(data['train']), list(data['test'])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AuditError(f'{split}: not a split file {{"train": [...], "test": [...]}} ({e})') from None
        unknown = [c for c in train + test if c not in clean['cases']]
        if unknown:
            raise AuditError(f'{split}: case(s) {", ".join(unknown[:3])} are not training cases of {clean_dir}')
        check_no_overlap(train, test, group_regex, split)
        return {'train': sorted(train), 'test': sorted(test), 'images': None, 'labels': None}
    images = os.path.abspath(test_images or os.path.join(clean_dir, 'imagesTs'))
    labels = os.path.abspath(test_labels or os.path.join(clean_dir, 'labelsTs'))
    from nnunetv2_voxshield.evaluate import EvaluationError, test_cases
    try:
        test = test_cases(images, labels, ending)
    except EvaluationError as e:
        raise AuditError(str(e)) from None
    train = sorted(clean['cases'])
    check_no_overlap(train, test, group_regex, images)
    return {'train': train, 'test': test, 'images': images, 'labels': labels}


def slurm_minutes(text: str) -> int:
    """Slurm time '90', '12:00:00', '1-12:00:00' or '30:00' (MM:SS) -> minutes (submitit's timeout_min)."""
    m = re.fullmatch(r'(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?', str(text).strip())
    if not m:
        raise AuditError(f'--time {text!r}: expected minutes, MM:SS, HH:MM:SS or D-HH:MM:SS')
    d, a, b, c = (int(x) if x else None for x in m.groups())
    if b is None:
        minutes = a
    elif c is None:
        minutes = a + (1 if b else 0) if d is None else a * 60 + b
    else:
        minutes = a * 60 + b + (1 if c else 0)
    return (d or 0) * 24 * 60 + minutes


def parse_slurm(partition=None, time=None, gpus=None, mem=None, sbatch_extra=()) -> dict:
    """Slurm options -> submitit AutoExecutor parameters (slurm_partition, timeout_min, gpus_per_node, mem_gb,
    slurm_additional_parameters)."""
    extra = {}
    for item in sbatch_extra or ():
        key, eq, value = item.lstrip('-').partition('=')
        if not key or not eq:
            raise AuditError(f'--sbatch-extra {item!r}: expected KEY=VALUE (e.g. account=abc)')
        extra[key.replace('-', '_')] = value
    out = {}
    if partition:
        out['slurm_partition'] = partition
    if time:
        out['timeout_min'] = slurm_minutes(time)
    if gpus is not None:
        out['gpus_per_node'] = int(gpus)
    if mem:
        m = re.fullmatch(r'(\d+)\s*([GgMm]?)[Bb]?', str(mem).strip())
        if not m:
            raise AuditError(f'--mem {mem!r}: expected e.g. 32G or 16000M')
        out['mem_gb'] = int(m.group(1)) if m.group(2).lower() != 'm' else max(1, int(m.group(1)) // 1024)
    if extra:
        out['slurm_additional_parameters'] = extra
    return out


# ----------------------------------------------------------------------------------------- workspace
def _atomic_dir(build, dst: str) -> None:
    """Create folder ``dst`` through ``build(tmp)`` and a rename; another run that made it first wins."""
    if os.path.isdir(dst):
        return
    tmp = f'{dst}.tmp{os.getpid()}'
    build(tmp)
    try:
        os.rename(tmp, dst)
    except OSError:
        if not os.path.isdir(dst):
            raise
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def link_cases(src_cases: Dict[str, dict], cases: Sequence[str], dataset_json: dict, dst: str,
               images: str = 'imagesTr', labels: str = 'labelsTr') -> None:
    """A raw dataset of symlinks to ``cases`` of a listing (the sources are only read)."""
    def build(tmp):
        os.makedirs(os.path.join(tmp, images))
        os.makedirs(os.path.join(tmp, labels))
        for c in cases:
            for f in src_cases[c]['images'] + [src_cases[c]['label']]:
                sub = labels if f == src_cases[c]['label'] else images
                os.symlink(os.path.abspath(f), os.path.join(tmp, sub, os.path.basename(f)))
        with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
            json.dump({**dataset_json, 'numTraining': len(cases)}, f, indent=2)
    _atomic_dir(build, dst)


def row_dataset_id(out: str, row: str) -> int:
    """The dataset id of a row in OUT: assigned once (lock-free: an id is claimed by an exclusive create)."""
    ids = os.path.join(out, 'ids')
    os.makedirs(ids, exist_ok=True)
    path = os.path.join(ids, row)
    if not os.path.isfile(path):
        n = 1
        while True:
            try:
                os.close(os.open(os.path.join(ids, f'.claim_{n:03d}'), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                n += 1
        try:
            fd = os.open(path + '.tmp%d' % os.getpid(), os.O_CREAT | os.O_WRONLY)
            os.write(fd, str(n).encode())
            os.close(fd)
            os.link(path + '.tmp%d' % os.getpid(), path)
        except FileExistsError:
            pass
        finally:
            os.remove(path + '.tmp%d' % os.getpid())
    return int(open(path).read())


def pin_inputs(out: str, pinned: dict) -> None:
    """audit.json: the inputs OUT was made for; another clean/protected/test set in the same OUT is refused."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, 'audit.json')
    if os.path.isfile(path):
        old = json.load(open(path))
        for k, v in pinned.items():
            if old.get(k) != v:
                raise AuditError(f'{path}: OUT was made for another {k} ({str(old.get(k))[:80]}); use another -o')
        return
    write_json_atomic(pinned, path)


# ----------------------------------------------------------------------------------------- the DAG
def _safe(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.+-]', '-', text)


def copy_names(protected: Sequence[str], names: Optional[Sequence[str]]) -> List[str]:
    if names:
        if len(names) != len(protected):
            raise AuditError(f'--name: {len(names)} names for {len(protected)} protected copies')
        return list(names)
    return ['protected'] if len(protected) == 1 else [f'protected{i + 1}' for i in range(len(protected))]


def build_jobs(out: str, panel: Panel, trainers: Dict[str, str], rows: Dict[str, str], copies: List[str],
               tests: dict, ending: str, dataset_json: dict, device: str, disable_tta: bool, eps: Optional[float],
               detector: bool, clean_dir: str, threads: int = 1, gpus: int = 0,
               row_deps: Optional[Dict[str, List[str]]] = None) -> tuple:
    """(jobs, victims): the DAG of an audit and {(row, profile, seed): score job name}. ``row_deps``: jobs that
    make a row's data (the protection map's export jobs), before anything that reads it."""
    row_deps = dict(row_deps or {})
    from nnunetv2_voxshield.defences import defence_key
    from nnunetv2_voxshield.jobs import Job
    jobs: Dict[str, object] = {}
    victims: Dict[tuple, str] = {}
    plans_of_row: Dict[str, Dict[str, List[str]]] = {}

    def row_of(base: str, profile) -> str:
        return base if profile.defence is None else f'{base}+{defence_key(profile.defence)}'

    needed = []  # (row, profile) of every victim
    for p in panel.profiles:
        for base in ['clean'] + copies:
            needed.append((row_of(base, p), p))
        if p.defence is not None:  # the unpurified clean victim of the same trainer: the ratio's reference
            needed.append(('clean', p))
    for row, p in needed:
        if row not in rows:
            base, key = row.split('+', 1)
            dst = os.path.join(out, 'nnUNet_raw', f'Dataset{row_dataset_id(out, row):03d}_{row}')
            rows[row] = dst
            jobs[f'purify_{row}'] = Job(f'purify_{_safe(row)}', J.purify_job, (rows[base], dst, p.defence),
                                        deps=list(row_deps.get(base, [])), kind='purify')
            row_deps[row] = [jobs[f'purify_{row}'].name]
        cfgs = plans_of_row.setdefault(row, {}).setdefault(panel.plans_of(p), [])
        if p.configuration not in cfgs:
            cfgs.append(p.configuration)
    for row, plans in plans_of_row.items():
        deps = list(row_deps.get(row, []))
        jobs[f'plan_{row}'] = Job(f'plan_{_safe(row)}', J.plan_job, (out, row_dataset_id(out, row), plans, device),
                                  deps=deps, kind='plan', threads=threads)
    test_images = tests['images'] or os.path.join(out, 'test', 'imagesTs')
    test_labels = tests['labels'] or os.path.join(out, 'test', 'labelsTs')
    for row, p in needed:
        trainer, plans = trainers[p.name], panel.plans_of(p)
        for seed in panel.seeds:
            tag = _safe(f'{row}_{trainer}_{plans}_{p.configuration}_s{seed}')
            if f'train_{tag}' not in jobs:
                jobs[f'train_{tag}'] = Job(f'train_{tag}', J.train_job, (out, row_dataset_id(out, row), p.configuration,
                                                                        seed, trainer, plans, device),
                                           deps=[jobs[f'plan_{row}'].name], kind='train', threads=threads, gpus=gpus,
                                           progress=functools.partial(J.train_progress, total=panel.epochs))
                jobs[f'predict_{tag}'] = Job(f'predict_{tag}', _predict_from, (out, f'train_{tag}', test_images,
                                                                             device, disable_tta),
                                             deps=[f'train_{tag}'], kind='predict', threads=threads, gpus=gpus)
                jobs[f'score_{tag}'] = Job(f'score_{tag}', _score_from, (out, f'predict_{tag}', test_labels,
                                                                       tests['test'], ending, dataset_json),
                                           deps=[f'predict_{tag}'], kind='score')
            victims[(row, p.name, seed)] = f'score_{tag}'
    for row in rows:
        if row != 'clean':
            copy_eps = eps if row in copies else None
            deps = list(row_deps.get(row, []))
            jobs[f'quality_{row}'] = Job(f'quality_{_safe(row)}', J.quality_job,
                                         (clean_dir_of(rows), rows[row], ending, copy_eps), deps=deps, kind='quality')
    if detector:
        jobs['detector'] = Job('detector', J.detector_job, ([rows['clean']] + [rows[c] for c in copies], 400, device),
                               deps=[d for c in copies for d in row_deps.get(c, [])], kind='detector', threads=threads)
    return list(jobs.values()), victims


def clean_dir_of(rows: Dict[str, str]) -> str:
    return rows['clean']


def _record(out: str, name: str) -> dict:
    return json.load(open(os.path.join(out, 'jobs', name, 'done.json')))['result']


def _predict_from(job_dir: str, out: str, train_name: str, test_images: str, device: str, disable_tta: bool) -> dict:
    """predict_job with the model folder from the train job's record."""
    return J.predict_job(job_dir, _record(out, train_name)['model_folder'], test_images, device, disable_tta)


def _score_from(job_dir: str, out: str, predict_name: str, *args) -> dict:
    """score_job with the predictions folder from the predict job's record."""
    return J.score_job(job_dir, _record(out, predict_name)['predictions'], *args)


# ----------------------------------------------------------------------------------------- report
def build_report(out: str, records: dict, panel: Panel, trainers: Dict[str, str], rows: Dict[str, str],
                 copies: List[str], victims: Dict[tuple, str], settings: dict, boot: int) -> dict:
    """The report dict: per copy its verdict line and per exploiter the seed-paired ratio with its interval, per
    label, the purification's cost, quality, detector and the amplitude rule."""
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
            b = VD.bootstrap_ratio(prot, clean, boot)
            if b is None:
                failed = [victims[(r, p.name, s)] for r in (row, 'clean') for s in panel.seeds
                          if not result(victims[(r, p.name, s)])]
                entry['failed'] = ', '.join(failed)
                exploiters.append(entry)
                continue
            first = result(victims[(row, p.name, b['seeds'][0])])
            labels = list(next(iter(first['cases'].values()))['labels'])
            entry.update(ratio=b, status=VD.classify(b['per_seed'], protects, keeps),
                         seeds=b['seeds'], per_seed=b['per_seed'],
                         dice=sum(sum(v.values()) / len(v) for v in prot.values()) / len(prot),
                         clean_dice=sum(sum(v.values()) / len(v) for v in clean.values()) / len(clean),
                         per_label={l: VD.bootstrap_ratio(per_seed(row, p.name, l), per_seed('clean', p.name, l), boot)
                                    for l in labels})
            if p.defence is not None:
                entry['cost'] = VD.bootstrap_ratio(per_seed(f'clean+{defence_key(p.defence)}', p.name), clean, boot)
            exploiters.append(entry)
        done = [e for e in exploiters if not e.get('failed')]
        line = VD.verdict_line(done, protects, keeps) if done else 'No verdict: every exploiter failed'
        if len(done) < len(exploiters):
            line += f'; failed: {", ".join(e["name"] for e in exploiters if e.get("failed"))}'
        q = result(f'quality_{_safe(copy)}') or {}
        stock = next((e for e in done if e['trainer'].startswith('nnUNetTrainer') and e['configuration'] ==
                      '3d_fullres' and not e['defence'] and e['name'] == 'stock'), None)
        copy_rule = None
        if rule and q.get('psnr_roi') is not None:
            copy_rule = {**rule, 'psnr_roi': q['psnr_roi'], 'predicted': VD.rule_ratio(q['psnr_roi'], rule['x50'],
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
    from nnunetv2_voxshield.report import write_atomic
    write_json_atomic(report, os.path.join(out, 'report.json'))
    write_atomic(os.path.join(out, 'report.md'), VD.markdown(report))
    return [os.path.join(out, 'report.json'), os.path.join(out, 'report.md')] + VD.figures(report, out)


# ----------------------------------------------------------------------------------------- the command
def audit(clean: str, protected: Sequence[str], output_dir: str, test_images: Optional[str] = None,
          test_labels: Optional[str] = None, split: Optional[str] = None, group_regex: Optional[str] = None,
          panel: Optional[str] = 'quick', panel_file: Optional[str] = None, exploiters: Sequence[str] = (),
          seeds: Optional[Sequence[int]] = None, epochs: Optional[int] = None, plans: Optional[str] = None,
          names: Optional[Sequence[str]] = None, backend: str = 'local', workers: int = 1, threads: int = 1,
          slurm: Optional[dict] = None, device: str = 'cpu', disable_tta: bool = False, eps: Optional[float] = None,
          detector: Optional[bool] = None, protects: float = VD.PROTECTS, keeps: float = VD.KEEPS,
          rule_file: Optional[str] = RULE_FILE, boot: int = 2000, stream=None) -> dict:
    """Check every input (nothing is started on bad input), run the audit's DAG and write its report."""
    stream = stream or sys.stderr
    if backend not in BACKENDS:
        raise AuditError(f'--backend {backend!r}: unknown backend (choose from {", ".join(BACKENDS)})')
    if workers < 1 or threads < 1:
        raise AuditError(f'-w {workers} / --threads {threads}: must be at least 1')
    if group_regex:
        try:
            re.compile(group_regex)
        except re.error as e:
            raise AuditError(f'--group-regex {group_regex!r}: {e}') from None
    if not protected:
        raise AuditError('--protected: give at least one protected copy')
    try:
        the_panel = build_panel(panel, panel_file, exploiters, seeds, epochs, plans)
    except PanelError as e:
        raise AuditError(str(e)) from None
    from nnunetv2_voxshield.evaluate import parse_plans, EvaluationError
    for p in dict.fromkeys(the_panel.plans_of(p) for p in the_panel.profiles):
        try:
            parse_plans(p)
        except EvaluationError as e:
            raise AuditError(str(e)) from None
    clean_dir = resolve_dataset(clean)
    protected_dirs = [resolve_dataset(p) for p in protected]
    for d in protected_dirs:
        if d == clean_dir:
            raise AuditError(f'{d}: --clean and --protected are the same dataset')
    try:
        clean_json = load_dataset_json(clean_dir)
        listing = {'json': clean_json, 'cases': list_training_cases(clean_dir, clean_json)}
    except InputError as e:
        raise AuditError(str(e)) from None
    tests = test_set(clean_dir, listing, test_images, test_labels, split, group_regex)
    for d in protected_dirs:
        check_copy(listing, d, tests['train'])
    try:
        trainers = check_trainers(the_panel)
    except PanelError as e:
        raise AuditError(str(e)) from None
    copies = copy_names(protected_dirs, names)
    if eps is None:
        from nnunetv2_voxshield.verify import DEFAULT_EPS
        eps = DEFAULT_EPS
    detector = the_panel.name != 'quick' if detector is None else detector
    rule = VD.load_rule(rule_file)

    out = os.path.abspath(output_dir)
    pin_inputs(out, {'clean': clean_dir, 'protected': protected_dirs, 'train': tests['train'], 'test': tests['test']})
    rows = {'clean': os.path.join(out, 'nnUNet_raw', f'Dataset{row_dataset_id(out, "clean"):03d}_clean')}
    link_cases(listing['cases'], tests['train'], clean_json, rows['clean'])
    for name, d in zip(copies, protected_dirs):
        rows[name] = os.path.join(out, 'nnUNet_raw', f'Dataset{row_dataset_id(out, name):03d}_{_safe(name)}')
        link_cases(list_training_cases(d, load_dataset_json(d)), tests['train'], clean_json, rows[name])
    if tests['images'] is None:
        link_cases(listing['cases'], tests['test'], clean_json, os.path.join(out, 'test'), 'imagesTs', 'labelsTs')
    for sub in ('nnUNet_preprocessed', 'nnUNet_results'):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    ending = clean_json['file_ending']
    gpus = 1 if device == 'cuda' else 0
    jobs, victims = build_jobs(out, the_panel, trainers, rows, copies, tests, ending, clean_json, device,
                               disable_tta, eps, detector, clean_dir, threads, gpus)
    from nnunetv2_voxshield.jobs import run_jobs
    records = run_jobs(jobs, out, backend=backend, workers=workers, slurm=slurm, stream=stream)
    settings = {'clean': clean_dir, 'protected': protected_dirs, 'panel': the_panel.to_json(), 'trainers': trainers,
                'n_test_cases': len(tests['test']), 'test_cases': tests['test'], 'protects': protects, 'keeps': keeps,
                'eps': eps, 'rule': rule, 'boot': boot, 'backend': backend, 'workers': workers, 'device': device,
                'split': os.path.abspath(split) if split else None, 'group_regex': group_regex}
    report = build_report(out, records, the_panel, trainers, rows, copies, victims, settings, boot)
    files = write_report(out, report)
    print('\n'.join(report['verdict']) + f'\nreport: {files[1]}', file=stream, flush=True)
    return report


def audit_entry(argv=None):
    parser = argparse.ArgumentParser(
        description='Audit protected copies of a dataset: stock nnU-Net exploiters (a panel of victim trainers, '
                    'configurations, plans and purifications) trained on the clean data and on each copy, scored on '
                    'clean held-out cases; a verdict line and report.json / report.md / PNGs in -o. Jobs run on N '
                    'local workers or on Slurm; rerunning the same command resumes.')
    parser.add_argument('--clean', required=True, help='clean raw dataset: folder, id or DatasetXXX_Name')
    parser.add_argument('--protected', nargs='+', required=True, help='protected copies (any nnU-Net raw folder)')
    parser.add_argument('--name', nargs='+', default=None, help='names of the copies in the report')
    parser.add_argument('--test-images', default=None, help='held-out clean images. Default: imagesTs of --clean')
    parser.add_argument('--test-labels', default=None, help='their labels. Default: labelsTs of --clean')
    parser.add_argument('--split', default=None, help='split file {"train": [...], "test": [...]} over the clean '
                                                      'dataset\'s training cases (instead of test folders)')
    parser.add_argument('--group-regex', default=None,
                        help='patient of a case id (first group), e.g. \'(patient\\d+)_frame\\d+\': a patient may '
                             'not be on both sides')
    parser.add_argument('--panel', default=None, help='preset: quick, standard or full (default: quick unless '
                                                      '--panel-file / --exploiter are given)')
    parser.add_argument('--panel-file', default=None, help='JSON or YAML panel (profiles, seeds, epochs, plans)')
    parser.add_argument('--exploiter', action='append', default=[], metavar='NAME=Trainer[:config][:plans]',
                        help='add an exploiter profile (any trainer class nnU-Net finds); repeatable')
    parser.add_argument('--seeds', nargs='+', type=int, default=None, help='victim seeds (default: the panel\'s)')
    parser.add_argument('--epochs', type=int, default=None,
                        help='victim epochs: trains <trainer>_<N>epochs (default: each trainer\'s schedule)')
    parser.add_argument('-p', default=None, help='victim plans: nnUNetPlans (the dataset\'s own, default) or a '
                                                 'preset such as nnUNetPlans_cpu')
    parser.add_argument('--eps', type=float, default=None, help='budget for voxshield_verify\'s budget use '
                                                                '(default: verify\'s)')
    parser.add_argument('--detector', action=argparse.BooleanOptionalAction, default=None,
                        help='residual-only detector (default: off for quick, on otherwise)')
    parser.add_argument('--protects', type=float, default=VD.PROTECTS, help='"protects" at <= this Dice / clean')
    parser.add_argument('--keeps', type=float, default=VD.KEEPS, help='"does not protect" at >= this Dice / clean')
    parser.add_argument('--rule', default=RULE_FILE, help='amplitude rule fit (benchmarks/amplitude_rule.py JSON)')
    parser.add_argument('--boot', type=int, default=2000, help='bootstrap resamples (0: no intervals)')
    parser.add_argument('-o', required=True, help='output folder (resumable)')
    parser.add_argument('--backend', default='local', help='local (default) or slurm')
    parser.add_argument('-w', '--workers', type=int, default=1, help='jobs at a time (local backend)')
    parser.add_argument('--threads', type=int, default=1, help='CPU threads per job')
    parser.add_argument('--partition', default=None)
    parser.add_argument('--time', default=None, help='Slurm time limit per job, e.g. 12:00:00 or minutes')
    parser.add_argument('--gpus', type=int, default=None, help='GPUs per Slurm job')
    parser.add_argument('--mem', default=None, help='memory per Slurm job, e.g. 32G')
    parser.add_argument('--sbatch-extra', nargs='*', default=[], metavar='KEY=VALUE', help='more sbatch options')
    parser.add_argument('-device', default='cpu', choices=('cpu', 'cuda'), help='Default: cpu')
    parser.add_argument('--disable-tta', action='store_true', help='predict without mirroring (faster)')
    args = parser.parse_args(argv)
    panel = args.panel if args.panel or args.panel_file or args.exploiter else 'quick'
    try:
        slurm = parse_slurm(args.partition, args.time, args.gpus, args.mem, args.sbatch_extra)
        audit(args.clean, args.protected, args.o, args.test_images, args.test_labels, args.split, args.group_regex,
              panel, args.panel_file, args.exploiter, args.seeds, args.epochs, args.p, args.name, args.backend,
              args.workers, args.threads, slurm, args.device, args.disable_tta, args.eps, args.detector,
              args.protects, args.keeps, args.rule, args.boot)
    except (AuditError, InputError) as e:
        sys.exit(f'voxshield_audit: error: {e}')
    except KeyboardInterrupt:
        sys.exit('voxshield_audit: interrupted; rerun the same command to resume')


if __name__ == '__main__':
    audit_entry()
