"""What unstructured sparsity buys a Linear layer on this CPU: dense matmul vs torch sparse CSR, measured.

1. ``--paths``: which CSR route is fastest (and equal to dense): ``SparseLinear`` (``addmm(b, W_csr, xᵀ)ᵀ``),
   ``F.linear(x, W_csr, b)`` (which raises "Cannot set version_counter for inference tensor" under
   ``torch.inference_mode`` in torch 2.13, so this section runs under ``no_grad``) and ``addmm(b, x, csr(Wᵀ))``
   (dense on the left), against dense ``F.linear``, at sparsity 0.9.
2. The grid: MiniLM's Linear shapes (out x in: 384x384, 1536x384, 384x1536) and 4096x4096, ``--rows`` input rows
   (tokens x batch; 1, 32, 512), sparsity 0.5/0.7/0.9/0.95/0.98/0.99, each torch thread count of ``--threads``.
   Dense ``F.linear`` and ``SparseLinear`` on the same random weight (``prunekit.speedup.timing.time_pair``:
   uniformly random pattern, calls interleaved A, B, A, B, median of ``--repeats`` samples each lasting >= 1 ms).
   Prints dense/CSR (> 1: CSR faster) and the break-even sparsity: the lowest grid sparsity from which CSR is
   faster at every higher grid sparsity, and a linear interpolation of the ratio between the two grid points
   around 1.
3. MiniLM end to end (``--e2e``; needs ``prunekit models fetch minilm``): the bare BertModel, magnitude-pruned at
   0.9 and 0.95 (``pk.prune(model, "magnitude", sparsity=s)``), converted with ``prunekit.speedup.to_sparse`` for
   the rows of each batch (batch x length), timed against the masked dense model at batch 1 and 32, length 128
   (interleaved, median), outputs compared.

The machine is shared: the 1-minute load average is printed before and after; a load above the core count means
other processes took CPU time during the run, so ratios (timed interleaved) are more trustworthy than raw ms.

    python bench/bench_sparse_cpu.py [--threads 1] [--rows 1,32,512] [--repeats 7] [--paths] [--e2e] [--json out]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F

from prunekit.speedup import SparseLinear, to_sparse
from prunekit.speedup.timing import SpeedTable, random_sparse_weight, time_interleaved, time_pair

SHAPES = [(384, 384), (1536, 384), (384, 1536), (4096, 4096)]  # (out_features, in_features)
SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.98, 0.99)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def break_even(ratios: dict[float, float]) -> tuple[str, float | None]:
    """(grid statement, interpolated sparsity) where dense/CSR crosses 1 for good (None: never / always)."""
    ss = sorted(ratios)
    k = len(ss)
    while k > 0 and ratios[ss[k - 1]] >= 1.0:
        k -= 1
    if k == len(ss):
        return f"> {ss[-1]}", None
    if k == 0:
        return f"<= {ss[0]}", None
    lo, hi = ss[k - 1], ss[k]
    rlo, rhi = ratios[lo], ratios[hi]
    est = lo + (1.0 - rlo) * (hi - lo) / (rhi - rlo) if rhi != rlo else hi
    return f"{hi} (crosses between {lo} and {hi})", est


def paths(repeats: int) -> None:
    print("\n## CSR routes at sparsity 0.9 (ms per call, max |error| vs dense)")
    for out_f, in_f in [(384, 384), (1536, 384)]:
        for rows in (1, 128, 512):
            w = random_sparse_weight(out_f, in_f, 0.9)
            b = torch.randn(out_f)
            x = torch.randn(rows, in_f)
            csr = SparseLinear.from_dense(w, b)
            wt = csr.weight
            csc = w.t().contiguous().to_sparse_csr()  # x @ (Wᵀ as CSR): the dense-left route
            fns = {"dense F.linear": lambda: F.linear(x, w, b), "SparseLinear (addmm)": lambda: csr(x),
                   "F.linear(x, csr, b)": lambda: F.linear(x, wt, b), "addmm(b, x, csr(Wt))": lambda: torch.addmm(b, x, csc)}
            with torch.no_grad():  # F.linear on a CSR weight fails under inference_mode in torch 2.13
                ref = F.linear(x, w, b)
                err = {n: float((f() - ref).abs().max()) for n, f in fns.items()}
                ms = time_interleaved(fns, repeats)
            print(f"{out_f}x{in_f} rows {rows:>4}: " + " | ".join(f"{n} {ms[n]:.3f} ({err[n]:.0e})" for n in fns))


def grid(threads: list[int], rows_list: list[int], repeats: int) -> list[dict]:
    out = []
    for th in threads:
        torch.set_num_threads(th)
        print(f"\n## dense/CSR per shape and rows, {th} thread(s) ({load()})")
        print(f"{'shape':>10} {'rows':>5} " + " ".join(f"{s:>6}" for s in SPARSITIES)
              + "  dense ms   break-even sparsity")
        for out_f, in_f in SHAPES:
            for rows in rows_list:
                ratios, dense = {}, []
                for s in SPARSITIES:
                    t = time_pair(out_f, in_f, s, rows, repeats=repeats)
                    ratios[s] = t.speedup
                    dense.append(t.dense_ms)
                    out.append({"threads": th, "out": out_f, "in": in_f, "rows": rows, "sparsity": s,
                                "dense_ms": t.dense_ms, "csr_ms": t.csr_ms})
                grid_be, est = break_even(ratios)
                est_s = f" (~{est:.2f})" if est is not None else ""
                dms = sorted(dense)[len(dense) // 2]
                print(f"{out_f:>4}x{in_f:<5} {rows:>5} " + " ".join(f"{ratios[s]:6.2f}" for s in SPARSITIES)
                      + f"  {dms:8.3f}   {grid_be}{est_s}", flush=True)
    return out


def e2e(threads: int, repeats: int) -> list[dict]:
    import prunekit as pk
    from prunekit.hf import load_hf
    from prunekit.models.fetch import minilm_path

    torch.set_num_threads(threads)
    base = load_hf(minilm_path()).eval()
    vocab = int(base.config.vocab_size)
    length = 128
    table = SpeedTable()
    out = []
    print(f"\n## MiniLM end to end, length {length}, {threads} thread(s) ({load()})")
    for s in (0.9, 0.95):
        dense = copy.deepcopy(base)
        masks = pk.prune(dense, "magnitude", sparsity=s)
        for bs in (1, 32):
            g = torch.Generator().manual_seed(0)
            inputs = {"input_ids": torch.randint(1000, vocab, (bs, length), generator=g),
                      "attention_mask": torch.ones(bs, length, dtype=torch.long)}
            conv = copy.deepcopy(dense)
            cmasks = {n: m for n, m in masks.items()}
            t0 = time.perf_counter()
            report = to_sparse(conv, cmasks, rows=bs * length, table=table)
            conv_s = time.perf_counter() - t0
            with torch.inference_mode():
                err = float((conv(**inputs).last_hidden_state - dense(**inputs).last_hidden_state).abs().max())
                ms = time_interleaved({"dense": lambda: dense(**inputs), "sparse": lambda: conv(**inputs)}, repeats)
            row = {"sparsity": s, "batch": bs, "length": length, "dense_ms": ms["dense"], "sparse_ms": ms["sparse"],
                   "converted": len(report.converted), "layers": len(report.layers), "max_abs_err": err,
                   "convert_s": conv_s}
            out.append(row)
            print(f"sparsity {s} batch {bs:>2}: dense {ms['dense']:8.1f} ms  converted {ms['sparse']:8.1f} ms  "
                  f"speedup {ms['dense'] / ms['sparse']:.2f}x  ({row['converted']}/{row['layers']} layers CSR, "
                  f"conversion incl. timing {conv_s:.1f} s, max |diff| {err:.1e})", flush=True)
            if bs == 32:
                print("   " + report.summary().splitlines()[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1", help="comma-separated torch thread counts (2 only on an idle machine)")
    ap.add_argument("--rows", default="1,32,512")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--paths", action="store_true", help="compare the CSR routes first")
    ap.add_argument("--e2e", action="store_true", help="also time MiniLM end to end (needs the fetched MiniLM)")
    ap.add_argument("--json", default=None, help="write every measurement to this JSON file")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, MKL {torch.backends.mkl.is_available()}, {load()}")
    torch.set_num_threads(threads[0])
    if args.paths:
        paths(args.repeats)
    result = {"grid": grid(threads, rows, args.repeats)}
    if args.e2e:
        result["e2e"] = e2e(threads[0], args.repeats)
    print(f"\nend: {load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
