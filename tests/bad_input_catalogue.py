"""The bad-input catalogue (issue 20, item 7): one table of inputs every ``pchmr`` command must
refuse cleanly.

Each :class:`Case` is one invocation of ``pchmr ARGV...`` in an empty working directory (the
*workspace*) after its ``setup`` has put files there, with:

* ``code``: the exit code it must end with (2: input refused before anything ran);
* ``words``: fragments the output must contain (compared with the whitespace normalised and
  rich's panel borders removed): what was wrong (the option, file, line or key, and the value)
  and what was expected;
* ``keep``: the files the case is about, which must be byte-identical afterwards. Beyond them
  every case checks the whole workspace: a refused command changes no file and creates nothing
  (no half-made ``--out``, no ``runs/``), and ``absent`` names paths outside it that must still
  not exist.

No case may print a traceback. The table is read by ``tests/test_bad_inputs.py`` (in-process,
through typer's ``CliRunner``) and by ``scripts/bad_inputs_census.py`` (as subprocesses of any
checkout's ``pchmr``, counting tracebacks, wrong exit codes, missing words and disk changes).

Setups use NumPy, torch and the standard library only, and a finished run directory built once
(``base``: the smallest naive baseline, :data:`BASE_RUN_ARGS`), which cases copy and damage.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BASE_RUN_ARGS", "CASES", "READ_ONLY", "SMALL", "Case", "normalise", "read_only_is_writable"]

#: A run small enough to render and partition in a second or two, for cases refused after the
#: data are prepared (a fresh cache renders only these samples).
SMALL = ("--num-train", "16", "--num-test", "8", "--encoder-weights", "none")
#: The finished run directory every run-directory case starts from: a naive baseline (no Ray),
#: one epoch on 8 samples, the CNN from scratch (no public pretraining).
BASE_RUN_ARGS = (
    "run", "--mode", "naive", "--fraction", "0.5", "--epochs", "1", "--batch-size", "8",
    *SMALL,
)  # fmt: skip
#: Where nothing can be created, even by root (a container's /sys); cases writing there are
#: skipped when it is writable.
READ_ONLY = Path("/sys")


def read_only_is_writable() -> bool:
    """Whether this process can create a directory in :data:`READ_ONLY` after all (then the cases
    that need an unwritable folder are skipped)."""
    probe = READ_ONLY / "pchmr-catalogue-probe"
    try:
        probe.mkdir()
    except OSError:
        return False
    probe.rmdir()
    return True


Setup = Callable[[Path, Path], None]  # (workspace, finished base run directory)


@dataclass(frozen=True)
class Case:
    """One bad input: ``pchmr *argv`` after ``setup`` (each called with the workspace and the base
    run) must exit ``code`` with every one of ``words`` in its output, change nothing in the
    workspace (``keep``: the files it is about), create none of ``absent``, print no traceback."""

    id: str
    argv: tuple[str, ...]
    words: tuple[str, ...]
    code: int = 2
    setup: tuple[Setup, ...] = ()
    keep: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()

    @property
    def needs_read_only(self) -> bool:
        """Whether the case writes under :data:`READ_ONLY` (skipped where that is writable)."""
        return any(arg.startswith(str(READ_ONLY) + "/") for arg in self.argv)

    @property
    def command(self) -> str:
        words = [a for a in self.argv[:2] if not a.startswith("-")]
        return " ".join(words[:2] if words[:1] in (["data"], ["privacy"]) else words[:1])


def normalise(text: str) -> str:
    """``text`` with rich's panel borders removed and every run of whitespace one space."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


# -- setups ---------------------------------------------------------------------------------------
#: Files of the base run at least this large are hard-linked into a case's copy, not copied (a
#: checkpoint is ~120 MB). Every setup replaces a file (unlink, then write) rather than writing into
#: it; pchmr replaces the files it writes atomically. A census of a checkout that may write into a
#: file in place sets this to None (real copies).
LINK_FROM_BYTES: int | None = 1 << 20


def _fresh(path: Path) -> Path:
    """``path``, ready to be written as a new file (its parent made, a hard link to the base dropped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return path


def write(name: str, content: str | bytes) -> Setup:
    def make(ws: Path, base: Path) -> None:
        _fresh(ws / name).write_bytes(content.encode() if isinstance(content, str) else content)

    return make


def folder(name: str) -> Setup:
    def make(ws: Path, base: Path) -> None:
        (ws / name).mkdir(parents=True, exist_ok=True)

    return make


def run_copy(name: str = "run", edit: Callable[[Path], None] | None = None) -> Setup:
    """A copy of the finished base run as ``name``, then ``edit(copy)``."""

    def copy(source: str, target: str) -> None:
        if LINK_FROM_BYTES is not None and os.path.getsize(source) >= LINK_FROM_BYTES:
            os.link(source, target)
        else:
            shutil.copy2(source, target)

    def make(ws: Path, base: Path) -> None:
        shutil.copytree(base, ws / name, copy_function=copy)
        if edit is not None:
            edit(ws / name)

    return make


def edit_config(**changes: object) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        data = json.loads((run / "config.json").read_text())
        data["run"].update(changes)
        _fresh(run / "config.json").write_text(json.dumps(data, indent=2))

    return apply


def replace_file(relative: str, content: str | bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = run / relative
        data = content(path.read_bytes()) if callable(content) else content
        _fresh(path).write_bytes(data.encode() if isinstance(data, str) else data)

    return apply


def cut(keep: int) -> Callable[[bytes], bytes]:
    return lambda data: data[:keep]


def cut_rounds_line(data: bytes) -> bytes:
    """rounds.jsonl with its last record cut in the middle (no final newline)."""
    lines = data.decode().splitlines()
    return ("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2]).encode()


def break_rounds_line(data: bytes) -> bytes:
    """rounds.jsonl with its second record no longer JSON."""
    lines = data.decode().splitlines()
    lines[1] = lines[1].replace(":", "", 1)
    return ("\n".join(lines) + "\n").encode()


def torch_file(name: str, value: object) -> Setup:
    def make(ws: Path, base: Path) -> None:
        import torch

        torch.save(value, _fresh(ws / name))

    return make


class _RunsCode:
    """Unpickles as ``os.system("touch ran")``: what a crafted file would do under plain pickle."""

    def __reduce__(self) -> tuple[object, ...]:
        return os.system, ("touch ran-code",)


def crafted_torch(name: str) -> Setup:
    """A torch file (zip) whose pickle asks to call ``os.system``."""

    def make(ws: Path, base: Path) -> None:
        import torch

        torch.save({"state": _RunsCode()}, _fresh(ws / name))

    return make


def npz(name: str, **arrays: np.ndarray) -> Setup:
    def make(ws: Path, base: Path) -> None:
        np.savez(_fresh(ws / name), **arrays)  # type: ignore[arg-type]

    return make


def spin_arrays(n: int = 2, **changes: np.ndarray) -> dict[str, np.ndarray]:
    """A SPIN .npz's arrays for ``n`` samples (images a.jpg, b.jpg, ...), with ``changes``."""
    arrays = {
        "imgname": np.array([f"{chr(97 + i)}.jpg" for i in range(n)]),
        "center": np.full((n, 2), 32.0),
        "scale": np.full(n, 0.3),
        "part": np.ones((n, 24, 3)),
        "S": np.ones((n, 24, 4)),
    }
    return {**arrays, **changes}


def object_npz(name: str) -> Setup:
    """A SPIN .npz whose 'imgname' is an object array (a pickle inside the archive)."""

    def make(ws: Path, base: Path) -> None:
        arrays = spin_arrays()
        arrays["imgname"] = np.array([_RunsCode(), "b.jpg"], dtype=object)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        (ws / name).write_bytes(buffer.getvalue())

    return make


def sweep_file(name: str, text: str) -> Setup:
    return write(name, text)


def zip_of(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return buffer.getvalue()


def annotate_dir(name: str, ids: Sequence[str] = ("000000", "000001"), camera: bool = True) -> Setup:
    """A small ``pchmr annotate --out`` directory (4-vertex meshes, 8-pixel crops) holding ``ids``;
    without ``camera`` as annotate wrote it before the fitted camera was stored."""

    def make(ws: Path, base: Path) -> None:
        n = len(ids)
        arrays: dict[str, np.ndarray] = {
            "image_ids": np.array(ids), "images": np.zeros((n, 8, 8, 3), np.uint8),
            "keypoints_2d": np.zeros((n, 14, 3), np.float32), "joints_3d": np.zeros((n, 14, 3), np.float32),
            "vertices": np.zeros((n, 4, 3), np.float32),
            **{f"meta_{key}": np.array(["unknown"] * n) for key in ("subject", "scene", "action", "source")},
        }  # fmt: skip
        if camera:
            arrays.update(translation=np.tile(np.float32([0, 0, 3]), (n, 1)),
                          intrinsics=np.tile(np.float32([2, 0, 0]), (n, 1)), crop_box=np.zeros((n, 3), np.float32))  # fmt: skip
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        _fresh(ws / name / "labels.npz").write_bytes(buffer.getvalue())
        info = {"annotator": {"annotator": "deposer"}, "body_model": "anny", "target": "synthetic", "annotated": n}
        (ws / name / "info.json").write_text(json.dumps(info))
        records = [{"image_id": i, "status": "ok", "annotator": "deposer"} for i in ids]
        (ws / name / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    return make


TAKEN = write("taken", "my own file\n")
EMPTY = folder("empty")
ROW = '[rows.a]\nstrategy = "fedavg"\n'
RO_OUT = str(READ_ONLY / "pchmr-catalogue")
PICKLE_TEXT = pickle.dumps({"not": "a model"}, protocol=2)


def _cases() -> list[Case]:
    c: list[Case] = []

    def add(id: str, argv: Sequence[str], *words: str, **kw: object) -> None:
        c.append(Case(id, tuple(argv), tuple(words), **kw))  # type: ignore[arg-type]

    # ---------------------------------------------------------------- run: plugin names
    for kind, flag, known in [
        ("backbone", "--backbone", "fastmetro, tore"),
        ("strategy", "--strategy", "fedavg, fedgh, fedopt, fedprox, secagg"),
        ("partitioner", "--partitioner", "by-source, cnn-cluster, iid, lda, natural"),
        ("privacy", "--privacy", "dp, secagg"),
        ("body model", "--body-model", "anny, smpl"),
        ("dataset", "--dataset", "spin-npz, synthetic"),
    ]:
        add(f"run-unknown-{flag[2:]}", ["run", flag, "nosuch"], f"no {kind} named 'nosuch'", "registered: ", known)

    # ---------------------------------------------------------------- run: numbers
    whole = "must be a whole number >= 1, got"
    for flag, value in [("--clients", "0"), ("--clients", "-3"), ("--rounds", "0"), ("--local-epochs", "0"),
                        ("--batch-size", "0"), ("--eval-every", "0"), ("--num-train", "0")]:  # fmt: skip
        add(f"run-{flag[2:]}-{value}", ["run", flag, value], f"error: {flag} {whole} {value}")
    add(
        "run-epochs-0",
        ["run", "--mode", "naive", "--epochs", "0"],
        "error: --epochs must be a whole number >= 1, got 0",
    )
    add("run-clients-not-a-number", ["run", "--clients", "abc"], "Invalid value for '--clients'",
        "'abc' is not a valid integer")  # fmt: skip
    add("run-per-round-above-clients", ["run", "--clients", "3", "--per-round", "5"],
        "--per-round 5 is more than --clients 3", "at most every client can be sampled in a round")  # fmt: skip
    add("run-lr-nan", ["run", "--lr", "nan"], "--lr must be a positive number, got nan")
    add("run-lr-negative", ["run", "--lr", "-1"], "--lr must be a positive number, got -1.0")
    add("run-lr-infinite", ["run", "--lr", "inf"], "--lr must be a positive number, got inf")
    add("run-fraction-above-1", ["run", "--mode", "naive", "--fraction", "1.5"],
        "--fraction must lie in (0, 1]", "got 1.5")  # fmt: skip
    add("run-min-fit-fraction-0", ["run", "--min-fit-fraction", "0"], "--min-fit-fraction must lie in (0, 1]",
        "got 0.0")  # fmt: skip
    add("run-min-fit-fraction-nan", ["run", "--min-fit-fraction", "nan"], "--min-fit-fraction must lie in (0, 1]",
        "got nan")  # fmt: skip
    add("run-client-dropout-1", ["run", "--client-dropout", "1"], "--client-dropout must lie in [0, 1)", "got 1.0")
    add("run-client-dropout-negative", ["run", "--client-dropout", "-0.1"], "--client-dropout must lie in [0, 1)",
        "got -0.1")  # fmt: skip
    add("run-input-size-50", ["run", "--input-size", "50"], "--input-size must be a multiple of 32 and >= 32",
        "got 50")  # fmt: skip
    add("run-seed-negative", ["run", "--seed", "-1"], "--seed must be an integer >= 0, got -1")
    add("run-loader-workers-negative", ["run", "--loader-workers", "-1"],
        "--loader-workers must be a whole number >= 0, got -1")  # fmt: skip
    add("run-client-gpus-0", ["run", "--client-gpus", "0"], "--client-gpus must be a fraction of one GPU in (0, 1]",
        "got 0.0")  # fmt: skip
    add("run-devices-2", ["run", "--devices", "2"], "--devices 2: each trainer of a run uses one device", "--devices 1")

    # ---------------------------------------------------------------- run: choices and combinations
    for flag, value, allowed in [("--mode", "nosuch", "federated, centralized, naive"),
                                 ("--engine", "nosuch", "simulation, deployment"),
                                 ("--lr-schedule", "nosuch", "cosine, constant"),
                                 ("--client-optimizer", "nosuch", "reset, keep"),
                                 ("--accelerator", "tpu", "auto, cpu, gpu, mps"),
                                 ("--precision", "8-bit", "32-true, 16-mixed, bf16-mixed")]:  # fmt: skip
        add(f"run-{flag[2:]}-unknown", ["run", flag, value], f"{flag} must be one of {allowed}, got '{value}'")
    add("run-eval-datasets-not-a-member", ["run", "--eval-datasets", "h36m"],
        "--eval-datasets must name distinct members of --dataset synthetic", "h36m not a member")  # fmt: skip
    add("run-freeze-encoder-from-scratch", ["run", "--freeze-encoder", "--encoder-weights", "none"],
        "--freeze-encoder keeps the CNN fixed, but --encoder-weights none leaves it random")  # fmt: skip
    add("run-privacy-option-without-privacy", ["run", "--privacy-option", "clip=1"],
        "privacy options ['clip'] were given without --privacy")  # fmt: skip
    add("run-server-opt-contradicts-option", ["run", "--strategy", "fedopt", "--server-opt", "adam",
        "--strategy-option", "server-opt=yogi"], "--server-opt adam contradicts --strategy-option server-opt=yogi")  # fmt: skip
    add("run-remote-superlink-without-tls", ["run", "--engine", "deployment", "--superlink", "10.0.0.5:9092"],
        "--superlink 10.0.0.5:9092 is not on this machine and no --root-certificates is given",
        "--insecure")  # fmt: skip
    add("run-insecure-and-certificates", ["run", "--engine", "deployment", "--superlink", "10.0.0.5:9092",
        "--insecure", "--root-certificates", "ca.pem"], "--insecure and --root-certificates contradict each other",
        setup=(write("ca.pem", "-----BEGIN CERTIFICATE-----\n"),), keep=("ca.pem",))  # fmt: skip
    add("run-root-certificates-missing", ["run", "--engine", "deployment", "--superlink", "10.0.0.5:9092",
        "--root-certificates", "missing.pem"], "--root-certificates missing.pem", "does not exist",
        "the CA certificate")  # fmt: skip
    add("run-ray-address-malformed", ["run", "--ray-address", "nonsense"],
        "--ray-address must be HOST:PORT of a Ray cluster's head", "got 'nonsense'")  # fmt: skip
    add("run-ray-address-ray-client", ["run", "--ray-address", "ray://head:10001"],
        "not a ray:// Ray Client address", "got 'ray://head:10001'")  # fmt: skip
    add("run-ray-address-with-baseline", ["run", "--mode", "naive", "--ray-address", "10.0.0.5:6379"],
        "--ray-address joins a Ray cluster", "--mode naive does not use Ray")  # fmt: skip

    # ---------------------------------------------------------------- run: key=value options
    add("run-dataset-option-malformed", ["run", "--dataset-option", "2d-only"],
        "--dataset-option expects key=value (e.g. --dataset-option name=3), got '2d-only' (no '=')")  # fmt: skip
    add("run-strategy-option-no-key", ["run", "--strategy-option", "=3"],
        "--strategy-option expects key=value", "got '=3' (no key before '=')")  # fmt: skip
    add("run-dataset-option-unknown", ["run", "--dataset-option", "nosuch=1"],
        "synthetic dataset has no option 'nosuch'", "its options are: 2d-only")  # fmt: skip
    add("run-backbone-option-unknown", ["run", "--backbone-option", "nosuch=1"],
        "fastmetro backbone has no option 'nosuch'", "its options are:")  # fmt: skip
    add("run-lda-alpha-0", ["run", "--partitioner", "lda", "--partition-option", "alpha=0"],
        "lda partitioner option 'alpha' must be a number > 0, got 0")  # fmt: skip
    add("run-fedprox-mu-negative", ["run", "--strategy", "fedprox", "--strategy-option", "proximal-mu=-1"],
        "fedprox strategy option 'proximal-mu' must be a number >= 0, got -1")  # fmt: skip
    add("run-fedopt-server-opt-unknown", ["run", "--strategy", "fedopt", "--server-opt", "sgd"],
        "fedopt strategy option 'server-opt' must be one of adam, yogi, adagrad, got 'sgd'")  # fmt: skip
    add("run-dp-noise-negative", ["run", "--privacy", "dp", "--privacy-option", "noise-multiplier=-1"],
        "dp privacy option 'noise-multiplier' must be a number > 0, got -1")  # fmt: skip
    add("run-loss-weight-not-a-number", ["run", "--loss-weight", "edge=abc"],
        "--loss-weight: loss weight 'edge' must be a number >= 0, got 'abc'")  # fmt: skip
    add("run-loss-weight-nan", ["run", "--loss-weight", "edge=nan"],
        "--loss-weight: loss weight 'edge' must be a number >= 0, got nan")  # fmt: skip
    add("run-loss-weight-negative", ["run", "--loss-weight", "vertices=-1"],
        "--loss-weight: loss weight 'vertices' must be a number >= 0, got -1")  # fmt: skip
    add("run-loss-weight-unknown-term", ["run", *SMALL, "--loss-weight", "nosuch=1"],
        "loss weights ['nosuch'] name no loss term", "joints_3d")  # fmt: skip

    # ---------------------------------------------------------------- run: refused after the data are read
    add("run-variant-unknown", ["run", *SMALL, "--variant", "XL"], "unknown FastMETRO variant 'XL'",
        "choose one of ['L', 'M', 'S']")  # fmt: skip
    add("run-encoder-unknown", ["run", *SMALL, "--encoder", "nosuch"], "unknown encoder 'nosuch'",
        "available encoders: ['resnet50', 'small']")  # fmt: skip
    add("run-smpl-without-files", ["run", *SMALL, "--body-model", "smpl"],
        "the 'smpl' body model needs SMPL's model files", "--smpl-dir DIR")  # fmt: skip

    # ---------------------------------------------------------------- run: files
    add("run-init-from-missing", ["run", "--init-from", "missing"],
        "--init-from must be a run directory holding model.pt or a model file, got 'missing'")  # fmt: skip
    add("run-encoder-weights-missing", ["run", "--encoder-weights", "missing.pt"],
        "--encoder-weights must be 'public', 'none' or an existing weights file, got 'missing.pt'")  # fmt: skip
    add("run-init-from-truncated-model", ["run", *SMALL, "--init-from", "bad.pt"], "cannot read bad.pt",
        "trained model (model.pt)", "truncated or corrupt", setup=(run_copy("run"), _truncated_model("bad.pt")),
        keep=("bad.pt",))  # fmt: skip
    add("run-init-from-text-file", ["run", *SMALL, "--init-from", "taken"], "cannot read taken",
        "not a file torch.save writes", setup=(TAKEN,), keep=("taken",))  # fmt: skip
    add("run-init-from-crafted-model", ["run", *SMALL, "--init-from", "evil.pt"], "refusing to load evil.pt",
        "it asks to import", "system", setup=(crafted_torch("evil.pt"),), keep=("evil.pt",), absent=("ran-code",))  # fmt: skip
    add("run-init-from-other-model", ["run", *SMALL, "--init-from", "other.pt"],
        "other.pt is not a model of this backbone/body model", setup=(torch_file("other.pt", {"w": _zeros()}),),
        keep=("other.pt",))  # fmt: skip
    add("run-encoder-weights-text-file", ["run", *SMALL, "--encoder-weights", "taken"], "cannot read taken",
        "encoder weights file", "not a file torch.save writes", setup=(TAKEN,), keep=("taken",))  # fmt: skip
    add("run-spin-npz-missing", ["run", *SMALL, "--dataset", "spin-npz:missing.npz"],
        "missing.npz: SPIN .npz annotation file does not exist")  # fmt: skip
    add("run-spin-npz-nan", ["run", *SMALL, "--dataset", "spin-npz:nan.npz"],
        "nan.npz: 'center' holds NaN or infinite values", "sample 1", "finite",
        setup=(npz("nan.npz", **spin_arrays(center=np.array([[32.0, 32.0], [np.nan, 32.0]]))),), keep=("nan.npz",))  # fmt: skip

    # ---------------------------------------------------------------- run: --out
    add("run-out-is-a-file", ["run", "--out", "taken"],
        "run directory taken is a file, not a directory; choose another --out", setup=(TAKEN,), keep=("taken",))  # fmt: skip
    add("run-out-not-empty", ["run", "--out", "run"], "run directory run already exists and is not empty",
        "pass --resume to continue it or choose another --out", setup=(run_copy(),), keep=("run",))  # fmt: skip
    add("run-out-read-only", ["run", "--out", RO_OUT], f"cannot create the run directory {RO_OUT}",
        "choose another --out", absent=(RO_OUT,))  # fmt: skip

    # ---------------------------------------------------------------- run: config files
    add("run-config-missing", ["run", "--config", "missing.toml"], "config file missing.toml does not exist")
    add("run-config-is-a-directory", ["run", "--config", "empty"], "config file empty is a directory",
        "a TOML or JSON file", setup=(EMPTY,))  # fmt: skip
    add("run-config-not-toml", ["run", "--config", "bad.toml"], "config file bad.toml is not valid TOML",
        setup=(write("bad.toml", "rounds = [1,\n"),), keep=("bad.toml",))  # fmt: skip
    add("run-config-not-json", ["run", "--config", "bad.json"], "config file bad.json is not valid JSON",
        setup=(write("bad.json", '{"rounds": 3,'),), keep=("bad.json",))  # fmt: skip
    add("run-config-json-array", ["run", "--config", "list.json"], "config file list.json must hold a table of options",
        setup=(write("list.json", "[1, 2]"),))  # fmt: skip
    add("run-config-backbone-3", ["run", "--config", "c.toml"], "c.toml", "backbone must be a string",
        'e.g. backbone = "fastmetro"', "got 3", setup=(write("c.toml", "backbone = 3\n"),), keep=("c.toml",))  # fmt: skip
    add("run-config-strategy-list", ["run", "--config", "c.toml"], "strategy must be a string", "got ['fedavg']",
        setup=(write("c.toml", 'strategy = ["fedavg"]\n'),))  # fmt: skip
    add("run-config-superlink-number", ["run", "--config", "c.toml"], "superlink must be a string or unset",
        "got 9092", setup=(write("c.toml", 'engine = "deployment"\nsuperlink = 9092\n'),))  # fmt: skip
    add("run-config-cache-dir-number", ["run", "--config", "c.toml"], "cache_dir must be a string or unset",
        "got 3", setup=(write("c.toml", "cache_dir = 3\n"),))  # fmt: skip
    add("run-config-insecure-string", ["run", "--config", "c.toml"], "insecure must be true or false", "got 'yes'",
        setup=(write("c.toml", 'insecure = "yes"\n'),))  # fmt: skip
    add("run-config-options-not-a-table", ["run", "--config", "c.toml"],
        "partition_options must be a table of key = value", "got 3", setup=(write("c.toml", "partition_options = 3\n"),))  # fmt: skip
    add("run-config-rounds-string", ["run", "--config", "c.toml"], "--rounds must be a whole number >= 1, got 'three'",
        setup=(write("c.toml", 'rounds = "three"\n'),))  # fmt: skip
    add("run-config-unknown-key", ["run", "--config", "c.toml"], "unknown config keys ['roundz']", "known keys:",
        setup=(write("c.toml", "roundz = 3\n"),))  # fmt: skip
    add("run-config-scale-unknown", ["run", "--config", "c.toml", "--scale", "nosuch"],
        "c.toml has no scale 'nosuch'; its scales are: smoke",
        setup=(write("c.toml", "rounds = 3\n[scale.smoke]\nrounds = 1\n"),))  # fmt: skip
    add("run-config-scale-not-a-table", ["run", "--config", "c.toml"], "'scale' must be a table of named override tables",
        setup=(write("c.toml", "scale = 3\n"),))  # fmt: skip
    add("run-scale-without-config", ["run", "--scale", "smoke"], "--scale needs --config")

    # ---------------------------------------------------------------- run --resume
    add(
        "resume-missing", ["run", "--resume", "missing"], "missing is not a pchmr run directory: config.json is missing"
    )
    add("resume-empty-directory", ["run", "--resume", "empty"], "empty is not a pchmr run directory",
        setup=(EMPTY,))  # fmt: skip
    add("resume-a-file", ["run", "--resume", "taken"], "taken is a file, not a run directory", setup=(TAKEN,),
        keep=("taken",))  # fmt: skip
    add("resume-config-not-json", ["run", "--resume", "r"], "r/config.json is not valid JSON",
        "it is not a config pchmr wrote", setup=(run_copy("r", replace_file("config.json", "{oops")),), keep=("r",))  # fmt: skip
    add("resume-config-without-run-table", ["run", "--resume", "r"], "r/config.json has no 'run' table of options",
        setup=(run_copy("r", replace_file("config.json", "[1, 2]")),), keep=("r",))  # fmt: skip
    add("resume-config-bad-value", ["run", "--resume", "r"], "r/config.json",
        "--clients must be a whole number >= 1, got 0", setup=(run_copy("r", edit_config(clients=0)),), keep=("r",))  # fmt: skip
    add("resume-rounds-cut-off", ["run", "--resume", "r"], "r/rounds.jsonl line 2 is cut off",
        "delete that line", setup=(run_copy("r", replace_file("rounds.jsonl", cut_rounds_line)),), keep=("r",))  # fmt: skip
    add("resume-rounds-not-json", ["run", "--resume", "r"], "r/rounds.jsonl line 2 is not JSON",
        "expected one JSON object per line", setup=(run_copy("r", replace_file("rounds.jsonl", break_rounds_line)),),
        keep=("r",))  # fmt: skip
    add("resume-partition-corrupt", ["run", "--resume", "r"], "r/partition.json cannot be read",
        "nothing was changed", setup=(run_copy("r", replace_file("partition.json", '{"clients":')),), keep=("r",))  # fmt: skip
    add("resume-checkpoint-truncated", ["run", "--resume", "r"], "cannot read r/checkpoints/last.ckpt",
        "Lightning checkpoint", "truncated or corrupt", setup=(run_copy("r", replace_file("checkpoints/last.ckpt",
        cut(2000))),), keep=("r",))  # fmt: skip
    add("resume-checkpoint-text", ["run", "--resume", "r"], "cannot read r/checkpoints/last.ckpt",
        "not a file torch.save writes", setup=(run_copy("r", replace_file("checkpoints/last.ckpt", "garbage\n")),),
        keep=("r",))  # fmt: skip
    add("resume-checkpoint-crafted", ["run", "--resume", "r"], "refusing to load r/checkpoints/last.ckpt",
        "it asks to import", "system", setup=(run_copy("r"), crafted_torch("r/checkpoints/last.ckpt")), keep=("r",),
        absent=("ran-code",))  # fmt: skip

    # ---------------------------------------------------------------- report
    add("report-missing", ["report", "missing"], "missing does not exist (expected a pchmr run directory)")
    add("report-empty-directory", ["report", "empty"], "empty is not a pchmr run directory: config.json is missing",
        setup=(EMPTY,))  # fmt: skip
    add("report-a-file", ["report", "taken"], "taken is not a directory (expected a pchmr run directory)",
        setup=(TAKEN,))  # fmt: skip
    add("report-formats-unknown", ["report", "run", "--formats", "pdf"], "--formats 'pdf' has unknown or no formats",
        "choose from: md, csv, tex, png, json", setup=(run_copy(),))  # fmt: skip
    add("report-metric-unknown", ["report", "run", "--metric", "nosuch"], "unknown --metric 'nosuch'",
        "choose one of: pa_mpjpe_mm", setup=(run_copy(),))  # fmt: skip
    add("report-group-by-unknown", ["report", "run", "--group-by", "nosuch"], "unknown --group-by 'nosuch'",
        "setting-model", setup=(run_copy(),))  # fmt: skip
    add("report-baseline-of-run-directories", ["report", "run", "--baseline", "fedavg"],
        "--baseline names a row of a sweep directory", setup=(run_copy(),))  # fmt: skip
    add("report-final-not-json", ["report", "r"], "final.json is not valid JSON",
        setup=(run_copy("r", replace_file("final.json", "{")),), keep=("r",))  # fmt: skip
    add("report-final-an-array", ["report", "r"], "final.json is a JSON array", "expected the JSON object",
        setup=(run_copy("r", replace_file("final.json", "[]")),), keep=("r",))  # fmt: skip
    add("report-final-without-metrics", ["report", "r"], "final.json has no 'mpjpe_mm'",
        "expected the JSON object", setup=(run_copy("r", replace_file("final.json", '{"round": 1}')),), keep=("r",))  # fmt: skip
    add("report-rounds-corrupt", ["report", "r"], "rounds.jsonl line 2 is not JSON",
        setup=(run_copy("r", replace_file("rounds.jsonl", break_rounds_line)),), keep=("r",))  # fmt: skip
    add("report-config-bad-value", ["report", "r"], "config.json holds a run config pchmr cannot read",
        "--clients must be a whole number >= 1, got 0", setup=(run_copy("r", edit_config(clients=0)),), keep=("r",))  # fmt: skip
    add("report-unfinished", ["report", "r"], "is an unfinished run (final.json is missing",
        "pass --include-unfinished", setup=(run_copy("r", lambda p: (p / "final.json").unlink()),), keep=("r",))  # fmt: skip
    add("report-out-is-a-file", ["report", "run", "--out", "taken"],
        "--out taken is a file, not a directory; choose another --out", setup=(run_copy(), TAKEN), keep=("taken",))  # fmt: skip
    add("report-out-not-empty", ["report", "run", "--out", "old"], "--out old is not empty (it holds report.md)",
        "pass --overwrite", setup=(run_copy(), write("old/report.md", "earlier\n")), keep=("old",))  # fmt: skip
    add("report-html-is-a-file", ["report", "run", "--html", "taken"],
        "--html taken is a file, not a directory; choose another --html", setup=(run_copy(), TAKEN), keep=("taken",))  # fmt: skip
    add("report-html-not-empty", ["report", "run", "--html", "old"], "--html old is not empty (it holds index.html)",
        "pass --overwrite", setup=(run_copy(), write("old/index.html", "<p>earlier</p>\n")), keep=("old",))  # fmt: skip
    add("report-alpha-without-lda-runs", ["report", "run", "--out", "o", "--formats", "md,alpha"],
        "metric_vs_alpha.png: the metric-vs-α plot needs runs at 2 or more LDA α values",
        "the runs give no LDA-partitioned run", "is not LDA-partitioned", setup=(run_copy(),))  # fmt: skip
    add("report-grid-samples-negative", ["report", "run", "--grid-samples", "-1"],
        "--grid-samples must be a whole number >= 0, got -1", setup=(run_copy(),))  # fmt: skip
    add("report-grid-of-no-samples", ["report", "run", "--out", "o", "--formats", "grid", "--grid-samples", "0"],
        "--formats grid draws --grid-samples test images per run: give 1 or more, got 0", setup=(run_copy(),))  # fmt: skip
    add("report-grid-without-model", ["report", "r", "--out", "o", "--formats", "md,grid"],
        "predictions.png: no run to draw a prediction grid of: r has no model.pt",
        setup=(run_copy("r", lambda p: (p / "model.pt").unlink()),), keep=("r",))  # fmt: skip
    add("report-sweep-json-corrupt", ["report", "sw"], "sw/sweep.json is not valid JSON",
        setup=(write("sw/sweep.json", "{"),), keep=("sw",))  # fmt: skip
    add("report-sweep-json-an-array", ["report", "sw"], "sw/sweep.json has no rows and cells",
        setup=(write("sw/sweep.json", "[]"),), keep=("sw",))  # fmt: skip

    # ---------------------------------------------------------------- sweep
    add("sweep-file-missing", ["sweep", "missing.toml", "--dry-run"], "sweep file missing.toml does not exist")
    add("sweep-file-is-a-directory", ["sweep", "empty", "--dry-run"], "sweep file empty is a directory",
        "a TOML file", setup=(EMPTY,))  # fmt: skip
    add("sweep-file-not-toml", ["sweep", "s.toml", "--dry-run"], "sweep file s.toml is not valid TOML",
        setup=(sweep_file("s.toml", "seeds = [0\n"),))  # fmt: skip
    add("sweep-without-out", ["sweep", "s.toml"], "--out DIR is required", setup=(sweep_file("s.toml", "seeds = [0]\n" + ROW),))  # fmt: skip
    add("sweep-out-is-a-file", ["sweep", "s.toml", "--out", "taken"], "--out taken exists and is not a directory",
        setup=(sweep_file("s.toml", "seeds = [0]\n" + ROW), TAKEN), keep=("taken",))  # fmt: skip
    add("sweep-unknown-key", ["sweep", "s.toml", "--dry-run"], "the sweep file has unknown key 'bogus'",
        "its keys are: description, base", setup=(sweep_file("s.toml", "seeds = [0]\nbogus = 1\n" + ROW),))  # fmt: skip
    add("sweep-row-unknown-key", ["sweep", "s.toml", "--dry-run"], "row 'a'", "unknown config keys ['roundz']",
        setup=(sweep_file("s.toml", "seeds = [0]\n" + ROW + "roundz = 3\n"),))  # fmt: skip
    add("sweep-row-backbone-3", ["sweep", "s.toml", "--dry-run"], "row 'a'", "backbone must be a string", "got 3",
        setup=(sweep_file("s.toml", "seeds = [0]\n[rows.a]\nbackbone = 3\n"),))  # fmt: skip
    add("sweep-row-clients-0", ["sweep", "s.toml", "--out", "sout"], "row 'a'",
        "--clients must be a whole number >= 1, got 0", setup=(sweep_file("s.toml", "seeds = [0]\n[rows.a]\nclients = 0\n"),))  # fmt: skip
    add("sweep-row-sets-seed", ["sweep", "s.toml", "--dry-run"], "row 'a' sets seed, which the sweep sets",
        setup=(sweep_file("s.toml", "seeds = [0]\n[rows.a]\nseed = 3\n"),))  # fmt: skip
    add("sweep-row-unknown-plugin", ["sweep", "s.toml", "--dry-run"], "row 'a'", "no strategy named 'nosuch'",
        setup=(sweep_file("s.toml", 'seeds = [0]\n[rows.a]\nstrategy = "nosuch"\n'),))  # fmt: skip
    add("sweep-row-name-a-path", ["sweep", "s.toml", "--dry-run"], "row 'a/b'", "a row's name names its directory",
        setup=(sweep_file("s.toml", 'seeds = [0]\n[rows."a/b"]\nstrategy = "fedavg"\n'),))  # fmt: skip
    add("sweep-seeds-not-a-list", ["sweep", "s.toml", "--dry-run"],
        "seeds must be a non-empty list of whole numbers >= 0", "got 'x'", setup=(sweep_file("s.toml", 'seeds = "x"\n' + ROW),))  # fmt: skip
    add("sweep-seeds-repeated", ["sweep", "s.toml", "--dry-run"], "seeds lists a seed twice: [0, 0]",
        setup=(sweep_file("s.toml", "seeds = [0, 0]\n" + ROW),))  # fmt: skip
    add("sweep-no-rows", ["sweep", "s.toml", "--dry-run"], "has no rows", "[rows.NAME]",
        setup=(sweep_file("s.toml", "seeds = [0]\n"),))  # fmt: skip
    add("sweep-baseline-not-a-row", ["sweep", "s.toml", "--dry-run"], "baseline 'zzz' is not a row; its rows are: a",
        setup=(sweep_file("s.toml", 'seeds = [0]\nbaseline = "zzz"\n' + ROW),))  # fmt: skip
    add("sweep-base-missing", ["sweep", "s.toml", "--dry-run"], "base: config file missing.toml does not exist",
        setup=(sweep_file("s.toml", 'seeds = [0]\nbase = "missing.toml"\n' + ROW),))  # fmt: skip
    add("sweep-budget-unknown-row", ["sweep", "s.toml", "--dry-run"], "[budget] steps = 'nosuch' is not a row",
        setup=(sweep_file("s.toml", 'seeds = [0]\n[budget]\nsteps = "nosuch"\n' + ROW),))  # fmt: skip
    add("sweep-scale-unknown", ["sweep", "s.toml", "--dry-run", "--scale", "nosuch"], "no scale 'nosuch'",
        setup=(sweep_file("s.toml", "seeds = [0]\n" + ROW),))  # fmt: skip

    # ---------------------------------------------------------------- plugins
    add("plugins-kind-unknown", ["plugins", "--kind", "nosuch"], "--kind must be one of backbone, body_model",
        "got 'nosuch'")  # fmt: skip
    add("plugins-name-unknown", ["plugins", "--options", "fedavgg"], "no plugin named 'fedavgg' of any kind",
        "did you mean 'fedavg'")  # fmt: skip
    add("plugins-name-ambiguous", ["plugins", "--options", "secagg"], "'secagg' names plugins of several kinds",
        "add --kind")  # fmt: skip
    add("plugins-name-of-another-kind", ["plugins", "--options", "fastmetro", "--kind", "strategy"],
        "no strategy named 'fastmetro'")  # fmt: skip

    # ---------------------------------------------------------------- partition
    add("partition-unknown-partitioner", ["partition", "--partitioner", "nosuch"], "no partitioner named 'nosuch'")
    add("partition-clients-0", ["partition", "--clients", "0"], "--clients must be a whole number >= 1, got 0")
    add("partition-out-is-a-file", ["partition", "--out", "taken"],
        "--out taken is a file, not a directory; choose another --out", setup=(TAKEN,), keep=("taken",))  # fmt: skip
    add("partition-out-not-empty", ["partition", "--out", "old"], "--out old is not empty (it holds partition.json)",
        "pass --overwrite", setup=(write("old/partition.json", "{}"),), keep=("old",))  # fmt: skip
    add("partition-out-read-only", ["partition", *SMALL[:4], "--out", RO_OUT], f"cannot write to --out {RO_OUT}",
        absent=(RO_OUT,))  # fmt: skip
    add("partition-option-malformed", ["partition", "--partition-option", "alpha"],
        "--partition-option expects key=value", "got 'alpha' (no '=')")  # fmt: skip
    add("partition-lda-alpha-negative", ["partition", "--partitioner", "lda", "--partition-option", "alpha=-1"],
        "lda partitioner option 'alpha' must be a number > 0, got -1")  # fmt: skip
    add("partition-option-unknown", ["partition", "--partitioner", "lda", "--partition-option", "nosuch=1"],
        "lda partitioner has no option 'nosuch'", "its options are: alpha")  # fmt: skip
    add("partition-label-unknown", ["partition", *SMALL[:4], "--label", "nosuch", "--out", "p"],
        "--label 'nosuch' is not a label of this dataset", "choose one of: action")  # fmt: skip
    add("partition-more-clients-than-samples", ["partition", *SMALL[:4], "--clients", "100", "--out", "p"],
        "cannot split 16 training samples into 100 non-empty clients")  # fmt: skip
    add("partition-config-backbone-3", ["partition", "--config", "c.toml"], "backbone must be a string", "got 3",
        setup=(write("c.toml", "backbone = 3\n"),))  # fmt: skip

    # ---------------------------------------------------------------- annotate
    add("annotate-unknown-annotator", ["annotate", "synthetic", "--out", "o", "--annotator", "nosuch"],
        "no annotator named 'nosuch'", "registered: deposer, smplifyx")  # fmt: skip
    add("annotate-unknown-body-model", ["annotate", "synthetic", "--out", "o", "--body-model", "nosuch"],
        "no body model named 'nosuch'", "registered: anny, smpl")  # fmt: skip
    add("annotate-target-missing", ["annotate", "missing", "--out", "o"],
        "'missing' is neither an image folder nor a dataset; use a folder or 'synthetic'")  # fmt: skip
    add("annotate-folder-without-keypoints", ["annotate", "images", "--out", "o"],
        "annotating the image folder images needs --keypoints DIR", setup=(folder("images"),))  # fmt: skip
    add("annotate-keypoints-missing", ["annotate", "images", "--out", "o", "--keypoints", "missing"],
        "keypoint directory missing does not exist", setup=(folder("images"),))  # fmt: skip
    add("annotate-image-corrupt", ["annotate", "images", "--out", "o", "--keypoints", "kp", "--annotator",
        "smplifyx"], "images/a.png", "cannot be read as an image", setup=(write("images/a.png", "not a png"),
        write("kp/a.json", "[]")), keep=("images", "kp"))  # fmt: skip
    add("annotate-batch-size-0", ["annotate", "synthetic", "--out", "o", "--batch-size", "0"],
        "--batch-size must be a whole number >= 1, got 0")  # fmt: skip
    add("annotate-crop-size-negative", ["annotate", "synthetic", "--out", "o", "--crop-size", "-4"],
        "--crop-size must be a whole number >= 1, got -4")  # fmt: skip
    add("annotate-out-not-empty", ["annotate", "synthetic", "--out", "old"], "--out old is not empty (it holds labels.npz)",
        "pass --overwrite", setup=(write("old/labels.npz", "earlier results"),), keep=("old",))  # fmt: skip
    add("annotate-out-is-a-file", ["annotate", "synthetic", "--out", "taken"],
        "--out taken is a file, not a directory", setup=(TAKEN,), keep=("taken",))  # fmt: skip
    add("annotate-option-malformed", ["annotate", "synthetic", "--out", "o", "--option", "=1"],
        "--option expects key=value (e.g. --option name=3), got '=1' (no key before '=')")  # fmt: skip
    add("annotate-option-unknown", ["annotate", "synthetic", "--out", "o", "--option", "nosuch=1"],
        "deposer annotator has no option 'nosuch'", "its options are:")  # fmt: skip
    add("annotate-option-out-of-range", ["annotate", "synthetic", "--out", "o", "--option", "iterations=-5"],
        "deposer annotator option 'iterations' must be an integer >= 1, got -5")  # fmt: skip
    add("annotate-keypoint-option-unknown", ["annotate", "synthetic", "--out", "o", "--keypoint-option", "nosuch=1"],
        "synthetic keypoint source has no option 'nosuch'")  # fmt: skip
    add("annotate-data-option-unknown", ["annotate", "synthetic", "--out", "o", "--data-option", "nosuch=1"],
        "--data-option does not know ['nosuch']", "known: ['seed', 'split'")  # fmt: skip
    add("annotate-data-option-split", ["annotate", "synthetic", "--out", "o", "--data-option", "split=val"],
        "--data-option split must be train or test, got 'val'")  # fmt: skip
    add("annotate-data-option-seed-negative", ["annotate", "synthetic", "--out", "o", "--data-option", "seed=-1"],
        "--data-option seed must be a whole number >= 0, got -1")  # fmt: skip
    add("annotate-data-option-limit-text", ["annotate", "synthetic", "--out", "o", "--data-option", "limit=abc"],
        "--data-option limit must be a whole number >= 1, got 'abc'")  # fmt: skip
    add("annotate-accelerator-unknown", ["annotate", "synthetic", "--out", "o", "--accelerator", "tpu"],
        "--accelerator must be one of auto, cpu, gpu, mps, got 'tpu'")  # fmt: skip
    add("annotate-devices-2", ["annotate", "synthetic", "--out", "o", "--devices", "2"],
        "--devices 2: more than one device needs --accelerator gpu")  # fmt: skip

    # ---------------------------------------------------------------- annotate-compare
    add("annotate-compare-not-annotate-output", ["annotate-compare", "a", "empty", "--out", "f"],
        "empty is not a `pchmr annotate --out` directory", "it lacks info.json, records.jsonl, labels.npz",
        setup=(annotate_dir("a"), EMPTY), keep=("a",))  # fmt: skip
    add("annotate-compare-missing", ["annotate-compare", "a", "missing", "--out", "f"],
        "missing: pseudo-label directory does not exist", setup=(annotate_dir("a"),), keep=("a",))  # fmt: skip
    add("annotate-compare-no-camera", ["annotate-compare", "a", "old", "--out", "f"],
        "old/labels.npz has no fitted camera (translation, intrinsics)", "annotate the images again",
        setup=(annotate_dir("a"), annotate_dir("old", camera=False)), keep=("a", "old"))  # fmt: skip
    add("annotate-compare-no-common-images", ["annotate-compare", "a", "b", "--out", "f"],
        "the annotations share no annotated image", "b: x7 (1 images)",
        setup=(annotate_dir("a"), annotate_dir("b", ("x7",))), keep=("a", "b"))  # fmt: skip
    add("annotate-compare-size-small", ["annotate-compare", "a", "--out", "f", "--size", "8"],
        "--size must be a whole number >= 32, got 8", setup=(annotate_dir("a"),))  # fmt: skip
    add("annotate-compare-out-is-input", ["annotate-compare", "a", "b", "--out", "a", "--overwrite"],
        "--out a is one of the annotations it would draw", setup=(annotate_dir("a"), annotate_dir("b")),
        keep=("a", "b"))  # fmt: skip
    add("annotate-compare-out-not-empty", ["annotate-compare", "a", "--out", "old"],
        "--out old is not empty (it holds labels.npz)", "pass --overwrite",
        setup=(annotate_dir("a"), write("old/labels.npz", "earlier results")), keep=("old",))  # fmt: skip

    # ---------------------------------------------------------------- personalize
    def labels(name: str = "labels") -> Setup:
        return write(f"{name}/labels.npz", zip_of(**{"image_ids.npy": b"x"}))

    add("personalize-epochs-0", ["personalize", "--checkpoint", "x", "--data", "y", "--epochs", "0"],
        "--epochs must be a whole number >= 1, got 0")  # fmt: skip
    add("personalize-lr-nan", ["personalize", "--checkpoint", "x", "--data", "y", "--lr", "nan"],
        "--lr must be a finite number > 0, got nan")  # fmt: skip
    add("personalize-seed-negative", ["personalize", "--checkpoint", "x", "--data", "y", "--seed", "-1"],
        "--seed must be a whole number >= 0, got -1")  # fmt: skip
    add("personalize-accelerator-unknown", ["personalize", "--checkpoint", "x", "--data", "y", "--accelerator", "tpu"],
        "--accelerator must be one of auto, cpu, gpu, mps, got 'tpu'")  # fmt: skip
    add("personalize-data-without-labels", ["personalize", "--checkpoint", "run", "--data", "empty"],
        "empty holds no pseudo-labels (labels.npz)", "pchmr annotate", setup=(run_copy(), EMPTY))  # fmt: skip
    add("personalize-checkpoint-missing", ["personalize", "--checkpoint", "missing", "--data", "labels"],
        "missing is not a pchmr run: it needs config.json and model.pt", setup=(labels(),))  # fmt: skip
    add("personalize-checkpoint-empty", ["personalize", "--checkpoint", "empty", "--data", "labels"],
        "empty is not a pchmr run", setup=(labels(), EMPTY))  # fmt: skip
    add("personalize-config-not-json", ["personalize", "--checkpoint", "r", "--data", "labels"],
        "r/config.json is not valid JSON", setup=(labels(), run_copy("r", replace_file("config.json", "{oops"))),
        keep=("r",))  # fmt: skip
    add("personalize-config-bad-value", ["personalize", "--checkpoint", "r", "--data", "labels"], "r/config.json",
        "--clients must be a whole number >= 1, got 0", setup=(labels(), run_copy("r", edit_config(clients=0))),
        keep=("r",))  # fmt: skip
    add("personalize-model-truncated", ["personalize", "--checkpoint", "r", "--data", "labels"],
        "cannot read r/model.pt", "truncated or corrupt", setup=(labels(), run_copy("r", replace_file("model.pt",
        cut(4000)))), keep=("r",))  # fmt: skip
    add("personalize-model-text", ["personalize", "--checkpoint", "r", "--data", "labels"], "cannot read r/model.pt",
        "not a file torch.save writes", setup=(labels(), run_copy("r", replace_file("model.pt", "not a model\n"))),
        keep=("r",))  # fmt: skip
    add("personalize-model-a-pickle", ["personalize", "--checkpoint", "r", "--data", "labels"],
        "cannot read r/model.pt", "not a file torch.save writes", setup=(labels(), run_copy("r", replace_file(
        "model.pt", PICKLE_TEXT))), keep=("r",))  # fmt: skip
    add("personalize-model-of-another-model", ["personalize", "--checkpoint", "r", "--data", "labels"],
        "r/model.pt is not a model of this backbone/body model", setup=(labels(), run_copy("r"),
        torch_file("r/model.pt", {"w": _zeros()})), keep=("r",))  # fmt: skip
    add("personalize-labels-not-npz", ["personalize", "--checkpoint", "run", "--data", "bad"],
        "bad/labels.npz: not a readable .npz archive", "a zip archive of .npy arrays", setup=(run_copy(), write("bad/labels.npz", "junk\n")),
        keep=("bad",))  # fmt: skip
    add("personalize-out-is-a-file", ["personalize", "--checkpoint", "run", "--data", "labels", "--out", "taken"],
        "--out taken is a file, not a directory", setup=(run_copy(), labels(), TAKEN), keep=("taken",))  # fmt: skip

    # ---------------------------------------------------------------- profile
    add("profile-unknown-backbone", ["profile", "--backbone", "nosuch"], "no backbone named 'nosuch'")
    add("profile-backbone-twice", ["profile", "--backbone", "tore", "--backbone", "tore"],
        "--backbone names a backbone twice: tore, tore")  # fmt: skip
    add("profile-input-size-50", ["profile", "--input-size", "50"], "--input-size must be a multiple of 32 and >= 32",
        "got 50")  # fmt: skip
    add("profile-batch-size-0", ["profile", "--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0")
    add("profile-images-0", ["profile", "--images", "0"], "--images must be a whole number >= 50", "got 0")
    add("profile-uplink-nan", ["profile", "--uplink-mbps", "nan"], "--uplink-mbps must be a number > 0, got nan")
    add("profile-threads-negative", ["profile", "--threads", "-1"], "--threads must be a whole number >= 0", "got -1")
    add("profile-precision-unknown", ["profile", "--precision", "nosuch"],
        "--precision must be one of 32-true, 16-mixed, bf16-mixed, got 'nosuch'")  # fmt: skip
    add("profile-body-model-unknown", ["profile", "--body-model", "nosuch"], "no body model named 'nosuch'")
    add("profile-out-is-a-file", ["profile", "--out", "taken"], "--out taken exists and is not a directory",
        setup=(TAKEN,), keep=("taken",))  # fmt: skip
    add("profile-variant-unknown", ["profile", "--backbone", "tore", "--variant", "XL"],
        "backbone tore refuses --variant XL", "choose one of")  # fmt: skip

    # ---------------------------------------------------------------- data prepare / check
    add("data-prepare-unknown-dataset", ["data", "prepare", "--dataset", "nosuch"], "no dataset named 'nosuch'")
    add("data-prepare-needs-a-path", ["data", "prepare", "--dataset", "spin-npz"],
        "dataset 'spin-npz' needs a location: --dataset spin-npz:PATH")  # fmt: skip
    add("data-prepare-npz-missing", ["data", "prepare", "--dataset", "spin-npz:missing.npz"],
        "missing.npz: SPIN .npz annotation file does not exist")  # fmt: skip
    add("data-prepare-npz-not-a-zip", ["data", "prepare", "--dataset", "spin-npz:taken"], "taken",
        "not an .npz archive", "a zip archive of .npy arrays", setup=(TAKEN,), keep=("taken",))  # fmt: skip
    add("data-prepare-npz-truncated", ["data", "prepare", "--dataset", "spin-npz:cut.npz"], "cut.npz",
        "not an .npz archive", setup=(_truncated_npz("cut.npz"),), keep=("cut.npz",))  # fmt: skip
    add("data-prepare-npz-wrong-shape", ["data", "prepare", "--dataset", "spin-npz:w.npz"],
        "w.npz: 'center' must have shape (2, 2), got (2, 3)", setup=(npz("w.npz", **spin_arrays(
        center=np.zeros((2, 3)))),), keep=("w.npz",))  # fmt: skip
    add("data-prepare-npz-missing-keys", ["data", "prepare", "--dataset", "spin-npz:k.npz"],
        "k.npz: missing key(s) ['center', 'scale']", setup=(npz("k.npz", imgname=np.array(["a.jpg"])),))  # fmt: skip
    add("data-prepare-npz-nan", ["data", "prepare", "--dataset", "spin-npz:nan.npz"],
        "nan.npz: 'S' holds NaN or infinite values", setup=(npz("nan.npz", **spin_arrays(
        S=np.full((2, 24, 4), np.inf))),), keep=("nan.npz",))  # fmt: skip
    add("data-prepare-npz-object-array", ["data", "prepare", "--dataset", "spin-npz:obj.npz"], "obj.npz",
        "'imgname'", "object array", setup=(object_npz("obj.npz"),), keep=("obj.npz",), absent=("ran-code",))  # fmt: skip
    add("data-prepare-npz-images-missing", ["data", "prepare", "--dataset", "spin-npz:ok.npz"],
        "image(s) listed in ok.npz do not exist", "a.jpg", setup=(npz("ok.npz", **spin_arrays()),))  # fmt: skip
    add("data-prepare-input-size-0", ["data", "prepare", "--dataset", "synthetic", "--input-size", "0"],
        "--input-size must be a whole number >= 1, got 0")  # fmt: skip
    add("data-check-root-missing", ["data", "check", "missing"], "missing: not a folder")
    add("data-check-root-a-file", ["data", "check", "taken"], "taken: not a folder", setup=(TAKEN,))
    add("data-check-unknown-dataset", ["data", "check", ".", "--dataset", "nosuch"], "no named dataset 'nosuch'",
        "known: 3dpw")  # fmt: skip

    # ---------------------------------------------------------------- privacy budget
    def budget(*extra: str) -> list[str]:
        return ["privacy", "budget", "--sample-rate", "0.1", "--rounds", "3", *extra]

    add("privacy-sample-rate-0", ["privacy", "budget", "--sample-rate", "0", "--rounds", "3", "--noise-multiplier",
        "1"], "--sample-rate must lie in (0, 1], got 0.0")  # fmt: skip
    add("privacy-sample-rate-above-1", ["privacy", "budget", "--sample-rate", "1.5", "--rounds", "3",
        "--noise-multiplier", "1"], "--sample-rate must lie in (0, 1], got 1.5")  # fmt: skip
    add("privacy-sample-rate-nan", ["privacy", "budget", "--sample-rate", "nan", "--rounds", "3", "--noise-multiplier",
        "1"], "--sample-rate must lie in (0, 1], got nan")  # fmt: skip
    add("privacy-sample-rate-missing", ["privacy", "budget", "--rounds", "3", "--noise-multiplier", "1"],
        "Missing option '--sample-rate'")  # fmt: skip
    add("privacy-rounds-0", ["privacy", "budget", "--sample-rate", "0.1", "--rounds", "0", "--noise-multiplier", "1"],
        "--rounds must be a whole number >= 1, got 0")  # fmt: skip
    add("privacy-delta-0", budget("--delta", "0", "--noise-multiplier", "1"), "--delta must lie in (0, 1), got 0.0")
    add("privacy-delta-1", budget("--delta", "1", "--noise-multiplier", "1"), "--delta must lie in (0, 1), got 1.0")
    add("privacy-noise-negative", budget("--noise-multiplier", "-1"),
        "--noise-multiplier must be a finite number > 0, got -1.0")  # fmt: skip
    add("privacy-target-epsilon-0", budget("--target-epsilon", "0"),
        "--target-epsilon must be a finite number > 0, got 0.0")  # fmt: skip
    add("privacy-target-epsilon-infinite", budget("--target-epsilon", "inf"),
        "--target-epsilon must be a finite number > 0, got inf")  # fmt: skip
    add("privacy-target-unreachable", budget("--target-epsilon", "1e-9"),
        "no noise multiplier up to 1e6 reaches ε ≤ 1e-09")  # fmt: skip
    add("privacy-both-targets", budget("--noise-multiplier", "1", "--target-epsilon", "1"),
        "give exactly one of --noise-multiplier (prints ε) and --target-epsilon")  # fmt: skip
    add("privacy-no-target", budget(), "give exactly one of --noise-multiplier (prints ε) and --target-epsilon")
    add("privacy-steps-0", budget("--noise-multiplier", "1", "--steps-per-round", "0"),
        "--steps-per-round must be a whole number >= 1, got 0")  # fmt: skip
    return c


def _zeros() -> object:
    import torch

    return torch.zeros(3)


def _truncated_model(name: str) -> Setup:
    """The base run's model.pt cut after 4000 bytes, as ``name``."""

    def make(ws: Path, base: Path) -> None:
        (ws / name).write_bytes((base / "model.pt").read_bytes()[:4000])

    return make


def _truncated_npz(name: str) -> Setup:
    def make(ws: Path, base: Path) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **spin_arrays())  # type: ignore[arg-type]
        (ws / name).write_bytes(buffer.getvalue()[:300])

    return make


CASES: tuple[Case, ...] = tuple(_cases())
_ids = [case.id for case in CASES]
assert len(set(_ids)) == len(_ids), sorted({i for i in _ids if _ids.count(i) > 1})
del _ids
