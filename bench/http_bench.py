"""Side-by-side HTTP figures on 127.0.0.1, in one run:

1. ``GET /health`` requests per second on the real DigitalMe service (``digitalme serve``,
   a subprocess) and on a bare aiohttp hello-world server (bench/hello_server.py), and
   their ratio: what DigitalMe's middleware, headers and logging cost per request;
2. an authenticated ``GET /api/v1/conversations/{id}/messages`` (a conversation of
   ``--history`` turns) on the service, as a ratio to the bare server's ``/health``;
3. chat turns per second: ``POST /api/v1/conversations/{id}/messages`` (JSON, not
   streamed) with an instant Claude stand-in (standins/anthropic_api.py, a
   subprocess), each turn stored in SQLite twice (message and reply) and checked, on the
   service and on a minimal reference doing the same work with the same libraries
   (bench/chat_reference.py), and their ratio.

Every run is bounded in count and time. Run from the repository root:

    .venv/bin/python -m bench.http_bench [--duration 5] [--turns 300] [--client wrk]

See bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tests.support` importable
    sys.path.insert(0, str(REPO))

from digitalme.persona import build_prompt, load_persona_file  # noqa: E402
from tests.support.process import (  # noqa: E402
    SAMPLE_PERSONA,
    ProcessFailed,
    ServiceProcess,
    StandinProcess,
    die_with_parent,
    free_port,
    run_cli,
    service_env,
)

WARMUP_REQUESTS = 200
# Production's values where the tests' service_env() picks quick failures, and the rate
# limit on (as in production) with a limit the load never reaches, so its check is paid.
PRODUCTION = {
    "DIGITALME_CLAUDE_TIMEOUT_SECONDS": "60",
    "DIGITALME_CLAUDE_MAX_RETRIES": "2",
    "DIGITALME_RATE_LIMIT_PER_MINUTE": "1000000",
}


@dataclass
class Result:
    name: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    error_kinds: dict[str, int] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None

    def __post_init__(self) -> None:
        if self.latencies_ms and self.p50_ms is None:
            ordered = sorted(self.latencies_ms)
            self.p50_ms = statistics.median(ordered)
            self.p99_ms = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        del data["latencies_ms"]
        data["per_second"] = round(self.per_second, 1)
        return data


# --- load generators ------------------------------------------------------------------------


async def closed_loop(
    name: str,
    *,
    total: int,
    duration: float,
    concurrency: int,
    one: Callable[[int, int], Awaitable[str | None]],
) -> Result:
    """``concurrency`` workers call ``one(worker, n)`` back to back until ``total`` calls
    are made or ``duration`` seconds pass; ``one`` returns None if the answer was right,
    else what was wrong (e.g. ``HTTP 500``)."""
    started = time.perf_counter()
    deadline = started + duration
    issued = 0
    latencies: list[float] = []
    error_kinds: Counter[str] = Counter()

    async def worker(index: int) -> None:
        nonlocal issued
        while issued < total and time.perf_counter() < deadline:
            issued += 1
            begin = time.perf_counter()
            try:
                wrong = await one(index, issued)
            except (aiohttp.ClientError, TimeoutError) as exc:
                wrong = type(exc).__name__
            latencies.append((time.perf_counter() - begin) * 1000)
            if wrong:
                error_kinds[wrong] += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return Result(
        name,
        len(latencies),
        error_kinds.total(),
        time.perf_counter() - started,
        latencies,
        dict(error_kinds),
    )


async def get_load(
    session: aiohttp.ClientSession,
    name: str,
    url: str,
    *,
    total: int,
    duration: float,
    concurrency: int,
    headers: dict[str, str] | None = None,
) -> Result:
    async def one(_worker: int, _n: int) -> str | None:
        async with session.get(url, headers=headers) as response:
            await response.read()
            return None if response.status == 200 else f"HTTP {response.status}"

    return await closed_loop(name, total=total, duration=duration, concurrency=concurrency, one=one)


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match[1]) * _WRK_UNITS[match[2]]


def wrk_load(
    name: str, url: str, *, duration: float, concurrency: int, headers: dict[str, str] | None = None
) -> Result:
    """``wrk`` (one thread, so one core stays for the server), bounded by time."""
    header_args = [
        arg for key, value in (headers or {}).items() for arg in ("-H", f"{key}: {value}")
    ]
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            *header_args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
        preexec_fn=die_with_parent,
    ).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(ms|s)", out)
    if total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    seconds = float(total[2]) / (1000 if total[3] == "ms" else 1)
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket:
        errors += sum(int(n) for n in socket.groups())
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    return Result(
        name,
        int(total[1]),
        errors,
        seconds,
        p50_ms=_wrk_ms(p50[1]) if p50 else None,
        p99_ms=_wrk_ms(p99[1]) if p99 else None,
    )


async def chat_load(
    session: aiohttp.ClientSession,
    name: str,
    base_url: str,
    token: str,
    *,
    total: int,
    duration: float,
    concurrency: int,
) -> Result:
    """Non-streamed chat turns, one conversation per worker, every reply checked."""
    auth = {"Authorization": f"Bearer {token}"}
    conversations = []
    for _ in range(concurrency):
        async with session.post(f"{base_url}/api/v1/conversations", headers=auth) as response:
            if response.status != 201:
                raise RuntimeError(f"cannot create a conversation: {await response.text()}")
            conversations.append((await response.json())["id"])

    async def one(worker: int, n: int) -> str | None:
        text = f"bench turn {n}"
        async with session.post(
            f"{base_url}/api/v1/conversations/{conversations[worker]}/messages",
            json={"text": text},
            headers=auth,
        ) as response:
            if response.status != 201:
                await response.read()
                return f"HTTP {response.status}"
            body = await response.json()
            # After a failed turn its message is still stored, so the next one reaches
            # Claude merged with it ("turn a\n\nturn b"): the reply ends with our text.
            reply = body["reply"]["text"]
            ok = reply.startswith("Stand-in reply to: ") and reply.endswith(text)
            return None if ok else "wrong reply"

    return await closed_loop(name, total=total, duration=duration, concurrency=concurrency, one=one)


async def conversation_with_history(
    session: aiohttp.ClientSession, base_url: str, token: str, turns: int
) -> str:
    """A conversation of ``turns`` turns (2 x turns messages), made through the API."""
    auth = {"Authorization": f"Bearer {token}"}
    async with session.post(f"{base_url}/api/v1/conversations", headers=auth) as response:
        conversation: str = (await response.json())["id"]
    for n in range(turns):
        async with session.post(
            f"{base_url}/api/v1/conversations/{conversation}/messages",
            json={"text": f"history turn {n}: what do you think?"},
            headers=auth,
        ) as response:
            if response.status != 201:
                raise RuntimeError(f"cannot make the history: {await response.text()}")
    return conversation


# --- processes -------------------------------------------------------------------------------


@contextlib.contextmanager
def server(
    workdir: Path, name: str, module: str, *args: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """``python -m module --port PORT args...`` (an aiohttp server of the bench's own)."""
    port = free_port()
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port), *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=die_with_parent,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise ProcessFailed(f"{name} exited: {log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise ProcessFailed(f"{name} did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def hello_server(workdir: Path) -> contextlib.AbstractContextManager[str]:
    return server(workdir, "hello", "bench.hello_server")


@contextlib.contextmanager
def chat_reference(workdir: Path, standin: StandinProcess) -> Iterator[tuple[str, str]]:
    """The reference chat server on a database of its own (migrated, with a token and the
    persona's system prompt built once), Claude at the same stand-in."""
    home = workdir / "reference"
    home.mkdir()
    env = service_env(home, anthropic_base_url=standin.base_url)
    for args in (["migrate"], ["token", "create", "--name", "bench", "--scope", "chat", "--quiet"]):
        result = run_cli(args, env)
        if result.returncode != 0:
            raise ProcessFailed(f"digitalme {' '.join(args)} failed: {result.stderr}")
    prompt = home / "prompt.txt"
    persona, _ = load_persona_file(SAMPLE_PERSONA)
    prompt.write_text(build_prompt(persona))
    with server(
        workdir,
        "chat-reference",
        "bench.chat_reference",
        "--db",
        env["DIGITALME_DB_PATH"],
        "--persona-prompt",
        str(prompt),
        env={**env, "PYTHONPATH": str(REPO)},
    ) as url:
        yield url, result.stdout.strip()


@contextlib.contextmanager
def digitalme(
    workdir: Path,
    log_level: str,
) -> Iterator[tuple[ServiceProcess, str, StandinProcess]]:
    with contextlib.ExitStack() as stack:
        standin = StandinProcess(workdir / "standin").start()
        stack.callback(standin.stop)
        env = service_env(
            workdir,
            anthropic_base_url=standin.base_url,
            DIGITALME_LOG_LEVEL=log_level,
            DIGITALME_ENV="bench",
            **PRODUCTION,
        )
        for args in (
            ["migrate"],
            ["persona", "import", str(SAMPLE_PERSONA)],
            ["token", "create", "--name", "bench", "--scope", "chat", "--quiet"],
        ):
            result = run_cli(args, env)
            if result.returncode != 0:
                raise ProcessFailed(f"digitalme {' '.join(args)} failed: {result.stderr}")
        token = result.stdout.strip()
        service = ServiceProcess(env, workdir)
        stack.callback(service.stop)
        yield service.start(), token, standin


# --- the run ---------------------------------------------------------------------------------


def pick_client(choice: str) -> str:
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "aiohttp"
    if choice == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk, or --client aiohttp)")
    return choice


async def measure(
    args: argparse.Namespace,
    client: str,
    hello_url: str,
    service_url: str,
    token: str,
    reference_url: str,
    reference_token: str,
) -> dict[str, Result]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        conversation = await conversation_with_history(session, service_url, token, args.history)
        messages_url = f"{service_url}/api/v1/conversations/{conversation}/messages"
        auth = {"Authorization": f"Bearer {token}"}
        for url, headers in (
            (f"{hello_url}/health", None),
            (f"{service_url}/health", None),
            (messages_url, auth),
        ):  # warm up (connections, code paths)
            await get_load(
                session,
                "warmup",
                url,
                total=WARMUP_REQUESTS,
                duration=5,
                concurrency=args.concurrency,
                headers=headers,
            )
        results: dict[str, Result] = {}
        for key, label, url, headers in (
            ("hello", "GET /health  bare aiohttp", f"{hello_url}/health", None),
            ("digitalme", "GET /health  DigitalMe", f"{service_url}/health", None),
            ("messages", "GET messages DigitalMe", messages_url, auth),
        ):
            if client == "wrk":
                results[key] = await asyncio.to_thread(
                    wrk_load,
                    label,
                    url,
                    duration=args.duration,
                    concurrency=args.concurrency,
                    headers=headers,
                )
            else:
                results[key] = await get_load(
                    session,
                    label,
                    url,
                    total=args.requests,
                    duration=args.duration,
                    concurrency=args.concurrency,
                    headers=headers,
                )
        for key, label, url, secret in (
            ("chat_reference", "chat turns  reference", reference_url, reference_token),
            ("chat", "chat turns  DigitalMe", service_url, token),
        ):
            results[key] = await chat_load(
                session,
                label,
                url,
                secret,
                total=args.turns,
                duration=args.turn_duration,
                concurrency=args.turn_concurrency,
            )
    return results


def ratios(results: dict[str, Result]) -> dict[str, float]:
    def ratio(ours: str, reference: str) -> float:
        base = results[reference].per_second
        return round(results[ours].per_second / base, 3) if base else 0.0

    return {
        "health": ratio("digitalme", "hello"),
        "messages": ratio("messages", "hello"),
        "chat": ratio("chat", "chat_reference"),
    }


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(results: dict[str, Result], header: str) -> None:
    print(header)
    print(f"{'':<34}{'count':>8}{'errors':>8}{'seconds':>9}{'per s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for result in results.values():
        print(
            f"{result.name:<34}{result.requests:>8}{result.errors:>8}{result.seconds:>9.2f}"
            f"{result.per_second:>10.1f}{ms(result.p50_ms):>9}{ms(result.p99_ms):>9}"
        )
    figures = ratios(results)
    print(f"GET /health: DigitalMe serves {figures['health']:.2f}x the bare server's rate")
    print(
        f"GET messages (authenticated): DigitalMe serves {figures['messages']:.2f}x the "
        "bare server's /health rate"
    )
    print(
        f"chat turns: DigitalMe {results['chat'].per_second:.1f}/s, reference "
        f"{results['chat_reference'].per_second:.1f}/s: {figures['chat']:.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="load generator for GET /health (auto: wrk if installed); "
        "chat turns always use the aiohttp client",
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per GET /health run (default 5)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=50_000,
        help="most GET /health requests per run, aiohttp client only",
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="connections for GET /health (default 32)"
    )
    parser.add_argument(
        "--history",
        type=int,
        default=10,
        help="turns of the conversation whose messages are read (default 10)",
    )
    parser.add_argument(
        "--turns", type=int, default=300, help="most chat turns per server (default 300)"
    )
    parser.add_argument(
        "--turn-duration",
        type=float,
        default=20.0,
        help="most seconds for the chat turns (default 20)",
    )
    parser.add_argument(
        "--turn-concurrency",
        type=int,
        default=8,
        help="conversations talked to at once (default 8)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        help="DigitalMe's DIGITALME_LOG_LEVEL (default info: one access "
        "line per request, as in production)",
    )
    parser.add_argument(
        "--keep-log", metavar="FILE", help="write the service log here if it has ERROR lines"
    )
    parser.add_argument(
        "--json", action="store_true", help="also print the figures as one JSON line"
    )
    args = parser.parse_args(argv)
    client = pick_client(args.client)

    with tempfile.TemporaryDirectory(prefix="digitalme-bench-") as tmp:
        workdir = Path(tmp)
        with (
            hello_server(workdir) as hello_url,
            digitalme(workdir, args.log_level) as (service, token, standin),
            chat_reference(workdir, standin) as (reference_url, reference_token),
        ):
            results = asyncio.run(
                measure(
                    args, client, hello_url, service.base_url, token, reference_url, reference_token
                )
            )
            service_log = service.log_text()
            service_log_errors = service_log.count(" ERROR ")
            if service_log_errors and args.keep_log:
                Path(args.keep_log).write_text(service_log)

    generator = "wrk (1 thread)" if client == "wrk" else "aiohttp client"
    print_table(
        results,
        (
            f"DigitalMe HTTP bench on 127.0.0.1: {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, aiohttp {aiohttp.__version__}; "
            f"GET /health by {generator}"
            f" with {args.concurrency} connections; chat turns by the aiohttp client over "
            f"{args.turn_concurrency} conversation(s), instant Claude stand-in"
        ),
    )
    if args.json:
        print(
            json.dumps(
                {
                    "client": client,
                    **{k: r.to_json() for k, r in results.items()},
                    "ratios": ratios(results),
                    "history_turns": args.history,
                    "service_log_errors": service_log_errors,
                }
            )
        )
    failed = sum(r.errors for r in results.values())
    for result in results.values():
        if result.errors:
            kinds = ", ".join(f"{n} x {kind}" for kind, n in sorted(result.error_kinds.items()))
            print(f"errors in {result.name.strip()}: {kinds or result.errors}", file=sys.stderr)
    if service_log_errors:
        print(f"the service logged {service_log_errors} ERROR line(s)", file=sys.stderr)
    return 1 if failed or service_log_errors else 0


if __name__ == "__main__":
    sys.exit(main())
