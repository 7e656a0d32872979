"""Open an HTML page in headless Chromium and report what a person would see: errors, plots, a screenshot.

We drive Chromium over the DevTools protocol on a pipe (`--remote-debugging-pipe`: commands in on
fd 3, replies and events out on fd 4, JSON messages ending in a NUL byte), so nothing beyond the
Debian `chromium` package and the standard library is needed: no chromedriver, no websocket client.
Console errors are the protocol's Runtime.consoleAPICalled (error/assert), Runtime.exceptionThrown
and Log.entryAdded (level error) events seen from navigation until the plots have rendered.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")

# A panel counts as rendered when plotly has drawn its SVG inside the panel's plot div.
COUNT_JS = """(() => {
  const panels = [...document.querySelectorAll('.aq-panel')];
  const drawn = panels.filter(p => p.querySelector('.js-plotly-plot .main-svg'));
  return JSON.stringify({panels: panels.length, rendered: drawn.length,
                         plots: document.querySelectorAll('.js-plotly-plot').length});
})()"""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH (or $CHROMIUM), or None."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageReport:
    console_errors: list[str] = field(default_factory=list)
    panels: int = 0
    rendered: int = 0
    plots: int = 0
    screenshot: Path | None = None
    first_view: Path | None = None
    value: object = None  # what the `evaluate` expression returned


class _DevTools:
    """A Chromium process and its DevTools pipe: send commands, wait for replies and events."""

    def __init__(self, binary: str, profile: str):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        # Move the child's ends above the fds 3 and 4 they must land on, so dup2 cannot clobber them.
        child_in, child_out = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        os.close(to_r)
        os.close(from_w)

        def wire():
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [binary, "--headless", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-gpu",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]
        if os.geteuid() == 0:  # Chromium refuses to run as root with its sandbox (CI runs as root)
            args.append("--no-sandbox")
        # Chromium's own log goes to a file: a pipe nobody reads could fill up and stall the browser.
        self.log_path = Path(profile) / "chromium-stderr.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args + ["about:blank"], preexec_fn=wire, pass_fds=(3, 4),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        os.close(child_in)
        os.close(child_out)
        self.write_fd, self.read_fd = to_w, from_r
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict | None:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                err = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Chromium closed its DevTools pipe (exit {self.proc.poll()}): {err}")
            self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply is None:
                raise TimeoutError(f"Chromium did not answer {method} within {timeout} s")
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"Chromium: {method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            msg = self._read_message(deadline)
            if msg is None:
                return None
            if msg.get("method") == method:
                return msg
            if "method" in msg:
                self.events.append(msg)

    def close(self) -> None:
        try:
            os.write(self.write_fd, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self.write_fd)
            os.close(self.read_fd)


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                    for a in p.get("args", [])))
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            out.append(f"log error: {entry.get('text')} ({entry.get('url', '')})")
    return out


def inspect_page(html_path: str | Path, screenshot: str | Path | None = None, width: int = 1400,
                 timeout: float = 90, evaluate: str | None = None, render_wait: float = 60,
                 first_view: str | Path | None = None, height: int = 900) -> PageReport:
    """Load a local HTML file, wait until every .aq-panel has a drawn plot (at most render_wait s), report.

    `screenshot` is the whole page (width wide), `first_view` what a window of width × height shows on
    opening the page.

    `timeout` bounds each browser step (start, load, screenshot); a slow machine needs it generous.

    `evaluate` is a JavaScript expression (it may return a promise) run after the plots are drawn,
    e.g. to move a slider; its JSON-able result is report.value and its errors are console errors.
    """
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found (tried $CHROMIUM, " + ", ".join(BROWSERS) +
                                "); install it with `apt-get install -y chromium`")
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"no HTML page at {html_path}")
    with tempfile.TemporaryDirectory(prefix="aq-chromium-") as profile:
        tools = _DevTools(binary, profile)
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
            session = tools.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
                                 timeout=timeout)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                tools.send(f"{domain}.enable", session=session, timeout=timeout)
            tools.send("Emulation.setDeviceMetricsOverride",
                       {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
            tools.send("Page.navigate", {"url": html_path.as_uri()}, session=session, timeout=timeout)
            if tools.wait_event("Page.loadEventFired", timeout) is None:
                raise TimeoutError(f"{html_path} did not finish loading in {timeout} s")
            deadline = time.monotonic() + render_wait
            while True:
                result = tools.send("Runtime.evaluate", {"expression": COUNT_JS, "returnByValue": True},
                                    session=session, timeout=timeout)
                counts = json.loads(result["result"]["value"])
                if counts["rendered"] >= counts["panels"] or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            report = PageReport(panels=counts["panels"], rendered=counts["rendered"], plots=counts["plots"])
            if evaluate is not None:
                result = tools.send("Runtime.evaluate", {"expression": evaluate, "returnByValue": True,
                                                         "awaitPromise": True}, session=session, timeout=timeout)
                if "exceptionDetails" in result:
                    d = result["exceptionDetails"]
                    report.console_errors.append(
                        f"evaluate: {d.get('exception', {}).get('description') or d.get('text')}")
                report.value = result.get("result", {}).get("value")
            if first_view is not None:
                shot = tools.send("Page.captureScreenshot", {
                    "format": "png", "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}},
                    session=session, timeout=timeout)
                report.first_view = Path(first_view)
                report.first_view.parent.mkdir(parents=True, exist_ok=True)
                report.first_view.write_bytes(base64.b64decode(shot["data"]))
            if screenshot is not None:
                size = tools.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
                shot = tools.send("Page.captureScreenshot", {
                    "format": "png", "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1}},
                    session=session, timeout=timeout)
                report.screenshot = Path(screenshot)
                report.screenshot.parent.mkdir(parents=True, exist_ok=True)
                report.screenshot.write_bytes(base64.b64decode(shot["data"]))
            tools.send("Runtime.evaluate", {"expression": "1"}, session=session)  # drain late events
            report.console_errors = _errors(tools.events) + report.console_errors
            return report
        finally:
            tools.close()
