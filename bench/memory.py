"""Peak memory of a CMVAE training step at the paper's width: measured on this CPU, and estimated for a 40 / 80 GB GPU.

    .venv/bin/python bench/memory.py                       # K = 1 and K = 10, PolyMNIST width 1
    .venv/bin/python bench/memory.py --settings 1:128 10:16 --json-out memory.json

For every `K:batch` setting, one real training step (objective + backward + AMSGrad Adam) runs in a fresh process
(`cmvae.cost.measured_step_memory`), and the rise of its peak resident memory (RSS) over the process after a
one-tuple step is printed beside the activations that autograd saves for that step, counted on the meta device
(`cmvae.cost.step_profile`). Memory is a count, not a timing, so the machine's load does not change it.

From these, per K: the memory per tuple (the slope between the two measured batches), the parameters and the
optimiser's state, and the largest micro-batch (`CMVAEConfig.micro_batch`) of a batch of 128 that fits
`--cpu-gb` of RAM (measured slope, extrapolated) and a 40 / 80 GB GPU (`cmvae.cost.fitting_micro_batch`: saved
activations × a transient factor + five copies of the parameters + a CUDA context; an **estimate** from the
activation sizes, not a measurement: no GPU was used).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hygiene  # noqa: E402
from cmvae import cost  # noqa: E402
from cmvae.train import CMVAEConfig  # noqa: E402

GiB = 2 ** 30


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--settings', nargs='+', default=['1:32', '1:128', '10:4', '10:16'],
                   help='K:batch pairs to measure; two batches per K give the per-tuple slope')
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--batch', type=int, default=128, help='the batch whose micro-batch is chosen')
    p.add_argument('--cpu-gb', type=float, default=24.0, help='RAM to fit on the CPU (this machine: 24 GiB)')
    p.add_argument('--json-out', default=None)
    a = p.parse_args(argv)
    info = hygiene.machine()
    print(f"{info['date']}  cpu {info['cpu']} ({info['cores']} cores)  torch {info['torch']}")
    rows = []
    for s in a.settings:
        K, B = (int(v) for v in s.split(':'))
        cfg = CMVAEConfig.paper('polymnist', K=K, width=a.width, batch_size=a.batch)
        m = cost.measured_step_memory(cfg, B)
        rows.append(dict(K=K, **m))
        print(f"K={K:<3} batch {B:<4} peak RSS rise {m['measured_bytes'] / GiB:6.2f} GiB   saved activations (meta count) "
              f"{m['predicted_bytes'] / GiB:6.2f} GiB   ratio {m['ratio']:.2f}", flush=True)
    fits = []
    for K in sorted({r['K'] for r in rows}):
        rs = sorted((r for r in rows if r['K'] == K), key=lambda r: r['batch'])
        cfg = CMVAEConfig.paper('polymnist', K=K, width=a.width, batch_size=a.batch)
        est = cost.run_estimate(cfg)
        prof = est['profile']
        if len(rs) >= 2:
            slope = (rs[-1]['measured_bytes'] - rs[0]['measured_bytes']) / (rs[-1]['batch'] - rs[0]['batch'])
            fixed = rs[-1]['measured_bytes'] - slope * rs[-1]['batch']
        else:
            slope, fixed = rs[0]['measured_bytes'] / rs[0]['batch'], 0.
        params = cost.OPTIMISER_COPIES * prof['param_bytes']    # weights, gradients, AMSGrad's three moments
        budget = a.cpu_gb * GiB - params
        cpu_fit = next((b for b in cost.micro_batch_candidates(a.batch) if fixed + slope * b <= budget), None)
        fits.append(dict(K=K, per_tuple_bytes=slope, fixed_bytes=fixed, param_state_bytes=params,
                         cpu_full_batch_gib=(fixed + slope * a.batch + params) / GiB, cpu_micro_batch=cpu_fit,
                         gpu={name: dict(micro_batch=g['micro_batch'], peak_gb_full_batch=est['peak_gb_full_batch'])
                              for name, g in est['gpus'].items()}))
    print(f'\n| K | measured GiB per tuple (CPU) | parameters + optimiser state | batch {a.batch} on the CPU (extrapolated) '
          f'| micro-batch that fits {a.cpu_gb:.0f} GiB (CPU) | micro-batch for A100 40 GB (estimate) | for 80 GB (estimate) |')
    print('|---|---|---|---|---|---|---|')
    for f in fits:
        g40, g80 = f['gpu']['A100 40 GB']['micro_batch'], f['gpu']['A100 80 GB']['micro_batch']
        print(f"| {f['K']} | {f['per_tuple_bytes'] / GiB:.3f} | {f['param_state_bytes'] / GiB:.2f} GiB | "
              f"{f['cpu_full_batch_gib']:.1f} GiB | {f['cpu_micro_batch']} | {g40} | {g80} |")
    if a.json_out: Path(a.json_out).write_text(json.dumps(dict(machine=info, measured=rows, fits=fits), indent=1))


if __name__ == '__main__':
    main()
