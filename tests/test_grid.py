"""Grid runner, every path of the experiment notebook through papermill, the command lines, and the book built from the runs."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cmvae.grid
from cmvae.captioned import build_captioned
from cmvae.grid import GridError, load_grid, main, run_grid, select_runs
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
    spread = metrics['clustering']['selection_spread']   # the selection repeated on 20 posterior draws, draw 0 = the reported one
    assert spread['draws'] == len(spread['kept']) == 20 and spread['kept'][0] == metrics['clustering']['selected_clusters']
    assert spread['kept_min'] <= spread['kept_median'] <= spread['kept_max'] and sum(spread['counts'].values()) == 20
    assert metrics['coherence']['conditional'] is not None and metrics['generation']['fd_kind'] == 'clf-FD'
    assert metrics['scale']['n_train'] == 256 and metrics['scale']['device'] == 'cpu'
    # the executed notebook carries its outputs (figures) and the injected parameters
    cells = json.loads(nb.read_text())['cells']
    assert any('injected-parameters' in c['metadata'].get('tags', []) for c in cells)
    heading = next(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    assert heading.startswith('# Run polymnist-beta2.5-seed0 (tiny grid)'), heading   # its own page title in the book
    assert any(o.get('output_type') == 'display_data' for c in cells for o in c.get('outputs', []))
    # the page opens with the results: the summary cell (the first code cell) holds the headline table, the learning
    # curve and the samples, filled in at the end of the run; every code cell is folded
    code = [c for c in cells if c['cell_type'] == 'code']
    top = [o for o in code[0]['outputs'] if o.get('output_type') == 'display_data']
    assert '| NMI |' in ''.join(top[0]['data']['text/markdown']) and "Not the paper's scale" in ''.join(top[0]['data']['text/markdown'])
    assert 'image/png' in top[1]['data'] and 'image/png' in top[2]['data']
    assert all('hide-input' in c['metadata'].get('tags', []) for c in code)
    # no machine path: out_dir is relative to the project root, the rest is rewritten
    for path in (nb, root / 'book' / 'runs' / 'tiny' / 'polymnist-beta2.5-seed0.metrics.json'):
        text = path.read_text()
        assert str(root) not in text and not re.search(r'(?<![\w.~<>$])/(?:work|tmp|root|home)/', text), path
    assert '"out_dir": "runs/tiny/polymnist-beta2.5-seed0"' in nb.read_text()
    assert metrics['generation']['settings']['prior'] == 'pruned' and metrics['generation']['settings']['split'] == 'test'


def test_second_invocation_skips_complete_runs(project):
    root, grid, _ = project
    again = run_grid(grid, root=root)
    assert [r.status for r in again] == ['skipped']


def cli(module: str, *args, cwd) -> subprocess.CompletedProcess:
    "Run a command line (`cmvae-grid`, `cmvae-report`) as a user would: its own process, its exit status and its stderr."
    return subprocess.run([sys.executable, '-c', f'from cmvae.{module} import main; main()', *map(str, args)],
                          cwd=cwd, capture_output=True, text=True)


def test_report_command_builds_the_book(project):
    "`cmvae-report build` (strict: a Sphinx warning fails it) makes the book from the runs."
    root, _, _ = project
    assert len(load_runs(root, 'tiny')) == 1
    proc = cli('report', 'build', '--no-execute', cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    html = root / 'book' / '_build' / 'html'
    assert proc.stdout.strip().endswith(str(html / 'index.html'))
    assert (html / 'book' / 'runs' / 'tiny' / 'polymnist-beta2.5-seed0.html').exists()
    claim2 = (html / 'book' / 'claim2.html').read_text()
    assert 'tiny' in claim2 and 'polymnist' in claim2


def test_report_command_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from cmvae.report import main as report_main
    outside = cli('report', 'tables', cwd=tmp_path)
    assert outside.returncode == 1 and outside.stderr.startswith('cmvae-report: not inside a cmvae checkout'), outside.stderr
    assert 'Traceback' not in outside.stderr
    (tmp_path / 'p').mkdir()
    root = make_project(tmp_path / 'p')
    (root / 'book' / 'paper_numbers.yaml').write_text(': : :\n')
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as e: report_main(['tables'])
    assert str(e.value.code).startswith('cmvae-report: ') and 'paper_numbers.yaml: not valid YAML' in str(e.value.code)
    with pytest.raises(SystemExit) as e: report_main(['publish'])
    assert e.value.code == 2 and "invalid choice: 'publish'" in capsys.readouterr().err


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


def test_grid_command_line_errors(tmp_path, capsys):
    "A value of --only that no run has, and other bad input: one line naming what exists, a non-zero exit, no traceback."
    root = make_project(tmp_path)
    grid = root / 'g.yaml'
    grid.write_text('name: g\nbase: {epochs: 1}\ngrid: {beta: [1.0, 2.5]}\n')
    typo = cli('grid', grid, '--only', 'dataset=polymnsit', cwd=root)
    assert typo.returncode == 1 and typo.stderr.strip() == \
        'cmvae-grid: --only: no run has dataset=polymnsit; the values of dataset in this grid: polymnist', typo.stderr
    for args, message in [(['--only', 'beta=3'], 'no run has beta=3; the values of beta in this grid: 1.0, 2.5'),
                          (['--only', 'betta=1'], "unknown key 'betta'"),
                          (['--only', 'beta'], 'expects key=value'),
                          ([], None)]:
        with pytest.raises(SystemExit) as e:
            main([str(grid if args else root / 'missing.yaml'), *args])
        assert str(e.value.code).startswith('cmvae-grid: ') and (message or 'grid file not found') in str(e.value.code)
    assert 'Traceback' not in typo.stderr
    with pytest.raises(SystemExit) as e: main([str(grid), '--jobs', '0'])
    assert e.value.code == 2 and '--jobs must be 1 or more' in capsys.readouterr().err


def test_grid_command_line_defaults(tmp_path, monkeypatch, capsys):
    "--gpus is 0 unless the executor is slurm; --jobs with a submitit executor is ignored, with a warning."
    calls = []
    monkeypatch.setattr(cmvae.grid, 'run_grid', lambda grid_file, only, executor, jobs, **kw: calls.append((executor, jobs, kw['slurm'])) or [])
    main(['g.yaml']); main(['g.yaml', '--jobs', '2']); main(['g.yaml', '--executor', 'slurm', '--jobs', '3'])
    main(['g.yaml', '--executor', 'submitit-local']); main(['g.yaml', '--executor', 'slurm', '--gpus', '0'])
    assert [(e, j, s['gpus']) for e, j, s in calls] == [('local', 1, 0), ('local', 2, 0), ('slurm', 1, 1), ('submitit-local', 1, 0), ('slurm', 1, 0)]
    assert capsys.readouterr().err.count('--jobs is ignored with --executor slurm') == 1


# ---------------------------------------------------------------- the other paths of the experiment notebook
# a DDPM refiner on CMVAE, a generative baseline, a clustering baseline and the captioned data set: one tiny run each,
# two at a time (the DDPM run, the longest, first)
VARIANTS = """
name: variants
base: {n_modalities: 2, width: 0.0625, epochs: 1, n_train: 256, batch_size: 64, K: 1, n_clusters: 12, d_z: 8, d_w: 8,
       n_generate: 64, device: cpu, threads: 1}
experiments:
  - {base: {ddpm: true, ddpm_train_steps: 4, ddpm_sample_steps: 4, ddpm_strength: 0.5, ddpm_curve_every: 2, ddpm_n_eval: 32,
             ddpm_options: {block_out_channels: [8, 16], norm_groups: 4, log_every: 2}, prune: false}, grid: {seed: [1]}}
  - {base: {model: mmvae_plus}, grid: {seed: [0]}}
  - {base: {model: cmc}, grid: {seed: [0]}}
  - {base: {dataset: captioned, data_dir: DATA, n_modalities: null, n_train: null, n_clusters: 8, batch_size: 32}, grid: {seed: [0]}}
"""


@pytest.fixture(scope='module')
def variants(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp('variants'))
    data = tmp_path_factory.mktemp('captioned')
    build_captioned(data, n=96, seed=4)                              # 64 / 16 / 16 tuples
    grid = root / 'variants.yaml'
    grid.write_text(VARIANTS.replace('DATA', str(data)))
    results = run_grid(grid, root=root, jobs=2)
    def metrics(run_id):
        res = next(r for r in results if r.run_id == run_id)
        assert res.status == 'complete', res
        return json.loads((root / 'book' / 'runs' / 'variants' / f'{run_id}.metrics.json').read_text())
    return root, metrics


def _outputs(root, run_id) -> str:
    "Everything the executed notebook of a run printed."
    cells = json.loads((root / 'book' / 'runs' / 'variants' / f'{run_id}.ipynb').read_text())['cells']
    return ''.join(''.join(o.get('text', '')) for c in cells for o in c.get('outputs', []))


def test_ddpm_run(variants):
    root, metrics = variants
    m = metrics('polymnist-beta2.5-seed1')
    summary = m['ddpm']['summary']
    assert set(summary) == {f'{k}_{v}' for k in ('fd_unconditional', 'fd_conditional', 'coherence_unconditional',
                                                'coherence_conditional') for v in ('vae', 'refined')}
    assert all(isinstance(v, float) for v in summary.values())
    s = m['ddpm']['settings']
    assert s['ddpm']['steps'] == 4 and s['sample_steps'] == 4 and s['strength'] == 0.5 and s['n_eval'] == 32
    assert s['ddpm']['max_strength'] == 0.5 and s['ddpm']['block_out_channels'] == [8, 16]          # from ddpm_strength and ddpm_options
    assert [(p['step'], p['model']) for p in m['ddpm']['curve']] == [(0, 'CMVAE'), (2, 'refined'), (4, 'refined')]
    assert [r['step'] for r in m['ddpm']['log']] == [2, 4]
    for png in ('ddpm_samples', 'ddpm_curve'):                                                          # for the Claim 3 page
        assert (root / 'book' / 'runs' / 'variants' / f'polymnist-beta2.5-seed1.{png}.png').exists()
    assert 'pruning_curve' not in m['clustering'] and m['clustering']['selected_clusters'] == 12          # prune: false


def test_generative_baseline_run(variants):
    root, metrics = variants
    m = metrics('polymnist-mmvae_plus-beta2.5-seed0')
    assert m['config']['model'] == 'mmvae_plus' and m['training']['epochs_run'] == 1
    assert m['clustering']['selected_clusters'] == 10 and 0 <= m['clustering']['nmi'] <= 1   # k-means, the true k
    assert m['coherence']['conditional'] is not None and m['generation']['fd_kind'] == 'clf-FD'


def test_clustering_baseline_run(variants):
    root, metrics = variants
    m = metrics('polymnist-cmc-beta2.5-seed0')
    assert m['clustering']['settings']['modalities'] == [0, 1] and 0 <= m['clustering']['acc'] <= 1
    assert m['coherence'] == {} and m['generation'] == {} and m['training'] == {} and m['ddpm'] is None
    assert 'a clustering method generates nothing' in _outputs(root, 'polymnist-cmc-beta2.5-seed0')
    cells = json.loads((root / 'book' / 'runs' / 'variants' / 'polymnist-cmc-beta2.5-seed0.ipynb').read_text())['cells']
    summary = [o for o in next(c for c in cells if c['cell_type'] == 'code')['outputs'] if o.get('output_type') == 'display_data']
    assert 'image/png' in summary[1]['data']   # its training curve, like every other run's


def test_captioned_run(variants):
    root, metrics = variants
    m = metrics('captioned-beta2.5-seed0')
    assert m['scale']['data'] == 'CaptionedShapes (CUBICC-shaped stand-in)' and m['scale']['n_train'] == 64
    assert 1 <= m['clustering']['selected_clusters'] <= 8 and m['coherence'] == {}   # no coherence classifiers for captions
    assert 'from the image:' in _outputs(root, 'captioned-beta2.5-seed0')            # captions generated from images, decoded


def _notebook(source: str) -> dict:
    "A one-cell notebook with the metadata papermill needs."
    return {'cells': [{'id': 'c0', 'cell_type': 'code', 'metadata': {}, 'execution_count': None, 'outputs': [], 'source': source}],
            'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
                         'language_info': {'name': 'python'}}, 'nbformat': 4, 'nbformat_minor': 5}


def test_method_notebooks_execute_in_parallel_and_skip_unchanged(tmp_path):
    "Two kernels at a time: every notebook executed once, stamped, skipped when unchanged; a failure names its notebook."
    from cmvae.report import ReportError, execute_method_notebooks
    (tmp_path / 'nbs').mkdir()
    for name in ('00_a', '01_b', '02_c'):
        timing = tmp_path / f'{name}.times'   # when the cell ran, to see two kernels at work at once
        (tmp_path / 'nbs' / f'{name}.ipynb').write_text(json.dumps(_notebook(
            f'import time; t0 = time.time(); time.sleep(2); print("{name}"); open({str(timing)!r}, "w").write(f"{{t0}} {{time.time()}}")')))
    out = tmp_path / 'book' / '_generated' / 'method'
    done = execute_method_notebooks(tmp_path, jobs=2)
    assert [p.name for p in done] == ['00_a.ipynb', '01_b.ipynb', '02_c.ipynb']
    for name in ('00_a', '01_b', '02_c'):
        executed = json.loads((out / f'{name}.ipynb').read_text())
        assert ''.join(executed['cells'][0]['outputs'][0]['text']) == f'{name}\n'
    (a0, a1), (b0, b1) = (map(float, (tmp_path / f'{n}.times').read_text().split()) for n in ('00_a', '01_b'))
    assert max(a0, b0) < min(a1, b1), 'the first two notebooks did not run at the same time'
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob('*.ipynb')}
    execute_method_notebooks(tmp_path, jobs=2)   # nothing changed: nothing re-executed
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob('*.ipynb')}
    (tmp_path / 'nbs' / '01_b.ipynb').write_text(json.dumps(_notebook('raise ValueError("broken on purpose")')))
    with pytest.raises(ReportError, match=r'01_b.ipynb failed in cell .*ValueError: broken on purpose'):
        execute_method_notebooks(tmp_path, jobs=2)
    assert stamps['00_a.ipynb'] == (out / '00_a.ipynb').stat().st_mtime_ns   # the unchanged ones were not re-run


def test_parallel_runs_get_their_share_of_the_cores(tmp_path, monkeypatch):
    "With --jobs N every run's kernel is started with OMP/MKL/OpenBLAS threads = cores // N (unless the user set them); restored after."
    from cmvae.config import available_cores
    root = make_project(tmp_path)
    grid = root / 'two.yaml'
    grid.write_text(TINY.replace('name: tiny', 'name: two').replace('seed: [0]', 'seed: [0, 1]'))
    seen = []
    def fake_run(spec, root, extra=None):
        seen.append({k: cmvae.grid.os.environ.get(k) for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS')})
        return cmvae.grid.RunResult(spec.run_id, 'failed', 0.0, 'not run')
    monkeypatch.setattr(cmvae.grid, 'execute_run', fake_run)
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    run_grid(grid, root=root, jobs=2, log=lambda *a: None)
    share = str(max(1, available_cores() // 2))
    assert seen == [dict(OMP_NUM_THREADS=share, MKL_NUM_THREADS=share, OPENBLAS_NUM_THREADS=share)] * 2
    assert 'OMP_NUM_THREADS' not in cmvae.grid.os.environ
    monkeypatch.setenv('OMP_NUM_THREADS', '7')                      # the user's setting wins
    seen.clear(); run_grid(grid, root=root, jobs=2, log=lambda *a: None)
    assert all(s['OMP_NUM_THREADS'] == '7' for s in seen) and len(seen) == 2


def test_concurrent_kernels_start_in_their_own_folder(tmp_path):
    "kernel_cwd: notebooks executed at the same time from threads each run in their folder, and this process's cwd never moves (papermill's cwd= chdir'ed it, a race)."
    import concurrent.futures as cf
    import os
    import threading
    import nbformat
    import papermill as pm
    from cmvae.grid import kernel_cwd
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os, time\ntime.sleep(1.5)\nopen('cwd.txt', 'w').write(os.getcwd())")])
    nb.metadata.update(kernelspec=dict(name='python3', display_name='Python 3', language='python'), language_info=dict(name='python'))
    src = tmp_path / 'where.ipynb'
    nbformat.write(nb, src)
    folders = [tmp_path / f'f{i}' for i in range(3)]
    for f in folders: f.mkdir()
    start, seen, stop = os.getcwd(), set(), threading.Event()
    def watch():
        while not stop.is_set(): seen.add(os.getcwd()); stop.wait(0.01)
    watcher = threading.Thread(target=watch); watcher.start()
    try:
        with cf.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda f: pm.execute_notebook(str(src), str(f / 'out.ipynb'), progress_bar=False, **kernel_cwd(f)), folders))
    finally:
        stop.set(); watcher.join()
    assert [(f / 'cwd.txt').read_text() for f in folders] == [str(f) for f in folders]
    assert seen == {start}


def test_checkpoint_spreads_recompute_a_runs_selection(project, tmp_path):
    "cmvae-report spreads: a run without a spread gets one from its checkpoint; draw 0 must reproduce it and the validation data must be the run's."
    import shutil
    from cmvae.evidence import checkpoint_spreads
    from cmvae.results import ReportError
    root, _, _ = project
    run = root / 'book' / 'runs' / 'tiny' / 'polymnist-beta2.5-seed0.metrics.json'
    saved = run.read_text()
    m = json.loads(saved)
    ours = m['clustering'].pop('selection_spread')
    try:
        run.write_text(json.dumps(m))
        (e,) = checkpoint_spreads(root, grids=('tiny',), draws=4)
        assert e['reported'] == m['clustering']['selected_clusters'] and e['spread']['kept'] == ours['kept'][:4]   # same draws as the run's own
        m['data']['val']['digest'] = 'not-the-same'
        run.write_text(json.dumps(m))
        with pytest.raises(ReportError, match='is not the one the run saw'): checkpoint_spreads(root, grids=('tiny',), draws=1)
    finally:
        run.write_text(saved)
    assert checkpoint_spreads(root, grids=('tiny',)) == []   # runs with their own spread are left alone
