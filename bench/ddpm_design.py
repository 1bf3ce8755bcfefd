"""Design comparisons of Claim 3's refiner at CPU scale (issue 18): results in bench/ddpm_design.json.

One CMVAE (the default grid's: β = 1, seed 0, 2 PolyMNIST modalities, width 1/16, 10 epochs, pruned as the
experiment notebook prunes it) is refined by refiners that differ from a reference design in one choice each
(UNet size, noise range of training, conditioning on x̂, source of the training pairs). Each refiner is scored at
a few points of its training (the one-change variants at 1,000 steps, the reference also at 500 and 1,500) and,
for the reference, with raw instead of EMA weights and with several ways of sampling
(strength, DDIM or DDPM, number of steps). Every score is clf-FD and coherence of the refined model against the
plain CMVAE on the same 200 test tuples and 200 unconditional samples, with the same CMVAE draws.

    CMVAE_DATA=$PWD/data .venv/bin/python bench/ddpm_design.py [--work DIR] [--only VARIANT ...]
    CMVAE_DATA=$PWD/data .venv/bin/python bench/ddpm_design.py --time     # then: the cost column under one load

Resumable: the CMVAE and every refiner checkpoint in --work (default bench/_ddpm_design, git-ignored); scores
already in the results file are not measured again. Runs on one CPU thread. The DDPM notebook (07b_claim3) shows
the table.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmvae.classifiers import load_or_train_classifiers
from cmvae.claim3 import RefinedModel, generation_summary, test_subset
from cmvae.config import image_modalities
from cmvae.ddpm import DDPMConfig, build_refiner, n_parameters
from cmvae.ddpm_train import load_refiner, train_refiner
from cmvae.loop import read_log
from cmvae.metrics import evaluate_generation
from cmvae.pruning import apply_pruning, select_clusters
from cmvae.train import CMVAEConfig, fit, load_splits

RESULTS = ROOT / 'bench' / 'ddpm_design.json'
N_EVAL, SEED = 200, 0

# the reference design; every variant changes one thing
REFERENCE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, max_strength=0.5, condition=True, sources='mixed',
                 ema_decay=0.999, lr=2e-3, batch_size=32, steps=1500, log_every=100, checkpoint_every=100)
SAMPLE = dict(strength=0.2, scheduler='ddim', steps=50)          # how every variant is scored
STRENGTHS = (0.1, 0.15, 0.2, 0.3, 0.5)                                # the reference's sweep at its last stop (0.5 = its max_strength)
SAMPLERS = (('ddim', 20), ('ddim', 100), ('ddpm', 50))
VARIANTS = {   # name: (changes to the reference, steps at which it is scored)
    'reference': ({}, (500, 1000, 1500)),
    'unet-32-64-64': (dict(block_out_channels=(32, 64, 64), steps=500), (300, 500)),   # 300 steps: about the reference's 1000 in CPU time
    'self-pairs': (dict(sources='self', steps=1000), (1000,)),
    'range-0.2': (dict(max_strength=0.2, steps=1000), (1000,)),                    # trained only where it samples
    'full-range': (dict(max_strength=1.0, steps=1000), (1000,)),
    'unconditional': (dict(condition=False, steps=1000), (1000,)),
    'unet-16-32': (dict(block_out_channels=(16, 32), steps=1000), (1000,)),
}


def load_results() -> list: return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def save_results(rows: list):
    tmp = RESULTS.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(rows, indent=1)); os.replace(tmp, RESULTS)


def key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ('variant', 'step', 'weights', 'strength', 'scheduler', 'sample_steps', 'n_eval', 'seed'))


def trained_cmvae(work: Path):
    "The default grid's CMVAE at β = 1, seed 0 (trained once, resumed from its checkpoint), pruned as the experiment prunes."
    base = yaml.safe_load((ROOT / 'parameters' / 'default.yaml').read_text())['base']
    cfg = CMVAEConfig.from_dict(dict(base, beta=1.0, seed=0), 'parameters/default.yaml')
    splits = load_splits(cfg)
    vae, _ = fit(cfg, splits, out_dir=work / 'cmvae', progress=False)
    vae.eval()
    result = select_clusters(vae, splits['val'], beta=cfg.beta, method=cfg.prune_method, progress=False,
                             generator=torch.Generator().manual_seed(cfg.seed))
    apply_pruning(vae, result)
    return vae, splits, cfg


def seconds_per_step(cfg: DDPMConfig, image_shape, modalities, n: int = 10) -> float:
    "Wall seconds of one training step (forward, backward, Adam) of this UNet, timed over n steps after 3 warm-up steps."
    from cmvae.ddpm import Refiner
    r = Refiner(cfg, image_shape, modalities).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(r.parameters(), cfg.lr)
    x = torch.randn(cfg.batch_size, *image_shape).contiguous(memory_format=torch.channels_last)
    lab = r.labels(torch.tensor(modalities[:1] * cfg.batch_size), cfg.batch_size)
    for i in range(n + 3):
        if i == 3: t0 = time.time()
        loss = torch.nn.functional.mse_loss(r(x, torch.randint(0, 1000, (cfg.batch_size,)), x, lab), x)
        opt.zero_grad(); loss.backward(); opt.step()
    return (time.time() - t0) / n



def time_variants(rounds: int = 3):
    "Time one training step of every variant's UNet, interleaved over `rounds` rounds; the medians replace `seconds_per_step` in the results."
    cfgs = {name: DDPMConfig(**{**REFERENCE, **changes}, device='cpu', threads=1) for name, (changes, _) in VARIANTS.items()}
    times = {name: [] for name in cfgs}
    for _ in range(rounds):
        for name, cfg in cfgs.items(): times[name].append(seconds_per_step(cfg, (3, 28, 28), (0, 1)))
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(json.dumps(median), flush=True)
    with open(RESULTS.with_suffix('.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = load_results()
        for r in rows:
            if r['variant'] in median: r.update(seconds_per_step=median[r['variant']], seconds_per_step_timing=f'median of {rounds} interleaved timings of 10 steps')
        save_results(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--work', default=str(ROOT / 'bench' / '_ddpm_design'), help='checkpoints of the CMVAE and the refiners')
    p.add_argument('--only', nargs='*', default=None, help='variants to run (default: all); two processes with different variants may share the results file')
    p.add_argument('--time', action='store_true', help='only time a training step of every variant back to back (3 rounds, '
                   'median) and put it in their rows: a cost comparison under one load of the machine')
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(a.work)
    if a.time: return time_variants()
    vae, splits, cmvae_cfg = trained_cmvae(work)
    clf, _ = load_or_train_classifiers(cmvae_cfg.data_dir, progress=False, n_modalities=splits['test'].n_modalities)
    test = test_subset(splits['test'], N_EVAL, SEED)
    scale = dict(cmvae='default grid, beta 1, seed 0: rebuilt PolyMNIST, 2 modalities, width 1/16, 10 epochs, pruned',
                 n_eval=N_EVAL, device=f'cpu ({platform.machine()}, 1 thread)', torch=torch.__version__)

    def score(model, row: dict):
        if key(row) in {key(r) for r in load_results()}: return
        t = time.time()
        res = evaluate_generation(model, test, clf, n_uncond=N_EVAL, subsets='single', generator=SEED, progress=False)
        row.update(generation_summary(res), eval_seconds=time.time() - t, scale=scale)
        with open(RESULTS.with_suffix('.lock'), 'w') as lock:         # two processes may score at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            save_results([*load_results(), row])
        print(json.dumps({k: v for k, v in row.items() if k != 'scale'}), flush=True)

    score(vae, dict(variant='CMVAE', step=0, weights=None, strength=None, scheduler=None, sample_steps=None, n_eval=N_EVAL, seed=SEED))
    for name, (changes, stops) in VARIANTS.items():
        if a.only and name not in a.only: continue
        cfg = DDPMConfig(**{**REFERENCE, **changes}, device='cpu', threads=1, seed=0)
        out = work / name
        per_step = None
        for stop in stops:
            snapshot = out / f'weights-step{stop}.pt'                       # the EMA and raw weights at this stop
            if not snapshot.exists():
                refiner, log = train_refiner(vae, splits['train'], cfg, out, val_data=splits['val'], progress=False, stop_after_step=stop)
                if int(log[-1]['step']) != stop: continue                  # trained past this stop (without a snapshot): not scored
                torch.save(dict(ema=refiner.state_dict(), raw=load_refiner(out, ema=False).state_dict()), snapshot)
            weights = {}
            for w, state in torch.load(snapshot, weights_only=False).items():
                weights[w] = build_refiner(cfg, splits['train'].modalities[0].shape[1:], image_modalities(splits['train']))
                weights[w].load_state_dict(state); weights[w].eval()
            log = [r for r in read_log(out) if r['step'] <= stop]
            per_step = per_step or seconds_per_step(cfg, weights['ema'].image_shape, weights['ema'].modalities)
            info = dict(variant=name, changes={k: list(v) if isinstance(v, tuple) else v for k, v in changes.items() if k != 'steps'},
                        config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items() if k not in ('device', 'threads', 'resume')},
                        step=stop, n_parameters=n_parameters(weights['ema']), train_seconds=sum(r['seconds'] for r in log),
                        val_loss=log[-1]['val_loss'], seconds_per_step=per_step, n_eval=N_EVAL, seed=SEED)
            strength = SAMPLE['strength'] if SAMPLE['strength'] <= cfg.max_strength else cfg.max_strength
            todo = [('ema', strength, SAMPLE['scheduler'], SAMPLE['steps'])]
            if name == 'full-range': todo.append(('ema', 1.0, 'ddim', 50))
            if name == 'reference' and stop == stops[-1]:
                todo += [('raw', strength, SAMPLE['scheduler'], SAMPLE['steps'])]
                todo += [('ema', s, 'ddim', 50) for s in STRENGTHS if s != strength]
                todo += [('ema', strength, k, n) for k, n in SAMPLERS]
            for w, strength, sched, n in todo:
                model = RefinedModel(vae, weights[w], steps=n, scheduler=sched, strength=strength, seed=SEED)
                score(model, dict(info, weights=w, strength=strength, scheduler=sched, sample_steps=n))

if __name__ == '__main__':
    main()
