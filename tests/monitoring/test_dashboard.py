"""The DigitalMe overview console (the dashboard) in headless Chromium, on real metrics.

Debian's Prometheus (unpacked by scripts/bootstrap.sh, with the JavaScript its console pages
load) serves the role's console template and library, and scrapes, every second:

- the real app (``digitalme serve``) with Claude at the stand-in, the Litestream control
  socket at its stand-in (replica synced 2 s ago), after a few chat turns (one of them
  failed by Claude: a 503) and a 404;
- Debian's node-exporter on this machine, whose textfile folder holds a restore drill
  result written by the drills' own renderer (``render_metrics`` of
  tools/drill_report.py).

The page must render every tile and graph from those metrics, log no error, fetch nothing
but Prometheus, and its screenshot goes to artifacts/dashboard.png.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from playwright.async_api import async_playwright

from standins.anthropic_api import AnthropicStandin, Error
from standins.litestream_socket import run_litestream_socket
from tests.support.process import (
    die_with_parent,
    free_port,
    prepare_database,
    run_cli,
    running_service_async,
    service_env,
)
from tools.drill_report import render_metrics

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".cache/prometheus-tools"
ROLE_FILES = REPO / "roles/monitoring/files/etc/prometheus"
# The app's DIGITALME_METRICS_TOKEN: Prometheus sends it from a file, as the role's
# scrape of the app does (authorization.credentials_file).
METRICS_TOKEN = "dashboard-metrics-token-" + "0" * 24
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


def tool(name: str) -> Path:
    path = TOOLS / "usr/bin" / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/bootstrap.sh", pytrace=False)
    return path


class Daemon:
    """A helper daemon of the test, its output in a log file, stopped on the way out."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def textfile_dir(tmp_path: Path) -> Path:
    """node-exporter's textfile folder with a passed drill, as the drill writes it."""
    folder = tmp_path / "textfile"
    folder.mkdir()
    finished = time.time() - 3 * 3600
    result = {
        "ok": True,
        "duration_seconds": 2.3,
        "finished_epoch": finished,
        "last_success_epoch": finished,
        "replica_age_seconds": 4.0,
        "behind_seconds": 0.0,
        "restored_bytes": 118784,
        "rows": {"messages": 12, "conversations": 3},
    }
    (folder / "digitalme_backup.prom").write_text(render_metrics(result))
    return folder


@pytest.fixture
def node_exporter(tmp_path: Path, textfile_dir: Path) -> Iterator[str]:
    port = free_port()
    daemon = Daemon(
        [
            str(tool("prometheus-node-exporter")),
            f"--web.listen-address=127.0.0.1:{port}",
            "--no-collector.systemd",
            f"--collector.textfile.directory={textfile_dir}",
        ],
        tmp_path / "node-exporter.log",
    )
    yield f"127.0.0.1:{port}"
    daemon.stop()


@pytest.fixture
async def app(tmp_path: Path, standin: AnthropicStandin) -> AsyncIterator[tuple[str, str]]:
    """The real app, with a chat token; Litestream's control socket at its stand-in."""
    socket_path = tmp_path / "litestream.sock"
    env = service_env(
        tmp_path,
        anthropic_base_url=standin.base_url,
        DIGITALME_LITESTREAM_SOCKET=str(socket_path),
        DIGITALME_METRICS_TOKEN=METRICS_TOKEN,
    )
    prepare_database(env)
    token = run_cli(["token", "create", "--name", "dashboard", "--scope", "chat", "--quiet"], env)
    assert token.returncode == 0, token.stderr
    async with (
        run_litestream_socket(socket_path, tmp_path / "digitalme.db") as litestream,
        running_service_async(env, tmp_path) as service,
    ):
        litestream.synced(2)
        yield service.base_url, token.stdout.strip()


def prometheus_config(tmp_path: Path, app_address: str, node_address: str) -> Path:
    rules = tmp_path / "settings.rules.yml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "digitalme-settings",
                        "rules": [
                            {
                                "record": "digitalme:claude_daily_token_budget",
                                "expr": "vector(1000000)",
                            }
                        ],
                    }
                ]
            }
        )
    )
    token_file = tmp_path / "digitalme-metrics-token"
    token_file.write_text(METRICS_TOKEN)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROLE_FILES / "rules/digitalme.rules.yml"), str(rules)],
        "scrape_configs": [
            {
                "job_name": "digitalme",
                "authorization": {"credentials_file": str(token_file)},
                "static_configs": [{"targets": [app_address], "labels": {"host": "app"}}],
            },
            {
                "job_name": "node",
                "static_configs": [{"targets": [node_address], "labels": {"host": "app"}}],
            },
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


async def chat_traffic(base_url: str, token: str, standin: AnthropicStandin) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(f"{base_url}/api/v1/conversations") as created:
            conversation = (await created.json())["id"]
        url = f"{base_url}/api/v1/conversations/{conversation}/messages"
        for i in range(4):
            if i == 2:
                standin.script(Error(status=500, should_retry=False))
            async with session.post(url, json={"text": f"How is the garden, {i}?"}) as said:
                assert said.status == (503 if i == 2 else 201), await said.text()
        async with session.get(f"{base_url}/api/v1/conversations/no-such-id") as missing:
            assert missing.status == 404


async def test_the_overview_renders_real_metrics_in_chromium(
    tmp_path: Path, app: tuple[str, str], node_exporter: str, standin: AnthropicStandin
) -> None:
    base_url, token = app
    # Once before Prometheus starts, so that every series exists at its first scrape (a
    # counter's first sample has no increase), and again while it scrapes.
    await chat_traffic(base_url, token, standin)
    port = free_port()
    config = prometheus_config(tmp_path, urlsplit(base_url).netloc, node_exporter)
    prometheus = Daemon(
        [
            str(tool("prometheus")),
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.console.templates={ROLE_FILES / 'consoles'}",
            f"--web.console.libraries={ROLE_FILES / 'console_libraries'}",
            f"--web.local-assets={TOOLS / 'usr/share/prometheus/web'}",
        ],
        tmp_path / "prometheus.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            # Traffic once Prometheus scrapes, so that its rates see it.
            await wait_for(session, url, 'count(up{host="app"} == 1) == 2')
            await chat_traffic(base_url, token, standin)
            counted = 'sum(increase(digitalme_http_requests_total{status="%s"}[1m])) > 0'
            await wait_for(session, url, f"{counted % 503} and on() {counted % 201}")
            async with session.get(f"{url}/consoles/digitalme.html") as page:
                html = await page.text()
                assert page.status == 200, html
        await look_at_it(f"{url}/consoles/digitalme.html", html)
    finally:
        prometheus.stop()


async def wait_for(session: aiohttp.ClientSession, url: str, query: str) -> None:
    """Until the query has a result in Prometheus."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{url}/api/v1/query", params={"query": query}) as answer:
                if answer.status == 200 and (await answer.json())["data"]["result"]:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    pytest.fail(f"Prometheus never had a result for {query}", pytrace=False)


def tile(html: str, label: str) -> tuple[str, str]:
    """(css classes, value) of the tile with this label, from the rendered template."""
    found = re.search(
        r'<div class="dm-tile ([^"]*)"><div class="dm-label">'
        + re.escape(label)
        + r'</div><div class="dm-value">([^<]*)</div>',
        html,
    )
    assert found, f"no {label!r} tile"
    return found[1].strip(), found[2]


async def look_at_it(url: str, html: str) -> None:
    # The template ran on the metrics above (Prometheus renders it server-side).
    assert "error executing template" not in html
    assert tile(html, "Public URL") == ("", "no probe")
    assert tile(html, "Claude") == ("dm-ok", "closed")  # one failure opens nothing
    assert re.fullmatch(r"\d+\.\d\d/s", tile(html, "Requests")[1]), tile(html, "Requests")
    assert tile(html, "Server errors")[0] == "dm-bad"  # the 503
    assert tile(html, "Last restore drill") == ("dm-ok", "passed")
    assert tile(html, "Replication lag")[0] == "dm-ok"
    assert tile(html, "Alerts firing") == ("dm-ok", "0")
    assert float(tile(html, "Tokens, 24 h")[1].rstrip("k")) > 0
    assert tile(html, "Inbox depth") == ("dm-ok", "0")

    args = [*CHROMIUM_ARGS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]
    console: list[str] = []
    foreign: list[str] = []
    own = urlsplit(url).netloc
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on(
                "console",
                lambda m: (
                    console.append(f"{m.type}: {m.text}")
                    if m.type in ("error", "warning")
                    else None
                ),
            )
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.on(
                "request",
                lambda r: foreign.append(r.url) if urlsplit(r.url).netloc != own else None,
            )
            page.on(
                "response",
                lambda r: console.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None,
            )
            # The graphs over the last two minutes (the time bar's state lives in the hash).
            await page.goto(url + '#pctc{"duration":120,"endTime":0}')
            for graph in ("requests", "latency", "claude", "tokens", "inbox", "lag", "disk"):
                await page.wait_for_selector(f"#{graph} svg path", state="attached", timeout=30_000)
            await page.wait_for_timeout(500)
            (REPO / "artifacts").mkdir(exist_ok=True)
            await page.screenshot(path=str(REPO / "artifacts" / "dashboard.png"), full_page=True)
        finally:
            await browser.close()
    assert console == []
    assert foreign == []
