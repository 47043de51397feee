"""The audit's inputs, checked before any job starts (one line naming the culprit), and its folder: links to the
training and test cases, dataset ids, the pinned inputs."""
import json
import os
import re
from typing import Dict, Optional, Sequence

from nnunetv2_voxshield.jobs import BACKENDS
from nnunetv2_voxshield.dataset_io import (InputError, find_dataset_folder, geometry, geometry_mismatch,
                                           list_training_cases, load_dataset_json, read_header, sha256_of,
                                           write_json_atomic)


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
    """Geometry (shape, spacing, origin, direction) of a case's first image channel, read from its header only."""
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


def add_engine_arguments(parser, threads_default: Optional[int] = 1) -> None:
    """The engine's options (jobs.run_jobs) of a command: backend, workers, threads per job (None: the machine's
    cores shared among the workers) and Slurm's options."""
    parser.add_argument('--backend', default='local', help='local (default) or slurm')
    parser.add_argument('-w', '--workers', type=int, default=1, help='jobs at a time (local backend; Slurm: in '
                                                                     'flight)')
    fallback = '$VOXSHIELD_TORCH_THREADS, else the cores / workers'
    parser.add_argument('--threads', type=int, default=threads_default,
                        help=f'CPU threads per job. Default: {threads_default or fallback}')
    parser.add_argument('--partition', default=None, help='Slurm partition')
    parser.add_argument('--time', default=None, help='Slurm time limit per job, e.g. 12:00:00 or minutes')
    parser.add_argument('--gpus', type=int, default=None, help='GPUs per Slurm job')
    parser.add_argument('--mem', default=None, help='memory per Slurm job, e.g. 32G')
    parser.add_argument('--sbatch-extra', nargs='*', default=[], metavar='KEY=VALUE', help='more sbatch options')


def default_threads(workers: int) -> int:
    """CPU threads per job when none are given: $VOXSHIELD_TORCH_THREADS if set (the project's per-lane setting),
    else the machine's cores shared among the workers."""
    env = os.environ.get('VOXSHIELD_TORCH_THREADS', '').strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def check_engine(backend: str, workers: int, threads: int) -> None:
    """AuditError (one line) for an unknown backend or fewer than one worker or thread."""
    if backend not in BACKENDS:
        raise AuditError(f'--backend {backend!r}: unknown backend (choose from {", ".join(BACKENDS)})')
    if workers < 1 or threads < 1:
        raise AuditError(f'-w {workers} / --threads {threads}: must be at least 1')


def engine_options(args) -> dict:
    """backend, workers, threads and slurm (parse_slurm) from the parsed ``add_engine_arguments`` options; an
    AuditError names a bad one."""
    threads = args.threads or default_threads(args.workers)
    check_engine(args.backend, args.workers, threads)
    return {'backend': args.backend, 'workers': args.workers, 'threads': threads,
            'slurm': parse_slurm(args.partition, args.time, args.gpus, args.mem, args.sbatch_extra)}


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
               images: str = 'imagesTr', labels: str = 'labelsTr', src_dir: Optional[str] = None) -> None:
    """A raw dataset of symlinks to ``cases`` of a listing (the sources are only read), with the protection
    manifest of ``src_dir`` if it has one (verify reads its budget from it)."""
    from nnunetv2_voxshield.manifest import MANIFEST_FILE

    def build(tmp):
        os.makedirs(os.path.join(tmp, images))
        os.makedirs(os.path.join(tmp, labels))
        if src_dir and os.path.isfile(os.path.join(src_dir, MANIFEST_FILE)):
            os.symlink(os.path.abspath(os.path.join(src_dir, MANIFEST_FILE)), os.path.join(tmp, MANIFEST_FILE))
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
    """audit.json: the inputs OUT was made for ('protected' and its 'names' aligned); another clean or test set in
    the same OUT is refused. The protected copies may grow (a rerun that adds copies reuses the victims already
    trained; audit.json then lists them all) or be a part of those pinned (a report on fewer copies), each copy
    keeping the name it was audited under; a copy that replaces a pinned one is refused."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, 'audit.json')
    if not os.path.isfile(path):
        write_json_atomic(pinned, path)
        return
    old = json.load(open(path))
    for k, v in pinned.items():
        if k not in ('protected', 'names') and old.get(k) != v:
            raise AuditError(f'{path}: OUT was made for another {k} ({str(old.get(k))[:80]}); use another -o')
    before, now = list(old.get('protected') or []), list(pinned['protected'])
    if not (set(before) <= set(now) or set(now) <= set(before)):
        raise AuditError(f'{path}: OUT was made for another protected ({str(before)[:80]}); use another -o')
    named = dict(zip(before, old.get('names') or []))
    names = dict(zip(now, pinned.get('names') or []))
    for d, n in names.items():
        if d in named and named[d] != n:
            raise AuditError(f'{path}: {d} was audited as {named[d]!r} in this OUT; give it that name again (--name) '
                             f'or use another -o')
    if set(before) < set(now):
        grown = before + [d for d in now if d not in before]
        write_json_atomic({**old, 'protected': grown, 'names': [named.get(d) or names.get(d) for d in grown]}, path)
