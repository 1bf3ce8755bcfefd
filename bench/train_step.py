"""Training throughput of CMVAE: samples per second of one full training step (objective + backward + Adam).

The step is the one `cmvae.train.fit` runs (same config object, device/precision/channels-last switches,
objective and AMSGrad Adam); the inputs are random tensors of the data set's shapes, so no data is needed.

    .venv/bin/python bench/train_step.py --dataset polymnist --batch 128 --K 1 --width 1 --threads 2
    .venv/bin/python bench/train_step.py --width 0.125 --K 10 --no-channels-last --steps 5

Prints the machine (device, CPU model, torch version, threads, date), the config, the time of every timed
step and samples/s (= batch / median step time). `--json` prints one JSON line instead (used by
bench/peer_multivae.py). Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

from cmvae.config import autocast, resolve_device
from cmvae.train import CMVAEConfig, build_model, model_inputs, prepare_model, training_objective


def cpu_model() -> str:
    "The CPU model name from /proc/cpuinfo (or platform's guess elsewhere)."
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or 'unknown'


def machine_info(device: str = 'cpu', threads: int | None = None) -> dict:
    "What a timing depends on: device, CPU model, torch version, threads, date, load average."
    dev = resolve_device(device)
    info = dict(device=str(dev), cpu=cpu_model(), cores=os.cpu_count(), torch=torch.__version__,
                threads=threads or torch.get_num_threads(), python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec='seconds'),
                loadavg=' '.join(f'{x:.2f}' for x in os.getloadavg()))
    if dev.type == 'cuda': info['gpu'] = torch.cuda.get_device_name(dev)
    return info


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


def time_train_step(dataset: str = 'polymnist', # 'polymnist' or 'cubicc' (paper settings of method spec §4.1)
                    batch: int = 128, K: int = 1, width: float = 1.0,
                    device: str = 'cpu', precision: str = 'fp32', channels_last: bool = True,
                    threads: int | None = 2, # torch CPU threads (None: leave torch's setting)
                    steps: int = 3, # timed steps
                    warmup: int = 1, # untimed steps first (allocator, oneDNN primitive caches)
                    objective: str | None = None, # default: the data set's ('iwae' / 'dreg_original')
                    seed: int = 0, vocab_size: int = 1590, n_modalities: int = 5,
                   ) -> dict:
    "Time `steps` full training steps after `warmup` ones; returns the config, per-step seconds and samples/s."
    if threads: torch.set_num_threads(threads)
    changes = dict(K=K, width=width, batch_size=batch, device=device, precision=precision,
                   channels_last=channels_last, threads=threads, seed=seed)
    if objective: changes['objective'] = objective
    cfg = CMVAEConfig.paper(dataset, **changes)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = prepare_model(build_model(cfg, n_modalities, vocab_size), cfg, dev)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, amsgrad=True)
    xs = model_inputs(random_batch(dataset, batch, vocab_size, n_modalities, seed, dev), cfg)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)

    def step():
        with autocast(cfg.precision, dev):
            loss, _ = training_objective(model, xs, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup): step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss): raise RuntimeError(f'non-finite loss {float(loss)} in the benchmark')
    med = statistics.median(times)
    return dict(impl='cmvae', dataset=dataset, batch=batch, K=K, width=width, precision=precision,
                channels_last=channels_last, objective=cfg.objective, steps=steps, warmup=warmup,
                step_seconds=[round(t, 4) for t in times], median_step_s=med, samples_per_s=batch / med,
                n_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                **machine_info(device, threads))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dataset', default='polymnist', choices=['polymnist', 'cubicc'])
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--K', type=int, default=1)
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--device', default='cpu')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--objective', default=None, choices=['iwae', 'dreg_mixture', 'dreg_mmvae', 'dreg_original'])
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', action='store_true', help='print one JSON line')
    a = p.parse_args(argv)
    r = time_train_step(a.dataset, a.batch, a.K, a.width, a.device, a.precision, a.channels_last, a.threads,
                        a.steps, a.warmup, a.objective, a.seed)
    if a.json:
        print(json.dumps(r)); return r
    print(f"{r['date']}  device {r['device']}  cpu {r['cpu']} ({r['cores']} cores)  torch {r['torch']}  "
          f"threads {r['threads']}  load {r['loadavg']}")
    print(f"{r['dataset']}: batch {r['batch']}, K {r['K']}, width {r['width']}, {r['precision']}, "
          f"channels_last {r['channels_last']}, objective {r['objective']}, {r['n_params']:,} trainable parameters")
    print(f"step seconds {r['step_seconds']} (after {r['warmup']} warm-up)  ->  {r['samples_per_s']:.2f} samples/s")
    return r


if __name__ == '__main__':
    main()
