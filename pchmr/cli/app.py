"""The ``pchmr`` command line (typer + rich)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from pchmr.cli._options import parse_options

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="pchmr: federated, privacy-constrained 3D human mesh recovery.",
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

#: kind → the CLI option that selects it (for messages)
_METRIC_LABELS = {
    "mpjpe_mm": "MPJPE (mm)",
    "pa_mpjpe_mm": "PA-MPJPE (mm)",
    "mpvpe_mm": "MPVPE (mm)",
    "pck": "PCK@150mm",
}


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _parse_options(items: list[str], flag: str) -> dict[str, Any]:
    """``key=value`` pairs → dict, values parsed as int/float/bool when they look like one."""
    return parse_options(items, flag, _fail)


def _with_server_opt(options: dict[str, Any], server_opt: str) -> dict[str, Any]:
    """``--server-opt X`` is ``--strategy-option server-opt=X``; both with different values is an error."""
    given = options.get("server-opt")
    if given is not None and given != server_opt:
        raise _fail(f"--server-opt {server_opt} contradicts --strategy-option server-opt={given}; give one of them")
    return {**options, "server-opt": server_opt}


@app.command()
def run(
    backbone: Optional[str] = typer.Option(None, help="HMR backbone plugin (default fastmetro)."),
    variant: Optional[str] = typer.Option(None, help="Backbone size: S, M or L."),
    encoder: Optional[str] = typer.Option(None, help="CNN feature encoder of the backbone."),
    backbone_option: list[str] = typer.Option(
        [], "--backbone-option", help="Backbone option key=value (repeatable), e.g. encoder_norm=group, keep_ratio=0.5."
    ),
    init_from: Optional[Path] = typer.Option(
        None, help="Start from a trained model: a run directory (its model.pt) or a model file (fine-tuning)."
    ),
    encoder_weights: Optional[str] = typer.Option(
        None,
        help="CNN initialisation: 'public' (default: pretrained once on a public synthetic split, cached), "
        "a weights file in torchvision's layout (e.g. ImageNet ResNet-50), or 'none' (from scratch).",
    ),
    freeze_encoder: Optional[bool] = typer.Option(
        None,
        "--freeze-encoder/--train-encoder",
        help="Keep the CNN fixed or train it too (default: fixed exactly when pretrained weights are loaded).",
    ),
    input_size: Optional[int] = typer.Option(None, help="Square crop side in pixels."),
    body_model: Optional[str] = typer.Option(None, help="Body model plugin (default anny)."),
    smpl_dir: Optional[Path] = typer.Option(
        None, help="Folder with your own SMPL model files (for --body-model smpl)."
    ),
    dataset: Optional[str] = typer.Option(None, help="Dataset plugin, optionally NAME:PATH."),
    partitioner: Optional[str] = typer.Option(None, help="Client partitioner plugin (default iid)."),
    partition_option: list[str] = typer.Option(
        [], "--partition-option", help="Partitioner option key=value (repeatable)."
    ),
    mode: Optional[str] = typer.Option(None, help="federated (default), or a baseline: centralized, naive."),
    epochs: Optional[int] = typer.Option(None, help="Baselines: training epochs."),
    fraction: Optional[float] = typer.Option(
        None, help="Naive baseline: share of the training data (0.05, 0.10, 0.20)."
    ),
    strategy: Optional[str] = typer.Option(None, help="Aggregation strategy plugin (default fedavg)."),
    strategy_option: list[str] = typer.Option([], "--strategy-option", help="Strategy option key=value (repeatable)."),
    server_opt: Optional[str] = typer.Option(
        None,
        "--server-opt",
        help="fedopt/fedgh server optimiser: adam, yogi or adagrad (alias of --strategy-option server-opt=...).",
    ),
    privacy: Optional[str] = typer.Option(None, help="Privacy plugin wrapping the strategy (e.g. dp, secagg)."),
    privacy_option: list[str] = typer.Option([], "--privacy-option", help="Privacy option key=value (repeatable)."),
    clients: Optional[int] = typer.Option(None, help="Number of clients N."),
    per_round: Optional[int] = typer.Option(None, help="Clients sampled per round k (k <= N)."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds."),
    local_epochs: Optional[int] = typer.Option(None, help="Local epochs per round."),
    client_optimizer: Optional[str] = typer.Option(
        None,
        help="reset (a fresh AdamW each round, default) or keep (each client keeps its AdamW state for its next round).",
    ),
    batch_size: Optional[int] = typer.Option(None, help="Local batch size."),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate."),
    lr_schedule: Optional[str] = typer.Option(
        None, help="Learning rate over rounds (baselines: epochs): cosine (default, from lr down toward 0) or constant."
    ),
    loss_weight: list[str] = typer.Option(
        [],
        "--loss-weight",
        help="Loss weight override term=value (repeatable): joints_3d, reg_joints_3d, vertices, "
        "joints_2d, edge, normal, mesh_level, or a backbone term such as token_pruning.",
    ),
    num_train: Optional[int] = typer.Option(
        None, help="Training samples to use (all of the dataset when unset; synthetic renders 2000)."
    ),
    num_test: Optional[int] = typer.Option(None, help="Test samples to use (all when unset; synthetic renders 200)."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate the global model every N rounds."),
    seed: Optional[int] = typer.Option(None, help="Seed of partitions, sampling and initialisation."),
    engine: Optional[str] = typer.Option(None, help="Flower engine: simulation (Ray, default) or deployment."),
    superlink: Optional[str] = typer.Option(
        None, help="Deployment: HOST:PORT of a running SuperLink (default: start one on loopback)."
    ),
    root_certificates: Optional[Path] = typer.Option(None, help="Deployment: CA certificate for TLS to the SuperLink."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<time>-<setting>)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML or JSON file of options; flags override it."),
    scale: Optional[str] = typer.Option(
        None, "--scale", help="Apply the config file's [scale.NAME] overrides (e.g. smoke)."
    ),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
) -> None:
    """Run one experiment and write its run directory."""
    from pchmr.core.engine.config import ConfigError, RunConfig, load_config_file
    from pchmr.core.engine.registry import PluginError
    from pchmr.core.engine.run import execute, resume_config

    try:
        if resume is not None:
            cfg = resume_config(resume)
            run_dir: Path | None = resume
        else:
            if scale is not None and config is None:
                raise ConfigError("--scale needs --config: a scale is a table of overrides inside a config file")
            values: dict[str, Any] = load_config_file(config, scale=scale) if config else {}
            flags = {
                "backbone": backbone,
                "variant": variant,
                "encoder": encoder,
                "input_size": input_size,
                "encoder_weights": encoder_weights,
                "freeze_encoder": freeze_encoder,
                "init_from": str(init_from) if init_from else None,
                "body_model": body_model,
                "partitioner": partitioner,
                "strategy": strategy,
                "privacy": privacy,
                "clients": clients,
                "per_round": per_round,
                "rounds": rounds,
                "local_epochs": local_epochs,
                "client_optimizer": client_optimizer,
                "batch_size": batch_size,
                "lr": lr,
                "lr_schedule": lr_schedule,
                "num_train": num_train,
                "num_test": num_test,
                "eval_every": eval_every,
                "seed": seed,
                "out": str(out) if out else None,
                "mode": mode,
                "epochs": epochs,
                "fraction": fraction,
                "smpl_dir": str(smpl_dir) if smpl_dir else None,
                "engine": engine,
                "superlink": superlink,
                "root_certificates": str(root_certificates) if root_certificates else None,
            }
            values.update({k: v for k, v in flags.items() if v is not None})
            if dataset is not None:
                name, _, path = dataset.partition(":")
                values["dataset"], values["dataset_path"] = name, path or None
            if partition_option:
                values["partition_options"] = _parse_options(partition_option, "--partition-option")
            if strategy_option:
                values["strategy_options"] = _parse_options(strategy_option, "--strategy-option")
            if server_opt is not None:
                values["strategy_options"] = _with_server_opt(values.get("strategy_options", {}), server_opt)
            if privacy_option:
                values["privacy_options"] = _parse_options(privacy_option, "--privacy-option")
            if backbone_option:
                values["backbone_options"] = _parse_options(backbone_option, "--backbone-option")
            if loss_weight:
                values["loss_weights"] = _parse_options(loss_weight, "--loss-weight")
            cfg = RunConfig.from_dict(values)
            run_dir = None
        _run_with_progress(cfg, run_dir, resume is not None, execute)
    except (ConfigError, PluginError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except (FloatingPointError, RuntimeError) as exc:  # the run failed (diverged, a client failed): exit code 1
        raise _fail(f"{exc} (the run directory's run.log has the tracebacks)", code=1) from None


def _run_with_progress(cfg: Any, run_dir: Path | None, resume: bool, execute: Any) -> None:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    progress = Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
    unit, total = ("round", cfg.rounds) if cfg.mode == "federated" else ("epoch", cfg.epochs)
    progress.columns[0].text_format = f"[bold]{unit}"  # type: ignore[attr-defined]
    task = progress.add_task("rounds", total=total, status="starting")

    def on_round(report: Any) -> None:
        status = f"{report.seconds:5.1f} s"
        if report.metrics:
            status += "  " + "  ".join(
                f"{_METRIC_LABELS[k].split(' ')[0]} {report.metrics[k]:.1f}"
                for k in ("mpjpe_mm", "pa_mpjpe_mm", "mpvpe_mm")
            )
        progress.update(task, completed=report.server_round, status=status)

    def on_status(message: str) -> None:
        console.print(f"[dim]{message}[/]")

    with progress:
        result = execute(cfg, run_dir=run_dir, resume=resume, on_round=on_round, on_status=on_status)
    _print_final(result.final, result.run_dir.path, result.seconds)


def _print_final(final: dict[str, Any], path: Path, seconds: float) -> None:
    proto = final["protocol"]
    table = Table(
        title=f"Global model after {final.get('unit', 'round')} {final['round']}",
        caption=(
            f"protocol: {proto['dataset']} test · joints {proto['joint_set']} · {proto['alignment']} aligned · "
            f"body model {proto['body_model']} · {proto['ground_truth']} GT · PCK at 150 mm"
        ),
    )
    table.add_column("metric")
    table.add_column(f"{final.get('unit', 'round')} 0", justify="right")
    table.add_column("final", justify="right")
    table.add_column("mean-pose baseline", justify="right")
    baseline = {"mpjpe_mm": final.get("mean_pose_mpjpe_mm"), "pa_mpjpe_mm": final.get("mean_pose_pa_mpjpe_mm")}
    for key, label in _METRIC_LABELS.items():
        fmt = "{:.3f}" if key == "pck" else "{:.1f}"
        base = baseline.get(key)
        table.add_row(
            label, fmt.format(final["round0"][key]), fmt.format(final[key]), "—" if base is None else fmt.format(base)
        )
    console.print(table)
    if final.get("stopped"):
        console.print(f"[bold yellow]stopped early:[/] {final['stopped']}", highlight=False, soft_wrap=True)
    console.print(f"run directory: {path}  ({seconds:.0f} s)")


from pchmr.cli.report import report as _report  # noqa: E402  (registered below, after the app exists)

app.command(name="report")(_report)
app.command(name="plugins")(__import__("pchmr.cli.plugins", fromlist=["plugins"]).plugins)
app.command(name="partition")(__import__("pchmr.cli.partition", fromlist=["partition"]).partition)
app.add_typer(__import__("pchmr.cli.data", fromlist=["data_app"]).data_app, name="data")
app.add_typer(__import__("pchmr.cli.privacy", fromlist=["privacy_app"]).privacy_app, name="privacy")
app.command(name="annotate")(__import__("pchmr.cli.annotate", fromlist=["annotate"]).annotate)
app.command(name="personalize")(__import__("pchmr.cli.annotate", fromlist=["personalize"]).personalize)


def main() -> None:
    from pchmr.core.engine.perf import tune_allocator

    tune_allocator()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted; resume with `pchmr run --resume RUN_DIR`")
        sys.exit(130)


if __name__ == "__main__":
    main()
