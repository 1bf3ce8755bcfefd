"""Is a gradient estimator unbiased for the stratified mixture objective? A paired Monte-Carlo check (spec §2.3).

The model holds N identical copies of one two-modality tuple on a toy with a 1-D private and a 1-D shared latent
(two experts), so the gradient w.r.t. copy b's encoder outputs is one independent draw of each estimator. All
estimators see the same noise. IWAE's gradient is unbiased, so the mean of the paired difference (estimator − IWAE)
is the estimator's bias, and its standard error is the standard deviation of the difference / sqrt(N).

* `dreg_mmvae` (MMVAE's recipe) must be biased at K = 4 and K = 10: the test fails if it were unbiased;
* `dreg_mixture` must be unbiased at K = 1, 4 and 10: within 3 standard errors on every coordinate.
"""
import functools
import math

import pytest
import torch
from torch import nn

from cmvae.model import CMVAE, Likelihood
from cmvae.nets import FixedEncoder, LinearDecoder
from cmvae.objectives import objective, standard_noise

N = 100_000


def toy(n: int, experts: int = 2) -> tuple[CMVAE, list]:
    "n copies of one tuple; experts q(z|x_1) = N(0.5, .), q(z|x_2) = N(-0.4, .) overlap, so responsibilities matter."
    f64 = dict(dtype=torch.float64)
    enc_out = [([-0.1, 0.5], [0.3, -0.2]), ([0.4, -0.4], [-0.5, 0.6])][:experts]   # ([w ; z] loc, raw scale)
    encs = nn.ModuleList(FixedEncoder(torch.tensor(l, **f64).expand(n, 2), torch.tensor(r, **f64).expand(n, 2))
                         for l, r in enc_out)
    decs = nn.ModuleList([LinearDecoder(torch.tensor([[1.2], [0.9]], **f64), torch.tensor([0.0], **f64), (1, 1, 1)),
                          LinearDecoder(torch.tensor([[0.4], [-1.1]], **f64), torch.tensor([0.3], **f64), (1, 1, 1))][:experts])
    model = CMVAE(encs, decs, [Likelihood('image', 0.6)] * experts, d_w=1, d_z=1, n_clusters=3, family='normal').double()
    with torch.no_grad():
        model.cluster_means.copy_(torch.tensor([[-1.2], [0.1], [1.3]]))
        model.prior_logits.copy_(torch.tensor([0.3, -0.1, 0.0]))
    xs = [torch.full((n, 1, 1, 1), 0.4, **f64), torch.full((n, 1, 1, 1), -0.6, **f64)][:experts]
    return model, xs


@functools.lru_cache(maxsize=None)
def per_copy_gradients(K: int, beta: float, experts: int = 2, seed: int = 0) -> dict:
    "{estimator: `[N, 4 * experts]`} gradients w.r.t. each copy's encoder outputs, all estimators on the same noise."
    model, xs = toy(N, experts)
    torch.manual_seed(seed)
    noise = standard_noise(model, experts, K, N, torch.float64)
    out = {}
    for k in ('iwae', 'dreg_mmvae', 'dreg_mixture'):
        model.zero_grad(set_to_none=True)
        objective(model, xs, K, beta, k, noise=noise)[0].backward()
        out[k] = torch.cat([torch.cat([e.loc.grad, e.raw_scale.grad], -1) for e in model.encoders], -1)
    return out


def paired_z_scores(kind: str, K: int, beta: float = 1.5, experts: int = 2) -> torch.Tensor:
    "(mean of estimator − IWAE) / its standard error, per encoder-output coordinate."
    g = per_copy_gradients(K, beta, experts)
    d = g[kind] - g['iwae']
    return d.mean(0) / (d.std(0) / math.sqrt(N))


@pytest.mark.parametrize('K', [4, 10])
def test_mmvae_style_dreg_is_biased_for_the_stratified_mixture(K):
    z = paired_z_scores('dreg_mmvae', K, beta=1.0)     # beta = 1: the bias comes from the mixture alone
    print(f'dreg_mmvae, K={K}: largest bias = {z.abs().max():.1f} standard errors')
    assert z.abs().max() > 10, f'dreg_mmvae looks unbiased at K={K} (max {z.abs().max():.1f} s.e.): the known bias is gone?'


@pytest.mark.parametrize('K', [1, 4, 10])
def test_dreg_mixture_is_unbiased(K):
    z = paired_z_scores('dreg_mixture', K)
    print(f'dreg_mixture, K={K}: largest deviation = {z.abs().max():.2f} standard errors')
    assert z.abs().max() < 3, f'dreg_mixture deviates from IWAE by {z.abs().max():.1f} standard errors at K={K}'


def test_with_one_expert_only_beta_makes_mmvae_style_dreg_biased():
    "One expert: at β = 1 both DReGs are Tucker's (unbiased); at β = 2.5 the w~^2 factor is wrong, the mixture DReG is not."
    for beta, biased in ((1.0, False), (2.5, True)):
        z_mm, z_mix = paired_z_scores('dreg_mmvae', 4, beta, experts=1), paired_z_scores('dreg_mixture', 4, beta, experts=1)
        print(f'one expert, K=4, beta={beta}: dreg_mmvae {z_mm.abs().max():.1f}, dreg_mixture {z_mix.abs().max():.2f} standard errors')
        assert (z_mm.abs().max() > 10) == biased and z_mix.abs().max() < 3
