"""The real ``digitalme`` command as a subprocess, and the Anthropic stand-in as a process.

``running_service`` / ``running_service_async`` start ``digitalme serve`` on a free
127.0.0.1 port with an explicit environment (nothing leaks from the developer's shell),
wait until ``/health`` answers, yield a :class:`ServiceProcess` (``base_url``, ``pid``,
``log_path``) and stop it on the way out, failure included: SIGTERM, then SIGKILL after a
grace period. Children also get ``PR_SET_PDEATHSIG`` so a killed test run leaves no
orphans behind.

Use the async variants from async tests that run the in-process stand-in: the service
calls it while the test waits, so waiting must not block the event loop.

    env = service_env(tmp_path, anthropic_base_url=standin.base_url)
    prepare_database(env)
    async with running_service_async(env, tmp_path) as service:
        ...  # service.base_url, service.kill(), await service.restart_async()
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]
SAMPLE_PERSONA = REPO / "docs" / "examples" / "persona.yaml"
TEST_API_KEY = "sk-ant-test-" + "k" * 24

READY_TIMEOUT_SECONDS = 90.0
STOP_GRACE_SECONDS = 10.0
_POLL_SECONDS = 0.05
_PORT_ATTEMPTS = 3

# Loopback only: never route the readiness probe through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_PR_SET_PDEATHSIG = 1
_libc_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_name, use_errno=True) if sys.platform == "linux" and _libc_name else None


def die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the parent dies (Linux only)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def digitalme_command() -> list[str]:
    """The installed entry point next to this interpreter, else ``python -m digitalme``."""
    script = Path(sys.executable).with_name("digitalme")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "digitalme"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(home: Path) -> dict[str, str]:
    """A minimal environment: no DIGITALME_*, ANTHROPIC_* or proxy variables inherited."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "NO_PROXY": "*",
        "ANTHROPIC_CONFIG_DIR": str(home / "anthropic-config"),
    }


def service_env(
    workdir: Path,
    *,
    anthropic_base_url: str | None = None,
    api_key: str | None = TEST_API_KEY,
    **settings: str,
) -> dict[str, str]:
    """Environment for ``digitalme``: database in ``workdir``, Claude at the stand-in,
    no rate limit, fast failures. ``settings`` are extra variables (``DIGITALME_...=``)."""
    env = base_env(workdir / "home")
    env.update(
        {
            "DIGITALME_DB_PATH": str(workdir / "digitalme.db"),
            "DIGITALME_ENV": "test",
            "DIGITALME_MODEL": "claude-test",
            "DIGITALME_RATE_LIMIT_PER_MINUTE": "0",
            "DIGITALME_CLAUDE_MAX_RETRIES": "0",
            "DIGITALME_CLAUDE_TIMEOUT_SECONDS": "10",
        }
    )
    if api_key is not None:
        env["ANTHROPIC_API_KEY"] = api_key
    if anthropic_base_url is not None:
        env["ANTHROPIC_BASE_URL"] = anthropic_base_url
    env.update(settings)
    return env


def run_cli(
    args: Sequence[str], env: Mapping[str, str], *, timeout: float = 120.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``digitalme ARGS`` to completion (text output captured, never checked)."""
    return subprocess.run(
        [*digitalme_command(), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        cwd=env.get("HOME"),
        check=False,
    )


def prepare_database(env: Mapping[str, str], *, persona: Path | None = SAMPLE_PERSONA) -> None:
    """What a deployment does before the first start: `digitalme migrate` (its own step;
    the service refuses an unmigrated database), then the persona imported."""
    commands = [["migrate"]] + ([["persona", "import", str(persona)]] if persona else [])
    for args in commands:
        result = run_cli(args, env)
        if result.returncode != 0:
            raise ProcessFailed(f"digitalme {' '.join(args)} failed: {result.stderr}")


class ProcessFailed(RuntimeError):
    """A helper process exited or never became ready; the message ends with its log."""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _terminate(process: subprocess.Popen[Any], grace: float) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


class ServiceProcess:
    """One ``digitalme serve`` process (restartable on the same environment and DB)."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.env = dict(env)
        self.workdir = workdir
        self.runs = 0
        self.port = 0
        self.log_path = workdir / "service.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def db_path(self) -> Path:
        return Path(self.env["DIGITALME_DB_PATH"])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def launch(self) -> None:
        """Start the process (do not wait). Each run logs to its own file."""
        assert not self.running, "already running"
        self.runs += 1
        self.port = free_port()
        suffix = "" if self.runs == 1 else f"-{self.runs}"
        self.log_path = self.workdir / f"service{suffix}.log"
        env = {**self.env, "DIGITALME_LISTEN": f"127.0.0.1:{self.port}"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*digitalme_command(), "serve"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=die_with_parent,
            )

    def _exited_early(self) -> bool:
        """True if the process died before answering (raises unless it lost a port race)."""
        assert self.process is not None
        code = self.process.poll()
        if code is None:
            return False
        log = self.log_text()
        if "address already in use" in log.lower():
            return True
        raise ProcessFailed(
            f"digitalme serve exited with {code} before it was ready; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def _timed_out(self, timeout: float) -> ProcessFailed:
        self.kill()
        return ProcessFailed(
            f"digitalme serve did not answer /health within {timeout}s; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def _health_ok(self) -> bool:
        try:
            with _OPENER.open(f"{self.base_url}/health", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def start(self, timeout: float = READY_TIMEOUT_SECONDS) -> ServiceProcess:
        """Launch and wait (blocking) until /health answers 200."""
        for _attempt in range(_PORT_ATTEMPTS):
            self.launch()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._exited_early():
                    break
                if self._health_ok():
                    return self
                time.sleep(_POLL_SECONDS)
            else:
                raise self._timed_out(timeout)
        raise ProcessFailed(f"no free port after {_PORT_ATTEMPTS} attempts")

    async def start_async(self, timeout: float = READY_TIMEOUT_SECONDS) -> ServiceProcess:
        """Launch and wait, without blocking the event loop, until /health answers 200."""
        client_timeout = aiohttp.ClientTimeout(total=1)
        async with aiohttp.ClientSession(timeout=client_timeout) as session:
            for _attempt in range(_PORT_ATTEMPTS):
                self.launch()
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if self._exited_early():
                        break
                    try:
                        async with session.get(f"{self.base_url}/health") as response:
                            if response.status == 200:
                                return self
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                    await asyncio.sleep(_POLL_SECONDS)
                else:
                    raise self._timed_out(timeout)
        raise ProcessFailed(f"no free port after {_PORT_ATTEMPTS} attempts")

    def kill(self) -> int | None:
        """SIGKILL, no grace (a crash or power cut). Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """SIGTERM, then SIGKILL if it is still running after ``grace`` seconds."""
        if self.process is None:
            return None
        return _terminate(self.process, grace)

    async def stop_async(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """Like :meth:`stop`, letting the event loop run while the service drains."""
        if self.process is None:
            return None
        return await asyncio.to_thread(_terminate, self.process, grace)

    def restart(self, timeout: float = READY_TIMEOUT_SECONDS) -> ServiceProcess:
        self.stop()
        return self.start(timeout)

    async def restart_async(self, timeout: float = READY_TIMEOUT_SECONDS) -> ServiceProcess:
        await self.stop_async()
        return await self.start_async(timeout)


@contextlib.contextmanager
def running_service(
    env: Mapping[str, str], workdir: Path, *, timeout: float = READY_TIMEOUT_SECONDS
) -> Iterator[ServiceProcess]:
    service = ServiceProcess(env, workdir)
    try:
        yield service.start(timeout)
    finally:
        service.stop()


@contextlib.asynccontextmanager
async def running_service_async(
    env: Mapping[str, str],
    workdir: Path,
    *,
    timeout: float = READY_TIMEOUT_SECONDS,
) -> AsyncIterator[ServiceProcess]:
    service = ServiceProcess(env, workdir)
    try:
        yield await service.start_async(timeout)
    finally:
        await service.stop_async()


# --- the Anthropic stand-in as a process -------------------------------------------------


class StandinProcess:
    """``python -m standins.anthropic_api`` on a free port (it reports its URL)."""

    def __init__(
        self, workdir: Path, *, delay: float = 0.0, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.workdir = workdir
        self.delay = delay
        self.host = host
        self.port = port
        self.log_path = workdir / "standin.log"
        self.base_url = ""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self, timeout: float = READY_TIMEOUT_SECONDS) -> StandinProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = base_env(self.workdir / "standin-home")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "standins.anthropic_api",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--delay",
                    str(self.delay),
                    "--log-level",
                    "WARNING",
                ],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                preexec_fn=die_with_parent,
            )
        assert self.process.stdout is not None
        line = _read_line(self.process.stdout, timeout)
        prefix = "anthropic-standin listening on "
        if not line.startswith(prefix):
            _terminate(self.process, 2)
            raise ProcessFailed(
                f"the stand-in did not start (said {line!r}); log "
                f"{self.log_path}:\n{_tail(self.log_path)}"
            )
        self.base_url = line[len(prefix) :].strip()
        return self

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        if self.process is None:
            return None
        code = _terminate(self.process, grace)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def _read_line(stream: IO[bytes], timeout: float) -> str:
    """One line from a pipe, or '' if none arrives within ``timeout`` or it closes."""
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                break
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode(errors="replace")


@contextlib.contextmanager
def running_standin(workdir: Path, *, delay: float = 0.0) -> Iterator[StandinProcess]:
    standin = StandinProcess(workdir, delay=delay)
    try:
        yield standin.start()
    finally:
        standin.stop()
