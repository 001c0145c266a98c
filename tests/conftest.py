"""Shared fixtures: a clean environment, the Claude stand-in, and the real app under test.

``service`` builds the real application (``create_app``) on a fresh SQLite file, with the
sample persona imported, one admin and one chat token, and Claude pointed at a local
stand-in of the Anthropic API (standins/anthropic_api.py) through the real SDK.

Storage: a test module marked ``pytestmark = pytest.mark.both_engines`` runs each of its
tests that builds settings (``make_settings``, ``service``, ...) twice, on SQLite and on
PostgreSQL: a database of its own, copied from a migrated template, in a throw-away
cluster the session starts from Debian's ``postgresql`` package (tests/support/postgres.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from digitalme.config import DatabaseUrl, Settings, load_settings
from digitalme.db import Database
from digitalme.keys import PERSONAS, TOKENS
from digitalme.persona import load_persona_file
from digitalme.web import create_app
from standins.anthropic_api import AnthropicStandin, run_anthropic_standin
from tests.support.postgres import Cluster, bin_dir

REPO = Path(__file__).resolve().parents[1]
SAMPLE_PERSONA = REPO / "docs" / "examples" / "persona.yaml"
ARTIFACTS = REPO / "artifacts"
TEST_API_KEY = "sk-ant-test-" + "k" * 24
TEST_METRICS_TOKEN = "test-metrics-token-" + "m" * 24

# Variables the SDK (or httpx2) reads even when given explicit settings, and our own:
# a developer's shell must not leak into tests.
_LEAKY_ENV = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_CUSTOM_HEADERS",
    "ANTHROPIC_PROFILE",
    "ANTHROPIC_LOG",
    "ANTHROPIC_FEDERATION_RULE_ID",
    "ANTHROPIC_ORGANIZATION_ID",
    "ANTHROPIC_IDENTITY_TOKEN",
    "ANTHROPIC_IDENTITY_TOKEN_FILE",
    "CREDENTIALS_DIRECTORY",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name in _LEAKY_ENV or name.startswith("DIGITALME_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "anthropic-config"))
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
async def standin() -> AsyncIterator[AnthropicStandin]:
    async with run_anthropic_standin("127.0.0.1", 0) as server:
        yield server


# --- storage engines ------------------------------------------------------------------------
ENGINES = ("sqlite", "postgresql")
MIGRATED_TEMPLATE = "digitalme_migrated"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_engine" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_engines"
    ):
        metafunc.parametrize("db_engine", ENGINES, indirect=True)


@pytest.fixture
def db_engine(request: pytest.FixtureRequest) -> str:
    """The engine of the test's database: sqlite, unless the module is marked both_engines
    (then each test runs once per engine)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster for the session (one per xdist worker), with a migrated
    template database."""
    found = bin_dir()
    if found is None:
        pytest.skip(
            "PostgreSQL is not installed: scripts/bootstrap.sh installs Debian's postgresql package"
        )
    cluster = Cluster(found)
    cluster.start()
    try:
        with cluster.admin() as conn:
            conn.execute(f'CREATE DATABASE "{MIGRATED_TEMPLATE}"')
        # asyncio.run in a thread of its own: safe whatever loop this fixture is set up in.
        with ThreadPoolExecutor(1) as thread:
            url = DatabaseUrl(cluster.url(MIGRATED_TEMPLATE))
            thread.submit(asyncio.run, migrate(url)).result()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_database(postgres_cluster: Cluster) -> Iterator[DatabaseUrl]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    name = postgres_cluster.database()
    yield DatabaseUrl(postgres_cluster.url(name))
    postgres_cluster.drop(name)


@pytest.fixture
def migrated_postgres_database(postgres_cluster: Cluster) -> Iterator[DatabaseUrl]:
    """A new PostgreSQL database with every migration applied, dropped afterwards."""
    name = postgres_cluster.database(MIGRATED_TEMPLATE)
    yield DatabaseUrl(postgres_cluster.url(name))
    postgres_cluster.drop(name)


@pytest.fixture
def database_url(db_engine: str, request: pytest.FixtureRequest) -> DatabaseUrl | None:
    """The test's PostgreSQL database (migrated), or None on SQLite."""
    if db_engine == "sqlite":
        return None
    url: DatabaseUrl = request.getfixturevalue("migrated_postgres_database")
    return url


@pytest.fixture
def make_settings(
    tmp_path: Path,
    standin: AnthropicStandin,
    database_url: DatabaseUrl | None,
) -> Callable[..., Settings]:
    """Settings for a test: fresh database, the stand-in as Claude, fast failure modes."""
    on_postgres = {"DIGITALME_DATABASE_URL": database_url.conninfo} if database_url else {}

    def make(**overrides: Any) -> Settings:
        base = load_settings(
            {
                **on_postgres,
                "DIGITALME_DB_PATH": str(tmp_path / "digitalme.db"),
                "DIGITALME_ENV": "test",
                "ANTHROPIC_API_KEY": TEST_API_KEY,
                "ANTHROPIC_BASE_URL": standin.base_url,
                "DIGITALME_MODEL": "claude-test",
                "DIGITALME_CLAUDE_MAX_RETRIES": "0",
                "DIGITALME_CLAUDE_TIMEOUT_SECONDS": "5",
                "DIGITALME_METRICS_TOKEN": TEST_METRICS_TOKEN,
            }
        )
        return replace(base, **overrides)

    return make


@dataclass
class Service:
    """The running app and what a test needs to talk to it."""

    client: TestClient
    standin: AnthropicStandin
    settings: Settings
    admin_token: str
    chat_token: str

    @property
    def app(self) -> Any:
        return self.client.app

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.chat_token}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.auth(self.admin_token)

    async def metrics_text(self) -> str:
        """GET /metrics as the scraper does (with DIGITALME_METRICS_TOKEN)."""
        response = await self.client.get(
            "/metrics", headers={"Authorization": f"Bearer {self.settings.metrics_token}"}
        )
        assert response.status == 200, await response.text()
        return await response.text()

    async def new_conversation(self, token: str | None = None) -> str:
        response = await self.client.post("/api/v1/conversations", headers=self.auth(token))
        assert response.status == 201, await response.text()
        conversation_id: str = (await response.json())["id"]
        return conversation_id

    async def say(
        self,
        conversation_id: str,
        text: str,
        token: str | None = None,
    ) -> dict[str, Any]:
        response = await self.client.post(
            f"/api/v1/conversations/{conversation_id}/messages",
            json={"text": text},
            headers=self.auth(token),
        )
        assert response.status == 201, await response.text()
        body: dict[str, Any] = await response.json()
        return body


ServiceFactory = Callable[..., Awaitable[Service]]


async def migrate(target: Path | DatabaseUrl) -> None:
    """What `digitalme migrate` does; the service refuses an unmigrated database."""
    db = Database(target)
    await db.open()
    try:
        await db.migrate()
    finally:
        await db.close()


@pytest.fixture
async def make_service(
    database_url: DatabaseUrl | None,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    standin: AnthropicStandin,
) -> ServiceFactory:
    # database_url first: set up before the client, so torn down after the app is closed.
    async def make(*, persona: bool = True, **overrides: Any) -> Service:
        settings = make_settings(**overrides)
        await migrate(settings.database)
        app = create_app(settings)
        client = await aiohttp_client(app)
        if persona:
            loaded, digest = load_persona_file(SAMPLE_PERSONA)
            await app[PERSONAS].save(loaded, digest)
        admin, _ = await app[TOKENS].create("test-admin", "admin")
        chat, _ = await app[TOKENS].create("test-chat", "chat")
        return Service(client, standin, settings, admin, chat)

    return make


@pytest.fixture
async def service(make_service: ServiceFactory) -> Service:
    return await make_service()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# --- workers (pytest-xdist, `scripts/test.sh` runs four) --------------------------------------
# An end-to-end module's tests share its sandbox and run in order, so a module goes to one
# worker whole; the modules on the shared site.yml deployment (tests/e2e/deployments.py) go
# to one worker together, which makes that deployment once. Each role's Molecule scenario
# is on its own. Other tests are spread one by one.
#
# This is a scheduler of our own (xdist's load-by-scope, with our scopes) rather than
# xdist_group marks: pytest-xdist 3.8's loadgroup renames items through `_nodeid`, which
# pytest 9.2 no longer reads, so the marks grouped nothing and two workers deployed the
# same shared sandbox at once.
E2E_DIR = "tests/e2e/"
SHARED_SITE_MODULES = ("test_site", "test_monitoring", "test_upgrade")
# Modules whose deployment is parametrized (a scenario, a Debian release): each parameter
# is a scope of its own, so they run on different workers at once.
PER_PARAMETER_MODULES = ("test_roles", "test_compose")


def worker_scope(nodeid: str) -> str:
    """The unit of work one worker runs whole, for a test's node id."""
    path, _, rest = nodeid.partition("::")
    if not path.startswith(E2E_DIR):
        return nodeid
    module = Path(path).stem
    if module in SHARED_SITE_MODULES:
        return "e2e:shared-site"
    if module in PER_PARAMETER_MODULES and "[" in rest:
        return f"e2e:{module}[{rest.split('[', 1)[1]}"
    return f"e2e:{module}"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class SandboxSharingScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

    return SandboxSharingScheduling(config, log)
