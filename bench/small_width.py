"""The small-width regime of the CPU runs: samples/s and achieved GFLOP/s against a measured peak, today's code
against a baseline revision, side by side.

    .venv/bin/python bench/small_width.py                        # the full table (widths 1/16, 1/8, 1/4; M 2, 5; 1, 2 threads)
    .venv/bin/python bench/small_width.py --widths 0.0625 --modalities 2 --threads 1 --rounds 5   # the default run

Every measurement is a fresh subprocess that times `--steps` training steps (objective + backward + optimiser, what
`cmvae.train.fit` runs per batch) after `--warmup` steps, on random PolyMNIST-shaped inputs, with the library of
one source tree on its PYTHONPATH: this checkout ("current") or `--baseline REV` extracted with `git archive`
("baseline", default 3aa7077, the code before the speed work). The two alternate round by round, and which goes
first alternates too; medians of the valid rounds are reported (bench/hygiene.py: a round taken at a 1-minute load
above cores + 0.5 is marked INVALID and left out).

FLOPs per step are counted once per setting with `torch.utils.flop_counter.FlopCounterMode` on the current code's
step (convolutions and matrix products, forward and backward; element-wise work is not counted), so GFLOP/s is
useful work per second. The peak is measured on the same threads: a 2048² fp32 GEMM and the width-1 PolyMNIST
convolution (64→64, 3×3, 28×28, NHWC, batch 64).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import hygiene  # noqa: E402

BASELINE = '3aa7077'


# ------------------------------------------------------------------------------------------- worker (one tree)
def _step_function(M: int, width: float, batch: int, K: int, clusters: int, lr: float, seed: int = 0):
    "The training step of whichever cmvae is on the path (current or baseline API), its model and inputs."
    import torch
    import cmvae.train as T
    import cmvae.config as C
    if hasattr(C, 'tune_allocator'): C.tune_allocator()   # as that tree's `fit` does on the CPU
    cfg = T.CMVAEConfig(dataset='polymnist', n_modalities=M, width=width, K=K, batch_size=batch, n_clusters=clusters,
                        lr=lr, threads=None, device='cpu', seed=seed)
    torch.manual_seed(seed)
    model = T.build_model(cfg, M)
    prepare = getattr(T, 'prepare_model', None) or T._prepare
    model = prepare(model, cfg, torch.device('cpu'))
    model.train()
    make_opt = getattr(T, 'make_optimizer', None)
    opt = make_opt(model, cfg) if make_opt else torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                                                 lr=cfg.lr, amsgrad=True)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(batch, 3, 28, 28, generator=g) for _ in range(M)]
    to_inputs = getattr(T, 'model_inputs', None) or T._inputs
    xs = to_inputs(xs, cfg)
    dev = torch.device('cpu')

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = T.accumulate_gradients(model, xs, cfg, dev)
        opt.step()
        return loss
    return step, model


def worker(a) -> dict:
    import torch
    torch.set_num_threads(a.threads[0])
    step, model = _step_function(a.modalities[0], a.widths[0], a.batch, a.K, a.clusters, a.lr)
    for _ in range(a.warmup): step()
    times = []
    with hygiene.LoadWindow() as w:
        for _ in range(a.steps):
            t0 = time.perf_counter(); loss = step(); times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss): raise RuntimeError(f'non-finite loss {float(loss)}')
    med = statistics.median(times)
    return dict(step_seconds=[round(t, 5) for t in times], median_step_s=med, samples_per_s=a.batch / med, **w.record())


def count_flops(M: int, width: float, batch: int, K: int, clusters: int, lr: float) -> float:
    "FLOPs of one training step (convolutions and matrix products, forward + backward) of the current code."
    from torch.utils.flop_counter import FlopCounterMode
    step, _ = _step_function(M, width, batch, K, clusters, lr)
    step()
    with FlopCounterMode(display=False) as fc:
        step()
    return float(fc.get_total_flops())


def peak_gflops(threads: int) -> dict:
    "Measured fp32 peak on `threads` threads: a 2048² GEMM and the width-1 PolyMNIST 3×3 convolution (NHWC)."
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = torch.randn(64, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)

    def rate(fn, flops, n):
        fn()
        t0 = time.perf_counter()
        for _ in range(n): fn()
        return flops * n / (time.perf_counter() - t0) / 1e9
    with hygiene.LoadWindow() as lw:
        gemm = max(rate(lambda: a @ b, 2 * 2048 ** 3, 5) for _ in range(3))
        conv = max(rate(lambda: F.conv2d(x, w, padding=1), 2 * 64 * 28 * 28 * 64 * 64 * 9, 5) for _ in range(3))
    return dict(gemm=gemm, conv=conv, **lw.record())


# ------------------------------------------------------------------------------------------- orchestration
def extract(rev: str) -> Path:
    "The library (and nothing else) of git revision `rev`, in a temporary folder."
    dest = Path(tempfile.mkdtemp(prefix=f'cmvae-{rev}-'))
    archive = subprocess.run(['git', 'archive', rev, 'cmvae'], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', str(dest)], input=archive, check=True)
    return dest


def worker_cmd(setting: dict, a) -> list:
    "The command of one measurement: `setting` (width, M, threads) with the batch, K, clusters, lr and step counts of `a`."
    return [sys.executable, __file__, '--worker', '--widths', str(setting['width']), '--modalities', str(setting['M']),
            '--threads', str(setting['threads']), '--batch', str(a.batch), '--K', str(a.K), '--clusters', str(a.clusters),
            '--lr', str(a.lr), '--steps', str(a.steps), '--warmup', str(a.warmup)]


def worker_env(tree: Path, threads: int) -> dict:
    "The environment of one measurement: the library of `tree` on the path, `threads` OpenMP threads."
    return dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))


def run_worker(tree: Path, setting: dict, a) -> dict:
    r = subprocess.run(worker_cmd(setting, a), capture_output=True, text=True, env=worker_env(tree, setting['threads']),
                       cwd=ROOT, timeout=a.timeout)
    if r.returncode != 0: raise RuntimeError(f'worker failed ({tree}):\n{r.stderr[-3000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--widths', type=float, nargs='+', default=[0.0625, 0.125, 0.25])
    p.add_argument('--modalities', type=int, nargs='+', default=[2, 5])
    p.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--K', type=int, default=1)
    p.add_argument('--clusters', type=int, default=20)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--steps', type=int, default=20, help='timed steps per measurement')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--baseline', default=BASELINE, help='git revision to compare with ("none": current only)')
    p.add_argument('--timeout', type=float, default=1800)
    p.add_argument('--json-out', default=None)
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a))); return

    info = hygiene.machine()
    print(f"{info['date']}  cpu {info['cpu']} ({info['cores']} cores)  torch {info['torch']}  load {info['loadavg']}  "
          f"(a measurement is INVALID above load {hygiene.max_load():.1f})", flush=True)
    trees = {'current': ROOT}
    if a.baseline != 'none': trees['baseline'] = extract(a.baseline)
    peaks = {t: peak_gflops(t) for t in sorted(set(a.threads))}
    for t, pk in peaks.items():
        print(f'peak on {t} thread(s): GEMM {pk["gemm"]:.1f} GFLOP/s, conv {pk["conv"]:.1f} GFLOP/s{hygiene.mark(pk)}', flush=True)
    settings = [dict(width=w, M=m, threads=t) for w in a.widths for m in a.modalities for t in a.threads]
    rows = []
    for s in settings:
        flops = count_flops(s['M'], s['width'], a.batch, a.K, a.clusters, a.lr)
        res = {name: [] for name in trees}
        for r in range(a.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                out = run_worker(trees[name], s, a)
                res[name].append(out)
                print(f"w={s['width']:<7} M={s['M']} threads={s['threads']} round {r} {name:<8} {out['samples_per_s']:8.1f} samples/s"
                      f"{hygiene.mark(out)}", flush=True)
        row = dict(**s, flops_per_step=flops, batch=a.batch, K=a.K)
        for name, outs in res.items():
            med, n_valid = hygiene.valid_median(outs)
            row[name] = dict(samples_per_s=med, valid_rounds=n_valid, runs=outs,
                             gflops=None if med is None else flops / (a.batch / med) / 1e9)
        rows.append(row)
    print('\n| width | M | threads | FLOP/step (conv+mm) | baseline samples/s | current samples/s | speed-up | current GFLOP/s | % of conv peak | % of GEMM peak |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        cur, base = r['current']['samples_per_s'], r.get('baseline', {}).get('samples_per_s')
        pk = peaks[r['threads']]
        fmt = lambda v, f='{:.0f}': '(no valid measurement)' if v is None else f.format(v)
        speed = None if cur is None or base is None else cur / base
        g = r['current']['gflops']
        print(f"| 1/{round(1 / r['width'])} | {r['M']} | {r['threads']} | {r['flops_per_step'] / 1e9:.2f} G | {fmt(base)} | {fmt(cur)} | "
              f"{fmt(speed, '{:.2f}x')} | {fmt(g, '{:.1f}')} | {fmt(None if g is None else 100 * g / pk['conv'], '{:.0f} %')} | "
              f"{fmt(None if g is None else 100 * g / pk['gemm'], '{:.0f} %')} |")
    print(f"load at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.json_out: Path(a.json_out).write_text(json.dumps(dict(machine=info, peaks=peaks, rows=rows), indent=1))


if __name__ == '__main__':
    main()
