"""A page checked in a real headless browser: console errors, exceptions, failed loads, and
whether every image rendered.

:func:`check_page` starts headless Chromium with ``--remote-debugging-pipe`` and speaks the Chrome
DevTools Protocol over that pipe (file descriptors 3 and 4 of the browser, one JSON message per
NUL-terminated chunk), so it needs no websocket library and no driver: it opens a tab, listens to
``Runtime.consoleAPICalled``, ``Runtime.exceptionThrown``, ``Log.entryAdded`` and
``Network.loadingFailed``, navigates to the page, waits for its load event, and evaluates, for
every ``<img>``, whether it is complete with a natural width above 0 and laid out with a width
above 0. The :class:`PageReport` lists all of it; :attr:`PageReport.errors` is what makes a page
fail (an error on the console, an uncaught exception, a failed load, an image that did not
render). It can also evaluate expressions of the caller (``evaluate=``) and take a full-page
screenshot (``screenshot=``).

:func:`find_chromium` looks for the browser: ``$PCHMR_CHROMIUM``, else the first of
:data:`CHROMIUM_NAMES` on ``PATH``. Tests skip when it finds none (Debian: ``apt-get install
chromium``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CHROMIUM_NAMES",
    "BrowserError",
    "ConsoleEntry",
    "ImageState",
    "PageReport",
    "check_page",
    "find_chromium",
]

#: The executables :func:`find_chromium` looks for on ``PATH``, in order.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
#: An environment variable naming the browser to use instead.
CHROMIUM_ENV = "PCHMR_CHROMIUM"
#: Seconds to keep listening after the images were checked, for late console messages.
SETTLE_SECONDS = 0.3

_IMAGES_JS = """
(async () => {
  const images = Array.from(document.images);
  await Promise.all(images.map(i => i.complete ? null :
    new Promise(done => { i.addEventListener('load', done); i.addEventListener('error', done); })));
  return images.map(i => ({
    src: (i.getAttribute('src') || '').slice(0, 80), alt: i.alt, complete: i.complete,
    naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
    shownWidth: i.getBoundingClientRect().width }));
})()
"""


class BrowserError(RuntimeError):
    """The browser could not be started or did not answer as the protocol says."""


@dataclass(frozen=True)
class ConsoleEntry:
    """Something the page said: ``source`` is ``console`` (``console.log`` and kin), ``exception``
    (uncaught), ``log`` (the browser's own log: a refused resource, a policy violation) or
    ``network`` (a failed load); ``level`` as the browser gives it (``error``, ``warning``, …)."""

    source: str
    level: str
    text: str
    url: str = ""

    def __str__(self) -> str:
        where = f" ({self.url})" if self.url else ""
        return f"{self.source} {self.level}: {self.text}{where}"


@dataclass(frozen=True)
class ImageState:
    """One ``<img>`` after the load: ``src`` (its first 80 characters), whether it rendered."""

    src: str
    alt: str
    complete: bool
    natural_width: int
    natural_height: int
    shown_width: float

    @property
    def rendered(self) -> bool:
        """Loaded and decoded (``complete`` and a natural width above 0) and laid out with a width."""
        return self.complete and self.natural_width > 0 and self.shown_width > 0


@dataclass(frozen=True)
class PageReport:
    """What :func:`check_page` saw."""

    url: str
    title: str
    browser: str
    entries: tuple[ConsoleEntry, ...]
    images: tuple[ImageState, ...]
    values: Mapping[str, Any] = field(default_factory=dict)
    screenshot: bytes | None = None

    @property
    def errors(self) -> list[str]:
        """Everything that makes the page fail: error-level console and log messages, uncaught
        exceptions, failed loads, images that did not render."""
        out = [str(e) for e in self.entries if e.level == "error" or e.source in ("exception", "network")]
        out += [f"image did not render: src={i.src!r} alt={i.alt!r} complete={i.complete} "
                f"naturalWidth={i.natural_width} shownWidth={i.shown_width:g}"
                for i in self.images if not i.rendered]  # fmt: skip
        return out

    @property
    def ok(self) -> bool:
        return not self.errors


def find_chromium() -> str | None:
    """The browser executable: ``$PCHMR_CHROMIUM`` if set, else the first of :data:`CHROMIUM_NAMES`
    on ``PATH``, else None."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _Session:
    """The DevTools protocol over the browser's pipe: commands out on our end of its fd 3,
    replies and events in from its fd 4."""

    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int) -> None:
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}

    def send(self, method: str, params: Mapping[str, Any] | None = None, session: str | None = None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": dict(params or {})}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            written = os.write(self.write_fd, data)
            data = data[written:]
        return self.next_id

    def _read(self, deadline: float) -> bool:
        """Read what arrived before ``deadline``; False when nothing did."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([self.read_fd], [], [], remaining)
        if not ready:
            return False
        chunk = os.read(self.read_fd, 1 << 20)
        if not chunk:
            raise BrowserError(f"the browser closed its DevTools pipe (exit code {self.proc.poll()})")
        self.buffer += chunk
        *messages, self.buffer = self.buffer.split(b"\0")
        for raw in messages:
            message = json.loads(raw)
            if "id" in message:
                self.replies[message["id"]] = message
            else:
                self.events.append(message)
        return True

    def call(self, method: str, params: Mapping[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        ident = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while ident not in self.replies:
            if not self._read(deadline) and time.monotonic() >= deadline:
                raise BrowserError(f"no reply to {method} within {timeout:g} s")
        reply = self.replies.pop(ident)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error'].get('message', reply['error'])}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            if not self._read(deadline) and time.monotonic() >= deadline:
                raise BrowserError(f"the page sent no {method} within {timeout:g} s")

    def settle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._read(deadline)


def _entries(events: list[dict[str, Any]], session: str) -> list[ConsoleEntry]:
    out = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", a.get("type", "")))) for a in params.get("args", [])
            )
            level = {"assert": "error", "warning": "warning"}.get(params.get("type", ""), params.get("type", "log"))
            out.append(ConsoleEntry("console", level, text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "exception")
            out.append(ConsoleEntry("exception", "error", text, details.get("url", "")))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            out.append(ConsoleEntry("log", entry.get("level", "info"), entry.get("text", ""), entry.get("url", "")))
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            out.append(ConsoleEntry("network", "error", params.get("errorText", "load failed"), params.get("type", "")))
    return out


def _url(target: str | Path) -> str:
    text = str(target)
    if "://" in text or text.startswith(("about:", "data:")):
        return text
    path = Path(text).resolve()
    if not path.exists():
        raise FileNotFoundError(f"no page at {path}")
    return path.as_uri()


def check_page(
    target: str | Path,
    *,
    chromium: str | None = None,
    evaluate: Mapping[str, str] | None = None,
    screenshot: tuple[int, int] | None = None,
    timeout: float = 60.0,
) -> PageReport:
    """Open ``target`` (a file path or a URL) in headless Chromium and report (module docstring).

    ``evaluate``: name → JavaScript expression, evaluated after the load, their values in
    :attr:`PageReport.values`. ``screenshot``: (width, minimum height) of the window; the PNG
    covers the whole page. :class:`BrowserError` when no browser is found or it fails to answer."""
    binary = chromium or find_chromium()
    if binary is None:
        raise BrowserError(f"no Chromium found (looked for ${CHROMIUM_ENV}, then {', '.join(CHROMIUM_NAMES)} on PATH)")
    url = _url(target)
    width, height = screenshot or (1280, 900)
    with tempfile.TemporaryDirectory(prefix="pchmr-chromium-") as profile:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()

        def child_fds() -> None:  # the browser reads commands on fd 3 and writes replies on fd 4
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)  # out of the way first: either may be 3 or 4
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)  # inheritable, unlike os.pipe()'s
            os.dup2(high_w, 4)

        args = [binary, "--headless", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-sync", "--mute-audio", f"--user-data-dir={profile}", f"--window-size={width},{height}"]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        stderr = open(Path(profile) / "stderr.log", "wb")  # closed below, after the browser is gone
        try:
            proc = subprocess.Popen([*args, "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr, preexec_fn=child_fds, close_fds=False,
                                    start_new_session=True)  # fmt: skip
        except OSError as exc:
            stderr.close()
            raise BrowserError(f"cannot start {binary}: {exc}") from None
        finally:
            os.close(to_browser_r)
            os.close(from_browser_w)
        cdp = _Session(proc, to_browser_w, from_browser_r)
        try:
            return _inspect(cdp, url, evaluate or {}, screenshot, timeout)
        except BrowserError as exc:
            stderr.flush()
            log = (Path(profile) / "stderr.log").read_text(errors="replace")[-2000:]
            raise BrowserError(f"{exc}; the browser's stderr ends with:\n{log}") from None
        finally:
            _stop(cdp, proc)
            os.close(to_browser_w)
            os.close(from_browser_r)
            stderr.close()


def _inspect(cdp: _Session, url: str, evaluate: Mapping[str, str], screenshot: tuple[int, int] | None,
             timeout: float) -> PageReport:  # fmt: skip
    version = cdp.call("Browser.getVersion", timeout=timeout).get("product", "")
    target = cdp.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
    session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True}, timeout=timeout)["sessionId"]
    for domain in ("Runtime", "Log", "Page", "Network"):
        cdp.call(f"{domain}.enable", session=session, timeout=timeout)
    if screenshot is not None:
        cdp.call("Emulation.setDeviceMetricsOverride", {"width": screenshot[0], "height": screenshot[1],
                 "deviceScaleFactor": 1, "mobile": False}, session=session, timeout=timeout)  # fmt: skip
    navigated = cdp.call("Page.navigate", {"url": url}, session=session, timeout=timeout)
    if navigated.get("errorText"):
        raise BrowserError(f"cannot open {url}: {navigated['errorText']}")
    cdp.wait_event("Page.loadEventFired", session, timeout)
    found = cdp.call("Runtime.evaluate", {"expression": _IMAGES_JS, "awaitPromise": True, "returnByValue": True},
                     session=session, timeout=timeout)  # fmt: skip
    images = tuple(ImageState(i["src"], i["alt"], bool(i["complete"]), int(i["naturalWidth"]), int(i["naturalHeight"]),
                              float(i["shownWidth"])) for i in found.get("result", {}).get("value", []))  # fmt: skip
    values: dict[str, Any] = {}
    for name, expression in evaluate.items():
        result = cdp.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session,
                          timeout=timeout)  # fmt: skip
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluating {name!r} threw: {result['exceptionDetails'].get('text')}")
        values[name] = result.get("result", {}).get("value")
    title = cdp.call("Runtime.evaluate", {"expression": "document.title", "returnByValue": True}, session=session,
                     timeout=timeout).get("result", {}).get("value", "")  # fmt: skip
    picture = None
    if screenshot is not None:
        metrics = cdp.call("Page.getLayoutMetrics", session=session, timeout=timeout)
        size = metrics.get("cssContentSize") or metrics.get("contentSize", {})
        clip = {"x": 0, "y": 0, "width": screenshot[0], "height": max(screenshot[1], int(size.get("height", 0))),
                "scale": 1}  # fmt: skip
        shot = cdp.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip},
                        session=session, timeout=timeout)  # fmt: skip
        picture = base64.b64decode(shot["data"])
    cdp.settle(SETTLE_SECONDS)
    return PageReport(url, str(title), str(version), tuple(_entries(cdp.events, session)), images, values, picture)


def _stop(cdp: _Session, proc: subprocess.Popen) -> None:
    """Close the browser through the protocol; kill the process group this call started if it lingers."""
    if proc.poll() is None:
        try:
            cdp.send("Browser.close")
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:  # the session start_new_session made: only this browser's own processes (its helpers may outlive it)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
