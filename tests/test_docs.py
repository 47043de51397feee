"""The generated docs: docs/results.md and the marked blocks of README.md and docs/*.md are what
benchmarks/render_docs.py renders from benchmarks/results/*.json (byte for byte), and every results file says how it
was made."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('render_docs', ROOT / 'benchmarks' / 'render_docs.py')
render_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_docs)

FRESH = 'python benchmarks/render_docs.py --no-figures'


def test_every_results_file_has_provenance():
    assert render_docs.missing_provenance() == []


def test_missing_provenance_is_named(tmp_path):
    (tmp_path / 'a_2026-01-01.json').write_text(json.dumps({'x': 1}))
    (tmp_path / 'b_2026-01-01.json').write_text(json.dumps({'provenance': {'command': 'c', 'commit': 'abc',
                                                                           'date': '2026-01-01', 'machine': ''}}))
    (tmp_path / 'c_2026-01-01.json').write_text(json.dumps({'provenance': {'command': ['c'], 'commit': 'abc',
                                                                           'date': '2026-01-01', 'machine': 'm'}}))
    assert render_docs.missing_provenance(tmp_path) == ['a_2026-01-01.json', 'b_2026-01-01.json']


def test_committed_docs_equal_the_rendered_ones():
    rendered = render_docs.render_all()
    assert ROOT / 'docs' / 'results.md' in rendered and ROOT / 'README.md' in rendered
    for path, text in rendered.items():
        assert path.read_text() == text, f'{path.relative_to(ROOT)} is out of date: run {FRESH}'


def test_readme_numbers_come_from_blocks():
    readme = (ROOT / 'README.md').read_text()
    names = render_docs.MARK.findall(readme)
    assert {'status', 'timing'} <= {n[1] for n in names}
    assert 'not measured yet' not in readme.split('<!-- results:status -->')[1].split('<!-- /results -->')[0]
    assert len(readme.splitlines()) <= 260


def test_readme_keeps_the_two_fresh_machine_commands():
    readme = (ROOT / 'README.md').read_text()
    assert 'pip install torch==2.14.1 torchvision==0.29.1 -e . && bash examples/demo.sh' in readme
    assert ('pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]" && python -m pytest -q -p no:cacheprovider'
            in readme)


def test_results_md_has_its_sections_and_figures():
    text = (ROOT / 'docs' / 'results.md').read_text()
    for title in ('Status', 'The amplitude rule', 'Purifications', 'Provenance',
                  'Predictions written before each run, beside the result'):
        assert f'\n## {title}\n' in text
    for name in ('frontier', 'amplitude_rule', 'perturbations'):
        png = ROOT / 'docs' / 'figures' / f'{name}.png'
        assert png.is_file() and png.stat().st_size > 20_000, png
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert f'figures/{name}.png' in text or name == 'perturbations'


def test_missing_results_render_what_exists(tmp_path):
    """Sections whose JSON is absent (e.g. ACDC before its runs) are left out; a marked block says so."""
    results = tmp_path / 'results'
    results.mkdir()
    shutil.copy(ROOT / 'benchmarks' / 'results' / 'probe_2026-12-01.json', results)
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'README.md').write_text('a\n<!-- results:status -->\nold\n<!-- /results -->\nb\n')
    out = render_docs.render_all(root=tmp_path, results=results)
    md = out[tmp_path / 'docs' / 'results.md']
    assert '## Learnability probe' in md and '## Status' not in md and '## The amplitude rule' not in md
    assert '0.51 / -0.03 / 0.07 / -0.00 / -0.07' in md  # the probe's cosine per epoch, from the JSON
    assert out[tmp_path / 'README.md'] == 'a\n<!-- results:status -->\n*(not measured yet)*\n<!-- /results -->\nb\n'


def test_a_new_section_lands_in_results_md(tmp_path, monkeypatch):
    results = tmp_path / 'results'
    results.mkdir()
    (results / 'acdc_demo_2026-12-07.json').write_text(json.dumps({'dice': 0.912}))
    monkeypatch.setattr(render_docs, 'SECTIONS', list(render_docs.SECTIONS))
    monkeypatch.setattr(render_docs, 'BLOCKS', dict(render_docs.BLOCKS))

    @render_docs.section('ACDC demo')
    def acdc_demo(r):
        data = r.get('acdc_demo_*.json')
        return None if data is None else f'Dice {data["dice"]:.2f}'

    md = render_docs.render_all(root=tmp_path, results=results)[tmp_path / 'docs' / 'results.md']
    assert '## ACDC demo\n\nDice 0.91\n' in md


def test_unknown_block_is_an_error(tmp_path):
    (tmp_path / 'README.md').write_text('<!-- results:no_such_block -->\n<!-- /results -->\n')
    with pytest.raises(KeyError, match='no_such_block'):
        render_docs.render_all(root=tmp_path, results=tmp_path)


def test_an_audit_report_renders_its_verdict(tmp_path):
    results = tmp_path / 'results'
    results.mkdir()
    report = {'verdict': ['Does not protect: 2 of 2 exploiters keep >= 0.9 of clean Dice'],
              'copies': [{'name': 'offset64', 'exploiters': [
                  {'name': 'stock', 'ratio': {'ratio': 0.27, 'ci': [0.21, 0.33], 'per_seed': [0.31, 0.23]},
                   'status': 'protects', 'cost': None},
                  {'name': 'blur', 'failed': 'exit 1'}]}]}
    (results / 'audit_demo_2026-12-07.json').write_text(json.dumps(report))
    md = render_docs.render_all(root=tmp_path, results=results)[tmp_path / 'docs' / 'results.md']
    assert '**Does not protect: 2 of 2 exploiters keep >= 0.9 of clean Dice**' in md
    assert '| offset64 | stock | 0.27 [0.21, 0.33] | 0.31 / 0.23 | protects | – | – |' in md
    assert '| offset64 | blur | failed: exit 1 |' in md


def test_an_audit_report_renders_its_predictions_purified_ones_too(tmp_path):
    results = tmp_path / 'results'
    results.mkdir()
    rows = [{'cell': 'conv:strength=1.3956', 'psnr_roi': 25.01, 'predicted_ratio': {'stock': 0.7213},
             'expected_noda': '0.5-1.0 (why)', 'written': '2026-12-07T03:39Z'},
            {'cell': 'conv:strength=1.3956+blur', 'defence': 'blur', 'psnr_roi': 25.01, 'predicted_ratio': None,
             'predicted_stock': {'text': '0.9-1.0 (undone)'}, 'written': '2026-12-07T20:36Z'}]
    (tmp_path / 'pred.json').write_text(json.dumps({'rows': rows}))
    report = {'verdict': [], 'predictions_file': str(tmp_path / 'pred.json'),
              'copies': [{'name': 'conv25dB', 'exploiters': [
                  {'name': 'blur', 'ratio': {'ratio': 0.84, 'ci': None, 'per_seed': [0.86, 0.82]}, 'status': 'no',
                   'cost': {'ratio': 0.93, 'per_seed': [0.95, 0.91]}}]}]}
    (results / 'audit_demo_2026-12-07.json').write_text(json.dumps(report))
    md = render_docs.render_all(root=tmp_path, results=results)[tmp_path / 'docs' / 'results.md']
    assert ('conv:strength=1.3956 at 25.0 dB ROI: stock 0.72, no augmentation 0.5-1.0 (written 2026-12-07T03:39Z); '
            'conv:strength=1.3956+blur at 25.0 dB ROI: stock 0.9-1.0 (written 2026-12-07T20:36Z).') in md
    assert '| conv25dB | blur | 0.84 | 0.86 / 0.82 | no | 0.93 | 0.91 / 0.90 |' in md   # 0.86 / 0.95, 0.82 / 0.91


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    import re
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_links_between_the_docs_resolve():
    import re
    pages = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))
    for page in pages:
        for target, anchor in re.findall(r'\]\(([\w./-]*\.md|[\w./-]*\.png|)(?:#([\w-]+))?\)', page.read_text()):
            path = (page.parent / target) if target else page
            assert path.is_file(), f'{page.name}: link to missing {target}'
            if anchor and path.suffix == '.md':
                slugs = {_slug(h) for h in re.findall(r'^#+ (.+)$', path.read_text(), re.M)}
                assert anchor in slugs, f'{page.name}: no heading #{anchor} in {path.name}'
