"""The HTML report: one self-contained page, checked in a real headless browser (Debian's chromium)."""
import re
import shutil
import subprocess

import pytest

from prunekit.cli import main
from prunekit.experiments import Store, run
from tiny import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = tiny("web")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", "--disable-sync", "--no-default-browser-check"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    for method, s in (("none", 0.0), ("magnitude", 0.5), ("magnitude", 0.8), ("random", 0.5), ("random", 0.8),
                      ("filter_l1", 0.5)):
        run({**BASE, "prune": {"method": method, "sparsity": s}}, root)
    out = root / "report.html"
    assert main(["report", "--root", str(root), "--html", str(out)]) == 0
    return root, out


def test_page_is_self_contained_with_every_run(page):
    root, out = page
    text = out.read_text()
    assert "<script src" not in text and "<link" not in text and "http" not in text.replace("http-equiv", "")
    assert text.count("data:image/png;base64,") >= 2  # accuracy vs sparsity, accuracy vs speedup
    with Store(root / "results.sqlite") as s:
        for r in s.runs():
            assert r["run_id"] in text
    assert "Structured runs" in text and "filter_l1" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does it)")
def test_page_renders_in_headless_chromium(page, tmp_path):
    _root, out = page
    dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", out.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    ready = re.search(r'data-ready="(\d+)"', dom)
    assert ready and int(ready.group(1)) >= 3  # the script ran and made every table sortable
    assert dom.count("<tr>") >= 6 + 3
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--screenshot={shot}", "--window-size=1200,1400", out.as_uri()],
                   capture_output=True, timeout=120, cwd=tmp_path)
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert img.size == (1200, 1400) and hi - lo > 100  # not a blank page: text, tables and plots drew
    hist = img.histogram()
    dark = sum(hist[:128]) / (img.size[0] * img.size[1])
    assert 0.005 < dark < 0.5


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does it)")
@pytest.mark.parametrize("order", ["", ",desc"])
def test_clicking_a_header_sorts_the_table_in_the_browser(page, order):
    """`#sort=-1,2` clicks the sparsity header of the last table (every run) on load, `,desc` clicks it twice."""
    _root, out = page
    dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", out.as_uri() + f"#sort=-1,2{order}"],
                         capture_output=True, text=True, timeout=120).stdout
    assert re.search(r'data-sorted="(asc|desc)"', dom).group(1) == ("desc" if order else "asc")
    last = dom[dom.rindex('<table class="sortable">'):]
    last = last[: last.index("</table>")]
    body = last[last.index("<tbody>"):]
    values = []
    for row in re.findall(r"<tr>(.*?)</tr>", body):
        cells = re.findall(r"<td([^>]*)>(.*?)</td>", row)
        v = re.search(r'data-v="([^"]*)"', cells[2][0])
        values.append(float(v.group(1)) if v else None)
    assert len(values) == 6
    known = [v for v in values if v is not None]
    assert values == known + [None] * (len(values) - len(known))  # the dense run has no sparsity: last
    assert known == sorted(known, reverse=bool(order)) and known != sorted(known, reverse=not order)
