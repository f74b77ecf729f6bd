"""``run(cfg) -> RunRecord``: one experiment, a pure function of its resolved config.

The run's identity is the hash of its resolved config. Its folder is ``<root>/<run_id>/`` (config.json,
last.pt for resuming, best.pt, record.json) and its rows in ``<root>/results.sqlite`` are keyed by the same id:
rerunning a finished config is a no-op that returns the stored record; an interrupted run resumes from its last
checkpoint.

Under ``torchrun`` (several ranks, :mod:`prunekit.distributed`) every rank runs the same function: scoring and
training share the work, and rank 0 alone takes the run's lock and writes its folder and its store rows.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed
from ..io import acquire_lock, atomic_write_json, release_lock
from .config import resolve, run_id
from .store import INTERRUPTED, Store


@dataclass
class RunRecord:
    run_id: str
    name: str
    method: str
    sparsity: float
    seed: int
    model: str
    dataset: str
    final_test_acc: float | None = None
    best_val_acc: float | None = None
    test_acc_at_best_val: float | None = None
    best_epoch: int | None = None
    achieved_sparsity: float = 0.0
    collapsed: list[str] = field(default_factory=list)
    connected: bool | None = None  # does an input-output path of kept weights survive? (None: dense)
    prune_events: list[dict] = field(default_factory=list)
    prune_seconds: float = 0.0
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    epochs: int = 0
    run_dir: str = ""
    cached: bool = False  # True when the record came from the store without running
    levels: list[dict] = field(default_factory=list)  # IMP codes: one row per level (and control branch)
    structured: dict | None = None  # structured methods: the shrunk model's params, MACs and latency vs dense
    val_acc_before_finetune: float | None = None   # right after the final pruning step, before any retraining
    test_acc_before_finetune: float | None = None
    before_finetune_samples: dict | None = None     # {'val': n, 'test': n}: the samples those two were measured on
    compression: float | None = None               # prunable weights / kept ones, 1 / (1 - achieved sparsity)
    theoretical_speedup: float | None = None       # dense MACs / masked MACs (prunekit.flops)
    peak_memory_mb: float | None = None            # peak RSS of the process (CPU) or peak CUDA allocation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def versions() -> dict[str, str]:
    import numpy

    from .. import __version__

    return {"prunekit": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def hardware(device: str) -> dict[str, Any]:
    info = {"device": device, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


_LAST_DATASET: dict = {}


def _dataset(d: dict, data_dir):
    """The splits of a resolved data section; the last one is kept, so the runs of a grid load it once."""
    from ..data import load_dataset, resized

    where = str(data_dir) if data_dir is not None else os.environ.get("PRUNEKIT_DATA", "")
    key = (d["name"], where, d["val_size"], d["split_seed"], d["subset"], d.get("resize"))
    if key not in _LAST_DATASET:
        splits = load_dataset(d["name"], root=data_dir, val_size=d["val_size"], split_seed=d["split_seed"],
                              subset=d["subset"])
        if d.get("resize") is not None:
            splits = resized(splits, d["resize"])
        _LAST_DATASET.clear()
        _LAST_DATASET[key] = splits
    return _LAST_DATASET[key]


def _load_pretrained(model, pre: dict | None, root: Path, data_dir, store: Store, log):
    """Load the starting weights (and masks) named by a resolved ``model.pretrained``; returns the masks or None."""
    from ..masks import Masks, load

    if pre is None:
        return None
    from ..checkpoint import load_checked, verify_digest

    if "file" in pre:
        return load(pre["file"], model)
    rec = run(pre["config"], root, data_dir=data_dir, store=store, log=log)  # a no-op once it is done
    if pre["weights"] == "best":
        best = Path(rec.run_dir) / "best.pt"
        verify_digest(best, rec.run_id)
        return load(best, model)
    state = load_checked(Path(rec.run_dir) / "last.pt", rec.run_id)
    model.load_state_dict(state["model"])
    return Masks.from_state_dict(model, state["masks"]) if state["masks"] is not None else None


def structured_result(model, masks, input_shape, run_dir: Path, device: str, repeats: int = 10) -> dict:
    """Make a channel-pruned model physically smaller and measure it: parameters, MACs (theoretical speedup) and
    median latency at batch 1, 16 and 64 of the dense architecture, the masked model and the shrunk one (timed
    interleaved on ``device``). The shrunk model is saved to ``run_dir/shrunk.pt`` (reload it with
    :func:`prunekit.structured.load_shrunk`, no model code needed)."""
    import copy

    from ..latency import compare_latency
    from ..structured import save_shrunk, shrink
    from ..structured.shrink import shrink_report

    model = model.eval()
    x = torch.randn(2, *input_shape, device=next(model.parameters()).device)
    small = shrink(model, masks, x)
    rep = shrink_report(model, small, x)
    save_shrunk(run_dir / "shrunk.pt", small)
    dense = copy.deepcopy(model)  # the same architecture and weights, without the mask's zeros mattering
    rows = compare_latency({"dense": dense, "masked": model, "shrunk": small}, tuple(input_shape), repeats=repeats)
    return {"params_dense": rep["params_dense"], "params_shrunk": rep["params_shrunk"],
            "params_ratio": rep["params_ratio"], "macs_dense": rep["macs_dense"], "macs_shrunk": rep["macs_shrunk"],
            "macs_ratio": rep["macs_ratio"], "theoretical_speedup": 1.0 / max(rep["macs_ratio"], 1e-12),
            "device": device, "latency": rows}


def _speedup(model, masks, input_shape) -> float | None:
    from ..flops import theoretical_speedup

    try:
        return theoretical_speedup(model, masks, tuple(input_shape))
    except Exception:  # noqa: BLE001 - a model flops cannot trace is still a valid run
        return None


def _peak_memory_mb(device: str) -> float | None:
    """Peak CUDA allocation on a GPU run; otherwise the process's peak resident memory (for a sweep worker that
    is the peak over the runs it has done)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:  # noqa: BLE001
        return None


#: The post-prune diagnostics (accuracy before fine-tuning) evaluate at most this many samples of each of the
#: validation and test sets: a fixed, seeded subset, the same for every run of a dataset, whose size is recorded
#: beside the numbers (``before_finetune_samples``). The full sets stay the measure of training. On ResNet-20 with
#: CIFAR-sized sets this costs about what a SNIP step on 100 samples does (bench/bench_diagnostics.py), instead of
#: 13 times as much.
DIAGNOSE_SAMPLES = 500


def _diagnose_sets(splits, batch_size: int, device: str, val_dl, test_dl) -> dict:
    """{'val': (loader, n), 'test': (loader, n)}: the sets the post-prune diagnostics evaluate (see
    :data:`DIAGNOSE_SAMPLES`); a split no larger than the cap is used whole (its own loader)."""
    import dataclasses as dc

    from ..data import loaders, random_subset
    from ..seeding import derive_seed

    k = DIAGNOSE_SAMPLES
    parts, out = {}, {}
    for name, split, full in (("val", splits.val, val_dl), ("test", splits.test, test_dl)):
        if len(split) <= k:
            out[name] = (full, len(split))
        else:
            parts[name] = split.subset(random_subset(len(split), k, seed=derive_seed(0, "diagnose", name)))
    if parts:
        small = dc.replace(splits, val=parts.get("val", splits.val), test=parts.get("test", splits.test))
        _, val, test = loaders(small, batch_size, eval_batch_size=batch_size, device=device)
        for name, dl in (("val", val), ("test", test)):
            if name in parts:
                out[name] = (dl, k)
    return out


def _layer_rows(masks) -> list[dict]:
    return [{"layer": s.name, "shape": "x".join(map(str, s.shape)), "kept": s.kept, "total": s.total,
             "density": s.density} for s in masks.layer_stats()]


def _run_levels(resolved, rid, run_dir, splits, loaders_, device, model, start_masks, store: Store, log, t_start,
                score_data=None):
    """A run made of levels: an IMP code (lth, sap, ciap, giap, :mod:`.imp_runner`) or a prune-retrain cascade
    (``prune.cascade``, :mod:`.cascade_runner`). Levels go to the store as they end.

    Returns the record and the per-layer rows of the final level's masks."""
    from ..models import get_model
    from ..seeding import seed_everything
    from .imp_runner import level_row, run_levels

    if start_masks is not None:
        from ..errors import PrunekitError

        raise PrunekitError("model.pretrained holds masks: levels start from a dense network; point it at a dense run")
    base = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # θ_0 (pretrained or seeded)
    shape = tuple(splits.input_shape)

    def model_fn(seed: int | None = None):
        if seed is None:
            m = get_model(resolved["model"]["name"], num_classes=splits.num_classes, input_shape=shape)
            m.load_state_dict(base)
            return m
        with torch.random.fork_rng(devices=[]):
            seed_everything(seed)
            return get_model(resolved["model"]["name"], num_classes=splits.num_classes, input_shape=shape)

    def on_level(record: dict) -> None:
        rows = [level_row(record)]
        if record.get("control") is not None:
            rows.append(level_row(record, f"control_{resolved['prune']['method_options']['control']}"))
        store.log_levels(rid, rows)
        s = record["summary"]
        log(f"[{rid}] level {record['level']}: density {100 * record['density']:.2f}%, "
            f"{s.get('epochs')} epochs ({s.get('stop_reason')}), test {100 * (s.get('final_test_acc') or 0):.2f}%")

    if resolved["prune"].get("cascade") is not None:
        from .cascade_runner import run_cascade

        records = run_cascade(resolved, run_dir, loaders_, model_fn, score_data, log, on_level)
        sub = "cascade"
    else:
        records = run_levels(resolved, run_dir, splits, loaders_, device, model_fn, log, on_level)
        sub = "imp"
    rows = []
    for r in records:
        rows.append(level_row(r))
        if r.get("control") is not None:
            rows.append(level_row(r, f"control_{resolved['prune']['method_options']['control']}"))
    last = records[-1]
    s = last["summary"]
    p = resolved["prune"]
    main = [r for r in rows if r["branch"] == "main"]
    rec = RunRecord(
        run_id=rid, name=resolved["name"], method=p["method"], sparsity=1.0 - last["density"], seed=resolved["seed"],
        model=resolved["model"]["name"], dataset=resolved["data"]["name"], final_test_acc=s.get("final_test_acc"),
        best_val_acc=s.get("best_val_acc"), test_acc_at_best_val=s.get("test_acc_at_best_val"),
        best_epoch=None, achieved_sparsity=1.0 - last["density"],
        train_seconds=sum(r.get("seconds") or 0.0 for r in main),
        prune_seconds=0.0,
        total_seconds=time.perf_counter() - t_start, epochs=sum(r.get("epochs") or 0 for r in main),
        run_dir=str(run_dir), levels=rows)
    from ..masks import Masks

    from ..registry import get_method

    distributed.barrier()  # DDP: rank 0 has written the level files the other ranks read now
    from ..checkpoint import load_checked, sub_owner

    blob = load_checked(run_dir / sub / f"level_{last['level']}.pt", sub_owner(run_dir, run_dir / sub))
    model.load_state_dict(blob["final_state"])  # the last level's trained weights
    final = Masks.from_state_dict(model, blob["masks"])
    final.apply()
    rec.collapsed = final.collapsed()
    if get_method(p["method"]).structured and distributed.is_main():
        rec.structured = structured_result(model, final, tuple(splits.input_shape), run_dir, device)
    return rec, _layer_rows(final)


def _one_shot(trainer, callbacks, val_dl, test_dl) -> dict:
    """``train.epochs: 0``: prune (the schedule's epoch-0 step) and evaluate right after, with no training."""
    for cb in callbacks:
        cb.on_epoch_begin(trainer, 0)
    val_loss, val_acc = trainer.evaluate(val_dl)
    test_loss, test_acc = trainer.evaluate(test_dl)
    sparsity = trainer.masks.sparsity() if trainer.masks is not None else 0.0
    metrics = {"epoch": 0, "lr": 0.0, "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss,
               "test_acc": test_acc, "seconds": 0.0, "sparsity": sparsity}
    for cb in callbacks:
        cb.on_epoch_end(trainer, 0, metrics)
    return {"final_test_acc": test_acc, "best_val_acc": val_acc, "test_acc_at_best_val": test_acc, "best_epoch": 0,
            "epochs": 0, "train_seconds": 0.0}


class RankStore:
    """The store as ranks other than 0 see it under DDP: the reads a run makes pass through, and the writes a run
    makes are rank 0's job (here they do nothing). Any other use is an error, not a silent no-op."""

    READS = ("record", "status", "runs", "levels", "epochs", "layers")
    WRITES = ("begin_run", "link", "log_epoch", "log_levels", "finish_run", "fail_run")

    def __init__(self, store: Store):
        self._store = store

    def __getattr__(self, name):
        if name in self.READS:
            return getattr(self._store, name)
        if name in self.WRITES:
            return _rank0_writes
        raise AttributeError(f"{type(self).__name__} (the store of a DDP rank other than 0) has no {name!r}: "
                             f"it reads ({', '.join(self.READS)}) and skips the run's writes "
                             f"({', '.join(self.WRITES)})")


def _rank0_writes(*args, **kwargs) -> None:
    """A store write on a DDP rank other than 0: rank 0 writes it."""


def run(
    cfg: dict,
    root: str | Path = "runs",
    *,
    data_dir: str | Path | None = None,
    store: Store | None = None,
    log: Callable[[str], None] | None = None,
) -> RunRecord:
    """Run (or resume, or look up) the experiment ``cfg`` (plain data of one run, no grid)."""
    from ..data import loaders, scoring_data
    from ..diagnostics import collapse_report
    from ..registry import get_method
    from ..masks import Masks
    from ..models import get_model
    from ..schedules import Gradual, OneShot, PruningCallback
    from ..seeding import derive_seed, seed_everything
    from ..train import Callback, Trainer
    from ..train.config import TrainConfig, resolve_device
    from ..typed import from_dict

    resolved = resolve(cfg)
    rid = run_id(resolved)
    name = resolved["name"]
    root = Path(root)
    own_store = store is None
    store = store or Store(root / "results.sqlite")
    real_store = store
    if distributed.init_from_env(resolved["train"]["device"]) and not distributed.is_main():
        store = RankStore(store)
        log = lambda msg: None  # noqa: E731 - rank 0 reports
    log = log or (lambda msg: print(msg, file=sys.stderr))
    lock = None
    threads_before = torch.get_num_threads()
    try:
        done = store.record(rid)
        if done is not None:
            store.link(name, rid)
            rec = RunRecord.from_dict(done)
            rec.cached = True
            return rec

        # checked before anything is written: a bad device or a missing dataset is the user's to fix, not a run
        tcfg: TrainConfig = from_dict(TrainConfig, resolved["train"])
        device = str(resolve_device(tcfg.device))
        # results differ with the intra-op thread count: every run computes with its own, whoever launched it
        torch.set_num_threads(tcfg.threads or 1)
        d = resolved["data"]
        splits = _dataset(d, data_dir)
        run_dir = root / rid
        run_dir.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():  # one process per run: a second sweep skips it (RunBusyError)
            lock = acquire_lock(run_dir / ".lock")
        if store.status(rid) == "done":  # finished by another process while we were getting here
            rec = RunRecord.from_dict(store.record(rid))
            rec.cached = True
            return rec
        atomic_write_json(run_dir / "config.json", resolved)
        store.begin_run(rid, name, resolved, versions(), hardware(device))
        p = resolved["prune"]
        resuming = (run_dir / "last.pt").exists()
        target = f"at sparsity {p['sparsity']:g}" if p["sparsity"] is not None else \
            f"for {p['method_options']['levels']} levels"
        log(f"[{rid}] {name}: {resolved['model']['name']} on {resolved['data']['name']}, {p['method']} "
            f"{target}, seed {resolved['seed']}" + (" (resuming)" if resuming or (run_dir / "imp").exists() else ""))
        t_start = time.perf_counter()
        try:
            seed_everything(resolved["seed"])
            model = get_model(resolved["model"]["name"], num_classes=splits.num_classes,
                              input_shape=tuple(splits.input_shape))
            start_masks = _load_pretrained(model, resolved["model"].get("pretrained"), root, data_dir, store, log)
            train_dl, val_dl, test_dl = loaders(splits, tcfg.batch_size, eval_batch_size=tcfg.eval_batch_size,
                                                device=device, seed=resolved["seed"], augment=d["augment"])
            if get_method(p["method"]).needs_data == "training":
                rec, layers = _run_levels(resolved, rid, run_dir, splits, (train_dl, val_dl, test_dl), device, model,
                                          start_masks, store, log, t_start)
                atomic_write_json(run_dir / "record.json", rec.to_dict())
                store.finish_run(rid, rec.to_dict(), layers)
                return rec

            class StoreEpochs(Callback):
                def on_epoch_end(self, trainer, epoch, metrics):
                    store.log_epoch(rid, epoch, metrics)

            callbacks: list = [StoreEpochs()]
            pruner = None
            if p["method"] != "none":
                info = get_method(p["method"])
                bs = p["method_options"].get("batch_size", 256)

                def score_data(step: int):
                    # criteria that regroup their data get large batches; others get exactly their batch_size.
                    # Step 0 draws with the run's seed; every later (sub-)step draws afresh.
                    seed = resolved["seed"] if step == 0 else derive_seed(resolved["seed"], "scoring", str(step))
                    return scoring_data(splits, p["samples"], batch_size=max(bs, 256) if info.rebatches else bs,
                                        seed=seed, transform=p["score_transform"], device=device)

                diag_sets: dict = {}

                def diagnose(masks, event):
                    t0 = time.perf_counter()
                    if event.get("final") and tcfg.epochs > 0:  # the accuracy the pruning left, before fine-tuning
                        if not diag_sets:  # (one-shot runs: the final evaluation is that accuracy, on the full sets)
                            diag_sets.update(_diagnose_sets(splits, tcfg.eval_batch_size, device, val_dl, test_dl))
                        event["val_acc_before"] = trainer.evaluate(diag_sets["val"][0])[1]
                        event["test_acc_before"] = trainer.evaluate(diag_sets["test"][0])[1]
                        event["before_samples"] = {k: n for k, (_, n) in diag_sets.items()}
                    event["diagnostics"] = collapse_report(masks.model, masks).to_dict()
                    event["diagnostics_seconds"] = time.perf_counter() - t0
                    if event["diagnostics"]["connected"] is False:
                        log(f"[{rid}] warning: no input-output path survives pruning (collapsed: "
                            f"{', '.join(event['diagnostics']['collapsed'])})")

                if p.get("cascade") is not None:
                    rec, layers = _run_levels(resolved, rid, run_dir, splits, (train_dl, val_dl, test_dl), device,
                                              model, start_masks, store, log, t_start, score_data=score_data)
                    atomic_write_json(run_dir / "record.json", rec.to_dict())
                    store.finish_run(rid, rec.to_dict(), layers)
                    return rec
                when = (Gradual(p["sparsity"], **p["gradual"]) if p["gradual"] is not None
                        else OneShot(p["sparsity"], at_epoch=p["warmup"]))
                pruner = PruningCallback(when, p["method"], data=score_data, on_prune=diagnose, **p["options"],
                                         **p["method_options"])
                callbacks.insert(0, pruner)
            trainer = Trainer(model, tcfg, train_dl, val_dl, test_dl, callbacks=callbacks, run_dir=run_dir, owner=rid,
                              seed=resolved["seed"], masks=start_masks, log=log)
            if tcfg.epochs == 0:
                summary = _one_shot(trainer, callbacks, val_dl, test_dl)
            else:
                trainer.fit()
                summary = trainer.summary()
            masks = trainer.masks if trainer.masks is not None else Masks(model)
            events = pruner.events if pruner is not None else []
            layers = _layer_rows(masks)
            structured = None
            if p["method"] != "none" and get_method(p["method"]).structured and trainer.masks is not None \
                    and distributed.is_main():  # the shrunk archive and its latency: rank 0's job
                structured = structured_result(model, masks, tuple(splits.input_shape), run_dir, device)
                best = structured["latency"][-1]
                log(f"[{rid}] shrunk: params {structured['params_ratio']:.3f} of dense, MACs "
                    f"{structured['macs_ratio']:.3f}, batch {best['batch_size']} latency {best['ms']:.2f} ms "
                    f"({best['speedup']:.2f}x vs dense)")
            final_events = [e for e in events if e.get("final")]
            before = final_events[-1] if final_events else {}
            if tcfg.epochs == 0 and before:  # one-shot: nothing was fine-tuned, the final numbers are "before"
                before.update(val_acc_before=summary.get("best_val_acc"), test_acc_before=summary.get("final_test_acc"),
                              before_samples={"val": len(splits.val), "test": len(splits.test)})
            rec = RunRecord(
                run_id=rid, name=name, method=p["method"], sparsity=p["sparsity"], seed=resolved["seed"],
                structured=structured, val_acc_before_finetune=before.get("val_acc_before"),
                test_acc_before_finetune=before.get("test_acc_before"),
                before_finetune_samples=before.get("before_samples"),
                compression=1.0 / max(1.0 - masks.sparsity(), 1e-12),
                theoretical_speedup=_speedup(model, masks, splits.input_shape), peak_memory_mb=_peak_memory_mb(device),
                model=resolved["model"]["name"], dataset=resolved["data"]["name"],
                final_test_acc=summary.get("final_test_acc"), best_val_acc=summary.get("best_val_acc"),
                test_acc_at_best_val=summary.get("test_acc_at_best_val"), best_epoch=summary.get("best_epoch"),
                achieved_sparsity=masks.sparsity(), collapsed=masks.collapsed(), prune_events=events,
                connected=events[-1].get("diagnostics", {}).get("connected") if events else None,
                prune_seconds=sum(e.get("seconds", 0.0) for e in events),
                train_seconds=summary.get("train_seconds", 0.0),
                total_seconds=time.perf_counter() - t_start, epochs=summary.get("epochs", tcfg.epochs),
                run_dir=str(run_dir),
            )
            atomic_write_json(run_dir / "record.json", rec.to_dict())
            store.finish_run(rid, rec.to_dict(), layers)
            return rec
        except BaseException as e:
            msg = f"{type(e).__name__}: {e}"
            store.fail_run(rid, msg if not isinstance(e, KeyboardInterrupt) else INTERRUPTED)
            if not isinstance(e, (KeyboardInterrupt, SystemExit)) and distributed.is_main():
                try:
                    (run_dir / "error.txt").write_text(traceback.format_exc())
                except OSError:  # a full disk: the store row holds the error
                    pass
            raise
    finally:
        torch.set_num_threads(threads_before)
        if lock is not None:
            release_lock(lock)
        if own_store:
            real_store.close()
