"""``pchmr report --html DIR``: one static page (tables with protocols, the plots, the prediction
grid, the configs), self-contained, escaped, and checked in headless Chromium
(:mod:`pchmr.testing.browser`) — which must also fail on a broken page."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from pchmr.cli.app import app
from pchmr.report.html import CONTENT_SECURITY_POLICY, PageFigure, render_html
from pchmr.testing.browser import CHROMIUM_NAMES, check_page, find_chromium
from tests.test_report import PROTOCOL_LABEL, make_run

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason=f"no Chromium to check the page in: looked for $PCHMR_CHROMIUM, then {', '.join(CHROMIUM_NAMES)} on PATH "
    "(Debian: apt-get install chromium; .ci/run installs it)",
)
SCRIPT = "</pre><script>window.pwned = 1; console.error('pwned')</script>"
IMAGE = '"><img src=x onerror="window.pwned = 2">'
PNG = b"\x89PNG\r\n\x1a\n"


def one_line(text: str) -> str:
    return " ".join(text.split())


def lda_run(root, name, alpha, seed, mpjpe):
    return make_run(root, name, (mpjpe, mpjpe * 0.7, 300.0), seed=seed, partitioner="lda", clients=20, per_round=5,
                    partition_options={"alpha": alpha})  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_finished_run, tmp_path_factory):
    """The tiny finished run (its model.pt: the grid), LDA runs at α 0.1 and 1 × 2 seeds each (no
    model.pt: the α plot and the convergence band), and a run whose directory name, config and
    protocol hold markup."""
    root = tmp_path_factory.mktemp("html-runs")
    shutil.copytree(tiny_finished_run, root / "tiny")
    for alpha, values in ((0.1, (60.0, 64.0)), (1, (70.0, 72.0))):
        for seed, mpjpe in enumerate(values):
            lda_run(root, f"lda-{alpha}-s{seed}", alpha, seed, mpjpe)
    hostile = make_run(root, 'evil<b>"&amp;', (90.0, 60.0, 300.0), out=SCRIPT, dataset_options={"note": IMAGE},
                       protocol={"dataset": "<script>alert(3)</script>", "joint_set": "anny-14",
                                 "alignment": "mid-hip (root)", "body_model": "anny", "ground_truth": "real"})  # fmt: skip
    return root, hostile


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory):
    root, _ = runs
    out = tmp_path_factory.mktemp("html") / "site"
    result = CliRunner().invoke(app, ["report", str(root), "--html", str(out), "--grid-samples", "2"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'index.html'}" in one_line(result.output)
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]
    return out / "index.html"


def images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_the_page_holds_the_tables_plots_grid_and_configs(page, runs):
    html = page.read_text().replace("\u00a0", " ")  # a cell of numbers breaks only between metrics
    assert html.startswith("<!DOCTYPE html>")
    assert f"<h3>Protocol: {PROTOCOL_LABEL}</h3>" in html
    assert "<td>FedAvg 20/5 LDA α=0.1</td>" in html and "62.0 ± 2.8 / 43.4 ± 2.0 / 300.0 ± 0.0 (n=2)" in html
    sections = ["tables", "convergence", "alpha", "predictions", "runs", "configs"]
    assert re.findall(r'<h2 id="([a-z]+)"', html) == sections
    pictures = images(html)
    assert len(pictures) == 3 == html.count("<img ")  # convergence, metric vs α, the prediction grid
    assert all(p.startswith(PNG) for p in pictures)
    assert "Not drawn" not in html
    # the grid names what it leaves out: the runs without model.pt
    assert "not shown: lda-0.1-s0 has no model.pt" in html
    # every run's config, collapsible
    assert html.count("<details ") == 6
    config = json.loads((runs[0] / "tiny" / "config.json").read_text())
    assert f"&quot;mode&quot;: &quot;{config['run']['mode']}&quot;" in html


def test_nothing_is_loaded_from_elsewhere(page):
    html = page.read_text()
    links = re.findall(r'(?:src|href|action|data)\s*=\s*"([^"]*)"', html)
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links)
    for external in ("<link", "<script", "@import", "url(", "http://", "https://", "<iframe", "<object"):
        assert external not in html.lower(), external
    assert f'content="{CONTENT_SECURITY_POLICY.replace(chr(39), "&#x27;")}"' in html


def test_markup_from_run_directories_is_escaped(page):
    html = page.read_text()
    assert "<script" not in html
    assert re.search(r"<[a-zA-Z][^<>]*\sonerror\s*=", html) is None  # no tag got an event handler
    assert "&lt;/pre&gt;&lt;script&gt;window.pwned = 1; console.error(&#x27;pwned&#x27;)&lt;/script&gt;" in html
    assert "evil&lt;b&gt;&quot;&amp;amp;" in html  # the directory name
    assert "Protocol: &lt;script&gt;alert(3)&lt;/script&gt;" in html  # a protocol name


@needs_chromium
def test_the_page_loads_in_headless_chromium_without_errors_and_every_image_renders(page, tmp_path):
    checked = check_page(page, chromium=CHROMIUM, screenshot=(1280, 900), evaluate={
        "scripts": "document.scripts.length",
        "pwned": "typeof window.pwned",
        "literal": f"document.body.textContent.includes({json.dumps(SCRIPT)})",
        "configs": "document.querySelectorAll('details pre').length",
    })  # fmt: skip
    assert checked.errors == [], checked.errors
    assert checked.entries == ()  # not even a warning on the console
    assert len(checked.images) == 3 and all(i.rendered for i in checked.images)
    assert all(i.natural_width >= 600 for i in checked.images)
    assert checked.values == {"scripts": 0, "pwned": "undefined", "literal": True, "configs": 6}
    assert checked.title.startswith("pchmr report · 6 runs in ")
    assert checked.screenshot is not None and checked.screenshot.startswith(PNG)
    from PIL import Image

    (tmp_path / "shot.png").write_bytes(checked.screenshot)
    width, height = Image.open(tmp_path / "shot.png").size
    assert width == 1280 and height > 2000  # the whole page, not the window


@needs_chromium
def test_the_browser_check_fails_a_broken_page(tmp_path):
    broken = tmp_path / "broken.html"
    good = base64.b64encode(PNG + b"not really").decode()
    broken.write_text(
        "<!DOCTYPE html><html><head><title>broken</title></head><body>"
        '<img src="missing.png" alt="missing file">'
        f'<img src="data:image/png;base64,{good}" alt="corrupt png">'
        "<script>console.error('reported'); undefinedFunction();</script></body></html>"
    )
    checked = check_page(broken, chromium=CHROMIUM)
    assert not checked.ok
    errors = "\n".join(checked.errors)
    assert "console error: reported" in errors
    assert "exception error: ReferenceError: undefinedFunction is not defined" in errors
    assert "net::ERR_FILE_NOT_FOUND" in errors
    assert "image did not render: src='missing.png'" in errors
    assert "alt='corrupt png'" in errors
    assert [i.rendered for i in checked.images] == [False, False]


@needs_chromium
def test_a_page_pchmr_renders_with_a_bad_figure_fails_the_check(tmp_path):
    """render_html refuses bytes that are no PNG; a page whose figure is cut short is caught by the browser."""
    with pytest.raises(ValueError, match="is not a PNG file"):
        PageFigure("x", "X", b"GIF89a", "x")
    cut = PageFigure("x", "X", PNG + b"\x00\x00\x00\rIHDR", "a truncated plot")
    page = tmp_path / "index.html"
    page.write_text(render_html(title="t", runs=[], blocks=[], figures=[cut]))
    checked = check_page(page, chromium=CHROMIUM)
    (error,) = [e for e in checked.errors if "alt='a truncated plot'" in e]
    assert error.startswith(
        "image did not render: src='data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==' alt='a truncated plot' "
        "complete=True naturalWidth=0"
    )


# -- the command's rules ---------------------------------------------------------------------
def test_html_and_out_share_the_rules_and_may_be_one_directory(runs, tmp_path):
    root, _ = runs
    lda = [str(root / f"lda-{a}-s{s}") for a in (0.1, 1) for s in (0, 1)]
    site = tmp_path / "site"
    result = CliRunner().invoke(app, ["report", *lda, "--out", str(site), "--formats", "md,alpha", "--html", str(site),
                                      "--grid-samples", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "metric_vs_alpha.png", "report.md"]
    html = (site / "index.html").read_text()
    assert 'id="predictions"' not in html  # --grid-samples 0: no grid on the page
    assert images(html)[1] == (site / "metric_vs_alpha.png").read_bytes()  # the same figure
    again = CliRunner().invoke(app, ["report", *lda, "--html", str(site)])
    assert again.exit_code == 2
    assert f"--html {site} is not empty (it holds index.html, metric_vs_alpha.png, report.md)" in one_line(again.output)
    replaced = CliRunner().invoke(app, ["report", *lda[:2], "--html", str(site), "--grid-samples", "0", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert "pchmr report · 2 runs in " in (site / "index.html").read_text()  # replaced; the other files stay
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "metric_vs_alpha.png", "report.md"]


def test_a_page_without_lda_runs_says_why_there_is_no_alpha_plot(runs, tmp_path):
    root, _ = runs
    result = CliRunner().invoke(app, ["report", str(root / "lda-0.1-s0"), str(root / "lda-0.1-s1"), "--html",
                                      str(tmp_path / "h"), "--grid-samples", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    html = one_line((tmp_path / "h" / "index.html").read_text())
    assert ("Not drawn: the metric-vs-α plot needs runs at 2 or more LDA α values; the runs give runs at one LDA α "
            "only (α=0.1)") in html  # fmt: skip
    assert len(images(html)) == 1  # the convergence plot


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--html", "FILE"], "--html FILE is a file, not a directory; choose another --html"),
        (
            ["--out", "OUT", "--formats", "alpha"],
            "metric_vs_alpha.png: the metric-vs-α plot needs runs at 2 or more "
            "LDA α values; the runs give no LDA-partitioned run",
        ),
        (["--grid-samples", "-1"], "--grid-samples must be a whole number >= 0, got -1"),
        (
            ["--out", "OUT", "--formats", "grid", "--grid-samples", "0"],
            "--formats grid draws --grid-samples test images per run: give 1 or more, got 0",
        ),
        (
            ["--out", "OUT", "--formats", "md,grid"],
            "predictions.png: no run to draw a prediction grid of: one has no model.pt",
        ),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, words):
    run = make_run(tmp_path, "one", (60.0, 40.0, 300.0))
    (tmp_path / "FILE").write_text("x")
    argv = ["report", str(run), *(str(tmp_path / a) if a in ("FILE", "OUT") else a for a in args)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert words.replace("FILE", str(tmp_path / "FILE")) in one_line(result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "one"]
