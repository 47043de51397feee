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
