"""Structured pruning of a transformer that becomes real speed: MiniLM dense against MiniLM with half of its attention
heads and FFN neurons physically removed.

MiniLM-L6-H384 (the fetched ``prunekit models fetch minilm`` folder, loaded with ``prunekit.hf.load_hf`` as the bare
``BertModel``) in eval mode. ``filter_l1`` (l1 norm of each head's query/key/value rows and of each neuron's
intermediate row, the same keep fraction in every group) prunes ``--sparsity`` of the block weights, which for
MiniLM is the same fraction of its heads and of its FFN neurons; ``pk.shrink`` then removes them. The script checks
that the shrunk model's ``last_hidden_state`` equals the pruned (masked) model's on a padded batch, then times
``model(input_ids, attention_mask)`` at each batch size and sequence length ``--length`` (median of ``--repeats``
calls after 2 warm-up calls, dense and shrunk interleaved call by call) with each torch thread count of
``--threads``, and prints the ratio.

    python bench/bench_hf_shrink.py [--sparsity 0.5] [--batches 1,32] [--length 128] [--threads 1,2] [--repeats 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import prunekit as pk
from prunekit.hf import load_hf
from prunekit.models.fetch import minilm_path
from prunekit.structured import channel_groups, channel_masks_from_masks


def batch(vocab: int, size: int, length: int, seed: int = 0, pad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(size, length, dtype=torch.long)
    if pad:  # padded tails of different lengths
        for i in range(size):
            mask[i, length - (i * 7) % (length // 2):] = 0
    return {"input_ids": torch.randint(1, vocab, (size, length), generator=g), "attention_mask": mask}


@torch.inference_mode()
def interleaved(models: dict, inputs: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each model, calls interleaved (A, B, A, B, ...)."""
    for m in models.values():
        for _ in range(warmup):
            m(**inputs)
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(repeats):
        for n, m in models.items():
            t0 = time.perf_counter()
            m(**inputs)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    dense = load_hf(minilm_path(), task="base").eval()
    pruned = load_hf(minilm_path(), task="base").eval()
    vocab = dense.config.vocab_size
    masks = pk.prune(pruned, "filter_l1", args.sparsity)
    groups = channel_groups(pruned, None)
    keep = channel_masks_from_masks(pruned, groups, masks)
    heads = sum(int(keep[g.name].sum()) for g in groups if g.kind == "head")
    neurons = sum(int(keep[g.name].sum()) for g in groups if g.kind == "neuron")
    check = batch(vocab, 4, args.length, seed=1, pad=True)
    shrunk = pk.shrink(pruned, masks, check)  # raises if it differs from the masked model (relative 1e-5)
    with torch.inference_mode():
        a = pruned(**check).last_hidden_state
        b = shrunk(**check).last_hidden_state
    err = float((a - b).abs().max()) / float(a.abs().max())
    n_dense = sum(p.numel() for p in dense.parameters())
    n_shrunk = sum(p.numel() for p in shrunk.parameters())
    print(f"filter_l1 sparsity {args.sparsity}: kept {masks.kept()} of {masks.total()} block weights; "
          f"heads {heads}/{sum(g.size for g in groups if g.kind == 'head')}, FFN neurons "
          f"{neurons}/{sum(g.size for g in groups if g.kind == 'neuron')}")
    print(f"parameters: dense {n_dense:,}, shrunk {n_shrunk:,} ({n_shrunk / n_dense:.3f}); shrunk vs masked "
          f"last_hidden_state on a padded batch: max relative difference {err:.2e}")
    print(f"{'threads':>7} {'batch':>5} {'len':>4} {'dense ms':>9} {'shrunk ms':>9} {'ratio':>6} {'speedup':>7}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for bs in (int(b) for b in args.batches.split(",")):
            x = batch(vocab, bs, args.length, seed=2)
            t = interleaved({"dense": dense, "shrunk": shrunk}, x, args.repeats)
            print(f"{threads:>7} {bs:>5} {args.length:>4} {1e3 * t['dense']:>9.1f} {1e3 * t['shrunk']:>9.1f} "
                  f"{t['shrunk'] / t['dense']:>6.3f} {t['dense'] / t['shrunk']:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
