"""``pchmr privacy budget``: plan a differential-privacy budget before training.

ε of T rounds of the sampled Gaussian mechanism (sample rate q, noise multiplier z) at δ, from
:mod:`pchmr.core.kit.accounting`; or, given ``--target-epsilon`` instead of ``--noise-multiplier``,
the smallest z that keeps ε at or below the target (bisection).

Client-level DP-FedAvg: q = k/N (clients per round / clients), one step per round. Example-level
DP-SGD: q = B/n (batch / a client's examples) and ``--steps-per-round`` = local steps per round.
"""

from __future__ import annotations

import math
from typing import Optional

import typer

from pchmr.cli._options import check_number
from pchmr.cli._output import fail as _fail
from pchmr.core.kit.accounting import (
    DEFAULT_ORDERS,
    epsilon_from_rdp,
    noise_multiplier_for_epsilon,
    rdp_curve,
)

#: the noise multiplier is printed with 4 decimals
PRINT_SCALE = 1e4

privacy_app = typer.Typer(no_args_is_help=True, help="Differential privacy: plan an (ε, δ) budget.")


@privacy_app.command()
def budget(
    sample_rate: float = typer.Option(
        ..., "--sample-rate", help="q: clients per round / clients (k/N), or B/n for DP-SGD."
    ),
    rounds: int = typer.Option(..., "--rounds", help="T: federated rounds."),
    delta: float = typer.Option(1e-5, "--delta", help="δ (below 1/N for N protected units)."),
    noise_multiplier: Optional[float] = typer.Option(
        None, "--noise-multiplier", help="z: noise std / clip norm; prints ε."
    ),
    target_epsilon: Optional[float] = typer.Option(None, "--target-epsilon", help="ε to reach; prints the z needed."),
    steps_per_round: int = typer.Option(
        1, "--steps-per-round", help="Mechanism steps per round (DP-SGD: local steps)."
    ),
) -> None:
    """Print ε after T rounds, or the noise multiplier a target ε needs."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise _fail(
            "give exactly one of --noise-multiplier (prints ε) and --target-epsilon (prints the noise multiplier)"
        )
    checks = [
        check_number("--sample-rate", sample_rate, 0, 1, low_open=True),
        check_number("--rounds", rounds, 1, whole=True),
        check_number("--steps-per-round", steps_per_round, 1, whole=True),
        check_number("--delta", delta, 0, 1, low_open=True, high_open=True),
    ]
    if noise_multiplier is not None:
        checks.append(check_number("--noise-multiplier", noise_multiplier, 0, low_open=True))
    if target_epsilon is not None:
        checks.append(check_number("--target-epsilon", target_epsilon, 0, low_open=True))
    for problem in checks:
        if problem:
            raise _fail(problem)
    steps = rounds * steps_per_round
    try:
        if noise_multiplier is not None:
            eps, order = epsilon_from_rdp(DEFAULT_ORDERS, rdp_curve(sample_rate, noise_multiplier, steps), delta)
            typer.echo(
                f"epsilon = {eps:.4f} at delta = {delta:g} after {rounds} round(s) "
                f"(q = {sample_rate:g}, z = {noise_multiplier:g}, {steps} step(s); best Renyi order {order:g})"
            )
        else:
            found = noise_multiplier_for_epsilon(target_epsilon, sample_rate, steps, delta)  # type: ignore[arg-type]
            z = math.ceil(found * PRINT_SCALE) / PRINT_SCALE  # rounded up: the printed z still meets the target
            eps, _ = epsilon_from_rdp(DEFAULT_ORDERS, rdp_curve(sample_rate, z, steps), delta)
            typer.echo(
                f"noise multiplier = {z:.4f} keeps epsilon <= {target_epsilon:g} at delta = {delta:g} after {rounds} "
                f"round(s) (q = {sample_rate:g}, {steps} step(s); epsilon = {eps:.4f})"
            )
    except ValueError as exc:
        raise _fail(str(exc)) from None
