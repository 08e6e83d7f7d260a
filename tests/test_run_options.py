"""One place per run option: ``pchmr run``'s flags come from ``RunConfig``'s field metadata.

The builder (``pchmr.cli.config_flags``) is exercised through the real typer app, on RunConfig
and on a small dataclass standing for "the next option someone adds".
"""

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pchmr.cli.app import app
from pchmr.cli.config_flags import GivenFlags, config_flags, with_config_flags
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.run_options import (
    KeyValues,
    NameAndPath,
    NotOnCli,
    PathValue,
    Shortcut,
    Switch,
    declared_option,
    run_option,
)

README = Path(__file__).resolve().parents[1] / "README.md"
WIDE = {"COLUMNS": "250"}


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def _run_flags() -> set[str]:
    """Every spelling of every option of ``pchmr run``, from the click command typer builds."""
    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)} - {"--help"}


def test_every_run_config_field_is_a_flag_of_pchmr_run_or_says_why_not():
    shown = set(re.findall(r"--[a-z0-9-]+", _help("run")))
    for field in dataclasses.fields(RunConfig):
        option = declared_option(field)
        if isinstance(option.cli, NotOnCli):
            assert len(option.cli.reason) > 10, f"{field.name}: say how it is set instead"
        else:
            assert option.flag_of(field.name) in shown, f"{field.name}: no {option.flag_of(field.name)} in --help"


def _readme_run_options_rows() -> list[str]:
    """The rows of README.md's table under "`pchmr run` options"."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("`pchmr run` options"))
    rows: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows[2:]  # after the header and the |---| line


def test_readme_run_options_table_lists_exactly_the_flags_of_pchmr_run():
    in_readme = {flag for row in _readme_run_options_rows() for flag in re.findall(r"--[a-z0-9-]+", row.split("|")[1])}
    assert _run_flags() - in_readme == set(), "flags of pchmr run missing from README.md's options table"
    assert in_readme - _run_flags() == set(), "README.md's options table names flags pchmr run does not have"


def test_readme_commands_table_lists_every_command():
    """Every command (and sub-app) of the pchmr app has a row in a table of README.md from "## Commands" on."""
    lines = README.read_text().splitlines()
    start = lines.index("## Commands")
    rows = [line for line in lines[start:] if line.startswith("| `pchmr ")]
    listed = {re.match(r"\| `pchmr ([a-z-]+)", row).group(1) for row in rows}
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert commands - listed == set(), "commands missing from README.md's command tables"
    assert listed - commands == set(), "README.md's command tables name commands pchmr does not have"


@dataclasses.dataclass(frozen=True)
class NextConfig:
    """Stands for RunConfig after someone adds options: one field each, nothing else."""

    warmup_rounds: int = run_option(0, help="Rounds at a rising learning rate.")
    ratio: float = run_option(0.5, help="A share.")
    tags: Mapping[str, Any] = run_option(
        factory=dict, flag="--tag", cli=KeyValues(shortcuts=(Shortcut("colour", "The tag colour."),)), help="Tags."
    )
    fast: bool | None = run_option(None, cli=Switch(off="--slow"), help="Go fast or slow.")
    data: str = run_option("toy", cli=NameAndPath(path_field="data_path"), help="Data plugin.")
    data_path: str | None = run_option(None, cli=NotOnCli("the PATH of --data NAME:PATH"), help="Data files.")
    weights: str | None = run_option(None, cli=PathValue(), help="A weights file.")


def _next_app(base: Mapping[str, Any]) -> tuple[typer.Typer, dict[str, Any]]:
    """A typer app whose command lays its NextConfig flags over ``base`` (a config file's values)."""
    seen: dict[str, Any] = {}
    next_app = typer.Typer()

    @next_app.command()
    @with_config_flags(NextConfig)
    def go(label: str = typer.Option("x", "--label"), *, flags: GivenFlags) -> None:
        seen.update(flags.over(base), label=label)

    @next_app.command()
    def other() -> None:  # a second command, so "go" is a subcommand as "run" is
        pass

    return next_app, seen


def test_a_field_declared_with_run_option_becomes_a_flag_with_its_help_and_default():
    next_app, _ = _next_app({})
    out = CliRunner().invoke(next_app, ["go", "--help"], env=WIDE).output
    for text in ("--warmup-rounds", "Rounds at a rising learning rate. [default: 0]", "--ratio", "FLOAT",
                 "--tag", "KEY=VALUE", "--colour", "alias of --tag colour=...", "--fast", "--slow",
                 "--data", "NAME[:PATH]", "--weights", "PATH", "--label"):  # fmt: skip
        assert text in out, f"{text!r} not in:\n{out}"
    assert "--data-path" not in out


def test_flags_are_read_as_their_fields_declare():
    next_app, seen = _next_app({})
    args = ["go", "--warmup-rounds", "3", "--tag", "a=3", "--tag", "b=0.5", "--tag", "c=true", "--tag", "d=text",
            "--slow", "--data", "npz:/d/x.npz", "--weights", "w.pt", "--label", "y"]  # fmt: skip
    result = CliRunner().invoke(next_app, args)
    assert result.exit_code == 0, result.output
    assert seen == {"warmup_rounds": 3, "tags": {"a": 3, "b": 0.5, "c": True, "d": "text"}, "fast": False,
                    "data": "npz", "data_path": "/d/x.npz", "weights": "w.pt", "label": "y"}  # fmt: skip


def test_unset_flags_leave_the_config_file_values_and_given_ones_win():
    base = {"warmup_rounds": 5, "ratio": 0.25, "tags": {"x": 1, "colour": "red"}, "data_path": "/keep"}
    next_app, seen = _next_app(base)
    result = CliRunner().invoke(next_app, ["go", "--ratio", "0.75", "--data", "other"])
    assert result.exit_code == 0, result.output
    assert seen == {"warmup_rounds": 5, "ratio": 0.75, "tags": {"x": 1, "colour": "red"}, "data": "other",
                    "data_path": None, "label": "x"}  # fmt: skip


def test_key_value_flags_replace_the_file_table_and_a_shortcut_sets_one_key_of_it():
    next_app, seen = _next_app({"tags": {"x": 1}})
    assert CliRunner().invoke(next_app, ["go", "--colour", "blue"]).exit_code == 0
    assert seen["tags"] == {"x": 1, "colour": "blue"}
    assert CliRunner().invoke(next_app, ["go", "--tag", "y=2", "--colour", "blue"]).exit_code == 0
    assert seen["tags"] == {"y": 2, "colour": "blue"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy-option", "server-opt=yogi", "--server-opt", "adam"],
         "--server-opt adam contradicts --strategy-option server-opt=yogi; give one of them"),
        (["--backbone-option", "dropout"], "--backbone-option expects key=value (e.g. --backbone-option name=3), got 'dropout' (no '=')"),
        (["--loss-weight", "edge"], "--loss-weight expects key=value (e.g. --loss-weight name=3), got 'edge' (no '=')"),
    ],
)  # fmt: skip
def test_pchmr_run_refuses_malformed_or_contradicting_option_flags(tmp_path, args, message):
    result = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path / "r")], env=WIDE)
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")
    assert not (tmp_path / "r").exists()


def test_a_field_without_command_line_metadata_is_refused_when_the_flags_are_built():
    @dataclasses.dataclass(frozen=True)
    class Undeclared:
        rounds: int = 3

    with pytest.raises(TypeError, match=r"field 'rounds' has no command-line metadata: declare it with run_option"):
        config_flags(Undeclared)


@pytest.mark.parametrize(
    "annotation, cli, message",
    [
        (int, KeyValues(), r"field 'x' reads key=value pairs but is a <class 'int'>, not a mapping"),
        (str, Switch(off="--no-x"), r"field 'x' is a --flag/--off switch but is a <class 'str'>, not a bool"),
        (list, None, r"field 'x' is a <class 'list'>: a plain flag reads str, int, float"),
        (str, NameAndPath(path_field="nowhere"), r"puts its PATH into 'nowhere', which must be a field without a flag"),
    ],
)
def test_metadata_that_does_not_fit_the_field_type_is_refused(annotation, cli, message):
    kwargs = {"help": "x."} if cli is None else {"help": "x.", "cli": cli}
    config = dataclasses.make_dataclass("Bad", [("x", annotation, run_option(None, **kwargs))], frozen=True)
    with pytest.raises(TypeError, match=message):
        config_flags(config)


def test_pchmr_partition_takes_its_run_options_from_the_same_fields():
    out = _help("partition")
    for flag in ("--dataset", "--partitioner", "--partition-option", "--clients", "--seed", "--num-train"):
        assert flag in out
    line = next(row for row in out.splitlines() if "--partition-option" in row)
    assert " ".join(line.strip("│ ").split()) in " ".join(_help("run").split())
