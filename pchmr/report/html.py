"""``pchmr report --html DIR``: one static page of a set of runs, ``DIR/index.html``.

The page needs no server and loads nothing from elsewhere: its CSS is inline, its pictures are
PNG ``data:`` URIs, and it has no script at all. Its Content-Security-Policy (a ``<meta>``) allows
exactly that (``default-src 'none'; img-src data:; style-src 'unsafe-inline'``), so a browser
would refuse a script even if one got in. Run directories are other people's files: every text
that comes from them (paths, config values, protocol names, labels) is escaped with
:func:`html.escape`, attributes included, and configs are shown as JSON inside ``<pre>``.

:func:`render_html` is a pure function of what the page shows: :class:`TableBlock` s (the result
tables, one per protocol: :func:`report_blocks` for run directories, :func:`sweep_blocks` for a
sweep), warnings and notes, :class:`PageFigure` s (a PNG, or the message saying why it was not
drawn), the runs (a table of them) and their ``config.json`` (one collapsible ``<details>`` each).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pchmr.report.tables import (
    UNFINISHED_MARK,
    Report,
    RunSummary,
    model_label,
    protocol_label,
    run_names,
    setting_label,
)

if TYPE_CHECKING:
    from pchmr.report.sweep import SweepReport

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "PageFigure",
    "TableBlock",
    "render_html",
    "report_blocks",
    "report_title",
    "sweep_blocks",
]

#: The page's policy: no script, no request; only its own inline styles and data: images.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class TableBlock:
    """One table of the page: a title (its protocol), a header row and body rows of text, the
    first ``left`` columns left-aligned (the rest are numbers), a caption under it."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    left: int = 1
    caption: str = ""


@dataclass(frozen=True)
class PageFigure:
    """A figure of the page: ``png`` (the file's bytes), or None and ``message`` saying why there
    is none; ``notes`` listed under it (e.g. the runs a plot leaves out)."""

    anchor: str
    title: str
    png: bytes | None
    alt: str
    caption: str = ""
    message: str = ""
    notes: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.png is not None and not self.png.startswith(PNG_MAGIC):
            raise ValueError(f"figure '{self.title}' is not a PNG file")


def report_blocks(report: Report) -> list[TableBlock]:
    """The tables of :func:`~pchmr.report.tables.build_report`'s result, one per protocol."""
    from pchmr.report.tables import CELL_TITLE

    return [
        TableBlock(f"Protocol: {t.protocol_label}", t.headers(), [t.row_texts(r) for r in t.rows], 1, CELL_TITLE)
        for t in report.tables
    ]


def sweep_blocks(report: SweepReport) -> list[TableBlock]:
    """A sweep's tables: per protocol its rows (mean ± 95 % CI) and, with a baseline, the paired
    differences."""
    from pchmr.report.sweep import DIFF_HEADER, EXCLUDES_ZERO, MAIN_HEADER, diff_rows, main_rows

    blocks = []
    for table in report.tables:
        blocks.append(TableBlock(f"Protocol: {table.protocol_label}", MAIN_HEADER, main_rows(table), 2,
                                 f"mean ± {report.confidence * 100:g} % CI over seeds (Student's t, n − 1 dof)"))  # fmt: skip
        diffs = diff_rows(table)
        if diffs:
            blocks.append(TableBlock(f"Paired difference vs {table.baseline} (row − {table.baseline}, matched by seed)",
                                     DIFF_HEADER, diffs, 1,
                                     f"{EXCLUDES_ZERO}: the {report.confidence * 100:g} % interval excludes 0"))  # fmt: skip
    return blocks


def _e(text: object) -> str:
    """``text`` escaped for HTML text and attribute values (quotes included)."""
    return html.escape(str(text), quote=True)


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1400px; margin: 0 auto; padding: 1.5em 2em 4em; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; }
nav a { margin-right: 1.2em; }
.meta, .caption, figcaption, .note { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.4em 0 0.3em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d6d6d6; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f3f4f6; text-align: left; }
td.num { text-align: right; }
td.name, th:first-child, td:first-child { white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
tbody tr:nth-child(even) { background: #fafafa; }
.warning { background: #fff7e0; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; margin: 0.4em 0; }
.skipped { background: #f3f4f6; border-left: 4px solid #888; padding: 0.5em 0.8em; }
figure { margin: 0.6em 0 1.4em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
details { margin: 0.3em 0; }
summary { cursor: pointer; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 12px; }
code { font-size: 0.95em; }
"""


def _numbers(text: str) -> str:
    """A cell of numbers that breaks only between its metrics (``" / "``) and before ``" @ "``:
    ``"62.0 ± 2.8 / 43.4 ± 2.0 (n=2) @ rounds 3, 3"``, each part kept on one line."""
    head, *where = text.split(" @ ")
    parts = [p.replace(" ", "\u00a0") for p in head.split(" / ")]
    return " @ ".join([" / ".join(parts), *(w.replace(" ", "\u00a0") for w in where)])


def _table(block: TableBlock) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in block.headers)
    body = []
    for row in block.rows:
        cells = "".join(f"<td>{_e(c)}</td>" if i < block.left else f'<td class="num">{_e(_numbers(c))}</td>'
                        for i, c in enumerate(row))  # fmt: skip
        body.append(f"<tr>{cells}</tr>")
    caption = f'<p class="caption">{_e(block.caption)}</p>' if block.caption else ""
    return (f'<h3>{_e(block.title)}</h3>\n<div class="scroll"><table><thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + f"\n</tbody></table></div>\n{caption}")  # fmt: skip


def _figure(fig: PageFigure) -> str:
    parts = [f'<h2 id="{_e(fig.anchor)}">{_e(fig.title)}</h2>']
    if fig.png is not None:
        data = base64.b64encode(fig.png).decode("ascii")
        caption = f"<figcaption>{_e(fig.caption)}</figcaption>" if fig.caption else ""
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_e(fig.alt)}">{caption}</figure>')
    else:
        parts.append(f'<p class="skipped">Not drawn: {_e(fig.message)}</p>')
    if fig.notes:
        parts.append('<ul class="note">' + "".join(f"<li>{_e(n)}</li>" for n in fig.notes) + "</ul>")
    return "\n".join(parts)


def _metric(run: RunSummary, key: str) -> str:
    value = run.metric(key)
    return "—" if value is None else f"{value:.1f}"


def _runs_table(runs: Sequence[RunSummary]) -> str:
    names = run_names(runs)
    headers = ["run directory", "setting", "model", "seed", "protocol", "status", "MPJPE (mm)", "PA-MPJPE (mm)"]
    rows = []
    for i, run in enumerate(runs):
        status = (f"finished, {run.unit} {run.final.get('round', '?')}" if run.finished
                  else f"unfinished{UNFINISHED_MARK}, last evaluated {run.unit} {run.final.get('round', '?')}")  # fmt: skip
        cells = [
            f'<td class="name"><a href="#config-{i}" title="{_e(run.path)}"><code>{_e(names[run.path])}</code></a></td>',
            f"<td>{_e(setting_label(run.config))}</td>",
            f'<td class="name">{_e(model_label(run.config))}</td>',
            f'<td class="num">{_e(run.config.seed)}</td>',
            f"<td>{_e(protocol_label(run.protocol))}</td>",
            f"<td>{_e(status)}</td>",
            f'<td class="num">{_e(_metric(run, "mpjpe_mm"))}</td>',
            f'<td class="num">{_e(_metric(run, "pa_mpjpe_mm"))}</td>',
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(rows)
        + "\n</tbody></table></div>"
    )


def _config_text(run: RunSummary) -> str:
    """The run's ``config.json`` as indented JSON (read again: the page shows the file, not pchmr's reading)."""
    path = run.path / "config.json"
    try:
        return json.dumps(json.loads(path.read_text()), indent=2, ensure_ascii=False, default=str)
    except (OSError, ValueError) as exc:
        return f"cannot read {path}: {exc}"


def _configs(runs: Sequence[RunSummary]) -> str:
    parts = []
    names = run_names(runs)
    for i, run in enumerate(runs):
        summary = (
            f"<code>{_e(names[run.path])}</code> — {_e(setting_label(run.config))} · {_e(model_label(run.config))}"
        )
        parts.append(f'<details id="config-{i}"><summary>{summary}</summary>\n<p class="meta">{_e(run.path)}/config.json'
                     f"</p>\n<pre>{_e(_config_text(run))}</pre></details>")  # fmt: skip
    return "\n".join(parts)


def render_html(
    *,
    title: str,
    runs: Sequence[RunSummary],
    blocks: Sequence[TableBlock],
    figures: Sequence[PageFigure] = (),
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
    subtitle: str = "",
) -> str:
    """The page (module docstring) as one HTML document."""
    nav = ['<a href="#tables">Tables</a>', *(f'<a href="#{_e(f.anchor)}">{_e(f.title)}</a>' for f in figures),
           '<a href="#runs">Runs</a>', '<a href="#configs">Configs</a>']  # fmt: skip
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{_e(subtitle)}</p>' if subtitle else "",
        f"<nav>{''.join(nav)}</nav>",
        '<h2 id="tables">Tables</h2>',
        *(_table(block) for block in blocks),
        *(f'<p class="warning">Warning: {_e(w)}</p>' for w in warnings),
        '<ul class="note">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>" if notes else "",
        *(_figure(fig) for fig in figures),
        f'<h2 id="runs">Runs ({len(runs)})</h2>',
        _runs_table(runs),
        '<h2 id="configs">Configs</h2>',
        '<p class="note">Each run\'s config.json (resolved options, plugins, protocol), as the run wrote it.</p>',
        _configs(runs),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CONTENT_SECURITY_POLICY)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )


def report_title(paths: Sequence[Path]) -> str:
    """``"pchmr report · 11 runs in /work/runs"`` (the runs' common parent, when they have one)."""
    parents = {p.parent for p in paths}
    where = f" in {next(iter(parents))}" if len(parents) == 1 else ""
    return f"pchmr report · {len(paths)} run{'s' if len(paths) != 1 else ''}{where}"
