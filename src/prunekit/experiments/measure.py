"""What a run measures besides training: the post-prune diagnostics (accuracy before fine-tuning on a fixed subset,
layer collapse, connectivity), per-layer rows, theoretical speedup, peak memory, and for structured methods the
shrunk model with its latency."""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from ..data import loaders, random_subset
from ..diagnostics import collapse_report
from ..families.layerwise.reconstruction import held_out, reconstruction_errors
from ..flops import theoretical_speedup
from ..hf import TextClassifier
from ..latency import compare_latency, example_input
from ..peak_memory import proc_status, reset_peak_rss
from ..seeding import derive_seed
from ..structured import save_shrunk, shrink
from ..structured.archive_hf import save_shrunk_hf
from ..structured.shrink import shrink_report

#: The post-prune diagnostics (accuracy before fine-tuning) evaluate at most this many samples of each of the
#: validation and test sets: a fixed, seeded subset, the same for every run of a dataset, whose size is recorded
#: beside the numbers (``before_finetune_samples``). The full sets stay the measure of training. On ResNet-20 with
#: CIFAR-sized sets this costs about what a SNIP step on 100 samples does (bench/bench_diagnostics.py), instead of
#: 13 times as much.
DIAGNOSE_SAMPLES = 500


def diagnose_sets(splits, batch_size: int, device: str, val_dl, test_dl) -> dict:
    """{'val': (loader, n), 'test': (loader, n)}: the sets the post-prune diagnostics evaluate (see
    :data:`DIAGNOSE_SAMPLES`); a split no larger than the cap is used whole (its own loader)."""
    k = DIAGNOSE_SAMPLES
    parts, out = {}, {}
    for name, split, full in (("val", splits.val, val_dl), ("test", splits.test, test_dl)):
        if len(split) <= k:
            out[name] = (full, len(split))
        else:
            parts[name] = split.subset(random_subset(len(split), k, seed=derive_seed(0, "diagnose", name)))
    if parts:
        small = dataclasses.replace(splits, val=parts.get("val", splits.val), test=parts.get("test", splits.test))
        _, val, test = loaders(small, batch_size, eval_batch_size=batch_size, device=device)
        for name, dl in (("val", val), ("test", test)):
            if name in parts:
                out[name] = (dl, k)
    return out


class PostPrune:
    """The ``on_prune`` hook of a run under a schedule: after every pruning step the collapse report (collapsed
    layers, connectivity), and after the final step of a run that trains on, the accuracy the pruning left
    (before fine-tuning) on the :func:`diagnose_sets`. Evaluations go through ``trainer``, set once it exists."""

    def __init__(self, splits, eval_batch_size: int, device: str, val_dl, test_dl, epochs: int,
                 warn: Callable[[str], None], reconstruction: int | None = None):
        self.splits, self.eval_batch_size, self.device = splits, eval_batch_size, device
        self.val_dl, self.test_dl, self.epochs, self.warn = val_dl, test_dl, epochs, warn
        self.reconstruction = reconstruction
        self.trainer = None
        self._sets: dict = {}
        self._dense: dict | None = None

    def before(self, model) -> None:
        """The ``before_prune`` hook: with ``reconstruction`` set, keep the weights the pruning starts from."""
        if self.reconstruction is not None:
            self._dense = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def __call__(self, masks, event: dict) -> None:
        t0 = time.perf_counter()
        if event.get("final") and self.epochs > 0:  # the accuracy the pruning left, before fine-tuning
            if not self._sets:  # (one-shot runs: the final evaluation is that accuracy, on the full sets)
                self._sets.update(diagnose_sets(self.splits, self.eval_batch_size, self.device, self.val_dl,
                                                self.test_dl))
            event["val_acc_before"] = self.trainer.evaluate(self._sets["val"][0])[1]
            event["test_acc_before"] = self.trainer.evaluate(self._sets["test"][0])[1]
            event["before_samples"] = {k: n for k, (_, n) in self._sets.items()}
        if event.get("final") and self._dense is not None:  # against the weights just before this pruning
            t1 = time.perf_counter()
            event["reconstruction"] = reconstruction_errors(masks.model, self._dense, masks,
                                                            held_out(self.val_dl, self.reconstruction))
            event["reconstruction"]["seconds"] = time.perf_counter() - t1
            self._dense = None
        event["diagnostics"] = collapse_report(masks.model, masks).to_dict()
        event["diagnostics_seconds"] = time.perf_counter() - t0
        if event["diagnostics"]["connected"] is False:
            self.warn(f"warning: no input-output path survives pruning (collapsed: "
                      f"{', '.join(event['diagnostics']['collapsed'])})")


def before_finetune(events: list[dict], summary: dict, splits, epochs: int) -> dict:
    """The final pruning event, which holds the accuracy before fine-tuning (``{}`` without one). A run with
    ``epochs: 0`` fine-tunes nothing: its final evaluation, on the full sets, is that accuracy."""
    final_events = [e for e in events if e.get("final")]
    before = final_events[-1] if final_events else {}
    if epochs == 0 and before:
        before.update(val_acc_before=summary.get("best_val_acc"), test_acc_before=summary.get("final_test_acc"),
                      before_samples={"val": len(splits.val), "test": len(splits.test)})
    return before


def layer_rows(masks) -> list[dict]:
    """The store's per-layer rows of ``masks``."""
    return [{"layer": s.name, "shape": "x".join(map(str, s.shape)), "kept": s.kept, "total": s.total,
             "density": s.density} for s in masks.layer_stats()]


def structured_result(model, masks, input_shape, run_dir: Path, device: str, repeats: int = 10) -> dict:
    """Make a channel-pruned model physically smaller and measure it: parameters, MACs (theoretical speedup) and
    median latency at batch 1, 16 and 64 of the dense architecture, the masked model and the shrunk one (timed
    interleaved on ``device``). The shrunk model is saved to ``run_dir/shrunk.pt`` (reload it with
    :func:`prunekit.structured.load_shrunk`, no model code needed)."""
    model = model.eval()
    x = example_input(model, input_shape, 2, next(model.parameters()).device)
    small = shrink(model, masks, x)
    rep = shrink_report(model, small, x)
    save_archive(small, run_dir)
    dense = copy.deepcopy(model)  # the same architecture and weights, without the mask's zeros mattering
    rows = compare_latency({"dense": dense, "masked": model, "shrunk": small}, tuple(input_shape), repeats=repeats)
    return {"params_dense": rep["params_dense"], "params_shrunk": rep["params_shrunk"],
            "params_ratio": rep["params_ratio"], "macs_dense": rep["macs_dense"], "macs_shrunk": rep["macs_shrunk"],
            "macs_ratio": rep["macs_ratio"], "theoretical_speedup": 1.0 / max(rep["macs_ratio"], 1e-12),
            "device": device, "latency": rows}


def save_archive(small, run_dir: Path) -> None:
    """Save a shrunk model beside its run: ``shrunk.pt`` (:func:`prunekit.structured.save_shrunk`, reloaded without
    model code); a text classifier's shrunk encoder as a Hugging Face folder ``shrunk_encoder/``
    (:func:`prunekit.structured.save_shrunk_hf`, per-layer head and neuron counts) and its head as
    ``shrunk_head.safetensors``."""
    if isinstance(small, TextClassifier):
        from safetensors.torch import save_file

        save_shrunk_hf(small.encoder, run_dir / "shrunk_encoder")
        save_file({k: v.contiguous().cpu() for k, v in small.head.state_dict().items()},
                  str(run_dir / "shrunk_head.safetensors"))
        return
    save_shrunk(run_dir / "shrunk.pt", small)


def shrunk_line(structured: dict) -> str:
    """One log line on the shrunk model of :func:`structured_result`."""
    best = structured["latency"][-1]
    return (f"shrunk: params {structured['params_ratio']:.3f} of dense, MACs {structured['macs_ratio']:.3f}, batch "
            f"{best['batch_size']} latency {best['ms']:.2f} ms ({best['speedup']:.2f}x vs dense)")


def speedup(model, masks, input_shape) -> float | None:
    """Dense MACs / masked MACs (:func:`prunekit.flops.theoretical_speedup`), None for a model it cannot trace."""
    try:
        return theoretical_speedup(model, masks, tuple(input_shape))
    except Exception:  # noqa: BLE001 - a model flops cannot trace is still a valid run
        return None


def reset_peak_memory(device: str) -> bool:
    """Start the run's peak-memory count: the CUDA peak on a GPU run, else the process's resident high-water mark
    (Linux ``/proc/self/clear_refs``), so that a sweep worker's later runs do not report an earlier run's peak.
    False where the platform does not allow it (the peak then covers the process's life)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return reset_peak_rss()


def peak_memory_mb(device: str) -> float | None:
    """Peak CUDA allocation on a GPU run; otherwise the peak resident memory of the process since
    :func:`reset_peak_memory` (VmHWM), or over the process's life where that is not available."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        return proc_status("VmHWM") / 2**20
    except (OSError, KeyError):
        pass
    try:
        import resource  # not on every platform

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:  # noqa: BLE001
        return None
