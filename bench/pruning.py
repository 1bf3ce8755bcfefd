"""Wall time of post-hoc cluster selection: the cached path (encode once) against the original's cost (re-encode
and run the full K=1 forward, decoding included, at every step), on the same model and the same posterior samples.

    .venv/bin/python bench/pruning.py [--width 1.0] [--clusters 40] [--dz 32] [--threads 2] [--checkpoint RUN]

Without --checkpoint the model is freshly initialised (the timing does not depend on training; the selection does).
Prints both wall times, the ratio and whether the two selections and step records are identical.
With --estimate the re-encode path is not run in full: one of its passes (encode + full K=1 forward + scoring) is
timed and multiplied by the number of passes (C), for scales where the full run takes hours.
"""
import argparse
import datetime
import platform
import time

import torch

from cmvae.polymnist import PolyMNIST
from cmvae.model import build_cmvae
from cmvae.pruning import encode_split, load_trained, score_pass, select_clusters


def cpu_name() -> str:
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--width', type=float, default=1.0, help='channel multiplier of the networks (1.0 = the paper)')
    p.add_argument('--clusters', type=int, default=40, help='initial number of clusters C')
    p.add_argument('--dz', type=int, default=32)
    p.add_argument('--dw', type=int, default=32)
    p.add_argument('--beta', type=float, default=2.5)
    p.add_argument('--n-val', type=int, default=None, help='use the first N validation tuples (default: all 1000)')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--data-dir', default=None)
    p.add_argument('--checkpoint', default=None, help='a trained run folder or checkpoint.pt (overrides the model options)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--estimate', action='store_true', help='time one re-encode pass and extrapolate instead of running all')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.checkpoint:
        model, cfg = load_trained(args.checkpoint, device)
        beta, desc = cfg.beta, f'trained checkpoint {args.checkpoint} (width {cfg.width}, C {cfg.n_clusters}, z {cfg.d_z})'
    else:
        torch.manual_seed(args.seed)
        model = build_cmvae('polymnist', args.dw, args.dz, args.clusters, args.width).to(device).eval()
        beta, desc = args.beta, f'untrained CMVAE width {args.width}, C {args.clusters}, z {args.dz}, w {args.dw}'
    val = PolyMNIST(args.data_dir, 'val')
    if args.n_val: val = val.subset(torch.arange(min(args.n_val, len(val))))
    n_params = sum(q.numel() for q in model.parameters())
    print(f'{datetime.date.today()} | {cpu_name()} | torch {torch.__version__} | {args.threads} threads | device {device}')
    print(f'{desc}: {n_params:,} parameters | {len(val)} validation tuples | batch {args.batch_size}')

    def run(method):
        gen = torch.Generator(device=device).manual_seed(args.seed)
        t0 = time.perf_counter()
        res = select_clusters(model, val, beta, method=method, resample=False, generator=gen, device=device,
                              batch_size=args.batch_size, progress=True)
        return res, time.perf_counter() - t0

    fast, t_fast = run('cached')
    print(f'cached  : {t_fast:8.2f} s  -> {fast.n_clusters} clusters kept')
    if args.estimate:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        data, active = val.to(device), torch.ones(len(model.active), dtype=torch.bool)
        t0 = time.perf_counter()
        with torch.no_grad():
            z = encode_split(model, data, args.batch_size, generator=gen, device=device, full_forward=True, beta=beta)
            score_pass(model, model.log_pz_given_c(z), active, beta, data.labels)
        t_pass = time.perf_counter() - t0
        t_slow = t_pass * len(fast.steps)
        print(f'reencode: {t_pass:8.2f} s for one pass x {len(fast.steps)} passes = {t_slow:.0f} s (ESTIMATE, not run in full)')
        print(f'estimated speed-up {t_slow / t_fast:.1f}x')
        return dict(cached=t_fast, reencode=t_slow, ratio=t_slow / t_fast, identical=None)
    slow, t_slow = run('reencode')
    print(f'reencode: {t_slow:8.2f} s  -> {slow.n_clusters} clusters kept ({len(slow.steps)} full passes)')
    same = torch.equal(fast.active, slow.active)
    print(f'speed-up {t_slow / t_fast:.1f}x | identical selection: {same} | identical step records: {fast.steps == slow.steps}')
    return dict(cached=t_fast, reencode=t_slow, ratio=t_slow / t_fast, identical=same)


if __name__ == '__main__':
    main()
