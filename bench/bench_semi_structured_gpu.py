"""2:4 semi-structured sparsity on a CUDA GPU: MiniLM dense (masked) vs its 2:4 Linear weights, measured.

MiniLM-L6-H384 (``prunekit models fetch minilm``; the bare BertModel from ``prunekit.hf.load_hf``) in ``--dtype``
(fp16 or bf16) on the GPU. Every block Linear weight gets a 2:4 mask made here (the 2 largest |w| of each group of 4
consecutive entries along the input dim). The reference is the masked dense model; the sparse one is a copy converted
with ``prunekit.speedup.to_semi_structured`` (cuSPARSELt when torch has it, else CUTLASS). The script checks the two
``last_hidden_state`` agree (fp16 tolerance), then times ``model(input_ids, attention_mask)`` at batch 1/32/128 and
length 128/512 (``--repeats`` calls after ``--warmup``, dense and sparse interleaved call by call, synchronized,
median), plus each MiniLM Linear shape alone at 4096 rows, and prints the GPU model with the numbers.

Needs CUDA and compute capability >= 8.0 (Ampere or newer); without them it exits with status 2 and says so.

    python bench/bench_semi_structured_gpu.py [--dtype fp16] [--batches 1,32,128] [--lengths 128,512] [--repeats 20]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """True at the 2 largest |w| of each group of 4 consecutive entries along the last (input) dim."""
    out_f, in_f = w.shape
    groups = w.detach().abs().float().reshape(out_f, in_f // 4, 4)
    top = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(out_f, in_f)


def timed(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call of each function, calls interleaved, synchronized around each."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t0)
    return {n: 1e3 * statistics.median(t) for n, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--lengths", default="128,512")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: 2:4 semi-structured kernels run on NVIDIA GPUs only (Ampere or newer). Run this on a "
              "CUDA machine; the CPU numbers are in bench/bench_sparse_cpu.py", file=sys.stderr)
        return 2
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        print(f"{torch.cuda.get_device_name()} has compute capability {cap[0]}.{cap[1]}: 2:4 sparse tensor cores "
              "need 8.0 (Ampere) or newer", file=sys.stderr)
        return 2

    import prunekit as pk
    from prunekit.hf import load_hf
    from prunekit.models.fetch import minilm_path
    from prunekit.speedup import to_semi_structured
    from prunekit.speedup.semi import backend

    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"GPU {torch.cuda.get_device_name()} (capability {cap[0]}.{cap[1]}), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, backend {backend()}, {args.dtype}")

    dense = load_hf(minilm_path()).to("cuda", dtype).eval()
    params = dict(dense.named_parameters())
    names = [p.name for p in pk.prunable_params(dense)]
    masks = {n: two_four_mask(params[n]) for n in names}
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)  # the reference is the masked dense model
    sparse = copy.deepcopy(dense)
    converted = to_semi_structured(sparse, masks)
    print(f"{len(converted)} of {len(names)} block Linear layers converted to 2:4")

    vocab = int(dense.config.vocab_size)
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        ids = torch.randint(1000, vocab, (8, 128), generator=g).cuda()
        a = dense(input_ids=ids).last_hidden_state.float()
        b = sparse(input_ids=ids).last_hidden_state.float()
        print(f"agreement with the masked dense model: max |diff| {float((a - b).abs().max()):.3e}, "
              f"max |dense| {float(a.abs().max()):.3e}")

        print(f"\n{'batch':>5} {'length':>6} {'dense ms':>9} {'2:4 ms':>9} {'speedup':>8}")
        for bs in batches:
            for length in lengths:
                ids = torch.randint(1000, vocab, (bs, length), generator=g).cuda()
                mask = torch.ones_like(ids)
                ms = timed({"dense": lambda: dense(input_ids=ids, attention_mask=mask),
                            "sparse": lambda: sparse(input_ids=ids, attention_mask=mask)}, args.repeats, args.warmup)
                print(f"{bs:>5} {length:>6} {ms['dense']:9.3f} {ms['sparse']:9.3f} "
                      f"{ms['dense'] / ms['sparse']:7.2f}x", flush=True)

        print("\nLinear layers alone, 4096 rows (x @ Wᵀ + b)")
        seen = set()
        for n in names:
            mname = n.rpartition(".")[0]
            w = params[n]
            if tuple(w.shape) in seen:
                continue
            seen.add(tuple(w.shape))
            mod = dict(sparse.named_modules())[mname]
            bias = dict(dense.named_modules())[mname].bias
            x = torch.randn(4096, w.shape[1], device="cuda", dtype=dtype)
            ms = timed({"dense": lambda: F.linear(x, w, bias), "sparse": lambda: mod(x)}, args.repeats, args.warmup)
            print(f"{w.shape[0]:>5}x{w.shape[1]:<5} dense {ms['dense']:.4f} ms  2:4 {ms['sparse']:.4f} ms  "
                  f"{ms['dense'] / ms['sparse']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
