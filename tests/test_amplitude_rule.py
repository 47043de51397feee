"""benchmarks/amplitude_rule.py: the logistic fit of Dice / clean against the code's ROI PSNR, and its CLI."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'
spec = importlib.util.spec_from_file_location('amplitude_rule', BENCH / 'amplitude_rule.py')
amp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(amp)


def test_fit_recovers_a_known_logistic_and_its_levels():
    x = np.linspace(15, 45, 13)
    x50, s = amp.fit_logistic(x, amp.logistic(x, 22.0, 3.0))
    assert x50 == pytest.approx(22.0, abs=1e-3) and s == pytest.approx(3.0, abs=1e-3)
    # the level's PSNR is the logistic's inverse: 0.05 sits s ln(19) below x50
    assert amp.level_psnr(22.0, 3.0, 0.05) == pytest.approx(22.0 - 3.0 * math.log(19))
    assert amp.logistic(amp.level_psnr(22.0, 3.0, 0.3), 22.0, 3.0) == pytest.approx(0.3)
    # started from elsewhere (the bootstrap's start), the same optimum
    assert amp.fit_logistic(x, amp.logistic(x, 22.0, 3.0), start=(30.0, 8.0))[0] == pytest.approx(22.0, abs=1e-3)
    with pytest.raises(ValueError, match='two PSNRs'):
        amp.fit_logistic([30.0, 30.0], [0.5, 0.6])


def _entry(victim, cell, psnr_roi, ratios):
    per_seed = lambda d: {'3d_fullres': {str(s): {'dice': x, 'dice_per_label': {'1': x, '2': x}}  # noqa: E731
                                         for s, x in enumerate(d)}}
    return {'victim': victim, 'cell': cell, 'report': {'rows': [
        {'row': 'clean', 'per_seed': per_seed([0.8] * len(ratios))},
        {'row': 'protected', 'per_seed': per_seed([0.8 * r for r in ratios]),
         'quality': {'psnr': {'mean': psnr_roi + 13.0}, 'psnr_roi': {'mean': psnr_roi}}}]}}


def test_cli_fits_the_family_lists_the_others_and_reports_the_goal(tmp_path):
    truth = lambda x: float(amp.logistic(x, 22.0, 3.0))  # noqa: E731
    ev = {f'o{e}': _entry('stock', f'offset@{e}/255', x, [truth(x) - 0.02, truth(x) + 0.02])
          for e, x in ((4, 44.0), (16, 31.0), (32, 25.0), (48, 21.4), (64, 19.0))}
    ev['cb'] = _entry('stock', 'checkerboard@64/255', 19.0, [0.64])  # an other code: listed, not fitted
    ev['noda'] = _entry('noda', 'offset@64/255', 19.0, [0.4])          # another victim: left out
    (tmp_path / 'map.json').write_text(json.dumps({'eval': ev}))
    done = subprocess.run([sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path), '--boot', '50'],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / 'amplitude_rule.json').read_text())
    fit = data['fit']
    assert fit['points'] == 10 and len(data['rows']) == 5 and fit['boot'] == 50
    assert fit['x50'] == pytest.approx(22.0, abs=0.1) and fit['s'] == pytest.approx(3.0, abs=0.2)
    assert fit['x50_ci'][0] <= fit['x50'] <= fit['x50_ci'][1]
    low = fit['levels']['0.05']
    assert low['psnr_roi'] == pytest.approx(22.0 - 3.0 * math.log(19), abs=0.6)
    # whole volume: ROI + the rows' 13 dB (labels 5% of the volume), + 20 dB at 1%, + 30 dB at 0.1%
    assert data['whole_minus_roi_db'] == pytest.approx(13.0) and data['label_fraction'] == pytest.approx(10 ** -1.3)
    assert low['psnr_whole']['hippocampus'] == pytest.approx(low['psnr_roi'] + 13.0)
    assert low['psnr_whole']['0.001'] == pytest.approx(low['psnr_roi'] + 30.0)
    assert [o['cell'] for o in data['others']] == ['checkerboard@64/255']
    assert data['others'][0]['residual'] == pytest.approx(0.64 - truth(19.0), abs=0.02)
    assert '| 0.05 |' in done.stdout and '| checkerboard@64/255 |' in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ['amplitude_rule.json', 'amplitude_rule.md',
                                                          'amplitude_rule.png', 'map.json']
    # --exclude repeats a fit without some cells: the lowest PSNR's cell left out, 8 points, the same truth
    left = subprocess.run([sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path), '--boot', '20',
                           '--exclude', 'offset@64/255', 'checkerboard@64/255'], capture_output=True, text=True)
    assert left.returncode == 0, left.stderr
    data = json.loads((tmp_path / 'amplitude_rule.json').read_text())
    assert data['fit']['points'] == 8 and data['others'] == [] and data['excluded'] == ['checkerboard@64/255',
                                                                                        'offset@64/255']
    assert data['fit']['x50'] == pytest.approx(22.0, abs=0.2) and 'Left out: checkerboard@64/255' in left.stdout
    noboot = subprocess.run([sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path), '--boot', '0'],
                            capture_output=True, text=True)
    assert noboot.returncode == 0, noboot.stderr
    assert json.loads((tmp_path / 'amplitude_rule.json').read_text())['fit']['x50_ci'] is None
    assert '(5-95%: –)' in noboot.stdout
    bad = subprocess.run([sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path / 'nope')],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and 'map.json: cannot read the protection map' in bad.stderr
    none = subprocess.run([sys.executable, str(BENCH / 'amplitude_rule.py'), '-o', str(tmp_path), '--victim', 'adam'],
                          capture_output=True, text=True)
    assert none.returncode != 0 and 'adam rows of' in none.stderr and 'two PSNRs' in none.stderr
