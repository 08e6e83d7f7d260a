"""``pchmr profile``'s table in the layout of the PCHMR paper's Table 13, and its Markdown file.

:func:`table13` turns profile rows (:class:`~pchmr.core.engine.profile.ProfileResult`) into a header
and string cells: Model, Device, then Throughput (img/s) and Time (s) of the 100- and the
1000-client partition, as the paper prints them, followed by what the paper states in prose or not
at all: the step rate without Lightning's per-fit cost and that cost per round, inference img/s,
bytes per round and their upload seconds, peak memory. The terminal (``cli/profile.py``) and
:func:`to_markdown` both render it, so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pchmr.core.engine.profile import PAPER_TABLE13, ProfileResult

__all__ = ["device_label", "table13", "to_markdown"]


def device_label(row: ProfileResult) -> str:
    """``CPU (AMD EPYC) · 2 threads · 32-true``, or ``NVIDIA RTX A6000 · bf16-mixed``."""
    threads = f" · {row.threads} thread{'s' if row.threads != 1 else ''}" if row.threads is not None else ""
    return f"{row.device}{threads} · {row.precision}"


def table13(rows: Sequence[ProfileResult]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """``(header, cells)`` of the profile rows (all measured at the same settings); a header is
    (group, name), e.g. ``("100 partition (4000 img)", "img/s")``, the group empty when it has none."""
    if not rows:
        raise ValueError("a profile table needs at least one measured backbone")
    images, uplink = rows[0].images, rows[0].uplink_mbps
    hundred, thousand = f"100 partition ({images['100']} img)", f"1000 partition ({images['1000']} img)"
    header = [
        ("", "Model"),
        ("", "Device"),
        (hundred, "img/s"),
        (hundred, "s"),
        (thousand, "img/s"),
        (thousand, "s"),
        ("step", "img/s"),
        ("fit overhead", "s/round"),
        ("inference", "img/s"),
        ("per round", "MB"),
        (f"upload @ {uplink:g} Mb/s", "s"),
        ("peak RSS", "MiB"),
        ("CUDA max", "MiB"),
    ]
    cells = [
        [
            row.model,
            device_label(row),
            f"{row.img_s['100']:.2f}",
            f"{row.seconds['100']:.1f}",
            f"{row.img_s['1000']:.2f}",
            f"{row.seconds['1000']:.1f}",
            f"{row.step_img_s:.2f}",
            f"{row.fit_overhead_s:.2f}",
            f"{row.infer_img_s:.1f}",
            f"{row.bytes_per_round / 1e6:.1f}",
            f"{row.upload_seconds:.1f}",
            f"{row.peak_rss_mb:.0f}",
            "—" if row.cuda_max_allocated_mb is None else f"{row.cuda_max_allocated_mb:.0f}",
        ]
        for row in rows
    ]
    return header, cells


def _markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub Markdown table, the first two columns left-aligned, numbers right."""
    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    return ["| " + " | ".join(line) + " |" for line in (header, align, *cells)]


def to_markdown(rows: Sequence[ProfileResult], meta: Mapping[str, Any]) -> str:
    """The Markdown file ``pchmr profile`` writes: the table, how it was measured (``meta``: the
    command, device, threads, torch, load), and the paper's Table 13 beside it."""
    header, cells = table13(rows)
    first = rows[0]
    lines = [
        "# On-device profile (the PCHMR paper's Table 13 layout)",
        "",
        f"`{meta.get('command', 'pchmr profile')}`",
        "",
        *_markdown_table([f"{group} {name}".strip() for group, name in header], cells),
        "",
        f"* {first.encoder} encoder at {first.input_size} px, batch {first.batch_size}, {first.precision}; "
        f"device {first.device}" + (f", {first.threads} torch threads" if first.threads is not None else "") + ";",
        f"* one client's 5 local rounds (a fresh Trainer and AdamW each) over {first.images['100']} and "
        f"{first.images['1000']} images: the 100- and 1000-client partitions' Throughput and Time; step img/s is "
        "the median optimizer step alone, fit overhead the rest of a round (Trainer, set-up, batches);",
        "* MB per round is the model each way; peak RSS is the process's high-water mark while the backbone ran;",
        f"* pchmr {meta.get('pchmr', '?')}, torch {meta.get('torch', '?')}; load average before/after: "
        f"{meta.get('load_before', '?')} / {meta.get('load_after', '?')}; {meta.get('seconds', '?')} s in all.",
        "",
        "The paper's Table 13 (4,000 and 400 images, FastMETRO-S and TORE-S with their ResNet-50, 224 px):",
        "",
        *_markdown_table(
            ["Model", "Device", "100 partition img/s", "100 partition s", "1000 partition img/s", "1000 partition s"],
            [[str(value) for value in paper] for paper in PAPER_TABLE13],
        ),
        "",
    ]
    return "\n".join(lines)
