"""Calibration cost of the layer-wise methods (issue 17 §1): ``wanda`` and ``sparsegpt`` against one forward pass
over the same calibration set, on the CPU (``magnitude`` with layer scope: the cost of pk.prune itself).

For each model, the calibration set (random inputs: the cost does not depend on the values) is fed once through
the model in eval mode without gradients (the "forward" time), then ``pk.prune`` runs each method at ``--sparsity``
on a fresh copy of the model (best of ``--repeat``), each call right after a forward pass whose best time over the
same repeats is the ratio's denominator (the machine's speed drifts by 10-20% between minutes):

- ``lenet_300_100``: 128 images 1×28×28 in batches of 32 (3 Linear layers, 266,200 weights);
- ``minilm``: the fetched MiniLM encoder (``prunekit.models.fetch.minilm_path()``, skipped when absent), 128
  sequences of 64 random token ids in batches of 16 (36 Linear layers in 6 blocks).

With ``--quality``, each pruned model is also compared with the dense one on held-out inputs (32 more samples
drawn like the calibration set): the relative output error ‖f(x) − f̂(x)‖/‖f(x)‖ (MiniLM: the last hidden state;
LeNet: the logits).

``--memory``: instead, each method in a fresh process: the growth of the process's peak resident memory during
``pk.prune`` (VmHWM after minus VmRSS before, with the model and the calibration set already loaded and one forward
pass done) beside the memory planner's peak (:func:`prunekit.families.layerwise.base.memory_plan`: the calibration
statistics, SparseGPT's three d×d working matrices, and the scores, masks and weight copies of the call). ``wide``: 4 Linear 4096→4096 layers and 2,048 calibration
rows, where the statistics dominate; ``minilm``: where they do not (d ≤ 1536: activations and the forward dominate).

``--sweep 128,1024,4096``: instead, LeNet-300-100 pruned to 50% by sparsegpt, wanda and magnitude with that many
calibration images, and the output error on 256 held-out images (the rank-deficient-Hessian check).

    OMP_NUM_THREADS=1 python bench/bench_layerwise.py [--threads 1] [--models lenet,minilm] [--repeat 2] [--quality]
    OMP_NUM_THREADS=1 python bench/bench_layerwise.py --sweep 128,1024,4096
    OMP_NUM_THREADS=1 python bench/bench_layerwise.py --memory --models wide,minilm
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch

import prunekit as pk

CODES = [("magnitude", {"scope": "layer"}), ("wanda", {}), ("wanda", {"sequential": True}), ("sparsegpt", {"sequential": False}), ("sparsegpt", {})]


def lenet():
    torch.manual_seed(0)
    from prunekit.models import get_model

    model = get_model("lenet_300_100")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(5)]
    return model, data[:4], data[4:]


def minilm():
    from prunekit.hf import load_hf
    from prunekit.models.fetch import minilm_path

    model = load_hf(minilm_path(), "base").eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, vocab, (16, 64), generator=g),
             "attention_mask": torch.ones(16, 64, dtype=torch.long)} for _ in range(10)]
    return model, data[:8], data[8:]


def wide():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(4)])
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(256, 4096, generator=g), torch.zeros(256, dtype=torch.long)) for _ in range(9)]
    return model, data[:8], data[8:]


MODELS = {"lenet": lenet, "minilm": minilm, "wide": wide}

MEMORY_CODES = [("wanda", {}), ("sparsegpt", {"sequential": False}), ("sparsegpt", {})]


def memory_one(name: str, index: int) -> dict:
    """One method on one model, in this (fresh) process: peak resident growth during pk.prune vs the plan."""
    from prunekit.families.layerwise.base import memory_plan
    from prunekit.peak_memory import proc_status, reset_peak_rss

    code, kw = MEMORY_CODES[index]
    model, data, _ = MODELS[name]()
    model.eval()
    forward_time(model, data)  # the forward's own buffers are allocated once before the baseline
    plan = memory_plan(model, code, **kw)
    if not reset_peak_rss():
        raise SystemExit("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    base = proc_status("VmRSS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.prune(model, code, sparsity=0.5, data=data, **kw)
    peak = proc_status("VmHWM")
    return {"model": name, "method": code + "".join(f" {k}={v}" for k, v in kw.items()),
            "measured_mib": (peak - base) / 2**20, "plan_mib": plan.peak / 2**20,
            "statistics_mib": plan.statistics / 2**20}


def memory(models: list[str]) -> None:
    import subprocess
    import sys

    rows = []
    for name in models:
        for i in range(len(MEMORY_CODES)):
            out = subprocess.run([sys.executable, __file__, "--memory-one", f"{name}:{i}"], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                print(f"{name} {MEMORY_CODES[i][0]}: failed ({out.stderr.strip().splitlines()[-1:]})")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{row['model']:8s} {row['method']:28s} planned {row['plan_mib']:8.1f} MiB (statistics "
                  f"{row['statistics_mib']:6.1f})   measured peak growth {row['measured_mib']:8.1f} MiB   "
                  f"measured / planned {row['measured_mib'] / row['plan_mib']:.2f}")
            rows.append(row)
    print(json.dumps(rows))


def outputs(model, data) -> torch.Tensor:
    from prunekit.batches import DictInputs, call

    with torch.no_grad():
        outs = [call(model, DictInputs(b) if isinstance(b, dict) else b[0]) for b in data]
    return torch.cat([o if isinstance(o, torch.Tensor) else o.last_hidden_state for o in outs])


def forward_time(model, data) -> float:
    from prunekit.batches import DictInputs, call

    with torch.no_grad():
        t = time.perf_counter()
        for b in data:
            call(model, DictInputs(b) if isinstance(b, dict) else b[0])
        return time.perf_counter() - t


def sweep(sizes: list[int]) -> None:
    from prunekit.models import get_model

    torch.manual_seed(0)
    model = get_model("lenet_300_100").eval()
    g = torch.Generator().manual_seed(0)
    held = torch.randn(256, 1, 28, 28, generator=g)
    with torch.no_grad():
        dense = model(held)
    for n in sizes:
        data = [(torch.randn(128, 1, 28, 28, generator=g), torch.zeros(128, dtype=torch.long))
                for _ in range(max(1, n // 128))]
        errs = []
        for code in ("sparsegpt", "wanda", "magnitude"):
            m = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if code == "magnitude":
                    pk.prune(m, code, sparsity=0.5, scope="layer")
                else:
                    pk.prune(m, code, sparsity=0.5, data=data)
            with torch.no_grad():
                errs.append(float((m(held) - dense).norm() / dense.norm()))
        print(f"{n} calibration images: output error sparsegpt / wanda / magnitude = "
              + " / ".join(f"{e:.3f}" for e in errs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="lenet,minilm")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--sweep", default=None)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--memory-one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.memory_one:
        name, i = a.memory_one.split(":")
        print(json.dumps(memory_one(name, int(i))))
        return
    if a.memory:
        memory(a.models.split(","))
        return
    if a.sweep:
        sweep([int(v) for v in a.sweep.split(",")])
        return
    rows = []
    for name in a.models.split(","):
        try:
            model, data, held_out = MODELS[name]()
        except Exception as e:  # noqa: BLE001 - an asset that is not fetched here
            print(f"{name}: skipped ({type(e).__name__}: {e})")
            continue
        model.eval()
        dense_out = outputs(model, held_out) if a.quality else None
        fwd = min(forward_time(model, data) for _ in range(a.repeat))
        n = sum(p.tensor.numel() for p in pk.Masks.from_zeros(model).params)
        print(f"{name}: {n:,} prunable weights, one forward pass over {sum(len(next(iter(b.values())) if isinstance(b, dict) else b[0]) for b in data)} "
              f"samples: {fwd:.3f} s ({a.threads} thread(s))")
        for code, kw in CODES:
            best, fwd = float("inf"), float("inf")
            for _ in range(a.repeat):  # a forward pass timed right before each call: the ratio's two sides
                fwd = min(fwd, forward_time(model, data))  # share the machine's state of the moment
                m = copy.deepcopy(model)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = time.perf_counter()
                    masks = pk.prune(m, code, sparsity=a.sparsity, data=None if code == "magnitude" else data, **kw)
                    best = min(best, time.perf_counter() - t)
            label = code + "".join(f" {k}={v}" for k, v in kw.items())
            row = {"model": name, "method": label, "seconds": best, "forwards": best / fwd, "forward_s": fwd}
            extra = ""
            if a.quality:
                row["rel_error"] = float((outputs(m, held_out) - dense_out).norm() / dense_out.norm())
                extra = f"  output error {row['rel_error']:.4f}"
            print(f"  {label:32s} {best:8.3f} s = {best / fwd:6.1f} forwards of {fwd:.3f} s  (sparsity "
                  f"{masks.sparsity():.4f}){extra}")
            rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
