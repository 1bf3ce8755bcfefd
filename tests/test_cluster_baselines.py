"""Clustering baselines: VaDE's bound against a naive re-computation, DeepCluster's per-epoch pseudo-labels and head
re-initialisation, CMC's loss (naive loops, aligned vs shuffled), each method above chance on a separable multiview
set, the CMVAE-network path on image data, and the interface (options, errors, JSON output)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score
from torch.distributions import Bernoulli, Categorical, Laplace, Normal, kl_divergence

from cmvae.cluster_baselines import (CLUSTER_BASELINES, CMC, CMCOptions, DeepCluster, DeepClusterOptions, PerModality,
                                     VaDE, VaDEOptions, class_balanced_indices, cmc_loss, fit_cluster_baseline,
                                     make_options, run_cluster_baselines, score_clusters)
from cmvae.data import MultimodalDataset

torch.set_num_threads(1)


def separable(n, k=4, views=3, dim=16, noise=0.05, seed=0, centre_seed=123):
    "k well-separated classes; each view is a vector around its own random class centre (uint8, read as [0, 1])."
    centres = torch.rand(views, k, dim, generator=torch.Generator().manual_seed(centre_seed))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    xs = [((centres[v, labels] + noise * torch.randn(n, dim, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)
          for v in range(views)]
    return MultimodalDataset(xs, labels, ['image'] * views, 'separable')


# ---------------------------------------------------------------- VaDE
def naive_vade_bound(model, x, eps):
    "The VaDE ELBO per sample with loops over samples, clusters and latent dimensions, from torch.distributions."
    mu, log_var = model.encoder(x)
    std = (0.5 * log_var).exp()
    z = mu + std * eps
    out = model.decoder(z)
    pi = torch.softmax(model.pi_logits, 0)
    mu_c, std_c = model.mu_c, (0.5 * model.log_var_c).exp()
    C, D = mu_c.shape
    bounds = []
    for b in range(len(x)):
        if model.opts.likelihood == 'laplace': rec = Laplace(out[b], model.opts.image_scale).log_prob(x[b]).sum()
        else: rec = Bernoulli(logits=out[b], validate_args=False).log_prob(x[b]).sum()   # cross-entropy on [0, 1] values
        # gamma_c = p(c | z) from the joint pi_c N(z; mu_c, sigma_c^2)
        joint = torch.stack([Categorical(probs=pi).log_prob(torch.tensor(c))
                             + sum(Normal(mu_c[c, j], std_c[c, j]).log_prob(z[b, j]) for j in range(D)) for c in range(C)])
        gamma = torch.softmax(joint, 0)
        e_log_pz_c = 0.0    # E_q(z|x)[log p(z|c)] = -(KL(q || p(z|c)) + H(q)), per dimension
        e_log_pc_minus_qc = 0.0
        for c in range(C):
            per_dim = 0.0
            for j in range(D):
                q, p = Normal(mu[b, j], std[b, j]), Normal(mu_c[c, j], std_c[c, j])
                per_dim = per_dim - (kl_divergence(q, p) + q.entropy())
            e_log_pz_c = e_log_pz_c + gamma[c] * per_dim
            e_log_pc_minus_qc = e_log_pc_minus_qc + gamma[c] * (torch.log(pi[c]) - torch.log(gamma[c]))
        entropy = sum(Normal(mu[b, j], std[b, j]).entropy() for j in range(D))
        bounds.append(rec + model.opts.beta * (e_log_pz_c + e_log_pc_minus_qc + entropy))
    return torch.stack(bounds), gamma


@pytest.mark.parametrize('shape,arch,likelihood,beta', [((6,), 'mlp', 'laplace', 1.0), ((6,), 'mlp', 'bernoulli', 2.5),
                                                        ((3, 28, 28), 'auto', 'laplace', 1.0)])
def test_vade_bound_matches_naive(shape, arch, likelihood, beta):
    torch.manual_seed(0)
    opts = VaDEOptions(n_clusters=3, d_latent=4, width=0.03125, arch=arch, modality=0, likelihood=likelihood, beta=beta)
    model = VaDE(shape, opts).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # a non-trivial prior: unequal weights, spread means, unequal variances
        model.pi_logits.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        model.mu_c.copy_(torch.randn(3, 4, generator=g, dtype=torch.float64))
        model.log_var_c.copy_(0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64))
    x = torch.rand(5, *shape, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, generator=g, dtype=torch.float64)
    bound, stats = model.elbo(x, eps)
    naive, gamma_last = naive_vade_bound(model, x, eps)
    torch.testing.assert_close(bound, naive, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(stats['log_gamma'][-1].exp(), gamma_last, rtol=1e-10, atol=1e-12)


def test_vade_gmm_initialisation_copies_the_mixture():
    train = separable(120, views=1)
    torch.manual_seed(0)
    model = VaDE((16,), VaDEOptions(n_clusters=4, d_latent=3, width=0.125, arch='mlp', modality=0, image_scale=0.1,
                                    pretrain_epochs=2, epochs=1, batch_size=40))
    model.pretrain(train, torch.Generator().manual_seed(0), progress=False)
    model.init_prior(train, seed=0)
    torch.testing.assert_close(torch.softmax(model.pi_logits, 0).double(), torch.as_tensor(model.gmm.weights_), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.mu_c.double(), torch.as_tensor(model.gmm.means_), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.log_var_c.exp().double(), torch.as_tensor(model.gmm.covariances_), rtol=1e-4, atol=1e-9)
    # clusters right after the initialisation are the GMM's own assignments of the encoder means
    gmm_pred = model.gmm.predict(model.encode_means(train).double().numpy())
    assert adjusted_rand_score(gmm_pred, model.predict(train)) > 0.99


# ---------------------------------------------------------------- DeepCluster
def test_deepcluster_reassigns_pseudo_labels_and_resets_the_head_each_epoch():
    g = torch.Generator().manual_seed(0)
    data = MultimodalDataset([torch.randint(0, 256, (200, 12), generator=g, dtype=torch.uint8)], torch.zeros(200, dtype=torch.long),
                             ['image'], 'noise')   # no structure: the partition follows the changing features
    torch.manual_seed(0)
    model = DeepCluster((12,), DeepClusterOptions(n_clusters=5, feat_dim=8, pca_dim=6, width=0.125, arch='mlp', modality=0,
                                                  epochs=3, batch_size=50, lr=0.2))
    before = model.compute_features(data)
    model.fit(data, seed=0, progress=False)
    after = model.compute_features(data)
    assert not np.allclose(before, after, atol=1e-3)          # the features do change during training
    assert len(model.pseudo_labels) == 3 and all(len(p) == 200 for p in model.pseudo_labels)
    for e in range(2):
        # a new partition each epoch (not just renumbered clusters)
        assert adjusted_rand_score(model.pseudo_labels[e], model.pseudo_labels[e + 1]) < 0.95
        # the head starts each epoch fresh, not where the previous epoch left it
        start_next, end_prev = model.head_snapshots[e + 1][0], model.head_snapshots[e][1]
        assert not torch.allclose(start_next, end_prev)
    for start, end in model.head_snapshots:                   # and it is trained within the epoch
        assert not torch.allclose(start, end)


def test_class_balanced_sampling_is_uniform_over_pseudo_classes():
    labels = torch.tensor([0] * 180 + [1] * 15 + [3] * 5)    # class 2 empty
    drawn = labels[class_balanced_indices(labels, 6000, 4, torch.Generator().manual_seed(0))]
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2] == 0
    assert (counts[[0, 1, 3]] - 2000).abs().max() < 150


# ---------------------------------------------------------------- CMC
def naive_cmc_loss(z, tau, graph):
    M, B, _ = z.shape
    pairs = [(i, j) for i in range(M) for j in range(M) if i != j and (graph == 'full' or i == 0 or j == 0)]
    total = 0.0
    for i, j in pairs:
        for b in range(B):
            scores = torch.stack([torch.dot(z[i, b], z[j, c]) / tau for c in range(B)])
            total = total - (scores[b] - torch.logsumexp(scores, 0)) / B
    return total


@pytest.mark.parametrize('graph', ['full', 'core'])
def test_cmc_loss_matches_naive(graph):
    z = F.normalize(torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=-1)
    torch.testing.assert_close(cmc_loss(z, 0.3, graph), naive_cmc_loss(z, 0.3, graph), rtol=1e-10, atol=1e-10)


def test_cmc_loss_is_lower_for_aligned_than_shuffled_pairs():
    # constructed features: views of one tuple are noisy copies of one vector
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=g)
    z = F.normalize(torch.stack([base + 0.3 * torch.randn(16, 8, generator=g) for _ in range(3)]), dim=-1)
    shuffled = torch.stack([z[0], z[1][torch.randperm(16, generator=g)], z[2][torch.randperm(16, generator=g)]])
    assert cmc_loss(z, 0.5) < cmc_loss(shuffled, 0.5) - 5
    # a tiny model trained for a few steps on a multiview set, evaluated on unseen tuples
    train, test = separable(200, seed=0), separable(64, seed=1)
    torch.manual_seed(0)
    model = CMC(train.kinds, [(16,)] * 3, CMCOptions(n_clusters=4, d_embed=8, width=0.125, arch='mlp', epochs=2, batch_size=50))
    model.fit(train, seed=0, progress=False)
    model.eval()
    with torch.no_grad():
        e = model.embed(test.batch(torch.arange(64)))
        perm = torch.randperm(64, generator=g)
        e_shuffled = torch.stack([e[0], e[1][perm], e[2][perm.flip(0)]])
        assert cmc_loss(e, 0.5) < cmc_loss(e_shuffled, 0.5) - 1


# ---------------------------------------------------------------- all methods above chance
def test_each_method_beats_chance_on_separable_multiview_data():
    train, test = separable(300, seed=0), separable(200, seed=1)
    tiny = dict(width=0.125, arch='mlp', batch_size=50)
    res = run_cluster_baselines(train, test, n_clusters=4, seed=0, progress=False, options={
        'vade': dict(tiny, d_latent=4, image_scale=0.1, pretrain_epochs=8, epochs=3, modality=0),
        'deepcluster': dict(tiny, feat_dim=16, pca_dim=8, epochs=2, modality=1),
        'cmc': dict(tiny, d_embed=8, epochs=3)})
    assert set(res) == set(CLUSTER_BASELINES)
    json.dumps(res)
    for name, r in res.items():
        assert r['nmi'] > 0.5 and r['acc'] > 0.25 + 0.3, (name, r)
        assert r['n_clusters'] == 4 and r['settings']['n_train'] == 300 and r['seconds'] > 0


# ---------------------------------------------------------------- CMVAE networks on image data, interface
def test_image_path_with_cmvae_networks():
    g = torch.Generator().manual_seed(0)
    data = MultimodalDataset([torch.randint(0, 256, (24, 3, 28, 28), generator=g, dtype=torch.uint8) for _ in range(2)],
                             torch.arange(24) % 3, ['image'] * 2, 'random images')
    w = dict(width=0.03125, n_clusters=3, epochs=1, batch_size=12)
    vade = fit_cluster_baseline('vade', data, dict(w, d_latent=4, pretrain_epochs=1), progress=False)   # modality='each'
    assert isinstance(vade, PerModality) and vade.modalities == [0, 1]
    assert vade.predict(data).shape == (2, 24)
    stacked = fit_cluster_baseline('vade', data, dict(w, d_latent=4, pretrain_epochs=1, modality='concat'), progress=False)
    assert stacked.encoder.body[0].in_channels == 6 and stacked.predict(data).shape == (24,)
    dc = fit_cluster_baseline('deepcluster', data, dict(w, feat_dim=8, pca_dim=4, modality=1), progress=False)
    assert dc.use_sobel and dc.trunk.body[0].in_channels == 2 and dc.predict(data).shape == (24,)
    cmc = fit_cluster_baseline('cmc', data, dict(w, d_embed=4), progress=False)
    p = cmc.predict(data)
    assert p.shape == (24,) and p.dtype == np.int64 and p.max() < 3
    scores = score_clusters(data.labels, vade.predict(data))
    assert len(scores['per_modality']) == 2
    assert scores['nmi'] == pytest.approx(np.mean([s['nmi'] for s in scores['per_modality']]))


def test_options_and_errors_name_the_field():
    with pytest.raises(ValueError, match=r'VaDEOptions\.lr must be a number > 0'): VaDEOptions(lr=0)
    with pytest.raises(ValueError, match=r'DeepClusterOptions\.momentum'): DeepClusterOptions(momentum=1.5)
    with pytest.raises(ValueError, match=r"CMCOptions has no field\(s\) \['tau'\]"): make_options('cmc', tau=0.1)
    with pytest.raises(ValueError, match='name must be one of'): make_options('dec')
    data = separable(20)
    with pytest.raises(ValueError, match='modality must be in 0..2'): fit_cluster_baseline('deepcluster', data, modality=3)
    text = MultimodalDataset([data.modalities[0], torch.zeros(20, 32, dtype=torch.int16)], data.labels, ['image', 'text'])
    with pytest.raises(ValueError, match="modality 1 is 'text'"): fit_cluster_baseline('vade', text, modality=1)
    assert make_options('vade', VaDEOptions(epochs=2), width=0.5) == VaDEOptions(epochs=2, width=0.5)
