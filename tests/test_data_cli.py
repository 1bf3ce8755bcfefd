"""`cmvae-data`: every command builds or verifies, every option has help, every error is one line and a non-zero exit."""
import os
import subprocess
import sys

import pytest

from cmvae.data import MANIFEST
from cmvae.data_cli import _parser, main
from cmvae.mnist import split_digits, synthetic_digits, write_mnist_idx
from cmvae.polymnist import PolyMNIST


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
    return write_mnist_idx(tmp_path_factory.mktemp('mnist'), *split_digits(synthetic_digits(100), 0.2))


def last_line(text: str) -> str:
    "The last line of stderr (progress bars come before it)."
    return text.strip().splitlines()[-1]


def run(*argv) -> subprocess.CompletedProcess:
    "`cmvae-data argv` in a fresh interpreter (as the console script runs it)."
    code = 'import sys; from cmvae.data_cli import main; main(sys.argv[1:])'
    return subprocess.run([sys.executable, '-c', code, *map(str, argv)], capture_output=True, text=True, env=os.environ.copy())


def test_polymnist_command_builds_a_loadable_set(idx_dir, tmp_path, capsys):
    main(['polymnist', '--root', str(tmp_path), '--source', str(idx_dir), '--modalities', '3', '--seed', '2'])
    out = capsys.readouterr().out
    assert f'PolyMNIST ready in {tmp_path / "PolyMNIST"}' in out and "'train': 80, 'test': 20" in out
    ds = PolyMNIST(tmp_path, 'train')
    assert ds.n_modalities == 3 and len(ds) == 80 and (tmp_path / 'PolyMNIST' / MANIFEST).exists()
    main(['polymnist', '--out', str(tmp_path / 'variant'), '--source', str(idx_dir), '--modalities', '2', '--backgrounds', 'ordinary'])
    assert PolyMNIST(tmp_path / 'variant', 'train').provenance['build']['backgrounds'] == ['coins', 'immunohistochemistry']


def test_polymnist_errors_are_one_line_without_traceback(idx_dir, tmp_path):
    bad = run('polymnist', '--root', tmp_path, '--source', idx_dir, '--modalities', 7)
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr
    assert last_line(bad.stderr) == ("cmvae-data polymnist: --modalities 7: the backgrounds 'default' give 5 photos (hubble_deep_field, "
                                  "rocket, retina, coffee, astronaut); pass between 1 and 5, or name one photo per modality with "
                                  "--backgrounds NAME,NAME,...")
    with pytest.raises(SystemExit, match=f'cmvae-data polymnist: MNIST folder not found: {tmp_path / "no-mnist"}'):
        main(['polymnist', '--root', str(tmp_path), '--source', str(tmp_path / 'no-mnist')])
    main(['polymnist', '--root', str(tmp_path), '--source', str(idx_dir), '--modalities', '2'])
    with pytest.raises(SystemExit, match='pass --overwrite'):
        main(['polymnist', '--root', str(tmp_path), '--source', str(idx_dir), '--modalities', '2', '--seed', '1'])
    with pytest.raises(SystemExit, match="photo 'no_such_photo'|'no_such_photo': neither"):
        main(['polymnist', '--root', str(tmp_path / 'x'), '--source', str(idx_dir), '--modalities', '1', '--backgrounds', 'no_such_photo'])


def test_verify_reports_counts_and_finds_a_planted_bad_file(idx_dir, tmp_path, capsys):
    main(['polymnist', '--root', str(tmp_path), '--source', str(idx_dir), '--modalities', '2'])
    main(['captioned', '--root', str(tmp_path), '--n', '24', '--source', str(idx_dir)])
    capsys.readouterr()
    main(['verify', str(tmp_path)])
    out = capsys.readouterr().out
    assert '2 modalities, 80 train + 20 test tuples, 10 classes; 205 files match SHA256SUMS' in out
    assert 'CaptionedShapes' in out and '16 train + 4 val + 4 test tuples, 8 classes' in out and 'verified 2 data sets' in out
    bad = tmp_path / 'PolyMNIST' / 'test' / 'm1' / '1.3.png'
    st = bad.stat()
    bad.write_bytes(bytes(255 - b for b in bad.read_bytes()))   # same size, other bytes, mtime put back
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(SystemExit, match=f'cmvae-data verify: {bad}: content differs from the SHA-256'):
        main(['verify', str(tmp_path)])
    (tmp_path / 'PolyMNIST' / MANIFEST).unlink()   # official data has no manifest: the image is decoded and found unreadable
    result = run('verify', tmp_path / 'PolyMNIST')
    assert result.returncode == 1 and last_line(result.stderr) == f'cmvae-data verify: {bad}: unreadable image (cannot identify image file {str(bad)!r})'


def test_every_option_has_help():
    sub = next(a for a in _parser()._actions if a.dest == 'command')
    assert set(sub.choices) == {'polymnist', 'captioned', 'fetch-mnist', 'verify'}
    for name, parser in sub.choices.items():
        for action in parser._actions:
            assert action.help, f'cmvae-data {name} {action.option_strings or action.dest}: no help text'
    usage = sub.choices['polymnist'].format_help()
    assert '--overwrite' in usage and '--backgrounds' in usage and 'ordinary' in usage
