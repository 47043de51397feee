"""voxshield_export: publish an nnU-Net raw dataset whose training images carry a bounded perturbation.

The output dataset is built in a hidden folder next to it (``.DatasetXXX_Name.partial``) and renamed when
complete. Per-case reports (and the settings used) go to the protector's side in nnUNet_results; a rerun with the
same settings skips the cases whose report and output files check out, so an interrupted export resumes and ends
byte-identical to an uninterrupted one. Nothing of the protector (weights, delta, seed) enters the output.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import sys
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_voxshield.budget import (BUDGET_MODES, DEFAULT_BUDGET_MODE, DEFAULT_EPS, DEFAULT_PERCENTILES,
                                       check_budget, check_budget_mode, dataset_ignore_label, parse_eps, parse_eps_abs)
from nnunetv2_voxshield.case_protection import clean_dataset_std, protect_case
from nnunetv2_voxshield.controls import DEFAULT_BLOCK, DEFAULT_SMOOTH_SIGMA, DEFAULT_WIDTH, SIGNS
from nnunetv2_voxshield.conv_code import METHOD as CONV_METHOD, check_strength
from nnunetv2_voxshield.dataset_io import (InputError, check_case_headers, check_finite_files,
                                           copy_atomic, dataset_id_and_name, env_folder, find_dataset_folder,
                                           list_training_cases, load_dataset_json, num_channels, sha256_of,
                                           write_json_atomic)
from nnunetv2_voxshield.distributed import (PARTS_FOLDER, check_part_arguments, check_parts, export_lock,
                                           part_cases, part_records, record_part, temp_file_target)
from nnunetv2_voxshield.baselines import DEFAULT_LSP_PATCH, DEFAULT_TAP_STEPS, check_surrogate, surrogate_folder
from nnunetv2_voxshield.manifest import MANIFEST_FILE, build_manifest
from nnunetv2_voxshield.perturbation import EXPORT_TIME_METHODS, load_voxshield_state, make_source, support_rule

PARTIAL_SUFFIX = '.partial'
_WORKER_CTX = None


def _load_plans(plans_file: str, configuration: str):
    if not os.path.isfile(plans_file):
        raise InputError(f'{plans_file}: plans not found (run nnUNetv2_plan_and_preprocess, or train first)')
    with open(plans_file) as f:
        plans_manager = PlansManager(json.load(f))
    if configuration not in plans_manager.available_configurations:
        raise InputError(f'{plans_file}: no configuration {configuration!r} '
                         f'(available: {", ".join(plans_manager.available_configurations)})')
    return plans_manager, plans_manager.get_configuration(configuration)


def _make_ctx(spec: dict) -> dict:
    """Everything a worker needs to protect cases, rebuilt from a picklable spec."""
    torch.set_num_threads(1)  # identical results whatever -np is
    plans_manager, configuration_manager = _load_plans(spec['plans_file'], spec['configuration'])
    state = load_voxshield_state(spec['checkpoint']) if spec['checkpoint'] else None
    source = make_source(spec['method'], state, configuration_manager, torch.device(spec['device']), spec['seed'],
                         spec.get('method_options'))
    return dict(spec, source=source, plans_manager=plans_manager, configuration_manager=configuration_manager)


def _init_worker(spec: dict) -> None:
    global _WORKER_CTX
    _WORKER_CTX = _make_ctx(spec)


def _work(item):
    case, files, folder = item
    return protect_case(case, files, folder, _WORKER_CTX)


def _case_done(case: str, cases_folder: str, partial: str) -> bool:
    """A case is finished when its report exists and every file it lists is in place with the recorded hash."""
    report_file = os.path.join(cases_folder, f'{case}.json')
    try:
        with open(report_file) as f:
            report = json.load(f)
        return all(sha256_of(os.path.join(partial, rel)) == digest for rel, digest in report['files'].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_output(source_folder: str, output_folder: str, overwrite: bool) -> None:
    if os.path.realpath(source_folder) == os.path.realpath(output_folder):
        raise InputError(f'{output_folder}: output dataset equals the input')
    out_id, _ = dataset_id_and_name(output_folder)
    if out_id == dataset_id_and_name(source_folder)[0]:
        raise InputError(f'{output_folder}: output dataset id {out_id} equals the input\'s')
    parent = os.path.dirname(os.path.abspath(output_folder))
    others = [d for d in os.listdir(parent) if d.startswith('Dataset%03d_' % out_id)
              and d != os.path.basename(output_folder)] if os.path.isdir(parent) else []
    if others:
        raise InputError(f'{os.path.join(parent, others[0])}: dataset id {out_id} is already used')
    if os.path.exists(output_folder) and not overwrite:
        raise InputError(f'{output_folder}: output dataset already exists (use --overwrite to replace it)')


def _summary(reports: list) -> dict:
    channels = [ch for r in reports for ch in r['channels']]
    values = lambda key: [ch[key] for ch in channels if ch[key] is not None]  # noqa: E731
    return {'cases': len(reports),
            'unchanged_empty_roi': [r['case'] for r in reports if r['status'] == 'unchanged_empty_roi'],
            'max_budget_use': max(values('budget_use'), default=0.0),
            'mean_fraction_changed': float(np.mean(values('fraction_changed'))) if channels else 0.0,
            'psnr_mean': float(np.mean(values('psnr'))) if values('psnr') else None,
            'psnr_min': min(values('psnr'), default=None),
            'psnr_roi_mean': float(np.mean(values('psnr_roi'))) if values('psnr_roi') else None,
            'ssim_mean': float(np.mean(values('ssim'))) if values('ssim') else None,
            'ssim_min': min(values('ssim'), default=None)}


def export_dataset(source_folder: str, output_folder: str, plans_file: str, configuration: str,
                   report_folder: str, checkpoint: Optional[str] = None, method: Optional[str] = None,
                   eps: Optional[float] = None, eps_abs: Optional[float] = None, seed: int = 0,
                   num_processes: int = 1, overwrite: bool = False, device: str = 'cpu',
                   progress: bool = True, method_options: Optional[dict] = None, num_parts: int = 1,
                   part_id: int = 0, finalize: bool = False, budget_mode: Optional[str] = None) -> dict:
    """Protect every training case of ``source_folder`` into ``output_folder``; returns the summary report.

    ``method_options``: settings of the export-time baselines (``perturbation.make_source``).
    ``num_parts``/``part_id``: protect only the sorted case ids [part_id::num_parts] (``distributed.part_cases``);
    the part that finds every case done publishes the dataset, the others return ``{'published': False, ...}``.
    ``finalize``: protect nothing, publish the parts' work if every case is done (else InputError).
    ``budget_mode`` (``budget.BUDGET_MODES``; default: the checkpoint's, else 'range'): what eps is a fraction of."""
    check_part_arguments(num_parts, part_id)
    if finalize and num_parts > 1:
        raise InputError(f'--finalize publishes the work of every part: give it without -num_parts/-part_id')
    sharded = num_parts > 1 or finalize
    dataset_json = load_dataset_json(source_folder)
    cases = list_training_cases(source_folder, dataset_json)
    for files in cases.values():
        check_case_headers(files)
        check_finite_files(files)
    _check_output(source_folder, output_folder, overwrite or sharded)  # parts: checked under the lock below

    state = load_voxshield_state(checkpoint) if checkpoint is not None and method not in EXPORT_TIME_METHODS \
        else None
    method = method or (state['method'] if state is not None else None)
    if method is None:
        raise InputError('no perturbation source: give a VoxShield checkpoint or --method random')
    if state is None and method not in EXPORT_TIME_METHODS:
        raise InputError(f'method {method!r} needs a trained checkpoint')
    method_options = dict(method_options or {})
    surrogate_sha256 = None
    if method == 'tap':
        if not method_options.get('surrogate'):
            raise InputError('method \'tap\' needs a surrogate model folder (--surrogate-tr)')
        method_options['surrogate'] = os.path.abspath(method_options['surrogate'])
        surrogate_sha256 = sha256_of(check_surrogate(method_options['surrogate'], method_options.get('fold', '0'),
                                                     method_options.get('checkpoint', 'checkpoint_final.pth')))
    if state is not None and state['generator_kwargs']['in_channels'] != num_channels(dataset_json):
        raise InputError(f'{checkpoint}: generator has {state["generator_kwargs"]["in_channels"]} input channels, '
                         f'{os.path.join(source_folder, "dataset.json")} declares {num_channels(dataset_json)}')
    _load_plans(plans_file, configuration)
    defaults = {k: state[k] for k in ('eps', 'eps_abs', 'percentiles', 'budget_mode')
                if state and state.get(k) is not None}
    if eps is None and eps_abs is None:
        eps, eps_abs = defaults.get('eps', DEFAULT_EPS), defaults.get('eps_abs')
    percentiles = [float(p) for p in defaults.get('percentiles', DEFAULT_PERCENTILES)]
    budget_mode = budget_mode or defaults.get('budget_mode', DEFAULT_BUDGET_MODE)
    try:
        check_budget(eps if eps_abs is None else None, eps_abs, budget_mode)
    except ValueError as e:
        raise InputError(f'{checkpoint if state is not None else "budget"}: {e}') from None
    if eps_abs is not None:
        budget_mode = None  # an absolute budget has no window
    if method == CONV_METHOD:  # no eps: bounded by strength x (max - min) per channel (conv_code), reported as PSNR
        method_options['strength'] = check_strength(method_options.get('strength'))
        eps, eps_abs, budget_mode = None, None, None
    dataset_std = clean_dataset_std(cases) if budget_mode == 'zscore-dataset' else None

    spec = {'plans_file': os.path.abspath(plans_file), 'configuration': configuration, 'method': method,
            'checkpoint': os.path.abspath(checkpoint) if state is not None else None, 'device': device,
            'seed': int(seed), 'dataset_json': dataset_json,
            'eps': None if eps_abs is not None or eps is None else float(eps),
            'eps_abs': None if eps_abs is None else float(eps_abs), 'percentiles': percentiles,
            'budget_mode': budget_mode, 'dataset_std': dataset_std, 'method_options': method_options}
    settings = dict(spec, source=os.path.abspath(source_folder), output=os.path.abspath(output_folder),
                    plans_sha256=sha256_of(plans_file), device=None,
                    checkpoint_sha256=sha256_of(checkpoint) if state is not None else None,
                    surrogate_sha256=surrogate_sha256)
    settings.pop('dataset_json')
    manifest = _manifest(spec, state)

    output_folder = os.path.abspath(output_folder)
    partial = os.path.join(os.path.dirname(output_folder), '.' + os.path.basename(output_folder) + PARTIAL_SUFFIX)
    cases_folder = os.path.join(report_folder, 'cases')
    settings_file = os.path.join(report_folder, 'settings.json')
    own = {} if finalize else part_cases(cases, num_parts, part_id)
    with export_lock(report_folder):  # parts set up one at a time
        if sharded and os.path.exists(output_folder) and not overwrite:
            return _published_summary(output_folder, report_folder, settings)
        check_parts(partial, settings, num_parts if sharded and not finalize else None)
        try:
            with open(settings_file) as f:
                resumable = json.load(f) == settings
        except (OSError, ValueError):
            resumable = False
        if not resumable and not part_records(partial):
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(cases_folder, ignore_errors=True)
        own_files = {os.path.basename(f) for files in own.values() for f in files['images'] + [files['label']]}
        for folder, _, files in os.walk(partial):  # temp files of an interrupted run (parts: of its own cases)
            for f in files:
                if temp_file_target(f) is not None and (not sharded or temp_file_target(f) in own_files):
                    os.remove(os.path.join(folder, f))
        for folder in (os.path.join(partial, 'imagesTr'), os.path.join(partial, 'labelsTr'), cases_folder):
            os.makedirs(folder, exist_ok=True)
        write_json_atomic(settings, settings_file)
        if sharded and not finalize:
            record_part(partial, settings, num_parts, part_id)

    todo = [(case, files, partial) for case, files in own.items() if not _case_done(case, cases_folder, partial)]
    bar = tqdm(total=len(own), initial=len(own) - len(todo), desc='Protecting cases', disable=not (progress and own))
    if todo:
        if num_processes > 1:
            with multiprocessing.get_context('spawn').Pool(min(num_processes, len(todo)), _init_worker,
                                                           (spec,)) as pool:
                for report in pool.imap_unordered(_work, todo):
                    write_json_atomic(report, os.path.join(cases_folder, f'{report["case"]}.json'))
                    bar.update()
        else:
            threads = torch.get_num_threads()
            try:
                ctx = _make_ctx(spec)
                for case, files, folder in todo:
                    report = protect_case(case, files, folder, ctx)
                    write_json_atomic(report, os.path.join(cases_folder, f'{case}.json'))
                    bar.update()
            finally:
                torch.set_num_threads(threads)
    bar.close()

    with export_lock(report_folder):  # one part publishes, after every case is present and checked
        if not os.path.isdir(partial) and os.path.isdir(output_folder):  # another part published meanwhile
            return _published_summary(output_folder, report_folder, settings)
        done = {case for case, _, _ in todo}
        missing = [case for case in cases if case not in done and not _case_done(case, cases_folder, partial)]
        if missing and finalize:
            n = next(iter(part_records(partial).values()), {}).get('num_parts')
            owner = f', part {sorted(cases).index(missing[0]) % n} of {n}' if n else ''
            raise InputError(f'{partial}: {len(missing)} of {len(cases)} cases missing or unchecked (first: '
                             f'{missing[0]}{owner}); run their parts first')
        if missing:
            return {'published': False, 'cases': len(cases), 'cases_done': len(cases) - len(missing),
                    'part': f'{part_id} of {num_parts}', 'part_cases': len(own)}
        for folder, _, files in os.walk(partial):  # temp files of interrupted parts
            for f in files:
                if temp_file_target(f) is not None:
                    os.remove(os.path.join(folder, f))
        shutil.rmtree(os.path.join(partial, PARTS_FOLDER), ignore_errors=True)
        return _publish(source_folder, output_folder, partial, report_folder, dataset_json, cases, settings,
                        method, spec, percentiles, manifest)


def _manifest(spec: dict, state: Optional[dict]) -> dict:
    """``manifest.build_manifest`` of this export: its source's support rule, the budget, the ignore label."""
    plans_manager, configuration_manager = _load_plans(spec['plans_file'], spec['configuration'])
    threads = torch.get_num_threads()
    try:
        source = make_source(spec['method'], state, configuration_manager, torch.device('cpu'), spec['seed'],
                             spec.get('method_options'))
    finally:
        torch.set_num_threads(threads)
    support = support_rule(source, len(configuration_manager.patch_size), plans_manager.transpose_forward)
    return build_manifest(spec['method'], spec['eps'], spec['eps_abs'], spec['budget_mode'], spec['percentiles'],
                          support, dataset_ignore_label(spec['dataset_json']),
                          (spec.get('method_options') or {}).get('strength'))


def _published_summary(output_folder: str, report_folder: str, settings: dict) -> dict:
    """Summary of an output already published with ``settings`` (by another part); InputError otherwise."""
    try:
        with open(os.path.join(report_folder, 'report.json')) as f:
            report = json.load(f)
    except (OSError, ValueError):
        report = {}
    if report.get('settings') != settings:
        raise InputError(f'{output_folder}: output dataset already exists (use --overwrite to replace it)')
    return dict(report['summary'], already_published=True)


def _publish(source_folder: str, output_folder: str, partial: str, report_folder: str, dataset_json: dict,
             cases: dict, settings: dict, method: str, spec: dict, percentiles: list, manifest: dict) -> dict:
    """Test split, dataset.json, the protection manifest and the report into the complete ``partial`` folder, then its
    rename to the output."""
    cases_folder = os.path.join(report_folder, 'cases')
    for test_folder in ('imagesTs', 'labelsTs'):  # the test split is published unchanged
        src = os.path.join(source_folder, test_folder)
        if os.path.isdir(src):
            os.makedirs(os.path.join(partial, test_folder), exist_ok=True)
            for f in sorted(os.listdir(src)):
                if os.path.isfile(os.path.join(src, f)) and not f.startswith('.'):
                    copy_atomic(os.path.join(src, f), os.path.join(partial, test_folder, f))
    published = dict(dataset_json)
    published['voxshield'] = {
        'note': 'training images carry a small bounded perturbation (unlearnable examples); labels are unchanged',
        'method': method, 'eps': spec['eps'], 'eps_abs': spec['eps_abs'], 'budget_mode': spec['budget_mode'],
        'percentiles': spec['percentiles']}
    if method == CONV_METHOD:  # no eps: |delta| <= strength x (max - min) per channel; PSNR in the report
        published['voxshield']['strength'] = spec['method_options']['strength']
    write_json_atomic(published, os.path.join(partial, 'dataset.json'))
    write_json_atomic(manifest, os.path.join(partial, MANIFEST_FILE))

    reports = []
    for case in cases:
        with open(os.path.join(cases_folder, f'{case}.json')) as f:
            reports.append(json.load(f))
    report = {'summary': _summary(reports), 'settings': settings, 'cases': reports}
    write_json_atomic(report, os.path.join(report_folder, 'report.json'))

    if os.path.exists(output_folder):  # --overwrite: swap in the complete new dataset, then drop the old one
        old = os.path.join(os.path.dirname(output_folder), '.' + os.path.basename(output_folder) + '.old')
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output_folder, old)
        os.replace(partial, output_folder)
        shutil.rmtree(old)
    else:
        os.replace(partial, output_folder)
    return report['summary']


def export_entry(argv=None):
    """``voxshield_export``: parse the arguments and run ``export``; a user's error exits with one line."""
    parser = argparse.ArgumentParser(description='Publish an nnU-Net raw dataset as unlearnable examples: every '
                                                 'training image gets a bounded perturbation, labels are copied. '
                                                 'Reads the source in $nnUNet_raw and the protector in '
                                                 '$nnUNet_results/<src>/<-tr>__<-p>__<-c>/fold_<-f>/<--chk> (with '
                                                 'its plans.json; an export-time --method reads the plans in '
                                                 '$nnUNet_preprocessed instead). Writes $nnUNet_raw/DatasetDST_<Name> '
                                                 '(built in a hidden .partial folder, renamed when complete) and the '
                                                 'private per-case report to export_<DatasetDST_Name>/ in that fold '
                                                 'folder (export-time methods: $nnUNet_results/<src>/'
                                                 'voxshield_<method>__<-p>__<-c>/). The source dataset and the '
                                                 'checkpoint are never modified.')
    parser.add_argument('-d', required=True, help='source dataset (id or DatasetXXX_Name in nnUNet_raw)')
    parser.add_argument('-o', required=True, type=int, help='id of the protected dataset to write in nnUNet_raw')
    parser.add_argument('--name', default=None, help='name of the protected dataset (default: <SrcName>Protected)')
    parser.add_argument('-tr', default='nnUNetTrainerVoxShield', help='trainer of the protector model')
    parser.add_argument('-p', default='nnUNetPlans', help='plans identifier')
    parser.add_argument('-c', default='3d_fullres', help='configuration')
    parser.add_argument('-f', default='0', help='fold of the protector model')
    parser.add_argument('--chk', default='checkpoint_final.pth', help='checkpoint file name in the fold folder')
    parser.add_argument('--method', default=None, choices=list(EXPORT_TIME_METHODS),
                        help='perturbation computed at export time instead of the checkpoint\'s generator: random '
                             'noise, lsp (linearly separable perturbations, Yu et al. 2022), tap (targeted '
                             'adversarial poisoning, Fowl et al. 2021), or a fixed label-coded positive control at '
                             'the full budget on the raw voxels (sign +, -, +, ... per foreground class): offset, '
                             'checkerboard (--block), stripes (--block; orientation per class), diagonal (--block; '
                             'stripes across a diagonal per class) or smooth '
                             '(--smooth-sigma); or a boundary displacement: grow / shrink (--width) moves the voxels '
                             'just outside / inside the labels towards the intensity across the boundary; or edge '
                             '(--width, --sign): +s b on the labels\' inner band, -s b on the outer band; or conv '
                             '(--strength, --seed): class-wise convolution (CUDA, Sadasivan et al. 2023), inside '
                             'label c x\' = (1 - s) x + s (k_c * x), k_c a random 3x3x3 kernel (in voxels) per class '
                             'drawn from --seed; no eps: |delta| <= s (max - min), reported as PSNR')
    parser.add_argument('--block', type=int, default=DEFAULT_BLOCK,
                        help='checkerboard: voxels per square along each axis (period 2 x block); stripes: voxels '
                             'per stripe (period 2 x block) along axis (label - 1) mod 3 of the raw array; diagonal: '
                             'the same across diagonal (label - 1) mod 4 of (1,-1,1), (1,-1,-1), (1,1,1), (1,1,-1)')
    parser.add_argument('--sign', default='alternate', choices=list(SIGNS),
                        help='offset, checkerboard, smooth, edge: the sign per class (alternate: +, -, +, ... for '
                             'labels 1, 2, 3, ...; plus / minus: the same sign on every class; levels: +1, -1, '
                             '+1/2, -1/2, ... x b, a different level per class)')
    width = parser.add_mutually_exclusive_group()
    width.add_argument('--width', type=int, default=DEFAULT_WIDTH,
                       help='grow / shrink: width in voxels (Euclidean, voxel units: 10 mm across 10 mm slices) of '
                            'the band moved outside / inside the labels; edge: of each band')
    width.add_argument('--width-mm', type=float, default=None,
                       help='the same width in mm, measured with each case\'s voxel spacing (instead of --width)')
    parser.add_argument('--smooth-sigma', type=float, default=DEFAULT_SMOOTH_SIGMA,
                        help='smooth: sigma in voxels of the Gaussian low-pass of each class\'s random field')
    parser.add_argument('--lsp-patch', type=int, default=DEFAULT_LSP_PATCH,
                        help='lsp: edge length in voxels of the per-class pattern tiled over the volume')
    parser.add_argument('--surrogate-tr', default='nnUNetTrainer',
                        help='tap: trainer of the clean surrogate model ($nnUNet_results/<dataset>/<tr>__<p>__<c>, '
                             'same -p and -c as the export)')
    parser.add_argument('--surrogate-f', default='0', help='tap: fold of the surrogate model')
    parser.add_argument('--surrogate-chk', default='checkpoint_final.pth',
                        help='tap: checkpoint file name in the surrogate\'s fold folder')
    parser.add_argument('--tap-steps', type=int, default=DEFAULT_TAP_STEPS,
                        help='tap: PGD steps (step size 2.5 x eps / steps)')
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument('--eps', default=None, help='budget as a fraction of each case\'s p0.5-p99.5 range per '
                                                    'channel, e.g. 4/255 (default: the checkpoint\'s, else 4/255)')
    budget.add_argument('--eps-abs', default=None, help='absolute budget in raw units (e.g. HU)')
    parser.add_argument('--budget-mode', default=None, metavar='{' + ','.join(BUDGET_MODES) + '}',
                        help='what --eps is a fraction of, per channel: ' +
                             '; '.join(f'{k}: {v}' for k, v in BUDGET_MODES.items()) +
                             ' (default: the checkpoint\'s, else range)')
    parser.add_argument('--seed', type=int, default=0, help='seed of export-time random methods (conv: the key, its '
                                                            'per-class kernels)')
    parser.add_argument('--strength', type=float, default=None,
                        help='conv: the weight s in (0, 4] of the convolved image (s > 1 extrapolates; no --eps: the '
                             'copy\'s budget is its PSNR; conv_code.strength_for_psnr picks s for a target ROI PSNR)')
    parser.add_argument('-np', type=int, default=1, help='worker processes')
    parser.add_argument('-num_parts', type=int, default=1,
                        help='split the export over N runs (processes or machines sharing nnUNet_raw and '
                             'nnUNet_results at the same paths), as nnUNetv2_predict: run every part K = 0..N-1 with '
                             'the same arguments. Part K protects the sorted case ids [K::N] into the shared hidden '
                             '.partial folder; the last part to finish publishes the dataset (renames it) once every '
                             'case is present and checked. A killed part is resumed by running it again')
    parser.add_argument('-part_id', type=int, default=0, help='this run\'s part, 0 <= K < -num_parts')
    parser.add_argument('--finalize', action='store_true',
                        help='protect nothing: publish the parts\' work if every case is present and checked, else '
                             'name the missing cases (normally not needed: the last part publishes by itself)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output dataset')
    parser.add_argument('-device', default='cpu', choices=['cpu', 'cuda', 'mps'])
    args = parser.parse_args(argv)
    try:
        eps = parse_eps(args.eps) if args.eps is not None else None
        eps_abs = parse_eps_abs(args.eps_abs) if args.eps_abs is not None else None
        if args.budget_mode is not None:
            check_budget_mode(args.budget_mode)
    except ValueError as e:  # one line, nothing written
        print(f'voxshield_export: error: {e}', file=sys.stderr)
        sys.exit(1)
    if args.lsp_patch < 1 or args.tap_steps < 1 or args.block < 1 or args.width < 1:
        parser.error('--lsp-patch, --tap-steps, --block and --width must be >= 1')
    if args.width_mm is not None and not args.width_mm > 0:
        parser.error('--width-mm must be > 0')
    band = {'width': args.width} if args.width_mm is None else {'width': args.width_mm, 'unit': 'mm'}
    if not args.smooth_sigma > 0:
        parser.error('--smooth-sigma must be > 0')
    if (args.method == CONV_METHOD) != (args.strength is not None):
        parser.error('--strength goes with --method conv, and conv needs it')
    if args.method == CONV_METHOD and (args.eps, args.eps_abs, args.budget_mode) != (None, None, None):
        parser.error('conv has no eps budget (its copy is measured by PSNR): give --strength, not --eps / --eps-abs / '
                     '--budget-mode')
    try:
        raw = env_folder('nnUNet_raw')
        source = find_dataset_folder(raw, args.d)
        source_name = os.path.basename(source)
        name = args.name or f'{dataset_id_and_name(source)[1]}Protected'
        output = os.path.join(raw, name if name.startswith('Dataset') else f'Dataset{args.o:03d}_{name}')
        options, checkpoint = None, None
        if args.method == 'tap':  # preprocessing as the surrogate was trained: its own plans
            surrogate = surrogate_folder(env_folder('nnUNet_results'), source_name, args.surrogate_tr, args.p, args.c)
            check_surrogate(surrogate, args.surrogate_f, args.surrogate_chk)
            options = {'surrogate': surrogate, 'fold': args.surrogate_f, 'checkpoint': args.surrogate_chk,
                       'steps': args.tap_steps}
            plans_file = os.path.join(surrogate, 'plans.json')
        elif args.method in EXPORT_TIME_METHODS:
            options = {'conv': {'strength': args.strength},
                       'lsp': {'patch': args.lsp_patch}, 'checkerboard': {'block': args.block, 'sign': args.sign},
                       'stripes': {'block': args.block}, 'diagonal': {'block': args.block},
                       'offset': {'sign': args.sign},
                       'smooth': {'sigma': args.smooth_sigma, 'sign': args.sign}, 'grow': band, 'shrink': band,
                       'edge': {**band, 'sign': args.sign}}.get(args.method)
            plans_file = os.path.join(env_folder('nnUNet_preprocessed'), source_name, args.p + '.json')
        if args.method in EXPORT_TIME_METHODS:
            report_folder = os.path.join(env_folder('nnUNet_results'), source_name,
                                         f'voxshield_{args.method}__{args.p}__{args.c}')
        else:
            model = os.path.join(env_folder('nnUNet_results'), source_name, f'{args.tr}__{args.p}__{args.c}')
            plans_file = os.path.join(model, 'plans.json')
            report_folder = os.path.join(model, f'fold_{args.f}')
            checkpoint = os.path.join(report_folder, args.chk)
        summary = export_dataset(source, output, plans_file, args.c,
                                 os.path.join(report_folder, f'export_{os.path.basename(output)}'), checkpoint,
                                 args.method, eps, eps_abs, args.seed, args.np, args.overwrite, args.device,
                                 method_options=options, num_parts=args.num_parts, part_id=args.part_id,
                                 finalize=args.finalize, budget_mode=args.budget_mode)
    except InputError as e:
        print(f'voxshield_export: error: {e}', file=sys.stderr)
        sys.exit(1)
    if summary.get('published') is False:
        print(f'Part {summary["part"]}: its {summary["part_cases"]} cases are done; {summary["cases_done"]} of '
              f'{summary["cases"]} cases present. The last part to finish publishes {output}')
        return
    if summary.get('already_published'):
        print(f'{output} was already published with these settings; nothing to do')
        return
    print(f'Wrote {output}: {summary["cases"]} cases, max budget use {summary["max_budget_use"]:.3f}, '
          f'PSNR mean {summary["psnr_mean"]}, SSIM mean {summary["ssim_mean"]}')
    if args.method == CONV_METHOD:
        print(f'conv (strength {args.strength}, no eps): ROI PSNR mean {summary["psnr_roi_mean"]}')
    if summary['unchanged_empty_roi']:
        print(f'{len(summary["unchanged_empty_roi"])} case(s) with an all-background label passed through '
              f'unchanged: {", ".join(summary["unchanged_empty_roi"])}')


if __name__ == '__main__':
    export_entry()
