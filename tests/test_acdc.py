"""ACDC (issue 29): the committed patient-level split, and the export-time methods on real ACDC cases (three classes,
float32 in [0, 1], 1.5625 x 1.5625 x 10 mm) through voxshield_export and voxshield_verify."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ACDC, REPO, private_nnunet_roots, requires_acdc, run_cli
from nnunetv2_voxshield import export
from nnunetv2_voxshield.budget import raw_budget
from nnunetv2_voxshield.controls import checkerboard, class_level
from nnunetv2_voxshield.conv_code import ConvSource
from nnunetv2_voxshield.verify import verify_entry

SPLIT = REPO / 'benchmarks' / 'acdc_split.json'
CASES = ('patient001_frame01', 'patient001_frame02')  # both frames of one training patient: labels 1, 2, 3


def patient(case: str) -> str:
    return case.split('_frame')[0]


def test_split_keeps_both_frames_of_a_patient_on_one_side():
    """Train and test share no patient, every case sits with its patient, both frames of each patient are listed."""
    split = json.loads(SPLIT.read_text())
    train, test = set(split['train_patients']), set(split['test_patients'])
    assert not train & test and (len(train), len(test)) == (64, 16)
    assert {patient(c) for c in split['train']} == train and {patient(c) for c in split['test']} == test
    assert not set(split['train']) & set(split['test'])
    for side in ('train', 'test'):
        frames = {}
        for case in split[side]:
            frames.setdefault(patient(case), []).append(case)
        assert all(len(v) == 2 for v in frames.values()), side


@requires_acdc
def test_split_covers_the_dataset():
    """Every ACDC case is in exactly one side of the split."""
    cases = sorted(p.name[:-len('.nii.gz')] for p in (ACDC / 'labelsTr').glob('*.nii.gz'))
    split = json.loads(SPLIT.read_text())
    assert len(cases) == 160 and sorted(split['train'] + split['test']) == cases


def test_levels_differ_per_class():
    """--sign levels: +1, -1, +1/2, -1/2; three classes get three levels (alternate gives labels 1 and 3 +1)."""
    assert [class_level(k) for k in (1, 2, 3, 4)] == [1.0, -1.0, 0.5, -0.5]


@pytest.fixture(scope='module')
def planned_acdc(tmp_path_factory):
    """Two real ACDC cases in a private nnUNet_raw, fingerprinted and planned (no preprocessing: export-time methods
    read only the plans)."""
    if not (ACDC / 'dataset.json').is_file():
        pytest.fail(f'ACDC not found at {ACDC}; mark the test with requires_acdc')
    with private_nnunet_roots(tmp_path_factory.mktemp('acdc')) as (roots, _):
        folder = roots['nnUNet_raw'] / 'Dataset027_ACDC'
        for sub in ('imagesTr', 'labelsTr'):
            (folder / sub).mkdir(parents=True)
        for case in CASES:
            shutil.copy(ACDC / 'imagesTr' / f'{case}_0000.nii.gz', folder / 'imagesTr')
            shutil.copy(ACDC / 'labelsTr' / f'{case}.nii.gz', folder / 'labelsTr')
        dataset = json.loads((ACDC / 'dataset.json').read_text())
        (folder / 'dataset.json').write_text(json.dumps(dict(dataset, numTraining=len(CASES)), indent=1))
        env = {**{k: str(v) for k, v in roots.items()}, 'nnUNet_n_proc_DA': None}
        run_cli(['nnUNetv2_extract_fingerprint', '-d', '27', '-np', '1'], env)
        run_cli(['nnUNetv2_plan_experiment', '-d', '27'], env)
        yield {**roots, 'source': folder}


def exported(env: dict, out_id: int, args: list, verify_args: list):
    """voxshield_export -d 27 ``args`` into a fresh copy, voxshield_verify it; yields (label, clean, protected) per
    case as float64, and the copy's folder, then removes it."""
    out = env['nnUNet_raw'] / f'Dataset{out_id}_ACDCProtected'
    try:
        export.export_entry(['-d', '27', '-o', str(out_id), *args, '-device', 'cpu'])
        verify_entry([str(env['source']), str(out), *verify_args])
        arrays = []
        for case in CASES:
            read = lambda p: sitk.ReadImage(str(p))  # noqa: E731
            clean = read(env['source'] / 'imagesTr' / f'{case}_0000.nii.gz')
            prot = read(out / 'imagesTr' / f'{case}_0000.nii.gz')
            assert prot.GetPixelIDTypeAsString() == clean.GetPixelIDTypeAsString() == '32-bit float'
            assert prot.GetSpacing() == clean.GetSpacing() == (1.5625, 1.5625, 10.0)
            arrays.append((sitk.GetArrayFromImage(read(env['source'] / 'labelsTr' / f'{case}.nii.gz')),
                           sitk.GetArrayFromImage(clean).astype(np.float64),
                           sitk.GetArrayFromImage(prot).astype(np.float64)))
        return arrays, json.loads((out / 'dataset.json').read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)


@requires_acdc
@pytest.mark.parametrize('method,sign', [('offset', 'alternate'), ('offset', 'levels'),
                                         ('checkerboard', 'alternate')])
def test_label_codes_on_acdc(planned_acdc, monkeypatch, method, sign):
    """offset / checkerboard at 32/255 on two real ACDC cases: verify passes at that eps; each of the three classes
    moves by its code (offset: median delta s_k b; levels: +b, -b, +b/2), the background never."""
    for k, v in planned_acdc.items():
        if k.startswith('nnUNet'):
            monkeypatch.setenv(k, str(v))
    arrays, dataset = exported(planned_acdc, 871, ['--method', method, '--sign', sign, '--eps', '32/255'],
                               ['--eps', '32/255'])
    assert dataset['voxshield']['method'] == method
    for label, clean, prot in arrays:
        delta, b = prot - clean, raw_budget(clean[None], 32 / 255)[0]
        assert set(np.unique(label)) == {0, 1, 2, 3} and np.all(delta[label == 0] == 0)
        assert np.abs(delta).max() <= b and b > 0
        for k in (1, 2, 3):
            level = {'alternate': 1.0 if k % 2 else -1.0, 'levels': class_level(k)}[sign]
            if method == 'offset':
                assert np.median(delta[label == k]) == pytest.approx(level * b, rel=1e-3), (k, sign)
            else:  # s_k b (-1)^(i + j + k) up to the image's own range
                assert np.median(np.abs(delta[label == k])) == pytest.approx(b, rel=1e-3)
                expected = level * checkerboard(label.shape)[label == k]
                assert np.mean(np.sign(delta[label == k]) == expected) > 0.95


@requires_acdc
def test_conv_on_acdc(planned_acdc, monkeypatch):
    """conv at s = 0.7 on two real ACDC cases: verify --strength passes; float32 and the spacing kept, the background
    untouched, each of the three labels moved by its own kernel's convolution (in voxels across 10 mm slices); no
    eps recorded."""
    for k, v in planned_acdc.items():
        if k.startswith('nnUNet'):
            monkeypatch.setenv(k, str(v))
    arrays, dataset = exported(planned_acdc, 872, ['--method', 'conv', '--strength', '0.7', '--seed', '2'],
                               ['--strength', '0.7'])
    assert (dataset['voxshield']['method'], dataset['voxshield']['eps'], dataset['voxshield']['strength']) == \
        ('conv', None, 0.7)
    for label, clean, prot in arrays:
        expected = ConvSource(0.7, seed=2).compute_delta_raw(clean[None], label)[0]
        delta = prot - clean
        assert np.all(delta[label == 0] == 0) and np.abs(delta - expected).max() < 1e-6
        for k in (1, 2, 3):
            assert np.count_nonzero(delta[label == k]) > 0.9 * np.count_nonzero(label == k)


@requires_acdc
def test_em_samplewise_on_acdc(planned_acdc, tmp_path, monkeypatch):
    """Sample-wise EM on two real ACDC cases (thick slices, three classes): stock nnUNetv2_train of the tiny trainer,
    export, verify; each class carries a delta within budget (a fresh preprocessed / results folder: the module's
    plans stay as the export-time tests read them)."""
    from test_em_samplewise import em_train_export_verify
    roots = {'nnUNet_raw': planned_acdc['nnUNet_raw'], 'nnUNet_preprocessed': tmp_path / 'pre',
             'nnUNet_results': tmp_path / 'results'}
    shutil.copytree(planned_acdc['nnUNet_preprocessed'], roots['nnUNet_preprocessed'])
    for k, v in roots.items():
        monkeypatch.setenv(k, str(v))
    em_train_export_verify(roots, 27, planned_acdc['source'], 873)

