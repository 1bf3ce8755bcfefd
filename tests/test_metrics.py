"""Evaluation metrics: ACC/NMI/ARI, Fréchet distance, coherence, Inception weights, classifier training and cache."""
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import cmvae.classifiers as classifiers
import cmvae.metrics as metrics
from cmvae.classifiers import classifier_accuracy, load_or_train_classifiers, toy_digits, train_digit_classifiers
from cmvae.data import MultimodalDataset
from cmvae.metrics import (FID_WEIGHTS_FILE, ClassifierFeatures, InceptionFeatures, InceptionWeightsError,
                           cluster_accuracy, clustering_scores, coherence_of_real_data, conditional_coherence,
                           contingency, evaluate_generation, feature_statistics, frechet_distance, generation_fd,
                           unconditional_coherence)

torch.set_num_threads(1)


# ---------------------------------------------------------------- clustering

def brute_force_acc(labels, preds) -> float:
    "Best number of hits over every injective map between the used clusters and the used classes, divided by N."
    clusters, classes = sorted(set(preds.tolist())), sorted(set(labels.tolist()))
    hits = {(c, k): int(((preds == c) & (labels == k)).sum()) for c in clusters for k in classes}
    best = 0
    if len(clusters) <= len(classes):
        for image in itertools.permutations(classes, len(clusters)):
            best = max(best, sum(hits[c, k] for c, k in zip(clusters, image)))
    else:
        for image in itertools.permutations(clusters, len(classes)):
            best = max(best, sum(hits[c, k] for c, k in zip(image, classes)))
    return best / len(labels)


@pytest.mark.parametrize('n_clusters,n_classes', [(3, 3), (5, 3), (2, 4), (1, 3), (6, 2), (4, 5)])
def test_acc_equals_brute_force(n_clusters, n_classes):
    rng = np.random.default_rng(n_clusters * 10 + n_classes)
    for trial in range(15):
        N = int(rng.integers(5, 30))
        labels = rng.integers(0, n_classes, N)
        ids = rng.choice(12, n_clusters, replace=False)          # sparse, unordered cluster ids
        preds = ids[rng.integers(0, n_clusters, N)]
        if trial % 3 == 0: preds = np.where(rng.random(N) < 0.7, ids[labels % n_clusters], preds)   # some structure
        assert cluster_accuracy(labels, preds) == pytest.approx(brute_force_acc(labels, preds), abs=1e-12), (labels, preds)


def test_clustering_scores_types_and_torch_input():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    preds = torch.tensor([4, 4, 4, 1, 3, 3, 9])               # more clusters than classes, one unmatched
    s = clustering_scores(labels, preds)
    assert set(s) == {'nmi', 'ari', 'acc'} and all(type(v) is float for v in s.values())
    assert s['acc'] == pytest.approx(5 / 7)
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    assert s['nmi'] == pytest.approx(normalized_mutual_info_score(labels.numpy(), preds.numpy()))
    assert s['ari'] == pytest.approx(adjusted_rand_score(labels.numpy(), preds.numpy()))
    W = contingency(labels, preds)
    assert W.shape == (10, 3) and W.sum() == 7 and W[4, 0] == 2 and W[4, 1] == 1
    with pytest.raises(ValueError, match='differ in length'): clustering_scores(labels, preds[:-1])


# ---------------------------------------------------------------- Fréchet distance

@pytest.mark.parametrize('method', ['sqrtm', 'eigh'])
def test_frechet_distance_closed_form_commuting_covariances(method):
    rng = np.random.default_rng(0)
    D = 6
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))             # shared eigenvectors: the covariances commute
    d1, d2 = rng.uniform(0.1, 3, D), rng.uniform(0.1, 3, D)
    s1, s2 = Q @ np.diag(d1) @ Q.T, Q @ np.diag(d2) @ Q.T
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(closed, rel=1e-9)
    # diagonal case and identical Gaussians
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2), method=method) == pytest.approx(closed, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1, method=method) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_near_singular_is_finite_with_a_warning():
    rng = np.random.default_rng(0)
    for n, D in ((5, 20), (19, 53), (24, 79)):                  # rank-deficient covariances
        a, b = np.abs(rng.normal(size=(n, D))) ** 3, np.abs(rng.normal(size=(n, D))) ** 3
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            d = frechet_distance(*feature_statistics(a), *feature_statistics(b))
        assert math.isfinite(d)
        assert d == pytest.approx(frechet_distance(*feature_statistics(a), *feature_statistics(b), method='eigh'), rel=1e-5)
    # a slightly indefinite covariance (rounding) makes sqrtm complex: warned about, dropped, the value stays right
    with pytest.warns(UserWarning, match='imaginary part of max magnitude 0.01'):
        d = frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.diag([1., 1., -1e-4]))
    assert d == pytest.approx(1 - 1e-4, rel=1e-9)


def test_frechet_distance_retries_with_eps_then_raises(monkeypatch):
    real_sqrtm = metrics.scipy.linalg.sqrtm
    calls = []
    def flaky(A, *args, **kwargs):
        calls.append(A)
        return np.full_like(A, np.nan) if len(calls) == 1 else real_sqrtm(A)
    monkeypatch.setattr(metrics.scipy.linalg, 'sqrtm', flaky)
    s1, s2 = np.diag([1., 4.]), np.diag([4., 1.])
    with pytest.warns(UserWarning, match='adding 1e-06'):
        d = frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    assert len(calls) == 2 and d == pytest.approx(2.0, abs=1e-5)
    monkeypatch.setattr(metrics.scipy.linalg, 'sqrtm', lambda A, *a, **k: np.full_like(A, np.nan))
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match='not finite'):
        frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    with pytest.raises(ValueError, match='mu2'):
        frechet_distance(np.zeros(2), s1, np.array([0, np.inf]), s2)


# ---------------------------------------------------------------- classifiers and coherence

@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    "Toy data, classifiers trained on it (cached in a temporary folder), and that folder."
    cache = tmp_path_factory.mktemp('clf-cache')
    train, test = toy_digits(300, seed=0), toy_digits(200, seed=1)
    clfs = train_digit_classifiers(train, epochs=4, batch_size=32, cache_dir=cache, progress=False)
    return dict(train=train, test=test, clfs=clfs, cache=cache)


def independent_predictions(clfs, data):
    "Predicted class per modality `[M, N]`, computed directly with the networks."
    with torch.no_grad():
        return torch.stack([c.eval()(x.float() / 255).argmax(-1) for c, x in zip(clfs, data.modalities)])


def test_classifier_training_and_cache(toy, monkeypatch):
    clfs, train = toy['clfs'], toy['train']
    files = list(toy['cache'].glob('classifiers-*.pt'))
    assert len(files) == 1 and not clfs.info['loaded_from_cache']
    acc = classifier_accuracy(clfs, toy['test'])
    assert min(acc) > 0.5, acc                                  # it learned something (chance is 0.1)
    monkeypatch.setattr(classifiers, 'augment_digits', lambda *a, **k: pytest.fail('trained again instead of loading the cache'))
    again = train_digit_classifiers(train, epochs=4, batch_size=32, cache_dir=toy['cache'], progress=False)
    assert again.info['loaded_from_cache'] and again.info['cache'] == str(files[0])
    for a, b in zip(again.state_dict().values(), clfs.state_dict().values()): assert torch.equal(a, b)
    monkeypatch.undo()
    # other data -> another key -> trained and stored separately; default folder is <data.root>/.cache
    other = toy_digits(40, seed=5)
    other.root = toy['cache'] / 'data'
    c2, info = load_or_train_classifiers(other, toy['test'], epochs=1, batch_size=32, progress=False)
    assert not info['loaded_from_cache'] and len(list((other.root / '.cache').glob('classifiers-*.pt'))) == 1
    assert len(info['test_accuracy']) == 3
    assert load_or_train_classifiers(other, epochs=1, batch_size=32, progress=False)[1]['loaded_from_cache']


def test_coherence_of_real_data_matches_independent_agreement(toy):
    P = independent_predictions(toy['clfs'], toy['test'])
    y = toy['test'].labels
    res = coherence_of_real_data(toy['test'], toy['clfs'], batch_size=64)
    assert res['all_correct'] == pytest.approx((P == y).all(0).float().mean().item())
    assert res['all_agree'] == pytest.approx((P == P[0]).all(0).float().mean().item())
    assert res['accuracy'] == pytest.approx((P == y).float().mean(1).tolist())
    assert res['all_correct'] < 1                               # imperfect classifiers make the check meaningful
    # with some labels wrong, agreeing with each other and agreeing with the label differ
    wrong = y.clone(); wrong[::4] = (wrong[::4] + 1) % 10
    bad = coherence_of_real_data(MultimodalDataset(toy['test'].modalities, wrong, toy['test'].kinds), toy['clfs'])
    assert bad['all_agree'] == pytest.approx(res['all_agree'])
    assert bad['all_correct'] == pytest.approx((P == wrong).all(0).float().mean().item())
    assert bad['all_correct'] < bad['all_agree']


class Oracle(nn.Module):
    "A fake model: 'generates' the real tuple it conditions on, or (shuffle) the tuple of another data point."
    def __init__(self, data, shuffle=False):
        super().__init__()
        self.n_modalities, self.shuffle, self.data, self.pos = data.n_modalities, shuffle, data, 0
    def cross_generate(self, xs, sources, generator=None):
        if not self.shuffle: return list(xs)
        perm = torch.randperm(len(xs[0]), generator=generator)
        return [x[perm] for x in xs]
    def generate(self, n, generator=None):   # the real tuples in turn, or each modality from an independent random tuple
        idx = [torch.randint(len(self.data), (n,), generator=generator) for _ in range(self.n_modalities)] if self.shuffle \
            else [torch.arange(self.pos, self.pos + n) % len(self.data)] * self.n_modalities
        self.pos += n
        return [x[i].float() / 255 for x, i in zip(self.data.modalities, idx)]


def test_conditional_coherence_of_oracle_equals_classifier_accuracy(toy):
    data, clfs = toy['test'], toy['clfs']
    acc = (independent_predictions(clfs, data) == data.labels).float().mean(1).double()
    res = conditional_coherence(Oracle(data), data, clfs, subsets='all', batch_size=64, progress=False)
    assert len(res['per_subset']) == 6                          # non-empty proper subsets of 3 modalities
    for key, per_target in res['per_subset'].items():
        S = {int(s) for s in key.split(',')}
        assert set(per_target) == {str(t) for t in range(3) if t not in S}
        for t, a in per_target.items(): assert a == pytest.approx(acc[int(t)].item())
    assert res['per_target'] == pytest.approx({str(t): acc[t].item() for t in range(3)})
    assert res['headline'] == pytest.approx(acc.mean().item())
    assert res['matrix'][1][1] == pytest.approx(acc[1].item())
    shuffled = conditional_coherence(Oracle(data, shuffle=True), data, clfs, subsets='single', generator=0, progress=False)
    assert abs(shuffled['headline'] - 0.1) < 0.06, shuffled['headline']
    assert set(shuffled['per_size']) == {'1'}
    json.dumps(res)


def test_unconditional_coherence_of_real_tuples(toy):
    data, clfs = toy['test'], toy['clfs']
    P = independent_predictions(clfs, data)
    res = unconditional_coherence(Oracle(data), clfs, n=len(data), batch_size=64, progress=False)
    assert res['value'] == pytest.approx((P == P[0]).all(0).float().mean().item()) and res['n'] == len(data)
    mixed = unconditional_coherence(Oracle(data, shuffle=True), clfs, n=300, generator=0, progress=False)
    assert mixed['value'] < 0.1                                 # three independent digits agree ~1 % of the time


# ---------------------------------------------------------------- Fréchet features and the full evaluation

def test_generation_fd_is_labelled_clf_fd_and_quantises(toy):
    feats = ClassifierFeatures(toy['clfs'])
    real = toy['test'].modalities[1].clone()
    real[:, :, 0, :] = 0; real[:, :, 1, :] = 255                       # saturated pixels
    jitter = real.float() / 255 + 0.4 / 255 * (torch.rand(real.shape) - 0.5)   # rounds back to the same 8-bit image
    jitter = torch.where(real == 255, 1.7, torch.where(real == 0, -0.6, jitter))   # out of range: clamped back
    same = generation_fd(real, jitter, feats, modality=1)
    assert same['kind'] == 'clf-FD' and same['n_real'] == same['n_fake'] == len(real)
    assert abs(same['value']) < 1e-6
    odd = generation_fd(real, jitter[:137], feats, modality=1, batch_size=64)   # no image dropped
    assert odd['n_fake'] == 137 and odd['value'] > 1e-3


def test_evaluate_generation_json_and_labels(toy):
    data = toy['test'].subset(torch.arange(90))
    res = evaluate_generation(Oracle(data), data, toy['clfs'], n_uncond=90, subsets='single', batch_size=40, progress=False)
    text = json.dumps(res)
    assert 'FID' not in text.replace('fid', '')                 # classifier features are never called FID
    assert res['settings']['fd_kind'] == res['generation']['fd_kind'] == 'clf-FD'
    u, c = res['generation']['unconditional'], res['generation']['conditional']
    assert u['kind'] == c['kind'] == 'clf-FD' and u['mean']['n_fake'] == 90 and u['mean']['n_real'] == 90
    assert set(c['per_pair']) == {f'{s}->{t}' for s in range(3) for t in range(3)}
    for v in (*c['per_pair'].values(), *u['per_modality'].values()):   # the oracle reproduces the real images
        assert v['kind'] == 'clf-FD' and abs(v['value']) < 1e-4
    acc = (independent_predictions(toy['clfs'], data) == data.labels).float().mean(1)
    assert res['coherence']['conditional']['headline'] == pytest.approx(acc.mean().item())
    assert res['coherence']['unconditional']['n'] == 90


# ---------------------------------------------------------------- Inception weights

@pytest.fixture
def no_download(monkeypatch):
    import pytorch_fid.inception as pfi
    def refuse(*a, **k): raise AssertionError('a download was attempted')
    monkeypatch.setattr(pfi, 'load_state_dict_from_url', refuse)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', refuse)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', refuse)
    return pfi


def test_inception_weights_missing_or_wrong(tmp_path, no_download):
    missing = tmp_path / 'nowhere' / FID_WEIGHTS_FILE
    with pytest.raises(InceptionWeightsError, match=str(missing)): InceptionFeatures(missing)
    wrong = tmp_path / FID_WEIGHTS_FILE
    torch.save({'not': torch.zeros(1)}, wrong)
    with pytest.raises(InceptionWeightsError, match=f'{wrong}.*does not start with 6726825d'): InceptionFeatures(wrong)
    data = toy_digits(20)
    with pytest.raises(InceptionWeightsError, match='nowhere'):
        evaluate_generation(Oracle(data), data, None, n_uncond=10, fid_weights=missing, progress=False)


def test_inception_loads_the_given_file_without_download(tmp_path, monkeypatch, no_download):
    pfi = no_download
    with monkeypatch.context() as mp:   # a randomly initialised FID Inception, to stand in for the real weights
        mp.setattr(pfi, 'load_state_dict_from_url', lambda *a, **k: {})
        mp.setattr(pfi.torchvision.models.Inception3, 'load_state_dict', lambda self, *a, **k: None, raising=False)
        state = pfi.fid_inception_v3().state_dict()
    state['Conv2d_1a_3x3.conv.weight'].fill_(0.01)
    path = tmp_path / FID_WEIGHTS_FILE
    torch.save(state, path)
    monkeypatch.setattr(metrics, 'FID_WEIGHTS_SHA256_PREFIX', metrics.sha256_file(path)[:8])
    ext = InceptionFeatures(path)
    assert ext.kind == 'FID'
    assert torch.equal(ext.net.blocks[0][0].conv.weight, state['Conv2d_1a_3x3.conv.weight'])
    f = ext(torch.rand(2, 3, 28, 28))
    assert f.shape == (2, 2048) and torch.isfinite(f).all()


def test_classifier_training_is_seeded_from_its_initial_weights():
    "The same seed gives the same classifiers (initial weights included), whatever the global random state before."
    data = toy_digits(64, n_modalities=1, seed=3)
    def train_once(global_seed):
        torch.manual_seed(global_seed)
        nets = train_digit_classifiers(data, epochs=1, batch_size=32, augment=False, seed=5, cache_dir=False, progress=False)
        return torch.cat([p.flatten() for p in nets.parameters()])
    assert torch.equal(train_once(0), train_once(123))
