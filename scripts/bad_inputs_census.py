"""Run the bad-input catalogue against any checkout's ``pchmr`` and count what goes wrong.

    .venv/bin/python scripts/bad_inputs_census.py --pchmr /path/to/checkout/.venv/bin/pchmr

The cases are ``tests/bad_input_catalogue.py``'s (this checkout's), each run as a subprocess of the
given ``pchmr`` in its own empty working directory after the case's setup, exactly as
``tests/test_bad_inputs.py`` runs them in-process. Per case it records:

* **traceback**: the output holds ``Traceback (most recent call last)``;
* **exit code**: the exit code differs from the catalogue's (2 for every refusal);
* **message**: the output lacks some of the case's words (naming what was wrong and what was
  expected; an older checkout's different wording counts here too);
* **disk**: the working directory changed (a file written or altered, a half-made ``--out``, a
  ``runs/``), or a path the case names as absent exists;
* **option did not exist**: the checkout has no such option or command (click's ``No such
  option``), so the case does not apply to it; counted apart, not in the four above;
* **timed out**: still running after ``--timeout`` seconds (the input was accepted and something
  started); its process group is killed.

The finished run directory the run-directory cases copy is made first by the same ``pchmr`` (the
catalogue's ``BASE_RUN_ARGS``). Prints one line per case that is not clean, then the totals;
``--json FILE`` writes every case's outcome.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import bad_input_catalogue as catalogue  # noqa: E402  (the table lives with the tests)

TRACEBACK = "Traceback (most recent call last)"
NO_OPTION = ("No such option", "No such command")


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def run(pchmr: str, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """(exit code or None after a timeout, stdout + stderr) of ``pchmr ARGV`` in ``cwd``."""
    process = subprocess.Popen([pchmr, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    try:
        out, _ = process.communicate(timeout=timeout)
        return process.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        return None, out.decode(errors="replace")


def census(pchmr: str, timeout: float, only: str | None, keep_going: bool) -> list[dict[str, object]]:
    catalogue.LINK_FROM_BYTES = None  # real copies: an older checkout may write into a file in place
    work = Path(tempfile.mkdtemp(prefix="pchmr-census-"))
    env = {**os.environ, "COLUMNS": "200", "PCHMR_CACHE_DIR": str(work / "cache"), "RAY_DEDUP_LOGS": "0"}
    base = work / "base"
    code, out = run(pchmr, [*catalogue.BASE_RUN_ARGS, "--out", str(base)], work, env, 900)
    if code != 0:
        sys.exit(f"the base run failed (exit {code}):\n{out[-3000:]}")
    outcomes = []
    for case in catalogue.CASES:
        if only and only not in case.id:
            continue
        if case.needs_read_only and catalogue.read_only_is_writable():
            continue
        ws = work / "cases" / case.id
        ws.mkdir(parents=True)
        for make in case.setup:
            make(ws, base)
        before = snapshot(ws)
        started = time.perf_counter()
        code, out = run(pchmr, list(case.argv), ws, env, timeout)
        seconds = time.perf_counter() - started
        shown = catalogue.normalise(out)
        after = snapshot(ws)
        outcome: dict[str, object] = {
            "id": case.id,
            "command": case.command,
            "exit": code,
            "seconds": round(seconds, 1),
        }
        if code is not None and any(word in out for word in NO_OPTION):
            outcome["option_did_not_exist"] = True
        else:
            outcome["traceback"] = TRACEBACK in out
            outcome["timed_out"] = code is None
            outcome["wrong_exit"] = code != case.code
            outcome["missing_words"] = [w for w in case.words if catalogue.normalise(w) not in shown]
            changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
            changed += [p for p in case.absent if (ws / p).exists()]
            outcome["disk_changed"] = changed
        outcome["output"] = out[-1500:]
        outcomes.append(outcome)
        problems = _problems(outcome)
        if problems:
            print(f"{case.id}: {', '.join(problems)} (exit {code}) | {shown[-300:]}", flush=True)
        if not keep_going:  # the case directories hold copies of the base run's checkpoints
            _remove(ws)
    if not keep_going:
        _remove(work)
    return outcomes


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _problems(outcome: dict[str, object]) -> list[str]:
    if outcome.get("option_did_not_exist"):
        return ["option did not exist"]
    names = {"traceback": "traceback", "timed_out": "timed out", "wrong_exit": "exit code", "missing_words": "message",
             "disk_changed": "disk"}  # fmt: skip
    return [label for key, label in names.items() if outcome.get(key)]


def summarise(outcomes: list[dict[str, object]], pchmr: str) -> str:
    applicable = [o for o in outcomes if not o.get("option_did_not_exist")]

    def count(key: str) -> int:
        return sum(1 for o in applicable if o.get(key))

    clean = sum(1 for o in applicable if not _problems(o))
    commands = sorted({str(o["command"]) for o in outcomes})
    lines = [
        f"pchmr: {pchmr}",
        f"cases: {len(outcomes)} over {len(commands)} commands ({', '.join(commands)})",
        f"option did not exist (not applicable): {len(outcomes) - len(applicable)}",
        f"applicable: {len(applicable)}",
        f"  tracebacks:                {count('traceback')}",
        f"  timed out (input accepted): {count('timed_out')}",
        f"  exit code not the expected: {count('wrong_exit')}",
        f"  message lacks words:       {count('missing_words')}",
        f"  disk changed:              {count('disk_changed')}",
        f"  clean (none of these):     {clean}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pchmr", required=True, help="the pchmr executable of the checkout to measure")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as accepted")
    parser.add_argument("--only", help="run only the cases whose id contains this text")
    parser.add_argument("--json", type=Path, help="write every case's outcome to this file")
    parser.add_argument("--keep", action="store_true", help="keep each case's working directory")
    args = parser.parse_args()
    outcomes = census(args.pchmr, args.timeout, args.only, args.keep)
    summary = summarise(outcomes, args.pchmr)
    print(summary)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "cases": outcomes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
