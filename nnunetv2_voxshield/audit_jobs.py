"""The audit's steps as job functions ``fn(job_dir, ...)`` for ``jobs.run_jobs``: each is top-level (picklable),
writes only below its job folder or its own row of the audit folder, and returns a small JSON-serialisable result.

nnU-Net runs in subprocesses (``victims.py``) with the audit's private nnUNet_raw / _preprocessed / _results
(one results root per seed), so each step sees only its own folders and a killed training continues from
``checkpoint_latest.pth`` on rerun (``victims.train_seeded``, nnU-Net's ``--c``).
"""
import functools
import json
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Sequence

from nnunetv2_voxshield import victims as V
from nnunetv2_voxshield.panel import Panel


def audit_env(out: str, seed: int, device: str) -> Dict[str, str]:
    """The nnU-Net environment of an audit folder (one results root per seed: nnU-Net has no seed in its paths)."""
    return V.nnunet_env(os.path.join(out, 'nnUNet_raw'), os.path.join(out, 'nnUNet_preprocessed'),
                        os.path.join(out, 'nnUNet_results', f'seed_{seed}'), device)


def _nnunet_log(job_dir: str) -> str:
    return os.path.join(job_dir, 'nnunet.log')


def purify_job(job_dir: str, src: str, dst: str, spec: str) -> dict:
    """The purified copy of a row (defences.purify_dataset, written atomically); kept if it exists."""
    from nnunetv2_voxshield.defences import purify_dataset
    if not os.path.isfile(os.path.join(dst, 'dataset.json')):
        shutil.rmtree(dst + '.tmp', ignore_errors=True)
        purify_dataset(src, dst, spec, verbose=True)
    return {'dataset': dst}


def plan_job(job_dir: str, out: str, dataset_id: int, plans_configurations: Dict[str, List[str]],
             device: str = 'cpu') -> dict:
    """The victims' own fingerprint, plans and preprocessing of one row (+ the plans preset), for every plans
    identifier the panel uses on it; an error naming the plans file if a configuration is not planned."""
    import json
    for plans, configurations in plans_configurations.items():
        V.prepare(dataset_id, configurations, plans, audit_env(out, 0, device), _nnunet_log(job_dir), verbose=True)
        folder = [d for d in os.listdir(os.path.join(out, 'nnUNet_preprocessed'))
                  if d.startswith(f'Dataset{dataset_id:03d}_')][0]
        plans_file = os.path.join(out, 'nnUNet_preprocessed', folder, f'{plans}.json')
        available = json.load(open(plans_file))['configurations']
        missing = [c for c in configurations if c not in available]
        if missing:
            raise V.VictimError(f'{plans_file}: configuration(s) {", ".join(missing)} not planned for this dataset; '
                                f'available: {", ".join(available)}')
    return {'dataset_id': dataset_id, 'plans': plans_configurations}


def train_job(job_dir: str, out: str, dataset_id: int, configuration: str, seed: int, trainer: str, plans: str,
              device: str = 'cpu') -> dict:
    """Seeded stock training on fold 'all' (victims.train_seeded; continues from checkpoint_latest.pth)."""
    cmd = [sys.executable, '-m', 'nnunetv2_voxshield.victims', 'run', str(dataset_id), configuration, '--seed',
           str(seed), '-tr', trainer, '-p', plans, '-device', device]
    V.run_logged(cmd, audit_env(out, seed, device), _nnunet_log(job_dir), verbose=True)
    results = os.path.join(out, 'nnUNet_results', f'seed_{seed}')
    dataset = [d for d in os.listdir(results) if d.startswith(f'Dataset{dataset_id:03d}_')][0]
    return {'model_folder': os.path.join(results, dataset, f'{trainer}__{plans}__{configuration}')}


def train_progress(job_dir: str, total: Optional[int] = None, log_file: Optional[str] = None) -> Optional[str]:
    """'epoch k/N' from the nnU-Net log of a train job (``log_file``, default the job's nnunet.log; N: the victims'
    epochs, if known), else None."""
    try:
        with open(log_file or _nnunet_log(job_dir), errors='replace') as f:
            text = f.read()[-200000:]
    except OSError:
        return None
    epochs = re.findall(r'^.*Epoch (\d+)\s*$', text, re.M)
    if not epochs:
        return None
    return f'epoch {int(epochs[-1]) + 1}' + (f'/{total}' if total else '')


def predict_job(job_dir: str, model_folder: str, test_images: str, device: str = 'cpu',
                disable_tta: bool = False) -> dict:
    """Stock nnU-Net prediction of the clean test images (fold all, final checkpoint) into job_dir/predictions."""
    pred = os.path.join(job_dir, 'predictions')
    shutil.rmtree(pred, ignore_errors=True)
    cmd = [sys.executable, '-m', 'nnunetv2_voxshield.victims', 'predict', model_folder, '-i', test_images, '-o', pred,
           '-device', device] + (['--disable_tta'] if disable_tta else [])
    V.run_logged(cmd, dict(os.environ), _nnunet_log(job_dir), verbose=True)
    return {'predictions': pred}


def score_job(job_dir: str, predictions: str, test_labels: str, cases: Sequence[str], ending: str,
              dataset_json: dict) -> dict:
    """Per case and per label Dice (and HD95) of a victim's predictions against the clean test labels."""
    from nnunetv2_voxshield.evaluate import score_predictions
    from nnunetv2_voxshield.report import summarise_victim
    scores = score_predictions(predictions, test_labels, cases, ending, dataset_json)
    return {'summary': summarise_victim(scores),
            'cases': {c['case']: {'dice': c['mean_dice'], 'labels': {l: v['dice'] for l, v in c['labels'].items()}}
                      for c in scores}}


def quality_job(job_dir: str, clean_dir: str, row_dir: str, ending: str, verify: bool = False,
                eps: Optional[float] = None) -> dict:
    """PSNR of a row's training images against the clean ones (whole volume and inside the labels), and for a
    protected copy (``verify``) ``voxshield_verify``'s summary: max budget use and violations, against ``eps`` or,
    if None, the copy's protection manifest (else verify's default budget)."""
    from nnunetv2_voxshield.evaluate import image_quality
    q = image_quality(clean_dir, row_dir, ending)['summary']
    result = {'psnr': (q.get('psnr') or {}).get('mean'), 'psnr_roi': (q.get('psnr_roi') or {}).get('mean'),
              'ssim': (q.get('ssim') or {}).get('mean'), 'summary': q}
    if verify:
        from nnunetv2_voxshield.verify import verify_datasets
        v = verify_datasets(clean_dir, row_dir, eps=eps)
        result.update(max_budget_use=v['summary']['max_budget_use'], violations=len(v['violations']),
                      verify=v['summary'], budget=v.get('budget'))
    return result


def detector_job(job_dir: str, folders: Sequence[str], iterations: int = 400, device: str = 'cpu') -> dict:
    """The residual-only detector's test Dice on each dataset (residual_detector.detect; the same split for all):
    high on a copy means its perturbation alone predicts the labels."""
    from nnunetv2_voxshield.residual_detector import detect
    result = detect(list(folders), iterations=iterations, device=device)
    return {d['dataset']: {'mean_dice': d['mean_dice'], 'union_dice': d['union_dice']} for d in result['datasets']}


# ----------------------------------------------------------------------------------------- the DAG
def _safe(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.+-]', '-', text)


def copy_names(protected: Sequence[str], names: Optional[Sequence[str]]) -> List[str]:
    """The report names of the protected copies: ``names`` (one per copy) or protected / protected1, protected2, ..."""
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
    from nnunetv2_voxshield.audit_inputs import AuditError, row_dataset_id  # noqa: F401
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
            jobs[f'purify_{row}'] = Job(f'purify_{_safe(row)}', purify_job, (rows[base], dst, p.defence),
                                        deps=list(row_deps.get(base, [])), kind='purify')
            row_deps[row] = [jobs[f'purify_{row}'].name]
        cfgs = plans_of_row.setdefault(row, {}).setdefault(panel.plans_of(p), [])
        if p.configuration not in cfgs:
            cfgs.append(p.configuration)
    for row, plans in plans_of_row.items():
        deps = list(row_deps.get(row, []))
        jobs[f'plan_{row}'] = Job(f'plan_{_safe(row)}', plan_job, (out, row_dataset_id(out, row), plans, device),
                                  deps=deps, kind='plan', threads=threads)
    test_images = tests['images'] or os.path.join(out, 'test', 'imagesTs')
    test_labels = tests['labels'] or os.path.join(out, 'test', 'labelsTs')
    for row, p in needed:
        trainer, plans = trainers[p.name], panel.plans_of(p)
        for seed in panel.seeds:
            tag = _safe(f'{row}_{trainer}_{plans}_{p.configuration}_s{seed}')
            if f'train_{tag}' not in jobs:
                jobs[f'train_{tag}'] = Job(f'train_{tag}', train_job, (out, row_dataset_id(out, row), p.configuration,
                                                                        seed, trainer, plans, device),
                                           deps=[jobs[f'plan_{row}'].name], kind='train', threads=threads, gpus=gpus,
                                           progress=functools.partial(train_progress, total=panel.epochs))
                jobs[f'predict_{tag}'] = Job(f'predict_{tag}', _predict_from, (out, f'train_{tag}', test_images,
                                                                             device, disable_tta),
                                             deps=[f'train_{tag}'], kind='predict', threads=threads, gpus=gpus)
                jobs[f'score_{tag}'] = Job(f'score_{tag}', _score_from, (out, f'predict_{tag}', test_labels,
                                                                       tests['test'], ending, dataset_json),
                                           deps=[f'predict_{tag}'], kind='score')
            victims[(row, p.name, seed)] = f'score_{tag}'
    for row in rows:
        if row != 'clean':
            deps = list(row_deps.get(row, []))
            jobs[f'quality_{row}'] = Job(f'quality_{_safe(row)}', quality_job,
                                         (clean_dir_of(rows), rows[row], ending, row in copies, eps), deps=deps,
                                         kind='quality')
    if detector:
        jobs['detector'] = Job('detector', detector_job, ([rows['clean']] + [rows[c] for c in copies], 400, device),
                               deps=[d for c in copies for d in row_deps.get(c, [])], kind='detector', threads=threads)
    return list(jobs.values()), victims


def clean_dir_of(rows: Dict[str, str]) -> str:
    """The clean dataset's folder among the audit's rows {row name: raw folder}."""
    return rows['clean']


def _record(out: str, name: str) -> dict:
    return json.load(open(os.path.join(out, 'jobs', name, 'done.json')))['result']


def _predict_from(job_dir: str, out: str, train_name: str, test_images: str, device: str, disable_tta: bool) -> dict:
    """predict_job with the model folder from the train job's record."""
    return predict_job(job_dir, _record(out, train_name)['model_folder'], test_images, device, disable_tta)


def _score_from(job_dir: str, out: str, predict_name: str, *args) -> dict:
    """score_job with the predictions folder from the predict job's record."""
    return score_job(job_dir, _record(out, predict_name)['predictions'], *args)
