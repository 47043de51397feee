"""Guarantees of issue 30 on data nnU-Net accepts: per-voxel bounds after rounding, the protection manifest, the
ignore label, spacing-aware widths, header tolerance, one atomic JSON writer."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from nnunetv2_voxshield import dataset_io


def test_one_json_writer_strict_and_atomic(tmp_path):
    """write_json_atomic(obj, path) is the only one: strict JSON (NaN -> null, numpy -> Python), a failed write
    leaves the old file and no temp file."""
    import nnunetv2_voxshield
    package = Path(nnunetv2_voxshield.__file__).parent
    definitions = [p.name for p in package.rglob('*.py') if 'def write_json_atomic' in p.read_text()
                   or 'def _write_json_atomic' in p.read_text()]
    assert definitions == ['dataset_io.py']
    path = tmp_path / 'x.json'
    dataset_io.write_json_atomic({'a': float('nan'), 'b': np.float32(1.5), 'c': np.int64(3), 'd': (1, np.inf),
                                  'e': np.arange(2), 4: np.bool_(True)}, str(path))
    text = path.read_text()
    assert text.endswith('\n') and 'NaN' not in text and 'Infinity' not in text
    assert json.loads(text) == {'a': None, 'b': 1.5, 'c': 3, 'd': [1, None], 'e': [0, 1], '4': True}
    with pytest.raises(TypeError):
        dataset_io.write_json_atomic({'bad': object()}, str(path))
    assert json.loads(path.read_text())['c'] == 3 and os.listdir(tmp_path) == ['x.json']


# ---------------------------------------------------------------- helpers: an ACDC-like phantom, plans, checkpoint
import shutil  # noqa: E402

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from nnunetv2_voxshield.budget import raw_budget, roi_mask  # noqa: E402
from nnunetv2_voxshield.case_protection import protect_case  # noqa: E402
from nnunetv2_voxshield.controls import BoundaryShiftSource, EdgeSource, boundary_band  # noqa: E402
from nnunetv2_voxshield.export import export_dataset  # noqa: E402
from nnunetv2_voxshield.manifest import MANIFEST_FILE, build_manifest, read_manifest  # noqa: E402
from nnunetv2_voxshield.phantom import CARDIAC_IGNORE, write_phantom_dataset  # noqa: E402
from nnunetv2_voxshield.verify import verify_datasets, verify_entry  # noqa: E402

SPACING_ZYX = (10.0, 1.5, 1.5)


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def hand_plans(dataset_name: str, patch=(8, 32, 32)) -> dict:
    """Plans as nnU-Net writes them for the cardiac phantom (3d_fullres at its own 10 x 1.5 x 1.5 mm spacing, no
    resampling, z-score), small network; written by hand so these tests need no planner run."""
    arch = {'n_stages': 3, 'features_per_stage': [8, 16, 32], 'conv_op': 'torch.nn.modules.conv.Conv3d',
            'kernel_sizes': [[1, 3, 3], [3, 3, 3], [3, 3, 3]], 'strides': [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
            'n_conv_per_stage': [1, 1, 1], 'n_conv_per_stage_decoder': [1, 1], 'conv_bias': True,
            'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d', 'norm_op_kwargs': {'eps': 1e-05, 'affine': True},
            'dropout_op': None, 'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
            'nonlin_kwargs': {'inplace': True}}
    resampling = {'resampling_fn_data': 'resample_data_or_seg_to_shape',
                  'resampling_fn_data_kwargs': {'is_seg': False, 'order': 3, 'order_z': 0, 'force_separate_z': None},
                  'resampling_fn_seg': 'resample_data_or_seg_to_shape',
                  'resampling_fn_seg_kwargs': {'is_seg': True, 'order': 1, 'order_z': 0, 'force_separate_z': None},
                  'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
                  'resampling_fn_probabilities_kwargs': {'is_seg': False, 'order': 1, 'order_z': 0,
                                                         'force_separate_z': None}}
    config = {'data_identifier': 'nnUNetPlans_3d_fullres', 'preprocessor_name': 'DefaultPreprocessor',
              'batch_size': 2, 'patch_size': list(patch), 'median_image_size_in_voxels': [8, 40, 40],
              'spacing': list(SPACING_ZYX), 'normalization_schemes': ['ZScoreNormalization'],
              'use_mask_for_norm': [False], **resampling, 'batch_dice': False,
              'architecture': {'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
                               'arch_kwargs': arch,
                               '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']}}
    return {'dataset_name': dataset_name, 'plans_name': 'nnUNetPlans',
            'original_median_spacing_after_transp': list(SPACING_ZYX),
            'original_median_shape_after_transp': [8, 40, 40], 'image_reader_writer': 'SimpleITKIO',
            'transpose_forward': [0, 1, 2], 'transpose_backward': [0, 1, 2], 'configurations': {'3d_fullres': config},
            'experiment_planner_used': 'ExperimentPlanner', 'label_manager': 'LabelManager',
            'foreground_intensity_properties_per_channel': {'0': {'max': 500.0, 'mean': 300.0, 'median': 300.0,
                                                                  'min': 0.0, 'percentile_00_5': 50.0,
                                                                  'percentile_99_5': 480.0, 'std': 100.0}}}


def write_generator_checkpoint(path: Path, plans: dict, eps_bg: float, dilation: int) -> Path:
    """A VoxShield checkpoint with a random, saturated G (delta at the bound everywhere), eps_bg and a dilation."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_voxshield.generator import NoiseGenerator, generator_kwargs_from_plans
    kwargs = generator_kwargs_from_plans(PlansManager(plans).get_configuration('3d_fullres'), 1)
    torch.manual_seed(0)
    generator = NoiseGenerator(**kwargs)
    with torch.no_grad():
        generator.unet.decoder.seg_layers[-1].weight.mul_(50.0)
    torch.save({'trainer_name': 'nnUNetTrainerVoxShield', 'network_weights': {},
                'voxshield': {'method': 'voxshield', 'generator_kwargs': kwargs,
                              'generator_weights': generator.state_dict(), 'eps': 8 / 255, 'eps_bg': eps_bg,
                              'percentiles': [0.5, 99.5], 'roi': {'dilation': dilation, 'soft_edge': 0.0},
                              'slice_axis': 0}}, path)
    return path


@pytest.fixture(scope='module')
def cardiac(tmp_path_factory):
    """3 ACDC-like cases (float32, uint8, int16; 1.5 x 1.5 x 10 mm; RV, MYO, LV + ignore label 4), their plans."""
    root = tmp_path_factory.mktemp('guarantees')
    folder = Path(write_phantom_dataset(870, 'Cardiac', n_cases=3, raw_root=str(root / 'raw'), cardiac=True,
                                        ignore=True))
    plans = root / 'nnUNetPlans.json'
    plans.write_text(json.dumps(hand_plans(folder.name)))
    return {'root': root, 'src': folder, 'plans': plans}


def export(cardiac, out_id: int, **kwargs) -> Path:
    out = cardiac['root'] / 'raw' / f'Dataset{out_id}_Out{out_id}'
    export_dataset(str(cardiac['src']), str(out), str(cardiac['plans']), '3d_fullres',
                   str(cardiac['root'] / f'report_{out_id}'), progress=False, **kwargs)
    return out


def deltas(cardiac, out: Path):
    """[(case, dtype, label, clean, protected - clean)] of an export."""
    rows = []
    for f in sorted((cardiac['src'] / 'labelsTr').iterdir()):
        case = f.name[:-len('.nii.gz')]
        clean = read(cardiac['src'] / 'imagesTr' / f'{case}_0000.nii.gz')
        protected = read(out / 'imagesTr' / f'{case}_0000.nii.gz')
        assert protected.dtype == clean.dtype
        rows.append((case, clean.dtype, read(f), clean, protected.astype(np.float64) - clean.astype(np.float64)))
    return rows


# ---------------------------------------------------------------- 1. the per-voxel bound survives rounding
class _SaturatedSource:
    """A raw-space source that pushes every voxel up by 10 budgets; weight 1 on the labels, ``bg`` outside."""
    raw_space, method, roi, eps_bg = True, 'stub', {'dilation': 0, 'soft_edge': 0.0}, 0.0

    def __init__(self, bg: float):
        self.bg = bg

    def delta_and_support_raw(self, images, seg, budget, case, **kwargs):
        delta = np.stack([np.full(seg.shape, 10.0 * b) for b in budget])
        return delta, np.where(seg > 0, 1.0, self.bg)


@pytest.mark.parametrize('dtype', ['uint8', 'int16'])
def test_integer_images_hold_the_per_voxel_bound_at_eps_bg(tmp_path, dtype):
    """eps_abs 2.5 grey levels, eps_bg = 0.3 of it (0.75 of a grey level): labels move by 2, background not at all
    (rounding 0.75 up to a whole grey level would break the bound)."""
    rng = np.random.default_rng(0)
    clean = rng.integers(10, 200, (6, 12, 12)).astype(dtype)
    seg = np.zeros(clean.shape, np.uint8)
    seg[2:4, 3:8, 3:8] = 1
    clean[seg > 0] = np.minimum(clean[seg > 0], 150)
    clean[0, 0, 0] = 250  # the image's maximum, which protected voxels do not exceed, is out of reach
    files = {'images': [str(tmp_path / 'c_0000.nii.gz')], 'label': str(tmp_path / 'c.nii.gz')}
    for array, path in ((clean, files['images'][0]), (seg, files['label'])):
        sitk.WriteImage(sitk.GetImageFromArray(array), path)
    out = tmp_path / 'out'
    for sub in ('imagesTr', 'labelsTr'):
        (out / sub).mkdir(parents=True)
    ctx = {'source': _SaturatedSource(0.3), 'dataset_json': {'labels': {'background': 0, 'x': 1}}, 'eps': None,
           'eps_abs': 2.5, 'percentiles': [0.5, 99.5], 'budget_mode': None}
    protect_case('c', files, str(out), ctx)
    delta = read(out / 'imagesTr' / 'c_0000.nii.gz').astype(np.int64) - clean.astype(np.int64)
    assert np.all(delta[seg > 0] == 2)
    assert np.all(delta[seg == 0] == 0), 'a background voxel moved by a grey level with a bound of 0.75'


def write_pair(tmp_path, dtype=np.uint8):
    """A clean one-case dataset and a byte-identical 'protected' copy (with a manifest: labels rule, eps 4/255)."""
    clean, protected = tmp_path / 'Dataset880_C', tmp_path / 'Dataset881_P'
    for folder in (clean, protected):
        (folder / 'imagesTr').mkdir(parents=True)
        (folder / 'labelsTr').mkdir()
        (folder / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'MRI'}, 'labels': {
            'background': 0, 'x': 1}, 'numTraining': 1, 'file_ending': '.nii.gz'}))
    image = np.random.default_rng(1).integers(0, 150, (5, 16, 16)).astype(dtype)
    seg = np.zeros(image.shape, np.uint8)
    seg[1:4, 4:10, 4:10] = 1
    for folder in (clean, protected):
        sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / 'imagesTr' / 'c_0000.nii.gz'))
        sitk.WriteImage(sitk.GetImageFromArray(seg), str(folder / 'labelsTr' / 'c.nii.gz'))
    dataset_io.write_json_atomic(build_manifest('offset', 4 / 255, None, 'range', [0.5, 99.5],
                                                {'rule': 'labels', 'background_weight': 0.0}, None),
                                 str(protected / MANIFEST_FILE))
    return clean, protected, image, seg


def test_verify_catches_a_background_voxel_moved_by_one_grey_level(tmp_path, capsys):
    clean, protected, image, seg = write_pair(tmp_path)
    assert raw_budget(image[None].astype(np.float64))[0] > 2  # one grey level is well within the channel budget
    verify_entry([str(clean), str(protected)])
    moved = image.copy()
    moved[0, 0, 0] += 1  # background, where the manifest promises zero
    sitk.WriteImage(sitk.GetImageFromArray(moved), str(protected / 'imagesTr' / 'c_0000.nii.gz'))
    with pytest.raises(SystemExit) as exc:
        verify_entry([str(clean), str(protected)])
    assert exc.value.code == 1
    violations = [line for line in capsys.readouterr().err.splitlines() if line.startswith('VIOLATION')]
    assert len(violations) == 1 and 'c_0000.nii.gz' in violations[0] and 'per-voxel bound' in violations[0]
    assert '1 where the bound is 0' in violations[0]
    report = verify_datasets(str(clean), str(protected))
    channel = report['cases'][0]['channels'][0]
    assert channel['voxels_over_bound'] == 1 and channel['max_abs_delta_zero_bound'] == 1
    assert report['summary']['per_voxel_bounds'] and report['summary']['voxels_over_bound'] == 1


# ---------------------------------------------------------------- 2. the protection manifest
def test_manifest_round_trip_and_verify_reads_it(cardiac, capsys):
    out = export(cardiac, 871, method='offset', eps=8 / 255)
    manifest = read_manifest(str(out))
    assert manifest == json.loads((out / MANIFEST_FILE).read_text())
    assert manifest['method'] == 'offset' and manifest['eps'] == pytest.approx(8 / 255) and manifest['eps_abs'] is None
    assert manifest['budget_mode'] == 'range' and manifest['percentiles'] == [0.5, 99.5]
    assert manifest['support'] == {'rule': 'labels', 'background_weight': 0.0} and manifest['eps_bg'] == 0.0
    assert manifest['ignore_label'] == CARDIAC_IGNORE and manifest['voxshield_version']
    assert not {'seed', 'checkpoint', 'key', 'generator_weights'} & set(json.dumps(manifest).replace('"', ' ').split())
    # verify takes eps 8/255 from the manifest (the default 4/255 would fail); a flag still overrides it
    report = verify_datasets(str(cardiac['src']), str(out))
    assert report['violations'] == [] and report['budget']['eps'] == pytest.approx(8 / 255)
    assert report['summary']['per_voxel_bounds'] and 0.9 < report['summary']['max_bound_use'] <= 1
    with pytest.raises(SystemExit):
        verify_entry([str(cardiac['src']), str(out), '--eps', '4/255'])
    assert 'exceeds the budget' in capsys.readouterr().err
    # a broken manifest is one line naming it
    (out / MANIFEST_FILE).write_text('{"support": ')
    with pytest.raises(SystemExit):
        verify_entry([str(cardiac['src']), str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and MANIFEST_FILE in err[0]


def test_nnunet_accepts_the_exported_dataset(cardiac):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    out = export(cardiac, 872, method='random')
    assert (out / MANIFEST_FILE).is_file()
    verify_dataset_integrity(str(out), num_processes=1)  # raises on anything it does not accept


# ---------------------------------------------------------------- 3. nnU-Net's ignore label is not foreground
def test_roi_mask_leaves_out_the_ignore_label():
    seg = torch.zeros(1, 1, 6, 6, 6)
    seg[0, 0, 2:4, 2:4, 2:4] = 1
    seg[0, 0, :, :, 5] = 4
    mask = roi_mask(seg, dilation=2, ignore_label=4)[0, 0]
    assert mask[:, :, 5].sum() == 0 and mask[:, :, :5].sum() == 6 * 6 * 5
    assert roi_mask(seg, ignore_label=4)[0, 0].sum() == 8
    assert roi_mask(seg)[0, 0].sum() == 8 + 36  # without it, the ignore label counts as foreground
    regions = torch.stack([seg[:, 0] == 1, seg[:, 0] == 4], 1).float()  # nnU-Net: ignore is the last region
    assert torch.equal(roi_mask(regions, ignore_label=4), roi_mask(seg, ignore_label=4))


@pytest.mark.parametrize('method, kwargs', [('offset', {}), ('random', {}), ('grow', {'width': 2}),
                                            ('edge', {'width': 1})])
def test_ignore_label_gets_no_code_and_no_budget(cardiac, method, kwargs):
    out = export(cardiac, {'offset': 873, 'random': 874, 'grow': 875, 'edge': 876}[method], method=method,
                 eps=8 / 255, method_options=kwargs)
    assert verify_datasets(str(cardiac['src']), str(out))['violations'] == []
    seen = set()
    for case, dtype, label, clean, delta in deltas(cardiac, out):
        assert np.all(delta[label == CARDIAC_IGNORE] == 0), (method, case)
        if method in ('offset', 'random'):
            assert np.all(delta[label == 0] == 0)
        seen.add(str(dtype))
        assert np.any(delta != 0)
    assert seen == {'float32', 'uint8', 'int16'}


def test_generator_with_eps_bg_and_dilation_holds_every_voxel_bound(cardiac):
    """The nnU-Net path (preprocess, G, map back) with eps_bg and a dilated ROI, on integer and float cases."""
    checkpoint = write_generator_checkpoint(cardiac['root'] / 'g.pth', hand_plans(cardiac['src'].name),
                                            eps_bg=2 / 255, dilation=1)
    out = export(cardiac, 877, checkpoint=str(checkpoint))
    manifest = read_manifest(str(out))
    assert manifest['support']['rule'] == 'roi' and manifest['support']['dilation'] == 1
    assert manifest['eps_bg'] == pytest.approx(2 / 255) and manifest['support']['background_weight'] == 0.25
    report = verify_datasets(str(cardiac['src']), str(out))
    assert report['violations'] == [] and report['summary']['voxels_over_bound'] == 0
    for case, dtype, label, clean, delta in deltas(cardiac, out):
        budget = raw_budget(clean[None].astype(np.float64), 8 / 255)[0]
        near = roi_mask(torch.from_numpy((label % 4 > 0).astype(np.float32))[None, None], dilation=1)[0, 0].numpy()
        far = (near == 0) & (label != CARDIAC_IGNORE)
        assert np.all(delta[label == CARDIAC_IGNORE] == 0)
        assert np.abs(delta[far]).max() <= 0.25 * budget and np.any(delta[far] != 0)
        assert np.abs(delta).max() <= budget


# ---------------------------------------------------------------- 4. widths in mm, measured with the spacing
def test_boundary_band_in_mm_does_not_cross_10mm_slices():
    seg = np.zeros((8, 20, 20), np.uint8)
    seg[3:5, 8:12, 8:12] = 1
    voxels = boundary_band(seg, 'grow', 1)[0]
    mm = boundary_band(seg, 'grow', 3.0, SPACING_ZYX)[0]
    assert voxels[2].any() and voxels[5].any()  # 1 voxel = a whole 10 mm slice above and below
    assert not mm[2].any() and not mm[5].any()  # 3 mm: in-plane only, two voxels of 1.5 mm
    assert mm[3, 6, 9] and mm[3, 7, 9] and not mm[3, 5, 9]
    source = BoundaryShiftSource('grow', 3.0, 'mm')
    assert np.array_equal(source.support(seg, SPACING_ZYX), mm)
    edge = EdgeSource(3.0, 'plus', 'mm').support(seg, SPACING_ZYX)
    assert not edge[2].any() and edge[3, 9, 9] and edge[3, 6, 9] and not edge[3, 5, 9]
    with pytest.raises(dataset_io.InputError):
        source.support(seg)  # mm without a spacing


def test_roi_dilation_and_contour_band_in_mm():
    from nnunetv2_voxshield.umed import contour_band
    seg = torch.zeros(1, 1, 8, 20, 20)
    seg[0, 0, 3:5, 8:12, 8:12] = 1
    mm = roi_mask(seg, dilation=3.0, spacing=SPACING_ZYX)[0, 0]
    assert mm[2].sum() == 0 and mm[3].sum() == 8 * 8
    assert roi_mask(seg, dilation=1)[0, 0][2].sum() == 6 * 6  # voxels: the default, across slices
    band = contour_band(seg, 3.0, SPACING_ZYX)[0, 0]
    assert band[2].sum() == 0 and band[3].sum() == 8 * 8 - 0  # interior 4x4 minus 2-voxel erosion: empty
    assert contour_band(seg, 1)[0, 0][2].sum() > 0


def test_anisotropic_three_class_grow_in_mm_through_export_and_verify(cardiac):
    out = export(cardiac, 878, method='grow', eps=8 / 255, method_options={'width': 3.0, 'unit': 'mm'})
    manifest = read_manifest(str(out))
    assert manifest['support'] == {'rule': 'grow', 'width': 3.0, 'width_unit': 'mm', 'background_weight': 0.0}
    report = verify_datasets(str(cardiac['src']), str(out))
    assert report['violations'] == [] and report['summary']['per_voxel_bounds']
    for case, dtype, label, clean, delta in deltas(cardiac, out):
        fg = (label > 0) & (label != CARDIAC_IGNORE)
        slices = np.flatnonzero(fg.any(axis=(1, 2)))
        moved = np.flatnonzero((delta != 0).any(axis=(1, 2)))
        assert set(moved) <= set(slices), 'a 3 mm band reached a 10 mm neighbour slice'
        assert np.all(delta[fg] == 0) and np.any(delta != 0)


# ---------------------------------------------------------------- 6. what nnU-Net accepts, export accepts
def test_origin_and_direction_mismatch_warn_spacing_mismatch_stops(cardiac, tmp_path, capsys):
    src = tmp_path / 'Dataset879_Shifted'
    shutil.copytree(cardiac['src'], src)
    image = src / 'imagesTr' / 'phantom_001_0000.nii.gz'
    img = sitk.ReadImage(str(image))
    img.SetOrigin([o + 0.5 for o in img.GetOrigin()])
    sitk.WriteImage(img, str(image))
    out = tmp_path / 'Dataset889_ShiftedOut'
    export_dataset(str(src), str(out), str(cardiac['plans']), '3d_fullres', str(tmp_path / 'r'), method='offset',
                   progress=False)
    err = capsys.readouterr().err
    assert f'WARNING: {image}: origin differs' in err
    assert verify_datasets(str(src), str(out))['violations'] == []
    img.SetSpacing([s * 1.01 for s in img.GetSpacing()])
    sitk.WriteImage(img, str(image))
    with pytest.raises(dataset_io.InputError) as exc:
        dataset_io.check_case_headers({'images': [str(image)], 'label': str(src / 'labelsTr' / 'phantom_001.nii.gz')})
    assert str(image) in str(exc.value) and 'spacing' in str(exc.value) and '\n' not in str(exc.value)
