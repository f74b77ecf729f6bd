"""HTML report load time in headless chromium for a store of 1,000 runs (target: under 2 s), against 100 runs.

The store is filled with synthetic finished runs (12 methods x 5 sparsities x N/60 seeds, records as the runner
writes them); the page is generated with ``prunekit.experiments.html.html_report`` and loaded with Debian's
chromium; the page itself reports ``performance.now()`` at the end of its script (navigation start to tables
sortable), read back from ``--dump-dom``.

    python bench/bench_html.py [--runs 1000]
"""
from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from prunekit.experiments.html import html_report
from prunekit.experiments.store import Store

METHODS = ["random", "magnitude", "snip", "grasp", "synflow", "fts", "fisher_diag", "woodfisherblock", "sipp", "pfp",
           "filter_l1", "px"]
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]


def fill(store: Store, n: int) -> None:
    rng = random.Random(0)
    for i in range(n):
        m, s, seed = METHODS[i % 12], (0.5, 0.8, 0.9, 0.95, 0.98)[(i // 12) % 5], i // 60
        rid = f"{i:016x}"
        cfg = {"name": "bench", "model": {"name": "lenet_300_100"}, "data": {"name": "mnist"}, "train": {"lr": 0.1},
               "prune": {"method": m, "sparsity": s}, "seed": seed}
        store.begin_run(rid, "bench", cfg, {}, {})
        acc = 0.98 - 0.1 * s * rng.random()
        rec = {"run_id": rid, "method": m, "sparsity": s, "seed": seed, "final_test_acc": acc, "best_val_acc": acc,
               "test_acc_at_best_val": acc, "achieved_sparsity": s, "train_seconds": 10.0, "prune_seconds": 1.0,
               "total_seconds": 11.0, "collapsed": [], "test_acc_before_finetune": acc - 0.05,
               "theoretical_speedup": 1 / (1 - s)}
        store.finish_run(rid, rec, [])
    with store.transaction() as c:  # the runs table's model/dataset columns come from begin_run's config
        c.execute("UPDATE runs SET model='lenet_300_100', dataset='mnist'")


def load_ms(chromium: str, page: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    dom = subprocess.run([chromium, *FLAGS, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    wall = time.perf_counter() - t0
    m = re.search(r'data-load-ms="(\d+)"', dom)
    return (int(m.group(1)) if m else -1), wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1000)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    results = {}
    for n in (100, args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "results.sqlite")
            fill(store, n)
            t0 = time.perf_counter()
            page = html_report(store, store.runs(), Path(tmp) / "r.html")
            gen = time.perf_counter() - t0
            ms, wall = load_ms(chromium, page)
            store.close()
            size = page.stat().st_size
        results[n] = ms
        print(f"{n:>5} runs: page {size / 1e6:.2f} MB generated in {gen:.2f} s; load in chromium {ms} ms "
              f"(navigation to sortable tables; {wall:.2f} s wall with browser start)")
    print(f"ratio {args.runs} / 100 runs: {results[args.runs] / max(results[100], 1):.2f}  "
          f"(target: {args.runs} runs under 2000 ms: {'met' if 0 <= results[args.runs] < 2000 else 'MISSED'})")


if __name__ == "__main__":
    main()
