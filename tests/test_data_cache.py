"""The decoded-image cache cannot go stale: any change to any image is seen, rebuilds replace what was cached,
and unchanged data is still served from the cache; `data_fingerprint` tells runs on different data apart."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import cmvae.polymnist as pm
from cmvae.data import DataError, data_fingerprint
from cmvae.data_cli import main
from cmvae.mnist import split_digits, synthetic_digits, write_mnist_idx
from cmvae.polymnist import (ORDINARY_BACKGROUNDS, PolyMNIST, build_polymnist, decode_polymnist_split, read_polymnist_split,
                             scan_polymnist_split)


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
    return write_mnist_idx(tmp_path_factory.mktemp('mnist'), *split_digits(synthetic_digits(160), 0.25))


@pytest.fixture
def built(idx_dir, tmp_path):
    "A 3-modality PolyMNIST (120 train / 40 test tuples), read once so that its cache exists."
    folder = build_polymnist(tmp_path, source=idx_dir, n_modalities=3, seed=0)
    PolyMNIST(folder, 'train')
    assert len(list((folder / '.cache').glob('train-3m-*.npy'))) == 1
    return folder


def fresh(folder, split='train'):
    "The images of a split decoded straight from the PNGs, no cache involved."
    return decode_polymnist_split(scan_polymnist_split(folder / split))


def test_corrupt_image_in_the_middle_is_reported_not_served(built):
    names = scan_polymnist_split(built / 'train')['names']
    victim = built / 'train' / 'm1' / names[len(names) // 3]   # neither the first nor the last file of its folder
    victim.write_bytes(b'this is not a png')
    with pytest.raises(DataError, match=f'{victim}: unreadable image'):
        PolyMNIST(built, 'train')


def test_same_size_change_with_mtime_put_back_is_seen(built):
    "What `cp -p` of another image of the same size does: the size and the mtime are unchanged, the ctime is not."
    names = scan_polymnist_split(built / 'train')['names']
    n = 5
    victim = built / 'train' / 'm2' / names[n]
    Image.open(victim).save(victim, compress_level=0)          # uncompressed: the file size depends only on the shape
    before = PolyMNIST(built, 'train').modalities[2][n].clone()
    st = victim.stat()
    Image.fromarray(255 - before.permute(1, 2, 0).numpy()).save(victim, compress_level=0)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = PolyMNIST(built, 'train').modalities[2][n]
    assert (after == 255 - before).all()
    assert len(list((built / '.cache').glob('train-3m-*.npy'))) == 1   # the stale cache file was replaced


def test_cache_is_used_when_nothing_changed(built, monkeypatch):
    first = PolyMNIST(built, 'train')
    def no_decoding(scan): raise AssertionError('images decoded although no file changed')
    monkeypatch.setattr(pm, 'decode_polymnist_split', no_decoding)
    again = PolyMNIST(built, 'train')
    assert all((a == b).all() for a, b in zip(first.modalities, again.modalities))
    assert again.provenance['files_key'] == first.provenance['files_key']


def test_overwrite_with_another_seed_serves_the_new_pixels(idx_dir, tmp_path, capsys):
    cache = tmp_path / 'elsewhere'   # a cache outside the folder survives the rebuild: only its key protects it
    main(['polymnist', '--root', str(tmp_path), '--source', str(idx_dir), '--modalities', '2', '--seed', '0'])
    folder = tmp_path / 'PolyMNIST'
    old, _ = read_polymnist_split(folder / 'train', cache_dir=cache)
    main(['polymnist', '--root', str(tmp_path), '--source', str(idx_dir), '--modalities', '2', '--seed', '1', '--overwrite'])
    assert 'PolyMNIST ready' in capsys.readouterr().out
    new, _ = read_polymnist_split(folder / 'train', cache_dir=cache)
    assert (new == fresh(folder)).all() and (new != old).any()
    assert len(list(cache.glob('train-2m-*.npy'))) == 1


def test_builder_overwrite_removes_the_old_cache(built, idx_dir, tmp_path):
    build_polymnist(tmp_path, source=idx_dir, n_modalities=3, seed=5, overwrite=True)
    assert not (built / '.cache').exists()
    assert PolyMNIST(built, 'train').provenance['build']['seed'] == 5


def test_fingerprint_tells_runs_on_different_data_apart(built, idx_dir, tmp_path):
    splits = {s: PolyMNIST(built, s) for s in ('train', 'val', 'test')}
    fp = data_fingerprint(splits)
    assert fp['train']['n'] == 120 and fp['test']['n'] + fp['val']['n'] == 40 and fp['train']['classes'] == 10
    assert fp['train']['build']['seed'] == 0 and fp['train']['folder'] == str(built) and len(fp['train']['files_key']) == 16
    assert data_fingerprint({s: PolyMNIST(built, s) for s in splits}) == fp   # same data, same fingerprint
    other = build_polymnist(tmp_path / 'b', source=idx_dir, n_modalities=3, seed=1)
    fp_other = data_fingerprint({'train': PolyMNIST(other, 'train')})
    assert fp_other['train']['digest'] != fp['train']['digest']
    assert data_fingerprint({'train': splits['train'].subset(np.arange(10))})['train']['n'] == 10


def test_ordinary_variant_is_what_a_run_reads_through_data_dir(idx_dir, tmp_path):
    from cmvae.train import CMVAEConfig, load_splits
    folder = build_polymnist(tmp_path, source=idx_dir, n_modalities=2, backgrounds='ordinary')
    assert folder == tmp_path / 'PolyMNIST-ordinary'
    splits = load_splits(CMVAEConfig(data_dir=str(folder), n_modalities=2, epochs=1))
    assert splits['train'].provenance['build']['backgrounds'] == list(ORDINARY_BACKGROUNDS[:2])
    assert len(splits['train']) == 120 and splits['train'].n_modalities == 2


def test_missing_modality_names_found_and_expected(built):
    shutil.rmtree(built / 'train' / 'm1')
    with pytest.raises(DataError, match=r'modality folder m1 is missing: found m0, m2, expected m0\.\.m1'):
        PolyMNIST(built, 'train')


def _build_in_process(args):
    "build_polymnist in a fresh process, writing a line to `root/builds.log` whenever it writes a set."
    root, idx_dir = args
    write = pm._write_polymnist
    def counted(*a, **k):
        with open(root / 'builds.log', 'a') as f: f.write('built\n')
        return write(*a, **k)
    pm._write_polymnist = counted
    return str(build_polymnist(root, source=idx_dir, n_modalities=2, seed=0))


def test_concurrent_builds_build_once_and_never_pull_the_set_from_under_a_reader(idx_dir, tmp_path, monkeypatch):
    "Two runs of a grid that start together on a fresh data folder: one builds, the other waits and reuses it."
    import multiprocessing as mp
    with mp.get_context('spawn').Pool(2) as pool:
        folders = pool.map(_build_in_process, [(tmp_path, idx_dir)] * 2)
    assert folders[0] == folders[1]
    assert (tmp_path / 'builds.log').read_text() == 'built\n'                                    # built once
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.PolyMNIST-build-')] == []   # no build left behind
    data = PolyMNIST(folders[0], 'train')
    assert len(data) == 120 and data.n_modalities == 2
    writes = []                                                    # a further call with the lock free builds nothing
    monkeypatch.setattr(pm, '_write_polymnist', lambda *a, **k: writes.append(a))
    build_polymnist(tmp_path, source=idx_dir, n_modalities=2, seed=0)
    assert writes == []
