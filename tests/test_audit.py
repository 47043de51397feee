"""voxshield_audit: verdicts and bootstrap intervals on synthetic scores, the panel, bad input refused before any
job starts, and the DAG end to end on the phantom through the local backend with 2 workers."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import perturbed_copy
from nnunetv2_voxshield.audit import audit_entry, check_no_overlap, patient_of, AuditError, parse_slurm
from nnunetv2_voxshield.panel import PanelError, build_panel, parse_exploiter
from nnunetv2_voxshield.verdict import bootstrap_ratio, classify, rule_ratio, seed_ratio, verdict_line


# ----------------------------------------------------------------------------------------- verdict (pure)
def test_classify_needs_two_agreeing_seeds_to_protect():
    assert classify([0.03, 0.05]) == 'protects'
    assert classify([0.03]) == 'unconfirmed'
    assert classify([0.03, 1.0]) == 'split'
    assert classify([0.95, 1.02]) == 'keeps'
    assert classify([0.6, 0.95]) == 'partial'
    assert classify([0.2, 0.25], protects=0.1) == 'partial'  # thresholds are options


def test_verdict_lines():
    e = lambda name, *r: {'name': name, 'per_seed': list(r), 'status': classify(list(r))}  # noqa: E731
    keep = [e(f'x{i}', 0.97, 1.01) for i in range(7)]
    assert verdict_line(keep) == 'Does not protect: 7 of 7 exploiters keep >= 0.9 of clean Dice'
    panel = [e(n, 0.02, 0.04) for n in ('stock', 'noda', 'labelaware', 'zmedian', 'resencM')] + \
        [e('blur', 0.95, 0.99), e('2d', 0.7, 0.8)]
    assert verdict_line(panel) == 'Protects against 5 of 7 exploiters (<= 0.3 of clean); not against: blur, 2d'
    one = verdict_line([e('stock', 0.03), e('2d', 0.98, 0.99)])
    assert one == 'Does not protect: 1 of 2 exploiters keep >= 0.9 of clean Dice; unconfirmed: 1 seed (stock 0.03)'
    split = verdict_line([e('noda', 0.03, 1.0), e('stock', 0.01, 0.02)])
    assert split == 'Protects against 1 of 2 exploiters (<= 0.3 of clean); split: noda seeds 0.03 / 1.00'
    assert verdict_line([e('a', 0.5, 0.5)], keeps=0.9).endswith('partial: a 0.50 / 0.50')
    assert verdict_line([e('a', 0.5, 0.5)]).startswith('Does not protect: 0 of 1 exploiters keep')


def test_bootstrap_interval_over_cases_and_seeds():
    rng = np.random.default_rng(1)
    cases = [f'c{i}' for i in range(12)]
    clean = {s: {c: float(rng.uniform(0.7, 0.9)) for c in cases} for s in (0, 1)}
    half = {s: {c: 0.5 * v for c, v in clean[s].items()} for s in clean}
    b = bootstrap_ratio(half, clean, n_boot=500)
    assert b['ratio'] == pytest.approx(0.5) and b['ci'] == pytest.approx([0.5, 0.5])  # paired: no spread
    assert b['per_seed'] == pytest.approx([0.5, 0.5]) and b['seeds'] == [0, 1] and b['n_cases'] == 12
    noisy = {s: {c: float(rng.uniform(0.0, 0.9)) for c in cases} for s in (0, 1)}
    b = bootstrap_ratio(noisy, clean, n_boot=1000)
    point = np.mean([list(noisy[s].values()) for s in (0, 1)]) / np.mean([list(clean[s].values()) for s in (0, 1)])
    assert b['ratio'] == pytest.approx(point)
    assert b['ci'][0] < point < b['ci'][1] and b['ci'][1] - b['ci'][0] > 0.05
    assert bootstrap_ratio(noisy, clean, n_boot=1000)['ci'] == b['ci']  # seeded
    # only common seeds and cases count; none in common: None
    assert bootstrap_ratio({0: noisy[0]}, clean, n_boot=0)['seeds'] == [0]
    assert bootstrap_ratio({5: noisy[0]}, clean) is None
    assert bootstrap_ratio({0: noisy[0]}, clean, n_boot=0)['ci'] is None


def test_seed_ratio_pairs_seeds():
    victim = {'0': {'dice': 0.1, 'dice_per_label': {'1': 0.1}}, '1': {'dice': 0.4, 'dice_per_label': {'1': 0.2}},
              '2': {'dice': 0.9, 'dice_per_label': {'1': 0.9}}}
    clean = {'0': {'dice': 0.8, 'dice_per_label': {'1': 0.8}}, '1': {'dice': 0.8, 'dice_per_label': {'1': 0.8}}}
    r = seed_ratio(victim, clean)
    assert r['seeds'] == [0, 1] and r['dice'] == pytest.approx(0.25) and r['clean_dice'] == pytest.approx(0.8)
    assert r['ratio'] == pytest.approx(0.25 / 0.8) and r['ratio_per_seed'] == [0.125, 0.5]
    assert r['dice_per_label'] == {'1': pytest.approx(0.15)}
    assert seed_ratio({'3': victim['0']}, clean) is None


def test_amplitude_rule_is_the_fitted_logistic():
    assert rule_ratio(22.0, 22.0, 2.8) == pytest.approx(0.5)
    assert rule_ratio(14.0, 22.3, 2.82) < 0.06 < 0.99 < rule_ratio(45.0, 22.3, 2.82)


# ----------------------------------------------------------------------------------------- panel and options
def test_panel_presets_profiles_and_files(tmp_path):
    quick = build_panel('quick')
    assert [p.name for p in quick.profiles] == ['stock', 'noda'] and quick.seeds == [0]
    full = build_panel('full', epochs=5, plans='nnUNetPlans_cpu')
    assert [p.name for p in full.profiles] == ['stock', '2d', 'resencM', 'noda', 'labelaware', 'blur', 'zmedian',
                                               'zresample', 'quantise']
    assert len(full.seeds) == 3
    by = {p.name: p for p in full.profiles}
    assert full.trainer(by['noda']) == 'nnUNetTrainerNoDA_5epochs' and full.trainer(by['stock']) == \
        'nnUNetTrainer_5epochs'
    assert full.plans_of(by['resencM']) == 'nnUNetResEncUNetMPlans_cpu' and full.plans_of(by['2d']) == \
        'nnUNetPlans_cpu'
    assert by['2d'].configuration == '2d' and by['blur'].defence == 'blur'
    assert build_panel('quick', epochs=1).trainer(quick.profiles[0]) == 'nnUNetTrainer_1epoch'
    user = parse_exploiter('mine=MyTrainer:2d:nnUNetPlans_cpu')
    assert (user.name, user.trainer, user.configuration, user.plans, user.scheduled) == \
        ('mine', 'MyTrainer', '2d', 'nnUNetPlans_cpu', False)
    p = build_panel(None, exploiters=['a=T1', 'b=T2:2d'], seeds=[3, 3, 4], epochs=5)
    assert [x.trainer for x in p.profiles] == ['T1', 'T2'] and p.seeds == [3, 4]
    assert p.trainer(p.profiles[0]) == 'T1'  # a named class trains as named
    panel_json = tmp_path / 'panel.json'
    panel_json.write_text(json.dumps({'profiles': ['stock', {'name': 'z', 'trainer': 'T', 'defence': 'zmedian'}],
                                      'seeds': [0, 1], 'plans': 'nnUNetPlans_cpu'}))
    p = build_panel(None, str(panel_json))
    assert [x.name for x in p.profiles] == ['stock', 'z'] and p.seeds == [0, 1] and p.plans == 'nnUNetPlans_cpu'
    panel_yaml = tmp_path / 'panel.yaml'
    panel_yaml.write_text('profiles:\n  - noda\n  - {name: two, trainer: T, configuration: 2d}\nepochs: 10\n')
    p = build_panel(None, str(panel_yaml))
    assert [x.name for x in p.profiles] == ['noda', 'two'] and p.epochs == 10 and p.profiles[1].configuration == '2d'
    for kwargs, message in ((dict(panel='huge'), "unknown panel"), (dict(panel=None), 'empty panel'),
                            (dict(exploiters=['bad']), 'NAME=TrainerClass'),
                            (dict(exploiters=['stock=T']), 'used twice'),
                            (dict(panel=None, panel_file=str(tmp_path / 'none.json')), 'cannot read'),
                            (dict(exploiters=['x=T'], epochs=0), 'at least 1')):
        with pytest.raises(PanelError, match=message):
            build_panel(**{'panel': 'quick', **kwargs})


def test_overlap_patient_grouping_and_slurm_options():
    regex = r'(patient\d+)_frame\d+'
    assert patient_of('patient007_frame01', regex) == 'patient007' and patient_of('abc', regex) == 'abc'
    check_no_overlap(['patient001_frame01', 'patient001_frame12'], ['patient002_frame01'], regex, 'split.json')
    with pytest.raises(AuditError, match='patient001 have cases on both sides'):
        check_no_overlap(['patient001_frame01'], ['patient001_frame12'], regex, 'split.json')
    with pytest.raises(AuditError, match='split.json: test case'):
        check_no_overlap(['a', 'b'], ['b'], None, 'split.json')
    assert parse_slurm('gpu', '1-02:00:00', 1, '32G', ['account=abc']) == {
        'slurm_partition': 'gpu', 'timeout_min': 1560, 'gpus_per_node': 1, 'mem_gb': 32,
        'slurm_additional_parameters': {'account': 'abc'}}
    for bad in (dict(time='soon'), dict(mem='lots'), dict(sbatch_extra=['account'])):
        with pytest.raises(AuditError):
            parse_slurm(**bad)


def test_evaluate_resolves_dataset_ids_through_nnunets_lookup(tmp_path, monkeypatch):
    """An id is looked up as nnU-Net does (dataset_io.find_dataset_folder): two folders with one id are refused."""
    from nnunetv2_voxshield.evaluate import EvaluationError, resolve_raw_dataset
    for name in ('Dataset007_A', 'Dataset007_B', 'Dataset008_C'):
        for sub in ('imagesTr', 'labelsTr'):
            (tmp_path / name / sub).mkdir(parents=True)
        (tmp_path / name / 'dataset.json').write_text('{}')
    monkeypatch.setenv('nnUNet_raw', str(tmp_path))
    assert resolve_raw_dataset('8') == str(tmp_path / 'Dataset008_C')
    assert resolve_raw_dataset('Dataset007_B') == str(tmp_path / 'Dataset007_B')
    with pytest.raises(EvaluationError, match='several datasets share id 7: Dataset007_A, Dataset007_B'):
        resolve_raw_dataset('7')
    with pytest.raises(EvaluationError, match='no dataset with id 9'):
        resolve_raw_dataset('9')


# ----------------------------------------------------------------------------------------- inputs on the phantom
def _refused(argv, capsys, message):
    with pytest.raises(SystemExit) as e:
        audit_entry(argv)
    err = str(e.value.code)
    assert err.startswith('voxshield_audit: error:') and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_input_refused_before_any_job(phantom_pair, tmp_path, test_trainers_env, capsys):
    clean, protected = phantom_pair
    out = tmp_path / 'OUT'
    tiny = ['--exploiter', 'tiny=nnUNetTrainer_tiny']
    base = ['--clean', str(clean), '--protected', str(protected), '-o', str(out)] + tiny
    cases = sorted(p.name[:-len('.nii.gz')] for p in (clean / 'labelsTr').glob('*.nii.gz'))
    # protected copies that do not match the clean data: a label, a case, a shape, a spacing
    bad_label = shutil.copytree(protected, tmp_path / 'bad_label')
    f = bad_label / 'labelsTr' / f'{cases[1]}.nii.gz'
    lab = sitk.ReadImage(str(f))
    a = sitk.GetArrayFromImage(lab)
    a[a == 2] = 1
    o = sitk.GetImageFromArray(a)
    o.CopyInformation(lab)
    sitk.WriteImage(o, str(f), True)
    missing = shutil.copytree(protected, tmp_path / 'missing')
    (missing / 'imagesTr' / f'{cases[2]}_0000.nii.gz').unlink()
    (missing / 'labelsTr' / f'{cases[2]}.nii.gz').unlink()
    ds = json.loads((missing / 'dataset.json').read_text())
    (missing / 'dataset.json').write_text(json.dumps({**ds, 'numTraining': len(cases) - 1}))
    shape = shutil.copytree(protected, tmp_path / 'shape')
    img = sitk.ReadImage(str(shape / 'imagesTr' / f'{cases[0]}_0000.nii.gz'))
    sitk.WriteImage(img[:, :, 1:], str(shape / 'imagesTr' / f'{cases[0]}_0000.nii.gz'), True)
    spacing = shutil.copytree(protected, tmp_path / 'spacing')
    img = sitk.ReadImage(str(spacing / 'imagesTr' / f'{cases[3]}_0000.nii.gz'))
    img.SetSpacing([s * 2 for s in img.GetSpacing()])
    sitk.WriteImage(img, str(spacing / 'imagesTr' / f'{cases[3]}_0000.nii.gz'), True)
    labels = shutil.copytree(protected, tmp_path / 'labels')
    ds = json.loads((labels / 'dataset.json').read_text())
    (labels / 'dataset.json').write_text(json.dumps({**ds, 'labels': {'background': 0, 'tube': 1}}))
    for copy, message in ((bad_label, f'{cases[1]}.nii.gz: label differs'),
                          (missing, f'training case(s) {cases[2]} of the clean dataset are missing'),
                          (shape, 'shape'), (spacing, 'spacing'), (labels, 'dataset.json: labels')):
        _refused(['--clean', str(clean), '--protected', str(copy), '-o', str(out)] + tiny, capsys, message)
    # test sets overlapping the training cases: same case, same patient
    split = tmp_path / 'split.json'
    split.write_text(json.dumps({'train': cases[:4], 'test': cases[3:]}))
    _refused(base + ['--split', str(split)], capsys, f'test case(s) {cases[3]} are also training cases')
    split.write_text(json.dumps({'train': cases[:3], 'test': cases[3:]}))
    _refused(base + ['--split', str(split), '--group-regex', r'(phantom)_\d+'], capsys,
             'patient(s) phantom have cases on both sides')
    split.write_text(json.dumps({'train': cases[:3], 'test': ['nope']}))
    _refused(base + ['--split', str(split)], capsys, 'nope are not training cases')
    test_images = tmp_path / 'ti'
    shutil.copytree(clean / 'imagesTs', test_images)
    shutil.copy(clean / 'imagesTr' / f'{cases[0]}_0000.nii.gz', test_images)
    test_labels = shutil.copytree(clean / 'labelsTs', tmp_path / 'tl')
    shutil.copy(clean / 'labelsTr' / f'{cases[0]}.nii.gz', test_labels)
    _refused(base + ['--test-images', str(test_images), '--test-labels', str(test_labels)], capsys,
             f'test case(s) {cases[0]} are also training cases')
    # unknown trainer, panel, backend; two datasets with one id
    _refused(base[:-2] + ['--exploiter', 'x=nnUNetTrainerDoesNotExist'], capsys,
             'exploiter x: trainer class nnUNetTrainerDoesNotExist not found')
    _refused(base[:-2] + ['--panel', 'quick', '--epochs', '7'], capsys, 'trainer class nnUNetTrainer_7epochs not found')
    _refused(base + ['--panel', 'huge'], capsys, "--panel 'huge': unknown panel")
    _refused(base + ['--backend', 'pbs'], capsys, "--backend 'pbs': unknown backend")
    shutil.copytree(protected, clean.parent / 'Dataset102_Again')
    _refused(['--clean', '101', '--protected', '102', '-o', str(out)], capsys, 'several datasets share id 102')
    assert not out.exists()  # nothing started, nothing written


@pytest.mark.slow
def test_audit_dag_end_to_end_on_the_phantom(phantom_pair, tmp_path, test_trainers_env, capsys):
    """One exploiter, one seed: 9 jobs (2 plan, 2 train, 2 predict, 2 score, 1 quality) on 2 local workers."""
    clean, protected = phantom_pair
    out = tmp_path / 'OUT'
    argv = ['--clean', str(clean), '--protected', str(protected), '-o', str(out), '-p', 'nnUNetPlans_cpu',
            '--exploiter', 'tiny=nnUNetTrainer_tiny', '-w', '2', '--disable-tta', '--boot', '200', '--no-detector']
    audit_entry(argv)
    report = json.loads((out / 'report.json').read_text())
    copy = report['copies'][0]
    e = copy['exploiters'][0]
    assert e['name'] == 'tiny' and e['trainer'] == 'nnUNetTrainer_tiny' and e['seeds'] == [0]
    per = {}
    for row in ('protected', 'clean'):
        for s in (0,):
            r = json.loads((out / 'jobs' / f'score_{row}_nnUNetTrainer_tiny_nnUNetPlans_cpu_3d_fullres_s{s}' /
                            'done.json').read_text())['result']
            assert len(r['cases']) == 2  # every test case scored
            per[(row, s)] = np.mean([c['dice'] for c in r['cases'].values()])
    assert e['ratio']['ratio'] == pytest.approx(per[('protected', 0)] / per[('clean', 0)])
    assert e['per_seed'] == pytest.approx([e['ratio']['ratio']])
    assert e['ratio']['ci'][0] <= e['ratio']['ratio'] + 1e-9 and e['ratio']['ci'][1] >= e['ratio']['ratio'] - 1e-9
    assert set(e['per_label']) == {'1', '2'} and e['status'] == classify(e['per_seed']) != 'protects'  # 1 seed
    assert copy['detector'] is None and not (out / 'jobs' / 'detector').exists()
    q = copy['quality']
    assert 10 < q['psnr'] < 80 and q['psnr_roi'] < q['psnr'] and q['max_budget_use'] > 0
    assert copy['rule']['predicted'] == pytest.approx(rule_ratio(q['psnr_roi'], copy['rule']['x50'],
                                                                 copy['rule']['s']))
    md = (out / 'report.md').read_text()
    assert md.splitlines()[0] == f'**{report["verdict"][0]}**' and report['verdict'][0] == copy['verdict']
    assert f'{e["ratio"]["ratio"]:.2f} [{e["ratio"]["ci"][0]:.2f}, {e["ratio"]["ci"][1]:.2f}]' in md
    import matplotlib.image
    for png in ('bars.png', 'frontier.png'):
        assert matplotlib.image.imread(str(out / png)).shape[0] > 200
    assert report['failed'] == []
    # rerun: every job is reused from its record, the report is the same
    capsys.readouterr()
    audit_entry(argv)
    err = capsys.readouterr().err
    n_jobs = len(list((out / 'jobs').iterdir()))
    assert f'{n_jobs} jobs ({n_jobs} done earlier)' in err
    assert json.loads((out / 'report.json').read_text())['copies'] == report['copies']
    # a second copy in the same OUT (the first keeps its name): the clean victim is reused, only the new copy's 5 jobs
    # run; a copy renamed or replacing a pinned one is refused
    second = perturbed_copy(clean, tmp_path / 'Dataset103_Second', amplitude=60.0, seed=1)
    _refused(argv[:3] + [str(protected), str(second), '--name', 'first', 'second'] + argv[4:], capsys,
             "was audited as 'protected' in this OUT")
    audit_entry(argv[:3] + [str(protected), str(second), '--name', 'protected', 'second'] + argv[4:])
    assert f'{n_jobs + 5} jobs ({n_jobs} done earlier)' in capsys.readouterr().err
    names = sorted(p.name for p in (out / 'jobs').iterdir())
    assert len(names) == n_jobs + 5 and sum('second' in n for n in names) == 5
    grown = json.loads((out / 'report.json').read_text())
    assert [c['name'] for c in grown['copies']] == ['protected', 'second']
    assert grown['copies'][0]['exploiters'][0]['per_seed'] == e['per_seed']
    pinned = json.loads((out / 'audit.json').read_text())
    assert pinned['protected'] == [str(protected), str(second)] and pinned['names'] == ['protected', 'second']
    other = perturbed_copy(clean, tmp_path / 'Dataset104_Other', amplitude=20.0, seed=2)
    _refused(argv[:3] + [str(other)] + argv[4:], capsys, 'OUT was made for another protected')


def test_report_from_job_records_holds_the_numbers(tmp_path):
    """build_report / write_report on synthetic job records: ratios, the purification's cost, the rule, the
    detector, a failed victim named in the verdict line and in the report; report.json, report.md and PNGs."""
    from nnunetv2_voxshield.jobs import JobRecord
    from nnunetv2_voxshield.panel import Panel, Profile
    from nnunetv2_voxshield.verdict import build_report, write_report
    panel = Panel('t', [Profile('stock', 'nnUNetTrainer'), Profile('blur', 'nnUNetTrainer', defence='blur'),
                        Profile('2d', 'nnUNetTrainer', '2d')], [0, 1], 5, 'nnUNetPlans_cpu')
    trainers = {p.name: panel.trainer(p) for p in panel.profiles}
    cases = ['a', 'b', 'c']
    dice = {('clean', 'stock'): 0.8, ('protected', 'stock'): 0.04, ('clean+blur', 'blur'): 0.6,
            ('protected+blur', 'blur'): 0.72, ('clean', 'blur'): 0.8, ('clean', '2d'): 0.7}
    victims, records = {}, {}
    for (row, prof), d in list(dice.items()) + [(('protected', '2d'), None)]:
        for s in (0, 1):
            name = f'score_{row}_{prof}_{s}'
            victims[(row, prof, s)] = name
            records[name] = JobRecord(name, 'failed', error='boom', log='/x/log.txt') if d is None else JobRecord(
                name, 'done', {'cases': {c: {'dice': d, 'labels': {'1': d, '2': d / 2}} for c in cases}})
    records['quality_protected'] = JobRecord('quality_protected', 'done', {'psnr': 40.0, 'psnr_roi': 20.0,
                                                                          'max_budget_use': 0.9, 'violations': 0})
    records['detector'] = JobRecord('detector', 'done', {'/p': {'mean_dice': 0.7}, '/c': {'mean_dice': 0.01}})
    settings = {'protects': 0.3, 'keeps': 0.9, 'protected': ['/p'], 'rule': {'x50': 22.0, 's': 3.0},
                'panel': panel.to_json(), 'n_test_cases': 3}
    report = build_report(str(tmp_path), records, panel, trainers, {'clean': '/c', 'protected': '/p'}, ['protected'],
                          victims, settings, 100)
    copy = report['copies'][0]
    by = {e['name']: e for e in copy['exploiters']}
    assert by['stock']['ratio']['ratio'] == pytest.approx(0.05) and by['stock']['status'] == 'protects'
    assert by['stock']['per_label']['2']['ratio'] == pytest.approx(0.05) and by['stock']['trainer'] == \
        'nnUNetTrainer_5epochs'
    assert by['blur']['ratio']['ratio'] == pytest.approx(0.9) and by['blur']['cost']['ratio'] == pytest.approx(0.75)
    assert by['2d']['failed'] == 'score_protected_2d_0, score_protected_2d_1'
    assert report['verdict'] == ['Protects against 1 of 2 exploiters (<= 0.3 of clean); not against: blur; '
                                 'failed: 2d']
    assert copy['rule']['predicted'] == pytest.approx(rule_ratio(20.0, 22.0, 3.0)) and \
        copy['rule']['measured'] == pytest.approx(0.05)
    assert copy['detector'] == {'mean_dice': 0.7, 'clean_mean_dice': 0.01}
    assert {f['name'] for f in report['failed']} == {'score_protected_2d_0', 'score_protected_2d_1'}
    files = write_report(str(tmp_path), report)
    assert json.loads((tmp_path / 'report.json').read_text())['copies'][0]['exploiters'][1]['cost']['ratio'] == \
        pytest.approx(0.75)
    md = (tmp_path / 'report.md').read_text()
    assert md.startswith(f'**{report["verdict"][0]}**')
    assert '| blur | nnUNetTrainer_5epochs | 3d_fullres | 0.720 | 0.800 | 0.90 [0.90, 0.90] | 0.90 / 0.90 | ' \
           'partial | 0.75 [0.75, 0.75] |' in md
    assert 'predicted 0.34 at ROI PSNR 20.0 dB, measured 0.05' in md and 'score_protected_2d_0: boom' in md
    import matplotlib.image
    assert [Path(f).name for f in files] == ['report.json', 'report.md', 'bars.png', 'frontier.png']
    assert all(matplotlib.image.imread(f)[..., :3].std() > 0.02 for f in files[2:])


def test_linked_copy_keeps_its_protection_manifest(tmp_path):
    """A copy's training cases are linked into the audit folder with its voxshield_manifest.json (verify reads the
    copy's budget from it), the sources only read; a second link of the same row is a no-op."""
    from nnunetv2_voxshield.audit import link_cases, row_dataset_id
    src = tmp_path / 'copy'
    for sub in ('imagesTr', 'labelsTr'):
        (src / sub).mkdir(parents=True)
    listing = {}
    for c in ('a', 'b', 'c'):
        (src / 'imagesTr' / f'{c}_0000.nii.gz').write_text('i')
        (src / 'labelsTr' / f'{c}.nii.gz').write_text('l')
        listing[c] = {'images': [str(src / 'imagesTr' / f'{c}_0000.nii.gz')],
                      'label': str(src / 'labelsTr' / f'{c}.nii.gz')}
    (src / 'voxshield_manifest.json').write_text('{"eps": 0.1}')
    out = tmp_path / 'OUT'
    dst = out / 'nnUNet_raw' / f'Dataset{row_dataset_id(str(out), "protected"):03d}_protected'
    link_cases(listing, ['a', 'c'], {'labels': {}, 'numTraining': 3}, str(dst), src_dir=str(src))
    assert dst.name == 'Dataset001_protected' and row_dataset_id(str(out), 'protected') == 1
    assert row_dataset_id(str(out), 'clean') == 2
    assert sorted(p.name for p in (dst / 'imagesTr').iterdir()) == ['a_0000.nii.gz', 'c_0000.nii.gz']
    assert os.readlink(dst / 'voxshield_manifest.json') == str(src / 'voxshield_manifest.json')
    assert json.loads((dst / 'dataset.json').read_text())['numTraining'] == 2
    link_cases(listing, ['a'], {'labels': {}}, str(dst), src_dir=str(src))  # made before: kept as it is
    assert len(list((dst / 'labelsTr').iterdir())) == 2 and not list(dst.parent.glob('*.tmp*'))
