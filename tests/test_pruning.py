"""Post-hoc cluster selection (cmvae.pruning, method spec §5): recovery of a known number of clusters, the
equivalence of the cached and re-encoding paths, the step records, and the edge cases the original got wrong."""
import inspect
import math

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

import cmvae.pruning as pruning
from cmvae.data import MultimodalDataset
from cmvae.model import CMVAE, Likelihood, build_cmvae, aggregate_assignments
from cmvae.pruning import (apply_pruning, cache_latents, load_trained, score_pass, select_clusters,
                           select_from_cache)

torch.set_num_threads(1)


class CopyEncoder(nn.Module):
    "Copies its input (undoing the dataset's /255 of images) into the z location; tiny fixed posterior scale."
    def __init__(self, d_w, d_z, raw_scale=-3.):
        super().__init__()
        self.d_w = d_w
        self.register_buffer('raw', torch.full((d_w + d_z,), raw_scale))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        z = x.flatten(1) * 255
        return torch.cat([z.new_zeros(len(z), self.d_w), z], -1), self.raw.expand(len(z), -1)


class CountingDecoder(nn.Module):
    def __init__(self, d_w, d_z):
        super().__init__()
        self.lin = nn.Linear(d_w + d_z, d_z)
        self.calls = 0

    def forward(self, u):
        self.calls += 1
        return self.lin(u).unflatten(-1, (1, 1, -1))


def mixture_model(centres, prior_means, n=300, M=3, d_w=2, noise=0.4, seed=0, logits=None):
    "A CMVAE whose prior components are `prior_means`, with data drawn from groups at `centres`."
    g = torch.Generator().manual_seed(seed)
    centres, prior_means = torch.as_tensor(centres, dtype=torch.float), torch.as_tensor(prior_means, dtype=torch.float)
    C, d_z = prior_means.shape
    model = CMVAE(nn.ModuleList(CopyEncoder(d_w, d_z) for _ in range(M)),
                  nn.ModuleList(CountingDecoder(d_w, d_z) for _ in range(M)),
                  [Likelihood('image')] * M, d_w, d_z, C, family='normal')
    with torch.no_grad():
        model.cluster_means.copy_(prior_means)
        if logits is not None: model.prior_logits.copy_(torch.as_tensor(logits, dtype=torch.float))
    labels = torch.randint(len(centres), (n,), generator=g)
    z = centres[labels] + noise * torch.randn(n, d_z, generator=g)
    mods = [(z + 0.1 * torch.randn(n, d_z, generator=g)).view(n, 1, 1, d_z) for _ in range(M)]
    return model.eval(), MultimodalDataset(mods, labels, ['image'] * M, name='mixture')


def redundant_mixture(seed=0):
    "k = 4 groups in 3-d, C = 10 components: 4 on the groups, 3 near-duplicates, 3 far from any data; ids shuffled."
    g = torch.Generator().manual_seed(seed)
    centres = 6. * torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]])
    means = torch.cat([centres, centres[:3] + 0.3 * torch.randn(3, 3, generator=g),
                       torch.tensor([[30., 0, 0], [0, -30, 0], [0, 0, -30]])])
    perm = torch.randperm(10, generator=g)
    model, data = mixture_model(centres, means[perm], n=400, seed=seed, logits=0.3 * torch.randn(10, generator=g))
    ids = perm.argsort()                      # cluster id of each row of `means`
    return model, data, ids[:4], ids[4:7], ids[7:]


def gen(seed=0): return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize('normalise', ['initial', 'active'])
@pytest.mark.parametrize('seed', [0, 1])
def test_recovers_the_known_number_of_clusters(normalise, seed):
    model, data, true_ids, redundant, empty = redundant_mixture(seed)
    res = select_clusters(model, data, beta=1.0, normalise=normalise, generator=gen(seed), progress=False)
    assert res.n_clusters == 4 and len(res.active) == 10
    # one cluster per group is kept (for a duplicated group, either copy may survive)
    apply_pruning(model, res)
    assert model.active.sum() == 4
    xs, labels = next(data.batches(len(data)))
    preds = model.assign(xs, use_mean=True)
    assert set(preds.tolist()) == set(res.selected)
    assert normalized_mutual_info_score(labels.numpy(), preds.numpy()) > 0.99
    assert res.steps[res.best_step]['nmi'] > 0.99
    assert set(empty.tolist()) == set(res.removal_order[:3])   # empty clusters go first


def test_cached_and_reencode_paths_agree_on_fixed_samples():
    model, data, *_ = redundant_mixture(0)
    fast = select_clusters(model, data, beta=1.0, generator=gen(5), batch_size=64, progress=False)
    enc_calls = [e.calls for e in model.encoders]
    assert all(d.calls == 0 for d in model.decoders)              # the fast path never decodes
    slow = select_clusters(model, data, beta=1.0, method='reencode', resample=False, generator=gen(5), batch_size=64,
                           progress=False)
    n_batches, passes = math.ceil(len(data) / 64), 10
    assert [e.calls - c for e, c in zip(model.encoders, enc_calls)] == [passes * n_batches] * 3
    assert all(d.calls == passes * n_batches for d in model.decoders)   # the slow path runs the full forward
    assert slow.steps == fast.steps
    assert torch.equal(slow.active, fast.active) and slow.removal_order == fast.removal_order
    # the original's behaviour: fresh samples at every pass give (slightly) different criteria
    fresh = select_clusters(model, data, beta=1.0, method='reencode', generator=gen(5), batch_size=64, progress=False)
    assert fresh.steps[0]['pne'] == fast.steps[0]['pne']            # the first pass uses the same draws
    assert any(f['pne'] != s['pne'] for f, s in zip(fresh.steps[1:], fast.steps[1:]))


def test_paths_agree_on_a_real_cmvae():
    torch.manual_seed(0)
    model = build_cmvae('polymnist', d_w=4, d_z=4, n_clusters=4, width=0.125).eval()
    g = gen(1)
    data = MultimodalDataset([torch.randint(0, 256, (24, 3, 28, 28), dtype=torch.uint8, generator=g) for _ in range(5)],
                             torch.randint(0, 10, (24,), generator=g), ['image'] * 5)
    fast = select_clusters(model, data, beta=2.5, generator=gen(2), batch_size=10, progress=False)
    slow = select_clusters(model, data, beta=2.5, method='reencode', resample=False, generator=gen(2), batch_size=10,
                           progress=False)
    assert slow.steps == fast.steps and torch.equal(slow.active, fast.active)
    assert [s['n_clusters'] for s in fast.steps] == [4, 3, 2, 1]


def _reference_pass(model, lpz_c, active, beta, eps=1e-20):
    "Spec §5.1 written out per tuple, as the original: log(pi + eps), gamma + 1e-20, scipy entropy, torch.mode."
    logits = model.prior_logits.detach().clone()
    logits[~active] = -1e8
    log_pi = torch.log(torch.softmax(logits, -1) + eps).double()
    M, N, C = lpz_c.shape
    ll, Hn, votes, gammas = np.zeros((M, N)), np.zeros((M, N)), np.zeros((M, N), dtype=int), np.zeros((M, N, C))
    for m in range(M):
        for n in range(N):
            a = log_pi + lpz_c[m, n].double()
            gamma = torch.softmax(a, -1) + 1e-20
            ll[m, n] = float((gamma * (a - gamma.log())).sum()) / model.d_z
            g = gamma.numpy()
            Hn[m, n] = scipy.stats.entropy(g) / np.log(np.count_nonzero(g))
            votes[m, n] = int(gamma.argmax()); gammas[m, n] = g
    preds = torch.mode(torch.as_tensor(votes), 0).values.numpy()
    conf = gammas.mean(0).max(-1)
    mass = np.bincount(preds, weights=conf, minlength=C)
    return beta * Hn.mean() - ll.mean(), Hn.mean(), ll.mean(), preds, mass


def test_score_pass_matches_the_original_formulas():
    model, data, *_ = redundant_mixture(2)
    cache = cache_latents(model, data.subset(torch.arange(60)), generator=gen(0), progress=False)
    for active in (torch.ones(10, dtype=torch.bool), torch.tensor([True, False] * 5), torch.arange(10) < 3):
        s = score_pass(model, cache.lpz_c, active, beta=2.5, pi_eps=1e-20)
        pne, Hn, ll, preds, mass = _reference_pass(model, cache.lpz_c, active, 2.5)
        assert abs(s.pne - pne) < 1e-4 and abs(s.entropy - Hn) < 1e-5 and abs(s.loglik - ll) < 1e-4
        assert np.array_equal(s.clusters.numpy(), preds)
        assert np.allclose(s.mass.numpy(), mass, atol=1e-4)
    # the corrected normaliser divides by log |active| instead of log C
    half = torch.arange(10) < 5
    a = score_pass(model, cache.lpz_c, half, 1.0, normalise='active')
    i = score_pass(model, cache.lpz_c, half, 1.0, normalise='initial')
    assert abs(a.entropy - i.entropy * math.log(10) / math.log(5)) < 1e-5


def test_step_records_are_consistent():
    model, data, *_ = redundant_mixture(3)
    res = select_clusters(model, data, beta=1.0, generator=gen(0), progress=False)
    steps, C = res.steps, 10
    assert [s['n_clusters'] for s in steps] == list(range(C, 0, -1))
    assert steps[0]['removed'] is None and sorted(res.removal_order) == sorted(set(res.removal_order))
    active = torch.ones(C, dtype=torch.bool)
    for prev, cur in zip(steps, steps[1:]):
        mass = torch.tensor(prev['mass'])
        j = cur['removed']
        assert active[j] and cur['removed_mass'] == mass[j]
        assert mass[j] == mass[active].min()
        assert j == int(torch.nonzero(active & (mass == mass[active].min()))[0])   # ties: the smallest id
        active[j] = False
        assert all(m == 0 for k, m in enumerate(cur['mass']) if not active[k])     # nothing assigned to pruned clusters
    assert [s['eligible'] for s in steps] == [True] * (C - 1) + [False]
    eligible = [i for i, s in enumerate(steps) if s['eligible']]
    assert res.best_step == min(eligible, key=lambda i: steps[i]['pne'])
    assert steps[res.best_step]['pne'] <= min(steps[i]['pne'] for i in eligible)
    expected = torch.ones(C, dtype=torch.bool); expected[res.removal_order[:res.best_step]] = False
    assert torch.equal(res.active, expected) and res.n_clusters == C - res.best_step


def test_last_step_is_never_chosen_and_no_improvement_keeps_everything():
    # one group between two close components, plus an empty one: the single-cluster step has the lowest PNE
    model, data = mixture_model([[0., 0.]], [[-0.5, 0.], [0.5, 0.], [30., 0.]], n=90, noise=0.3)
    r = select_clusters(model, data, beta=1.0, progress=False)
    assert r.steps[-1]['pne'] < min(s['pne'] for s in r.steps[:-1])
    assert r.n_clusters == 2 and r.best_step == 1
    # with the corrected normaliser no removal improves the criterion: nothing is pruned (the original crashed)
    r = select_clusters(model, data, beta=1.0, normalise='active', progress=False)
    assert r.best_step == 0 and r.n_clusters == 3 and r.active.all()
    # every component is a real, well-separated group: any removal hurts
    centres = 8. * torch.tensor([[1., 0], [-1, 0], [0, 1], [0, -1]])
    model, data = mixture_model(centres, centres, n=200)
    for method in ('cached', 'reencode'):
        r = select_clusters(model, data, beta=1.0, method=method, progress=False)
        assert r.best_step == 0 and r.n_clusters == 4 and r.selected == [0, 1, 2, 3]
        assert all(s['pne'] > r.steps[0]['pne'] for s in r.steps[1:])


def test_runs_on_a_device_argument_and_never_hard_codes_cuda():
    assert '.cuda(' not in inspect.getsource(pruning)
    model, data, *_ = redundant_mixture(0)
    ref = select_clusters(model, data, beta=1.0, generator=gen(0), progress=False)
    for device in ('cpu', torch.device('cpu')):
        r = select_clusters(model, data, beta=1.0, device=device, generator=gen(0), labels=None, progress=False)
        assert r.active.device.type == 'cpu' and r.n_clusters == ref.n_clusters
        assert 'nmi' not in r.steps[0] and [s['pne'] for s in r.steps] == [s['pne'] for s in ref.steps]
    if torch.cuda.is_available():
        r = select_clusters(model, data, beta=1.0, device='cuda', generator=torch.Generator('cuda').manual_seed(0), progress=False)
        assert r.n_clusters == ref.n_clusters


def test_select_from_cache_and_use_mean():
    model, data, *_ = redundant_mixture(0)
    cache = cache_latents(model, data, use_mean=True, progress=False)
    assert torch.equal(cache.z, torch.stack([x.flatten(1) * 255 for x in data.batch(torch.arange(len(data)))]))
    a = select_from_cache(model, cache, beta=1.0, progress=False)
    b = select_clusters(model, data, beta=1.0, use_mean=True, progress=False)
    assert a.steps == b.steps


def test_bad_arguments_are_named():
    model, data, *_ = redundant_mixture(0)
    with pytest.raises(ValueError, match='method must be one of'): select_clusters(model, data, 1.0, method='fast')
    with pytest.raises(ValueError, match='beta must be'): select_clusters(model, data, beta=-1)
    with pytest.raises(ValueError, match='normalise must be one of'): select_clusters(model, data, 1.0, normalise='x')
    with pytest.raises(ValueError, match='pi_eps'): select_clusters(model, data, 1.0, pi_eps=2)
    with pytest.raises(ValueError, match='modalities'): select_clusters(model, MultimodalDataset(data.modalities[:2], data.labels, ['image'] * 2), 1.0)
    with pytest.raises(ValueError, match='start'): select_clusters(model, data, 1.0, start=torch.zeros(10, dtype=torch.bool))


def test_load_trained_round_trip(tmp_path):
    from cmvae.train import CMVAEConfig, build_model, save_checkpoint
    cfg = CMVAEConfig(width=0.125, n_clusters=5, d_z=4, d_w=4, epochs=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path / 'checkpoint.pt', model, opt, 1, cfg.to_dict(), [])
    loaded, cfg2 = load_trained(tmp_path)
    assert cfg2 == cfg and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    state = model.state_dict(); state.pop('prior_logits')
    save_checkpoint(tmp_path / 'bad.pt', model, opt, 1, cfg.to_dict(), [])
    bad = torch.load(tmp_path / 'bad.pt', weights_only=False); bad['model'] = state; torch.save(bad, tmp_path / 'bad.pt')
    with pytest.raises(RuntimeError, match='do not match'): load_trained(tmp_path / 'bad.pt')


def test_original_preset_reencodes_with_fresh_samples_and_breaks_ties_by_the_largest_id():
    model, data, *_ = redundant_mixture(0)
    res = select_clusters(model, data, beta=1.0, preset='original', generator=gen(0), progress=False)
    s = res.settings
    assert res.method == 'reencode' and s['preset'] == 'original' and s['resample'] is True
    assert s['tie_break'] == 'original' and s['pi_eps'] == 1e-20 and s['batch_means'] == s['batch_size']
    zero = [r['removed'] for r in res.steps[1:] if r['removed_mass'] == 0.0]
    assert len(zero) >= 2 and zero == sorted(zero, reverse=True)      # tied (empty) clusters go largest id first
    default = select_clusters(model, data, beta=1.0, generator=gen(0), progress=False)
    zero_default = [r['removed'] for r in default.steps[1:] if r['removed_mass'] == 0.0]
    assert zero_default == sorted(zero_default) and set(zero_default) == set(zero)
    with pytest.raises(ValueError, match='preset must be one of'):
        select_clusters(model, data, beta=1.0, preset='faithful', progress=False)
