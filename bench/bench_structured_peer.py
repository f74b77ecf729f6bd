"""Structured pruning side by side with Torch-Pruning (PyPI ``torch-pruning``, an optional test-extra dependency).

Each model is pruned to the same fraction of its dense MACs (``--macs``, default 0.5) by

- Torch-Pruning's ``MagnitudePruner`` with L1 group importance (``GroupMagnitudeImportance(p=1)``), uniform and
  global, with ``round_to`` 8 and 16; its ``pruning_ratio`` is bisected until the MACs meet the target;
- prunekit: ``filter_l1`` (uniform and global allocation) and ``pfp``, each with ``round_channels`` 8 and 16, through
  :func:`prunekit.flops_target.prune_to_macs`, then ``pk.shrink``.

Every model (dense included) is counted by the same MAC counter (``prunekit.flops``: every Conv/Linear weight times
its output positions, on the physically pruned model) and timed interleaved (``prunekit.latency.compare_latency``:
dense, then each pruned model, round robin) at batch 1 and 64 in eval mode with ``torch.inference_mode``. The table
gives each configuration's MACs fraction, parameters, pruning time (one call at the ratio / sparsity found; the
progress lines also give prunekit's prune_to_macs time with its bisection) and speedup over the dense model; the
last lines compare prunekit's best batch-64 speedup with Torch-Pruning's best among the configurations within 5%
of the MACs target. The models' final classifier is never pruned (both libraries).

    python bench/bench_structured_peer.py                        # vgg16_bn resnet56 efficientnet_lite0 minilm, 1 thread
    python bench/bench_structured_peer.py --models resnet56 --repeats 10 --batches 1,64 --threads 2
    python bench/bench_structured_peer.py --models minilm --repeats 5  # the fetched MiniLM (prunekit models fetch minilm)

Without torch-pruning installed the benchmark says so and exits with status 0 (prunekit rows only with --self).
EfficientNet-Lite0 runs at ``--effnet-size`` (default 224) pixels.

MiniLM (``minilm``: MiniLM-L6-H384, ``prunekit.hf.load_hf(minilm_path(), task="base")``, the bare ``BertModel``;
skipped with a printed line when the asset is not fetched) loses attention heads and FFN neurons in both libraries;
the hidden size (embeddings, residual stream, LayerNorms, pooler) stays. Torch-Pruning is set up the way its
Hugging Face BERT example does it: every ``BertSelfAttention``'s ``query``/``key``/``value`` registered in
``num_heads`` with ``prune_num_heads=True``, ``prune_head_dims=False`` (whole heads, ``head_pruning_ratio`` equal to
``pruning_ratio``, which then applies to the FFN neurons), the layers that write the hidden size
(``attention.output.dense``, ``output.dense``, ``pooler.dense``) in ``ignored_layers``, and each attention module's
``num_attention_heads``/``all_head_size`` set from the pruner afterwards; its importance is the same L1 group
magnitude, and one ratio is bisected for the MACs. prunekit runs ``filter_l1`` (uniform, global) and ``pfp`` on its
head and neuron channel groups, then ``pk.shrink``. MACs are those of every Linear layer (the encoder's, plus the
unpruned pooler) on one example of ``--length`` tokens, by the same counter ``prunekit.flops``; the attention
matmuls QK^T and AV (which also shrink with the heads) are counted by neither. Latency: ``model(input_ids,
attention_mask)`` on fixed random token ids of ``--length`` tokens (default 128), interleaved like the CNNs.
Rounding: ``--hf-round`` (default ``1,8``; 1 = none, TP ``round_to=None``) applies to the FFN neurons in TP and to
heads and neurons in prunekit (a multiple of 8 of 12 heads is 8 or 12). pfp scores ``--hf-samples`` (default 8)
random sequences.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
from torch import nn

import prunekit as pk
from prunekit.flops import layer_positions, macs
from prunekit.flops_target import prune_to_macs
from prunekit.latency import compare_latency
from prunekit.models import get_model


def _tp():
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    return tp


def _count(model: nn.Module, shape) -> tuple[int, int]:
    return macs(layer_positions(model, shape)), sum(p.numel() for p in model.parameters())


def _last_linear(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def tp_prune(tp, dense: nn.Module, shape, frac: float, global_pruning: bool, round_to: int | None,
             tol: float = 0.01) -> tuple[nn.Module, float, float]:
    """(pruned copy, pruning seconds of the final call, its pruning_ratio): the ratio bisected for the MACs target."""
    x = torch.randn(1, *shape)
    dense_macs = _count(dense, shape)[0]

    def run(ratio: float):
        m = copy.deepcopy(dense).eval()
        t0 = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                           global_pruning=global_pruning, pruning_ratio=ratio,
                                           ignored_layers=[_last_linear(m)], round_to=round_to)
        pruner.step()
        return m, time.perf_counter() - t0

    return _bisect_ratio(run, lambda m: _count(m, shape)[0] / dense_macs, frac, tol)


def tp_prune_bert(tp, dense: nn.Module, example: dict, frac: float, global_pruning: bool, round_to: int | None,
                  tol: float = 0.01) -> tuple[nn.Module, float, float]:
    """:func:`tp_prune` for a BERT encoder: whole heads (registered by hand, as Torch-Pruning's BERT example does)
    and FFN neurons, the hidden size kept (see the module docstring)."""
    from transformers.models.bert.modeling_bert import BertSelfAttention

    dense_macs = macs(layer_positions(dense, example=example))

    def run(ratio: float):
        m = copy.deepcopy(dense).eval()
        attn = [a for a in m.modules() if isinstance(a, BertSelfAttention)]
        heads = {lin: a.num_attention_heads for a in attn for lin in (a.query, a.key, a.value)}
        hidden_writers = [mod for n, mod in m.named_modules()
                          if n.endswith(("attention.output.dense", "pooler.dense"))
                          or (n.endswith("output.dense") and "attention" not in n)]
        t0 = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                           global_pruning=global_pruning, pruning_ratio=ratio, num_heads=heads,
                                           prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
                                           ignored_layers=hidden_writers, round_to=round_to)
        pruner.step()
        for a in attn:  # the head count the pruner left (transformers 5 reshapes with -1 heads; kept consistent)
            a.num_attention_heads = pruner.num_heads[a.query]
            a.all_head_size = a.query.out_features
        return m, time.perf_counter() - t0

    return _bisect_ratio(run, lambda m: macs(layer_positions(m, example=example)) / dense_macs, frac, tol)


def _bisect_ratio(run, fraction, frac: float, tol: float) -> tuple[nn.Module, float, float]:
    """(model, seconds, ratio): Torch-Pruning's ``pruning_ratio`` bisected (at most 24 calls of ``run(ratio) ->
    (model, seconds)``) until ``fraction(model)`` (its MACs over the dense MACs) is within ``tol`` of ``frac``."""
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m, secs = run(mid)
        f = fraction(m)
        if best is None or abs(f - frac) < abs(best[3] - frac):
            best = (m, secs, mid, f)
        if abs(f - frac) <= tol * frac:
            break
        lo, hi = (mid, hi) if f > frac else (lo, mid)
    return best[0], best[1], best[2]


def pk_prune(dense: nn.Module, shape, frac: float, method: str, data, example=None,
             **options) -> tuple[nn.Module, float, float]:
    """(shrunk model, seconds of one pk.prune call at the sparsity found, seconds of prune_to_macs with its
    bisection). ``example``: a transformer's dict input of one example (MACs counted on it, and the shrink check);
    its prunable tensors are its blocks' Linear weights, so the pooler is never pruned."""
    where = {"example": example} if example is not None else {"input_shape": shape, "exclude_output": True}
    keep = {} if example is not None else {"exclude_output": True}
    m = copy.deepcopy(dense).eval()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = prune_to_macs(m, method, data, macs=frac, **where, **options)
    search = time.perf_counter() - t0
    once = copy.deepcopy(dense).eval()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.prune(once, method, masks.report["sparsity"], data, **keep, **options)
    secs = time.perf_counter() - t0
    small = pk.shrink(m, masks, example if example is not None else torch.randn(2, *shape))
    return small, secs, search


class _Text(nn.Module):
    """A BERT encoder called on token ids alone (``attention_mask`` all ones), with the fixed random ids of
    ``example_input`` for :func:`prunekit.latency.compare_latency`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state

    def example_input(self, batch: int, input_shape) -> torch.Tensor:
        g = torch.Generator().manual_seed(2)
        return torch.randint(1, self.model.config.vocab_size, (batch, int(input_shape[-1])), generator=g)


def _heads_neurons(m: nn.Module) -> str:
    """Kept heads and FFN neurons per layer, ``h/n`` each."""
    layers = m.encoder.layer
    return " ".join(f"{l.attention.self.query.out_features // l.attention.self.attention_head_size}/"
                    f"{l.intermediate.dense.out_features}" for l in layers)


def run_minilm(args, tp) -> list[dict] | None:
    """The MiniLM rows (None when the asset is missing)."""
    from prunekit.errors import PrunekitError
    from prunekit.hf import load_hf
    from prunekit.models.fetch import minilm_path

    try:
        path = minilm_path()
    except PrunekitError as e:
        print(f"minilm: skipped, the asset is missing ({str(e).splitlines()[0]})", flush=True)
        return None
    dense = load_hf(path, task="base").eval()
    g = torch.Generator().manual_seed(0)
    n, length = args.hf_samples, args.length
    ids = torch.randint(1, dense.config.vocab_size, (n, length), generator=g)
    data = [{"input_ids": ids, "attention_mask": torch.ones(n, length, dtype=torch.long),
             "labels": torch.zeros(n, dtype=torch.long)}]  # labels: the dict-batch format; the bare encoder drops them
    example = {"input_ids": ids[:1], "attention_mask": torch.ones(1, length, dtype=torch.long)}

    def count(m):
        return macs(layer_positions(m, example=example)), sum(p.numel() for p in m.parameters())

    dense_macs, dense_params = count(dense)
    models, info = {"dense": dense}, {"dense": (1.0, dense_params, 0.0)}
    rounds = [int(r) for r in args.hf_round.split(",")]
    if tp is not None:
        for glob in (False, True):
            for r in rounds:
                key = f"TP {'global' if glob else 'uniform'} round_to={r if r > 1 else None}"
                m, secs, ratio = tp_prune_bert(tp, dense, example, args.macs, glob, r if r > 1 else None)
                models[key] = m
                c = count(m)
                info[key] = (c[0] / dense_macs, c[1], secs)
                print(f"  minilm: {key}: ratio {ratio:.4f}, {info[key][0]:.3f} MACs, {secs:.2f} s; heads/neurons "
                      f"{_heads_neurons(m)}", flush=True)
    configs = [("filter_l1", {"allocation": "uniform"}), ("filter_l1", {"allocation": "global"}), ("pfp", {})]
    for method, opts in configs:
        for r in rounds:
            key = f"pk {method}{' ' + opts['allocation'] if 'allocation' in opts else ''} round={r}"
            m, secs, search = pk_prune(dense, None, args.macs, method, data, example=example, round_channels=r,
                                       **opts)
            models[key] = m
            c = count(m)
            info[key] = (c[0] / dense_macs, c[1], secs)
            print(f"  minilm: {key}: {info[key][0]:.3f} MACs, {secs:.2f} s (prune_to_macs with its bisection "
                  f"{search:.2f} s); heads/neurons {_heads_neurons(m)}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    timed = {k: _Text(m).eval() for k, m in models.items()}
    rows = compare_latency(timed, (length,), batches, repeats=args.repeats, warmup=2)
    return _rows("minilm", models, info, rows, batches)


def _rows(name: str, models: dict, info: dict, rows: list[dict], batches: list[int]) -> list[dict]:
    out = []
    for key in models:
        r = {b["batch_size"]: b for b in rows if b["model"] == key}
        out.append({"model": name, "config": key, "macs": info[key][0], "params": info[key][1],
                    "prune_s": info[key][2], **{f"ms{b}": r[b]["ms"] for b in batches},
                    **{f"x{b}": r[b]["speedup"] for b in batches}})
    return out


def run_model(name: str, args, tp) -> list[dict]:
    shape = (3, args.effnet_size, args.effnet_size) if name == "efficientnet_lite0" else None
    torch.manual_seed(0)
    dense = get_model(name, num_classes=10 if name != "efficientnet_lite0" else 1000, input_shape=shape).eval()
    shape = tuple(dense.input_shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.samples, *shape, generator=g)
    data = [(x, torch.zeros(args.samples, dtype=torch.long))]
    dense_macs, dense_params = _count(dense, shape)
    models, info = {"dense": dense}, {"dense": (1.0, dense_params, 0.0)}
    rounds = [int(r) for r in args.round.split(",")]
    if tp is not None:
        for glob in (False, True):
            for r in rounds:
                key = f"TP {'global' if glob else 'uniform'} round_to={r}"
                m, secs, _ = tp_prune(tp, dense, shape, args.macs, glob, r)
                models[key] = m
                mac, params = _count(m, shape)
                info[key] = (mac / dense_macs, params, secs)
                print(f"  {name}: {key}: {info[key][0]:.3f} MACs, {secs:.2f} s", flush=True)
    configs = [("filter_l1", {"allocation": "uniform"}), ("filter_l1", {"allocation": "global"}),
               ("pfp", {"sample_size": args.pfp_samples})]
    for method, opts in configs:
        for r in rounds:
            key = f"pk {method}{' ' + opts['allocation'] if 'allocation' in opts else ''} round={r}"
            m, secs, search = pk_prune(dense, shape, args.macs, method, data, round_channels=r, **opts)
            models[key] = m
            mac, params = _count(m, shape)
            info[key] = (mac / dense_macs, params, secs)
            print(f"  {name}: {key}: {info[key][0]:.3f} MACs, {secs:.2f} s (prune_to_macs with its bisection "
                  f"{search:.2f} s)", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    rows = compare_latency(models, shape, batches, repeats=args.repeats, warmup=2)
    return _rows(name, models, info, rows, batches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg16_bn,resnet56,efficientnet_lite0,minilm")
    ap.add_argument("--macs", type=float, default=0.5, help="fraction of the dense MACs kept")
    ap.add_argument("--round", default="8,16", help="channel multiples (TP round_to, prunekit round_channels)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--samples", type=int, default=32, help="random scoring examples (pfp)")
    ap.add_argument("--pfp-samples", type=int, default=None, help="pfp sample_size (default: its own |S|)")
    ap.add_argument("--effnet-size", type=int, default=224)
    ap.add_argument("--length", type=int, default=128, help="MiniLM: tokens per sequence (MACs and latency)")
    ap.add_argument("--hf-round", default="1,8", help="MiniLM: TP round_to (1: None) and prunekit round_channels")
    ap.add_argument("--hf-samples", type=int, default=8, help="MiniLM: random sequences pfp scores")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: other load on the machine does not stall intra-op threads)")
    ap.add_argument("--self", action="store_true", help="run prunekit alone when torch-pruning is missing")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tp = _tp()
    if tp is None and not args.self:
        print("torch-pruning is not installed (pip install 'prunekit[test]' or pip install torch-pruning); "
              "skipping the comparison (--self runs prunekit alone)")
        return 0
    print(f"torch {torch.__version__}, torch-pruning {getattr(tp, '__version__', 'absent')}, threads "
          f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    for name in args.models.split(","):
        rows = run_minilm(args, tp) if name == "minilm" else run_model(name, args, tp)
        if rows is None:
            continue
        head = f"| {name} | MACs | params | prune s | " + " | ".join(f"ms b{b} | x b{b}" for b in batches) + " |"
        print("\n" + head + "\n|" + "---|" * (4 + 2 * len(batches)))
        for r in rows:
            cells = " | ".join(f"{r[f'ms{b}']:.2f} | {r[f'x{b}']:.2f}x" for b in batches)
            print(f"| {r['config']} | {r['macs']:.3f} | {r['params']:,} | {r['prune_s']:.2f} | {cells} |")
        b = batches[-1]
        fair = [r for r in rows if abs(r["macs"] - args.macs) <= 0.05 * args.macs]  # the same MACs, +-5%
        best = {lib: max((r for r in fair if r["config"].startswith(lib)), key=lambda r: r[f"x{b}"], default=None)
                for lib in ("TP", "pk")}
        off = [r["config"] for r in rows if r not in fair and r["config"] != "dense"]
        if off:
            print(f"not compared (MACs off the target by more than 5%): {', '.join(off)}")
        if best["TP"] is not None and best["pk"] is not None:
            ratio = best["pk"][f"x{b}"] / best["TP"][f"x{b}"]
            print(f"{name}: best prunekit b{b} {best['pk'][f'x{b}']:.2f}x ({best['pk']['config']}) vs best "
                  f"Torch-Pruning {best['TP'][f'x{b}']:.2f}x ({best['TP']['config']}): ratio {ratio:.3f}")
        print(f"load {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
