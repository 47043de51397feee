"""``voxshield_evaluate``: stock nnU-Net victims trained on clean, protected and purified data, scored on clean tests.

Layout of OUT (everything private, the input datasets are only read):
  nnUNet_raw/Dataset00K_<row>       links to the clean / protected data, or purified copies (defences.py)
  nnUNet_preprocessed/              the victims' own fingerprints, plans and preprocessed data
  nnUNet_results/seed_S/            trained victims, one nnU-Net results root per seed
  victims/<row>/<config>/seed_S/    predictions/, logs, scores.json (= finished marker: skipped on rerun)
  quality/<row>.json                PSNR/SSIM of the row's training images against the clean ones
  report.json, report.md, figure.png
"""
import argparse
import functools
import json
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from nnunetv2_voxshield import victims as V
from nnunetv2_voxshield.audit_jobs import _safe, purify_job, train_progress
from nnunetv2_voxshield.defences import defence_key, describe_defence
from nnunetv2_voxshield.dataset_io import write_json_atomic
from nnunetv2_voxshield.report import (make_figure, markdown_report, quality_summary, summarise_seeds,
                                       summarise_victim, write_atomic)


class EvaluationError(ValueError):
    """A problem the user can fix (bad path, bad option, inconsistent OUT folder)."""


# ----------------------------------------------------------------------------------------- inputs
def resolve_raw_dataset(name_or_id: str) -> str:
    """A dataset folder, a dataset id or a DatasetXXX_Name in $nnUNet_raw -> absolute folder with dataset.json (ids
    through dataset_io.find_dataset_folder, nnU-Net's lookup: two folders with one id are refused)."""
    from nnunetv2_voxshield.dataset_io import InputError, find_dataset_folder
    text = str(name_or_id)
    if os.path.isdir(text):
        folder = text
    else:
        raw = os.environ.get('nnUNet_raw')
        if not raw:
            raise EvaluationError(f'{text}: not a folder and nnUNet_raw is not set')
        try:
            folder = find_dataset_folder(raw, text) if text.isdigit() or text.startswith('Dataset') \
                else os.path.join(raw, text)
        except InputError as e:
            raise EvaluationError(str(e)) from None
    folder = os.path.abspath(folder)
    for need in ('dataset.json', 'imagesTr', 'labelsTr'):
        if not os.path.exists(os.path.join(folder, need)):
            raise EvaluationError(f'{folder}: {need} not found (not an nnU-Net raw dataset)')
    return folder


def load_dataset_json(folder: str) -> dict:
    """dataset.json of a raw dataset folder; EvaluationError naming the file if it cannot be read."""
    path = os.path.join(folder, 'dataset.json')
    try:
        return json.load(open(path))
    except (json.JSONDecodeError, OSError) as e:
        raise EvaluationError(f'{path}: cannot read ({e})') from None


def channel_files(images_dir: str, ending: str) -> Dict[str, List[str]]:
    """case id -> sorted channel files (CASE_XXXX<ending>)."""
    cases: Dict[str, List[str]] = {}
    for f in sorted(os.listdir(images_dir)):
        m = re.fullmatch(rf'(.+)_(\d{{4}}){re.escape(ending)}', f)
        if m:
            cases.setdefault(m.group(1), []).append(os.path.join(images_dir, f))
    return cases


def test_cases(test_images: str, test_labels: str, ending: str) -> List[str]:
    """Case ids present in both test folders; error if an image has no label."""
    for d in (test_images, test_labels):
        if not os.path.isdir(d):
            raise EvaluationError(f'{d}: test folder not found')
    cases = sorted(channel_files(test_images, ending))
    if not cases:
        raise EvaluationError(f'{test_images}: no images named CASE_0000{ending}')
    missing = [c for c in cases if not os.path.isfile(os.path.join(test_labels, c + ending))]
    if missing:
        raise EvaluationError(f'{test_labels}: no label for test case(s) {", ".join(missing[:5])}')
    return cases


def parse_plans(plans: str) -> Optional[str]:
    """Stock plans ('nnUNetPlans', 'nnUNetResEncUNetMPlans', ...) -> None; '<stock plans>_<preset>' -> the preset
    (plans.py applies it on top of the victim's own stock plans)."""
    from nnunetv2_voxshield.plans import split_plans_name
    try:
        return split_plans_name(plans)[2]
    except ValueError as e:
        raise EvaluationError(str(e)) from None


# ----------------------------------------------------------------------------------------- state
class Workspace:
    """OUT and its private nnU-Net roots; ``state.json`` pins the inputs and the rows' dataset ids."""

    def __init__(self, out: str, clean: str, protected: List[str]):
        self.out = os.path.abspath(out)
        self.raw = os.path.join(self.out, 'nnUNet_raw')
        self.preprocessed = os.path.join(self.out, 'nnUNet_preprocessed')
        for d in (self.raw, self.preprocessed, os.path.join(self.out, 'quality')):
            os.makedirs(d, exist_ok=True)
        self.state_file = os.path.join(self.out, 'state.json')
        self.state = {'clean': clean, 'protected': protected, 'datasets': {}}
        if os.path.isfile(self.state_file):
            old = json.load(open(self.state_file))
            for k in ('clean', 'protected'):
                if old.get(k) != self.state[k]:
                    raise EvaluationError(f'{self.state_file}: OUT was made for --{k} {old.get(k)}, not '
                                          f'{self.state[k]}; use another -o')
            self.state = old
        self.save()

    def save(self) -> None:
        """Write state.json (dataset ids of the rows) atomically."""
        write_atomic(self.state_file, json.dumps(self.state, indent=2))

    def dataset_id(self, row: str) -> int:
        """The private dataset id of a row, assigned (next free id, saved) on first use."""
        ids = self.state['datasets']
        if row not in ids:
            ids[row] = max(ids.values(), default=0) + 1
            self.save()
        return ids[row]

    def dataset_dir(self, row: str) -> str:
        """OUT/nnUNet_raw/DatasetXXX_<row>: the row's private raw dataset folder."""
        return os.path.join(self.raw, f'Dataset{self.dataset_id(row):03d}_{row}')

    def results(self, seed: int) -> str:
        """OUT/nnUNet_results/seed_S: the results root of the victims of one seed."""
        return os.path.join(self.out, 'nnUNet_results', f'seed_{seed}')

    def env(self, seed: int, device: str) -> Dict[str, str]:
        """The environment of an nnU-Net subprocess: this OUT's private nnUNet_* folders for ``seed``."""
        return V.nnunet_env(self.raw, self.preprocessed, self.results(seed), device)

    def victim_dir(self, row: str, config: str, seed: int) -> str:
        """OUT/victims/<row>/<config>/seed_S: a victim's predictions, logs and scores.json."""
        return os.path.join(self.out, 'victims', row, config, f'seed_{seed}')


def link_dataset(src: str, dst: str) -> None:
    """Private raw dataset = copied dataset.json + symlinks to the source's imagesTr / labelsTr (read-only use)."""
    if os.path.isdir(dst):
        return
    tmp = dst + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copy(os.path.join(src, 'dataset.json'), tmp)
    for sub in ('imagesTr', 'labelsTr'):
        os.symlink(os.path.join(src, sub), os.path.join(tmp, sub))
    os.replace(tmp, dst)


# ----------------------------------------------------------------------------------------- steps
def image_quality(clean_dir: str, row_dir: str, ending: str) -> dict:
    """PSNR/SSIM of every training image of ``row_dir`` against the clean one (whole volume and label ROI)."""
    import SimpleITK as sitk
    from nnunetv2_voxshield.metrics import psnr, ssim, ssim_in_mask

    clean_cases = channel_files(os.path.join(clean_dir, 'imagesTr'), ending)
    row_cases = channel_files(os.path.join(row_dir, 'imagesTr'), ending)
    common = sorted(set(clean_cases) & set(row_cases))
    if not common:
        raise EvaluationError(f'{row_dir}: no training case in common with the clean dataset {clean_dir}')
    per_case = []
    for case in common:
        roi = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(clean_dir, 'labelsTr', case + ending))) > 0
        values = {'psnr': [], 'psnr_roi': [], 'ssim': [], 'ssim_roi': []}
        for fc, fp in zip(clean_cases[case], row_cases[case]):
            c = sitk.GetArrayFromImage(sitk.ReadImage(fc)).astype(np.float64)
            p = sitk.GetArrayFromImage(sitk.ReadImage(fp)).astype(np.float64)
            if c.shape != p.shape:
                raise EvaluationError(f'{fp}: shape {p.shape} differs from the clean image {c.shape}')
            values['psnr'].append(psnr(c, p))
            values['psnr_roi'].append(psnr(c, p, roi))
            values['ssim'].append(ssim(c, p))
            values['ssim_roi'].append(ssim_in_mask(c, p, roi))
        per_case.append({'case': case, **{k: float(np.mean(v)) for k, v in values.items()}})
    return {'per_case': per_case, 'summary': quality_summary(per_case)}


def score_predictions(pred_dir: str, test_labels: str, cases: Sequence[str], ending: str,
                      dataset_json: dict) -> List[dict]:
    """Dice/HD95 of each predicted test case against its clean label."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2_voxshield.metrics import score_case_files

    lm = LabelManager(dataset_json['labels'], dataset_json.get('regions_class_order'))
    labels = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    out = []
    for case in cases:
        pred = os.path.join(pred_dir, case + ending)
        if not os.path.isfile(pred):
            raise EvaluationError(f'{pred}: prediction missing')
        s = score_case_files(os.path.join(test_labels, case + ending), pred, labels, lm.ignore_label)
        out.append({'case': case, **s})
    return out


def victim_jobs(rows: Sequence[tuple], configurations: Sequence[str], defence_configurations: Sequence[str],
                seeds: Sequence[int]) -> List[tuple]:
    """(row, configuration, seed) of every victim: purified rows (a defence spec) only in defence_configurations."""
    return [(row, c, s) for row, _, _, spec in rows for c in configurations
            if spec is None or c in defence_configurations for s in seeds]


def base_rows(clean: str, protected: Sequence[str]) -> Dict[str, str]:
    """Row name -> dataset of an evaluation's unpurified rows: 'clean', then 'protected' (one protected copy) or
    'protected<i>' (the i-th of several); a purified row is '<base row>+<defence key>'."""
    rows = {'clean': clean}
    rows.update({'protected' if len(protected) == 1 else f'protected{i + 1}': p for i, p in enumerate(protected)})
    return rows


def row_source(state: dict, row: str) -> Optional[tuple]:
    """What the victim of an evaluation folder's ``row`` trains on: (source dataset, defence key or None); None for
    a row the folder's ``state`` does not explain."""
    base, _, key = row.partition('+')
    source = base_rows(state.get('clean'), state.get('protected') or []).get(base)
    return (source, key or None) if source else None


def reuse_victim(ws: Workspace, row: str, config: str, seed: int, trainer: str, plans: str, cases: Sequence[str],
                 sources: Sequence[str]) -> Optional[dict]:
    """Copy the scores of an identical victim from an earlier evaluation folder instead of training it again:
    the same training data (the same clean or protected dataset, purified by the same defence), clean dataset,
    trainer, plans, configuration, seed and test cases. None if no folder has one."""
    want = row_source(ws.state, row)
    if want is None:
        return None
    for other in sources:
        state_file, victims = os.path.join(other, 'state.json'), os.path.join(other, 'victims')
        if not (os.path.isfile(state_file) and os.path.isdir(victims)):
            continue
        state = json.load(open(state_file))
        if state.get('clean') != ws.state['clean']:
            continue
        for other_row in sorted(os.listdir(victims)):
            scores_file = os.path.join(victims, other_row, config, f'seed_{seed}', 'scores.json')
            if row_source(state, other_row) != want or not os.path.isfile(scores_file):
                continue
            scores = json.load(open(scores_file))
            if (scores.get('trainer'), scores.get('plans')) != (trainer, plans) or \
                    [c['case'] for c in scores['cases']] != list(cases):
                continue
            scores['reused_from'] = scores.get('reused_from') or os.path.abspath(scores_file)
            scores['row'] = row
            os.makedirs(ws.victim_dir(row, config, seed), exist_ok=True)
            write_json_atomic(scores, os.path.join(ws.victim_dir(row, config, seed), 'scores.json'))
            return scores
    return None


def evaluate(clean: str, protected: Union[str, Sequence[str]], output_dir: str, test_images: Optional[str] = None,
             test_labels: Optional[str] = None, configurations: Sequence[str] = ('3d_fullres',),
             plans: str = 'nnUNetPlans', epochs: Optional[int] = None, trainer: Optional[str] = None,
             seeds: Sequence[int] = (0,), defences: Sequence[str] = (), device: str = 'cpu',
             disable_tta: bool = False, method_name: Union[str, Sequence[str], None] = None,
             figure_case: Optional[str] = None, verbose: bool = False,
             defence_configurations: Optional[Sequence[str]] = None,
             reuse_from: Sequence[str] = (), defend_clean: bool = False, backend: str = 'local', workers: int = 1,
             threads: Optional[int] = None, slurm: Optional[dict] = None, stream=None) -> dict:
    """Run (or resume) every victim and write report.json, report.md and figure.png into ``output_dir``.

    Every step (purify, plan/preprocess, each victim, each row's quality) is a job on the audit's engine
    (``jobs.run_jobs``: ``workers`` local processes of ``threads`` CPU threads each, default $VOXSHIELD_TORCH_THREADS
    or else the machine's cores shared among the workers, or Slurm with ``slurm`` options); job folders and records
    in ``output_dir/jobs``. ``verbose`` is kept for callers: every job's nnU-Net output is in its log.txt.

    ``protected`` may name several protected copies of ``clean`` (one per method, ``method_name`` in the same
    order); they share the clean victims. Defences apply to each of them, in ``defence_configurations`` (default:
    all ``configurations``), and with ``defend_clean`` also to the clean data: those rows measure what the
    purification alone costs (``protected`` may then be empty). ``reuse_from``: earlier evaluation folders whose
    identical victims are reused (see ``reuse_victim``).
    """
    clean_dir, protected_dirs, names = input_datasets(clean, protected, method_name, defend_clean and bool(defences))
    ds_json = load_dataset_json(clean_dir)
    ending = ds_json.get('file_ending', '.nii.gz')
    test_images = os.path.abspath(test_images or os.path.join(clean_dir, 'imagesTs'))
    test_labels = os.path.abspath(test_labels or os.path.join(clean_dir, 'labelsTs'))
    cases = test_cases(test_images, test_labels, ending)
    parse_plans(plans)
    trainer = V.victim_trainer_name(epochs, trainer)
    defence_keys = parse_defences(defences)
    seeds = [int(s) for s in dict.fromkeys(seeds)]
    configurations = list(dict.fromkeys(configurations))
    defence_configurations = check_defence_configurations(configurations, defence_configurations)
    reuse_from = check_reuse_folders(reuse_from)
    from nnunetv2_voxshield.audit_inputs import AuditError, check_engine, default_threads
    threads = threads or default_threads(workers)
    try:
        check_engine(backend, workers, threads)
    except AuditError as e:
        raise EvaluationError(str(e)) from None

    ws = Workspace(output_dir, clean_dir, protected_dirs)
    rows = evaluation_rows(clean_dir, protected_dirs, names, defence_keys, defend_clean)
    purified = link_rows(ws, rows, clean_dir, protected_dirs)
    jobs = victim_jobs(rows, configurations, defence_configurations, seeds)
    reused = reuse_victims(ws, jobs, trainer, plans, cases, reuse_from)
    done_before = {j for j in jobs if j not in reused and os.path.isfile(_scores_file(ws, *j))}
    steps = evaluation_jobs(ws, rows, purified, jobs, reused, configurations, seeds, trainer, plans, device,
                            test_images, test_labels, cases, ending, ds_json, disable_tta, clean_dir, threads)
    from nnunetv2_voxshield.jobs import run_jobs
    try:
        records = run_jobs(steps, ws.out, backend=backend, workers=workers, slurm=slurm, stream=stream or sys.stderr)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    results = collect_victims(ws, jobs, reused, done_before, records)
    quality = row_quality(ws, rows)
    settings = {'clean': clean_dir,
                'protected': protected_dirs if len(protected_dirs) != 1 else protected_dirs[0],
                'test_images': test_images, 'test_labels': test_labels, 'configurations': configurations,
                'plans': plans, 'trainer': trainer, 'seeds': seeds, 'defences': [spec for _, spec in defence_keys],
                'defence_configurations': defence_configurations, 'device': device, 'disable_tta': disable_tta,
                'n_test_cases': len(cases)}
    report = build_report(ws, rows, jobs, results, quality, configurations, seeds, settings, ds_json)
    return write_report(ws, report, clean_dir, protected_dirs, ending, figure_case)


def _log(msg: str) -> None:
    print(msg, flush=True)


def input_datasets(clean: str, protected: Union[str, Sequence[str]], method_name: Union[str, Sequence[str], None],
                   defends_clean: bool) -> tuple:
    """(clean folder, protected folders, one row name per protected folder), checked."""
    protected = [protected] if isinstance(protected, str) else list(protected)
    names = [method_name] if isinstance(method_name, str) else list(method_name or [])
    if not names:
        names = ['Protected'] if len(protected) == 1 else [os.path.basename(resolve_raw_dataset(p)) for p in protected]
    if len(names) != len(protected):
        raise EvaluationError(f'--method-name: {len(names)} names for {len(protected)} protected datasets')
    if not protected and not defends_clean:
        raise EvaluationError('nothing to compare the clean victims with: give --protected, or --defend-clean '
                              'with --defence')
    clean_dir = resolve_raw_dataset(clean)
    protected_dirs = [resolve_raw_dataset(p) for p in protected]
    for protected_dir in protected_dirs:
        if clean_dir == protected_dir:
            raise EvaluationError(f'{clean_dir}: --clean and --protected are the same dataset')
    return clean_dir, protected_dirs, names


def parse_defences(defences: Sequence[str]) -> List[tuple]:
    """[(row key, defence spec)] of the --defence arguments."""
    try:
        return [(defence_key(d), d) for d in defences]
    except ValueError as e:
        raise EvaluationError(str(e)) from None


def check_defence_configurations(configurations: List[str], defence_configurations: Optional[Sequence[str]]) -> list:
    """The victim configurations of purified rows (default: all); each must be a victim configuration."""
    defence_configurations = configurations if defence_configurations is None else list(defence_configurations)
    unknown = [c for c in defence_configurations if c not in configurations]
    if unknown:
        raise EvaluationError(f'defence configuration(s) {", ".join(unknown)} not among the victim configurations '
                              f'{", ".join(configurations)}')
    return defence_configurations


def check_reuse_folders(reuse_from: Sequence[str]) -> List[str]:
    """Absolute paths of the --reuse folders; EvaluationError for one without state.json."""
    folders = [os.path.abspath(d) for d in reuse_from]
    for d in folders:
        if not os.path.isfile(os.path.join(d, 'state.json')):
            raise EvaluationError(f'{d}: no state.json (not a voxshield_evaluate output folder)')
    return folders


def evaluation_rows(clean_dir: str, protected_dirs: Sequence[str], names: Sequence[str],
                    defence_keys: Sequence[tuple], defend_clean: bool) -> List[tuple]:
    """(row, method name, defence description or None, defence spec or None) of every row, clean first."""
    rows = []
    for base, name in zip(base_rows(clean_dir, protected_dirs), ['Clean'] + list(names)):
        rows += [(base, name, None, None)]
        if base != 'clean' or defend_clean:
            rows += [(f'{base}+{k}', name, describe_defence(spec), spec) for k, spec in defence_keys]
    return rows


def link_rows(ws: Workspace, rows: Sequence[tuple], clean_dir: str, protected_dirs: Sequence[str]) -> Dict[str, str]:
    """Step 1: each unpurified row's private raw dataset (links to its source); {purified row: its source folder}
    (their copies are jobs)."""
    bases = base_rows(clean_dir, protected_dirs)
    purified = {}
    for row, _, _, spec in rows:
        source = bases[row.partition('+')[0]]
        ws.dataset_id(row)  # ids in row order
        if spec is None:
            link_dataset(source, ws.dataset_dir(row))
        else:
            purified[row] = source
    return purified


def _scores_file(ws: Workspace, row: str, config: str, seed: int) -> str:
    """A victim's scores.json: its finished marker."""
    return os.path.join(ws.victim_dir(row, config, seed), 'scores.json')


def reuse_victims(ws: Workspace, jobs: Sequence[tuple], trainer: str, plans: str, cases: Sequence[str],
                  reuse_from: Sequence[str]) -> dict:
    """Step 2: {job: scores} of the unfinished victims that an earlier evaluation folder already trained."""
    reused = {}
    for job in jobs:
        if not os.path.isfile(_scores_file(ws, *job)):
            scores = reuse_victim(ws, *job, trainer, plans, cases, reuse_from)
            if scores is not None:
                reused[job] = scores
    return reused


# ---------------------------------------------------------------------- steps as jobs (jobs.run_jobs, picklable)
def prepare_job(job_dir: str, env: Dict[str, str], dataset_id: int, configurations: Sequence[str], plans: str,
                plans_file: str, marker_dir: str) -> dict:
    """The victims' own plan/preprocess (+ plans preset) of one row; a marker file per configuration, written last."""
    V.prepare(dataset_id, configurations, plans, env, os.path.join(marker_dir, 'prepare.log'), verbose=True)
    available = json.load(open(plans_file))['configurations']
    for c in configurations:
        if c not in available:
            raise EvaluationError(f'{plans_file}: configuration {c!r} not planned for this dataset; '
                                  f'available: {", ".join(available)}')
        write_atomic(os.path.join(marker_dir, f'.preprocessed_{c}'), '')
    return {'configurations': list(configurations)}


def victim_job(job_dir: str, vdir: str, env: Dict[str, str], dataset_id: int, config: str, seed: int, trainer: str,
               plans: str, device: str, test_images: str, test_labels: str, cases: Sequence[str], ending: str,
               dataset_json: dict, disable_tta: bool, row: str) -> dict:
    """Train (or resume from checkpoint_latest.pth), predict and score one victim; scores.json is written last (the
    finished marker) and an existing one is kept."""
    scores_file = os.path.join(vdir, 'scores.json')
    if not os.path.isfile(scores_file):
        pred_dir = os.path.join(vdir, 'predictions')
        shutil.rmtree(pred_dir, ignore_errors=True)
        V.train_and_predict(dataset_id, config, seed, trainer, plans, device, test_images, pred_dir, env,
                            os.path.join(vdir, 'victim.log'), disable_tta, verbose=True)
        cases_scores = score_predictions(pred_dir, test_labels, cases, ending, dataset_json)
        write_json_atomic({'row': row, 'configuration': config, 'seed': seed, 'trainer': trainer, 'plans': plans,
                           'summary': summarise_victim(cases_scores), 'cases': cases_scores}, scores_file)
    return json.load(open(scores_file))['summary']


def quality_job(job_dir: str, clean_dir: str, row_dir: str, ending: str, out_file: str) -> dict:
    """PSNR/SSIM of a row's training images against the clean ones, written to ``out_file`` (kept if present)."""
    if not os.path.isfile(out_file):
        write_json_atomic(image_quality(clean_dir, row_dir, ending), out_file)
    return json.load(open(out_file))['summary']


def trainer_epochs(trainer: str) -> Optional[int]:
    """N of a stock ``nnUNetTrainer_<N>epochs`` / ``_1epoch`` name (None for another trainer)."""
    m = re.fullmatch(r'nnUNetTrainer_(\d+)epochs?', trainer)
    return int(m.group(1)) if m else None


def evaluation_jobs(ws: Workspace, rows: Sequence[tuple], purified: Dict[str, str], jobs: Sequence[tuple],
                    reused: dict, configurations: Sequence[str], seeds: Sequence[int], trainer: str, plans: str,
                    device: str, test_images: str, test_labels: str, cases: Sequence[str], ending: str,
                    dataset_json: dict, disable_tta: bool, clean_dir: str, threads: int) -> list:
    """Steps 3-5 as a DAG for jobs.run_jobs: purify (a purified row's copy) -> prepare (per row, the configurations
    still to train) -> one victim job per (row, configuration, seed) not finished or reused; a quality job per
    non-clean row. Job names carry the row, so two evaluations of one OUT share (and never repeat) a step."""
    from nnunetv2_voxshield.jobs import Job
    gpus = 1 if device == 'cuda' else 0
    todo = [j for j in jobs if j not in reused and not os.path.isfile(_scores_file(ws, *j))]
    out: List[Job] = []
    for row, _, _, spec in rows:
        row_deps = []
        if row in purified:
            out.append(Job(f'purify_{_safe(row)}', purify_job, (purified[row], ws.dataset_dir(row), spec),
                           kind='purify'))
            row_deps = [out[-1].name]
        marker_dir = os.path.join(ws.out, 'victims', row)
        need = [c for c in configurations if any(j[:2] == (row, c) for j in todo)
                and not os.path.isfile(os.path.join(marker_dir, f'.preprocessed_{c}'))]
        victim_deps = list(row_deps)
        if need:
            plans_file = os.path.join(ws.preprocessed, os.path.basename(ws.dataset_dir(row)), f'{plans}.json')
            out.append(Job(f'prepare_{_safe(row)}_{"+".join(need)}', prepare_job,
                           (ws.env(seeds[0], device), ws.dataset_id(row), need, plans, plans_file, marker_dir),
                           deps=row_deps, kind='plan', threads=threads))
            victim_deps = [out[-1].name]
        for (r, c, s) in todo:
            if r == row:
                vdir = ws.victim_dir(r, c, s)
                out.append(Job(f'victim_{_safe(r)}_{c}_s{s}', victim_job,
                               (vdir, ws.env(s, device), ws.dataset_id(r), c, s, trainer, plans, device, test_images,
                                test_labels, list(cases), ending, dataset_json, disable_tta, r),
                               deps=victim_deps, kind='train', threads=threads, gpus=gpus,
                               progress=functools.partial(train_progress, log_file=os.path.join(vdir, 'victim.log'),
                                                          total=trainer_epochs(trainer))))
        if row != 'clean':
            out.append(Job(f'quality_{_safe(row)}', quality_job,
                           (clean_dir, ws.dataset_dir(row), ending, os.path.join(ws.out, 'quality', f'{row}.json')),
                           deps=row_deps, kind='quality'))
    return out


def collect_victims(ws: Workspace, jobs: Sequence[tuple], reused: dict, done_before: set, records: dict) -> dict:
    """{job: scores} of every victim after the run, one line each (reused / done before / trained now); an
    EvaluationError naming every job that did not finish (its log), after the others have finished."""
    bad = [r for r in records.values() if r.state != 'done']
    if bad:
        raise EvaluationError(f'{len(bad)} of {len(records)} jobs did not finish: ' + '; '.join(
            f'{r.name} {r.state} ({r.error}; log {r.log})' for r in bad) + '; rerun the same command to resume')
    results = {}
    for i, (row, c, s) in enumerate(jobs, 1):
        tag = f'[{i}/{len(jobs)}] {row} {c} seed {s}'
        if (row, c, s) in reused:
            results[(row, c, s)] = reused[(row, c, s)]
            _log(f'{tag}: reused {reused[(row, c, s)]["reused_from"]}: '
                 f'DSC {reused[(row, c, s)]["summary"]["dice"]:.4f}')
            continue
        results[(row, c, s)] = json.load(open(_scores_file(ws, row, c, s)))
        summ = results[(row, c, s)]['summary']
        if (row, c, s) in done_before:
            _log(f'{tag}: done before, skipped')
        else:
            record = records.get(f'victim_{_safe(row)}_{c}_s{s}')
            took = f' ({record.seconds:.0f} s)' if record is not None and record.seconds else ''
            _log(f'{tag}: DSC {summ["dice"]:.4f}, HD95 {summ["hd95_mm"]:.2f} mm{took}')
    return results


def row_quality(ws: Workspace, rows: Sequence[tuple]) -> dict:
    """{row: PSNR/SSIM summary} of each non-clean row (written by its quality job)."""
    return {row: json.load(open(os.path.join(ws.out, 'quality', f'{row}.json')))['summary'] for row, *_ in rows[1:]}


def build_report(ws: Workspace, rows: Sequence[tuple], jobs: Sequence[tuple], results: dict, quality: dict,
                 configurations: Sequence[str], seeds: Sequence[int], settings: dict, dataset_json: dict) -> dict:
    """Step 5a: the report dict: one entry per row with its victims (mean over seeds and per seed) and quality."""
    report_rows = []
    for row, method, defence, spec in rows:
        row_configurations = [c for c in configurations if (row, c, seeds[0]) in results]
        victims_summary = {c: summarise_seeds({s: results[(row, c, s)]['summary'] for s in seeds})
                           for c in row_configurations}
        report_rows.append({'row': row, 'method': method, 'defence': defence, 'defence_spec': spec,
                            'dataset': ws.dataset_dir(row), 'quality': quality.get(row), 'victims': victims_summary,
                            'per_seed': {c: {str(s): results[(row, c, s)]['summary'] for s in seeds}
                                         for c in row_configurations}})
    first = results[jobs[0]]['cases'][0]['labels']
    label_names = {str(v) if not isinstance(v, list) else str(tuple(v)): k
                   for k, v in dataset_json['labels'].items()}
    return {'settings': settings, 'labels': list(first), 'label_names': label_names, 'rows': report_rows}


def write_report(ws: Workspace, report: dict, clean_dir: str, protected_dirs: Sequence[str], ending: str,
                 figure_case: Optional[str]) -> dict:
    """Step 5b: figure.png (first protected copy against the clean data), report.json and report.md."""
    report['figure'] = _figure(clean_dir, protected_dirs[0], ending, os.path.join(ws.out, 'figure.png'),
                               figure_case) if protected_dirs else None
    write_json_atomic(report, os.path.join(ws.out, 'report.json'))
    write_atomic(os.path.join(ws.out, 'report.md'), markdown_report(report))
    _log(f'wrote {os.path.join(ws.out, "report.md")}, report.json' + (', figure.png' if protected_dirs else ''))
    return report


def _figure(clean_dir: str, protected_dir: str, ending: str, out_png: str, case: Optional[str]) -> str:
    import SimpleITK as sitk
    clean_cases = channel_files(os.path.join(clean_dir, 'imagesTr'), ending)
    prot_cases = channel_files(os.path.join(protected_dir, 'imagesTr'), ending)
    common = sorted(set(clean_cases) & set(prot_cases))
    case = case or common[0]
    if case not in common:
        raise EvaluationError(f'--figure-case {case}: not a training case of both datasets')
    read = lambda f: sitk.GetArrayFromImage(sitk.ReadImage(f))
    seg = read(os.path.join(clean_dir, 'labelsTr', case + ending))
    return make_figure(read(clean_cases[case][0]), read(prot_cases[case][0]), seg, out_png,
                       title=f'{case}: clean, delta, protected (channel 0)')


def evaluate_entry():
    """``voxshield_evaluate``: parse the arguments and run ``evaluate``; a user's error exits with one line."""
    parser = argparse.ArgumentParser(
        description='Train stock nnU-Net victims on a clean dataset, its protected copy and purified copies, and '
                    'score them on clean held-out cases (Dice, HD95) plus PSNR/SSIM of the protected data. '
                    'Rerunning with the same -o resumes: finished victims are not retrained, a killed one continues '
                    'from its checkpoint. Every step is a job on the audit\'s engine (-w local workers or --backend slurm); '
                    'voxshield_audit runs a whole exploiter panel and gives a verdict. '
                    'Reads the --clean and --protected raw dataset folders (ids and names looked up in $nnUNet_raw), '
                    'the held-out cases (--test-images / --test-labels, default imagesTs / labelsTs of --clean) and '
                    'the --reuse folders; the inputs are never modified. Writes only into -o: private nnUNet_raw/ '
                    '(links, purified copies), nnUNet_preprocessed/ and nnUNet_results/seed_S/ (nnU-Net runs with '
                    'these, not with your $nnUNet_* folders), victims/, quality/, report.json, report.md and '
                    'figure.png.')
    parser.add_argument('--clean', required=True, help='clean raw dataset: id, DatasetXXX_Name in $nnUNet_raw, or a folder')
    parser.add_argument('--protected', nargs='*', default=[],
                        help='protected raw dataset(s): id, name or folder; several = one row per method')
    parser.add_argument('--test-images', default=None, help='clean held-out images (CASE_0000 files). '
                                                            'Default: imagesTs of --clean')
    parser.add_argument('--test-labels', default=None, help='their labels. Default: labelsTs of --clean')
    parser.add_argument('-c', nargs='+', default=['3d_fullres'], help='victim configurations. Default: 3d_fullres')
    parser.add_argument('-p', default='nnUNetPlans',
                        help='victim plans: stock nnUNetPlans or a residual-encoder preset (nnUNetResEncUNetMPlans, '
                             '...L, ...XL, planned with nnU-Net\'s nnUNetPlannerResEnc*), optionally with our preset '
                             'on top (e.g. nnUNetPlans_cpu, nnUNetResEncUNetMPlans_cpu)')
    parser.add_argument('--epochs', type=int, default=None, help='stock nnUNetTrainer_<N>epochs (1, 5, 10, 20, 50, '
                                                                 '100, ...). Default: nnUNetTrainer (1000 epochs)')
    parser.add_argument('-tr', default=None, help='victim trainer class (overrides --epochs)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0], help='one victim per seed. Default: 0')
    parser.add_argument('--defence', '--defences', nargs='*', default=[], dest='defence',
                        help='purify the protected data first; one row each: blur, zmedian, zresample, quantise '
                             '(NAME:PARAM, e.g. blur:2, quantise:6)')
    parser.add_argument('--defence-c', nargs='+', default=None,
                        help='victim configurations of the purified rows. Default: all of -c')
    parser.add_argument('--defend-clean', action='store_true',
                        help='also purify the clean data with each --defence (rows \'Clean\' + defence): what the '
                             'purification alone costs the victim')
    parser.add_argument('--reuse', '--reuse-clean', nargs='+', default=[], metavar='OUT', dest='reuse',
                        help='earlier voxshield_evaluate folders: reuse their victims that trained on the same data '
                             '(same clean or protected dataset and defence) with the same clean dataset, trainer, '
                             'plans, configuration, seed and test cases')
    parser.add_argument('-o', required=True, help='output folder (private nnU-Net folders, report.*, figure.png)')
    parser.add_argument('-device', default='cpu', choices=('cpu', 'cuda', 'mps'), help='Default: cpu')
    parser.add_argument('--disable-tta', action='store_true', help='predict without mirroring (faster)')
    parser.add_argument('--method-name', nargs='+', default=None,
                        help='name of each protected row in the table. Default: Protected (one dataset) or the '
                             'datasets\' names')
    parser.add_argument('--figure-case', default=None, help='training case shown in figure.png. Default: the first')
    parser.add_argument('--verbose', action='store_true', help='no effect, kept for old command lines: each job\'s '
                                                               'nnU-Net output is in OUT/jobs/<name>/log.txt')
    from nnunetv2_voxshield.audit_inputs import AuditError, add_engine_arguments, engine_options
    add_engine_arguments(parser, threads_default=None)
    args = parser.parse_args()
    try:
        try:
            engine = engine_options(args)
        except AuditError as e:
            raise EvaluationError(str(e)) from None
        evaluate(args.clean, args.protected, args.o, args.test_images, args.test_labels, args.c, args.p,
                 args.epochs, args.tr, args.seeds, args.defence, args.device, args.disable_tta, args.method_name,
                 args.figure_case, args.verbose, args.defence_c, args.reuse, args.defend_clean, engine['backend'],
                 engine['workers'], engine['threads'], engine['slurm'])
    except (EvaluationError, V.VictimError, OSError) as e:
        sys.exit(f'voxshield_evaluate: error: {e}')
    except KeyboardInterrupt:
        sys.exit('voxshield_evaluate: interrupted; rerun the same command to resume')


if __name__ == '__main__':
    evaluate_entry()
