"""Structured pruning that becomes real speed: a channel-pruned, physically shrunk model against the dense one.

CIFAR-shaped VGG-16 (vgg16_bn, 3x32x32) in eval mode. Channels are chosen by ``--method`` (``pfp``, default: its
sensitivity allocation through ``pk.prune`` and ``pk.shrink``, kept widths rounded up to multiples of ``--round``
(16 by default; 1 = PFP's exact counts), the weight sparsity bisected; ``l1``: ℓ1 filter norm
with the same keep fraction in every group, the fraction bisected) so that the shrunk model has about half the
dense MACs (``--macs 0.5``). Latency: median forward time at batch 1, 16 and 64, dense and shrunk timed interleaved in the
same run (``prunekit.latency.compare_latency``). Target: speedup >= 1.6x at batch 64 on 2 CPU cores.

    python bench/bench_shrink.py [--method pfp|l1] [--round 16] [--threads 2] [--macs 0.5] [--repeats 20]
"""
from __future__ import annotations

import argparse

import torch

from prunekit.latency import compare_latency
from prunekit.models import get_model
from prunekit.structured import channel_groups, shrink
from prunekit.structured.shrink import shrink_report


def l1_channel_masks(model, groups, keep: float) -> dict:
    mods = dict(model.named_modules())
    out = {}
    for g in groups:
        if not g.prunable:
            continue
        score = sum(mods[p].weight.detach().abs().reshape(g.size, -1).sum(1) for p in g.producers)
        k = max(1, round(keep * g.size))
        m = torch.zeros(g.size, dtype=torch.bool)
        m[torch.topk(score, k).indices] = True
        out[g.name] = m
    return out


def pfp_half_macs(model, x, target: float, samples: int = 16, round_channels: int = 1):
    """PFP's own allocation (``pk.prune(..., "pfp")``), its weight sparsity bisected until the shrunk model has
    ``target`` of the dense MACs. Only shapes matter for latency, so the sensitivities use a few random inputs."""
    import copy
    import warnings

    import prunekit as pk

    data = [(torch.randn(samples, *x.shape[1:]), torch.zeros(samples, dtype=torch.long))]
    lo, hi, best = 0.05, 0.95, None
    for _ in range(10):
        s = (lo + hi) / 2
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            masks = pk.prune(m, "pfp", sparsity=s, data=data, sample_size=samples, round_channels=round_channels)
        small = pk.shrink(m, masks, x)
        ratio = shrink_report(model, small, x)["macs_ratio"]
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (s, ratio, small)
        lo, hi = (lo, s) if ratio < target else (s, hi)
    return best


def half_macs(model, x, target: float):
    groups = channel_groups(model, x)
    lo, hi, best = 0.05, 1.0, None
    for _ in range(20):
        keep = (lo + hi) / 2
        small = shrink(model, l1_channel_masks(model, groups, keep), x, groups=groups, check=False)
        ratio = shrink_report(model, small, x)["macs_ratio"]
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (keep, ratio, small)
        lo, hi = (keep, hi) if ratio < target else (lo, keep)
    keep, ratio, small = best
    shrink(model, l1_channel_masks(model, groups, keep), x, groups=groups, check=True)  # outputs agree
    return keep, ratio, small


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--macs", type=float, default=0.5, help="target MACs of the shrunk model / dense")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", choices=("pfp", "l1"), default="pfp")
    ap.add_argument("--round", type=int, default=16, help="pfp round_channels (1 = PFP's exact counts)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = get_model("vgg16_bn", num_classes=10, input_shape=(3, 32, 32)).eval()
    x = torch.randn(4, 3, 32, 32)
    if args.method == "pfp":
        sp, ratio, small = pfp_half_macs(dense, x, args.macs, round_channels=args.round)
        how = f"pfp (round_channels={args.round}) at weight sparsity {sp:.3f}"
    else:
        keep, ratio, small = half_macs(dense, x, args.macs)
        how = f"l1, keep {keep:.3f} of the channels in every group"
    rep = shrink_report(dense, small, x)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    print(f"vgg16_bn, {how} -> params {rep['params_shrunk']:,} / "
          f"{rep['params_dense']:,} ({rep['params_ratio']:.3f}), MACs {rep['macs_shrunk']:,} / {rep['macs_dense']:,} "
          f"({ratio:.3f}, theoretical speedup {1 / ratio:.2f}x)")
    dense, small = dense.to(args.device), small.to(args.device)
    rows = compare_latency({"dense": dense, "shrunk": small}, (3, 32, 32), (1, 16, 64), repeats=args.repeats)
    for bs in (1, 16, 64):
        d = next(r for r in rows if r["model"] == "dense" and r["batch_size"] == bs)
        s = next(r for r in rows if r["model"] == "shrunk" and r["batch_size"] == bs)
        tgt = "  (target >= 1.6x)" if bs == 64 else ""
        print(f"batch {bs:>3}: dense {d['ms']:8.2f} ms  shrunk {s['ms']:8.2f} ms  speedup {s['speedup']:.2f}x{tgt}")


if __name__ == "__main__":
    main()
