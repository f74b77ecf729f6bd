"""Experiments: typed configs, ``run(cfg) -> RunRecord``, the SQLite results store, reports."""
from .config import ExperimentConfig, ResolvedRun, apply_overrides, expand, load, parse, resolve, resolve_run, run_id
from .report import aggregate, plot, report, table
from .runner import RunRecord, run
from .store import Store

__all__ = ["ExperimentConfig", "ResolvedRun", "apply_overrides", "expand", "load", "parse", "resolve", "resolve_run",
           "run_id", "aggregate",
           "plot", "report", "table", "RunRecord", "run", "Store"]
