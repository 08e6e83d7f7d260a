"""``pchmr data prepare`` and ``pchmr data check ROOT``: the real datasets' files and stores.

Registered on the app in :mod:`pchmr.cli.app` with ``app.add_typer(data_app, name="data")``.

* ``prepare --dataset NAME[:PATH]`` crops and caches a dataset for a crop size and body model
  (what ``pchmr run`` would do first), with a progress bar; an interrupted preparation resumes
  where it stopped. ``--verify`` re-checks every stored chunk against its checksum.
* ``check ROOT`` lists, per named dataset and layout, the expected files under ROOT, whether each
  is present (a missing file the loader can do without is marked optional) and where it is
  obtained, then the usable layouts — by the rule ``--dataset NAME:ROOT`` applies (``ExpectedFile.required``)
  — and the incomplete ones with what they lack. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pchmr.cli._output import console as _console
from pchmr.cli._output import fail as _fail

__all__ = ["data_app"]

data_app = typer.Typer(no_args_is_help=True, help="Prepare and check real datasets (SPIN npz, METRO TSV, 3DPW, COCO).")


@data_app.command()
def prepare(
    dataset: str = typer.Option(..., help="Dataset, NAME:PATH (spin-npz:FILE.npz, h36m:ROOT, h36m,coco:ROOT …)."),
    input_size: int = typer.Option(64, help="Square crop side in pixels (the backbone's input)."),
    body_model: str = typer.Option("anny", help="Body model whose joint set (and SMPL mesh) the store holds."),
    smpl_dir: Optional[Path] = typer.Option(None, help="Folder with your own SMPL files (for --body-model smpl)."),
    seed: int = typer.Option(0, help="Seed of single-file train/test splits and of --num-train/--num-test choices."),
    num_train: Optional[int] = typer.Option(None, help="Keep at most this many training samples."),
    num_test: Optional[int] = typer.Option(None, help="Keep at most this many test samples."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache folder (default $PCHMR_CACHE_DIR or ~/.cache/pchmr)."),
    verify: bool = typer.Option(False, help="Re-check every stored chunk against its SHA-256 afterwards."),
) -> None:
    """Crop and cache a dataset once (resumes an interrupted preparation)."""
    from pchmr.core.engine.components import build_components
    from pchmr.core.engine.config import ConfigError, RunConfig
    from pchmr.core.engine.registry import PluginError
    from pchmr.core.kit.store import PreparedStore, StoreError

    name, _, path = dataset.partition(":")
    try:
        config = RunConfig(dataset=name, dataset_path=path or None, input_size=input_size, body_model=body_model,
                           smpl_dir=str(smpl_dir) if smpl_dir else None, seed=seed, num_train=num_train,
                           num_test=num_test, cache_dir=str(cache_dir) if cache_dir else None)  # fmt: skip
        data = build_components(config, with_model=False).data
        stores = [v for k, v in data.extra.items() if k.endswith("_store")]
        if verify:
            for directory in stores:
                PreparedStore(directory).verify()
    except (ConfigError, PluginError, FileNotFoundError, StoreError, ValueError) as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"prepared {data.protocol.get('dataset', name)}")
    table.add_column("split")
    table.add_column("samples", justify="right")
    table.add_column("store")
    table.add_row("train", str(len(data.train)), str(data.extra.get("train_store", "(members)")))  # type: ignore[arg-type]
    table.add_row("test", str(len(data.test)), str(data.extra.get("test_store", "(members)")))  # type: ignore[arg-type]
    _console.print(table)
    if verify:
        _console.print(f"verified {len(stores)} store(s): every chunk matches its checksum")


@data_app.command()
def check(
    root: Path = typer.Argument(..., help="The data root holding the datasets (dataset_extras/, 3DPW/, coco/ …)."),
    dataset: list[str] = typer.Option([], "--dataset", help="Only these named datasets (repeatable)."),
) -> None:
    """List the expected files per dataset under ROOT: present, missing, and where to obtain them."""
    from pchmr.core.contracts.errors import DatasetFormatError
    from pchmr.core.engine.registry import PluginError, get_registry

    if not root.is_dir():
        raise _fail(f"{root}: not a folder; give the folder that holds (or will hold) the datasets")
    try:
        registry = get_registry()
        checkable = {
            name: registry.get("dataset", name)
            for name in registry.names("dataset")
            if callable(getattr(registry.get("dataset", name), "expected_files", None))
        }
        unknown = [name for name in dataset if name not in checkable]
        if unknown:
            raise DatasetFormatError(f"no named dataset {unknown[0]!r}; known: {', '.join(checkable)}")
        rows = [row for name in (dataset or list(checkable)) for row in checkable[name].expected_files(root)]
    except (DatasetFormatError, PluginError) as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"datasets under {root}")
    for column in ("dataset", "format", "file", "status"):
        table.add_column(column)
    layouts: dict[tuple[str, str], list] = {}
    for row in rows:
        status = (
            "[green]present[/]"
            if row.present
            else ("[red]missing[/]" if row.required else "[yellow]missing (optional)[/]")
        )
        rel = row.path.relative_to(root) if row.path.is_relative_to(root) else row.path
        table.add_row(row.dataset, row.format, f"{row.role}: {rel}", status)
        layouts.setdefault((row.dataset, row.format), []).append(row)
    _console.print(table)
    _console.print("[bold]where to obtain each layout[/] (nothing is downloaded):")
    for key in dict.fromkeys((r.dataset, r.format, r.obtain) for r in rows):
        _console.print(f"  {key[0]} ({key[1]}): {key[2]}", highlight=False)
    # one rule with the loaders: a layout is usable when its training file and every file it needs are there
    usable: dict[str, list[str]] = {}
    incomplete = []
    for (name, fmt), files in layouts.items():
        lacking = [f for f in files if f.required and not f.present]
        if any(f.role == "train" and f.present for f in files):
            if lacking:
                rel = [str(f.path.relative_to(root) if f.path.is_relative_to(root) else f.path) for f in lacking]
                incomplete.append(f"{name} ({fmt}: no {', '.join(rel)})")
            else:
                usable.setdefault(name, []).append(fmt)
    ready = ", ".join(f"{k} ({'/'.join(v)})" for k, v in usable.items()) or "none"
    _console.print(f"usable now: {ready}", highlight=False)
    if incomplete:
        _console.print(f"incomplete (not usable): {'; '.join(incomplete)}", highlight=False)
