"""How long one ``pk.prune`` call takes: pfp with its default |S| and the filter baselines, on CIFAR-shaped
VGG-16-BN and ResNet-56 (issue 19's targets: pfp under 10 s, the filter baselines under 0.2 s, one CPU thread).

Each call prunes a fresh random-init model (``torch.manual_seed(0)``) to sparsity 0.5; pfp reads 512 random
CIFAR-shaped images (8 batches of 64) as its data. One thread (``torch.set_num_threads(1)``). The first call of a
method on a model also imports and traces (the channel groups are then cached per architecture) and is printed
apart; the median of the next ``--repeats`` calls is the per-call time, wall clock and process CPU time. The
load average (``os.getloadavg``) is printed before and after each row: numbers taken on a loaded machine are not
the idle ones (CPU time is the steadier of the two there).

    python bench/bench_prune_call.py [--models vgg16_bn,resnet56] [--methods pfp,filter_l1,filter_l2,filter_random,bn_scale]
                                     [--repeats 5] [--pfp-repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import prunekit as pk
from prunekit.models import get_model


def data_batches(n: int = 512, batch: int = 64) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n // batch)]


def one_call(model_name: str, method: str, data) -> tuple[float, float]:
    """(wall, CPU) seconds of one pk.prune call on a fresh model."""
    torch.manual_seed(0)
    model = get_model(model_name)
    kw = {"data": data} if method == "pfp" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, c = time.perf_counter(), time.process_time()
        pk.prune(model, method, 0.5, **kw)
        return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg16_bn,resnet56")
    ap.add_argument("--methods", default="pfp,filter_l1,filter_l2,filter_random,bn_scale")
    ap.add_argument("--repeats", type=int, default=5, help="calls per filter method after the first (median)")
    ap.add_argument("--pfp-repeats", type=int, default=3, help="calls of pfp after the first (median)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = data_batches()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"{'model':10s} {'method':14s} {'first s':>8s} {'median s':>9s} {'cpu s':>7s}  {'runs':>4s}  load before/after")
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            load0 = os.getloadavg()[0]
            first = one_call(model_name, method, data)[0]
            n = args.pfp_repeats if method == "pfp" else args.repeats
            runs = [one_call(model_name, method, data) for _ in range(n)]
            wall = statistics.median(r[0] for r in runs) if runs else float("nan")
            cpu = statistics.median(r[1] for r in runs) if runs else float("nan")
            print(f"{model_name:10s} {method:14s} {first:8.3f} {wall:9.3f} {cpu:7.3f}  {n:4d}  "
                  f"{load0:.2f}/{os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
