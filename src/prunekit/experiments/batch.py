"""``prunekit run DIR/``: every config file of a folder, one after the other (seed 000's ``main.py --config
exp_configs/``).

The files are ``*.yaml``, ``*.yml`` and ``*.json`` directly in the folder, in name order (subfolders and hidden
files are left alone). Each is loaded like ``prunekit run FILE`` (prunekit's layout, seed 001's flags or seed 000's
JSON layout), with the same ``--set`` overrides applied to every file, and a config with a grid expands into its
runs. A run the store already has as done is skipped (the runner makes a finished run a no-op, keyed by the hash of
its resolved config), an interrupted one resumes, and one that failed before is run again. A run that fails is
recorded in the store as failed with its error, and the batch goes on; a file that does not load or validate has
no run id, so its error is only in the summary. The summary at the end lists what was done, skipped and failed;
the exit status is 1 when anything failed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..io import RunBusyError
from . import config as C
from .store import Store

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class FileResult:
    """What became of one config file."""

    path: Path
    name: str | None = None
    runs: list[str] = field(default_factory=list)             # its distinct run ids, in grid order
    done: list[str] = field(default_factory=list)             # finished in this batch
    skipped: list[str] = field(default_factory=list)          # finished before (not run again)
    failed: dict[str, str] = field(default_factory=dict)      # run id -> error (recorded in the store)
    busy: list[str] = field(default_factory=list)             # being run by another process right now
    error: str | None = None                                  # the file did not load or validate
    metric: str = "test_acc"
    plot: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed


@dataclass
class BatchResult:
    folder: Path
    files: list[FileResult] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(len(f.done) for f in self.files)

    @property
    def skipped(self) -> int:
        return sum(len(f.skipped) for f in self.files)

    @property
    def failed(self) -> int:
        """Failed runs plus files that did not load or validate."""
        return sum(len(f.failed) + (f.error is not None) for f in self.files)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)


def config_files(folder: str | Path) -> list[Path]:
    """The config files directly in ``folder`` (``*.yaml``, ``*.yml``, ``*.json``), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{str(folder)!r} is not a folder of config files")
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                    and not p.name.startswith(".")), key=lambda p: p.name)
    if not files:
        raise ConfigError(f"{folder}: no config files (*.yaml, *.yml, *.json) in this folder")
    return files


def _record_failure(store: Store, rid: str, resolved: dict, error: str) -> None:
    """Make sure a failed run is in the store as failed, also when it failed before the runner wrote anything
    (a missing dataset, an unusable device)."""
    from .runner import hardware, versions

    if store.status(rid) != "failed":
        if store.status(rid) is None:
            store.begin_run(rid, resolved["name"], resolved, versions(), hardware(str(resolved["train"]["device"])))
        store.fail_run(rid, error)


def run_folder(folder: str | Path, root: str | Path = "runs", *, overrides: list[str] | None = None,
               device: str | None = None, progress: bool = True, data_dir=None,
               log: Callable[[str], None] | None = None) -> BatchResult:
    """Run every config file of ``folder`` in name order into the store under ``root``; see the module text."""
    from .runner import run

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    files = config_files(folder)
    root = Path(root)
    result = BatchResult(Path(folder))
    with Store(root / "results.sqlite") as store:
        for n, path in enumerate(files, 1):
            fr = FileResult(path)
            result.files.append(fr)
            try:
                data = C.apply_overrides(C.load(path), overrides or [])
                if device:
                    data = C.set_path(data, "train.device", device)
                if not progress:
                    data = C.set_path(data, "train.progress", False)
                cfg = C.parse(data)
                fr.name, fr.metric, fr.plot = cfg.name, cfg.report.metric, cfg.report.plot
                runs = C.expand(data)
                resolved = [C.resolve(r) for r in runs]  # every run of the file is checked before any starts
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a bad file is reported; the batch goes on
                fr.error = f"{type(e).__name__}: {e}"
                log(f"[file {n}/{len(files)}] {path.name}: FAILED to load: {fr.error}")
                continue
            by_id: dict[str, tuple[dict, dict]] = {}
            for cfg_run, res in zip(runs, resolved):
                by_id.setdefault(C.run_id(res), (cfg_run, res))
            fr.runs = list(by_id)
            log(f"[file {n}/{len(files)}] {path.name}: {fr.name}, {len(by_id)} run(s) -> {root}/")
            for i, (rid, (cfg_run, res)) in enumerate(by_id.items(), 1):
                try:
                    rec = run(cfg_run, root, data_dir=data_dir, store=store, log=log)
                except KeyboardInterrupt:
                    log("interrupted: rerun the same command to finish the missing runs")
                    raise
                except RunBusyError as e:  # another process is running it: neither ours nor a failure
                    fr.busy.append(rid)
                    log(f"  [{i}/{len(by_id)}] {rid} skipped: {e}")
                    continue
                except Exception as e:  # noqa: BLE001 - recorded in the store; the batch goes on
                    fr.failed[rid] = f"{type(e).__name__}: {e}"
                    _record_failure(store, rid, res, fr.failed[rid])
                    log(f"  [{i}/{len(by_id)}] {rid} FAILED: {fr.failed[rid]}")
                    continue
                (fr.skipped if rec.cached else fr.done).append(rid)
                acc = "—" if rec.final_test_acc is None else f"{100 * rec.final_test_acc:.2f}%"
                how = "already done" if rec.cached else f"{rec.total_seconds:.0f}s"
                log(f"  [{i}/{len(by_id)}] {rec.method:<12} sparsity {rec.sparsity:<6g} seed {rec.seed}: test acc "
                    f"{acc} (achieved sparsity {rec.achieved_sparsity:.4f}; {how})")
    return result


def summary(result: BatchResult) -> str:
    """The end-of-batch summary: totals, one line per file, then every failure with its error."""
    runs = sum(len(f.runs) for f in result.files)
    lines = [f"batch {result.folder}: {len(result.files)} config file(s), {runs} run(s): {result.done} done, "
             f"{result.skipped} skipped (finished before), {result.failed} failed"]
    width = max(len(f.path.name) for f in result.files)
    for f in result.files:
        if f.error is not None:
            what = "did not load"
        else:
            parts = [f"{len(v)} {k}" for k, v in (("done", f.done), ("skipped", f.skipped), ("failed", f.failed),
                                                  ("busy", f.busy)) if v]
            what = f"{f.name}: {len(f.runs)} run(s): " + (", ".join(parts) or "nothing to do")
        lines.append(f"  {'ok    ' if f.ok else 'FAILED'}  {f.path.name:<{width}}  {what}")
    failures = [(f.path.name, None, f.error) for f in result.files if f.error is not None]
    failures += [(f.path.name, rid, err) for f in result.files for rid, err in f.failed.items()]
    if failures:
        lines.append("failed:")
        lines += [f"  {name} {'run ' + rid if rid else '(config)'}: {err}" for name, rid, err in failures]
        lines.append("fix the cause and run the same command again: finished runs are skipped")
    busy = [rid for f in result.files for rid in f.busy]
    if busy:
        lines.append(f"busy (being run by another process, not run here): {', '.join(busy)}")
    return "\n".join(lines)


def cmd_run_folder(args) -> int:
    """``prunekit run DIR/`` (the arguments of ``prunekit run``): run the folder, print each experiment's table
    unless ``--no-report``, then the summary; exit status 1 when anything failed."""
    from .report import render

    root = Path(args.root)
    res = run_folder(args.config, root, overrides=args.overrides, device=args.device,
                     progress=not args.no_progress, data_dir=args.data_dir)
    if not args.no_report:
        with Store(root / "results.sqlite") as store:
            for f in res.files:
                ids = set(f.done) | set(f.skipped)
                if not ids:
                    continue
                rows = [r for r in store.runs(name=f.name) if r["run_id"] in ids]
                plot_path = root / f"{f.name}.png" if f.plot and rows else None
                text, plots = render(store, rows, f.metric, plot_path, title=f.name)
                print(f"== {f.path.name}\n{text}")
                for out in plots:
                    print(f"plot: {out}")
    print(summary(res))
    return 0 if res.ok else 1
