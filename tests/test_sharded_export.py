"""voxshield_export -num_parts N -part_id K: parts as separate processes, resume, idempotence, refusals."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import private_nnunet_roots, requires_hippocampus
from nnunetv2_voxshield import export
from nnunetv2_voxshield.distributed import part_cases
from nnunetv2_voxshield.phantom import write_phantom_dataset
from test_export import phantom_plans, tree, write_checkpoint

pytestmark = requires_hippocampus  # the plans come from the session's planned Hippocampus subset

SRC = 'Dataset840_Shards'
N_CASES = 5


@pytest.fixture(scope='module')
def shards(planned_hippocampus, tmp_path_factory):
    """A 5-case phantom, plans, a generator checkpoint and the reference one-process export (Dataset841)."""
    base = tmp_path_factory.mktemp('shards')
    with private_nnunet_roots(base) as (roots, mp):
        folder = Path(write_phantom_dataset(840, 'Shards', n_cases=N_CASES, n_test=1,
                                            raw_root=str(roots['nnUNet_raw'])))
        plans = roots['nnUNet_preprocessed'] / SRC / 'nnUNetPlans.json'
        plans.parent.mkdir()
        stock = planned_hippocampus['nnUNet_preprocessed'] / planned_hippocampus['dataset_name'] / 'nnUNetPlans.json'
        plans.write_text(json.dumps(phantom_plans(stock, SRC)))
        fold = write_checkpoint(roots['nnUNet_results'], SRC, plans, folder / 'dataset.json')
        other = torch.load(fold / 'checkpoint_final.pth', weights_only=False)  # another model, same architecture
        other['voxshield']['generator_weights'] = {k: v * 0.5 for k, v in
                                                   other['voxshield']['generator_weights'].items()}
        torch.save(other, fold / 'checkpoint_other.pth')
        run(['-o', '841', '--name', 'Reference'])
        yield {**roots, 'src': folder, 'reference': tree(roots['nnUNet_raw'] / 'Dataset841_Reference')}


def run(args):
    export.export_entry(['-d', '840', '-device', 'cpu'] + args)


def cli(args, **kwargs):
    return subprocess.Popen([sys.executable, '-m', 'nnunetv2_voxshield.export', '-d', '840'] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def folders(raw: Path, name: str):
    return raw / name, raw / f'.{name}.partial'


def test_assignment_is_sorted_ids_strided():
    cases = {c: {} for c in ['c', 'a', 'e', 'b', 'd']}
    assert list(part_cases(cases, 2, 0)) == ['a', 'c', 'e'] and list(part_cases(cases, 2, 1)) == ['b', 'd']
    assert list(part_cases(cases, 1, 0)) == sorted(cases)
    assert sum(len(part_cases(cases, 3, k)) for k in range(3)) == 5


def test_two_processes_equal_one(shards):
    """Both parts start at once; whichever finishes last publishes; the result is byte-identical to one process."""
    final, partial = folders(shards['nnUNet_raw'], 'Dataset842_TwoParts')
    procs = [cli(['-o', '842', '--name', 'TwoParts', '-num_parts', '2', '-part_id', str(k)], env=os.environ)
             for k in (0, 1)]
    outputs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum('Wrote' in out for out, _ in outputs) >= 1, outputs
    assert not partial.exists() and tree(final) == shards['reference']
    assert not [p for p in final.rglob('*') if p.name.startswith('.')]


def test_part_twice_changes_nothing_then_last_part_publishes(shards, monkeypatch, capsys):
    final, partial = folders(shards['nnUNet_raw'], 'Dataset843_Twice')
    args = ['-o', '843', '--name', 'Twice', '-num_parts', '2']
    run(args + ['-part_id', '0'])
    assert 'of 5 cases present' in capsys.readouterr().out
    assert not final.exists() and partial.is_dir()
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in partial.rglob('*') if p.is_file()}
    assert len([p for p in before if p.parent.name == 'imagesTr']) == 3  # phantom_000, _002, _004

    calls = []
    real = export.protect_case
    monkeypatch.setattr(export, 'protect_case', lambda *a: calls.append(a[0]) or real(*a))
    run(args + ['-part_id', '0'])
    assert calls == [] and not final.exists()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in partial.rglob('*') if p.is_file()} == before

    run(args + ['-part_id', '1'])  # the last part: publishes
    assert calls == ['phantom_001', 'phantom_003']
    assert not partial.exists() and tree(final) == shards['reference']
    published = tree(final)
    run(args + ['-part_id', '0'])  # after publication: nothing to do
    assert 'already published' in capsys.readouterr().out
    assert tree(final) == published and calls == ['phantom_001', 'phantom_003']


def test_killed_part_resumes_and_finalize(shards, monkeypatch, capsys):
    script = ('import os, signal, sys\n'
              'from nnunetv2_voxshield import export\n'
              'real, calls = export.protect_case, []\n'
              'def dying(case, files, folder, ctx):\n'
              '    calls.append(case)\n'
              '    if len(calls) == 2:\n'
              '        os.kill(os.getpid(), signal.SIGKILL)\n'
              '    return real(case, files, folder, ctx)\n'
              'export.protect_case = dying\n'
              'export.export_entry(sys.argv[1:])\n')
    args = ['-d', '840', '-o', '844', '--name', 'Killed', '-num_parts', '2']
    proc = subprocess.run([sys.executable, '-c', script, *args, '-part_id', '1'], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    final, partial = folders(shards['nnUNet_raw'], 'Dataset844_Killed')
    assert not final.exists() and partial.is_dir()

    # --finalize refuses while cases are missing: one line naming the partial folder
    with pytest.raises(SystemExit) as exc:
        run(['-o', '844', '--name', 'Killed', '--finalize'])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1, err
    assert str(partial) in err and '(first: phantom_000, part 0 of 2)' in err, err

    calls = []
    real = export.protect_case
    monkeypatch.setattr(export, 'protect_case', lambda *a: calls.append(a[0]) or real(*a))
    run(args[2:] + ['-part_id', '1'])  # resumes: phantom_001 was done before the kill
    assert calls == ['phantom_003'] and not final.exists()
    run(args[2:] + ['-part_id', '0'])
    assert not partial.exists() and tree(final) == shards['reference']


@pytest.mark.parametrize('extra, message', [
    (['-num_parts', '2', '-part_id', '1', '--eps', '8/255'], 'eps'),
    (['-num_parts', '3', '-part_id', '1'], '-num_parts 2'),
    (['-num_parts', '2', '-part_id', '1', '--method', 'random'], 'method'),
    (['-num_parts', '2', '-part_id', '1', '--chk', 'checkpoint_other.pth'], 'checkpoint'),
    (['-num_parts', '2', '-part_id', '2'], '-part_id 2: must be in 0..1'),
    (['--finalize', '-num_parts', '2', '-part_id', '1'], '--finalize'),
])
def test_inconsistent_parts_refused(shards, extra, message, capsys):
    raw = shards['nnUNet_raw']
    final, partial = folders(raw, 'Dataset845_Mixed')
    common = ['-o', '845', '--name', 'Mixed']
    if not partial.exists():
        run(common + ['-num_parts', '2', '-part_id', '0'])
    capsys.readouterr()
    before = tree(partial)
    with pytest.raises(SystemExit) as exc:
        run(common + extra)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1 and message in err, err
    if message in ('eps', '-num_parts 2', 'method', 'checkpoint'):
        assert str(partial / '.parts' / 'part_0_of_2.json') in err  # names the record it disagrees with
    assert tree(partial) == before and not final.exists()
