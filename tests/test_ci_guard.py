"""CI cannot pass by skipping (issue 30.7): without the real data, a test marked requires_hippocampus / requires_acdc
is skipped locally and fails under CI=true; the summary says how many data tests ran, before pytest's closing line.

The inner runs use the project's conftest.py and setup.cfg's pytest options (two pytest-xdist workers: the summary
is counted in xdist's controller from its workers' reports), and again with ``-p no:xdist`` (one process)."""
import configparser
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

TWO_WORKERS = ()                    # setup.cfg's addopts: --numprocesses=2 --dist=loadgroup
ONE_PROCESS = ('-p', 'no:xdist')    # setup.cfg's addopts are still accepted (tests/conftest.py)

TESTS = '''
from conftest import requires_acdc, requires_hippocampus


@requires_hippocampus
def test_needs_hippocampus():
    pass


@requires_acdc
def test_needs_acdc():
    pass


def test_needs_nothing():
    pass
'''


def run_pytest(folder, hippocampus, acdc, ci, mode):
    shutil.copy(REPO / 'tests' / 'conftest.py', folder / 'conftest.py')
    (folder / 'test_data_marks.py').write_text(TESTS)
    ini = configparser.ConfigParser()
    ini.read(REPO / 'setup.cfg')
    (folder / 'setup.cfg').write_text(f"[tool:pytest]\naddopts = {ini['tool:pytest']['addopts']}\n")
    env = {'PATH': '/usr/bin:/bin', 'VOXSHIELD_HIPPOCAMPUS': str(hippocampus), 'VOXSHIELD_ACDC': str(acdc),
           **({'CI': ci} if ci is not None else {})}
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *mode, str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    assert ('bringing up nodes...' in lines) == (mode == TWO_WORKERS), lines    # xdist's line: workers started
    return proc.returncode, lines, [line for line in lines if line.startswith('data tests:')]


@pytest.fixture
def data_folders(tmp_path):
    present, missing = tmp_path / 'present', tmp_path / 'missing'
    present.mkdir()
    (present / 'dataset.json').write_text('{}')
    run = tmp_path / 'run'
    run.mkdir()
    return run, present, missing


@pytest.mark.parametrize('ci, mode', [(None, TWO_WORKERS), ('false', TWO_WORKERS), (None, ONE_PROCESS)])
def test_missing_data_skips_outside_ci(data_folders, ci, mode):
    run, present, missing = data_folders
    code, lines, summary = run_pytest(run, missing, present, ci, mode)
    assert code == 0, lines
    assert lines[-1].startswith('2 passed, 1 skipped'), lines
    assert len(summary) == 1 and summary[0].startswith('data tests: 1 ran, 1 skipped ('), lines
    assert f'missing missing at {missing}' in summary[0] and f'present found at {present}' in summary[0]


@pytest.mark.parametrize('ci, mode', [('true', TWO_WORKERS), ('TRUE', TWO_WORKERS), ('1', TWO_WORKERS),
                                      ('true', ONE_PROCESS)])
def test_missing_data_fails_under_ci(data_folders, ci, mode):
    run, present, missing = data_folders
    code, lines, summary = run_pytest(run, present, missing, ci, mode)
    assert code == 1, lines
    assert lines[-1].startswith('2 passed, 1 error'), lines
    assert len(summary) == 1 and summary[0].startswith('data tests: 1 ran, 0 skipped, 1 failed to start'), lines
    failure = next(line for line in lines if line.startswith('ERROR') and 'test_needs_acdc' in line)
    assert f'real data not found at {missing} (set $VOXSHIELD_ACDC)' in failure


@pytest.mark.parametrize('mode', [TWO_WORKERS, ONE_PROCESS])
def test_present_data_runs_under_ci(data_folders, mode):
    run, present, _ = data_folders
    code, lines, summary = run_pytest(run, present, present, 'true', mode)
    assert code == 0 and lines[-1].startswith('3 passed'), lines
    assert len(summary) == 1 and summary[0].startswith('data tests: 2 ran, 0 skipped'), lines
