"""Gradient-statistics engines (prunekit.gradstats) at B = 1, eval mode: time and peak memory.

For each model: (a) the hooks engine, (b) the loop engine (one single-sample forward+backward per sample),
(c) the vmap engine (torch.func per-sample gradients), (d) the floor: plain forward + backward of the mean loss
over the same samples in chunks of ``--chunk`` (the hooks engine's chunk size), no per-sample work. Times are the
best of ``--repeats`` runs (engines interleaved) after a warm-up. Targets for LeNet-5-Caffe: loop/hooks >= 3x,
hooks/plain <= 2.5x. ``--model`` takes any registered model (default: LeNet-5-Caffe and ResNet-18).

Peak memory (``--memory``): each engine runs once in a fresh subprocess after setup (model, data, warm-up). On CPU
it reports the peak resident set during the run minus the resident set at its start (Linux: the high-water mark is
reset through /proc/self/clear_refs; elsewhere the growth of ru_maxrss, a lower bound); on CUDA
torch.cuda.max_memory_allocated over the memory allocated before the run. Process-level, so it includes allocator
caching and the engine's working buffers, not only tensors that are alive at the peak.

    python bench/bench_gradstats.py [--model lenet5_caffe|resnet18|all] [--samples N] [--device cpu]
                                    [--threads 1] [--repeats 3] [--mnist] [--memory] [--skip vmap,loop]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch

import torch.nn.functional as F

from prunekit.gradstats import grad_stats
from prunekit.models import canonical_name, get_model, model_info
from prunekit.peak_memory import proc_status, reset_peak_rss
from prunekit.params import prunable_params

DEFAULT_SAMPLES = {"lenet5_caffe": 1000, "resnet18": 64}  # others: 64
ENGINES = ("hooks", "loop", "vmap", "plain")


def make_data(model_name: str, samples: int, device: str, mnist: bool):
    torch.manual_seed(0)
    source = "random"
    shape = model_info(model_name).default_input_shape
    if mnist and tuple(shape) == (1, 28, 28):
        try:
            from prunekit.data import load_dataset

            train = load_dataset("mnist").train
            x, y = train.inputs()[:samples].clone(), train.y[:samples].clone()
            del train
            source = "MNIST"
        except Exception as e:  # noqa: BLE001 - the real data is optional
            print(f"  (MNIST not available: {e}; using random inputs)")
    if source == "random":
        x = torch.randn(samples, *shape)
        y = torch.randint(0, 10, (samples,))
    return x.to(device), y.to(device), source


def make_model(model_name: str, device: str):
    torch.manual_seed(0)
    return get_model(model_name).to(device).eval()


def runner(engine: str, model, params, x, y, chunk: int):
    batches = [(x[i: i + 100], y[i: i + 100]) for i in range(0, x.shape[0], 100)]  # incoming batches of 100
    if engine == "plain":
        tensors = list(model.parameters())

        def run():
            for i in range(0, x.shape[0], chunk):
                loss = F.cross_entropy(model(x[i: i + chunk]), y[i: i + chunk])
                torch.autograd.grad(loss, tensors)
        return run
    return lambda: grad_stats(model, params, batches, batch_size=1, engine=engine, max_chunk=chunk)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_it(fn, repeats: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def child(args) -> None:
    """One engine, one run, in this fresh process: print its peak memory growth as JSON."""
    torch.set_num_threads(args.threads)
    model = make_model(args.model, args.device)
    params = prunable_params(model)
    x, y, _ = make_data(args.model, args.samples, args.device, args.mnist)
    fn = runner(args._child, model, params, x, y, args.chunk)
    runner(args._child, model, params, x[:4], y[:4], args.chunk)()  # warm-up: lazy init, kernels
    if args.device.startswith("cuda"):
        sync(args.device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(args.device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        gc.collect()
        if reset_peak_rss():  # Linux: the high-water mark restarts at the current RSS
            base = proc_status("VmRSS")
            fn()
            peak = proc_status("VmHWM") - base
        else:  # no reset possible: growth of ru_maxrss over the high-water mark of the setup (a lower bound)
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            fn()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_bytes": peak}))




def memory(args, model_name: str, samples: int, engine: str) -> float | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", engine, "--model", model_name, "--samples",
           str(samples), "--device", args.device, "--threads", str(args.threads), "--chunk", str(args.chunk)]
    if args.mnist:
        cmd.append("--mnist")
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        print(f"  memory run for {engine} failed: {res.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(lines[-1])["peak_bytes"] / 2**20


def bench(args, model_name: str) -> None:
    samples = args.samples or DEFAULT_SAMPLES.get(model_name, 64)
    model = make_model(model_name, args.device)
    params = prunable_params(model)
    x, y, source = make_data(model_name, samples, args.device, args.mnist)
    n_par = sum(p.tensor.numel() for p in params)
    print(f"{model_name}: {samples} {source} samples {tuple(x.shape[1:])}, {len(params)} prunable tensors "
          f"({n_par:,} weights), B = 1, eval mode, chunk {args.chunk}")
    engines = [e for e in ENGINES if e not in args.skip]
    fns = {e: runner(e, model, params, x, y, args.chunk) for e in engines}
    for e in engines:
        runner(e, model, params, x[:4], y[:4], args.chunk)()  # warm-up
    times = {e: float("inf") for e in engines}
    for _ in range(args.repeats):  # round-robin, so that load from other processes hits every engine alike
        for e in engines:
            times[e] = min(times[e], time_it(fns[e], 1, args.device))
    peaks = {e: memory(args, model_name, samples, e) for e in engines} if args.memory else {}
    for engine in engines:
        mem = f"   peak memory +{peaks[engine]:.0f} MiB" if peaks.get(engine) is not None else ""
        label = {"hooks": "hooks engine", "loop": "per-sample loop (loop engine)", "vmap": "torch.func vmap",
                 "plain": "plain batched fwd+bwd (floor)"}[engine]
        print(f"  {label:<32} {times[engine]:8.3f} s   {1e3 * times[engine] / samples:7.3f} ms/sample{mem}")
    if "hooks" in times:
        if "loop" in times:
            print(f"  loop/hooks  = {times['loop'] / times['hooks']:5.2f}x  (target >= 3x)")
        if "vmap" in times:
            print(f"  vmap/hooks  = {times['vmap'] / times['hooks']:5.2f}x")
        if "plain" in times:
            print(f"  hooks/plain = {times['hooks'] / times['plain']:5.2f}x  (target <= 2.5x)")
    # the engines agree (sanity): hooks vs loop on the first samples
    k = min(samples, 16)
    data = [(x[:k], y[:k])]
    a = grad_stats(model, params, data, engine="hooks", dtype=torch.float64)
    b = grad_stats(model, params, data, engine="loop", dtype=torch.float64)
    rel = max(((a.sq[n] - b.sq[n]).abs().max() / b.sq[n].abs().max().clamp_min(1e-30)).item() for n in a.sq)
    print(f"  check: hooks vs loop on {k} samples, max relative difference of F-hat {rel:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all", help="lenet5_caffe, resnet18 or all")
    ap.add_argument("--samples", type=int, default=None, help="default: 1000 (LeNet-5), 64 (ResNet-18)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core box)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256, help="max_chunk of the engines and the plain chunk size")
    ap.add_argument("--mnist", action="store_true", help="real MNIST samples for LeNet-5 when available")
    ap.add_argument("--memory", action="store_true", help="peak memory per engine (one subprocess each)")
    ap.add_argument("--skip", default="", help="comma-separated engines to skip (hooks, loop, vmap, plain)")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args._child:
        args.samples = args.samples or DEFAULT_SAMPLES.get(args.model, 64)
        child(args)
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    models = list(DEFAULT_SAMPLES) if args.model == "all" else [canonical_name(args.model)]
    for name in models:
        bench(args, name)


if __name__ == "__main__":
    main()
