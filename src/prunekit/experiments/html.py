"""``prunekit report --html``: one self-contained HTML page with every table and plot of a store (or experiment).

No external files, scripts or fonts: plots are embedded as PNG data URIs and a few lines of inline JavaScript make
every table sortable (click a header; click again to reverse; numbers before text, missing values '-' always
last; ``#sort=T,C`` or ``#sort=T,C,desc`` in the address clicks column C of table T on load, T < 0 counting from
the last table). Tables: the seed-style sparsity x method table per model and recipe, the
highest-sparsity-within-δ summary, the structured size/speed table, the fairness notes, the IMP level tables when
there are level runs, and one row per run (sortable by any column).
"""
from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

from ..io import atomic_write_text
from .report import plot_runs, render_texts, structured_rows, table_rows
from .store import Store
from .summary import labelled, split_level_runs, value
from .tables import html_table, percent_cell

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2;cursor:pointer;user-select:none}th:first-child,td:first-child{text-align:left}
td.best{font-weight:bold}pre{background:#f7f7f7;padding:8px;overflow-x:auto}img{max-width:100%}
"""

_JS = r"""
function sortTable(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),b=t.tBodies[0];
const rows=[...b.rows],dir=th.dataset.dir==='asc'?-1:1;th.dataset.dir=dir===1?'asc':'desc';
const key=r=>{const c=r.cells[i],s=c.dataset.v??c.textContent,n=parseFloat(s);
return c.dataset.v===undefined&&isNaN(n)&&s.trim()==='-'?[2,0]:isNaN(n)?[1,s]:[0,n];};
rows.sort((a,c)=>{const x=key(a),y=key(c);return x[0]-y[0]||(x[1]>y[1]?1:x[1]<y[1]?-1:0)*dir;});
rows.forEach(r=>b.appendChild(r));}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>sortTable(th)));
const m=location.hash.match(/^#sort=(-?\d+),(\d+)(,desc)?$/);
if(m){const ts=[...document.querySelectorAll('table.sortable')],t=ts[(+m[1]+ts.length)%ts.length];
const th=t.tHead.rows[0].cells[+m[2]];th.click();if(m[3])th.click();document.body.dataset.sorted=th.dataset.dir;}
document.body.dataset.ready=document.querySelectorAll('table.sortable').length;
document.body.dataset.loadMs=Math.round(performance.now());
"""


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def html_report(store: Store, runs: list[dict], path: str | Path, metric: str = "test_acc",
                title: str = "prunekit report") -> Path:
    """Write the page for ``runs`` (rows of the store) to ``path`` atomically; returns the path."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{len(runs)} finished run(s). Accuracies in %, mean ± std over seeds; click a column header to "
             "sort.</p>"]
    other = split_level_runs(labelled(runs))[1]
    for block in table_rows(other, metric):
        parts.append(f"<h2>{html.escape(block['title'])}</h2>")
        if block.get("dense"):
            parts.append(f"<p>dense (none): {html.escape(block['dense'])}</p>")
        if block["rows"]:
            parts.append(html_table(block["head"], block["rows"], block["best"]))
    if other:
        parts.append("<h2>Trade-off plots</h2>")
        with tempfile.TemporaryDirectory() as tmp:
            parts += [_img(p) for p in plot_runs(other, Path(tmp) / "acc.png", metric, title=title,
                                                 speedup_path=Path(tmp) / "speedup.png")]
    st = structured_rows(other)
    if st:
        parts.append("<h2>Structured runs: shrunk model vs dense</h2>")
        parts.append(html_table(st["head"], st["rows"]))
    for name, text in render_texts(store, runs, metric):
        parts.append(f"<h2>{html.escape(name)}</h2><pre>{html.escape(text)}</pre>")
    parts.append("<h2>Every run</h2>" + html_table(_RUN_HEAD, [_run_row(r) for r in runs]))
    parts.append(f"<script>{_JS}</script></body></html>")
    return atomic_write_text(path, "".join(parts))


_RUN_HEAD = ["run", "method", "sparsity", "achieved", "seed", "model", "dataset", "test acc", "before fine-tuning",
             "theoretical x", "train s", "prune s"]


def _run_row(r: dict) -> list:
    """One run's row of the "Every run" table (cells as in :func:`.tables.html_table`)."""
    speedup = value(r, "theoretical_speedup")
    return [r["run_id"], r["method"], ("-" if r["sparsity"] is None else f"{r['sparsity']:g}", r["sparsity"]),
            (f"{r['achieved_sparsity']:.4f}" if r.get("achieved_sparsity") is not None else "-",
             r.get("achieved_sparsity")), r["seed"], r["model"], r["dataset"],
            percent_cell(r.get("final_test_acc")), percent_cell(value(r, "test_acc_before_finetune")),
            (f"{speedup:.2f}" if speedup else "-", speedup),
            (f"{r['train_seconds'] or 0:.1f}", r["train_seconds"]),
            (f"{r['prune_seconds'] or 0:.2f}", r["prune_seconds"])]
