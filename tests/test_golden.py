"""Golden tests: the library against numbers computed by the original authors' CMVAE code (float64, CPU).

The fixture `../shared/golden/cmvae_original_polymnist.pt` (its README sits beside it) stores encoder outputs,
linear decoders, standardised noise and prior parameters, and what the original `cmvae_iwae` / `cmvae_dreg`, the
model forward and the two selection functions of `prune_polyMNIST.py` computed from them. These tests rebuild the
computation from the fixture alone with the library's own model, objective and pruning code
(`FixedEncoder` / `LinearDecoder` from `cmvae.nets`, `noise=` of `cmvae.objectives.objective`, `select_from_cache`).

The fixture is looked up in `$CMVAE_GOLDEN`, else in `shared/golden/` beside the checkout (where CI has it). A
missing fixture is a failure, never a skip.
"""
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cmvae.model import CMVAE, Likelihood
from cmvae.nets import FixedEncoder, LinearDecoder
from cmvae.objectives import objective, log_weights
from cmvae.pruning import PruningCache, select_from_cache, score_pass

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path('shared') / 'golden' / 'cmvae_original_polymnist.pt'
# beside the checkout (CI: <x>/main and <x>/shared), or one level up for a git worktree of it (<x>/wt/<name>)
CANDIDATES = [ROOT.parent / FIXTURE, ROOT.parent.parent / FIXTURE]
GOLDEN = Path(os.environ['CMVAE_GOLDEN']) if 'CMVAE_GOLDEN' in os.environ else next((p for p in CANDIDATES if p.exists()), CANDIDATES[0])
VALUE_RTOL = 1e-10        # log-weights, terms and objective values (README: agreement ~2e-16, dreg 1.5e-13)
GRAD_RTOL = 1e-9          # gradients: max |diff| <= GRAD_RTOL * max |ref|, per tensor (README: <= 1.6e-12)


@pytest.fixture(scope='module')
def golden():
    if not GOLDEN.exists():
        where = GOLDEN if 'CMVAE_GOLDEN' in os.environ else ' or '.join(map(str, CANDIDATES))
        pytest.fail(f'golden fixture not found at {where}: it is expected in shared/golden/ beside the checkout '
                    '(../shared/golden/cmvae_original_polymnist.pt), or set CMVAE_GOLDEN to its path')
    return torch.load(GOLDEN, weights_only=True)


def golden_model(f) -> CMVAE:
    "The fixture's model: stored encoder outputs, linear decoders, Laplace likelihoods of scale 0.75, its priors."
    meta, inp, par = f['meta'], f['inputs'], f['params']
    M = meta['M']
    encoders = nn.ModuleList(FixedEncoder(inp['enc_loc'][m], inp['enc_raw_scale'][m]) for m in range(M))
    decoders = nn.ModuleList(LinearDecoder(par['dec_A'][d].double(), par['dec_b'][d], tuple(meta['image_shape']))
                             for d in range(M))
    liks = [Likelihood('image', scale=meta['likelihood_scale']) for _ in range(M)]
    model = CMVAE(encoders, decoders, liks, meta['d_w'], meta['d_z'], meta['n_clusters'], family=meta['family']).double()
    with torch.no_grad():
        for name in ('prior_logits', 'cluster_means', 'cluster_raw_scale', 'w_raw_scale', 'aux_raw_scale'):
            getattr(model, name).copy_(par[name])
    return model


def _close(got, ref, rtol, what):
    got, ref = got.detach().double(), ref.double()
    assert got.shape == ref.shape, f'{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}'
    err = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-300)
    assert err <= rtol, f'{what}: max |diff| / max |ref| = {err:.3g} > {rtol:g}'


def our_gradients(model: CMVAE, A_cols: torch.Tensor) -> dict:
    "d(objective)/dθ (the loss gradient negated) under the fixture's names and reductions."
    g = lambda p: -p.grad
    A = torch.stack([g(d.weight) for d in model.decoders])                              # [M, 64, 2352]
    return dict(enc_loc=torch.stack([g(e.loc) for e in model.encoders]),
                enc_raw_scale=torch.stack([g(e.raw_scale) for e in model.encoders]),
                prior_logits=g(model.prior_logits), cluster_means=g(model.cluster_means),
                aux_raw_scale=g(model.aux_raw_scale),
                dec_b=torch.stack([g(d.bias) for d in model.decoders]),
                dec_A_cols=A[:, :, A_cols], dec_A_fro=A.flatten(1).norm(dim=1), dec_A_colsum=A.sum(1))


@pytest.mark.parametrize('K', [1, 3])
def test_golden_log_weights_and_terms(golden, K):
    case = golden['cases'][f'K{K}']
    model = golden_model(golden)
    xs = list(golden['inputs']['xs'])
    lw, u, terms = log_weights(model, xs, K, golden['meta']['beta'], noise=(case['eps_u'], case['eps_w']))
    _close(lw, case['lw'], VALUE_RTOL, f'K={K} log-weights')
    for name in ('rec', 'H', 'log_q_z', 'log_q_w', 'log_p_w'):
        _close(terms[name], case['terms'][name], VALUE_RTOL, f'K={K} term {name}')
    z = u[..., golden['meta']['d_w']:]
    lpz_c = model.log_pz_given_c(z)
    _close(lpz_c, case['terms']['log_pz_given_c'], VALUE_RTOL, f'K={K} log p(z|c)')
    gamma = torch.softmax(model.log_pi() + lpz_c, -1) + 1e-20
    _close(gamma, case['terms']['gamma'], VALUE_RTOL, f'K={K} p(c|z) + eta')
    _close(torch.softmax(lw, 1), case['weights'], VALUE_RTOL, f'K={K} importance weights')


@pytest.mark.parametrize('K', [1, 3])
@pytest.mark.parametrize('kind,key', [('iwae', 'iwae'), ('dreg_original', 'dreg')])
def test_golden_objective_values_and_gradients(golden, K, kind, key):
    "IWAE and the original's 'dreg' (= our dreg_original): the value and every stored gradient."
    case = golden['cases'][f'K{K}']
    model = golden_model(golden)
    xs = list(golden['inputs']['xs'])
    loss, stats = objective(model, xs, K, golden['meta']['beta'], kind, noise=(case['eps_u'], case['eps_w']))
    _close(-loss, case[key], VALUE_RTOL, f'K={K} {key} value')
    _close(stats['bound'], case['iwae'], VALUE_RTOL, f'K={K} IWAE bound logged by {kind}')
    loss.backward()
    ours = our_gradients(model, golden['dec_A_cols'])
    ref = case[f'grads_{key}']
    assert set(ref) == set(ours), f'stored gradients {sorted(ref)} vs computed {sorted(ours)}'
    for name in ref: _close(ours[name], ref[name], GRAD_RTOL, f'K={K} {key} gradient of {name}')


def test_golden_original_dreg_never_applied_its_hook(golden):
    "The fixture records that the original's DReG hook fired 0 times: its gradients are IWAE's (spec §2.3)."
    for K in (1, 3):
        case = golden['cases'][f'K{K}']
        assert case['dreg_hook_calls'] == 0
        for name, ref in case['grads_iwae'].items(): _close(case['grads_dreg'][name], ref, 1e-12, f'K={K} {name}')


# ------------------------------------------------------------------------------------------------ pruning
def pruning_model(p, M: int = 5) -> CMVAE:
    "A CMVAE holding only the fixture's prior (the selection never calls the networks: latents are given)."
    C, d_z = p['n_clusters'], p['d_z']
    model = CMVAE(nn.ModuleList(nn.Identity() for _ in range(M)), nn.ModuleList(nn.Identity() for _ in range(M)),
                  [Likelihood('image')] * M, d_w=1, d_z=d_z, n_clusters=C, family='laplace').double()
    with torch.no_grad():
        for name in ('prior_logits', 'cluster_means', 'cluster_raw_scale'): getattr(model, name).copy_(p[name])
    return model


def _original_selection(p, dtype=torch.float64):
    model = pruning_model(p).to(dtype)
    z = p['z'].to(dtype)
    with torch.no_grad(): lpz_c = model.log_pz_given_c(z)
    cache = PruningCache(z, lpz_c, p['labels'], 0.0)
    return model, cache, select_from_cache(model, cache, beta=p['beta'], normalise='initial', pi_eps=1e-20,
                                           batch_means=p['batch_size'], tie_break='original', progress=False)


def test_golden_pruning_criterion_at_every_step(golden):
    "Per-step PNE, entropy, log-likelihood, masses, assignments and scores of the fixture's cluster sets."
    p = golden['pruning']
    model, cache, _ = _original_selection(p)
    got = {k: [] for k in ('pne', 'entropy', 'loglik', 'mass')}
    for s, active in enumerate(p['step_active']):
        r = score_pass(model, cache.lpz_c, active, p['beta'], p['labels'], 'initial', 1e-20, p['batch_size'])
        for name in ('pne', 'entropy', 'loglik'): got[name].append(getattr(r, name))
        got['mass'].append(r.mass)
        assert torch.equal(r.clusters, p['step_assign'][s]), f'step {s} assignments'
        for name in ('nmi', 'ari', 'acc'):
            assert math.isclose(r.scores[name], float(p[f'step_{name}'][s]), rel_tol=1e-9, abs_tol=1e-12), f'step {s} {name}'
    for name in ('pne', 'entropy', 'loglik'):   # per tensor over the 12 steps, as the README compares
        _close(torch.tensor(got[name], dtype=torch.float64), p[f'step_{name}'], VALUE_RTOL, f'{name} at every step')
    _close(torch.stack(got['mass']), p['step_mass'], VALUE_RTOL, 'masses at every step')


def test_golden_pruning_removal_order_and_selection(golden):
    "The original's greedy selection: mass ties removed largest id first, last step never eligible."
    p = golden['pruning']
    _, _, res = _original_selection(p)
    assert res.removal_order == p['removal_order'].tolist()
    assert res.removal_order[:6] == [10, 8, 7, 5, 3, 0]          # six zero-mass clusters, descending id
    assert res.best_step == p['best_step']
    assert res.selected == p['selected'].tolist()
    assert res.removal_order[:res.best_step] == p['best_removed'].tolist()
    _close(torch.tensor([s['pne'] for s in res.steps], dtype=torch.float64), p['step_pne'], VALUE_RTOL, 'PNE along the greedy path')
    assert not res.steps[-1]['eligible'] and p['step_pne'].argmin() == len(p['step_pne']) - 1   # the lowest PNE is never chosen


def test_golden_pruning_float32_and_smallest_id_tie_break(golden):
    "float32 gives the original float32 run's path; the smallest-id tie rule removes in another order, same selection."
    p = golden['pruning']
    _, _, res32 = _original_selection(p, torch.float32)
    assert res32.removal_order == p['float32']['removal_order'].tolist()
    assert res32.selected == p['float32']['selected'].tolist() and res32.best_step == p['float32']['best_step']
    np.testing.assert_allclose([s['pne'] for s in res32.steps], p['float32']['step_pne'].numpy(), rtol=0, atol=1e-5)
    model, cache, _ = _original_selection(p)
    res_small = select_from_cache(model, cache, beta=p['beta'], normalise='initial', pi_eps=1e-20,
                                  batch_means=p['batch_size'], tie_break='smallest', progress=False)
    assert res_small.removal_order[:6] == [0, 3, 5, 7, 8, 10]
    assert res_small.selected == p['selected'].tolist() and res_small.best_step == p['best_step']
