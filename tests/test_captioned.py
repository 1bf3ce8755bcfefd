"""CaptionedShapes, the CUBICC-shaped stand-in: deterministic builder, CUBICC layout, vocabulary and captions,
class recoverable from each modality (but not trivially), and the CUBICC training path running on it."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmvae.captioned import CAPTIONED_NAME, build_captioned, captioned_vocab, decode_caption, load_captioned
from cmvae.cubicc import CUBICC, CUBICC_SPLITS
from cmvae.data import DataError
from cmvae.data_cli import main

N = 2400   # 1880 train / 120 val / 400 test (a small validation split keeps the `fit` test quick)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return root, build_captioned(root, n=N, seed=0, val_fraction=0.05)


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_builder_is_deterministic_for_a_seed(tmp_path):
    a = build_captioned(tmp_path / 'a', n=96, seed=3)
    b = build_captioned(tmp_path / 'b', n=96, seed=3)
    c = build_captioned(tmp_path / 'c', n=96, seed=4)
    ha, hb, hc = file_hashes(a), file_hashes(b), file_hashes(c)
    assert a.name == CAPTIONED_NAME and set(ha) >= {'images.pt', 'captions.pt', 'labels.pt', 'cub.vocab', 'build_info.json',
                                                    *CUBICC_SPLITS.values()}
    assert ha == hb
    for name in ('images.pt', 'captions.pt', 'labels.pt', 'train_split.npy', 'build_info.json'):
        assert ha[name] != hc[name], name
    assert ha['cub.vocab'] == hc['cub.vocab']   # the vocabulary never depends on the seed
    # idempotent: the same request is a no-op, a different one is refused, overwrite replaces it atomically
    stamp = (a / 'images.pt').stat().st_mtime_ns
    assert build_captioned(tmp_path / 'a', n=96, seed=3) == a and (a / 'images.pt').stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match='different build'):
        build_captioned(tmp_path / 'a', n=96, seed=4)
    build_captioned(tmp_path / 'a', n=96, seed=4, overwrite=True)
    assert file_hashes(a) == hc
    assert [p.name for p in (tmp_path / 'a').iterdir()] == [CAPTIONED_NAME]   # no temporary build folder left behind
    (tmp_path / 'd' / CAPTIONED_NAME).mkdir(parents=True)
    with pytest.raises(DataError, match='not built by cmvae'):
        build_captioned(tmp_path / 'd', n=96)


def test_layout_is_read_by_the_cubicc_loader(built):
    root, folder = built
    info = json.loads((folder / 'build_info.json').read_text())
    splits = {s: CUBICC(folder, s) for s in CUBICC_SPLITS}
    assert {s: len(d) for s, d in splits.items()} == info['counts'] == dict(train=1880, val=120, test=400)
    for d in splits.values():
        assert d.kinds == ['image', 'text'] and d.modalities[0].dtype == torch.uint8
        assert tuple(d.modalities[0].shape[1:]) == (3, 64, 64) and tuple(d.modalities[1].shape[1:]) == (32,)
        assert set(d.labels.tolist()) == set(range(8))
    idx = {s: np.load(folder / f) for s, f in CUBICC_SPLITS.items()}
    assert sum(map(len, idx.values())) == N and len(np.unique(np.concatenate(list(idx.values())))) == N   # disjoint, complete
    assert np.bincount(torch.load(folder / 'labels.pt').numpy(), minlength=8).tolist() == [N // 8] * 8   # balanced
    attrs = np.load(folder / 'attributes.npz')   # train tuples never share an MNIST digit with val/test tuples
    assert not set(attrs['digit_id'][idx['train']]) & set(attrs['digit_id'][np.concatenate([idx['val'], idx['test']])])
    # load_captioned is the same data, from the data root or from the folder itself
    for s in CUBICC_SPLITS:
        d = load_captioned(root, s, build=False)
        assert d.name == f'{CAPTIONED_NAME}/{s}' and torch.equal(d.modalities[0], splits[s].modalities[0])
    assert torch.equal(load_captioned(folder, 'test').labels, splits['test'].labels)
    with pytest.raises(ValueError, match='split must be one of'):
        load_captioned(root, 'validation')


def test_vocabulary_and_caption_format(built):
    _, folder = built
    i2w = json.loads((folder / 'cub.vocab').read_text())['i2w']
    assert len(i2w) == 1590 and set(i2w) == {str(i) for i in range(1590)} and len(set(i2w.values())) == 1590
    assert (i2w['0'], i2w['1'], i2w['2']) == ('<exc>', '<pad>', '<eos>')
    assert [i2w[str(i)] for i in range(1590)] == captioned_vocab()
    caps = torch.load(folder / 'captions.pt')
    assert caps.shape == (N, 32) and not caps.is_floating_point()
    assert caps.min() >= 0 and caps.max() < 1590
    is_eos = caps == 2
    assert (is_eos.sum(1) == 1).all()                          # exactly one <eos> per caption
    eos_at = is_eos.int().argmax(1)
    after = torch.arange(32)[None] > eos_at[:, None]
    assert (caps[after] == 1).all()                             # only <pad> after it
    assert not (caps[~after & ~is_eos] <= 2).any()             # only words before it (no <pad>, <exc>)
    assert eos_at.min() >= 3                                    # every caption has words
    vocab = captioned_vocab()
    text = decode_caption(caps[0], vocab)
    assert text and '<' not in text and len(text.split()) == int(eos_at[0])
    assert decode_caption(F.one_hot(caps[0], 1590).float(), vocab) == text
    assert decode_caption(torch.tensor([5, 7, 2, 9, 1]), vocab) == f'{vocab[5]} {vocab[7]}'   # stops at <eos>


def bag_of_words(tokens):
    bow = np.zeros((len(tokens), 1590), np.float32)
    bow[np.arange(len(tokens))[:, None], tokens.long().numpy()] = 1
    return bow


def test_class_is_recoverable_from_each_modality_but_not_trivially(built):
    from sklearn.linear_model import RidgeClassifier
    root, _ = built
    train, test = load_captioned(root, 'train'), load_captioned(root, 'test')
    y_tr, y_te = train.labels.numpy(), test.labels.numpy()
    pix = [F.avg_pool2d(d.modalities[0].float() / 255, 4).flatten(1).numpy() for d in (train, test)]   # 16x16 pixels
    mu, sd = pix[0].mean(0), pix[0].std(0) + 1e-6
    acc = {}
    for name, (X_tr, X_te) in dict(image=[(p - mu) / sd for p in pix],
                                   text=[bag_of_words(d.modalities[1]) for d in (train, test)]).items():
        pred = RidgeClassifier(alpha=100.0).fit(X_tr, y_tr).predict(X_te)
        acc[name] = (np.mean(pred == y_te), np.mean(pred % 2 == y_te % 2), np.mean(pred // 2 == y_te // 2))
    print(acc)
    image, text = acc['image'], acc['text']
    assert 0.19 < image[0] < 0.9, image        # chance is 0.125
    assert image[1] > 0.8                       # the colour family shows in the pixels
    assert 0.4 < text[0] < 0.95, text
    assert text[1] > 0.65 and text[2] > 0.65    # both attributes show in the words


def test_one_dreg_step_of_the_cubicc_architecture(built):
    from cmvae.model import build_cmvae
    from cmvae.objectives import objective
    root, _ = built
    xs = load_captioned(root, 'train').batch(torch.arange(8))
    assert xs[0].shape == (8, 3, 64, 64) and xs[1].dtype == torch.int64
    torch.manual_seed(0)
    model = build_cmvae('cubicc', d_w=8, d_z=16, n_clusters=35, width=0.125)
    loss, stats = objective(model, xs, K=2, beta=1.0, kind='dreg_mixture')
    loss.backward()
    assert torch.isfinite(loss) and math.isfinite(float(stats['bound']))
    for m, (enc, dec) in enumerate(zip(model.encoders, model.decoders)):
        for net in (enc, dec):
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0, f'no gradient reaches modality {m}'


def test_fit_runs_one_epoch_on_it(built, tmp_path):
    from cmvae.train import CMVAEConfig, fit
    root, _ = built
    cfg = CMVAEConfig.paper('captioned', width=0.125, epochs=1, n_train=64, batch_size=16, K=2, device='cpu',
                            data_dir=str(root), threads=1)
    model, history = fit(cfg, out_dir=tmp_path / 'run', progress=False)
    assert len(history) == 1 and math.isfinite(history[0]['train_loss']) and math.isfinite(history[0]['val_loss'])
    assert (tmp_path / 'run' / 'checkpoint.pt').exists()
    assert model.likelihoods[1].kind == 'text'


def test_command_line(tmp_path, capsys):
    main(['captioned', '--root', str(tmp_path), '--n', '48', '--seed', '1'])
    assert 'CaptionedShapes ready' in capsys.readouterr().out
    assert len(CUBICC(tmp_path / CAPTIONED_NAME, 'train')) == 32
