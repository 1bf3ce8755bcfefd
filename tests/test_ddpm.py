"""DDPM refiner (cmvae.ddpm, cmvae.ddpm_train): configuration, pairs, schedules, training, resume, NaN guard, sampling."""
import math

import pytest
import torch
from torch import nn

from cmvae.data import MultimodalDataset
from cmvae.ddpm import (DDPMConfig, Refiner, SOURCES, build_refiner, noise_scheduler, refine, refine_outputs,
                        sampling_scheduler)
from cmvae.ddpm_train import Pairs, eval_loss, fit_ddpm, load_refiner, make_pairs, train_refiner
from cmvae.loop import NonFiniteLossError, load_checkpoint, read_log, seed_everything
from cmvae.model import build_cmvae

torch.set_num_threads(1)

TINY = dict(block_out_channels=(8, 16), norm_groups=4, batch_size=16, device='cpu', log_every=2, checkpoint_every=2)
SHAPE = (3, 12, 12)


def smooth_pairs(n=64, seed=0, modalities=(0, 1)):
    "Real images: smooth random blobs; 'VAE' images: their 3x3 box blur (a fixed, deterministic 'VAE')."
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(low, size=SHAPE[1:], mode='bilinear', align_corners=False)
    blur = nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return Pairs(blur, x, torch.tensor(modalities)[torch.arange(n) % len(modalities)])


def params(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize('field, value', [
    ('block_out_channels', ()), ('block_out_channels', (8, 0)), ('layers_per_block', 0), ('norm_groups', 5),
    ('attention_levels', (3,)), ('attention_head_dim', 7), ('dropout', 1.0), ('timesteps', 1), ('beta_start', 0.0),
    ('beta_end', 5e-5), ('lr', 0.0), ('warmup_steps', -1), ('batch_size', 0), ('steps', 0), ('ema_decay', 1.0),
    ('grad_clip', 0.0), ('hflip', 'yes'), ('sources', 'prior'), ('pair_repeats', 0), ('modalities', (1, 1)),
    ('seed', -1), ('device', 'gpu'), ('precision', 'fp16'), ('threads', 0), ('resume', 1),
])
def test_bad_config_names_the_field(field, value):
    changes = dict(attention_levels=(1,)) if field == 'attention_head_dim' else {}
    with pytest.raises(ValueError, match=f'DDPMConfig.{field}'):
        DDPMConfig(**changes, **{field: value})


def test_good_configs():
    assert DDPMConfig().validate() and DDPMConfig.diffusevae().attention_levels == (2,)
    assert DDPMConfig.from_dict({'block_out_channels': [32, 64]}).block_out_channels == (32, 64)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epochs'\]"):
        DDPMConfig.from_dict({'epochs': 3})


# ---------------------------------------------------------------- schedules

def test_scheduler_round_trip_with_the_true_noise():
    "Noising x_0 with a known ε and stepping with ε as the model output gives back x_0 (DDPM) / the noised x_0 (DDIM)."
    r = Refiner(DDPMConfig(**TINY), SHAPE)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, *SHAPE, generator=g) * 2 - 1, torch.randn(4, *SHAPE, generator=g)
    fwd, ddpm = noise_scheduler(r), sampling_scheduler(r, 'ddpm', 1000)
    for t in (0, 1, 100, 500, 900):
        xt = fwd.add_noise(x0, eps, torch.full((4,), t))
        assert torch.allclose(ddpm.step(eps, t, xt).pred_original_sample, x0, atol=1e-5), t
    ddim = sampling_scheduler(r, 'ddim', 50)
    for i in (0, 10, 40):
        t, t_prev = int(ddim.timesteps[i]), int(ddim.timesteps[i + 1])
        xt = fwd.add_noise(x0, eps, torch.full((4,), t))
        assert torch.allclose(ddim.step(eps, t, xt).prev_sample, fwd.add_noise(x0, eps, torch.full((4,), t_prev)), atol=1e-5)
    assert torch.allclose(fwd.betas[[0, -1]], torch.tensor([1e-4, 0.02])) and len(fwd.betas) == 1000


class Oracle(Refiner):
    "Predicts the exact noise of x_t around x_0 = x_vae: a perfect refiner for a perfect VAE."
    def forward(self, x_t, t, x_vae, labels=None):
        abar = noise_scheduler(self).alphas_cumprod[t.cpu()].to(x_t)[:, None, None, None]
        return (x_t - abar.sqrt() * x_vae) / (1 - abar).sqrt()


@pytest.mark.parametrize('kind, steps, strength', [('ddim', 25, 1.0), ('ddpm', 40, 1.0), ('ddpm', 40, 0.5)])
def test_refine_with_an_oracle_returns_the_target(kind, steps, strength):
    "The whole sampling chain (scaling to [-1, 1] and back, schedule, step loop) is exact given the true noise."
    x = torch.rand(5, *SHAPE)
    out = refine(Oracle(DDPMConfig(**TINY), SHAPE), x, steps=steps, scheduler=kind, batch_size=2, strength=strength,
                 generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.allclose(out, x, atol=1e-4), (out - x).abs().max()


class Recorder(Refiner):
    "Records the inputs of its first call and predicts zero noise."
    def forward(self, x_t, t, x_vae, labels=None):
        if not hasattr(self, 'first'): self.first = (x_t.clone(), t.clone(), x_vae.clone())
        return torch.zeros_like(x_t)


@pytest.mark.parametrize('strength, t0', [(1.0, 999), (0.3, 299)])
def test_refine_starts_from_noise_or_from_noised_x_vae(strength, t0):
    "strength 1: x_T is pure noise at t = 999; strength 0.3: x̂ noised to the first DDIM step below 300."
    x = torch.rand(4, *SHAPE)
    rec = Recorder(DDPMConfig(**TINY), SHAPE)
    refine(rec, x, steps=50, strength=strength, generator=torch.Generator().manual_seed(3), progress=False)
    x_t, t, cond = rec.first
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(cond, x * 2 - 1) and (t == t0).all()
    want = noise if strength == 1 else noise_scheduler(rec).add_noise(x * 2 - 1, noise, torch.full((4,), t0))
    assert torch.allclose(x_t, want, atol=1e-6)


# ---------------------------------------------------------------- sampling

def test_refine_keeps_shape_range_device_and_is_deterministic():
    seed_everything(0)
    r = build_refiner(DDPMConfig(**TINY), SHAPE, (0, 3))
    x = torch.rand(5, *SHAPE, dtype=torch.float64) * 1.4 - 0.2                  # unclamped, float64 CMVAE output
    kw = dict(modality=torch.tensor([0, 3, 3, 0, 0]), steps=5, batch_size=2, progress=False)
    a = refine(r, x, generator=torch.Generator().manual_seed(1), **kw)
    b = refine(r, x, generator=torch.Generator().manual_seed(1), **kw)
    c = refine(r, x, generator=torch.Generator().manual_seed(2), **kw)
    assert a.shape == x.shape and a.dtype == torch.float32 and a.device == x.device
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = refine(r, x, generator=torch.Generator().manual_seed(1), scheduler='ddpm', **kw)
    assert d.shape == x.shape and not torch.equal(a, d)
    with pytest.raises(ValueError, match='modality'):
        refine(r, x, steps=2, progress=False)                                     # two modalities: which one?
    with pytest.raises(ValueError, match='not among the refined modalities'):
        refine(r, x, modality=1, steps=2, progress=False)
    with pytest.raises(ValueError, match='steps'):
        refine(r, x, modality=0, steps=0, progress=False)
    with pytest.raises(ValueError, match='strength'):
        refine(r, x, modality=0, steps=5, strength=1.5, progress=False)
    e = refine(r, x, generator=torch.Generator().manual_seed(1), strength=0.5, **kw)   # SDEdit-style: fewer steps, from x̂
    assert e.shape == x.shape and e.min() >= 0 and e.max() <= 1 and not torch.equal(a, e)


def test_refine_outputs_refines_only_the_refiners_modalities():
    seed_everything(0)
    r = build_refiner(DDPMConfig(**TINY), SHAPE, (0, 2))
    outs = [torch.rand(3, *SHAPE), torch.rand(3, *SHAPE), torch.rand(3, *SHAPE), torch.randint(0, 9, (3, 7))]
    got = refine_outputs(r, outs, steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(got[1], outs[1]) and torch.equal(got[3], outs[3])
    assert not torch.equal(got[0], outs[0]) and not torch.equal(got[2], outs[2])
    one = refine(r, torch.cat([outs[0], outs[2]]), modality=torch.tensor([0] * 3 + [2] * 3), steps=3,
                 generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(torch.cat([got[0], got[2]]), one)


# ---------------------------------------------------------------- training

def test_training_lowers_the_loss_on_fixed_pairs():
    "Compared on the same evaluation pairs, timesteps and noise, a few Adam steps lower the ε-prediction loss."
    pairs = smooth_pairs(96)
    cfg = DDPMConfig(**TINY, steps=20, lr=3e-3, ema_decay=None)
    seed_everything(cfg.seed)
    init = build_refiner(cfg, pairs.image_shape, pairs.modalities)               # the weights fit_ddpm starts from
    trained, rows = fit_ddpm(cfg, pairs, progress=False)
    before, after = eval_loss(init, pairs, n=None, seed=5), eval_loss(trained, pairs, n=None, seed=5)
    assert after < 0.7 * before, (before, after)
    assert len(rows) == 10 and all(math.isfinite(r['loss']) for r in rows)


def test_bf16_autocast_trains_and_samples():
    pairs = smooth_pairs(32)
    r, rows = fit_ddpm(DDPMConfig(**TINY, steps=2, precision='bf16'), pairs, progress=False)
    assert all(math.isfinite(row['loss']) for row in rows)
    out = refine(r, torch.rand(2, *SHAPE), modality=1, steps=2, precision='bf16', progress=False)
    assert out.dtype == torch.float32 and out.shape == (2, *SHAPE) and torch.isfinite(out).all()


def test_resume_is_bit_identical(tmp_path):
    "Train 2 steps, checkpoint, resume to 4 == 4 uninterrupted steps (weights, EMA, optimiser; CPU)."
    pairs = smooth_pairs(40)
    cfg = DDPMConfig(**TINY, steps=4, warmup_steps=3, hflip=True, ema_decay=0.9)
    fit_ddpm(cfg, pairs, tmp_path / 'a', progress=False, stop_after_step=2)
    assert load_checkpoint(tmp_path / 'a' / 'checkpoint.pt')['step'] == 2
    resumed, _ = fit_ddpm(cfg, pairs, tmp_path / 'a', progress=False)
    straight, _ = fit_ddpm(cfg, pairs, tmp_path / 'b', progress=False)
    assert same(params(resumed), params(straight))                               # EMA weights
    assert same(params(load_refiner(tmp_path / 'a', ema=False)), params(load_refiner(tmp_path / 'b', ema=False)))
    ca, cb = (load_checkpoint(tmp_path / d / 'checkpoint.pt') for d in 'ab')
    assert all(torch.equal(ca['optimizer']['state'][k]['exp_avg_sq'], cb['optimizer']['state'][k]['exp_avg_sq'])
               for k in cb['optimizer']['state'])
    assert [int(r['step']) for r in read_log(tmp_path / 'a')] == [2, 4]
    with pytest.raises(ValueError, match='different configuration'):
        fit_ddpm(cfg.replace(lr=1e-4), pairs, tmp_path / 'a', progress=False)
    with pytest.raises(ValueError, match='other pairs'):
        fit_ddpm(cfg, smooth_pairs(40, seed=1), tmp_path / 'a', progress=False)


def test_max_strength_limits_the_training_timesteps(monkeypatch):
    "With max_strength 0.25, training (and eval_loss) only ever draws t < 250; the default draws from the whole chain."
    seen = []
    forward = Refiner.forward

    def spy(self, x_t, t, x_vae, labels=None):
        seen.append(t.clone()); return forward(self, x_t, t, x_vae, labels)
    monkeypatch.setattr(Refiner, 'forward', spy)
    pairs = smooth_pairs(64)
    fit_ddpm(DDPMConfig(**TINY, steps=30, max_strength=0.25), pairs, progress=False)
    low = torch.cat(seen)
    assert int(low.max()) < 250 and int(low.max()) > 150                      # the whole range below 250 is used
    seen.clear()
    fit_ddpm(DDPMConfig(**TINY, steps=30), pairs, progress=False)
    assert int(torch.cat(seen).max()) > 500


def test_unconditional_refiner_ignores_the_cmvae_image():
    r = Refiner(DDPMConfig(**TINY, condition=False), SHAPE, (0, 1)).eval()
    x, t, lab = torch.randn(4, *SHAPE), torch.full((4,), 100), r.labels(0, 4)
    with torch.no_grad():
        assert torch.equal(r(x, t, torch.zeros_like(x), lab), r(x, t, torch.rand_like(x), lab))
    c = Refiner(DDPMConfig(**TINY), SHAPE, (0, 1)).eval()
    with torch.no_grad():
        assert not torch.equal(c(x, t, torch.zeros_like(x), lab), c(x, t, torch.rand_like(x), lab))


@pytest.mark.parametrize('sync_every, log_every', [(1, 2), (5, 5)])   # (5, 5): only the check before saving sees it
def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, sync_every, log_every):
    pairs = smooth_pairs(40)
    cfg = DDPMConfig(**{**TINY, 'log_every': log_every}, steps=6)
    good, _ = fit_ddpm(cfg, pairs, tmp_path / 'good', progress=False, stop_after_step=2)
    calls = {'n': 0}
    forward = Refiner.forward

    def poisoned(self, *args, **kwargs):                                          # the 3rd training step returns NaN
        out = forward(self, *args, **kwargs)
        if self.training:
            calls['n'] += 1
            if calls['n'] == 3: out = out * float('nan')
        return out
    monkeypatch.setattr(Refiner, 'forward', poisoned)
    with pytest.raises(NonFiniteLossError, match='step 3'):
        fit_ddpm(cfg, pairs, tmp_path / 'bad', progress=False, sync_every=sync_every)
    state = load_checkpoint(tmp_path / 'bad' / 'checkpoint.pt')
    assert state['step'] == 2
    assert all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())
    assert same(params(load_refiner(tmp_path / 'bad')), params(load_refiner(tmp_path / 'good')))


# ---------------------------------------------------------------- pairs

class Mark(nn.Module):
    "Encoder whose posterior over [w; z] sits at (its modality id) / 10 with a negligible scale."
    def __init__(self, m, D): super().__init__(); self.m, self.D = m, D
    def forward(self, x): return torch.full((len(x), self.D), self.m / 10), torch.full((len(x), self.D), -40.)


class Paint(nn.Module):
    "Decoder that paints an image filled with the first z coordinate: the image names the source modality."
    def __init__(self, d_w): super().__init__(); self.d_w = d_w
    def forward(self, u): return u[..., self.d_w, None, None, None].expand(*u.shape[:-1], 3, 28, 28)


def marked_model_and_data(n=50):
    model = build_cmvae('polymnist', d_w=4, d_z=4, n_clusters=3, width=0.125, family='normal', n_modalities=4)
    model.encoders = nn.ModuleList([Mark(m, 8) for m in range(4)])
    model.decoders = nn.ModuleList([Paint(4) for _ in range(4)])
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (n, 3, 28, 28), generator=g, dtype=torch.uint8) for _ in range(3)]
    data = MultimodalDataset(images + [torch.randint(0, 9, (n, 5), generator=g)], torch.arange(n), ['image'] * 3 + ['text'])
    return model, data


@pytest.mark.parametrize('sources', SOURCES)
def test_pairs_come_from_the_requested_sources(sources):
    model, data = marked_model_and_data()
    p = make_pairs(model, data, DDPMConfig(sources=sources, pair_repeats=2), batch_size=16, progress=False)
    assert len(p) == 2 * 3 * 50 and p.modalities == (0, 1, 2)                    # the caption is never a target
    for m in range(3):                                                            # x_real is the real image of its modality
        assert torch.equal(p.x_real[p.modality == m], data.modalities[m].repeat(2, 1, 1, 1))
    src = (p.x_vae[:, 0, 0, 0].float() / 255 * 10).round().long()
    frac_self = (src == p.modality).float().mean().item()
    assert {'self': frac_self == 1, 'cross': frac_self == 0, 'mixed': 0.15 < frac_self < 0.35}[sources], frac_self
    if sources != 'self': assert set(src.tolist()) == {0, 1, 2, 3}               # every modality serves as a source


def test_train_refiner_caches_pairs_and_resumes(tmp_path):
    model = build_cmvae('polymnist', d_w=4, d_z=4, n_clusters=3, width=0.125, n_modalities=2)
    g = torch.Generator().manual_seed(0)
    data = MultimodalDataset([torch.randint(0, 256, (20, 3, 28, 28), generator=g, dtype=torch.uint8) for _ in range(2)],
                             torch.arange(20), ['image'] * 2)
    cfg = DDPMConfig(**TINY, steps=3)
    r1, _ = train_refiner(model, data, cfg, tmp_path, val_data=data, n_val=8, progress=False, stop_after_step=2)
    assert (tmp_path / 'pairs.pt').exists()
    r2, rows = train_refiner(model, data, cfg, tmp_path, val_data=data, n_val=8, progress=False)
    assert r2.modalities == (0, 1) and r2.image_shape == (3, 28, 28) and [int(r['step']) for r in rows] == [2, 3]
    assert all(math.isfinite(r['val_loss']) for r in rows)
