"""The access log line: exactly what aiohttp's own logger writes (message and extra
fields), through the service's app; other formats are aiohttp's."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import ip_network

import aiohttp
import pytest
from aiohttp import HttpVersion10, web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_log import AccessLogger as AiohttpAccessLogger

from digitalme.accesslog import SERVICE_FORMAT, AccessLogger
from digitalme.config import Settings
from digitalme.web import create_app
from tests.conftest import migrate

EXTRA = (
    "remote_address",
    "first_request_line",
    "response_status",
    "response_size",
    "request_time_frac",
)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> tuple[logging.Logger, Records]:
    logger = logging.getLogger("test.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    records = Records()
    logger.handlers = [records]
    return logger, records


@pytest.mark.parametrize("log_format", [SERVICE_FORMAT, '%s %b "%{User-Agent}i"'])
def test_the_line_is_aiohttps(captured: tuple[logging.Logger, Records], log_format: str) -> None:
    logger, records = captured
    cases = [
        (
            make_mocked_request("GET", "/health", headers={"User-Agent": "probe"}),
            web.json_response({"status": "ok"}),
            0.000123,
        ),
        (
            make_mocked_request("POST", "/api/v1/x?limit=3&before=9", version=HttpVersion10),
            web.Response(status=404, text="no such thing"),
            12.5,
        ),
    ]
    for request, response, seconds in cases:
        AiohttpAccessLogger(logger, log_format).log(request, response, seconds)
        AccessLogger(logger, log_format).log(request, response, seconds)
    for theirs, ours in zip(records.records[::2], records.records[1::2], strict=True):
        assert ours.getMessage() == theirs.getMessage()
        assert ours.levelno == theirs.levelno == logging.INFO
        for field in EXTRA:
            assert getattr(ours, field, None) == getattr(theirs, field, None), field


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[str]:
    """The app as `digitalme serve` runs it (the runner names the format, the app its
    logger class), on a free loopback port: its base URL."""
    await migrate(settings.db_path)
    runner = web.AppRunner(create_app(settings), access_log_format=SERVICE_FORMAT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_the_service_logs_each_request(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    async with served(make_settings()) as base:
        with caplog.at_level(logging.INFO, logger="aiohttp.access"):
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{base}/health?probe=1") as response,
            ):
                assert response.status == 200
                body = await response.read()
    [record] = [r for r in caplog.records if r.name == "aiohttp.access"]
    assert record.pathname.endswith("digitalme/accesslog.py")  # ours, not aiohttp's
    # %b is what aiohttp counts: the bytes sent, headers included.
    assert re.fullmatch(
        r'127\.0\.0\.1 "GET /health\?probe=1 HTTP/1\.1" 200 (\d+) \d\.\d{6}s', record.getMessage()
    ), record.getMessage()
    assert record.response_size > len(body)


def test_the_record_is_what_logging_makes(captured: tuple[logging.Logger, Records]) -> None:
    """A copied record has every attribute a LogRecord made by logging has, with this
    line's time; from another thread, that thread's."""
    logger, records = captured
    request = make_mocked_request("GET", "/health")
    access = AccessLogger(logger, SERVICE_FORMAT)
    before = time.time()
    access.log(request, web.json_response({"status": "ok"}), 0.001)
    after = time.time()
    thread = threading.Thread(target=access.log, args=(request, web.Response(status=204), 0.002))
    thread.start()
    thread.join()
    first, other = records.records
    made = logging.LogRecord(logger.name, logging.INFO, "x", 0, "m", None, None)
    for record in (first, other):
        assert set(vars(made)) <= set(vars(record))
        assert (record.name, record.levelname, record.module, record.funcName) == (
            logger.name,
            "INFO",
            "accesslog",
            None,
        )
    assert before <= first.created <= after
    assert first.msecs == int((first.created - int(first.created)) * 1000)
    assert first.relativeCreated == pytest.approx(
        (first.created - made.created) * 1000 + made.relativeCreated, abs=0.01
    )
    assert first.thread == threading.get_ident() and other.thread == thread.ident
    assert other.getMessage().startswith('- "GET /health HTTP/1.1" 204 ')  # no peer


async def test_the_line_names_the_client_behind_trusted_proxies(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    # Behind Caddy (loopback, trusted) and a load balancer it trusts (10.0.0.9): the client.
    settings = make_settings(
        trusted_proxies=(ip_network("127.0.0.1/32"), ip_network("10.0.0.9/32"))
    )
    async with served(settings) as base:
        with caplog.at_level(logging.INFO, logger="aiohttp.access"):
            async with aiohttp.ClientSession() as http:
                for forwarded in ("203.0.113.7, 10.0.0.9", "198.51.100.1, 203.0.113.8"):
                    async with http.get(
                        f"{base}/health", headers={"X-Forwarded-For": forwarded}
                    ) as response:
                        assert response.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    # The second chain's last hop is no trusted proxy: that hop is the client.
    assert [line.split()[0] for line in lines] == ["203.0.113.7", "203.0.113.8"], lines
