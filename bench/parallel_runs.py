"""Threads per run or runs in parallel: the machine's total training throughput at a small width, both ways.

    .venv/bin/python bench/parallel_runs.py                      # the default configuration (width 1/16, 2 modalities)
    .venv/bin/python bench/parallel_runs.py --width 0.0625 --modalities 5 --rounds 3

Two ways to use 2 cores, alternating round by round: one training process with 2 threads, or two processes with
1 thread each running at the same time (what `cmvae-grid --jobs 2` does with `threads: 1`). Each process is
`bench/small_width.py`'s worker on this checkout (training steps on random PolyMNIST-shaped inputs, allocator tuned
as `fit` does). Prints samples/s per process, the total per configuration, the load before and after (INVALID
above cores + 0.5, bench/hygiene.py) and medians of the valid rounds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import hygiene  # noqa: E402
import small_width  # noqa: E402


def launch(a, threads: int, n: int) -> list:
    "Start `n` workers with `threads` threads each at once; their result dicts."
    setting = dict(width=a.width, M=a.modalities, threads=threads)
    procs = [subprocess.Popen(small_width.worker_cmd(setting, a), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=small_width.worker_env(ROOT, threads), cwd=ROOT) for _ in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=a.timeout)
        if p.returncode != 0: raise RuntimeError(f'worker failed:\n{err[-3000:]}')
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--width', type=float, default=0.0625)
    p.add_argument('--modalities', type=int, default=2)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--clusters', type=int, default=20)
    p.add_argument('--K', type=int, default=1)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--steps', type=int, default=40)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--timeout', type=float, default=1800)
    a = p.parse_args(argv)
    info = hygiene.machine()
    print(f"{info['date']}  cpu {info['cpu']} ({info['cores']} cores)  torch {info['torch']}  load {info['loadavg']}  "
          f"width {a.width}, {a.modalities} modalities, batch {a.batch}")
    ways = {'one run, 2 threads': (2, 1), 'two runs, 1 thread each': (1, 2)}
    totals = {w: [] for w in ways}
    for r in range(a.rounds):
        for w in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            with hygiene.LoadWindow() as lw:
                outs = launch(a, *ways[w])
            rec = lw.record()
            valid = rec['valid'] and all(o.get('valid', True) for o in outs)
            total = sum(o['samples_per_s'] for o in outs)
            totals[w].append(dict(samples_per_s=total, valid=valid))
            print(f"round {r}  {w:<26} total {total:7.1f} samples/s  (per run: "
                  f"{', '.join(format(o['samples_per_s'], '.1f') for o in outs)})  load {rec['load_before']} -> {rec['load_after']}"
                  f"{'' if valid else '  INVALID'}", flush=True)
    for w, res in totals.items():
        med, n = hygiene.valid_median(res)
        shown = 'no valid measurement' if med is None else f'median {med:.1f} samples/s'
        print(f'{w}: {shown} ({n} valid rounds)')


if __name__ == '__main__':
    main()
