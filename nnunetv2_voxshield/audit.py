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
import os
import re
import sys
from typing import Optional, Sequence

from nnunetv2_voxshield import verdict as VD
from nnunetv2_voxshield.audit_inputs import (AuditError, add_engine_arguments, check_copy, check_engine,
                                             engine_options, check_no_overlap, link_cases,  # noqa: F401
                                             parse_slurm, patient_of, pin_inputs, resolve_dataset, row_dataset_id,
                                             slurm_minutes, test_set)
from nnunetv2_voxshield.audit_jobs import _safe, build_jobs, copy_names  # noqa: F401
from nnunetv2_voxshield.dataset_io import InputError, list_training_cases, load_dataset_json
from nnunetv2_voxshield.panel import PanelError, build_panel, check_trainers

RULE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'results',
                         'amplitude_rule_2026-12-02.json')


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
    check_engine(backend, workers, threads)
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
    detector = the_panel.name != 'quick' if detector is None else detector
    rule = VD.load_rule(rule_file)

    out = os.path.abspath(output_dir)
    pin_inputs(out, {'clean': clean_dir, 'protected': protected_dirs, 'names': copies, 'train': tests['train'],
                     'test': tests['test']})
    rows = {'clean': os.path.join(out, 'nnUNet_raw', f'Dataset{row_dataset_id(out, "clean"):03d}_clean')}
    link_cases(listing['cases'], tests['train'], clean_json, rows['clean'])
    for name, d in zip(copies, protected_dirs):
        rows[name] = os.path.join(out, 'nnUNet_raw', f'Dataset{row_dataset_id(out, name):03d}_{_safe(name)}')
        link_cases(list_training_cases(d, load_dataset_json(d)), tests['train'], clean_json, rows[name],
                   src_dir=d)
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
    report = VD.build_report(out, records, the_panel, trainers, rows, copies, victims, settings, boot)
    files = VD.write_report(out, report)
    print('\n'.join(report['verdict']) + f'\nreport: {files[1]}', file=stream, flush=True)
    return report


def audit_entry(argv=None):
    """``voxshield_audit``: parse the arguments and run ``audit``; a user's error exits with one line."""
    parser = argparse.ArgumentParser(
        description='Audit protected copies of a dataset: stock nnU-Net exploiters (a panel of victim trainers, '
                    'configurations, plans and purifications) trained on the clean data and on each copy, scored on '
                    'clean held-out cases; a verdict line and report.json / report.md / PNGs in -o. Jobs run on N '
                    'local workers or on Slurm; rerunning the same command resumes. Reads the --clean and '
                    '--protected raw dataset folders (ids and names looked up in $nnUNet_raw), the held-out cases '
                    '(--test-images / --test-labels, default imagesTs / labelsTs of --clean, or --split), the '
                    '--panel-file and the --rule file; the inputs are never modified. Writes only into -o: audit.json, '
                    'private nnUNet_raw/ (links, purified copies), nnUNet_preprocessed/ and nnUNet_results/seed_S/ '
                    '(nnU-Net runs with these, not with your $nnUNet_* folders), test/, jobs/<name>/ (logs) and the '
                    'reports.')
    parser.add_argument('--clean', required=True, help='clean raw dataset: folder, id or DatasetXXX_Name')
    parser.add_argument('--protected', nargs='+', required=True, help='protected copies (any nnU-Net raw folder, id or DatasetXXX_Name)')
    parser.add_argument('--name', nargs='+', default=None, help='names of the copies in the report (default: '
                        'protected, or protected1, protected2, ...); to add copies to an OUT, name the copies audited '
                        'there as before')
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
    parser.add_argument('--eps', type=float, default=None, help='budget of voxshield_verify\'s budget use (default: '
                                                                'the copy\'s protection manifest, else verify\'s)')
    parser.add_argument('--detector', action=argparse.BooleanOptionalAction, default=None,
                        help='residual-only detector (default: off for quick, on otherwise)')
    parser.add_argument('--protects', type=float, default=VD.PROTECTS, help='"protects" at <= this Dice / clean')
    parser.add_argument('--keeps', type=float, default=VD.KEEPS, help='"does not protect" at >= this Dice / clean')
    parser.add_argument('--rule', default=RULE_FILE, help='amplitude rule fit (benchmarks/amplitude_rule.py JSON)')
    parser.add_argument('--boot', type=int, default=2000, help='bootstrap resamples (0: no intervals)')
    parser.add_argument('-o', required=True, help='output folder (resumable)')
    add_engine_arguments(parser)
    parser.add_argument('-device', default='cpu', choices=('cpu', 'cuda'), help='Default: cpu')
    parser.add_argument('--disable-tta', action='store_true', help='predict without mirroring (faster)')
    args = parser.parse_args(argv)
    panel = args.panel if args.panel or args.panel_file or args.exploiter else 'quick'
    try:
        engine = engine_options(args)
        audit(args.clean, args.protected, args.o, args.test_images, args.test_labels, args.split, args.group_regex,
              panel, args.panel_file, args.exploiter, args.seeds, args.epochs, args.p, args.name, engine['backend'],
              engine['workers'], engine['threads'], engine['slurm'], args.device, args.disable_tta, args.eps,
              args.detector, args.protects, args.keeps, args.rule, args.boot)
    except (AuditError, InputError) as e:
        sys.exit(f'voxshield_audit: error: {e}')
    except KeyboardInterrupt:
        sys.exit('voxshield_audit: interrupted; rerun the same command to resume')


if __name__ == '__main__':
    audit_entry()
