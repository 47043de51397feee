"""benchmarks/code_survival.py: the per-sample share of a code that an augmentation keeps."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from nnunetv2_voxshield.controls import LabelCodedSource

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'
spec = importlib.util.spec_from_file_location('code_survival', BENCH / 'code_survival.py')
cs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cs)


def _case():
    rng = np.random.default_rng(0)
    x = gaussian_filter(rng.standard_normal((24, 24, 24)), 2.0) * 5 + rng.standard_normal((24, 24, 24)) * 0.1
    seg = np.zeros((24, 24, 24), dtype=np.int16)
    seg[6:18, 6:12, 6:18], seg[6:18, 12:18, 6:18] = 1, 2
    return x, seg


@pytest.mark.parametrize('method, texture', [('checkerboard', True), ('offset', False)])
def test_identity_keeps_everything_and_blur_erases_only_the_fine_code(method, texture):
    x, seg = _case()
    delta = LabelCodedSource(method).compute_delta_raw(x[None], seg, np.array([0.3]), 'c')[0]
    assert cs.survival(x, delta, seg, x, x + delta, seg, texture) == pytest.approx((1.0, 1.0))
    blur = lambda v: gaussian_filter(v, 1.0)  # noqa: E731  (a linear T: blur with sigma 1 voxel)
    retained, readable = cs.survival(x, delta, seg, blur(x), blur(x + delta), seg, texture)
    if texture:  # a period-2 checkerboard keeps exp(-2 pi^2 sigma^2 |f|^2) ~ 4e-7 of its amplitude
        assert retained < 0.01 and readable < retained * 10
    else:  # a constant per class keeps most of it (only the class boundaries blur)
        assert 0.7 < retained < 1.0
    # a T that halves the image (brightness) halves the code but not its readability against the image
    assert cs.survival(x, delta, seg, x / 2, (x + delta) / 2, seg, texture) == pytest.approx((0.5, 1.0))


def test_no_labels_after_T_is_not_a_sample():
    x, seg = _case()
    delta = LabelCodedSource('offset').compute_delta_raw(x[None], seg, np.array([0.3]), 'c')[0]
    assert all(np.isnan(cs.survival(x, delta, seg, x, x + delta, np.zeros_like(seg), False)))


def test_crop_around_centres_and_pads():
    a = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    (c,) = cs.crop_around((a,), (2, 3, 3), (3, 3, 3))
    assert c.shape == (3, 3, 3) and c[1, 1, 1] == a[2, 3, 3] and np.array_equal(c, a[1:4, 2:5, 2:5])
    (edge,) = cs.crop_around((a,), (0, 0, 0), (4, 4, 4))  # centre at the corner: zeros outside the array
    assert edge.shape == (4, 4, 4) and edge[2, 2, 2] == a[0, 0, 0] and edge[0].sum() == 0


def test_combined_table_puts_each_pipeline_in_a_column(tmp_path):
    import json
    run = lambda shares: {'summary': {c: {'retained': {'below_0.5': v}} for c, v in shares.items()}}  # noqa: E731
    (tmp_path / 'code_survival.json').write_text(json.dumps(run({'checkerboard': 0.48, 'offset': 0.0})))
    (tmp_path / 'code_survival_without_spatial.json').write_text(json.dumps(run({'checkerboard': 0.19})))
    table = cs.combined_table(tmp_path).split('\n')
    assert table[2] == '| code | stock | without spatial |'
    assert table[4:] == ['| checkerboard | 0.48 | 0.19 |', '| offset | 0.00 | - |']
