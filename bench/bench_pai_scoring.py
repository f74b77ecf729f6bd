"""Time to score with every pruning-at-initialization method (one round, B = 1, eval mode).

For each model: the same samples for every method, ``pk.score`` timed once after a warm-up call; ``--memory`` runs
each method in a fresh subprocess and reports the growth of the peak resident set (CPU) or
torch.cuda.max_memory_allocated (CUDA). The plain forward+backward over the same samples is printed as the floor.

    python bench/bench_pai_scoring.py [--model lenet5_caffe|resnet18|all] [--samples N] [--threads 1] [--memory]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import prunekit as pk
from prunekit.models import get_model, model_info

METHODS = ["magnitude", "random", "grad_norm", "snip", "grasp", "fisher_diag", "fisher_pruner", "fts", "fbss",
           "synflow", "px"]
DEFAULT_SAMPLES = {"lenet5_caffe": 1000, "resnet18": 64}


def setup(model_name: str, samples: int, device: str):
    torch.manual_seed(0)
    model = get_model(model_name).to(device)
    shape = model_info(model_name).default_input_shape
    x, y = torch.randn(samples, *shape, device=device), torch.randint(0, 10, (samples,), device=device)
    data = [(x[i:i + 128], y[i:i + 128]) for i in range(0, samples, 128)]
    return model, data


def score_once(model, method, data):
    kw = {"data": data} if pk.get_method(method).needs_data != "none" else {}
    t = time.perf_counter()
    pk.score(model, method, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def plain(model, data):
    t = time.perf_counter()
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def one(args) -> None:
    """Subprocess: one method, print its time and memory growth as JSON."""
    torch.set_num_threads(args.threads)
    model, data = setup(args.model, args.samples, args.device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    secs = score_once(model, args.one, data)
    mem = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    if args.device.startswith("cuda"):
        mem = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    print(json.dumps({"seconds": secs, "mib": mem}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="all")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    torch.set_num_threads(args.threads)
    models = ["lenet5_caffe", "resnet18"] if args.model == "all" else [args.model]
    for name in models:
        n = args.samples or DEFAULT_SAMPLES.get(name, 64)
        model, data = setup(name, n, args.device)
        plain(model, data)
        floor = plain(model, data)
        print(f"{name}: {n} random samples, {args.threads} thread(s), device {args.device}; "
              f"plain forward+backward {floor:.3f} s")
        for m in METHODS:
            score_once(model, m, data[:1])  # warm-up
            if args.memory:
                cmd = [sys.executable, __file__, "--one", m, "--model", name, "--samples", str(n), "--threads",
                       str(args.threads), "--device", args.device]
                res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
                secs, mem = res["seconds"], f"  peak +{res['mib']:.0f} MiB"
            else:
                secs, mem = score_once(model, m, data), ""
            print(f"  {m:<14} {secs:8.3f} s  {1e3 * secs / n:8.2f} ms/sample  {secs / floor:6.1f}x plain{mem}")


if __name__ == "__main__":
    main()
