"""Shared fixtures: temporary nnU-Net folders, real Hippocampus cases copied from ../shared, CPU settings."""
import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = Path(os.environ.get('VOXSHIELD_HIPPOCAMPUS',
                                  REPO.parent / 'shared' / 'data' / 'Dataset004_Hippocampus'))
ACDC = Path(os.environ.get('VOXSHIELD_ACDC', REPO.parent / 'shared' / 'data' / 'Dataset027_ACDC'))

# Tests of real data carry one of these marks. Without the data they are skipped, except under CI (CI=true), where
# a missing data folder fails them: CI cannot pass by skipping. The summary counts the data tests that ran.
requires_hippocampus = pytest.mark.requires_hippocampus
requires_acdc = pytest.mark.requires_acdc
DATA = {'requires_hippocampus': (HIPPOCAMPUS, 'VOXSHIELD_HIPPOCAMPUS'), 'requires_acdc': (ACDC, 'VOXSHIELD_ACDC')}
DATA_FIXTURES = ('planned_hippocampus', 'hippocampus_env')
DATA_MARK = 'voxshield_data_test'  # set by this conftest on every data test (marks or fixtures); reports carry it

# CPU-friendly nnU-Net settings for every test (and the subprocesses they start)
os.environ.setdefault('nnUNet_n_proc_DA', '0')
os.environ.setdefault('nnUNet_def_n_proc', '1')
os.environ.setdefault('nnUNet_compile', 'false')
os.environ.setdefault('OMP_NUM_THREADS', '2')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # busy-waiting OpenMP threads crawl on a loaded 2-core machine
# Under pytest-xdist (setup.cfg: -n 2, one worker per core) each worker and everything it starts uses one thread.
# Forced, not defaulted: the workers inherit the controller's environment, where the line above already set 2.
XDIST_WORKER = os.environ.get('PYTEST_XDIST_WORKER', '')
if XDIST_WORKER:
    os.environ['OMP_NUM_THREADS'] = '1'
    os.environ['VOXSHIELD_TORCH_THREADS'] = '1'


def under_ci() -> bool:
    return os.environ.get('CI', '').strip().lower() in ('1', 'true', 'yes')


def pytest_addoption(parser, pluginmanager):
    """With ``-p no:xdist`` (or without pytest-xdist installed) setup.cfg's ``--numprocesses=2 --dist=loadgroup``
    are accepted and mean what ``-n 0`` means: one process."""
    if not pluginmanager.has_plugin('xdist'):
        group = parser.getgroup('xdist', 'pytest-xdist is disabled: these options are ignored')
        group.addoption('--numprocesses', dest='numprocesses', default=None, help='ignored without xdist')
        group.addoption('--dist', dest='dist', default='no', help='ignored without xdist')


def pytest_configure(config):
    for marker, (folder, variable) in DATA.items():
        config.addinivalue_line('markers', f'{marker}: needs {folder.name} (${variable}); skipped without it, '
                                           f'failed under CI=true')
    config.addinivalue_line('markers', f'{DATA_MARK}: set by tests/conftest.py on every test of real data (a data '
                                       f'mark or fixture); counted in the summary; -m {DATA_MARK} selects them')
    if not config.pluginmanager.has_plugin('xdist'):
        config.addinivalue_line('markers', 'xdist_group(name): runs on one pytest-xdist worker with its group')
    config.pluginmanager.register(DataTestCount(), 'voxshield_data_test_count')


def is_data_test(item) -> bool:
    return any(item.get_closest_marker(m) for m in DATA) or \
        any(f in getattr(item, 'fixturenames', ()) for f in DATA_FIXTURES)


def module_fixture_module(item) -> str:
    """The test module's name if the test uses a module-scoped fixture (its own or conftest's), else ''."""
    defs = getattr(getattr(item, '_fixtureinfo', None), 'name2fixturedefs', {})
    return item.module.__name__ if any(d and d[-1].scope == 'module' for d in defs.values()) else ''


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(items):
    """Runs in each process that collects (xdist's workers, or the only process). Data tests get the mark DATA_MARK,
    which their reports carry (as a keyword) to xdist's controller, where DataTestCount counts them. Under
    ``--dist loadgroup`` the tests that share a module-scoped fixture (a planned dataset, a trained model) form one
    xdist_group, so the fixture is built once, on one worker; explicit xdist_group marks (the Slurm tests) win."""
    for item in items:
        if is_data_test(item):
            item.add_marker(DATA_MARK)
        module = module_fixture_module(item)
        if module and not item.get_closest_marker('xdist_group'):
            item.add_marker(pytest.mark.xdist_group(module))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for marker, (folder, variable) in DATA.items():
        if item.get_closest_marker(marker) and not (folder / 'dataset.json').is_file():
            message = f'real data not found at {folder} (set ${variable})'
            if under_ci():
                pytest.fail(f'CI=true: {message}; CI must not pass by skipping', pytrace=False)
            pytest.skip(message)


class DataTestCount:
    """Counts the tests of real data that ran and that were skipped; says so before pytest's own closing line
    ("data tests: N ran, M skipped (...)"). Counts reports (keyword DATA_MARK), so under pytest-xdist the
    controller, which collects nothing itself, counts the reports its workers send."""

    def __init__(self):
        self.ran, self.skipped, self.errors = set(), set(), set()

    def pytest_runtest_logreport(self, report):
        if DATA_MARK in report.keywords:
            if report.when == 'call':
                self.ran.add(report.nodeid)
            elif report.skipped:
                self.skipped.add(report.nodeid)
            elif report.failed and report.when == 'setup':
                self.errors.add(report.nodeid)

    def pytest_terminal_summary(self, terminalreporter):
        where = ', '.join(f'{folder.name} {"found" if (folder / "dataset.json").is_file() else "missing"} at '
                          f'{folder}' for folder, _ in DATA.values())
        errors = f', {len(self.errors - self.ran)} failed to start' if self.errors - self.ran else ''
        terminalreporter.write_line(f'data tests: {len(self.ran)} ran, {len(self.skipped - self.ran)} skipped{errors} '
                                    f'({where})')


@contextlib.contextmanager
def private_nnunet_roots(base: Path):
    """nnUNet_raw / _preprocessed / _results under ``base``, exported to the environment inside the block (for
    module-scoped fixtures, which cannot use ``monkeypatch``); yields (roots, MonkeyPatch)."""
    roots = {name: base / name for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    with pytest.MonkeyPatch.context() as mp:
        for name, folder in roots.items():
            folder.mkdir()
            mp.setenv(name, str(folder))
        yield roots, mp


def snapshot(module):
    """A detached copy of a module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    """Two state dicts (``snapshot``) are equal tensor by tensor."""
    import torch
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results under tmp_path, exported to the environment."""
    dirs = {}
    for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        d = tmp_path / name
        d.mkdir()
        monkeypatch.setenv(name, str(d))
        dirs[name] = d
    return dirs


def copy_hippocampus_cases(dst_dataset_dir: Path, n_cases: int, dataset_name: str = None) -> list:
    """Copy the first ``n_cases`` labelled cases (sorted) of the real data into ``dst_dataset_dir``.

    Keeps a mix of float32 and uint8 images when the first cases do not contain both. Returns case ids.
    """
    import json
    import SimpleITK as sitk

    src = HIPPOCAMPUS
    cases = sorted(p.name[:-len('.nii.gz')] for p in (src / 'labelsTr').glob('*.nii.gz'))
    chosen = cases[:n_cases]
    dtypes = {c: sitk.ReadImage(str(src / 'imagesTr' / f'{c}_0000.nii.gz')).GetPixelIDTypeAsString() for c in chosen}
    if len(set(dtypes.values())) < 2 and n_cases >= 2:
        for c in cases[n_cases:]:
            t = sitk.ReadImage(str(src / 'imagesTr' / f'{c}_0000.nii.gz')).GetPixelIDTypeAsString()
            if t not in dtypes.values():
                chosen[-1] = c
                break
    (dst_dataset_dir / 'imagesTr').mkdir(parents=True)
    (dst_dataset_dir / 'labelsTr').mkdir(parents=True)
    for c in chosen:
        shutil.copy(src / 'imagesTr' / f'{c}_0000.nii.gz', dst_dataset_dir / 'imagesTr')
        shutil.copy(src / 'labelsTr' / f'{c}.nii.gz', dst_dataset_dir / 'labelsTr')
    ds = json.loads((src / 'dataset.json').read_text())
    ds['numTraining'] = len(chosen)
    (dst_dataset_dir / 'dataset.json').write_text(json.dumps(ds, indent=2))
    return chosen


TEST_TRAINERS = REPO / 'tests' / 'nnunet_test_trainers'


@pytest.fixture
def test_trainers_env(monkeypatch):
    """Put tests/nnunet_test_trainers (nnUNetTrainer_tiny, ...) in front of nnUNet_extTrainer."""
    entries = [str(TEST_TRAINERS)] + [p for p in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p]
    monkeypatch.setenv('nnUNet_extTrainer', os.pathsep.join(entries))
    return str(TEST_TRAINERS)


def run_cli(args, env_updates=None, check=True, **kwargs):
    """Run a console command in a subprocess with the current environment (+ updates); returns CompletedProcess."""
    import subprocess
    env = dict(os.environ)
    for k, v in (env_updates or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    proc = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
                             f'{proc.stderr[-3000:]}')
    return proc


def validation_summary(fold: Path, labels) -> dict:
    """nnU-Net's validation of a trained fold, checked by value: summary.json scores every predicted case, the mean
    Dice of each label (``labels``, str) lies in [0, 1], and each prediction holds only background and those labels."""
    import json
    import numpy as np
    import SimpleITK as sitk
    summary = json.loads((fold / 'validation' / 'summary.json').read_text())
    predictions = sorted((fold / 'validation').glob('*.nii.gz'))
    assert predictions and len(summary['metric_per_case']) == len(predictions)
    assert set(summary['mean']) == set(labels)
    assert all(0.0 <= summary['mean'][k]['Dice'] <= 1.0 for k in labels), summary['mean']
    for p in predictions:
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(p))))) <= {0} | {int(k) for k in labels}, p
    return summary


def plan_and_preprocess(dataset_id: int, roots: dict, configurations=('3d_fullres',)):
    """Stock nnUNetv2_plan_and_preprocess in a subprocess (the planner fails with nnUNet_n_proc_DA=0)."""
    run_cli(['nnUNetv2_plan_and_preprocess', '-d', dataset_id, '-c', *configurations, '-np', '1'],
            {**{k: str(v) for k, v in roots.items()}, 'nnUNet_n_proc_DA': None})


def use_cpu_preset_as_default_plans(preprocessed_dataset: Path):
    """Rewrite nnUNetPlans.json with the CPU preset's small networks (same data_identifier, same name), so that every
    test trains and predicts small networks; test_plans.py tests the preset itself."""
    import json
    from nnunetv2_voxshield.plans import load_preset, preset_plans
    plans_file = preprocessed_dataset / 'nnUNetPlans.json'
    plans = preset_plans(json.loads(plans_file.read_text()), load_preset('cpu'), 'nnUNetPlans')
    plans_file.write_text(json.dumps(plans, indent=2))


@pytest.fixture(scope='session')
def planned_hippocampus(tmp_path_factory):
    """8 real Hippocampus cases, planned and preprocessed (3d_fullres, 2d) once per session. Treat as read-only:
    copy ``preprocessed`` if a test changes it; point nnUNet_results at a fresh folder."""
    if not (HIPPOCAMPUS / 'dataset.json').is_file():
        pytest.fail(f'real data not found at {HIPPOCAMPUS}; mark the test with requires_hippocampus')
    base = tmp_path_factory.mktemp('planned_hippocampus')
    roots = {name: base / name for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for d in roots.values():
        d.mkdir()
    cases = copy_hippocampus_cases(roots['nnUNet_raw'] / 'Dataset004_Hippocampus', 8)
    plan_and_preprocess(4, roots, ('3d_fullres', '2d'))
    use_cpu_preset_as_default_plans(roots['nnUNet_preprocessed'] / 'Dataset004_Hippocampus')
    return {**roots, 'dataset_id': 4, 'dataset_name': 'Dataset004_Hippocampus', 'cases': cases}


@pytest.fixture
def hippocampus_env(planned_hippocampus, tmp_path, monkeypatch):
    """nnU-Net env pointing at the session's planned Hippocampus subset, with a fresh nnUNet_results."""
    results = tmp_path / 'nnUNet_results'
    results.mkdir()
    monkeypatch.setenv('nnUNet_raw', str(planned_hippocampus['nnUNet_raw']))
    monkeypatch.setenv('nnUNet_preprocessed', str(planned_hippocampus['nnUNet_preprocessed']))
    monkeypatch.setenv('nnUNet_results', str(results))
    return {**planned_hippocampus, 'nnUNet_results': results}


def perturbed_copy(src: Path, dst: Path, amplitude: float = 40.0, seed: int = 0) -> Path:
    """The training cases of ``src`` with a fixed +-amplitude offset per label (a learnable shortcut)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns('*Ts'))
    rng = np.random.default_rng(seed)
    for f in sorted((dst / 'imagesTr').glob('*.nii.gz')):
        image = sitk.ReadImage(str(f))
        a = sitk.GetArrayFromImage(image).astype(np.float64)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(dst / 'labelsTr' / f.name.replace('_0000', ''))))
        a += np.where(lab == 1, amplitude, np.where(lab == 2, -amplitude, 0)) + rng.normal(0, 1, a.shape)
        info = np.iinfo(sitk.GetArrayFromImage(image).dtype) if sitk.GetArrayFromImage(image).dtype.kind in 'iu' \
            else None
        out = np.clip(a, info.min, info.max) if info else a
        o = sitk.GetImageFromArray(out.astype(sitk.GetArrayFromImage(image).dtype))
        o.CopyInformation(image)
        sitk.WriteImage(o, str(f), True)
    return dst


@pytest.fixture
def phantom_pair(nnunet_dirs):
    """Dataset101_Clean (the phantom: 6 training, 2 test cases) and Dataset102_Protected (perturbed_copy of it)."""
    from nnunetv2_voxshield.phantom import write_phantom_dataset
    raw = nnunet_dirs['nnUNet_raw']
    clean = Path(write_phantom_dataset(101, 'Clean', n_cases=6, n_test=2, raw_root=str(raw)))
    protected = perturbed_copy(clean, raw / 'Dataset102_Protected')
    return clean, protected


# ------------------------------------------------------------------ the three-class phantom (conv, EM sample-wise)
THREE_CLASS_SHAPE = (6, 20, 18)  # (z, y, x)
SPACING = (0.8, 0.8, 3.0)  # (x, y, z) mm: thick slices


def three_class_case(index: int):
    """(image float64, seg) of a small three-class phantom: a right disc (1), a ring (2) around a left disc (3) on
    the middle slices, over a smooth random background."""
    rng = np.random.default_rng(index)
    z, y, x = np.meshgrid(*[np.arange(n) for n in THREE_CLASS_SHAPE], indexing='ij')
    seg = np.zeros(THREE_CLASS_SHAPE, dtype=np.uint8)
    slices = (z >= 1) & (z <= 4)
    r_left = np.hypot(y - 10, x - 6 - index % 2)
    seg[slices & (np.hypot(y - 10, x - 14) <= 3)] = 1
    seg[slices & (r_left <= 5)] = 2
    seg[slices & (r_left <= 3)] = 3
    image = 0.3 + 0.2 * rng.random(THREE_CLASS_SHAPE) + 0.1 * np.sin(x / 2.0) * np.cos(y / 3.0)
    for label, level in ((1, 0.6), (2, 0.2), (3, 0.9)):
        image[seg == label] += level
    return image, seg


def write_three_class_dataset(folder: Path, dtypes=('float32', 'uint8', 'float32')) -> list:
    """One case of ``three_class_case`` per dtype (uint8 cases scaled by 100) in nnU-Net raw format at ``SPACING``,
    with its dataset.json (labels a, b, c); returns the case ids."""
    import json
    for sub in ('imagesTr', 'labelsTr'):
        (folder / sub).mkdir(parents=True)
    cases = []
    for i, dtype in enumerate(dtypes):
        image, seg = three_class_case(i)
        image = np.rint(image * 100) if dtype == 'uint8' else image
        for array, path in ((image.astype(dtype), folder / 'imagesTr' / f'tc_{i:03d}_0000.nii.gz'),
                            (seg, folder / 'labelsTr' / f'tc_{i:03d}.nii.gz')):
            out = sitk.GetImageFromArray(array)
            out.SetSpacing(SPACING)
            out.SetOrigin((10.0, -4.0, 2.5))
            sitk.WriteImage(out, str(path))
        cases.append(f'tc_{i:03d}')
    (folder / 'dataset.json').write_text(json.dumps({
        'channel_names': {'0': 'MRI'}, 'labels': {'background': 0, 'a': 1, 'b': 2, 'c': 3},
        'numTraining': len(cases), 'file_ending': '.nii.gz'}))
    return cases
