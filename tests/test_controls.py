"""Positive controls of issue 12: fixed label-coded offset, checkerboard and smooth fields via voxshield_export; the
boundary displacements grow / shrink; the edge reversal."""
import json
import shutil
from fractions import Fraction

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import requires_hippocampus
from nnunetv2_voxshield import export
from nnunetv2_voxshield.budget import raw_budget
from nnunetv2_voxshield.controls import (DIAGONALS, BoundaryShiftSource, EdgeSource, LabelCodedSource, boundary_band,
                                         checkerboard, diagonal_stripes, smooth_field, stripes)
from nnunetv2_voxshield.dataset_io import InputError
from nnunetv2_voxshield.verify import verify_entry


def _seg(shape, boxes):
    seg = np.zeros(shape, dtype=np.int16)
    for label, box in boxes.items():
        seg[box] = label
    return seg


SEG = _seg((14, 12, 10), {1: np.s_[1:6, 2:10, 1:9], 2: np.s_[6:10, 2:10, 1:9], 3: np.s_[10:13, 2:10, 1:9]})
BUDGET = np.array([3.0, 0.5])


def _delta(method, seg=SEG, **kw):
    images = np.zeros((2, *seg.shape))
    return LabelCodedSource(method, **kw).compute_delta_raw(images, seg, BUDGET, 'case')


@pytest.mark.parametrize('method', ['offset', 'checkerboard', 'stripes', 'diagonal', 'smooth'])
def test_zero_off_labels_within_budget_sign_per_class(method):
    delta = _delta(method)
    assert delta.shape == (2, *SEG.shape)
    assert np.all(delta[:, SEG == 0] == 0)
    for c, b in enumerate(BUDGET):  # the smooth tile reaches 1 somewhere in 64^3, not always inside a small label
        assert np.all(np.abs(delta[c]) <= b + 1e-12)
        assert np.abs(delta[c]).max() == pytest.approx(b) if method != 'smooth' else np.abs(delta[c]).max() > 0.2 * b
    if method == 'offset':  # +b, -b, +b on labels 1, 2, 3
        for label, sign in ((1, 1), (2, -1), (3, 1)):
            assert np.all(delta[0][SEG == label] == sign * 3.0) and np.all(delta[1][SEG == label] == sign * 0.5)


def test_checkerboard_parity_and_class_phase():
    """+b (-1)^(i+j+k) on label 1, the opposite phase on label 2; a one-voxel shift flips the sign."""
    delta = _delta('checkerboard')[0]
    i, j, k = np.indices(SEG.shape)
    parity = np.where((i + j + k) % 2 == 0, 1.0, -1.0)
    assert np.array_equal(delta[SEG == 1], 3.0 * parity[SEG == 1])
    assert np.array_equal(delta[SEG == 2], -3.0 * parity[SEG == 2])
    assert np.array_equal(delta[SEG == 3], 3.0 * parity[SEG == 3])
    assert np.all(delta[2:5, 4, 4] == -delta[3:6, 4, 4])
    blocks = checkerboard((8, 8, 8), block=2)  # 2-voxel blocks: period 4
    assert np.array_equal(blocks[:, 0, 0], [1, 1, -1, -1, 1, 1, -1, -1])
    assert np.array_equal(blocks[0, 1, :4], [1, 1, -1, -1]) and blocks[0, 2, 0] == -1


def test_stripes_orientation_codes_the_class():
    """Label 1 varies along axis 0 only, label 2 along axis 1, label 3 along axis 2; period 2 x block."""
    delta = _delta('stripes', block=2)[1]  # channel 1: b = 0.5
    i, j, k = np.indices(SEG.shape)
    wave = lambda a: np.where((a // 2) % 2 == 0, 0.5, -0.5)  # noqa: E731
    for label, axis in ((1, i), (2, j), (3, k)):
        assert np.array_equal(delta[SEG == label], wave(axis)[SEG == label])
    assert np.array_equal(stripes((4, 6, 2), axis=1, block=1)[0, :, 0], [1, -1, 1, -1, 1, -1])
    assert np.all(stripes((4, 6, 2), axis=1)[:, 2, :] == 1)  # constant across the other axes


def test_diagonal_stripes_cross_one_diagonal_per_class():
    """Label y: a square wave of period 2 x block along s = d . (i, j, k), d = DIAGONALS[(y - 1) % 4]."""
    delta = _delta('diagonal', block=4)[0]  # channel 0: b = 3
    i, j, k = np.indices(SEG.shape)
    for label in (1, 2, 3):
        d = DIAGONALS[label - 1]
        s = d[0] * i + d[1] * j + d[2] * k
        assert np.array_equal(delta[SEG == label], np.where((s // 4) % 2 == 0, 3.0, -3.0)[SEG == label])
    assert DIAGONALS[:2] == ((1, -1, 1), (1, -1, -1))
    wave = diagonal_stripes((16, 16, 16), (1, -1, 1), block=4)
    assert np.array_equal(wave[:, 0, 0], [1, 1, 1, 1, -1, -1, -1, -1] * 2)  # period 8 along each axis
    assert np.all(wave[np.arange(8), np.arange(8), 0] == 1)  # constant along (1, 1, 0), orthogonal to d
    # its power sits in one local-DFT bin of an 8^3 block: (1, -1, 1) (and its mirror image), nothing at (1, 0, 0)
    h = np.hanning(10)[1:-1]
    power = np.abs(np.fft.fftn(wave[:8, :8, :8] * h[:, None, None] * h[None, :, None] * h[None, None, :])) ** 2
    assert power[1, -1, 1] == power.max() and power[1, -1, 1] > 30 * power[1, 0, 0]


def test_smooth_field_fixed_per_class_and_low_pass():
    """The same class carries the same field at the same position in any case; classes differ; low-pass."""
    other = _seg((20, 16, 12), {1: np.s_[0:20, 0:16, 0:12]})
    a, b = _delta('smooth', seed=2)[0], _delta('smooth', seg=other, seed=2)[0]
    assert np.allclose(a[SEG == 1], b[:14, :12, :10][SEG == 1])
    tile1, tile2 = smooth_field(1, seed=2), smooth_field(2, seed=2)
    assert abs(np.corrcoef(tile1.ravel(), tile2.ravel())[0, 1]) < 0.2
    assert not np.allclose(_delta('smooth', seed=3)[0], a)
    spectrum = np.abs(np.fft.fftn(tile1)) ** 2
    freq = np.sqrt(sum(f ** 2 for f in np.meshgrid(*[np.fft.fftfreq(64)] * 3, indexing='ij')))
    assert spectrum[freq > 0.15].sum() < 1e-3 * spectrum.sum()  # sigma 4: almost nothing above 0.15 cycles/voxel


def test_sign_option_gives_one_polarity_to_every_class():
    """sign 'minus' / 'plus': -b / +b on every class for the offset, and the checkerboard's phase no longer flips
    between classes; 'alternate' is the default (+, -, +)."""
    minus = _delta('offset', sign='minus')
    assert np.all(minus[0][SEG > 0] == -3.0) and np.all(minus[:, SEG == 0] == 0)
    assert np.all(_delta('offset', sign='plus')[1][SEG > 0] == 0.5)
    assert np.array_equal(_delta('offset', sign='alternate'), _delta('offset'))
    board = _delta('checkerboard', sign='plus')[0]
    assert np.array_equal(board[SEG > 0], (3.0 * checkerboard(SEG.shape))[SEG > 0])


def test_bad_options_refused():
    for kw in ({'block': 0}, {'sigma': 0.0}, {'sign': 'up'}):
        with pytest.raises(InputError):
            LabelCodedSource('checkerboard', **kw)
    with pytest.raises(InputError):
        LabelCodedSource('waves')


def test_grow_and_shrink_move_the_band_towards_the_other_side():
    """A bright cube (10) on a dark ground (0, with a ramp): grow lifts the background shell of the given width
    towards the cube's value, clipped at b; shrink lowers the cube's own shell; nothing else moves."""
    seg = _seg((12, 12, 12), {1: np.s_[4:8, 4:8, 4:8], 2: np.s_[8:9, 4:8, 4:8]})
    image = np.where(seg > 0, 10.0, 0.0) + np.arange(12.0)[:, None, None] * 0.01
    budget = np.array([3.0])
    delta = BoundaryShiftSource('grow', width=2).compute_delta_raw(image[None], seg, budget, 'case')[0]
    fg = seg > 0
    assert np.all(delta[fg] == 0)
    assert delta[3, 5, 5] == pytest.approx(3.0) and delta[2, 5, 5] == pytest.approx(3.0)  # 1 and 2 voxels away
    assert np.all(delta[:2] == 0) and delta[4, 5, 1] == 0  # 3 voxels away
    assert np.all(delta >= 0) and np.abs(delta).max() <= 3.0
    assert np.array_equal(delta != 0, boundary_band(seg, 'grow', 2)[0])
    small = BoundaryShiftSource('grow', width=1).compute_delta_raw(image[None], seg, np.array([100.0]), 'case')[0]
    assert small[3, 5, 5] == pytest.approx(image[4, 5, 5] - image[3, 5, 5])  # unclipped: exactly the inner value
    assert small[2, 5, 5] == 0
    inner = BoundaryShiftSource('shrink', width=1).compute_delta_raw(image[None], seg, budget, 'case')[0]
    assert np.all(inner[~fg] == 0) and inner[4, 5, 5] == pytest.approx(-3.0) and inner[5, 5, 5] == 0
    assert inner[6, 6, 6] == 0  # two voxels deep
    assert np.array_equal(BoundaryShiftSource('shrink').support(seg), inner != 0)
    empty = BoundaryShiftSource('grow').compute_delta_raw(image[None], np.zeros_like(seg), budget, 'case')
    assert not empty.any()
    for kw in ({'method': 'grow', 'width': 0}, {'method': 'offset'}):
        with pytest.raises(InputError):
            BoundaryShiftSource(**kw)


def test_edge_codes_both_sides_of_the_boundary_and_nothing_else():
    """edge: +s_y b on the labels' inner band, -s_y b on the background's outer band (y: the nearest labelled
    voxel's class), 0 in the interior and far away; signs alternate per class unless --sign fixes one."""
    seg = _seg((12, 12, 12), {1: np.s_[3:9, 3:6, 3:9], 2: np.s_[3:9, 6:9, 3:9]})
    budget = np.array([2.0, 0.5])
    delta, support = EdgeSource(width=1).delta_and_support_raw(np.zeros((2, 12, 12, 12)), seg, budget, 'case')
    row = delta[0, 5, :, 5]  # along the second axis through both classes
    assert row[2] == -2 and row[3] == 2 and row[4] == 0  # label 1 (+): outside darker, inside brighter, interior 0
    assert row[8] == -2 and row[9] == 2 and row[7] == 0  # label 2 (-): inside darker, outside brighter
    assert row[0] == 0 and row[11] == 0 and np.array_equal(delta[1], delta[0] / 4)
    assert np.array_equal(support, delta[0] != 0)
    plus = EdgeSource(width=1, sign='plus').unit(seg)
    assert plus[5, 8, 5] == 1 and plus[5, 9, 5] == -1 and plus[5, 3, 5] == 1 and plus[5, 2, 5] == -1
    inner, outer = boundary_band(seg, 'shrink', 2)[0], boundary_band(seg, 'grow', 2)[0]
    wide = EdgeSource(width=2, sign='minus').unit(seg)
    assert np.all(wide[inner] == -1) and np.all(wide[outer] == 1) and np.all(wide[~inner & ~outer] == 0)
    assert not EdgeSource().unit(np.zeros_like(seg)).any()
    for kw in ({'width': 0}, {'sign': 'both'}):
        with pytest.raises(InputError):
            EdgeSource(**kw)


def _exported_deltas(env, out_id: int, args: list, eps: str = '16/255') -> list:
    """Export Hippocampus with ``args`` at ``eps``, check it with verify, and return (label, clean, delta, b) per
    case (delta = protected - clean in raw units, b = the case's raw budget); the copy is removed."""
    raw, name = env['nnUNet_raw'], env['dataset_name']
    src, out = raw / name, raw / f'Dataset{out_id}_HippocampusProtected'
    read = lambda path: sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # noqa: E731
    try:
        export.export_entry(['-d', '4', '-o', str(out_id), *args, '--eps', eps, '-device', 'cpu'])
        verify_entry([str(src), str(out), '--eps', eps])
        assert json.loads((out / 'dataset.json').read_text())['voxshield']['method'] == args[args.index('--method') + 1]
        cases = []
        for case in env['cases']:
            clean = read(src / 'imagesTr' / f'{case}_0000.nii.gz')
            delta = read(out / 'imagesTr' / f'{case}_0000.nii.gz').astype(np.float64) - clean.astype(np.float64)
            b = raw_budget(clean[None].astype(np.float64), float(Fraction(eps)))[0]
            cases.append((read(src / 'labelsTr' / f'{case}.nii.gz'), clean, delta, b))
        return cases
    finally:
        shutil.rmtree(out, ignore_errors=True)


@requires_hippocampus
def test_grow_export_passes_verify(hippocampus_env):
    """grow at 16/255 on real cases: verify passes, only the 2-voxel band outside the labels moves, towards the
    nearest labelled voxel's intensity."""
    for label, clean, delta, _ in _exported_deltas(hippocampus_env, 865, ['--method', 'grow', '--width', '2']):
        band, nearest = boundary_band(label, 'grow', 2)
        assert np.all(delta[~band] == 0) and np.count_nonzero(delta) > 100
        towards = np.sign(clean[nearest].astype(np.float64) - clean)
        assert np.all(np.sign(delta[delta != 0]) == towards[delta != 0])


@requires_hippocampus
def test_edge_export_passes_verify(hippocampus_env):
    """edge --sign plus at 16/255 on real cases: verify passes; +b on the labels' 1-voxel inner band, -b (or less
    where the image's minimum clips it) on the outer band, nothing else moves."""
    for label, clean, delta, b in _exported_deltas(hippocampus_env, 867, ['--method', 'edge', '--sign', 'plus']):
        inner, outer = boundary_band(label, 'shrink', 1)[0], boundary_band(label, 'grow', 1)[0]
        assert np.all(delta[~inner & ~outer] == 0) and inner.sum() > 100
        assert np.median(delta[inner]) > 0.9 * b and np.median(delta[outer]) < -0.9 * b
        assert np.all(delta[inner] >= 0) and np.all(delta[outer] <= 0)


@requires_hippocampus
def test_offset_sign_minus_export(hippocampus_env):
    """--sign minus through voxshield_export: every labelled voxel darkens by about b, nothing else moves."""
    for label, _, delta, b in _exported_deltas(hippocampus_env, 866, ['--method', 'offset', '--sign', 'minus']):
        assert np.all(delta[label == 0] == 0) and np.all(delta[label > 0] <= 0)
        assert np.median(delta[label > 0]) < -0.9 * b


@requires_hippocampus
def test_control_exports_pass_verify(hippocampus_env, capsys):
    """Each control on real cases at 16/255: verify passes at that eps, zero off the labels, signs as defined."""
    raw, name = hippocampus_env['nnUNet_raw'], hippocampus_env['dataset_name']
    src = raw / name
    with pytest.raises(SystemExit) as exc:
        export.export_entry(['-d', '4', '-o', '860', '--method', 'checkerboard', '--block', '0', '-device', 'cpu'])
    assert exc.value.code != 0 and '--block' in capsys.readouterr().err
    for out_id, method in ((861, 'offset'), (862, 'checkerboard'), (863, 'smooth'), (864, 'stripes'),
                           (865, 'diagonal')):
        out = raw / f'Dataset{out_id}_HippocampusProtected'
        try:
            export.export_entry(['-d', '4', '-o', str(out_id), '--method', method, '--eps', '16/255',
                                 '-device', 'cpu'])
            verify_entry([str(src), str(out), '--eps', '16/255'])
            assert json.loads((out / 'dataset.json').read_text())['voxshield']['method'] == method
            for case in hippocampus_env['cases']:
                label = sitk.GetArrayFromImage(sitk.ReadImage(str(src / 'labelsTr' / f'{case}.nii.gz')))
                clean = sitk.GetArrayFromImage(sitk.ReadImage(str(src / 'imagesTr' / f'{case}_0000.nii.gz')))
                prot = sitk.GetArrayFromImage(sitk.ReadImage(str(out / 'imagesTr' / f'{case}_0000.nii.gz')))
                delta = prot.astype(np.float64) - clean.astype(np.float64)
                b = raw_budget(clean[None].astype(np.float64), 16 / 255)[0]
                assert np.all(delta[label == 0] == 0) and np.abs(delta).max() <= b
                expected = LabelCodedSource(method).compute_delta_raw(clean[None], label, np.array([b]), case)[0]
                inside, large = label > 0, np.abs(expected) > 0.25 * b  # small values may round to 0 (uint8)
                agree = np.sign(delta[large]) == np.sign(expected[large])
                wrong = np.sign(delta[inside]) == -np.sign(expected[inside])
                assert large.sum() > 100 and agree.mean() > 0.95 and not wrong.any(), (method, case, agree.mean())
                if method != 'smooth':  # full amplitude up to rounding (and the image's own range)
                    assert np.median(np.abs(delta[inside])) > 0.9 * b
        finally:
            shutil.rmtree(out, ignore_errors=True)
