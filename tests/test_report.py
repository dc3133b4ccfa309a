"""`fairbench report`: one self-contained HTML page, checked in a real headless Chromium.

The browser is driven over the Chrome DevTools Protocol (a websocket, through aiohttp): console
API errors, uncaught exceptions and browser log errors (failed loads, Content-Security-Policy
violations) are collected while the page loads, the DOM is queried for every section, and a
full-page screenshot is saved. Control pages with deliberate errors prove the detector sees them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from tiny import TINY_DATA, TINY_RUN

from fairbench import cache
from fairbench.cli import main

SCREENSHOT_DIR = Path(os.environ.get("FAIRBENCH_SCREENSHOTS", tempfile.gettempdir()))
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


@dataclass
class Page:
    errors: list[str] = field(default_factory=list)
    dom: dict = field(default_factory=dict)
    screenshot: bytes = b""


class DevTools:
    """A minimal Chrome DevTools Protocol session: commands by id, events collected."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive(timeout=60)).data)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    async def wait_for(self, event: str, timeout: float = 60) -> None:
        async def seen() -> None:
            while not any(e.get("method") == event for e in self.events):
                self.events.append(json.loads((await self.ws.receive()).data))

        await asyncio.wait_for(seen(), timeout)

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append(
                    f"exception: {details.get('text', '')} {details.get('exception', {}).get('description', '')}"
                )
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(f"log ({params['entry']['source']}): {params['entry']['text']}")
        return out


DOM_QUERY = """(() => ({
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    images: document.images.length,
    broken_images: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length,
    leaderboards: document.querySelectorAll('section.leaderboard table').length,
    links: [...document.querySelectorAll('a[href^="http"]')].map(a => a.href),
    text: document.body.innerText,
}))()"""


async def _inspect(browser: str, urls: list[str], profile: Path) -> list[Page]:
    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--window-size=1280,900",
            "about:blank"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            targets = None
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as reply:
                        targets = [t for t in await reply.json() if t["type"] == "page"]
                    if targets:
                        break
                await asyncio.sleep(0.2)
            assert targets, "Chromium started no page target"
            async with session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                for domain in ("Runtime", "Log", "Page"):
                    await tools.call(f"{domain}.enable")
                pages = []
                for url in urls:
                    tools.events.clear()
                    await tools.call("Page.navigate", url=url)
                    await tools.wait_for("Page.loadEventFired")
                    await asyncio.sleep(0.5)  # late console messages
                    dom = await tools.call("Runtime.evaluate", expression=DOM_QUERY, returnByValue=True)
                    shot = await tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                    pages.append(Page(tools.errors(), dom["result"]["value"], base64.b64decode(shot["data"])))
                return pages
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def inspect(urls: list[str], tmp_path: Path) -> list[Page]:
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium on this machine: install it with 'apt-get install -y chromium' (.ci/run does)")
    return asyncio.run(_inspect(browser, urls, tmp_path / "profile"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Two methods on synthetic data, a two-objective study of one trial, and a counts report."""
    root = tmp_path_factory.mktemp("report")
    res = root / "results"
    common = [*TINY_RUN, *TINY_DATA, "--epochs", "1", "--results-dir", str(res)]
    for method in ("erm", "nir"):
        out = CliRunner().invoke(main, ["run", "-m", method, *common])
        assert out.exit_code == 0, out.output
    out = CliRunner().invoke(
        main, ["tune", "-m", "nir", *common, "--trials", "1", "--objectives", "val/auc,val/sex/eo_gap"]
    )
    assert out.exit_code == 0, out.output
    data = root / "data"
    (data / "synthetic").mkdir(parents=True)
    meta = pd.DataFrame(
        {"split": ["train"] * 3 + ["test"] * 2, "label": [0, 1, 1, 0, 1], "sex": [0, 1, -1, 1, 0], "age": [0] * 5}
    )
    report = cache.counts_report(meta, {"sex": ["female", "male"], "age": ["<60", "≥60"]})
    cache.write_report(data / "synthetic", report)
    return res, data


def test_report_is_self_contained_and_loads_cleanly_in_chromium(results, tmp_path):
    res, data = results
    page_path = tmp_path / "report.html"
    args = ["report", "--results-dir", str(res), "--data-dir", str(data), "--bootstrap", "100", "-o", str(page_path)]
    out = CliRunner().invoke(main, [*args, "--mlflow-url", "http://mlflow.example:5000/"])
    assert out.exit_code == 0, out.output
    text = page_path.read_text()
    assert "<script" not in text and 'src="http' not in text and "url(" not in text  # nothing to fetch

    bad = tmp_path / "control_errors.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><script>console.error('planted'); undefined_fn();</script></body></html>"
    )
    blocked = tmp_path / "control_csp.html"
    blocked.write_text(text.replace("</body>", '<img src="https://example.org/x.png"></body>'))
    page, control, csp = inspect([p.as_uri() for p in (page_path, bad, blocked)], tmp_path)

    assert page.errors == []
    assert any("planted" in e for e in control.errors) and any("undefined_fn" in e for e in control.errors)
    assert any("Content Security Policy" in e for e in csp.errors), csp.errors

    ids = set(page.dom["ids"])
    assert {"protocol", "ranks", "studies", "datasets", "methods", "runs-synthetic"} <= ids
    assert {"leaderboard-synthetic-sex", "leaderboard-synthetic-age"} <= ids
    assert page.dom["leaderboards"] == 2
    # per attribute a trade-off and a rates plot, plus the study's Pareto front, all decoded
    assert page.dom["images"] == 5 and page.dom["broken_images"] == 0
    body = page.dom["text"]
    assert "Shoby, Palmer & Kurian" in body  # the NIR citation
    assert "female" in body and "train neg" in body  # the counts table
    assert "val/sex/eo_gap" in body  # the study's objectives and front
    run_links = [u for u in page.dom["links"] if "/#/experiments/" in u]
    assert len(run_links) >= 2 + 1 and all(u.startswith("http://mlflow.example:5000/#/experiments/") for u in run_links)

    assert page.screenshot.startswith(b"\x89PNG")
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    (SCREENSHOT_DIR / "fairbench_report.png").write_bytes(page.screenshot)


def test_report_without_runs_is_one_clear_error(tmp_path):
    out = CliRunner().invoke(main, ["report", "--results-dir", str(tmp_path / "empty")])
    assert out.exit_code != 0
    assert "no MLflow store" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "empty" / "report.html").exists()
