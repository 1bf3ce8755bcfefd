"""Baselines: each objective against a naive re-computation, training on PolyMNIST, generation shapes, the registry,
k-means clustering, and no duplicated code."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Laplace, Normal

from cmvae.baselines import (BASELINES, MMVAE, MMVAEPlus, MMJSD, MoPoE, MVAE, MVTCAE, NoClustersError,
                             build_baseline, kmeans_clusters)
from cmvae.data import MultimodalDataset
from cmvae.polymnist import PolyMNIST
from cmvae.model import build_cmvae
from cmvae.objectives import log_weights_from_samples, objective, sample_latents
from cmvae.train import CMVAEConfig, build_model, fit, training_objective

M, B, D_W, D_Z = 3, 8, 3, 4
torch.set_num_threads(1)


def make(cls, M=M, **kw):
    "A float64 baseline on CMVAE's PolyMNIST networks at width 1/16."
    torch.manual_seed(0)
    model = cls.from_networks(build_cmvae('polymnist', D_W, D_Z, 1, 0.0625, None, M), CMVAEConfig())
    for k, v in kw.items(): setattr(model, k, v)
    return model.double()


@pytest.fixture(scope='module')
def xs():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(B, 3, 28, 28, generator=g, dtype=torch.float64) for _ in range(M)]


# ---------------------------------------------------------------- naive references
def naive_laplace_experts(model, xs, d_w):
    "Per-modality (loc, scale) with the softmax trick applied to the w block and the z block separately."
    out = []
    for m in range(len(xs)):
        loc, raw = model.encoders[m](xs[m])
        blocks = [raw[:, :d_w], raw[:, d_w:]] if d_w else [raw]
        out.append((loc, torch.cat([F.softmax(r, -1) * r.shape[-1] + 1e-20 for r in blocks], -1)))
    return out


def image_loglik(out, x):
    return Laplace(out, 0.75).log_prob(x).sum((-3, -2, -1))


def naive_mmvae_plus_lw(model, xs, u, w_aux, beta):
    "log w[m, k, b] of MMVAE+ with loops over encoding modality m, sample k and decoder d."
    Mx, K = u.shape[:2]
    d_w = model.d_w
    ex = naive_laplace_experts(model, xs, d_w)
    lw = torch.zeros(Mx, K, u.shape[2], dtype=u.dtype)
    for m in range(Mx):
        for k in range(K):
            w, z = u[m, k, :, :d_w], u[m, k, :, d_w:]
            rec = sum(image_loglik(model.decoders[d](torch.cat([w if d == m else w_aux[m, k, :, d], z], -1)), xs[d])
                      for d in range(Mx))
            log_pz = Laplace(0., 1.).log_prob(z).sum(-1)
            log_pw = Laplace(0., 1.).log_prob(w).sum(-1)
            log_qz = torch.logsumexp(torch.stack([Laplace(loc[:, d_w:], sc[:, d_w:]).log_prob(z).sum(-1) for loc, sc in ex]), 0) - math.log(Mx)
            log_qw = Laplace(ex[m][0][:, :d_w], ex[m][1][:, :d_w]).log_prob(w).sum(-1)
            lw[m, k] = rec + beta * (log_pz + log_pw - log_qz - log_qw)
    return lw


def naive_mmvae_lw(model, xs, z_all, beta):
    "log w[m, k, b] of MMVAE (one latent, no private part)."
    Mx, K = z_all.shape[:2]
    ex = naive_laplace_experts(model, xs, 0)
    lw = torch.zeros(Mx, K, z_all.shape[2], dtype=z_all.dtype)
    for m in range(Mx):
        for k in range(K):
            z = z_all[m, k]
            rec = sum(image_loglik(model.decoders[d](z), xs[d]) for d in range(Mx))
            mix = torch.stack([Laplace(loc, sc).log_prob(z).sum(-1) for loc, sc in ex])
            lw[m, k] = rec + beta * (Laplace(0., 1.).log_prob(z).sum(-1) - (torch.logsumexp(mix, 0) - math.log(Mx)))
    return lw


def stratified_bound(lw):
    "Σ_b (1/M) Σ_m log (1/K) Σ_k w, from log-weights [M, K, B]."
    K = lw.shape[1]
    return sum(torch.logsumexp(lw[m], 0) - math.log(K) for m in range(lw.shape[0])).sum() / lw.shape[0]


@pytest.mark.parametrize('cls', [MMVAEPlus, MMVAE])
def test_mmvae_family_objective_matches_naive(cls, xs):
    model = make(cls)
    beta, K = 2.5, 3
    torch.manual_seed(5)
    loss, stats = objective(model, xs, K, beta, 'iwae')
    torch.manual_seed(5)                               # the same draws, now held by the test
    loc, scale = model.encode(xs)
    u, w_aux = sample_latents(model, loc, scale, K)
    if cls is MMVAEPlus: naive = naive_mmvae_plus_lw(model, xs, u, w_aux, beta)
    else: naive = naive_mmvae_lw(model, xs, u, beta)
    lw, _ = log_weights_from_samples(model, xs, loc, scale, u, w_aux, beta)
    torch.testing.assert_close(lw, naive)
    torch.testing.assert_close(stats['bound'], stratified_bound(naive))
    torch.testing.assert_close(loss, -stratified_bound(naive))


def gauss_experts(model, xs):
    "Gaussian experts (mean, std): std = softplus(raw) on the whole concatenated latent."
    return [(loc, F.softplus(raw) + 1e-20) for loc, raw in (model.encoders[m](xs[m]) for m in range(len(xs)))]


def naive_poe(experts, prior):
    "Product of Gaussian experts (mean, std) with an optional N(0, 1) prior expert."
    T = [1 / (s ** 2 + 1e-8) for _, s in experts] + ([torch.full_like(experts[0][1], 1 / (1 + 1e-8))] if prior else [])
    total = sum(T)
    return sum(t * mu for t, (mu, _) in zip(T, experts)) / total, total ** -0.5


def kl_gauss(m1, s1, m2, s2):
    "KL(N(m1, s1²) || N(m2, s2²)) summed over the last dim, written out."
    return (torch.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5).sum(-1)


def rec_all(model, xs, z):
    return sum(image_loglik(model.decoders[d](z), xs[d]) for d in range(len(xs)))


def partition_component(b, n_rows, C):
    return min(b // (n_rows // C), C - 1)


def naive_loss(name, model, xs, eps, beta):
    "Per-tuple loss [B] of each Gaussian single-latent baseline, with loops over subsets, samples and rows."
    ex = gauss_experts(model, xs)
    Mx, K, Bx = len(xs), eps.shape[0], len(xs[0])
    zeros, ones = torch.zeros_like(ex[0][0]), torch.ones_like(ex[0][0])
    if name == 'mvae':
        sets = [tuple(range(Mx))] + [(m,) for m in range(Mx)]
        loss = 0
        for i, S in enumerate(sets):
            mu, sd = naive_poe([ex[m] for m in S], prior=True)
            rec = sum(sum(image_loglik(model.decoders[d](mu + sd * eps[k, i]), xs[d]) for d in S) for k in range(K)) / K
            loss = loss - rec + beta * kl_gauss(mu, sd, zeros, ones)
        return loss
    if name == 'mvtcae':
        a = 5 / 6
        mu, sd = naive_poe(ex, prior=False)
        rec = sum(rec_all(model, xs, mu + sd * eps[k, 0]) for k in range(K)) / K
        cvib = sum(kl_gauss(mu, sd, em, es) for em, es in ex)
        return -(Mx - a) / Mx * rec + beta * (a / Mx * cvib + (1 - a) * kl_gauss(mu, sd, zeros, ones))
    if name == 'mopoe':
        subsets = [[m for m in range(Mx) if s >> m & 1] for s in range(1, 2 ** Mx)]
        comps = [naive_poe([ex[m] for m in S], prior=len(S) == Mx) for S in subsets]
        kl = sum(kl_gauss(mu, sd, zeros, ones) for mu, sd in comps) / len(comps)
    elif name == 'mmjsd':
        comps = ex
        pi = 1 / (Mx + 1)
        T = [pi / (s ** 2 + 1e-8) for _, s in ex] + [torch.full_like(zeros, pi / (1 + 1e-8))]
        f_sd = sum(T) ** -0.5
        f_mu = sum(t * mu for t, (mu, _) in zip(T, ex)) * f_sd ** 2
        kl = pi * (sum(kl_gauss(mu, sd, f_mu, f_sd) for mu, sd in ex) + kl_gauss(zeros, ones, f_mu, f_sd))
    rec = torch.zeros(Bx, dtype=eps.dtype)
    for b in range(Bx):
        c = partition_component(b, Bx, len(comps))
        for k in range(K):
            z = comps[c][0][b:b + 1] + comps[c][1][b:b + 1] * eps[k, 0, b:b + 1]
            rec[b] += rec_all(model, [x[b:b + 1] for x in xs], z)[0] / K
    return -rec + beta * kl


GAUSSIAN = {'mvae': MVAE, 'mvtcae': MVTCAE, 'mopoe': MoPoE, 'mmjsd': MMJSD}


@pytest.mark.parametrize('name', list(GAUSSIAN))
def test_gaussian_objective_matches_naive(name, xs):
    model = make(GAUSSIAN[name])
    beta, K = 2.5, 2
    mu, std = model.experts(xs)
    eps = torch.randn(K, model.n_draws(), *mu.shape[1:], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss, stats = model.loss_from_noise(xs, mu, std, eps, beta)
    naive = naive_loss(name, model, xs, eps, beta)
    torch.testing.assert_close(loss, naive.mean())
    torch.testing.assert_close(stats['bound'], -naive.sum())
    # training_objective draws exactly such noise
    torch.manual_seed(7)
    loss_t, _ = model.training_objective(xs, K, beta, 'iwae')
    torch.manual_seed(7)
    eps_t = torch.randn(K, model.n_draws(), *mu.shape[1:], dtype=torch.float64)
    torch.testing.assert_close(loss_t, naive_loss(name, model, xs, eps_t, beta).mean())


def test_gaussian_options_change_the_objective(xs):
    "The reference-code options (prior in MoPoE's full product, prior in mmJSD's mixture) are live switches."
    for cls, attr, other in ((MoPoE, 'prior_expert', 'none'), (MMJSD, 'prior_in_mixture', True)):
        model = make(cls)
        mu, std = model.experts(xs)
        eps = torch.randn(1, 1, *mu.shape[1:], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        a = model.loss_from_noise(xs, mu, std, eps, 1.0)[0]
        setattr(model, attr, other)
        assert not torch.isclose(a, model.loss_from_noise(xs, mu, std, eps, 1.0)[0])


# ---------------------------------------------------------------- training
@pytest.fixture(scope='module')
def poly():
    train = PolyMNIST(split='train').subset(range(64))   # 64 tuples keep the test fast
    return dict(train=train, val=train.subset(range(16)))


@pytest.mark.parametrize('name', list(BASELINES))
def test_every_baseline_trains_with_fit(name, poly):
    cfg = CMVAEConfig(model=name, d_z=8, d_w=8, width=0.0625, K=1, beta=1.0,
                      objective='dreg_mmvae' if name == 'mmvae' else 'iwae', epochs=2, batch_size=16, lr=2e-3, seed=0,
                      threads=1, channels_last=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model) is BASELINES[name]
    fixed = poly['train'].batch(torch.arange(32))

    def fixed_loss():
        torch.manual_seed(123)
        with torch.no_grad(): return float(training_objective(model, fixed, cfg, kind='iwae')[0])

    before = fixed_loss()
    model, history = fit(cfg, poly, model=model, progress=False)
    after = fixed_loss()
    assert len(history) == 2 and all(math.isfinite(h['train_loss']) and math.isfinite(h['val_loss']) for h in history)
    assert after < before - 0.05 * abs(before), (name, before, after)


# ---------------------------------------------------------------- interface
@pytest.mark.parametrize('name', list(BASELINES))
def test_generation_shapes_and_interface(name, xs):
    model = make(BASELINES[name]).float()
    xf = [x.float() for x in xs]
    assert model.n_modalities == M and [l.kind for l in model.likelihoods] == ['image'] * M
    gen = model.generate(5, generator=torch.Generator().manual_seed(0))
    assert [g.shape for g in gen] == [torch.Size([5, 3, 28, 28])] * M
    for sources in (0, (2,), (0, 1), (0, 1, 2)):
        out = model.cross_generate(xf, sources, generator=torch.Generator().manual_seed(1))
        assert [g.shape for g in out] == [torch.Size([B, 3, 28, 28])] * M
        again = model.cross_generate(xf, sources, generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert model.latent_means(xf).shape == (B, D_W + D_Z if name != 'mmvae_plus' else D_Z)


def test_cross_generation_uses_the_models_subset_posterior(xs):
    "MVAE conditions on PoE(prior, q_S); mmJSD on the mixture of the source experts (its components are the experts)."
    xf = [x.float() for x in xs]
    mvae, mmjsd = make(MVAE).float(), make(MMJSD).float()
    mu, std = mvae.experts(xf, [0, 2])
    p_mu, p_std = naive_poe([(mu[0], std[0]), (mu[1], std[1])], prior=True)
    q_mu, q_std = mvae.posterior(xf, [0, 2])
    torch.testing.assert_close(q_mu[0], p_mu); torch.testing.assert_close(q_std[0], p_std)
    c_mu, _ = mmjsd.posterior(xf, (1, 2))
    torch.testing.assert_close(c_mu, mmjsd.experts(xf, [1, 2])[0])
    torch.testing.assert_close(mmjsd.latent_means(xf), mmjsd.experts(xf)[0].mean(0))
    with pytest.raises(ValueError, match='distinct modality indices'): mvae.cross_generate(xf, (0, 0))
    with pytest.raises(ValueError, match='distinct modality indices'): mvae.cross_generate(xf, ())


def test_cross_generate_samples_the_subset_posterior(xs):
    "With a seeded generator, cross_generate decodes exactly z = mu_c + std_c * eps of a component c drawn per tuple."
    xf = [x.float() for x in xs]
    for cls, sources in ((MVAE, (0, 2)), (MMJSD, (1, 2)), (MoPoE, (0, 1, 2))):
        model = make(cls).float()
        out = model.cross_generate(xf, sources, generator=torch.Generator().manual_seed(4))
        mu, std = model.posterior(xf, list(sources))
        g = torch.Generator().manual_seed(4)
        pick = torch.randint(len(mu), (B,), generator=g)
        z = mu[pick, torch.arange(B)] + std[pick, torch.arange(B)] * torch.randn(B, mu.shape[-1], generator=g)
        with torch.no_grad():
            for d in range(M): torch.testing.assert_close(out[d], model.decoders[d](z))


def test_mmvae_plus_has_no_clusters(xs):
    model = make(MMVAEPlus).float()
    assert not any('cluster' in n or 'prior_logits' in n for n, _ in model.named_parameters())
    with pytest.raises(NoClustersError, match='kmeans_clusters'): model.assign([x.float() for x in xs])
    with pytest.raises(NoClustersError): model.generate_from_clusters(torch.zeros(2, dtype=torch.long))


def test_build_baseline_registry():
    for name in BASELINES:
        cfg = CMVAEConfig(model=name, d_z=4, d_w=2, width=0.0625)
        assert type(build_baseline(cfg, 'polymnist', 2)) is BASELINES[name]
    with pytest.raises(ValueError, match="CMVAEConfig.model: must be one of .*'mmvae_plus'.*'mvtcae'"):
        build_model(CMVAEConfig(model='mvea', width=0.0625))
    bypass = CMVAEConfig(width=0.0625); bypass.model = 'mvea'          # a config mutated after validation
    with pytest.raises(ValueError, match="unknown model 'mvea'; known: 'cmvae', 'mmvae_plus', .*'mvtcae'"):
        build_baseline(bypass, 'polymnist', 2)
    with pytest.raises(ValueError, match='Gaussian experts'):
        build_baseline(CMVAEConfig(model='mvae', family='laplace', width=0.0625), 'polymnist', 2)
    assert build_baseline(CMVAEConfig(model='mmvae_plus', family='normal', d_z=4, d_w=2, width=0.0625), 'polymnist', 2).family == 'normal'


def test_baselines_on_cubicc_networks():
    vocab = 40
    xs = [torch.rand(2, 3, 64, 64), torch.randint(0, vocab, (2, 32))]
    for name in ('mmvae_plus', 'mvae', 'mmjsd'):
        torch.manual_seed(0)
        model = build_baseline(CMVAEConfig(model=name, dataset='captioned', d_z=4, d_w=2, width=0.0625), 'cubicc', 2, vocab)
        assert [g.shape for g in model.cross_generate(xs, 1)] == [torch.Size([2, 3, 64, 64]), torch.Size([2, 32])]
        assert [g.shape for g in model.generate(3)] == [torch.Size([3, 3, 64, 64]), torch.Size([3, 32])]


# ---------------------------------------------------------------- clustering
class LabelEcho(torch.nn.Module):
    "A stand-in model whose latent means are the tuple's (noisy) class code: k-means must recover the classes."
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def latent_means(self, xs): return xs[0].flatten(1)[:, :3] + self.p


def test_kmeans_clusters_recovers_separable_classes():
    from sklearn.metrics import adjusted_rand_score
    g = torch.Generator().manual_seed(0)
    centres = torch.randint(0, 256, (4, 3), generator=g).to(torch.uint8)

    def split(n):
        labels = torch.arange(n) % 4
        img = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
        img.view(n, -1)[:, :3] = centres[labels]
        return MultimodalDataset([img], labels, ['image'])

    train, test = split(40), split(20)
    for method in ('kmeans', 'gmm'):
        preds = kmeans_clusters(LabelEcho(), train, test, 4, seed=0, method=method)
        assert preds.shape == (20,)
        assert adjusted_rand_score(test.labels.numpy(), preds) == 1.0
    # fit on the training tuples, predict the test tuples: the same as sklearn on the two feature sets
    from sklearn.cluster import KMeans
    rng = torch.Generator().manual_seed(1)
    noisy_train = MultimodalDataset([torch.randint(0, 256, (30, 1, 2, 2), generator=rng, dtype=torch.uint8)], torch.zeros(30), ['image'])
    feats = [d.modalities[0].flatten(1)[:, :3].float().div(255).numpy() for d in (noisy_train, test)]
    expected = KMeans(3, n_init=10, random_state=2).fit(feats[0]).predict(feats[1])
    np.testing.assert_array_equal(kmeans_clusters(LabelEcho(), noisy_train, test, 3, seed=2), expected)
    with pytest.raises(ValueError, match='method'): kmeans_clusters(LabelEcho(), train, test, 4, method='dbscan')
    with pytest.raises(ValueError, match='n_clusters'): kmeans_clusters(LabelEcho(), train, test, 0)
