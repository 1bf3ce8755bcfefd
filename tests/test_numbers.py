"""Every number of the book's prose comes from data: no hand-typed number in the verdicts, claim pages, intro or
runs and cost pages, every placeholder readable, and no machine path in a committed file under book/."""
import re
import subprocess
from pathlib import Path

import pytest

from cmvae.numbers import MissingData, Numbers, PLACEHOLDER, hand_typed_numbers, quote
from cmvae.results import load_paper_numbers, load_runs

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / 'book'
PROSE = sorted((BOOK / 'verdicts').glob('*.md')) + sorted(BOOK.glob('claim*.md')) + [BOOK / p for p in ('intro.md', 'runs.md', 'cost.md')]
COMMITTED_GRIDS = ('baselines', 'claim3', 'captioned', 'cpu-long', 'cpu-long-ordinary')   # executed grids shipped under book/runs/


def test_pages_carry_no_hand_typed_number():
    found = {p.relative_to(ROOT).as_posix(): hand_typed_numbers(p.read_text()) for p in PROSE if p.exists()}
    found = {k: v for k, v in found.items() if v}
    assert not found, ('numbers typed by hand (write a placeholder, see DEVELOPING.md "Numbers in the book come from '
                       f'data"): {found}')


def test_the_check_finds_a_typed_number(tmp_path):
    "The check above can fail: the stale coherence of an old verdict is found, the same number as a placeholder is not."
    assert hand_typed_numbers('CMVAE β = 1 (2 seeds): coherence 0.57') == [(1, '2'), (1, '0.57')]
    assert hand_typed_numbers('CMVAE β = 1: coherence {{ ours default/polymnist/cmvae/1 coherence_unconditional }}') == []


@pytest.fixture(scope='module')
def numbers():
    return Numbers.from_runs(load_runs(ROOT), load_paper_numbers(ROOT))


def test_every_placeholder_reads(numbers):
    "Every placeholder of the templates parses; those that name a committed grid or the paper find their number."
    refs = [(p.name, m.group(1)) for p in PROSE if p.exists() for m in PLACEHOLDER.finditer(p.read_text())]
    assert len(refs) > 20
    unresolved = []
    for page, ref in refs:
        if ref.startswith('table '): continue   # generated tables exist only after a build
        try: quote(numbers, ref)
        except MissingData:
            if ref.split()[0] == 'paper' or ref.split()[1].split('/')[0] in COMMITTED_GRIDS: unresolved.append((page, ref))
    assert not unresolved, f'placeholders that name committed runs or the paper but find nothing: {unresolved}'


MACHINE_PATH = re.compile(r'(?<![\w.~<>$])/(?:work|tmp|root|home)/')


def committed_files(folder: Path) -> list:
    "Files of `folder` that git tracks (every file outside build outputs when this is not a git checkout)."
    try:
        out = subprocess.run(['git', 'ls-files', '-z', str(folder)], cwd=ROOT, capture_output=True, check=True)
        return [ROOT / p for p in out.stdout.decode().split('\0') if p]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in folder.rglob('*') if p.is_file() and not {'_build', '_generated', 'default'} & set(p.parts)]


def test_no_machine_path_in_committed_book_files():
    files = committed_files(BOOK) + committed_files(ROOT / 'bench')   # the book's runs, and the benchmarks' results
    assert any(p.suffix == '.ipynb' for p in files) and any(p.parent.name == 'results' for p in files)
    bad = {p.relative_to(ROOT).as_posix(): sorted(set(MACHINE_PATH.findall(p.read_text(errors='ignore'))))
           for p in files if p.suffix in ('.ipynb', '.json', '.md', '.yaml', '.txt') and MACHINE_PATH.search(p.read_text(errors='ignore'))}
    assert not bad, f'machine paths in committed files (cmvae.grid.make_portable rewrites them): {bad}'


def test_the_path_check_finds_a_path():
    assert MACHINE_PATH.search('{"input_path": "/work/main/nbs/experiment.ipynb"}')
    assert not MACHINE_PATH.search('"out_dir": "runs/baselines/x", "data_dir": "$CMVAE_DATA", see https://example.org/home/')
