"""Scoring on several processes: one ``pk.prune`` call shared by DDP ranks (gloo, CPU) against one process.

LeNet-300-100 (266,200 prunable weights) on ``--samples`` real MNIST training images (synthetic data when MNIST is
not in the data directory). The baseline is one process with ``--cores`` torch threads; the contender is ``--cores``
gloo processes with one thread each, the same total cores. Both score the same data; the contender's masks must be
identical to the baseline's (checked). Time: wall seconds of the ``pk.prune`` call (ranks start together after a
barrier; the slowest rank counts), median of ``--repeats``.

    python bench/bench_ddp_scoring.py [--methods woodfisherblock fts snip] [--cores 2] [--samples 1000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import prunekit as pk
from prunekit.models import get_model

OPTIONS = {
    "woodfisherblock": {"fisher_samples": 400, "block_size": 1000},
    "fts": {}, "snip": {}, "grasp": {"batch_size": 100},
}


def data(n: int):
    """n scoring images of the MNIST training split (normalized, in batches of 100), or synthetic ones."""
    try:
        from prunekit.data import load_dataset, scoring_data

        batches = list(scoring_data(load_dataset("mnist"), {"random": n}, batch_size=100, seed=0))
        return batches, "MNIST"
    except Exception:  # noqa: BLE001 - no MNIST here: synthetic images of the same shape
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
        return [(x[i:i + 100], y[i:i + 100]) for i in range(0, n, 100)], "synthetic"


def prune_once(method: str, batches) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = get_model("lenet_300_100", num_classes=10, input_shape=(1, 28, 28))
    from prunekit import distributed

    distributed.barrier()
    t0 = time.perf_counter()
    masks = pk.prune(model, method, sparsity=0.9, data=batches, **OPTIONS.get(method, {}))
    seconds = time.perf_counter() - t0
    if distributed.active():  # the slowest rank
        t = torch.tensor([seconds])
        distributed.all_max(t)
        seconds = float(t)
    return seconds, {n: m.clone() for n, m in masks.as_dict().items()}


def _rank(rank: int, world: int, folder: str, methods, n: int, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    batches, _ = data(n)
    out = {}
    for m in methods:
        runs = [prune_once(m, batches) for _ in range(repeats)]
        out[m] = (statistics.median(t for t, _ in runs), runs[-1][1])
    if rank == 0:
        torch.save(out, os.path.join(folder, "ddp.pt"))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["woodfisherblock", "fts", "grasp"])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    batches, what = data(a.samples)
    torch.set_num_threads(a.cores)
    base = {}
    for m in a.methods:
        runs = [prune_once(m, batches) for _ in range(a.repeats)]
        base[m] = (statistics.median(t for t, _ in runs), runs[-1][1])
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(a.cores, folder, a.methods, a.samples, a.repeats), nprocs=a.cores, join=True)
        ddp = torch.load(os.path.join(folder, "ddp.pt"), weights_only=True)
    print(f"LeNet-300-100, {a.samples} {what} images, sparsity 0.9; 1 process x {a.cores} threads vs "
          f"{a.cores} gloo processes x 1 thread (median of {a.repeats})")
    print(f"{'method':<18}{'1 process s':>12}{'DDP s':>10}{'speedup':>9}  masks")
    for m in a.methods:
        (t1, m1), (t2, m2) = base[m], ddp[m]
        same = all(torch.equal(m1[k], m2[k]) for k in m1)
        print(f"{m:<18}{t1:>12.2f}{t2:>10.2f}{t1 / t2:>8.2f}x  {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
