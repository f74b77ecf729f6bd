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
import os
import tempfile
from pathlib import Path

from .report import _value, plot, plot_speedup, render_texts, split_level_runs, structured_rows, table_rows
from .store import Store

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2;cursor:pointer;user-select:none}th:first-child,td:first-child{text-align:left}
td.best{font-weight:bold}pre{background:#f7f7f7;padding:8px;overflow-x:auto}img{max-width:100%}
"""

_JS = """
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


def _table(head: list[str], rows: list[list], best: set[tuple[int, int]] = frozenset()) -> str:
    """An HTML table; cells are (text, sort value) pairs or plain values."""
    out = ['<table class="sortable"><thead><tr>', "".join(f"<th>{html.escape(str(h))}</th>" for h in head),
           "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cells = []
        for j, c in enumerate(row):
            text, v = c if isinstance(c, tuple) else (c, None)
            attr = f' data-v="{html.escape(str(v))}"' if v is not None else ""
            cls = ' class="best"' if (i, j) in best else ""
            cells.append(f"<td{attr}{cls}>{html.escape('' if text is None else str(text))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _pct(v) -> tuple[str, float | None]:
    return ("-", None) if v is None else (f"{100 * v:.2f}", 100 * v)


def html_report(store: Store, runs: list[dict], path: str | Path, metric: str = "test_acc",
                title: str = "prunekit report") -> Path:
    """Write the page for ``runs`` (rows of the store) to ``path`` atomically; returns the path."""
    path = Path(path)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{len(runs)} finished run(s). Accuracies in %, mean ± std over seeds; click a column header to "
             "sort.</p>"]
    other = split_level_runs(runs)[1]
    with tempfile.TemporaryDirectory() as tmp:
        for block in table_rows(other, metric):
            parts.append(f"<h2>{html.escape(block['title'])}</h2>")
            if block.get("dense"):
                parts.append(f"<p>dense (none): {html.escape(block['dense'])}</p>")
            if block["rows"]:
                parts.append(_table(block["head"], block["rows"], block["best"]))
        if other:
            parts.append("<h2>Trade-off plots</h2>")
            parts.append(_img(plot(other, Path(tmp) / "acc.png", metric, title=title)))
            if any(_value(r, "theoretical_speedup") for r in other):
                parts.append(_img(plot_speedup(other, Path(tmp) / "speedup.png", metric, title=title)))
        st = structured_rows(other)
        if st:
            parts.append("<h2>Structured runs: shrunk model vs dense</h2>")
            parts.append(_table(st["head"], st["rows"]))
        for name, text in render_texts(store, runs, metric):
            parts.append(f"<h2>{html.escape(name)}</h2><pre>{html.escape(text)}</pre>")
    head = ["run", "method", "sparsity", "achieved", "seed", "model", "dataset", "test acc", "before fine-tuning",
            "theoretical x", "train s", "prune s"]
    rows = []
    for r in runs:
        rows.append([r["run_id"], r["method"], ("-" if r["sparsity"] is None else f"{r['sparsity']:g}",
                                                 r["sparsity"]),
                     (f"{r['achieved_sparsity']:.4f}" if r.get("achieved_sparsity") is not None else "-",
                      r.get("achieved_sparsity")), r["seed"], r["model"], r["dataset"],
                     _pct(r.get("final_test_acc")), _pct(_value(r, "test_acc_before_finetune")),
                     (f"{_value(r, 'theoretical_speedup'):.2f}" if _value(r, "theoretical_speedup") else "-",
                      _value(r, "theoretical_speedup")),
                     (f"{r['train_seconds'] or 0:.1f}", r["train_seconds"]),
                     (f"{r['prune_seconds'] or 0:.2f}", r["prune_seconds"])])
    parts.append("<h2>Every run</h2>" + _table(head, rows))
    parts.append(f"<script>{_JS}</script></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(parts))
    os.replace(tmp_name, path)
    return path
