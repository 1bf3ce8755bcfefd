"""Where the time of a small-width training step goes, and the most that removing per-step work could gain.

    .venv/bin/python bench/step_anatomy.py                 # the default grid's configuration (width 1/16, 2 modalities, 1 thread)
    .venv/bin/python bench/step_anatomy.py --width 0.125 --modalities 5 --threads 2

Three measurements of this checkout's training step (`bench/train_step.build_step`: objective + backward + optimiser,
what `cmvae.train.fit` runs per batch, on random PolyMNIST-shaped inputs), all in one process:

1. **Batch scaling.** Step time at several batch sizes, the sizes alternating round by round (and bf16 autocast at
   the reference batch as one more contender); a least-squares line `t(B) = fixed + per_tuple * B` through the
   medians splits the step into a cost paid once per step (Python, dispatch, the optimiser, small tensors) and a
   cost per tuple (mostly convolutions). `1 / per_tuple` is the samples/s of a step with no per-step cost at all,
   so `t(B_ref) / (B_ref * per_tuple)` bounds the speed-up that any removal of per-step overhead can give at the
   reference batch without changing the batch (a calibration change).
2. **Operator shares** of one step at the reference batch (`torch.profiler`, self CPU time): convolutions forward
   and backward against everything else.
3. **Convolution kernels.** Every convolution one step runs is recorded (shapes, stride, padding, groups; the
   fused-upsampling phase convolutions included) and replayed forward + backward with three CPU kernels: oneDNN on
   channels_last tensors (what the library uses), oneDNN on NCHW tensors and PyTorch's native im2col path (oneDNN
   disabled); the sums say whether a different kernel could make the per-tuple cost smaller.

Every timing records the 1-minute load before and after it (bench/hygiene.py: INVALID above cores + 0.5, left out
of medians). Not a test: nothing is asserted. `--json PATH` writes everything measured.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hygiene  # noqa: E402
from train_step import build_step  # noqa: E402
from cmvae.config import tune_allocator  # noqa: E402


def _median_step(step, steps: int) -> float:
    "Median seconds of `steps` calls of `step`."
    times = []
    for _ in range(steps):
        t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batch_scaling(contenders: dict, # name -> (batch, step function)
                  rounds: int, steps: int) -> dict: # name -> list of per-round records
    "Median step time of every contender per round, the contenders alternating (order rotated every round)."
    names, out = list(contenders), {n: [] for n in contenders}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            batch, step = contenders[name]
            with hygiene.LoadWindow() as w:
                t = _median_step(step, steps)
            out[name].append(dict(batch=batch, step_s=t, samples_per_s=batch / t, **w.record()))
            print(f'  round {r + 1}  {name:>10}: {t * 1e3:7.1f} ms/step  {batch / t:7.1f} samples/s  '
                  f'load {w.before:.2f} -> {w.after:.2f}{hygiene.mark(out[name][-1])}', flush=True)
    return out


def fit_fixed_per_tuple(batches: list, step_s: list) -> dict:
    "Least-squares `t(B) = fixed + per_tuple * B` through `(batch, median step seconds)` points, with R²."
    b, t = np.asarray(batches, float), np.asarray(step_s, float)
    per_tuple, fixed = np.polyfit(b, t, 1)
    pred = fixed + per_tuple * b
    r2 = 1 - ((t - pred) ** 2).sum() / max(((t - t.mean()) ** 2).sum(), 1e-30)
    return dict(fixed_s=float(fixed), per_tuple_s=float(per_tuple), r2=float(r2))


def operator_shares(step, steps: int = 5) -> dict:
    "Self CPU seconds per step of convolutions (forward, backward) and of everything else (`torch.profiler`)."
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps): step()
    fwd = bwd = total = 0.
    for e in prof.key_averages():
        s = e.self_cpu_time_total / 1e6 / steps
        total += s
        if e.key == 'aten::convolution_backward': bwd += s
        elif 'convolution' in e.key and not e.key.startswith('autograd::'): fwd += s
    return dict(conv_forward_s=fwd, conv_backward_s=bwd, other_s=total - fwd - bwd, total_s=total)


@contextlib.contextmanager
def recording_convolutions(log: list):
    "Within the block, every `F.conv2d` call appends `(x shape, weight shape, stride, padding, groups, x needs grad)` to `log`."
    original = F.conv2d
    def wrapped(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        log.append((tuple(x.shape), tuple(weight.shape), bias is not None, stride, padding, groups, x.requires_grad))
        return original(x, weight, bias, stride, padding, dilation, groups)
    F.conv2d = wrapped
    try: yield log
    finally: F.conv2d = original


def replay_convolutions(calls: list, kernel: str, reps: int = 5) -> float:
    "Seconds to run every recorded convolution forward + backward once with `kernel` (median of `reps`)."
    fmt = torch.channels_last if kernel == 'onednn_channels_last' else torch.contiguous_format
    jobs = []
    for xs, ws, has_bias, stride, padding, groups, x_grad in calls:
        x = torch.randn(xs).contiguous(memory_format=fmt).requires_grad_(x_grad)
        w, b = torch.randn(ws, requires_grad=True), (torch.randn(ws[0], requires_grad=True) if has_bias else None)
        jobs.append((x, w, b, stride, padding, groups))
    flags = torch.backends.mkldnn.flags(enabled=False) if kernel == 'native' else contextlib.nullcontext()

    def run_all():
        for x, w, b, stride, padding, groups in jobs:
            y = F.conv2d(x, w, b, stride, padding, 1, groups)
            y.backward(torch.ones_like(y))
    with flags:
        run_all()   # warm-up: oneDNN primitive caches
        return _median_step(run_all, reps)


KERNELS = ('onednn_channels_last', 'onednn_nchw', 'native')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--width', type=float, default=0.0625)
    p.add_argument('--modalities', type=int, default=2)
    p.add_argument('--clusters', type=int, default=20)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--batches', type=int, nargs='+', default=[8, 16, 32, 64, 128])
    p.add_argument('--reference-batch', type=int, default=32, help='the batch the bound is computed for (the default grid: 32)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--steps', type=int, default=10, help='timed steps per contender and round')
    p.add_argument('--no-bf16', action='store_true', help='leave out the bf16-autocast contender')
    p.add_argument('--json', default=None, help='write the measurements to this file')
    a = p.parse_args(argv)
    if a.reference_batch not in a.batches: p.error(f'--reference-batch {a.reference_batch} must be one of --batches')
    torch.set_num_threads(a.threads)
    tune_allocator()
    mach = hygiene.machine()
    print(f"{mach['date']}  cpu {mach['cpu']} ({mach['cores']} cores)  torch {mach['torch']}  threads {a.threads}  "
          f"width {a.width}, {a.modalities} modalities, {a.clusters} clusters, K 1, fp32 unless named")

    def make(batch, precision='fp32'):
        step, _, _ = build_step('polymnist', batch, 1, a.width, precision=precision, n_modalities=a.modalities,
                                n_clusters=a.clusters)
        for _ in range(3): step()   # warm-up: allocator, oneDNN primitive caches
        return batch, step
    contenders = {f'batch {b}': make(b) for b in a.batches}
    if not a.no_bf16: contenders[f'bf16 {a.reference_batch}'] = make(a.reference_batch, 'bf16')

    print('\n1. batch scaling (median step time per contender and round):')
    scaling = batch_scaling(contenders, a.rounds, a.steps)
    medians = {}
    for name, recs in scaling.items():
        m, n_valid = hygiene.valid_median(recs, 'step_s')
        medians[name] = m
        if m is None: print(f'  {name}: fewer than {hygiene.MIN_ROUNDS} valid rounds: no measurement')
    fit = None
    points = [(b, medians[f'batch {b}']) for b in a.batches if medians[f'batch {b}'] is not None]
    if len(points) >= 2:
        fit = fit_fixed_per_tuple(*zip(*points))
        ref_t = medians[f'batch {a.reference_batch}']
        print(f"  fit: fixed {fit['fixed_s'] * 1e3:.1f} ms per step + {fit['per_tuple_s'] * 1e3:.3f} ms per tuple "
              f"(R² {fit['r2']:.3f})")
        if ref_t is not None:
            fit.update(reference_batch=a.reference_batch, reference_step_s=ref_t,
                       reference_samples_per_s=a.reference_batch / ref_t,
                       no_overhead_samples_per_s=1 / fit['per_tuple_s'],
                       max_speedup_without_overhead=ref_t / (a.reference_batch * fit['per_tuple_s']),
                       fixed_share=fit['fixed_s'] / ref_t)
            print(f"  at batch {a.reference_batch}: {fit['reference_samples_per_s']:.0f} samples/s, of which "
                  f"{100 * fit['fixed_share']:.0f} % of the step time is the fixed part; a step with no per-step cost "
                  f"at all would do {fit['no_overhead_samples_per_s']:.0f} samples/s = "
                  f"{fit['max_speedup_without_overhead']:.2f}x")
        bf = medians.get(f'bf16 {a.reference_batch}')
        if bf is not None and ref_t is not None:
            print(f'  bf16 autocast at batch {a.reference_batch}: {ref_t / bf:.2f}x fp32')

    print(f'\n2. operator shares of one step at batch {a.reference_batch} (torch.profiler, self CPU time):')
    ref_step = contenders[f'batch {a.reference_batch}'][1]
    shares = operator_shares(ref_step)
    tot = shares['total_s']
    print(f"  convolution forward {shares['conv_forward_s'] * 1e3:.1f} ms ({100 * shares['conv_forward_s'] / tot:.0f} %), "
          f"backward {shares['conv_backward_s'] * 1e3:.1f} ms ({100 * shares['conv_backward_s'] / tot:.0f} %), "
          f"everything else {shares['other_s'] * 1e3:.1f} ms ({100 * shares['other_s'] / tot:.0f} %) "
          f"of {tot * 1e3:.1f} ms (profiled, so slower than unprofiled)")

    print(f'\n3. the convolutions of one step at batch {a.reference_batch}, forward + backward, per kernel:')
    calls = []
    with recording_convolutions(calls): ref_step()
    kernels = {k: [] for k in KERNELS}
    for r in range(a.rounds):
        for k in KERNELS[r % 3:] + KERNELS[:r % 3]:
            with hygiene.LoadWindow() as w:
                t = replay_convolutions(calls, k)
            kernels[k].append(dict(seconds=t, **w.record()))
    kernel_medians = {k: hygiene.valid_median(v, 'seconds')[0] for k, v in kernels.items()}
    for k, m in kernel_medians.items():
        print(f"  {k:>22}: {'no measurement' if m is None else f'{m * 1e3:.1f} ms'} for {len(calls)} convolutions")

    if a.json:
        args = {k: v for k, v in vars(a).items() if k != 'json'}   # not the output path: a machine's, not the measurement's
        Path(a.json).write_text(json.dumps(dict(machine=mach, args=args, scaling=scaling, medians=medians, fit=fit,
                                                shares=shares, n_convolutions=len(calls), kernels=kernels,
                                                kernel_medians=kernel_medians), indent=1))
        print(f'\nwrote {a.json}')


if __name__ == '__main__':
    main()
