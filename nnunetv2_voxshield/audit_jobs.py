"""The audit's steps as job functions ``fn(job_dir, ...)`` for ``jobs.run_jobs``: each is top-level (picklable),
writes only below its job folder or its own row of the audit folder, and returns a small JSON-serialisable result.

nnU-Net runs in subprocesses (``victims.py``) with the audit's private nnUNet_raw / _preprocessed / _results
(one results root per seed), so each step sees only its own folders and a killed training continues from
``checkpoint_latest.pth`` on rerun (``victims.train_seeded``, nnU-Net's ``--c``).
"""
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Sequence

from nnunetv2_voxshield import victims as V


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


def train_progress(job_dir: str, total: Optional[int] = None) -> Optional[str]:
    """'epoch k/N' from the nnU-Net log of a train job (N: the panel's victim epochs, if set), else None."""
    try:
        with open(_nnunet_log(job_dir), errors='replace') as f:
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


def quality_job(job_dir: str, clean_dir: str, row_dir: str, ending: str, eps: Optional[float] = None) -> dict:
    """PSNR of a row's training images against the clean ones (whole volume and inside the labels), and for a
    protected copy (``eps`` given) ``voxshield_verify``'s summary: max budget use and violations."""
    from nnunetv2_voxshield.evaluate import image_quality
    q = image_quality(clean_dir, row_dir, ending)['summary']
    result = {'psnr': (q.get('psnr') or {}).get('mean'), 'psnr_roi': (q.get('psnr_roi') or {}).get('mean'),
              'ssim': (q.get('ssim') or {}).get('mean'), 'summary': q}
    if eps is not None:
        from nnunetv2_voxshield.verify import verify_datasets
        v = verify_datasets(clean_dir, row_dir, eps=eps)
        result.update(max_budget_use=v['summary']['max_budget_use'], violations=len(v['violations']),
                      verify=v['summary'], eps=eps)
    return result


def detector_job(job_dir: str, folders: Sequence[str], iterations: int = 400, device: str = 'cpu') -> dict:
    """The residual-only detector's test Dice on each dataset (residual_detector.detect; the same split for all):
    high on a copy means its perturbation alone predicts the labels."""
    from nnunetv2_voxshield.residual_detector import detect
    result = detect(list(folders), iterations=iterations, device=device)
    return {d['dataset']: {'mean_dice': d['mean_dice'], 'union_dice': d['union_dice']} for d in result['datasets']}
