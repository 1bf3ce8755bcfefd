"""The CMVAE core: network shapes and sizes, the model's generation/assignment API, the bound against a naive
re-computation from the method spec, DReG against an independent estimator, and training (resume, NaN guard,
config validation, atomic checkpoints).

Everything runs on tiny models on CPU; the bound tests use float64 so that tight tolerances mean something.
"""
import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Laplace, Normal, OneHotCategorical

from cmvae import loop as cl
from cmvae import nets
from cmvae import objectives as co
from cmvae import train as ct
from cmvae.data import MultimodalDataset
from cmvae.model import build_cmvae, CMVAE


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny models run fastest on one thread; the machine is shared. Restored afterwards."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------- networks
# method spec §3.2-3.8 (counts confirmed there by instantiating the original modules)
SPEC_PARAMS = dict(polymnist_encoder=2_946_048, polymnist_decoder=1_485_251, cub_image_encoder=8_618_048,
                   cub_image_decoder=4_309_699, caption_encoder=2_764_416, caption_decoder=3_358_167,
                   digit_classifier=130_568, polymnist_networks=22_156_495, cubicc_networks=19_050_330)


def test_parameter_counts_at_width_1_equal_the_spec():
    n = nets.count_parameters
    assert n(nets.polymnist_encoder(32, 32)) == SPEC_PARAMS['polymnist_encoder']
    assert n(nets.PolyMNISTDecoder(64)) == SPEC_PARAMS['polymnist_decoder']
    assert n(nets.cub_image_encoder(32, 64)) == SPEC_PARAMS['cub_image_encoder']
    assert n(nets.CUBImageDecoder(96)) == SPEC_PARAMS['cub_image_decoder']
    assert n(nets.CaptionEncoder(32, 64)) == SPEC_PARAMS['caption_encoder']
    assert n(nets.CaptionDecoder(32, 64)) == SPEC_PARAMS['caption_decoder']
    assert n(nets.DigitClassifier()) == SPEC_PARAMS['digit_classifier']
    pm = build_cmvae('polymnist')
    assert n(pm.encoders) + n(pm.decoders) == SPEC_PARAMS['polymnist_networks']
    # learnable prior parameters (§3.3): pi logits 40, cluster means 40 x 32, auxiliary w-scales 5 x 32
    assert n(pm, trainable_only=True) - SPEC_PARAMS['polymnist_networks'] == 40 + 40 * 32 + 5 * 32
    cub = build_cmvae('cubicc', d_w=32, d_z=64, n_clusters=35)
    assert n(cub.encoders) + n(cub.decoders) == SPEC_PARAMS['cubicc_networks']
    assert n(cub, trainable_only=True) - SPEC_PARAMS['cubicc_networks'] == 35 + 35 * 64 + 2 * 32


@pytest.mark.parametrize('width', [1.0, 0.25])
def test_polymnist_network_shapes(width):
    torch.manual_seed(0)
    enc, dec = nets.polymnist_encoder(32, 32, width), nets.PolyMNISTDecoder(64, width)
    x = torch.rand(2, 3, 28, 28)
    loc, raw = enc(x)
    assert loc.shape == raw.shape == (2, 64)
    torch.testing.assert_close(loc[:, :32], enc.w(x)[0])        # w block first, then z
    torch.testing.assert_close(raw[:, 32:], enc.z(x)[1])
    assert dec(torch.randn(2, 64)).shape == (2, 3, 28, 28)
    assert dec(torch.randn(3, 2, 64)).shape == (3, 2, 3, 28, 28)   # leading [K, B] dims are kept
    if width < 1: assert nets.count_parameters(enc) < SPEC_PARAMS['polymnist_encoder'] / 4


@pytest.mark.parametrize('width', [1.0, 0.125])
def test_cubicc_network_shapes(width):
    torch.manual_seed(0)
    V = 1590
    enc, dec = nets.cub_image_encoder(32, 64, width), nets.CUBImageDecoder(96, width)
    loc, raw = enc(torch.rand(2, 3, 64, 64))
    assert loc.shape == raw.shape == (2, 96)
    assert dec(torch.randn(3, 2, 96)).shape == (3, 2, 3, 64, 64)
    tenc, tdec = nets.CaptionEncoder(32, 64, width, V), nets.CaptionDecoder(32, 64, width, V)
    for B in (1, 3):   # batch 1 must work (the original squeezed away the batch dim)
        tokens = torch.randint(0, V, (B, 32))
        loc, raw = tenc(tokens)
        assert loc.shape == raw.shape == (B, 96)
    assert tdec(torch.randn(3, 2, 96)).shape == (3, 2, 32, V)
    tdec.eval()
    assert tdec(torch.randn(1, 96)).shape == (1, 32, V)


def test_caption_embedding_equals_linear_on_one_hot():
    "The encoder's row lookup is the original Linear(vocab -> 128) applied to one-hot tokens (§3.6 step 1)."
    torch.manual_seed(0)
    V = 50
    enc = nets.CaptionEncoder(32, 64, 0.125, V).eval()
    tokens = torch.randint(0, V, (3, 32))
    seen = {}
    enc.w_body.register_forward_pre_hook(lambda mod, args: seen.setdefault('e', args[0]))
    enc(tokens)
    ref = enc.embedding(F.one_hot(tokens, V).float()).unsqueeze(1)
    torch.testing.assert_close(seen['e'], ref)


def test_digit_classifier_shapes():
    clf = nets.DigitClassifier().eval()
    x = torch.rand(4, 3, 28, 28)
    out = clf(x)
    assert out.shape == (4, 10)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(4))   # log-probabilities
    assert clf.embed(x).shape == (4, 128)


# ---------------------------------------------------------------------------------------------------- model API
def _images(B, M=5, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, 3, size, size, generator=g) for _ in range(M)]


def _cub_inputs(B, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, 3, 64, 64, generator=g), torch.randint(0, V, (B, 32), generator=g)]


@pytest.fixture(scope='module')
def pm_model():
    torch.manual_seed(0)
    return build_cmvae('polymnist', d_w=32, d_z=32, n_clusters=40, width=0.125).eval()


@pytest.fixture(scope='module')
def cub_model():
    torch.manual_seed(0)
    return build_cmvae('cubicc', d_w=32, d_z=64, n_clusters=35, width=0.125, vocab_size=60).eval()


def test_dataset_defaults_follow_the_spec(pm_model, cub_model):
    "§1.6 / §4.1: families, likelihood scales and weights, prior mean ranges."
    assert pm_model.family == 'laplace' and cub_model.family == 'normal'
    assert [(l.kind, l.scale, l.weight) for l in pm_model.likelihoods] == [('image', 0.75, 1.0)] * 5
    (ki, si, wi), (kt, wt) = [(l.kind, l.scale, l.weight) for l in cub_model.likelihoods[:1]][0], \
                             (cub_model.likelihoods[1].kind, cub_model.likelihoods[1].weight)
    assert (ki, si, kt, wt) == ('image', 0.01, 'text', 5.0)
    assert wi == pytest.approx(32 / 12288)
    assert pm_model.cluster_means.abs().max() <= 1 and cub_model.cluster_means.abs().max() <= 0.5
    assert cub_model.cluster_means.abs().max() > 0.4   # the whole range is used
    # frozen prior scales: Laplace softmax trick -> 1, Normal softplus -> ln 2
    torch.testing.assert_close(pm_model.cluster_scale(), torch.ones(40, 32))
    torch.testing.assert_close(cub_model.w_prior().scale, torch.full((32,), math.log(2)))
    assert not pm_model.cluster_raw_scale.requires_grad and pm_model.aux_raw_scale.requires_grad


@torch.no_grad()
def test_polymnist_generation_and_assignment_shapes(pm_model):
    xs = _images(3)
    loc, scale = pm_model.encode(xs)
    assert loc.shape == scale.shape == (5, 3, 64) and (scale > 0).all()
    torch.testing.assert_close(scale[..., :32].sum(-1), torch.full((5, 3), 32.))   # softmax trick per block
    torch.testing.assert_close(scale[..., 32:].sum(-1), torch.full((5, 3), 32.))
    gen = pm_model.generate(4)
    assert len(gen) == 5 and all(g.shape == (4, 3, 28, 28) for g in gen)
    assert [g.shape for g in pm_model.generate_from_clusters(torch.tensor([0, 7, 39]))] == [(3, 3, 28, 28)] * 5
    for sources in (2, (0, 3), (0, 1, 2, 3, 4)):
        out = pm_model.cross_generate(xs, sources)
        assert len(out) == 5 and all(o.shape == (3, 3, 28, 28) for o in out)
    probs = pm_model.cluster_probs(xs)
    assert probs.shape == (5, 3, 40)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, 3))
    a = pm_model.assign(xs)
    assert a.shape == (3,) and a.dtype == torch.long and ((a >= 0) & (a < 40)).all()


@torch.no_grad()
def test_cubicc_generation_and_assignment_shapes(cub_model):
    V = 60
    xs = _cub_inputs(3, V)
    loc, scale = cub_model.encode(xs)
    assert loc.shape == scale.shape == (2, 3, 96) and (scale > 0).all()
    img, cap = cub_model.generate(4)
    assert img.shape == (4, 3, 64, 64) and img.is_floating_point()
    assert cap.shape == (4, 32) and cap.dtype == torch.long and cap.min() >= 0 and cap.max() < V
    for sources in (0, 1, (0, 1)):
        img, cap = cub_model.cross_generate(xs, sources)
        assert img.shape == (3, 3, 64, 64) and cap.shape == (3, 32)
    assert cub_model.cluster_probs(xs).shape == (2, 3, 35)
    a = cub_model.assign(xs)
    assert a.shape == (3,) and ((a >= 0) & (a < 35)).all()


@torch.no_grad()
def test_active_mask_and_generators(pm_model):
    xs = _images(6)
    active = torch.zeros(40, dtype=torch.bool)
    active[[3, 17]] = True
    assert set(pm_model.sample_clusters(200, active).tolist()) <= {3, 17}
    assert set(pm_model.assign(xs, active=active).tolist()) <= {3, 17}
    assert (pm_model.cluster_probs(xs, active=active)[..., ~active] == 0).all()
    g = lambda: torch.Generator().manual_seed(5)
    for a, b in zip(pm_model.generate(3, generator=g()), pm_model.generate(3, generator=g())): assert torch.equal(a, b)
    for a, b in zip(pm_model.cross_generate(xs, 1, generator=g()), pm_model.cross_generate(xs, 1, generator=g())):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- the bound
def spec_scale(raw, family):
    "Method spec §1.3, written independently of cmvae.model."
    if family == 'laplace': return torch.softmax(raw, -1) * raw.shape[-1] + 1e-20
    return F.softplus(raw) + 1e-20


def naive_log_weights(model, xs, loc, scale, u, w_aux, beta):
    """lw `[M, K, B]` following method spec §2.1 literally: Python loops over m, k, d and c, torch.distributions.

    `loc, scale [M, B, D]` are the posterior parameters, `u [M, K, B, D]` the samples ([w; z]) and
    `w_aux [M, K, B, M, D_w]` the auxiliary draws (`w_aux[m, k, :, d]` fills w_d when decoding d from m's z)."""
    fam = model.family
    Dist = {'laplace': Laplace, 'normal': Normal}[fam]
    M, K, B, _ = u.shape
    dw, C = model.d_w, model.n_clusters
    log_pi = torch.log_softmax(model.prior_logits, 0)
    rows = []
    for m in range(M):
        row = []
        for k in range(K):
            w, z = u[m, k, :, :dw], u[m, k, :, dw:]
            rec = 0.
            for d in range(M):
                w_d = w if d == m else w_aux[m, k, :, d, :]
                out = model.decoders[d](torch.cat([w_d, z], -1))
                lik = model.likelihoods[d]
                if lik.kind == 'image':
                    lp = Laplace(out, torch.full_like(out, lik.scale)).log_prob(xs[d]).reshape(B, -1).sum(-1)
                else:
                    onehot = F.one_hot(xs[d], out.shape[-1]).to(out.dtype)
                    lp = OneHotCategorical(probs=torch.softmax(out, -1)).log_prob(onehot).sum(-1)
                rec = rec + lik.weight * lp
            lpz = []
            for c in range(C):
                p_zc = Dist(model.cluster_means[c], spec_scale(model.cluster_raw_scale[c], fam))
                lpz.append(p_zc.log_prob(z).sum(-1))
            lpz = torch.stack(lpz, -1)                                            # [B, C]
            gamma = torch.softmax(log_pi + lpz, -1) + 1e-20
            H = 0.
            for c in range(C): H = H + gamma[:, c] * (lpz[:, c] + log_pi[c] - torch.log(gamma[:, c]))
            lq_z = torch.logsumexp(torch.stack([Dist(loc[j, :, dw:], scale[j, :, dw:]).log_prob(z).sum(-1)
                                                for j in range(M)]), 0) - math.log(M)
            lq_w = Dist(loc[m, :, :dw], scale[m, :, :dw]).log_prob(w).sum(-1)
            p_w = Dist(torch.zeros_like(model.w_raw_scale), spec_scale(model.w_raw_scale, fam))
            lp_w = p_w.log_prob(w).sum(-1)
            row.append(rec + beta * (H - lq_z - lq_w + lp_w))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def tiny_model(dataset, family, seed=0):
    "A float64 CMVAE with random (not default) prior parameters and frozen scales, in eval mode."
    torch.manual_seed(seed)
    if dataset == 'polymnist':
        model = build_cmvae('polymnist', d_w=3, d_z=4, n_clusters=5, width=0.0625, family=family, n_modalities=3)
        xs = [x.double() for x in _images(3, M=3, seed=seed)]
    else:
        model = build_cmvae('cubicc', d_w=3, d_z=4, n_clusters=5, width=0.0625, family=family, vocab_size=20)
        x_img, x_cap = _cub_inputs(2, 20, seed=seed)
        xs = [x_img.double(), x_cap]
    model = model.double().eval()
    with torch.no_grad():
        model.prior_logits.normal_()
        model.aux_raw_scale.normal_(0, 0.5)
        model.cluster_raw_scale.normal_(0, 0.5)   # frozen in practice (zeros), random here to test the trick
        model.w_raw_scale.normal_(0, 0.5)
        model.cluster_means.mul_(0.5)
    return model, xs


BOUND_CASES = [('polymnist', 'laplace', 1), ('polymnist', 'laplace', 4), ('polymnist', 'normal', 1),
               ('polymnist', 'normal', 3), ('cubicc', 'normal', 1), ('cubicc', 'normal', 3), ('cubicc', 'laplace', 2)]


@pytest.mark.parametrize('dataset,family,K', BOUND_CASES)
def test_log_weights_and_iwae_bound_equal_naive_recomputation(dataset, family, K):
    model, xs = tiny_model(dataset, family)
    beta = 1.7
    torch.manual_seed(11)
    loss, stats = co.objective(model, xs, K, beta, 'iwae')
    torch.manual_seed(11)   # the same draws again
    with torch.no_grad():
        loc, scale = model.encode(xs)
        u, w_aux = co.sample_latents(model, loc, scale, K)
        M, B = len(xs), len(xs[0])
        assert u.shape == (M, K, B, model.d_w + model.d_z) and w_aux.shape == (M, K, B, M, model.d_w)
        lw, _ = co.log_weights_from_samples(model, xs, loc, scale, u, w_aux, beta)
        ref = naive_log_weights(model, xs, loc, scale, u, w_aux, beta)
    torch.testing.assert_close(lw, ref, rtol=1e-8, atol=1e-8)
    ref_bound = sum(torch.logsumexp(ref[m], 0) - math.log(K) for m in range(M)) / M     # [B]
    torch.testing.assert_close(stats['bound'], ref_bound.sum(), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(loss.detach(), -ref_bound.sum(), rtol=1e-8, atol=1e-8)


def test_sample_latents_draws_from_the_right_distributions():
    "u[m] ~ q(. | x_m) (not another modality's posterior) and w_aux[..., d, :] ~ r_d (its learned scale)."
    torch.manual_seed(0)
    model = build_cmvae('polymnist', d_w=3, d_z=4, n_clusters=5, width=0.0625, n_modalities=3).double()
    with torch.no_grad(): model.aux_raw_scale.copy_(torch.linspace(-1, 1, 9, dtype=torch.float64).view(3, 3))
    M, B, D = 3, 2, 7
    loc = torch.randn(M, B, D, dtype=torch.float64) * 3
    scale = torch.rand(M, B, D, dtype=torch.float64) + 0.2
    u, w_aux = co.sample_latents(model, loc, scale, 20000)
    torch.testing.assert_close(u.median(1).values, loc, atol=0.05 * 3, rtol=0)
    torch.testing.assert_close((u - loc[:, None]).abs().mean(1), scale, atol=0.03, rtol=0.03)   # Laplace: E|u-loc| = s
    aux_scale = model.aux_prior().scale                                                          # [M_dec, D_w]
    torch.testing.assert_close(w_aux.abs().mean((0, 1, 2)), aux_scale, atol=0.03, rtol=0.03)
    assert u.requires_grad is False or u.grad_fn is not None


def _grads(model, xs, K, beta, kind, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, stats = co.objective(model, xs, K, beta, kind)
    loss.backward()
    return stats['bound'], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('family,K', [('laplace', 3), ('normal', 4)])
def test_dreg_mmvae_matches_independent_estimator(family, K):
    "MMVAE's recipe: q's parameters held fixed inside every log q, w~^2 on the path (biased here for K > 1: test_objectives_bias)."
    model, xs = tiny_model('polymnist', family, seed=1)
    beta = 2.5
    b_iwae, g_iwae = _grads(model, xs, K, beta, 'iwae', 5)
    b_dreg, g_dreg = _grads(model, xs, K, beta, 'dreg_mmvae', 5)
    torch.testing.assert_close(b_dreg, b_iwae, rtol=1e-12, atol=0)                 # same bound value
    enc_names = [n for n in g_iwae if n.startswith('encoders.')]
    assert enc_names and set(g_dreg) == set(g_iwae)
    for n in g_iwae:   # decoders and prior parameters (pi logits, cluster means, aux scales): the IWAE gradient
        if not n.startswith('encoders.'): torch.testing.assert_close(g_dreg[n], g_iwae[n], rtol=1e-10, atol=1e-12)

    # independent DReG (Tucker et al. 2019): sum_k w~_k^2 d lw_k / d u_k  d u_k / d phi, q's parameters held fixed
    torch.manual_seed(5)
    loc, scale = model.encode(xs)
    u, w_aux = co.sample_latents(model, loc, scale, K)
    u_leaf = u.detach().requires_grad_()
    lw = naive_log_weights(model, xs, loc.detach(), scale.detach(), u_leaf, w_aux.detach(), beta)
    dlw_du, = torch.autograd.grad(lw.sum(), u_leaf)      # lw[m, k, b] depends on u[m, k, b] only (eval mode)
    wt = torch.softmax(lw.detach(), 1)                    # [M, K, B]
    M = len(xs)
    enc_params = [p for n, p in model.named_parameters() if n.startswith('encoders.')]
    ref = torch.autograd.grad(u, enc_params, grad_outputs=-(wt ** 2).unsqueeze(-1) * dlw_du / M)
    for n, r in zip(enc_names, ref): torch.testing.assert_close(g_dreg[n], r, rtol=1e-7, atol=1e-10)
    # and it is a different estimator from IWAE's
    assert any(not torch.allclose(g_dreg[n], g_iwae[n], rtol=1e-3) for n in enc_names)


@pytest.mark.parametrize('family', ['laplace', 'normal'])
def test_dreg_mixture_is_tuckers_dreg_for_one_expert_and_keeps_the_other_gradients(family):
    "One modality and β = 1: the mixture is the sampling density and dreg_mixture = dreg_mmvae = Tucker's DReG exactly."
    torch.manual_seed(0)
    one = build_cmvae('polymnist', d_w=3, d_z=4, n_clusters=5, width=0.0625, family=family, n_modalities=1).double()
    x1 = [_images(3, M=1, seed=4)[0].double()]
    _, g_mix = _grads(one, x1, 4, 1.0, 'dreg_mixture', 7)
    _, g_mm = _grads(one, x1, 4, 1.0, 'dreg_mmvae', 7)
    for n in g_mm: torch.testing.assert_close(g_mix[n], g_mm[n], rtol=1e-10, atol=1e-12)
    model, xs = tiny_model('polymnist', family, seed=1)          # three experts: only the encoders' gradients change
    b_iwae, g_iwae = _grads(model, xs, 4, 2.5, 'iwae', 5)
    b_mix, g_mix = _grads(model, xs, 4, 2.5, 'dreg_mixture', 5)
    torch.testing.assert_close(b_mix, b_iwae, rtol=1e-12, atol=0)
    enc = [n for n in g_iwae if n.startswith('encoders.')]
    for n in g_iwae:
        if n not in enc: torch.testing.assert_close(g_mix[n], g_iwae[n], rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(g_mix[n], g_iwae[n], rtol=1e-3) for n in enc)


def test_the_ambiguous_name_dreg_is_refused_with_its_new_names():
    model, xs = tiny_model('polymnist', 'laplace')
    with pytest.raises(ValueError, match="'dreg_mmvae' is MMVAE's recipe.*'dreg_mixture'.*'dreg_original'"):
        co.objective(model, xs, kind='dreg')
    with pytest.raises(ValueError, match="CMVAEConfig.objective: 'dreg' is ambiguous"):
        ct.CMVAEConfig(objective='dreg')


@pytest.mark.parametrize('dataset,family', [('polymnist', 'laplace'), ('cubicc', 'normal')])
def test_dreg_original_gives_the_iwae_gradient(dataset, family):
    "§2.3: the original code's 'dreg' has the IWAE gradient (its loss value is a weighted mean of lw, not the bound)."
    model, xs = tiny_model(dataset, family, seed=2)
    b_iwae, g_iwae = _grads(model, xs, 3, 1.0, 'iwae', 9)
    b_orig, g_orig = _grads(model, xs, 3, 1.0, 'dreg_original', 9)
    torch.testing.assert_close(b_orig, b_iwae, rtol=1e-12, atol=0)
    assert set(g_orig) == set(g_iwae)
    for n in g_iwae:   # equal up to float64 rounding (softmax backward vs a detached softmax)
        torch.testing.assert_close(g_orig[n], g_iwae[n], rtol=1e-9, atol=1e-12 * float(g_iwae[n].abs().max()))


# ---------------------------------------------------------------------------------------------------- training
def synthetic_splits(n_train=128, n_val=32, M=2, seed=0):
    "Tiny PolyMNIST-shaped splits (uint8 images, 10 labels)."
    g = torch.Generator().manual_seed(seed)
    def split(n, name):
        return MultimodalDataset([torch.randint(0, 256, (n, 3, 28, 28), generator=g, dtype=torch.uint8) for _ in range(M)],
                                 torch.arange(n) % 10, ['image'] * M, name)
    return dict(train=split(n_train, 'train'), val=split(n_val, 'val'))


def tiny_cfg(**changes):
    base = dict(dataset='polymnist', width=0.0625, K=2, batch_size=32, epochs=2, d_z=4, d_w=4, n_clusters=4,
                beta=2.5, seed=3, device='cpu', channels_last=True)
    return ct.CMVAEConfig(**{**base, **changes})


@pytest.fixture(scope='module')
def splits():
    return synthetic_splits()


def _assert_states_equal(a, b, where=''):
    "torch.equal on every tensor of two nested state structures."
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a: _assert_states_equal(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): _assert_states_equal(x, y, f'{where}[{i}]')
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


def test_resume_equals_uninterrupted_run(splits, tmp_path):
    cfg = tiny_cfg()
    m_full, h_full = ct.fit(cfg, splits, out_dir=tmp_path / 'full', progress=False)
    _, h1 = ct.fit(cfg, splits, out_dir=tmp_path / 'cut', progress=False, stop_after_epoch=1)
    assert len(h1) == 1 and ct.load_checkpoint(tmp_path / 'cut' / 'checkpoint.pt')['epoch'] == 1
    m_res, h_res = ct.fit(cfg, splits, out_dir=tmp_path / 'cut', progress=False)
    _assert_states_equal(m_res.state_dict(), m_full.state_dict(), 'model')
    full, res = ct.load_checkpoint(tmp_path / 'full' / 'checkpoint.pt'), ct.load_checkpoint(tmp_path / 'cut' / 'checkpoint.pt')
    assert full['epoch'] == res['epoch'] == 2
    _assert_states_equal(res['model'], full['model'], 'checkpoint model')
    _assert_states_equal(res['optimizer'], full['optimizer'], 'optimizer')
    assert res['optimizer']['state'], 'the optimiser state must be saved'
    assert [{k: v for k, v in r.items() if k != 'seconds'} for r in h_res] == \
           [{k: v for k, v in r.items() if k != 'seconds'} for r in h_full]


class _NaNAt:
    "Wraps cmvae.train's objective: the training call number `call` (0-based, counted in grad mode) returns NaN."
    def __init__(self, call, finite_loss_nan_grad=False):
        self.call, self.n, self.nan_grad, self.real = call, 0, finite_loss_nan_grad, co.objective

    def __call__(self, model, xs, K, beta, kind):
        loss, stats = self.real(model, xs, K, beta, kind)
        if torch.is_grad_enabled():
            if self.n == self.call:
                if self.nan_grad:   # finite value, NaN gradient: d/dp sqrt(p - p) = inf - inf
                    loss = loss + torch.sqrt(model.prior_logits - model.prior_logits).sum()
                else:
                    loss = loss * float('nan')
            self.n += 1
        return loss, stats


def _record_saves(monkeypatch):
    "Wrap the training loop's checkpoint writer to remember a copy of the model state at every save."
    saved, real = [], cl.write_checkpoint
    def wrapper(path, parts, **fields):
        saved.append((fields['epoch'], copy.deepcopy(parts['model'].state_dict())))
        return real(path, parts, **fields)
    monkeypatch.setattr(cl, 'write_checkpoint', wrapper)
    return saved


@pytest.mark.parametrize('sync_every', [None, 3])
def test_nan_guard_keeps_the_last_good_checkpoint(splits, tmp_path, monkeypatch, sync_every):
    monkeypatch.setattr(ct, 'objective', _NaNAt(5))        # 4 steps per epoch: call 5 = epoch 2, step 1
    saved = _record_saves(monkeypatch)
    with pytest.raises(ct.NonFiniteLossError, match='epoch 2, step 1'):
        ct.fit(tiny_cfg(), splits, out_dir=tmp_path, progress=False, sync_every=sync_every)
    assert [e for e, _ in saved] == [1]
    state = ct.load_checkpoint(tmp_path / 'checkpoint.pt')
    assert state['epoch'] == 1
    _assert_states_equal(state['model'], saved[0][1], 'checkpoint')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pt', 'log.csv', 'train.log']


def test_nan_in_first_epoch_writes_no_checkpoint(splits, tmp_path, monkeypatch):
    monkeypatch.setattr(ct, 'objective', _NaNAt(0))
    with pytest.raises(ct.NonFiniteLossError, match='epoch 1, step 0'):
        ct.fit(tiny_cfg(epochs=1), splits, out_dir=tmp_path, progress=False)
    assert not (tmp_path / 'checkpoint.pt').exists()


def test_nan_gradient_never_reaches_a_checkpoint(splits, tmp_path, monkeypatch):
    "A finite loss with a NaN gradient in epoch 2 corrupts the weights; the epoch-1 checkpoint stays, finite and untouched."
    monkeypatch.setattr(ct, 'objective', _NaNAt(7, finite_loss_nan_grad=True))   # 4 steps per epoch: epoch 2, last step
    saved = _record_saves(monkeypatch)
    with pytest.raises(ct.NonFiniteLossError, match='epoch 2: parameters or validation loss became non-finite'):
        ct.fit(tiny_cfg(), splits, out_dir=tmp_path, progress=False)
    assert [e for e, _ in saved] == [1]                                  # epoch 2's corrupted weights were never written
    state = ct.load_checkpoint(tmp_path / 'checkpoint.pt')
    assert state['epoch'] == 1
    assert all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())
    _assert_states_equal(state['model'], saved[0][1], 'checkpoint')


@pytest.mark.parametrize('changes,field', [
    (dict(dataset='mnist'), 'dataset'), (dict(beta=0), 'beta'), (dict(beta=-1.0), 'beta'),
    (dict(beta=float('nan')), 'beta'), (dict(K=0), 'K'), (dict(K=2.5), 'K'), (dict(d_z=0), 'd_z'),
    (dict(d_w=-3), 'd_w'), (dict(n_clusters=0), 'n_clusters'), (dict(n_clusters=5000), 'n_clusters'),
    (dict(device='gpu'), 'device'), (dict(device='cuda:x'), 'device'), (dict(precision='fp16'), 'precision'),
    (dict(batch_size=0), 'batch_size'), (dict(width=0), 'width'), (dict(objective='elbo'), 'objective'),
])
def test_bad_config_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf'CMVAEConfig\.{field}\b'):
        ct.CMVAEConfig(**changes)
    with pytest.raises(ValueError, match=rf'CMVAEConfig\.{field}\b'):   # also through replace / from_dict
        ct.CMVAEConfig().replace(**changes)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"grid\.yaml: unknown key\(s\) \['bogus', 'lr_decay'\]"):
        ct.CMVAEConfig.from_dict(dict(beta=1.0, bogus=1, lr_decay=0.5), where='grid.yaml')
    assert ct.CMVAEConfig.from_dict(dict(beta=1.0, K=3)).K == 3


def test_fit_time_checks(splits, tmp_path):
    with pytest.raises(ValueError, match=r'CMVAEConfig\.n_clusters.*128 training tuples'):
        ct.fit(tiny_cfg(n_clusters=200), splits, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda'"):
            ct.fit(tiny_cfg(device='cuda'), splits, progress=False)


def test_resume_with_a_changed_config_is_refused(splits, tmp_path):
    ct.fit(tiny_cfg(epochs=1), splits, out_dir=tmp_path, progress=False)
    before = (tmp_path / 'checkpoint.pt').read_bytes()
    with pytest.raises(ValueError, match=r"different configuration.*'beta': \(2\.5, 1\.0\)") as e:
        ct.fit(tiny_cfg(epochs=2, beta=1.0), splits, out_dir=tmp_path, progress=False)
    # what to do, for a command-line user too: delete the run folder, or resume: false in the grid file
    assert f'delete {tmp_path}' in str(e.value) and '`resume: false` in the grid file' in str(e.value)
    assert (tmp_path / 'checkpoint.pt').read_bytes() == before
    # settings listed as resumable (here: more epochs) are accepted
    _, hist = ct.fit(tiny_cfg(epochs=2), splits, out_dir=tmp_path, progress=False)
    assert [r['epoch'] for r in hist] == [1, 2]


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pt'
    cl.atomic_save({'epoch': 1, 'w': torch.arange(3)}, path)
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        cl.atomic_save({'epoch': 2, 'w': torch.arange(5)}, path)
    with pytest.raises(OSError, match='disk full'):   # the same through save_checkpoint
        model = torch.nn.Linear(2, 2)
        ct.save_checkpoint(path, model, torch.optim.Adam(model.parameters()), 2, {}, [])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['checkpoint.pt']   # no temporary files left behind
    assert ct.load_checkpoint(path)['epoch'] == 1
    path.write_bytes(b'garbage')
    with pytest.raises(RuntimeError, match='unreadable checkpoint'):
        ct.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        ct.load_checkpoint(tmp_path / 'missing.pt')


def test_train_step_benchmark_runs():
    "bench/train_step.py keeps working with the core's API (a smoke run at a tiny width; nothing is timed here)."
    import importlib.util
    spec = importlib.util.spec_from_file_location('bench_train_step', Path(__file__).resolve().parents[1] / 'bench' / 'train_step.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for dataset, batch in (('polymnist', 4), ('cubicc', 2)):
        r = bench.time_train_step(dataset, batch=batch, K=2, width=0.0625, threads=None, steps=1, warmup=0)
        assert r['samples_per_s'] > 0 and len(r['step_seconds']) == 1 and r['torch'] == torch.__version__


def test_step_anatomy_helpers():
    "bench/step_anatomy.py: the fit recovers an exact line, the recorder sees every convolution of a step (the fused phase convolutions too) and puts F.conv2d back, and the replay runs each kernel."
    import importlib.util, sys
    import torch.nn.functional as F
    bench_dir = Path(__file__).resolve().parents[1] / 'bench'
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location('bench_step_anatomy', bench_dir / 'step_anatomy.py')
        sa = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sa)
    finally: sys.path.remove(str(bench_dir))
    fit = sa.fit_fixed_per_tuple([8, 32, 128], [0.02 + 0.001 * b for b in (8, 32, 128)])
    assert fit['fixed_s'] == pytest.approx(0.02) and fit['per_tuple_s'] == pytest.approx(0.001) and fit['r2'] == pytest.approx(1)
    step, _, model = sa.build_step('polymnist', 2, 1, 0.0625, n_modalities=2, n_clusters=4)
    original, calls = F.conv2d, []
    with sa.recording_convolutions(calls): step()
    assert F.conv2d is original
    n_modules = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    n_fused = sum(isinstance(m, torch.nn.Upsample) for m in model.modules())   # each fused block runs its phase conv instead of conv_0
    assert len(calls) == n_modules and n_fused > 0
    assert any(ws[-1] == 2 for _, ws, *_ in calls)   # the 2x2 phase kernels were seen
    for kernel in sa.KERNELS: assert sa.replay_convolutions(calls[:3], kernel, reps=1) > 0
