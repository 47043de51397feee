"""Export-time baselines of issue 5: LSP (Yu et al. 2022) and TAP (Fowl et al. 2021) via voxshield_export --method."""
import json
import shutil
from collections import defaultdict

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import requires_hippocampus, run_cli
from nnunetv2_voxshield import export
from nnunetv2_voxshield.baselines import LSPSource, swap_target, tap_pgd
from nnunetv2_voxshield.budget import raw_budget
from nnunetv2_voxshield.verify import verify_entry


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def export_entry(argv):
    export.export_entry(argv + ['-device', 'cpu'])


def _seg(shape, boxes):
    seg = np.zeros((1, *shape), dtype=np.int16)
    for label, box in boxes.items():
        seg[(0, *box)] = label
    return seg


def test_lsp_pattern_fixed_per_class():
    """Same class -> same tiled pattern wherever the class lies, in any case; zero off the labels; |delta| = eps."""
    eps = np.array([0.3, 0.05], dtype=np.float32)
    a = _seg((20, 18, 17), {1: np.s_[2:10, 3:15, 1:16], 2: np.s_[10:19, 3:15, 1:16]})
    b = _seg((17, 25, 9), {1: np.s_[8:17, 0:25, 0:9], 2: np.s_[0:8, 0:25, 0:9]})
    da = LSPSource(seed=3).compute_delta(np.zeros((2, *a.shape[1:]), np.float32), a, eps, 'case_a')
    db = LSPSource(seed=3).compute_delta(np.ones((2, *b.shape[1:]), np.float32), b, eps, 'case_b')
    for delta, seg in ((da, a), (db, b)):
        assert np.all(delta[:, seg[0] == 0] == 0)
        for c in range(2):
            assert np.all(np.abs(delta[c][seg[0] > 0]) == eps[c])
    for label in (1, 2):  # compare on the common origin-anchored grid
        sa, sb = np.nonzero(a[0] == label), np.nonzero(b[0] == label)
        pa = {(c, *(np.array(p) % 8)): np.sign(da[c][p]) for c in range(2) for p in zip(*sa)}
        pb = {(c, *(np.array(p) % 8)): np.sign(db[c][p]) for c in range(2) for p in zip(*sb)}
        common = set(pa) & set(pb)
        assert len(common) > 500 and all(pa[k] == pb[k] for k in common)
    m1, m2 = (a[0] == 1), (a[0] == 2)
    period = lambda m: {tuple(np.array(p) % 8): np.sign(da[0][p]) for p in zip(*np.nonzero(m))}  # noqa: E731
    p1, p2 = period(m1), period(m2)
    assert np.mean([p1[k] != p2[k] for k in set(p1) & set(p2)]) > 0.3, 'classes share a pattern'
    again = LSPSource(seed=3).compute_delta(np.zeros((2, *a.shape[1:]), np.float32), a, eps, 'other_name')
    other_seed = LSPSource(seed=4).compute_delta(np.zeros((2, *a.shape[1:]), np.float32), a, eps, 'case_a')
    assert np.array_equal(again, da) and not np.array_equal(other_seed, da)


@pytest.mark.parametrize('dims, patch, divisor', [(3, [16, 16, 16], None), (3, [8, 8, 8], [4, 4, 4]),
                                                  (2, [8, 8], None)])
def test_tap_pgd_lowers_loss_towards_target(dims, patch, divisor):
    """PGD on a tiny network (tiled / whole volume / 2D slices): CE towards the swapped labels decreases, delta
    within eps per channel, at the budget somewhere, zero off the mask."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    network = torch.nn.Sequential(conv(2, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 3, 3, padding=1))
    x = np.random.default_rng(0).normal(size=(2, 12, 20, 18)).astype(np.float32)
    seg = _seg((12, 20, 18), {1: np.s_[3:9, 4:12, 5:10], 2: np.s_[3:9, 12:16, 5:10]}).astype(np.int64)
    target = swap_target(seg, [1, 2])
    assert np.all(target[seg == 1] == 2) and np.all(target[seg == 2] == 1) and np.all(target[seg == 0] == 0)
    assert np.all(swap_target(seg, [1])[seg == 1] == 0)
    target[seg == 0] = -1
    mask = (seg > 0).astype(np.float32)
    eps = np.array([0.5, 0.1], dtype=np.float32)
    delta, losses = tap_pgd(network, x, target, mask, eps, patch, steps=8, divisor=divisor)
    assert len(losses) == 9 and losses[-1] < losses[0] - 0.01
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 6
    assert delta.shape == x.shape and np.all(delta[:, seg[0] == 0] == 0)
    assert np.all(np.abs(delta[0]) <= 0.5 + 1e-6) and np.all(np.abs(delta[1]) <= 0.1 + 1e-6)
    assert np.abs(delta[0][seg[0] > 0]).max() == pytest.approx(0.5)


def _check_export(src, out, cases):
    """Geometry, dtype, labels, |delta| <= budget and zero outside the labels, per case; returns {case: delta}."""
    verify_entry([str(src), str(out)])
    deltas = {}
    for case in cases:
        label = read(src / 'labelsTr' / f'{case}.nii.gz')
        assert (src / 'labelsTr' / f'{case}.nii.gz').read_bytes() == (out / 'labelsTr' / f'{case}.nii.gz').read_bytes()
        a, b = sitk.ReadImage(str(src / 'imagesTr' / f'{case}_0000.nii.gz')), \
            sitk.ReadImage(str(out / 'imagesTr' / f'{case}_0000.nii.gz'))
        assert a.GetPixelID() == b.GetPixelID() and a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
        clean = sitk.GetArrayFromImage(a).astype(np.float64)
        delta = sitk.GetArrayFromImage(b).astype(np.float64) - clean
        assert np.abs(delta).max() <= raw_budget(clean[None])[0]
        assert np.all(delta[label == 0] == 0), 'delta outside the labels'
        assert np.mean(delta[label > 0] != 0) > 0.5
        deltas[case] = (delta, label)
    return deltas


@requires_hippocampus
def test_lsp_export_and_verify(hippocampus_env):
    """--method lsp on real cases: verify passes; in nnU-Net's cropped frame each class carries one fixed pattern."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_voxshield.geometry import preprocess_case
    raw, name = hippocampus_env['nnUNet_raw'], hippocampus_env['dataset_name']
    src, out = raw / name, raw / 'Dataset851_HippocampusProtected'
    try:
        export_entry(['-d', '4', '-o', '851', '--method', 'lsp', '--seed', '5'])
        deltas = _check_export(src, out, hippocampus_env['cases'])
        assert json.loads((out / 'dataset.json').read_text())['voxshield']['method'] == 'lsp'
        pm = PlansManager(json.loads((hippocampus_env['nnUNet_preprocessed'] / name / 'nnUNetPlans.json')
                                     .read_text()))
        cm = pm.get_configuration('3d_fullres')
        dataset_json = json.loads((src / 'dataset.json').read_text())
        signs = defaultdict(set)
        for case, (delta, label) in deltas.items():
            reader = pm.image_reader_writer_class()
            data, props = reader.read_images([str(src / 'imagesTr' / f'{case}_0000.nii.gz')])
            seg, _ = reader.read_seg(str(src / 'labelsTr' / f'{case}.nii.gz'))
            data_pre, _, props = preprocess_case(data, seg, props, pm, cm, dataset_json)
            assert data_pre.shape[1:] == tuple(props['shape_after_cropping_and_before_resampling'])  # no resampling
            lower = np.array([b[0] for b in props['bbox_used_for_cropping']])
            d, lab = delta.transpose(pm.transpose_forward), label.transpose(pm.transpose_forward)
            for p in zip(*np.nonzero((lab > 0) & (d != 0))):
                signs[(int(lab[p]), *((np.array(p) - lower) % 8))].add(np.sign(d[p]))
        assert len(signs) > 2 * 8 ** 3 * 0.9 and all(len(s) == 1 for s in signs.values()), \
            'a class does not carry one fixed pattern across cases'
    finally:
        shutil.rmtree(out, ignore_errors=True)


@requires_hippocampus
def test_tap_export_and_verify(hippocampus_env, test_trainers_env, capsys):
    """Stock nnU-Net surrogate (tiny trainer) -> --method tap export passes verify; a missing surrogate fails cleanly."""
    raw, name = hippocampus_env['nnUNet_raw'], hippocampus_env['dataset_name']
    src, out = raw / name, raw / 'Dataset852_HippocampusProtected'
    results = hippocampus_env['nnUNet_results']
    before = sorted(p.name for p in raw.iterdir())
    for bad, culprit in ((['--surrogate-tr', 'nnUNetTrainerNoSuchThing'], 'nnUNetTrainerNoSuchThing'),
                         (['--surrogate-tr', 'nnUNetTrainer_tiny', '--surrogate-chk', 'nope.pth'], 'nope.pth')):
        if culprit == 'nope.pth':
            run_cli(['nnUNetv2_train', '4', '3d_fullres', '0', '-tr', 'nnUNetTrainer_tiny', '-device', 'cpu'])
        with pytest.raises(SystemExit) as exc:
            export_entry(['-d', '4', '-o', '852', '--method', 'tap', *bad])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 1 and len(err.splitlines()) == 1 and culprit in err and 'surrogate' in err, err
        assert sorted(p.name for p in raw.iterdir()) == before, 'something was written to nnUNet_raw'
        assert not (results / name / 'voxshield_tap__nnUNetPlans__3d_fullres').exists()
    try:
        export_entry(['-d', '4', '-o', '852', '--method', 'tap', '--surrogate-tr', 'nnUNetTrainer_tiny',
                      '--tap-steps', '3'])
        _check_export(src, out, hippocampus_env['cases'])
        report = json.loads((results / name / 'voxshield_tap__nnUNetPlans__3d_fullres' / f'export_{out.name}' /
                             'report.json').read_text())
        settings = report['settings']
        assert settings['method'] == 'tap' and settings['method_options']['steps'] == 3
        assert settings['method_options']['surrogate'].endswith('nnUNetTrainer_tiny__nnUNetPlans__3d_fullres')
        assert len(settings['surrogate_sha256']) == 64 and 0.9 < report['summary']['max_budget_use'] <= 1
    finally:
        shutil.rmtree(out, ignore_errors=True)
