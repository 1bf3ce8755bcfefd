"""Training throughput of CMVAE: samples per second of one full training step (objective + backward + optimiser).

The step is the one `cmvae.train.fit` runs for every batch: `make_optimizer`'s optimiser, `accumulate_gradients`
(micro-batches when `--micro-batch` is given) and `optimizer.step()`, on a model prepared by `prepare_model` (device,
channels_last, compile). The inputs are random tensors of the data set's shapes, so no data is needed.

    .venv/bin/python bench/train_step.py --dataset polymnist --batch 128 --K 1 --width 1 --threads 2
    .venv/bin/python bench/train_step.py --width 0.0625 --modalities 2 --clusters 20 --batch 32 --threads 1 --steps 20

Prints the machine, the config, the 1-minute load before and after the timed steps (INVALID when it exceeds the
cores + 0.5: see bench/hygiene.py), the time of every timed step and samples/s (= batch / median step time).
`--json` prints one JSON line instead (used by bench/peer_multivae.py). Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hygiene  # noqa: E402
from cmvae.config import resolve_device, tune_allocator  # noqa: E402
from cmvae.objectives import OBJECTIVES  # noqa: E402
from cmvae.train import CMVAEConfig, accumulate_gradients, build_model, make_optimizer, model_inputs, prepare_model  # noqa: E402


def random_batch(dataset: str, batch: int, vocab_size: int = 1590, n_modalities: int = 5, seed: int = 0,
                 device: str | torch.device = 'cpu') -> list:
    "Model inputs of `dataset`'s shapes: PolyMNIST M x `[B, 3, 28, 28]` in [0, 1]; CUBICC `[B, 3, 64, 64]` + tokens `[B, 32]`."
    g = torch.Generator().manual_seed(seed)
    if dataset == 'polymnist':
        xs = [torch.rand(batch, 3, 28, 28, generator=g) for _ in range(n_modalities)]
    elif dataset in ('cubicc', 'captioned'):
        xs = [torch.rand(batch, 3, 64, 64, generator=g), torch.randint(0, vocab_size, (batch, 32), generator=g)]
    else: raise ValueError(f"dataset must be 'polymnist', 'cubicc' or 'captioned', got {dataset!r}")
    return [x.to(device) for x in xs]


def build_step(dataset: str = 'polymnist', batch: int = 128, K: int = 1, width: float = 1.0, device: str = 'cpu',
               precision: str = 'fp32', channels_last: bool = True, objective: str | None = None, seed: int = 0,
               vocab_size: int = 1590, n_modalities: int = 5, n_clusters: int | None = None,
               micro_batch: int | None = None, compile: bool = False):
    "`(step, cfg, model)`: one call of `step()` is one training step of `fit` on a fixed random batch."
    changes = dict(K=K, width=width, batch_size=batch, device=device, precision=precision, channels_last=channels_last,
                   seed=seed, micro_batch=micro_batch, compile=compile)
    if objective: changes['objective'] = objective
    if n_clusters: changes['n_clusters'] = n_clusters
    if dataset == 'polymnist': changes['n_modalities'] = n_modalities
    cfg = CMVAEConfig.paper(dataset, **changes)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = prepare_model(build_model(cfg, n_modalities if dataset == 'polymnist' else 2, vocab_size), cfg, dev)
    model.train()
    opt = make_optimizer(model, cfg)
    xs = model_inputs(random_batch(dataset, batch, vocab_size, n_modalities, seed, dev), cfg)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = accumulate_gradients(model, xs, cfg, dev)
        opt.step()
        sync()
        return loss
    return step, cfg, model


def time_train_step(dataset: str = 'polymnist', # 'polymnist' or 'cubicc' (paper settings of method spec §4.1)
                    batch: int = 128, K: int = 1, width: float = 1.0,
                    device: str = 'cpu', precision: str = 'fp32', channels_last: bool = True,
                    threads: int | None = 2, # torch CPU threads (None: leave torch's setting)
                    steps: int = 3, # timed steps
                    warmup: int = 1, # untimed steps first (allocator, oneDNN primitive caches, compilation)
                    objective: str | None = None, # default: the data set's ('iwae' / 'dreg_original')
                    seed: int = 0, vocab_size: int = 1590, n_modalities: int = 5,
                    n_clusters: int | None = None, # default: the paper's (40 PolyMNIST, 35 CUBICC)
                    micro_batch: int | None = None, compile: bool = False,
                   ) -> dict:
    "Time `steps` full training steps after `warmup` ones; returns the config, per-step seconds, samples/s and the load."
    if threads: torch.set_num_threads(threads)
    if resolve_device(device).type == 'cpu': tune_allocator()   # as fit does
    step, cfg, model = build_step(dataset, batch, K, width, device, precision, channels_last, objective, seed,
                                  vocab_size, n_modalities, n_clusters, micro_batch, compile)
    for _ in range(warmup): step()
    times = []
    with hygiene.LoadWindow() as load:
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss): raise RuntimeError(f'non-finite loss {float(loss)} in the benchmark')
    med = statistics.median(times)
    return dict(impl='cmvae', dataset=dataset, batch=batch, K=K, width=width, n_modalities=n_modalities,
                n_clusters=cfg.n_clusters, precision=precision, channels_last=channels_last, objective=cfg.objective,
                micro_batch=micro_batch, compile=compile, steps=steps, warmup=warmup,
                step_seconds=[round(t, 4) for t in times], median_step_s=med, samples_per_s=batch / med,
                n_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                threads=threads or torch.get_num_threads(), device=str(resolve_device(device)),
                **load.record(), **hygiene.machine())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dataset', default='polymnist', choices=['polymnist', 'cubicc'])
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--K', type=int, default=1)
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--modalities', type=int, default=5, help='PolyMNIST modalities')
    p.add_argument('--clusters', type=int, default=None, help="initial clusters (default: the paper's)")
    p.add_argument('--micro-batch', type=int, default=None)
    p.add_argument('--device', default='cpu')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--compile', action='store_true', help='torch.compile the encoders and decoders')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--objective', default=None, choices=list(OBJECTIVES))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', action='store_true', help='print one JSON line')
    a = p.parse_args(argv)
    r = time_train_step(a.dataset, a.batch, a.K, a.width, a.device, a.precision, a.channels_last, a.threads,
                        a.steps, a.warmup, a.objective, a.seed, n_modalities=a.modalities, n_clusters=a.clusters,
                        micro_batch=a.micro_batch, compile=a.compile)
    if a.json:
        print(json.dumps(r)); return r
    print(f"{r['date']}  device {r['device']}  cpu {r['cpu']} ({r['cores']} cores)  torch {r['torch']}  threads {r['threads']}")
    print(f"{r['dataset']}: batch {r['batch']}, K {r['K']}, width {r['width']}, {r['n_modalities']} modalities, "
          f"{r['n_clusters']} clusters, {r['precision']}, channels_last {r['channels_last']}, compile {r['compile']}, "
          f"micro_batch {r['micro_batch']}, objective {r['objective']}, {r['n_params']:,} trainable parameters")
    print(f"load {r['load_before']} -> {r['load_after']}; step seconds {r['step_seconds']} (after {r['warmup']} warm-up)  ->  "
          f"{r['samples_per_s']:.2f} samples/s{hygiene.mark(r)}")
    return r


if __name__ == '__main__':
    main()
