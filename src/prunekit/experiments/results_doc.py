"""``prunekit results``: a Markdown page of every experiment in one or more results stores (docs/results.md).

Each experiment gets its section: the run count, the command that reruns it (when the experiment's name matches a
config under ``configs/``), and the text report of :func:`prunekit.experiments.report.render` in a code block. The
page is written atomically and is a pure function of the stores, so regenerating it after more runs is one
command (``make results``).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import PrunekitError
from ..io import atomic_write_text
from .config import load
from .report import render
from .store import Store


def _configs_by_name(config_dir: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(config_dir.rglob("*.yaml")):
        try:
            name = load(p).get("name")
        except PrunekitError:
            continue
        if isinstance(name, str):
            out.setdefault(name, p)
    return out


def results_markdown(roots: list[str | Path], metric: str = "test_acc", config_dir: str | Path = "configs") -> str:
    """The Markdown text for the stores under ``roots`` (each holding ``results.sqlite``)."""
    configs = _configs_by_name(Path(config_dir)) if Path(config_dir).is_dir() else {}
    parts = ["# Results", "",
             "Generated from the results stores by `prunekit results` (see the Makefile's `results` target); every "
             "number below was measured by the runs in those stores. Accuracies in %, mean ± std over seeds.", ""]
    for root in roots:
        path = Path(root) / "results.sqlite"
        if not path.exists():
            raise PrunekitError(f"no results store at {path}: run the experiments first (prunekit run CONFIG)")
        with Store(path, readonly=True) as store:
            for name in store.experiment_names():
                runs = store.runs(name=name)
                if not runs:
                    continue
                parts.append(f"## {name}")
                parts.append("")
                cfg = configs.get(name)
                cmd = f"prunekit run {cfg} --root {root}" if cfg else f"(store {root})"
                parts.append(f"{len(runs)} finished run(s). Reproduce: `{cmd}`; report: "
                             f"`prunekit report --root {root} --name {name}`.")
                parts.append("")
                text, _ = render(store, runs, metric)
                parts += ["```", text.rstrip(), "```", ""]
    return "\n".join(parts)


def write_results(path: str | Path, roots: list[str | Path], metric: str = "test_acc",
                  config_dir: str | Path = "configs") -> Path:
    path = Path(path)
    atomic_write_text(path, results_markdown(roots, metric, config_dir))
    return path
