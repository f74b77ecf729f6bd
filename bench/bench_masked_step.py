"""Masked training step vs dense, measured in the same run.

One step = zero_grad, forward, cross-entropy, backward, SGD (momentum 0.9, nesterov, weight decay 5e-4) step. The
masked model is pruned to 90% sparsity with magnitude and keeps its zeros through Masks.attach (grad masking before
the step; SGD needs no re-masking after it). Dense and masked steps are timed in interleaved blocks so that machine noise hits
both alike; the printed ratio is the median over blocks of masked/dense time of back-to-back block pairs. Target: overhead at most 5% (ratio <= 1.05).

    python bench/bench_masked_step.py [--steps 30] [--blocks 7] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import prunekit as pk
from prunekit.models import get_model


def make_step(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(step, n, sync):
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t) / n


def bench(name, input_shape, batch, steps, blocks, device):
    torch.manual_seed(0)
    dense = get_model(name).to(device)
    masked = copy.deepcopy(dense)
    x = torch.randn(batch, *input_shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opts = []
    for m in (dense, masked):
        opts.append(torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4))
    masks = pk.prune(masked, "magnitude", sparsity=0.9)
    masks.attach(opts[1])
    step_d, step_m = make_step(dense, opts[0], x, y), make_step(masked, opts[1], x, y)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(5):  # warm-up
        step_d(), step_m()
    td, tm, ratios = [], [], []
    for b in range(blocks):
        order = (step_d, step_m) if b % 2 == 0 else (step_m, step_d)
        t = {s: timed(s, steps, sync) for s in order}
        td.append(t[step_d])
        tm.append(t[step_m])
        ratios.append(t[step_m] / t[step_d])  # paired: both blocks ran back to back
    assert pk.sparsity(masked) == masks.sparsity()  # zeros held exactly through every step
    d, m, r = statistics.median(td), statistics.median(tm), statistics.median(ratios)
    print(f"{name:<14} batch {batch:<4} dense {1e3 * d:8.3f} ms/step   masked {1e3 * m:8.3f} ms/step   "
          f"ratio {r:.3f}  (overhead {100 * (r - 1):+.1f}%, target <= +5%)")
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--blocks", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    bench("lenet_300_100", (1, 28, 28), 128, args.steps, args.blocks, args.device)
    bench("resnet20", (3, 32, 32), 128, max(3, args.steps // 6), args.blocks, args.device)


if __name__ == "__main__":
    main()
