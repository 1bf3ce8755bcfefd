"""Grid runner, experiment notebook through papermill, and the book built from the runs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmvae.grid import GridError, load_grid, run_grid, select_runs
from cmvae.report import build_book
from cmvae.results import load_runs

ROOT = Path(__file__).resolve().parents[1]

# one tiny run as the default grid's (two modalities): 1 epoch on 256 tuples at width 1/16, a handful of generated samples
TINY = """
name: tiny
base: {n_modalities: 2, width: 0.0625, epochs: 1, n_train: 256, batch_size: 64, K: 1, n_clusters: 12, d_z: 8, d_w: 8,
       n_generate: 64, device: cpu, threads: 1}
grid: {beta: [2.5], seed: [0]}
"""


def make_project(tmp: Path) -> Path:
    "A throw-away project root with the experiment notebook, the book pages and a toc without the method chapter."
    (tmp / 'nbs').mkdir()
    shutil.copy(ROOT / 'nbs' / 'experiment.ipynb', tmp / 'nbs')
    shutil.copy(ROOT / 'settings.ini', tmp)
    shutil.copy(ROOT / '_config.yml', tmp)
    shutil.copytree(ROOT / 'book', tmp / 'book', ignore=shutil.ignore_patterns('_build', '_generated', 'runs'))
    toc = (ROOT / '_toc.yml').read_text()
    head, _, rest = toc.partition('  - caption: Method')
    tail = rest[rest.index('  - caption: About'):]
    (tmp / '_toc.yml').write_text(head + tail)
    return tmp


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp('proj'))
    grid = root / 'tiny.yaml'
    grid.write_text(TINY)
    results = run_grid(grid, root=root)
    return root, grid, results


def test_tiny_grid_runs_through_papermill(project):
    root, grid, results = project
    assert [r.status for r in results] == ['complete'], results
    nb = root / 'book' / 'runs' / 'tiny' / 'polymnist-beta2.5-seed0.ipynb'
    metrics = json.loads((root / 'book' / 'runs' / 'tiny' / 'polymnist-beta2.5-seed0.metrics.json').read_text())
    assert nb.exists() and metrics['status'] == 'complete'
    assert metrics['config']['beta'] == 2.5 and metrics['config']['width'] == 0.0625
    assert metrics['config']['n_modalities'] == 2 and len(metrics['classifiers']['test_accuracy']) == 2
    for key in ('nmi', 'ari', 'acc', 'selected_clusters'): assert key in metrics['clustering']
    assert 1 <= metrics['clustering']['selected_clusters'] <= 12
    assert metrics['coherence']['conditional'] is not None and metrics['generation']['fd_kind'] == 'clf-FD'
    assert metrics['scale']['n_train'] == 256 and metrics['scale']['device'] == 'cpu'
    # the executed notebook carries its outputs (figures) and the injected parameters
    cells = json.loads(nb.read_text())['cells']
    assert any('injected-parameters' in c['metadata'].get('tags', []) for c in cells)
    heading = next(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    assert heading.startswith('# Run polymnist-beta2.5-seed0 (tiny grid)'), heading   # its own page title in the book
    assert any(o.get('output_type') == 'display_data' for c in cells for o in c.get('outputs', []))


def test_second_invocation_skips_complete_runs(project):
    root, grid, _ = project
    again = run_grid(grid, root=root)
    assert [r.status for r in again] == ['skipped']


def test_book_builds_from_the_runs(project):
    root, _, _ = project
    assert len(load_runs(root, 'tiny')) == 1
    index = build_book(root, strict=True, execute=False)
    html = root / 'book' / '_build' / 'html'
    assert index.exists()
    assert (html / 'book' / 'runs' / 'tiny' / 'polymnist-beta2.5-seed0.html').exists()
    claim2 = (html / 'book' / 'claim2.html').read_text()
    assert 'tiny' in claim2 and 'polymnist' in claim2


def test_failing_run_is_reported_and_others_complete(tmp_path):
    root = make_project(tmp_path)
    grid = root / 'mixed.yaml'
    # seed 1 asks for a CUDA device this machine does not have: valid config, fails at run time
    grid.write_text("""
name: mixed
base: {n_modalities: 2, width: 0.0625, epochs: 1, n_train: 128, batch_size: 64, K: 1, n_clusters: 12, d_z: 8, d_w: 8,
       n_generate: 32, threads: 1, prune: false}
experiments:
  - {base: {device: cpu}, grid: {seed: [0]}}
  - {base: {device: 'cuda:7'}, grid: {seed: [1]}}
""")
    proc = subprocess.run([sys.executable, '-c', 'from cmvae.grid import main; main()', str(grid)],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode != 0
    assert 'FAILED polymnist-beta2.5-seed1' in proc.stdout and 'CUDA is not available' in proc.stdout
    assert (root / 'book' / 'runs' / 'mixed' / 'polymnist-beta2.5-seed0.metrics.json').exists()
    assert not (root / 'book' / 'runs' / 'mixed' / 'polymnist-beta2.5-seed1.metrics.json').exists()


def test_submitit_local_executor(tmp_path):
    root = make_project(tmp_path)
    grid = root / 'sub.yaml'
    grid.write_text(TINY.replace('name: tiny', 'name: sub').replace('n_train: 256', 'n_train: 128'))
    results = run_grid(grid, root=root, executor='submitit-local', slurm=dict(gpus=0, cpus=1, time_min=20))
    assert [r.status for r in results] == ['complete'], results
    assert list((root / 'runs' / 'sub' / '_submitit').glob('*_result.pkl'))


def test_bad_grid_files(tmp_path):
    bad = {
        'top: 1\n': "unknown top-level key(s) ['top']",
        'base: {epochs: 0}\n': 'CMVAEConfig.epochs',
        'base: {lr_rate: 0.1}\n': "unknown key(s) ['lr_rate']",
        'grid: {beta: 2.5}\n': "grid key 'beta' must be a non-empty list",
        'base: {data_dir: /does/not/exist}\n': 'key data_dir: folder /does/not/exist does not exist',
        'name: a b\n': 'name must be letters',
        'grid: {seed: [0, 0]}\n': 'share the id',
        ': : :\n': 'not valid YAML',
    }
    for text, message in bad.items():
        path = tmp_path / 'bad.yaml'
        path.write_text(text)
        with pytest.raises(GridError, match=None) as e:
            load_grid(path)
        assert message in str(e.value) and str(path) in str(e.value), (text, str(e.value))
    with pytest.raises(GridError, match='grid file not found'):
        load_grid(tmp_path / 'missing.yaml')


def test_shipped_grid_files_are_valid():
    for path in sorted((ROOT / 'parameters').glob('*.yaml')):
        name, runs = load_grid(path, check_data=False)
        assert runs and name == path.stem
    name, runs = load_grid(ROOT / 'parameters' / 'default.yaml')
    assert len({r.config.beta for r in runs}) >= 2 and len({r.config.seed for r in runs}) >= 2
    _, paper = load_grid(ROOT / 'parameters' / 'paper.yaml', check_data=False)
    assert {r.config.dataset for r in paper} == {'polymnist', 'cubicc'} and len(paper) == 30
    assert len(select_runs(paper, 'dataset=polymnist,beta=2.5')) == 5
