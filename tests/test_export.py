"""voxshield_export on real Hippocampus cases (float32 and uint8 images, 2 channels, multi-class labels)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import copy_hippocampus_cases, private_nnunet_roots, requires_hippocampus, run_cli
from nnunetv2_voxshield import export
from nnunetv2_voxshield.budget import raw_budget
from nnunetv2_voxshield.verify import verify_entry

pytestmark = requires_hippocampus

SRC_ID, SRC = 811, 'Dataset811_HippoMix'
OUT_ID, OUT = 812, 'Dataset812_HippoMixProtected'
TRAINER = 'nnUNetTrainerVoxShield'
MODEL = f'{TRAINER}__nnUNetPlans__3d_fullres'


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file below ``folder`` (hidden files included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def build_source(folder: Path) -> dict:
    """5 real cases + a second int16 channel, one all-background label, one imagesTs case."""
    cases = copy_hippocampus_cases(folder, 5)
    dtypes = {c: read(folder / 'imagesTr' / f'{c}_0000.nii.gz').dtype for c in cases}
    empty = next(c for c in cases if list(dtypes.values()).count(dtypes[c]) > 1)
    for c in cases:
        img = sitk.ReadImage(str(folder / 'imagesTr' / f'{c}_0000.nii.gz'))
        second = sitk.GetImageFromArray((sitk.GetArrayFromImage(img).astype(np.float64) * 3 - 100).astype(np.int16))
        second.CopyInformation(img)
        sitk.WriteImage(second, str(folder / 'imagesTr' / f'{c}_0001.nii.gz'))
    label = sitk.ReadImage(str(folder / 'labelsTr' / f'{empty}.nii.gz'))
    zero = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(label)))
    zero.CopyInformation(label)
    sitk.WriteImage(zero, str(folder / 'labelsTr' / f'{empty}.nii.gz'))
    (folder / 'imagesTs').mkdir()
    for ch in ('0000', '0001'):
        shutil.copy(folder / 'imagesTr' / f'{cases[0]}_{ch}.nii.gz', folder / 'imagesTs' / f'test_001_{ch}.nii.gz')
    ds = json.loads((folder / 'dataset.json').read_text())
    ds['channel_names'] = {'0': 'MRI', '1': 'MRI_int16'}
    (folder / 'dataset.json').write_text(json.dumps(ds, indent=2))
    return {'cases': cases, 'empty': empty, 'dtypes': dtypes}


def write_checkpoint(results: Path, dataset: str, plans_file: Path, dataset_json: Path, trainer: str = TRAINER,
                     voxshield: bool = True, gain: float = 20.0, configuration: str = '3d_fullres') -> Path:
    """A checkpoint following the export contract: stock keys + checkpoint['voxshield'] with a random G."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_voxshield.generator import NoiseGenerator, generator_kwargs_from_plans
    plans = json.loads(plans_file.read_text())
    channels = len(json.loads(dataset_json.read_text())['channel_names'])
    kwargs = generator_kwargs_from_plans(PlansManager(plans).get_configuration(configuration), channels)
    torch.manual_seed(0)
    generator = NoiseGenerator(**kwargs)
    with torch.no_grad():  # saturate tanh: delta at the budget, so the clamps are exercised
        generator.unet.decoder.seg_layers[-1].weight.mul_(gain)
    model = results / dataset / f'{trainer}__nnUNetPlans__{configuration}'
    (model / 'fold_0').mkdir(parents=True, exist_ok=True)
    shutil.copy(plans_file, model / 'plans.json')
    shutil.copy(dataset_json, model / 'dataset.json')
    checkpoint = {'trainer_name': trainer, 'network_weights': {},
                  'init_args': {'plans': plans, 'configuration': configuration, 'fold': 0}}
    if voxshield:
        checkpoint['voxshield'] = {'method': 'voxshield', 'generator_kwargs': kwargs,
                                   'generator_weights': generator.state_dict(), 'eps': 4 / 255,
                                   'percentiles': [0.5, 99.5], 'roi': {'dilation': 0, 'soft_edge': 0.0},
                                   'eps_bg': 0.0, 'slice_axis': 0}
    torch.save(checkpoint, model / 'fold_0' / 'checkpoint_final.pth')
    return model / 'fold_0'


def two_channel_plans(plans_file: Path, dataset_name: str) -> dict:
    """The stock planner's plans for the real cases, extended to the second channel (same normalisation)."""
    plans = json.loads(plans_file.read_text())
    plans['dataset_name'] = dataset_name
    for configuration in plans['configurations'].values():
        for key in ('normalization_schemes', 'use_mask_for_norm'):
            if key in configuration:
                configuration[key] = configuration[key] * 2
    props = plans['foreground_intensity_properties_per_channel']
    props['1'] = dict(props['0'])
    return plans


@pytest.fixture(scope='module')
def env(planned_hippocampus, tmp_path_factory):
    """Two-channel source dataset, its plans (stock planner's, see ``two_channel_plans``), a checkpoint, one export."""
    base = tmp_path_factory.mktemp('export')
    with private_nnunet_roots(base) as (roots, mp):
        info = build_source(roots['nnUNet_raw'] / SRC)
        plans = roots['nnUNet_preprocessed'] / SRC / 'nnUNetPlans.json'
        plans.parent.mkdir()
        stock = planned_hippocampus['nnUNet_preprocessed'] / planned_hippocampus['dataset_name'] / 'nnUNetPlans.json'
        plans.write_text(json.dumps(two_channel_plans(stock, SRC), indent=2))
        fold = write_checkpoint(roots['nnUNet_results'], SRC, plans, roots['nnUNet_raw'] / SRC / 'dataset.json')
        export_entry(['-d', str(SRC_ID), '-o', str(OUT_ID)])
        yield {**roots, **info, 'src': roots['nnUNet_raw'] / SRC, 'out': roots['nnUNet_raw'] / OUT, 'fold': fold,
               'plans': plans}


def export_entry(argv):
    export.export_entry(argv + ['-device', 'cpu'])


def test_export_round_trips_within_budget(env):
    src, out = env['src'], env['out']
    assert sorted(p.name for p in env['nnUNet_raw'].iterdir()) == [SRC, OUT], 'temp folders left behind'
    assert not [p for p in out.rglob('*') if p.name.startswith('.') or p.suffix in ('.pth', '.npy', '.npz', '.pkl')]
    assert tree(src / 'labelsTr') == tree(out / 'labelsTr') and tree(src / 'imagesTs') == tree(out / 'imagesTs')
    ds_src, ds_out = json.loads((src / 'dataset.json').read_text()), json.loads((out / 'dataset.json').read_text())
    assert ds_out.pop('voxshield')['method'] == 'voxshield' and ds_out == ds_src
    changed = set()
    for case in env['cases']:
        label = read(src / 'labelsTr' / f'{case}.nii.gz')
        files = [f'{case}_{ch:04d}.nii.gz' for ch in range(2)]
        clean = np.stack([read(src / 'imagesTr' / f) for f in files])
        budget = raw_budget(clean.astype(np.float64))
        for ch, f in enumerate(files):
            a, b = sitk.ReadImage(str(src / 'imagesTr' / f)), sitk.ReadImage(str(out / 'imagesTr' / f))
            assert a.GetPixelID() == b.GetPixelID() and a.GetSize() == b.GetSize()
            assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
            assert a.GetDirection() == b.GetDirection()
            delta = sitk.GetArrayFromImage(b).astype(np.float64) - clean[ch]
            assert np.abs(delta).max() <= budget[ch]
            assert np.all(delta[label == 0] == 0), 'delta outside the ROI (eps_bg = 0)'
            assert sitk.GetArrayFromImage(b).min() >= clean[ch].min()
            assert sitk.GetArrayFromImage(b).max() <= clean[ch].max()
            if case == env['empty']:
                assert (src / 'imagesTr' / f).read_bytes() == (out / 'imagesTr' / f).read_bytes()
            elif np.abs(delta).max() > 0.5 * budget[ch]:
                changed.add(str(sitk.GetArrayFromImage(b).dtype))
    assert changed == {'float32', 'uint8', 'int16'}, changed
    report = json.loads((env['fold'] / f'export_{OUT}' / 'report.json').read_text())
    assert report['summary']['cases'] == 5 and report['summary']['unchanged_empty_roi'] == [env['empty']]
    assert 0.5 < report['summary']['max_budget_use'] <= 1
    first = report['cases'][0]['channels'][0]
    assert set(first) >= {'max_abs_delta', 'budget', 'fraction_changed', 'psnr', 'psnr_roi', 'ssim'}


def test_verify_passes_on_export(env, tmp_path, capsys):
    verify_entry([str(env['src']), str(env['out']), '-o', str(tmp_path / 'v.json')])
    assert 'OK' in capsys.readouterr().out
    report = json.loads((tmp_path / 'v.json').read_text())
    assert report['violations'] == [] and report['summary']['cases'] == 5


def test_two_workers_equal_one(env):
    export_entry(['-d', str(SRC_ID), '-o', '813', '-np', '2'])
    assert tree(env['nnUNet_raw'] / 'Dataset813_HippoMixProtected') == tree(env['out'])


def test_killed_export_resumes_byte_identical(env, monkeypatch):
    script = ('import os, signal, sys\n'
              'from nnunetv2_voxshield import export\n'
              'real, calls = export.protect_case, []\n'
              'def dying(case, files, folder, ctx):\n'
              '    calls.append(case)\n'
              '    if len(calls) == 3:  # killed while writing the third case\n'
              '        name = os.path.basename(files["images"][0])\n'
              '        open(os.path.join(folder, "imagesTr", f".partial-{os.getpid()}-{name}"), "wb").write(b"x")\n'
              '        os.kill(os.getpid(), signal.SIGKILL)\n'
              '    return real(case, files, folder, ctx)\n'
              'export.protect_case = dying\n'
              'export.export_entry(sys.argv[1:])\n')
    args = ['-d', str(SRC_ID), '-o', '814', '--name', 'Resumed']
    proc = subprocess.run([sys.executable, '-c', script, *args], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    final, partial = env['nnUNet_raw'] / 'Dataset814_Resumed', env['nnUNet_raw'] / '.Dataset814_Resumed.partial'
    assert not final.exists() and partial.is_dir()

    calls = []
    real = export.protect_case
    monkeypatch.setattr(export, 'protect_case', lambda *a: calls.append(a[0]) or real(*a))
    export_entry(args)
    assert len(calls) == len(env['cases']) - 2, 'finished cases were not skipped'
    assert not partial.exists() and tree(final) == tree(env['out'])


def test_random_method_needs_no_checkpoint(env, tmp_path, capsys):
    preprocessed_plans = env['nnUNet_preprocessed'] / SRC / 'nnUNetPlans.json'
    assert preprocessed_plans.is_file()
    export_entry(['-d', str(SRC_ID), '-o', '815', '--method', 'random', '--eps', '8/255'])
    out = env['nnUNet_raw'] / 'Dataset815_HippoMixProtected'
    assert json.loads((out / 'dataset.json').read_text())['voxshield']['method'] == 'random'
    verify_entry([str(env['src']), str(out), '--eps', '8/255'])
    with pytest.raises(SystemExit):
        verify_entry([str(env['src']), str(out), '--eps', '2/255'])  # 8/255 noise exceeds a 2/255 budget
    report = env['nnUNet_results'] / SRC / 'voxshield_random__nnUNetPlans__3d_fullres' / f'export_{out.name}'
    assert json.loads((report / 'report.json').read_text())['summary']['max_budget_use'] > 0.9


def test_overwrite_replaces_existing_output(env):
    out = env['nnUNet_raw'] / 'Dataset816_Again'
    out.mkdir()
    (out / 'stale.txt').write_text('old')
    export_entry(['-d', str(SRC_ID), '-o', '816', '--name', 'Again', '--overwrite'])
    assert tree(out) == tree(env['out'])


def _bad(env, kind):
    """A broken copy of the source dataset (Dataset82x) and the export arguments that must fail on it."""
    raw = env['nnUNet_raw']
    folder = raw / f'Dataset820_Bad{kind.title().replace("_", "")}'
    shutil.copytree(env['src'], folder)
    case, args = env['cases'][1], ['-d', '820', '-o', '821', '--method', 'random']
    image, label = folder / 'imagesTr' / f'{case}_0000.nii.gz', folder / 'labelsTr' / f'{case}.nii.gz'
    if kind == 'no_dataset_json':
        (folder / 'dataset.json').unlink()
        return folder, args, folder / 'dataset.json', 'missing'
    if kind == 'invalid_dataset_json':
        (folder / 'dataset.json').write_text('{"labels": ')
        return folder, args, folder / 'dataset.json', 'invalid'
    if kind == 'image_without_label':
        label.unlink()
        return folder, args, image, 'image without label'
    if kind == 'label_without_image':
        image.unlink()
        (folder / 'imagesTr' / f'{case}_0001.nii.gz').unlink()
        return folder, args, label, 'label without image'
    if kind == 'geometry_mismatch':
        img = sitk.ReadImage(str(label))
        img.SetSpacing([s * 1.5 for s in img.GetSpacing()])
        sitk.WriteImage(img, str(label))
        return folder, args, folder / 'imagesTr' / f'{case}_0000.nii.gz', 'geometry mismatch'
    if kind == 'nan_voxels':
        case = next(c for c in env['cases'] if env['dtypes'][c] == np.float32)
        image = folder / 'imagesTr' / f'{case}_0000.nii.gz'
        img = sitk.ReadImage(str(image))
        arr = sitk.GetArrayFromImage(img)
        arr[3, 4, 5] = np.nan
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(img)
        sitk.WriteImage(bad, str(image))
        return folder, args, image, 'NaN'
    if kind == 'channel_count':
        ds = json.loads((folder / 'dataset.json').read_text())
        ds['channel_names']['2'] = 'extra'
        (folder / 'dataset.json').write_text(json.dumps(ds))
        return folder, args, folder / 'imagesTr' / f'{env["cases"][0]}_0000.nii.gz', '3 channel'
    if kind == 'unknown_file_ending':
        (folder / 'imagesTr' / f'{case}_0000.png').write_bytes(b'png')
        return folder, args, folder / 'imagesTr' / f'{case}_0000.png', 'unknown file ending'
    if kind == 'output_equals_input':
        return folder, ['-d', '820', '-o', '820', '--method', 'random'], folder, 'equals the input'
    if kind == 'output_exists':
        (raw / 'Dataset821_BadOutputExistsProtected').mkdir()
        return folder, args, raw / 'Dataset821_BadOutputExistsProtected', 'already exists'
    if kind == 'not_voxshield_checkpoint':
        fold = write_checkpoint(env['nnUNet_results'], folder.name, env['plans'], folder / 'dataset.json',
                                trainer='nnUNetTrainer', voxshield=False)
        return folder, ['-d', '820', '-o', '821', '-tr', 'nnUNetTrainer'], fold / 'checkpoint_final.pth', \
            'not a VoxShield'
    raise ValueError(kind)


@pytest.mark.parametrize('kind', ['no_dataset_json', 'invalid_dataset_json', 'image_without_label',
                                  'label_without_image', 'geometry_mismatch', 'nan_voxels', 'channel_count',
                                  'unknown_file_ending', 'output_equals_input', 'output_exists',
                                  'not_voxshield_checkpoint'])
def test_bad_input_one_line_error(env, kind, capsys):
    folder, args, culprit, message = _bad(env, kind)
    before = sorted(p.name for p in env['nnUNet_raw'].iterdir())
    src_before = tree(folder)
    try:
        with pytest.raises(SystemExit) as exc:
            export_entry(args)
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(culprit) in err and message in err, err
        assert sorted(p.name for p in env['nnUNet_raw'].iterdir()) == before, 'something was written'
        assert tree(folder) == src_before, 'the input dataset was modified'
    finally:
        shutil.rmtree(folder)
        shutil.rmtree(env['nnUNet_raw'] / 'Dataset821_BadOutputExistsProtected', ignore_errors=True)


def phantom_plans(stock_plans: Path, dataset_name: str) -> dict:
    """Stock plans with a small patch (several tiles per phantom volume) and a transposed axis order."""
    plans = json.loads(stock_plans.read_text())
    plans['dataset_name'] = dataset_name
    plans['transpose_forward'], plans['transpose_backward'] = [2, 0, 1], [1, 2, 0]
    plans['configurations']['3d_fullres']['patch_size'] = [24, 24, 24]
    return plans


@pytest.fixture(scope='module')
def phantom(env, planned_hippocampus):
    from nnunetv2_voxshield.phantom import write_phantom_dataset
    folder = Path(write_phantom_dataset(830, 'Phantom', n_cases=4, n_test=1, raw_root=str(env['nnUNet_raw'])))
    plans = env['nnUNet_preprocessed'] / folder.name / 'nnUNetPlans.json'
    plans.parent.mkdir()
    stock = planned_hippocampus['nnUNet_preprocessed'] / planned_hippocampus['dataset_name'] / 'nnUNetPlans.json'
    plans.write_text(json.dumps(phantom_plans(stock, folder.name)))
    write_checkpoint(env['nnUNet_results'], folder.name, plans, folder / 'dataset.json')
    return folder, plans


def test_geometry_round_trip(phantom):
    """preprocess -> to_raw_geometry inverts nnU-Net's transpose and crop exactly, and resampling closely."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_voxshield.geometry import preprocess_case, to_raw_geometry
    folder, plans = phantom
    pm = PlansManager(json.loads(plans.read_text()))
    cm = pm.get_configuration('3d_fullres')
    dataset_json = json.loads((folder / 'dataset.json').read_text())
    for case, exact in (('phantom_000', True), ('phantom_002', False)):  # 1.0 mm and 1.5 mm slices
        images, label = [str(folder / 'imagesTr' / f'{case}_0000.nii.gz')], str(folder / 'labelsTr' / f'{case}.nii.gz')
        rw = pm.image_reader_writer_class()
        data, props = rw.read_images(images)
        seg, _ = rw.read_seg(label)
        data_pre, _, props = preprocess_case(data, seg, props, pm, cm, dataset_json)
        assert exact == (data_pre.shape[1:] == tuple(data.shape[1:][i] for i in pm.transpose_forward))
        back = to_raw_geometry(data_pre, props, pm, cm)
        expected = (data - data.mean()) / data.std()
        assert back.shape == data.shape
        if exact:
            np.testing.assert_allclose(back, expected, atol=1e-4)
        else:
            assert np.corrcoef(back.ravel(), expected.ravel())[0, 1] > 0.98


def test_export_phantom(env, phantom):
    """Anisotropic cases (resampled), several tiles per volume, transposed plans, test split copied."""
    folder, _ = phantom
    export_entry(['-d', '830', '-o', '831'])
    out = env['nnUNet_raw'] / 'Dataset831_PhantomProtected'
    verify_entry([str(folder), str(out)])
    assert tree(folder / 'imagesTs') == tree(out / 'imagesTs') and tree(folder / 'labelsTs') == tree(out / 'labelsTs')
    label = read(folder / 'labelsTr' / 'phantom_002.nii.gz')
    delta = read(out / 'imagesTr' / 'phantom_002_0000.nii.gz') - read(folder / 'imagesTr' / 'phantom_002_0000.nii.gz')
    assert np.all(delta[label == 0] == 0) and np.mean(delta[label > 0] != 0) > 0.9


def test_2d_configuration(env):
    """2D generator over the slices of axis 0 (nnU-Net's 2D sliding window), budget still per case."""
    write_checkpoint(env['nnUNet_results'], SRC, env['plans'], env['src'] / 'dataset.json', configuration='2d')
    export_entry(['-d', str(SRC_ID), '-o', '818', '-c', '2d'])
    out = env['nnUNet_raw'] / 'Dataset818_HippoMixProtected'
    verify_entry([str(env['src']), str(out)])
    assert tree(out / 'imagesTr') != tree(env['out'] / 'imagesTr')


def test_trained_voxshield_checkpoint_end_to_end(hippocampus_env, test_trainers_env, tmp_path, monkeypatch):
    """The real trainer (tiny test variant) trained by stock nnUNetv2_train, then exported and verified."""
    raw = tmp_path / 'nnUNet_raw'  # a private copy: the session's raw folder stays untouched
    shutil.copytree(hippocampus_env['nnUNet_raw'] / 'Dataset004_Hippocampus', raw / 'Dataset004_Hippocampus')
    monkeypatch.setenv('nnUNet_raw', str(raw))
    run_cli(['nnUNetv2_train', '4', '3d_fullres', '0', '-tr', 'nnUNetTrainerVoxShield_tiny', '-device', 'cpu'])
    export_entry(['-d', '4', '-o', '819', '-tr', 'nnUNetTrainerVoxShield_tiny'])
    out = raw / 'Dataset819_HippocampusProtected'
    verify_entry([str(raw / 'Dataset004_Hippocampus'), str(out)])
    fold = hippocampus_env['nnUNet_results'] / 'Dataset004_Hippocampus' / \
        'nnUNetTrainerVoxShield_tiny__nnUNetPlans__3d_fullres' / 'fold_0'
    report = json.loads((fold / 'export_Dataset819_HippocampusProtected' / 'report.json').read_text())
    assert report['settings']['method'] == 'voxshield' and report['summary']['cases'] == 8
    assert 0 < report['summary']['max_budget_use'] <= 1
