"""Side-by-side CPU training throughput: our CMVAE vs MultiVae's CMVAE (multivae==1.0.3) on the same workload.

    .venv/bin/python bench/peer_multivae.py                      # K=1 and K=10, batch 128, width 1, 2 threads
    .venv/bin/python bench/peer_multivae.py --K 1 --rounds 3 --steps 2

Workload (method spec §3.2-3.3, §4.1): PolyMNIST, 5 modalities, the width-1 ResNet encoders/decoders
(MultiVae's `EncoderResnetMMNIST(32, 32)` / `DecoderResnetMMNIST(64)` have the same layers and the same
22,157,975 trainable parameters as ours), D_z = D_w = 32, 40 clusters, Laplace prior/posterior with the softmax
trick, Laplace likelihood scale 0.75, beta 2.5, the IWAE objective ("iwae_looser" in MultiVae), AMSGrad Adam,
batch 128 of random images, `--threads` torch threads. A training step = objective + backward + Adam step.

MultiVae lives in a throwaway venv, bench/.peer-venv (git-ignored, never a project dependency), made on first use
with `pip install multivae==1.0.3 torch==<our torch>`. A .pth file in it points at the project venv's
site-packages, so the peer venv sees, and pip accepts, the very torch build that our code uses (no second torch
download; identical kernels on both sides); only MultiVae's own extra dependencies are installed there.

Each measurement is a fresh subprocess (ours: bench/train_step.py in the project venv; MultiVae: this file with
`--worker` in the peer venv), alternating which goes first, so that both sides see the same background load on
a shared machine. Prints samples/s per run with the 1-minute load before and after it (bench/hygiene.py: a run
above cores + 0.5 is marked INVALID and left out), medians of the valid runs and the ratio ours / MultiVae.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import hygiene  # noqa: E402
PEER = HERE / '.peer-venv'
PEER_PY = PEER / 'bin' / 'python'
MULTIVAE = 'multivae==1.0.3'


# ------------------------------------------------------------------------------------------- peer venv
def ensure_peer_venv(verbose: bool = True) -> Path:
    "Create bench/.peer-venv with multivae==1.0.3 on top of the project's torch, unless it already works."
    if PEER_PY.exists() and subprocess.run([str(PEER_PY), '-c', 'import multivae, torch'], capture_output=True).returncode == 0:
        return PEER_PY
    import torch   # the project's torch: its version is pinned in the peer venv
    base = getattr(sys, '_base_executable', sys.executable)
    if verbose: print(f'creating {PEER} with {MULTIVAE} (python {base}, torch {torch.__version__})', flush=True)
    subprocess.run([base, '-m', 'venv', str(PEER)], check=True)
    site = subprocess.run([str(PEER_PY), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / 'zz_project_site.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    torch_pin = 'torch==' + torch.__version__.split('+')[0]
    r = subprocess.run([str(PEER_PY), '-m', 'pip', 'install', '--disable-pip-version-check', MULTIVAE, torch_pin],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f'could not install {MULTIVAE} ({torch_pin}) into {PEER}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
    check = subprocess.run([str(PEER_PY), '-c', 'import multivae, torch; print(torch.__version__, torch.__file__)'],
                           capture_output=True, text=True)
    if check.returncode != 0: raise RuntimeError(f'{PEER}: multivae does not import:\n{check.stderr[-3000:]}')
    if verbose: print(f'peer venv ready: torch {check.stdout.strip()}', flush=True)
    return PEER_PY


# ------------------------------------------------------------------------------------------- MultiVae worker
def multivae_step_time(batch: int = 128, K: int = 1, threads: int = 2, steps: int = 1, warmup: int = 1,
                       seed: int = 0, tune_allocator: bool = False) -> dict:
    "Runs inside the peer venv: time MultiVae's CMVAE training step on the workload described above."
    import platform
    import torch
    if tune_allocator:   # the same glibc malloc settings as ours (cmvae.config.tune_allocator), to separate their effect
        sys.path.insert(0, str(ROOT))
        from cmvae.config import tune_allocator as tune
        if not tune(): raise RuntimeError('tune_allocator: glibc did not take the settings')
    from multivae.data.datasets.base import MultimodalBaseDataset
    from multivae.models import CMVAE, CMVAEConfig
    from multivae.models.nn.mmnist import DecoderResnetMMNIST, EncoderResnetMMNIST
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    mods = [f'm{i}' for i in range(5)]
    cfg = CMVAEConfig(n_modalities=5, latent_dim=32, input_dims={m: (3, 28, 28) for m in mods},
                      decoders_dist={m: 'laplace' for m in mods}, decoder_dist_params={m: {'scale': 0.75} for m in mods},
                      K=K, prior_and_posterior_dist='laplace_with_softmax', beta=2.5, modalities_specific_dim=32,
                      loss='iwae_looser', number_of_clusters=40)
    model = CMVAE(cfg, encoders={m: EncoderResnetMMNIST(32, 32) for m in mods},
                  decoders={m: DecoderResnetMMNIST(64) for m in mods}).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, amsgrad=True)
    g = torch.Generator().manual_seed(seed)
    data = MultimodalBaseDataset(data={m: torch.rand(batch, 3, 28, 28, generator=g) for m in mods},
                                 labels=torch.zeros(batch, dtype=torch.long))

    def step():
        loss = model(data).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup): step()
    times = []
    with hygiene.LoadWindow() as load:
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss): raise RuntimeError(f'MultiVae: non-finite loss {float(loss)}')
    med = statistics.median(times)
    import multivae
    return dict(impl='multivae', tune_allocator=tune_allocator, version=getattr(multivae, '__version__', '1.0.3'), batch=batch, K=K, width=1.0,
                steps=steps, warmup=warmup, step_seconds=[round(t, 4) for t in times], median_step_s=med,
                samples_per_s=batch / med, n_params=sum(p.numel() for p in params), threads=threads,
                torch=torch.__version__, python=platform.python_version(), **load.record())


# ------------------------------------------------------------------------------------------- orchestration
def _run_json(cmd: list, timeout: float) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if r.returncode != 0: raise RuntimeError(f'{" ".join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])


def ours_cmd(a, K: int, channels_last: bool) -> list:
    return [sys.executable, str(HERE / 'train_step.py'), '--json', '--dataset', 'polymnist', '--batch', str(a.batch),
            '--K', str(K), '--width', '1', '--threads', str(a.threads), '--steps', str(a.steps),
            '--warmup', str(a.warmup), '--objective', 'iwae', '--clusters', '40',
            '--channels-last' if channels_last else '--no-channels-last'] + \
           (['--micro-batch', str(a.micro_batch)] if a.micro_batch else [])


def peer_cmd(a, K: int, tune_allocator: bool = False) -> list:
    return [str(PEER_PY), str(Path(__file__).resolve()), '--worker', '--batch', str(a.batch), '--K', str(K),
            '--threads', str(a.threads), '--steps', str(a.steps), '--warmup', str(a.warmup)] + \
           (['--peer-tuned-allocator'] if tune_allocator else [])


def compare(a) -> list:
    "Alternate ours / MultiVae `a.rounds` times per K; returns all result dicts."
    ensure_peer_venv()
    info = hygiene.machine()
    print(f"{info['date']}  cpu {info['cpu']} ({info['cores']} cores)  torch {info['torch']}  threads {a.threads}  "
          f"load {info['loadavg']}  (a run is INVALID above load {hygiene.max_load():.1f})", flush=True)
    print(f'workload: PolyMNIST width 1, batch {a.batch}, D_z=D_w=32, 40 clusters, Laplace, IWAE, '
          f'{a.warmup} warm-up + {a.steps} timed step(s) per run', flush=True)
    variants = [('ours', True)] + ([('ours', False)] if a.both_layouts else []) + \
               ([('multivae', 'tuned')] if a.peer_tuned_allocator else [])
    results = []
    for K in a.K:
        for r in range(a.rounds):
            order = [('multivae', None)] + [(n, cl) for n, cl in variants]
            if r % 2 == 0: order = order[1:] + order[:1]
            for name, cl in order:
                cmd = peer_cmd(a, K, cl == 'tuned') if name == 'multivae' else ours_cmd(a, K, cl)
                res = _run_json(cmd, a.timeout)
                res['label'] = {None: name, 'tuned': 'multivae (allocator tuned)'}.get(cl, f'ours (channels_last={cl})')
                res['round'] = r
                results.append(res)
                print(f"K={K:<3d} round {r}  {res['label']:<28s} {res['samples_per_s']:8.3f} samples/s   "
                      f"steps {res['step_seconds']} s   load {res['load_before']} -> {res['load_after']}{hygiene.mark(res)}", flush=True)
        labels = sorted({x['label'] for x in results if x['K'] == K})
        med = {l: hygiene.valid_median([x for x in results if x['K'] == K and x['label'] == l]) for l in labels}
        for l in labels:
            if l == 'multivae': continue
            (ours, n_ours), (peer, n_peer) = med[l], med['multivae']
            if ours is None or peer is None:
                print(f'K={K}: {l}: NOT A MEASUREMENT ({n_ours} and {n_peer} valid rounds; {hygiene.MIN_ROUNDS} needed)', flush=True)
            else:
                print(f'K={K}: {l}: median {ours:.3f} samples/s ({n_ours} valid rounds) vs MultiVae {peer:.3f} ({n_peer})  ->  '
                      f'ratio {l} / MultiVae {ours / peer:.2f}x', flush=True)
    print(f"load at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--K', type=int, nargs='+', default=[1, 10])
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--steps', type=int, default=1, help='timed steps per run (a width-1 step is ~22 GFLOP/sample at K=1)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--rounds', type=int, default=3, help='alternating runs per implementation and K')
    p.add_argument('--micro-batch', type=int, default=None, help='ours: micro-batches of this many tuples (the peer has none)')
    p.add_argument('--both-layouts', action='store_true', help='also time ours with --no-channels-last')
    p.add_argument('--peer-tuned-allocator', action='store_true',
                   help="also time MultiVae with our glibc malloc settings (cmvae.config.tune_allocator), as 'multivae (allocator tuned)'")
    p.add_argument('--timeout', type=float, default=3600, help='seconds per subprocess')
    p.add_argument('--json-out', default=None, help='write all results to this JSON file')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(multivae_step_time(a.batch, a.K[0], a.threads, a.steps, a.warmup, tune_allocator=a.peer_tuned_allocator)))
        return
    results = compare(a)
    if a.json_out: Path(a.json_out).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
