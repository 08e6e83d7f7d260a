"""``pchmr annotate-compare DIR... --out FIG``: the fits of several ``pchmr annotate`` outputs of
the same images side by side (the PCHMR paper's Fig. 6: DePoser beside SMPLify-X), front and side
view each, the ground truth when the images were synthetic (:mod:`pchmr.report.annotation_figures`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pchmr.cli._options import check_number
from pchmr.cli._outdir import OVERWRITE_HELP, check_out_dir, output_dir
from pchmr.cli._output import RUN_FAILED, console
from pchmr.cli._output import fail as _fail
from pchmr.core.kit.atomic import WriteError

__all__ = ["annotate_compare"]


def annotate_compare(
    annotations: list[Path] = typer.Argument(
        ..., help="pchmr annotate --out directories of the same images (e.g. deposer's, then smplifyx's)."
    ),
    out: Path = typer.Option(..., help="Directory for <image>.png, overview.png and figures.json."),
    size: int = typer.Option(256, help="Side of one panel in pixels."),
    overview: int = typer.Option(8, help="Images stacked in overview.png (0: none)."),
    smpl_dir: Optional[Path] = typer.Option(
        None, help="Your SMPL files (for annotations made with --body-model smpl)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Draw the fits of several annotations of the same images side by side, front and side view.

    Images are matched by name; per image the image, each annotation's mesh over it and turned 90°
    (the ground truth under it when known); an overview of the first images; figures.json."""
    from pchmr.core.engine.registry import PluginError

    for problem in (check_number("--size", size, 32, whole=True), check_number("--overview", overview, 0, whole=True)):
        if problem:
            raise _fail(problem)
    check_out_dir(out, overwrite)
    inside = [str(path) for path in annotations if path.resolve() == out.resolve()]
    if inside:
        raise _fail(f"--out {out} is one of the annotations it would draw; choose another --out")
    faces: dict[str, object] = {}

    def faces_for(body_model: str):
        from pchmr.cli.annotate import _body_model
        from pchmr.core.kit.cache import default_cache_dir

        if body_model not in faces:
            faces[body_model] = _body_model(body_model, default_cache_dir(), smpl_dir).faces.cpu().numpy()
        return faces[body_model]

    try:
        from pchmr.report.annotation_figures import match_images, name_columns, open_annotation, write_figures

        opened = [open_annotation(path, faces_for) for path in annotations]
        name_columns(opened)
        match_images(opened)  # refused before --out is made
        with output_dir(out, overwrite):
            summary = write_figures(opened, out, size=size, overview=overview)
    except WriteError as exc:
        raise _fail(str(exc), code=RUN_FAILED) from None
    except (ValueError, FileNotFoundError, KeyError, PluginError) as exc:
        raise _fail(str(exc)) from None
    for path, ids in summary["only_in"].items():
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        console.print(f"[yellow]{len(ids)} image(s) annotated in {path} but not in every annotation, left out: {shown}")
    for name, means in summary["mean"].items():
        console.print(f"{name}: " + ", ".join(f"{key} {value:.2f}" for key, value in means.items()))
    console.print(f"drew {summary['images']} images → {out}")
