"""Run ids are the identity of stored results: every run of every config in configs/ keeps its id.

``run_ids.json`` was generated once from the code before the typed resolved run (issue 15) by running this file as
a script (``python tests/experiments/test_run_ids.py --write``); the test recomputes the ids and asserts they are
the same, for the runs of each grid (``expand``) and for the cells of its sweep (baselines included).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPECTED = Path(__file__).with_name("run_ids.json")


def compute_ids() -> dict[str, dict[str, list[str]]]:
    """{config path: {'expand': [run id per grid run], 'sweep': [run id per sweep cell]}} (paths from the repo
    root, which is also where the configs' ``model.pretrained`` paths start)."""
    from prunekit.experiments import config as C
    from prunekit.experiments.sweep import sweep_runs

    out = {}
    here = os.getcwd()
    os.chdir(REPO)
    try:
        for path in sorted(Path("configs").rglob("*")):
            if path.suffix not in (".yaml", ".yml", ".json"):
                continue
            data = C.load(path)
            out[path.as_posix()] = {"expand": [C.run_id(C.resolve(r)) for r in C.expand(data)],
                                    "sweep": [C.run_id(C.resolve(r)) for r in sweep_runs(data)]}
    finally:
        os.chdir(here)
    return out


def test_every_config_keeps_its_run_ids():
    expected = json.loads(EXPECTED.read_text())
    got = compute_ids()
    assert sorted(got) == sorted(expected), "the configs in configs/ changed: regenerate run_ids.json on purpose"
    for path, ids in expected.items():
        assert got[path] == ids, path
    assert sum(len(v["expand"]) + len(v["sweep"]) for v in got.values()) > 2 * len(got)  # grids were expanded


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/experiments/test_run_ids.py --write  (regenerates run_ids.json)")
    EXPECTED.write_text(json.dumps(compute_ids(), indent=1, sort_keys=True) + "\n")
