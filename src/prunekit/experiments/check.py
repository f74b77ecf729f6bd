"""``prunekit check``: CPU-sized versions of each seed's headline claim, with pass/fail per claim.

Each claim is a few small runs (real MNIST, a class-balanced training subset, a couple of epochs) and a comparison
of their test accuracies (or epochs) in the direction the seed reports. Runs go to an ordinary results store
(default ``runs_check/``), so a second ``prunekit check`` only compares. A failed claim is a signal to look, not
proof of a bug: these budgets are far below the papers'.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .tables import percent

_TRAIN = {"epochs": 3, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "lr_schedule": "cosine",
          "progress": False}
_LENET = {"model": "lenet_300_100", "data": {"name": "mnist", "subset": 10000}, "train": _TRAIN, "seed": 0}


_EFFNET = {"model": {"name": "efficientnet_lite0", "pretrained": {"source": "zoo"}},
           "data": {"name": "fashion_mnist", "subset": 1024, "resize": 64, "channels": 3, "val_size": 100,
                    "test_size": 500},
           "train": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                     "progress": False},
           "seed": 0}


def _needs_effnet(data_dir) -> str | None:
    """What the pretrained claim lacks: the EfficientNet-Lite0 weights or Fashion-MNIST (the fetch commands)."""
    from ..data import data_dir as resolve_dir
    from ..data.fashion import FASHION_FILES, FASHION_RELDIR
    from ..models.fetch import EFFICIENTNET_LITE0

    root = resolve_dir(data_dir)
    missing = []
    if not all((root / EFFICIENTNET_LITE0.reldir / f).is_file() for f in EFFICIENTNET_LITE0.files):
        missing.append("prunekit models fetch efficientnet_lite0")
    if not all((root / FASHION_RELDIR / f).is_file() for f in FASHION_FILES):
        missing.append("prunekit data fetch fashion_mnist")
    return "; ".join(missing) or None


def _cfg(name: str, base: dict, **prune) -> dict:
    d = copy.deepcopy(base)
    d["name"] = name
    d["prune"] = prune
    return d


@dataclass(frozen=True)
class Claim:
    code: str                       # short id for --only
    seed: str                       # the seed it comes from
    text: str                       # the claim, in words
    runs: dict[str, dict]           # label -> config of one run
    holds: Callable[[dict], bool]   # {label: RunRecord} -> does the claim hold?
    show: Callable[[dict], str]     # {label: RunRecord} -> the numbers behind the verdict
    needs: Callable[[object], str | None] = lambda data_dir: None  # data_dir -> what is missing (None: all there)


def _acc(recs, label) -> float:
    return 100.0 * (recs[label].final_test_acc or 0.0)


def _accuracies(*labels: str) -> Callable[[dict], str]:
    """A claim's ``show``: ``label accuracy`` of each run, comma separated."""
    return lambda recs: ", ".join(f"{lab} {percent(recs[lab].final_test_acc or 0.0)}" for lab in labels)


def claims() -> list[Claim]:
    """The claims, CPU-sized. Budgets are in the configs; every run is an ordinary prunekit run."""
    dense_mlp = {"name": "check_mlpnet_dense", "model": "mlpnet", "data": {"name": "mnist", "subset": 10000},
                 "train": {**_TRAIN, "epochs": 5}, "prune": {"method": "none"}, "seed": 0}
    dense_lenet = _cfg("check_lenet_dense", _LENET, method="none")
    return [
        Claim("fts_snip", "000", "FTS and SNIP beat random pruning at 99% sparsity on LeNet-300-100",
              {m: _cfg("check_000", _LENET, method=m, sparsity=0.99) for m in ("random", "snip", "fts")},
              lambda r: min(_acc(r, "snip"), _acc(r, "fts")) > _acc(r, "random") + 5.0,
              _accuracies("random", "snip", "fts")),
        Claim("px", "004", "PX beats random pruning at 98% sparsity on LeNet-300-100",
              {m: _cfg("check_004", _LENET, method=m, sparsity=0.98) for m in ("random", "px")},
              lambda r: _acc(r, "px") > _acc(r, "random"),
              _accuracies("random", "px")),
        Claim("px_pretrained", "004", "PX extracts a subnetwork of ImageNet-pretrained EfficientNet-Lite0 that "
              "transfers: pruned to 80% before fine-tuning on Fashion-MNIST it beats random pruning at 80% and the "
              "dense network trained from scratch on the same budget (PX in 10 rounds)",
              {"px": _cfg("check_004_pretrained", _EFFNET, method="px", sparsity=0.8, rounds=10),
               "random": _cfg("check_004_pretrained", _EFFNET, method="random", sparsity=0.8),
               "scratch": {**_cfg("check_004_pretrained", _EFFNET, method="none"),
                           "model": {"name": "efficientnet_lite0",
                                     "pretrained": {"source": "zoo", "init": "random"}}}},
              lambda r: _acc(r, "px") > max(_acc(r, "random"), _acc(r, "scratch")),
              _accuracies("scratch", "random", "px"), _needs_effnet),
        Claim("woodfisher", "003", "one-shot WoodFisher beats global magnitude at 90% on a trained MLPNet "
              "(no retraining)",
              {m: {**_cfg("check_003", dense_mlp, method=m, sparsity=0.9, **opts), "train": {"epochs": 0},
                   "model": {"name": "mlpnet", "pretrained_config": dense_mlp}}
               for m, opts in (("globalmagni", {}), ("woodfisherblock", {"fisher_samples": 400}))},
              lambda r: _acc(r, "woodfisherblock") > _acc(r, "globalmagni"),
              _accuracies("globalmagni", "woodfisherblock")),
        Claim("pfp", "002", "PFP keeps more accuracy than random filter pruning at 98% on a trained LeNet-300-100 "
              "(prune, retrain 2 epochs)",
              {m: {**_cfg("check_002", _LENET, method=m, sparsity=0.98), "train": {**_TRAIN, "epochs": 2},
                   "model": {"name": "lenet_300_100", "pretrained_config": dense_lenet}}
               for m in ("filter_random", "pfp")},
              lambda r: _acc(r, "pfp") > _acc(r, "filter_random"),
              _accuracies("filter_random", "pfp")),
        Claim("incop", "001", "InCoP (ciap) trains fewer epochs than LTH for the same 3 levels on the full MNIST "
              "training set, within 1 point",
              {m: {**_cfg("check_001", _LENET, method=m, levels=3, chunk_epochs=1), "data": {"name": "mnist"},
                   "train": {**_TRAIN, "epochs": 4, "optimizer": "adam", "lr": 1.2e-3, "momentum": 0.0}}
               for m in ("lth", "ciap")},
              lambda r: r["ciap"].epochs < r["lth"].epochs and _acc(r, "ciap") >= _acc(r, "lth") - 1.0,
              lambda r: ", ".join(f"{m} {r[m].epochs} epochs {percent(r[m].final_test_acc or 0.0)}"
                                  for m in ("lth", "ciap"))),
    ]


def _materialize(cfg: dict, root: Path) -> dict:
    """Write a ``pretrained_config`` (an inline dense config) to a file the config can name."""
    cfg = copy.deepcopy(cfg)
    model = cfg.get("model")
    if isinstance(model, dict) and "pretrained_config" in model:
        pre = model.pop("pretrained_config")
        path = root / "configs" / f"{pre['name']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        import yaml

        text = yaml.safe_dump(pre, sort_keys=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        model["pretrained"] = str(path)
    return cfg


def check(root: str | Path = "runs_check", only: list[str] | None = None, data_dir=None,
          log: Callable[[str], None] = print) -> dict[str, bool]:
    """Run (or look up) every claim's runs and print PASS/FAIL per claim; returns {code: holds}."""
    from .runner import run
    from .store import Store

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    todo = claims()
    if only:
        known = {c.code for c in todo}
        bad = [o for o in only if o not in known]
        if bad:
            from ..errors import unknown

            raise unknown("claim", bad[0], sorted(known))
        todo = [c for c in todo if c.code in only]
    out = {}
    with Store(root / "results.sqlite") as store:
        for c in todo:
            missing = c.needs(data_dir)
            if missing is not None:
                log(f"SKIP  [{c.seed}] {c.text}: needs `{missing}`")
                continue
            recs = {label: run(_materialize(cfg, root), root, data_dir=data_dir, store=store, log=lambda msg: None)
                    for label, cfg in c.runs.items()}
            ok = bool(c.holds(recs))
            out[c.code] = ok
            log(f"{'PASS' if ok else 'FAIL'}  [{c.seed}] {c.text}: {c.show(recs)}")
    skipped = len(todo) - len(out)
    log(f"{sum(out.values())}/{len(out)} claims hold (runs in {root}/)" + (f"; {skipped} skipped" if skipped else ""))
    return out
