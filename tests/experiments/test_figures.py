"""The report's figure writer and table helpers: no backend selection, atomic PNG/PDF writes, one table layout."""
import ast
import os
from pathlib import Path

import matplotlib
import pytest

from prunekit.experiments import figures
from prunekit.experiments.tables import delta_rows, html_table, mean_std, number, percent_cell, stats, text_table

SRC = Path(__file__).resolve().parents[2] / "src" / "prunekit"


def _backend_uses(path: Path) -> list[str]:
    """``matplotlib.use(...)`` calls and ``matplotlib.pyplot`` imports in one source file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "matplotlib.use":
            out.append(f"{path.relative_to(SRC)}:{node.lineno}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                f"{node.module}.{a.name}" for a in node.names]
            if any(n == "matplotlib.pyplot" for n in names):
                out.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return out


def test_library_code_never_selects_a_matplotlib_backend():
    assert [hit for p in sorted(SRC.rglob("*.py")) for hit in _backend_uses(p)] == []


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), ("", b"\x89PNG")])
def test_finish_writes_the_suffix_format_atomically(tmp_path, suffix, magic):
    backend = matplotlib.get_backend()
    fig, [ax] = figures.figure()
    ax.plot([1, 2], [3, 4], label="a")
    figures.reference_line(ax, 3.5, "dense")
    out = figures.finish(fig, tmp_path / "sub" / f"plot{suffix}", [figures.Panel(ax, "x", "y", title="t")])
    assert out == tmp_path / "sub" / f"plot{suffix}" and out.read_bytes().startswith(magic)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    assert matplotlib.get_backend() == backend
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "dense"]


def test_figure_grid_palette_and_bad_legend(tmp_path):
    fig, axes = figures.figure(3, size=(2, 1), ncols=2)
    assert len(axes) == 3 and list(fig.get_size_inches()) == [4, 2]
    assert len(set(figures.palette(12))) == 12 and figures.palette(3) == figures.palette(10)[:3]
    with pytest.raises(ValueError, match="legend 'left'"):
        figures.finish(fig, tmp_path / "x.png", [figures.Panel(axes[0], "x", "y", legend="left")])
    assert not (tmp_path / "x.png").exists()


def test_text_and_html_tables():
    assert text_table([["a", "bb"], ["ccc", "d"]]) == "a    bb\n---  --\nccc   d"
    assert text_table([["a", "b"], ["x", ""]], strip=True).splitlines()[-1] == "x"
    v = stats([1.0, 2.0, 3.0])
    assert mean_std(v) == "2.00 ± 1.00" and v["n"] == 3 and stats([5.0])["std"] == 0.0
    assert number(None) == "-" and number(1.234, ".1f") == "1.2" and percent_cell(0.5) == ("50.00", 50.0)
    rows = delta_rows((0.0, 0.01), ["m"], "x", lambda m, d: f"{m}{d}")
    assert rows == [["δ (points)", "m x"], ["+0.0", "m0.0"], ["+1.0", "m0.01"]]
    page = html_table(["h"], [[("1<", 1.0)], ["-"]], best={(0, 0)})
    assert '<td data-v="1.0" class="best">1&lt;</td>' in page and "<td>-</td>" in page
