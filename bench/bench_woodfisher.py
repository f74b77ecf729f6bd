"""One WoodFisher pruning step: prunekit's inverse engines against the sequential Sherman–Morrison reference.

For each model (MLPNet on MNIST, 32,360 weights, real data when ``load_dataset('mnist')`` works, else random; the
18 stage convs of CIFAR ResNet-20, 267,264 weights, random data) and each code (``woodfisher``: one block of all
weights, Gram–Woodbury route; ``woodfisherblock``: blocks of ``--block-size`` inside layers), one pruning step to
``--sparsity`` from N = ``--grads`` per-example gradients:

- ours: gradient matrix, pass 1 (factors + diag(F⁻¹), engine 'auto', batched blocks), global selection, pass 2 (the
  summed OBS update), timed phase by phase;
- reference: the same gradient matrix and selection, with pass 1 by the Sherman–Morrison engine (N sequential rank-1
  updates of an explicit float64 inverse per block, the reference's algorithm; blocks batched by the planner) and
  pass 2 from its cached inverse. The reference is timed on the first ``--ref-grads`` gradients and EXTRAPOLATED
  LINEARLY to N (its cost is O(N·c²), linear in N); the output says so. A float32 reference (the reference's own
  precision, about 2x faster per update) is timed on a few updates too, and the ratio against it is printed as the
  conservative one.
- identical masks: both engines prune the same G restricted to the first ``--ref-grads`` gradients, and the masks
  are asserted equal (weights after the update compared too).
- peak memory (``--memory``, default on): the whole step (gradients included) in a fresh subprocess; peak resident
  set above the set at its start (Linux: high-water mark reset through /proc/self/clear_refs), or
  torch.cuda.max_memory_allocated on CUDA, against the memory planner's estimate ``plan.peak_bytes``.

Targets: ratio >= 100x for full MLPNet on 2 CPU cores; measured peak within 1.5x of the planner's estimate.

    python bench/bench_woodfisher.py [--threads 2] [--device cpu] [--quick] [--models mlpnet,resnet20]
                                     [--codes woodfisher,woodfisherblock] [--grads 1000] [--ref-grads 100]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import prunekit as pk
import prunekit.criteria.obs as obs
from prunekit.masks import Masks
from prunekit.models import get_model
from prunekit.peak_memory import proc_status, reset_peak_rss
from prunekit.prune import default_loss
from prunekit.registry import ScoreContext
from prunekit.second_order import planner
from prunekit.second_order.gradients import gradient_matrix
from prunekit.seeding import generator

RESNET20_STAGE_CONVS = tuple(f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2))


def setup(model_name: str, n: int, device: str):
    torch.manual_seed(0)
    model = get_model(model_name).to(device)
    source = "random"
    shape = model.input_shape
    x = y = None
    if model_name == "mlpnet":
        try:
            from prunekit.data import load_dataset

            train = load_dataset("mnist").train
            X, Y = train.inputs(), train.y
            x, y = X[:n].clone(), Y[:n].clone()
            # one epoch of SGD (about a second), so that the step runs on a trained model as in the paper
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
            for i in range(0, X.shape[0], 128):
                idx = perm[i:i + 128]
                opt.zero_grad()
                torch.nn.functional.nll_loss(model(X[idx].to(device)), Y[idx].to(device)).backward()
                opt.step()
            source = "MNIST, MLPNet trained 1 epoch"
        except Exception as e:  # noqa: BLE001 - real data is optional
            print(f"  (MNIST not available: {e}; using random inputs)")
    if x is None:
        x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
    modules = RESNET20_STAGE_CONVS if model_name == "resnet20" else None
    params = pk.prunable_params(model, modules=modules)
    data = [(x[i:i + 250].to(device), y[i:i + 250].to(device)) for i in range(0, n, 250)]
    return model, params, data, source


def context(model, params, data, code: str, **opts) -> ScoreContext:
    info = pk.get_method(code)
    masks = Masks(model, params)
    return ScoreContext(model=model, params=params, masks=masks.as_dict(), data=data, loss=default_loss,
                        options=info.make_options(**opts), generator=generator(0, "mask", code, "1"))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_step(model, params, data, code, sparsity, device, G=None, **opts):
    """A full step through prunekit's internals; returns (new masks, weights after, phase times, state)."""
    ctx = context(model, params, data, code, **opts)
    before = {k: v.clone() for k, v in ctx.masks.items()}
    w0 = [p.tensor.detach().clone() for p in params]
    times = {}
    sync(device)
    t = time.perf_counter()
    st = obs.obs_statistics(ctx, taylor=False, dynamic=False, G=G)
    sync(device)
    times["pass1"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = obs._scores(ctx, st)
    new = pk.select(scores, before, sparsity, "global")
    times["select"] = time.perf_counter() - t
    ctx.state["obs"] = st
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        obs.obs_update(ctx, st, before, new)
    sync(device)
    times["pass2"] = time.perf_counter() - t
    w1 = [p.tensor.detach().clone() for p in params]
    with torch.no_grad():  # restore the model for the next run
        for p, w in zip(params, w0):
            p.tensor.copy_(w)
    return new, w1, times, st


# ------------------------------------------------------------------------------------------------------ memory




def child(args) -> None:
    model_name, code = args.child.split(",")
    torch.set_num_threads(args.threads)
    model, params, data, _ = setup(model_name, args.grads, args.device)
    opts = dict(fisher_samples=args.grads, block_size=args.block_size) if code == "woodfisherblock" else \
        dict(fisher_samples=args.grads)
    # warm-up of the libraries on a tiny problem, so that their one-time allocations are not counted
    one_step(model, params, data[:1], code, args.sparsity, args.device, **{**opts, "fisher_samples": 8})
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        ok = reset_peak_rss()
        base = proc_status("VmRSS")
        ru0 = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024
    _, _, _, st = one_step(model, params, data, code, args.sparsity, args.device, **opts)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = proc_status("VmHWM") - base if ok else \
            __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024 - ru0
    print(json.dumps({"peak": peak, "plan": st.plan.peak_bytes, "summary": st.plan.summary()}))


def memory(args, model_name: str, code: str):
    cmd = [sys.executable, __file__, "--child", f"{model_name},{code}", "--grads", str(args.grads), "--device",
           args.device, "--threads", str(args.threads), "--block-size", str(args.block_size), "--sparsity",
           str(args.sparsity)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if res.returncode != 0:
        print(f"    memory run failed: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode}")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- bench


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def bench(args, model_name: str, code: str) -> None:
    model, params, data, source = setup(model_name, args.grads, args.device)
    d = sum(p.tensor.numel() for p in params)
    opts = dict(fisher_samples=args.grads)
    if code == "woodfisherblock":
        opts["block_size"] = args.block_size
    print(f"\n{model_name} ({d:,} prunable weights, data: {source}), {code}"
          f"{' block_size=' + str(args.block_size) if code == 'woodfisherblock' else ' (one block of all weights)'},"
          f" N = {args.grads}, sparsity {args.sparsity}")
    masks0 = {p.name: torch.ones_like(p.tensor, dtype=torch.bool) for p in params}
    sync(args.device)
    t = time.perf_counter()
    G = gradient_matrix(model, params, data, n_grads=args.grads, masks=masks0,
                        generator=torch.Generator().manual_seed(0))
    sync(args.device)
    t_grad = time.perf_counter() - t
    print(f"  gradient matrix {tuple(G.shape)} ({gib(G.numel() * 4)}): {t_grad:.2f} s")

    # ours, full N
    new, _, times, st = one_step(model, params, data, code, args.sparsity, args.device, G=G, **opts)
    ours_inv = times["pass1"] + times["pass2"]
    ours_step = t_grad + ours_inv + times["select"]
    routes = ", ".join(f"c={c}: {r}" for c, r in sorted(st.plan.routes.items(), reverse=True)[:3])
    print(f"  ours     : pass 1 {times['pass1']:.2f} s, select {times['select']:.3f} s, pass 2 {times['pass2']:.2f} s "
          f"(routes {routes}{', ...' if len(st.plan.routes) > 3 else ''}; {st.layout.n_blocks} block(s); factors "
          f"{'cached' if st.plan.cache else 'recomputed'})")
    del st

    # the reference
    lay = obs.make_layout([torch.ones(p.tensor.numel(), dtype=torch.bool) for p in params],
                          blocks="global" if code == "woodfisher" else "layer",
                          block_size=None if code == "woodfisher" else args.block_size)
    st_sizes = lay.sizes()
    sm_bytes = sum(n * c * c * 8 for c, n in st_sizes.items())
    avail = planner.available_bytes(args.device)
    R = min(args.ref_grads, G.shape[0])
    if max(st_sizes) ** 2 * 8 * 1.2 > 0.85 * avail:
        print(f"  reference: not run: one explicit float64 inverse needs {gib(max(st_sizes) ** 2 * 8)} "
              f"({gib(sm_bytes)} for all blocks), {gib(avail)} available")
        return
    Gr = G[:R]
    sm_opts = dict(opts, fisher_samples=R, engine="sherman_morrison", cache_factors="always"
                   if sm_bytes * 1.1 < 0.85 * avail else "never")
    ref_new, ref_w, ref_times, st_ref = one_step(model, params, data, code, args.sparsity, args.device, G=Gr,
                                                 **sm_opts)
    del st_ref
    # ours on the same R gradients: identical masks
    our_new, our_w, _, st_r = one_step(model, params, data, code, args.sparsity, args.device, G=Gr, **opts)
    del st_r
    same = all(torch.equal(our_new[k], ref_new[k]) for k in our_new)
    wdiff = max(float((a - b).abs().max() / (b.abs().max() + 1e-30)) for a, b in zip(our_w, ref_w))
    assert same, "ours and the Sherman–Morrison reference chose different masks"
    scale = args.grads / R
    ref_inv = ref_times["pass1"] * scale + (ref_times["pass2"] if sm_opts["cache_factors"] == "always"
                                            else ref_times["pass2"] * scale)
    ref_step = t_grad + ref_inv + times["select"]
    # float32 reference (the reference's precision): a few updates on the largest block size, per update
    from prunekit.second_order.engines import ShermanMorrisonFactor

    c = max(st_sizes)
    k = min(st_sizes[c], max(1, int(0.5 * avail // max(1, c * c * 4))))
    steps = min(R, 10)
    blk = G[:, :c * k].reshape(G.shape[0], k, c).transpose(0, 1) if code == "woodfisherblock" else G.unsqueeze(0)
    t = time.perf_counter()
    ShermanMorrisonFactor(blk, 1e-5, dtype=torch.float32, n_steps=steps)
    per_update32 = (time.perf_counter() - t) / (steps * k)
    t = time.perf_counter()
    ShermanMorrisonFactor(blk, 1e-5, dtype=torch.float64, n_steps=steps)
    per_update64 = (time.perf_counter() - t) / (steps * k)
    ref32_inv = ref_inv * per_update32 / per_update64
    print(f"  reference: Sherman–Morrison pass 1 on the first {R} gradients {ref_times['pass1']:.2f} s, EXTRAPOLATED "
          f"LINEARLY to N = {args.grads}: {ref_times['pass1'] * scale:.1f} s; pass 2 {ref_times['pass2']:.2f} s "
          f"({'cached inverse' if sm_opts['cache_factors'] == 'always' else 'recomputed, extrapolated'})")
    print(f"  identical masks on the first {R} gradients: {same} (weights after the update: max rel. diff "
          f"{wdiff:.1e})")
    print(f"  float32 reference: {per_update32 * 1e3:.1f} ms per rank-1 update of a {c}x{c} block vs "
          f"{per_update64 * 1e3:.1f} ms in float64 (measured on {steps} updates)")
    print(f"  RATIO inverse work (pass 1 + 2): {ref_inv / ours_inv:.0f}x vs the float64 reference, "
          f"{ref32_inv / ours_inv:.0f}x vs float32 (conservative); whole step incl. gradients: "
          f"{ref_step / ours_step:.0f}x / {(t_grad + ref32_inv + times['select']) / ours_step:.0f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes: N = 200, reference on 20 gradients")
    ap.add_argument("--models", default="mlpnet,resnet20")
    ap.add_argument("--codes", default="woodfisher,woodfisherblock")
    ap.add_argument("--grads", type=int, default=None)
    ap.add_argument("--ref-grads", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=2000)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.grads is None:
        args.grads = 200 if args.quick else 1000
    if args.ref_grads is None:
        args.ref_grads = 20 if args.quick else 100
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average {os.getloadavg()[0]:.2f}")
    for model_name in args.models.split(","):
        for code in args.codes.split(","):
            bench(args, model_name, code)
            if not args.no_memory:
                r = memory(args, model_name, code)
                if r is not None:
                    ratio = r["peak"] / r["plan"]
                    print(f"  peak memory of the step {gib(r['peak'])} vs planner estimate {gib(r['plan'])}: "
                          f"{ratio:.2f}x ({'within' if 1 / 1.5 <= ratio <= 1.5 else 'OUTSIDE'} 1.5x)")


if __name__ == "__main__":
    main()
