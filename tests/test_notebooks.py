"""Notebooks are the source: the exported library matches them, and library notebooks carry no outputs."""
import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / 'nbs').glob('*.ipynb'))


def _diff_trees(a: Path, b: Path) -> list:
    "Relative paths of .py files that differ between two trees, or exist in only one."
    fa = {p.relative_to(a) for p in a.rglob('*.py') if '__pycache__' not in p.parts}
    fb = {p.relative_to(b) for p in b.rglob('*.py') if '__pycache__' not in p.parts}
    return sorted(str(p) for p in fa ^ fb) + sorted(str(p) for p in fa & fb if not filecmp.cmp(a / p, b / p, shallow=False))


def test_library_is_in_sync_with_notebooks(tmp_path):
    "`nbdev_export` on a scratch copy reproduces `cmvae/` exactly (nothing edited by hand, export not forgotten)."
    for name in ('settings.ini', 'nbs', 'cmvae'):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    exporter = Path(sys.executable).parent / 'nbdev_export'
    subprocess.run([str(exporter)], cwd=tmp_path, check=True, capture_output=True)
    drift = _diff_trees(tmp_path / 'cmvae', ROOT / 'cmvae')
    assert not drift, f'cmvae/ differs from what nbdev_export makes from nbs/: {drift}. Edit the notebook, run nbdev_export, commit both.'


def test_library_notebooks_have_no_outputs():
    dirty = []
    for nb_path in NBS:
        nb = json.loads(nb_path.read_text(encoding='utf-8'))
        for i, cell in enumerate(nb['cells']):
            if cell['cell_type'] == 'code' and (cell.get('outputs') or cell.get('execution_count')):
                dirty.append(f'{nb_path.name} cell {i}')
    assert not dirty, f'library notebooks must be stored without outputs (run nbdev_clean --clear_all): {dirty[:10]}'


def test_notebooks_are_runnable_by_papermill():
    "papermill needs a kernelspec and language_info in every notebook's metadata."
    for nb_path in NBS:
        meta = json.loads(nb_path.read_text(encoding='utf-8'))['metadata']
        assert meta.get('kernelspec', {}).get('name') == 'python3', nb_path.name
        assert meta.get('language_info', {}).get('name') == 'python', nb_path.name
