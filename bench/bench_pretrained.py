"""What pruning a pretrained transformer costs: scoring time and peak memory of each method on MiniLM-L6, and its
fine-tuning and inference throughput.

MiniLM (``prunekit models fetch minilm``) as the harness builds it (:class:`prunekit.hf.TextClassifier`: encoder,
mean pooling, a 2-class head), real SpamAssassin mails (``prunekit data fetch spam_assassin``) tokenized to
``--length`` tokens. Each method prunes 50% of the 36 encoder Linear weights (10.6M) from ``--samples`` calibration
mails in batches of 32, in a fresh process, so its peak resident memory is its own: the table shows the process's
peak RSS while scoring and what scoring added to the peak after loading (model + data + one forward). The
baseline of the throughput rows is the same model: examples per second of AdamW steps (batch 32) and of inference
(batch 32), one thread.

    python bench/bench_pretrained.py [--methods magnitude,snip,...] [--samples 128] [--length 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

METHODS = ["magnitude", "random", "snip", "fts", "grasp", "kfac", "woodfisherblock", "wanda", "sparsegpt",
           "filter_l1", "pfp"]
OPTIONS = {"woodfisherblock": {"fisher_samples": 128, "block_size": 50}, "kfac": {"kfac_samples": 128}}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _setup(samples: int, length: int):
    from prunekit.data import load_tokenized
    from prunekit.hf import text_classifier
    from prunekit.models.fetch import minilm_path

    splits = load_tokenized("spam_assassin", minilm_path(), length, subset=max(samples, 64))
    torch.manual_seed(0)
    model = text_classifier(minilm_path(), 2)
    x, y = splits.train.inputs()[:samples], splits.train.y[:samples]
    return model, [(x[i:i + 32], y[i:i + 32]) for i in range(0, samples, 32)]


def one(method: str, samples: int, length: int) -> dict:
    """Score ``method`` once in this process; its time and memory."""
    import prunekit as pk

    model, data = _setup(samples, length)
    with torch.no_grad():
        model.eval()(data[0][0])
    base = _peak_mb()
    opts = OPTIONS.get(method, {})
    t0 = time.perf_counter()
    masks = pk.prune(model, method, sparsity=0.5, data=data, **opts)
    dt = time.perf_counter() - t0
    return {"method": method, "seconds": dt, "peak_mb": _peak_mb(), "base_mb": base,
            "sparsity": float(masks.sparsity())}


def throughput(length: int, steps: int = 8) -> dict:
    model, _ = _setup(64, length)
    x, y = torch.randint(1000, 30000, (32, length)), torch.randint(0, 2, (32,))
    xb = torch.stack([x, torch.ones_like(x)], 1).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    model.eval()
    inf = []
    with torch.inference_mode():
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            model(xb)
            inf.append(time.perf_counter() - t0)
    med = sorted(times[1:])[steps // 2]
    imed = sorted(inf[1:])[steps // 2]
    return {"train_step_s": med, "train_examples_per_s": 32 / med, "infer_batch_s": imed,
            "infer_examples_per_s": 32 / imed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(one(a.one, a.samples, a.length)))
        return
    print(f"MiniLM-L6 (22.7M parameters, 10.6M prunable), {a.samples} calibration mails of {a.length} tokens, "
          f"sparsity 0.5, {a.threads} thread(s)")
    print(f"{'method':<16} {'scoring s':>10} {'peak RSS MB':>12} {'added MB':>9}")
    for m in a.methods.split(","):
        cmd = [sys.executable, __file__, "--one", m, "--samples", str(a.samples), "--length", str(a.length),
               "--threads", str(a.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{m:<16} failed: {last[:150]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{m:<16} {r['seconds']:>10.1f} {r['peak_mb']:>12.0f} {r['peak_mb'] - r['base_mb']:>9.0f}")
    t = throughput(a.length)
    print(f"fine-tuning (AdamW, batch 32): {t['train_step_s']:.2f} s/step, {t['train_examples_per_s']:.1f} "
          f"examples/s; inference (batch 32): {t['infer_batch_s']:.2f} s, {t['infer_examples_per_s']:.1f} "
          "examples/s")


if __name__ == "__main__":
    main()
