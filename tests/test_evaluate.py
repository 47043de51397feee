"""voxshield_evaluate end to end with very short stock victims, resume, and the user-facing errors."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import copy_hippocampus_cases, requires_hippocampus
from nnunetv2_voxshield.evaluate import (EvaluationError, Workspace, evaluate, parse_plans, reuse_victim, row_source,
                                         victim_jobs)
from nnunetv2_voxshield.victims import VictimError, cpu_threads, victim_trainer_name


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture
def clean_and_protected(nnunet_dirs):
    """Dataset101 (5 training + 2 test cases of the real data) and Dataset102: its copy with a +-3 z-flicker."""
    raw = nnunet_dirs['nnUNet_raw']
    clean = raw / 'Dataset101_Clean'
    cases = copy_hippocampus_cases(clean, 7)
    (clean / 'imagesTs').mkdir()
    (clean / 'labelsTs').mkdir()
    for c in cases[-2:]:
        shutil.move(clean / 'imagesTr' / f'{c}_0000.nii.gz', clean / 'imagesTs')
        shutil.move(clean / 'labelsTr' / f'{c}.nii.gz', clean / 'labelsTs')
    ds = json.loads((clean / 'dataset.json').read_text())
    ds['numTraining'] = 5
    (clean / 'dataset.json').write_text(json.dumps(ds, indent=2))
    protected = raw / 'Dataset102_Protected'
    shutil.copytree(clean, protected, ignore=shutil.ignore_patterns('*Ts'))
    rng = np.random.default_rng(0)
    for f in sorted((protected / 'imagesTr').glob('*.nii.gz')):
        image = sitk.ReadImage(str(f))
        a = sitk.GetArrayFromImage(image)
        flicker = rng.choice([-3.0, 3.0], size=a.shape[0])[:, None, None]
        out = sitk.GetImageFromArray(np.clip(a + flicker, 0, None).astype(a.dtype))
        out.CopyInformation(image)
        sitk.WriteImage(out, str(f), True)
    return clean, protected


def test_names_of_trainers_and_plans():
    assert victim_trainer_name(20) == 'nnUNetTrainer_20epochs'
    assert victim_trainer_name(1) == 'nnUNetTrainer_1epoch'
    assert victim_trainer_name(None) == 'nnUNetTrainer'
    assert victim_trainer_name(20, 'nnUNetTrainer_tiny') == 'nnUNetTrainer_tiny'
    assert parse_plans('nnUNetPlans') is None and parse_plans('nnUNetPlans_cpu') == 'cpu'
    assert parse_plans('nnUNetResEncUNetLPlans') is None and parse_plans('nnUNetResEncUNetMPlans_cpu') == 'cpu'
    for bad in ('nnUNetResEncUNetMPlans_gpu', 'myPlans', 'nnUNetPlans_'):
        with pytest.raises(EvaluationError, match='nnUNetPlans_cpu'):
            parse_plans(bad)


@requires_hippocampus
@pytest.mark.slow
def test_pipeline_outputs_and_resume(clean_and_protected, nnunet_dirs, test_trainers_env, tmp_path, capsys):
    clean, protected = clean_and_protected
    before = {d: tree_digest(d) for d in (clean, protected)}
    out = tmp_path / 'OUT'
    kwargs = dict(configurations=['3d_fullres'], plans='nnUNetPlans_cpu', trainer='nnUNetTrainer_tiny', seeds=[0],
                  device='cpu', disable_tta=True)
    report = evaluate('101', 'Dataset102_Protected', str(out), **kwargs)

    for name in ('report.json', 'report.md', 'figure.png'):
        assert (out / name).is_file(), name
    assert json.loads((out / 'report.json').read_text())['rows'][0]['row'] == 'clean'
    assert [r['row'] for r in report['rows']] == ['clean', 'protected']
    for row in report['rows']:
        v = row['victims']['3d_fullres']
        assert 0.0 <= v['dice']['mean'] <= 1.0 and v['dice']['n'] == 1
        assert set(v['dice_per_label']) == {'1', '2'}
        assert np.isfinite(v['hd95_mm']['mean']) and v['hd95_mm']['mean'] >= 0
        scores = json.loads((out / 'victims' / row['row'] / '3d_fullres' / 'seed_0' / 'scores.json').read_text())
        assert len(scores['cases']) == 2  # every test case scored, none dropped
        assert all(c['spacing'] == [1.0, 1.0, 1.0] for c in scores['cases'])
    q = report['rows'][1]['quality']
    assert 20 < q['psnr']['mean'] < 90 and 0.5 < q['ssim']['mean'] <= 1.0
    assert np.isfinite(q['psnr_roi']['mean']) and np.isfinite(q['ssim_roi']['mean'])
    assert report['rows'][0]['quality'] is None
    md = (out / 'report.md').read_text()
    assert '| Method | Defence | Configuration | DSC (%) | HD95 (mm) | PSNR (dB)' in md
    assert md.count('| 3d_fullres |') == 4  # main table + per-class table, two rows each
    import matplotlib.image
    figure = matplotlib.image.imread(str(out / 'figure.png'))
    assert figure.shape[0] > 300 and figure[..., :3].std() > 0.05  # drawn, not a blank canvas
    # inputs and the user's own nnU-Net folders untouched
    assert {d: tree_digest(d) for d in (clean, protected)} == before
    assert not any(nnunet_dirs['nnUNet_preprocessed'].iterdir()) and not any(nnunet_dirs['nnUNet_results'].iterdir())
    # victims trained on their own preprocessing: each has its own plans/fingerprint
    assert len(list((out / 'nnUNet_preprocessed').glob('Dataset*/nnUNetPlans_cpu.json'))) == 2

    # rerun with a defence: finished victims are skipped, the purified row is trained
    clean_log = out / 'victims' / 'clean' / '3d_fullres' / 'seed_0' / 'victim.log'
    stamp = clean_log.stat().st_mtime_ns, clean_log.read_text()
    capsys.readouterr()
    report = evaluate('101', 'Dataset102_Protected', str(out), defences=['zmedian'], **kwargs)
    printed = capsys.readouterr().out
    assert printed.count('done before, skipped') == 2
    assert (clean_log.stat().st_mtime_ns, clean_log.read_text()) == stamp
    assert [r['row'] for r in report['rows']] == ['clean', 'protected', 'protected+zmedian']
    purified = report['rows'][2]
    assert purified['defence'] == 'median over z-slices (size 3)'
    assert 0.0 <= purified['victims']['3d_fullres']['dice']['mean'] <= 1.0
    assert 'median over z-slices (size 3)' in (out / 'report.md').read_text()
    # the purified copy keeps geometry and pixel types of the protected data
    case = sorted((protected / 'imagesTr').iterdir())[0].name
    a = sitk.ReadImage(str(protected / 'imagesTr' / case))
    b = sitk.ReadImage(str(Path(purified['dataset']) / 'imagesTr' / case))
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetPixelID() == b.GetPixelID()

    # a second evaluation of the same data reuses the identical victims (clean, protected, purified protected)
    # instead of training them again; with --defend-clean it trains only the purified clean row
    out2 = tmp_path / 'OUT2'
    capsys.readouterr()
    report2 = evaluate('101', 'Dataset102_Protected', str(out2), reuse_from=[str(out)], defences=['zmedian'],
                       defend_clean=True, **kwargs)
    assert capsys.readouterr().out.count('reused ') == 3
    assert [r['row'] for r in report2['rows']] == ['clean', 'clean+zmedian', 'protected', 'protected+zmedian']
    by_row = lambda rep: {r['row']: r['victims'] for r in rep['rows']}
    for row in ('clean', 'protected', 'protected+zmedian'):
        assert by_row(report2)[row] == by_row(report)[row]
        assert not (out2 / 'victims' / row / '3d_fullres' / 'seed_0' / 'victim.log').exists()
        scores = json.loads((out2 / 'victims' / row / '3d_fullres' / 'seed_0' / 'scores.json').read_text())
        assert scores['reused_from'] == str(out / 'victims' / row / '3d_fullres' / 'seed_0' / 'scores.json')
    assert (out2 / 'victims' / 'clean+zmedian' / '3d_fullres' / 'seed_0' / 'victim.log').is_file()
    scores = json.loads((out2 / 'victims' / 'clean+zmedian' / '3d_fullres' / 'seed_0' / 'scores.json').read_text())
    assert len(scores['cases']) == 2 and 'reused_from' not in scores  # trained here, every test case scored
    purified_clean = report2['rows'][1]
    assert purified_clean['method'] == 'Clean' and purified_clean['defence'] == 'median over z-slices (size 3)'
    assert 0.0 <= purified_clean['victims']['3d_fullres']['dice']['mean'] <= 1.0
    assert 20 < purified_clean['quality']['psnr']['mean'] < 90  # the purified clean data against the clean data
    # only the row with a victim to train is planned and preprocessed
    assert [p.parent.name for p in (out2 / 'nnUNet_preprocessed').glob('Dataset*/nnUNetPlans_cpu.json')] == \
        ['Dataset002_clean+zmedian']
    # the clean data itself is read only
    assert {d: tree_digest(d) for d in (clean, protected)} == before
    # purified clean rows alone (no protected copy): everything reused, a report without a figure
    out3 = tmp_path / 'OUT3'
    report3 = evaluate('101', [], str(out3), reuse_from=[str(out2)], defences=['zmedian'], defend_clean=True, **kwargs)
    assert [r['row'] for r in report3['rows']] == ['clean', 'clean+zmedian']
    assert by_row(report3) == {k: v for k, v in by_row(report2).items() if k.startswith('clean')}
    assert report3['figure'] is None and not (out3 / 'figure.png').exists() and (out3 / 'report.md').is_file()
    assert not list((out3 / 'nnUNet_preprocessed').glob('Dataset*/nnUNetPlans_cpu.json'))

    # OUT is pinned to its inputs
    with pytest.raises(EvaluationError, match='use another -o'):
        evaluate('102', '101', str(out), test_images=str(clean / 'imagesTs'), test_labels=str(clean / 'labelsTs'),
                 **kwargs)


@requires_hippocampus
def test_user_errors_are_one_line(clean_and_protected, tmp_path):
    clean, protected = clean_and_protected
    labels = tmp_path / 'labels'
    shutil.copytree(clean / 'labelsTs', labels)
    with pytest.raises(EvaluationError, match='no label for test case'):
        os.remove(next((clean / 'labelsTs').iterdir()))
        evaluate('101', '102', str(tmp_path / 'o1'))
    with pytest.raises(EvaluationError, match='no dataset with id 7'):
        evaluate('101', '7', str(tmp_path / 'o2'))
    with pytest.raises(EvaluationError, match='2 names for 1 protected datasets'):
        evaluate('101', ['102'], str(tmp_path / 'o2'), method_name=['A', 'B'])
    with pytest.raises(EvaluationError, match='--clean and --protected are the same dataset'):
        evaluate('101', ['102', '101'], str(tmp_path / 'o2'))
    with pytest.raises(EvaluationError, match='nothing to compare the clean victims with'):
        evaluate('101', [], str(tmp_path / 'o2'), defend_clean=True)
    cmd = [sys.executable, '-m', 'nnunetv2_voxshield.evaluate', '--clean', '101', '--protected', '102',
           '--test-images', str(clean / 'imagesTs'), '--test-labels', str(labels), '-o', str(tmp_path / 'o3')]
    for extra, message in ((['--defence', 'zmedian', 'sharpen'], 'unknown defence'),
                           (['-p', 'nnUNetPlans_gpu'], 'nnUNetPlans_cpu'),
                           (['--defence', 'blur', '--defence-c', '2d'], 'defence configuration(s) 2d not among'),
                           (['--reuse-clean', str(tmp_path / 'nowhere')], 'nowhere: no state.json')):
        res = subprocess.run(cmd + extra, capture_output=True, text=True, env=os.environ)
        assert res.returncode != 0
        assert res.stderr.startswith('voxshield_evaluate: error:') and message in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert not (tmp_path / 'o3').exists()


def test_cpu_threads_from_the_environment(monkeypatch):
    """Every core by default (as nnUNetv2_train); VOXSHIELD_TORCH_THREADS when runs share the cores; bad values refused."""
    import multiprocessing
    monkeypatch.delenv('VOXSHIELD_TORCH_THREADS', raising=False)
    assert cpu_threads() == multiprocessing.cpu_count()
    monkeypatch.setenv('VOXSHIELD_TORCH_THREADS', '1')
    assert cpu_threads() == 1
    for bad in ('0', '-2', 'two'):
        monkeypatch.setenv('VOXSHIELD_TORCH_THREADS', bad)
        with pytest.raises(VictimError, match='VOXSHIELD_TORCH_THREADS'):
            cpu_threads()


def test_victim_jobs_defences_only_in_their_configurations():
    rows = [('clean', 'Clean', None, None), ('protected', 'P', None, None),
            ('protected+blur', 'P', 'Gaussian blur', {'name': 'blur'})]
    jobs = victim_jobs(rows, ['3d_fullres', '2d'], ['3d_fullres'], [0, 1])
    assert ('protected+blur', '2d', 0) not in jobs and ('protected+blur', '3d_fullres', 1) in jobs
    assert len(jobs) == 2 * 2 * 2 + 2
    assert len(victim_jobs(rows, ['3d_fullres', '2d'], ['3d_fullres', '2d'], [0])) == 6


def test_reuse_victim_only_when_everything_matches(tmp_path):
    earlier = tmp_path / 'earlier'
    vdir = earlier / 'victims' / 'clean' / '3d_fullres' / 'seed_0'
    vdir.mkdir(parents=True)
    (earlier / 'state.json').write_text(json.dumps({'clean': '/data/clean', 'protected': ['/data/p1']}))
    scores = {'trainer': 'nnUNetTrainer_5epochs', 'plans': 'nnUNetPlans_cpu', 'summary': {'dice': 0.8},
              'cases': [{'case': 'a'}, {'case': 'b'}]}
    (vdir / 'scores.json').write_text(json.dumps(scores))
    ws = Workspace(str(tmp_path / 'now'), '/data/clean', ['/data/p2'])
    args = ('nnUNetTrainer_5epochs', 'nnUNetPlans_cpu', ['a', 'b'])
    for config, seed, trainer, plans, cases in (('2d', 0, *args), ('3d_fullres', 1, *args),
                                                ('3d_fullres', 0, 'nnUNetTrainer', *args[1:]),
                                                ('3d_fullres', 0, args[0], 'nnUNetPlans', args[2]),
                                                ('3d_fullres', 0, *args[:2], ['a', 'c'])):
        assert reuse_victim(ws, 'clean', config, seed, trainer, plans, cases, [str(earlier)]) is None
    other_clean = Workspace(str(tmp_path / 'other'), '/data/other', ['/data/p2'])
    assert reuse_victim(other_clean, 'clean', '3d_fullres', 0, *args, [str(earlier)]) is None
    assert reuse_victim(ws, 'clean+blur', '3d_fullres', 0, *args, [str(earlier)]) is None  # purified: other data
    got = reuse_victim(ws, 'clean', '3d_fullres', 0, *args, [str(earlier)])
    assert got['summary'] == {'dice': 0.8} and got['reused_from'] == str(vdir / 'scores.json')
    assert json.loads((tmp_path / 'now' / 'victims' / 'clean' / '3d_fullres' / 'seed_0' / 'scores.json')
                      .read_text()) == got


def test_reuse_victim_matches_protected_and_purified_rows_by_their_data(tmp_path):
    earlier = tmp_path / 'earlier'  # two protected copies: rows protected1, protected2 (+ defence)
    (earlier).mkdir()
    (earlier / 'state.json').write_text(json.dumps({'clean': '/data/clean', 'protected': ['/data/p1', '/data/p2']}))
    scores = {'trainer': 'T', 'plans': 'P', 'cases': [{'case': 'a'}]}
    for row, dice in (('protected1', 0.1), ('protected2', 0.2), ('protected2+zmedian', 0.3)):
        vdir = earlier / 'victims' / row / '2d' / 'seed_0'
        vdir.mkdir(parents=True)
        (vdir / 'scores.json').write_text(json.dumps({**scores, 'row': row, 'summary': {'dice': dice}}))
    ws = Workspace(str(tmp_path / 'now'), '/data/clean', ['/data/p2'])  # one protected copy: row 'protected'
    reuse = lambda row: reuse_victim(ws, row, '2d', 0, 'T', 'P', ['a'], [str(earlier)])
    assert reuse('protected')['summary'] == {'dice': 0.2}
    assert reuse('protected+zmedian')['summary'] == {'dice': 0.3}
    assert reuse('protected')['row'] == 'protected'  # named as in this folder, pointing at the original
    assert reuse('protected')['reused_from'] == str(earlier / 'victims' / 'protected2' / '2d' / 'seed_0' / 'scores.json')
    assert reuse('protected+blur') is None


def test_row_source_names_the_training_data_of_a_row():
    state = {'clean': '/c', 'protected': ['/p1', '/p2']}
    assert row_source(state, 'clean') == ('/c', None)
    assert row_source(state, 'clean+blur-s2') == ('/c', 'blur-s2')
    assert row_source(state, 'protected2+zmedian') == ('/p2', 'zmedian')
    assert row_source(state, 'protected') is None  # ambiguous with two protected copies
    assert row_source(state, 'protected3') is None and row_source(state, 'figure') is None
    assert row_source({'clean': '/c', 'protected': ['/p']}, 'protected') == ('/p', None)

@pytest.mark.slow
def test_evaluate_runs_its_victims_as_jobs(phantom_pair, tmp_path, test_trainers_env, capsys):
    """voxshield_evaluate on the audit's engine (phantom, tiny victims, 2 local workers): every step is a job with a
    record; a failing victim is reported with its log while the others finish; rerun resumes without repeating."""
    clean, protected = phantom_pair
    kwargs = dict(plans='nnUNetPlans_cpu', disable_tta=True, workers=2, threads=1)
    # one victim fails (the trainer refuses the protected row): named with its log, the clean victim still finishes
    out = tmp_path / 'FAIL'
    with pytest.raises(EvaluationError, match=r'1 of 5 jobs did not finish: victim_protected_3d_fullres_s0 failed'):
        evaluate('101', '102', str(out), trainer='nnUNetTrainer_tinyFailsOnProtected', **kwargs)
    failed = json.loads((out / 'jobs' / 'victim_protected_3d_fullres_s0' / 'failed.json').read_text())
    assert 'refuses protected data' in ''.join(failed['log_tail'])
    assert (out / 'victims' / 'clean' / '3d_fullres' / 'seed_0' / 'scores.json').is_file()
    assert not (out / 'victims' / 'protected' / '3d_fullres' / 'seed_0' / 'scores.json').exists()
    assert not (out / 'report.json').exists()

    out = tmp_path / 'OUT'
    report = evaluate('101', '102', str(out), trainer='nnUNetTrainer_tiny', seeds=(0, 1), **kwargs)
    names = sorted(p.name for p in (out / 'jobs').iterdir())
    assert names == ['prepare_clean_3d_fullres', 'prepare_protected_3d_fullres', 'quality_protected',
                     'victim_clean_3d_fullres_s0', 'victim_clean_3d_fullres_s1', 'victim_protected_3d_fullres_s0',
                     'victim_protected_3d_fullres_s1']
    for row in ('clean', 'protected'):
        per_seed = report['rows'][['clean', 'protected'].index(row)]['per_seed']['3d_fullres']
        for s in (0, 1):
            done = json.loads((out / 'jobs' / f'victim_{row}_3d_fullres_s{s}' / 'done.json').read_text())
            scores = json.loads((out / 'victims' / row / '3d_fullres' / f'seed_{s}' / 'scores.json').read_text())
            assert done['result'] == scores['summary'] == per_seed[str(s)] and len(scores['cases']) == 2
            assert 0.0 <= scores['summary']['dice'] <= 1.0 and scores['trainer'] == 'nnUNetTrainer_tiny'
    assert 10 < report['rows'][1]['quality']['psnr']['mean'] < 80
    # rerun: nothing runs again, every victim is 'done before'
    stamps = {p: p.stat().st_mtime_ns for p in (out / 'jobs').glob('*/done.json')}
    capsys.readouterr()
    again = evaluate('101', '102', str(out), trainer='nnUNetTrainer_tiny', seeds=(0, 1), **kwargs)
    captured = capsys.readouterr()
    assert captured.out.count('done before, skipped') == 4
    assert {p: p.stat().st_mtime_ns for p in (out / 'jobs').glob('*/done.json')} == stamps
    assert [r['victims'] for r in again['rows']] == [r['victims'] for r in report['rows']]
    # a bad backend or worker count is one line, before anything is written
    for extra, message in ((['--backend', 'pbs'], "--backend 'pbs': unknown backend"),
                           (['-w', '0'], 'must be at least 1')):
        res = subprocess.run([sys.executable, '-m', 'nnunetv2_voxshield.evaluate', '--clean', '101', '--protected',
                              '102', '-o', str(tmp_path / 'o4')] + extra, capture_output=True, text=True)
        assert res.returncode != 0 and res.stderr.startswith('voxshield_evaluate: error:') and message in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / 'o4').exists()


def test_threads_per_job_default_to_the_lane_setting(monkeypatch):
    from nnunetv2_voxshield.audit_inputs import default_threads
    monkeypatch.setenv('VOXSHIELD_TORCH_THREADS', '1')
    assert default_threads(1) == 1 and default_threads(4) == 1
    monkeypatch.delenv('VOXSHIELD_TORCH_THREADS')
    monkeypatch.setattr(os, 'cpu_count', lambda: 8)
    assert default_threads(1) == 8 and default_threads(2) == 4 and default_threads(16) == 1
