"""Settings: every knob declared once, read from the environment or systemd credentials.

Each field of :class:`Settings` names its environment variable, its help text and whether
it is a secret. Values come from, in order of precedence:

1. the process environment;
2. a file named like the variable in ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``),
   so secrets never have to sit in the environment;
3. the declared default.

:func:`load_settings` validates everything at once and raises :class:`ConfigError`
naming every bad setting, so the service refuses to start instead of failing later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ENV_PREFIX = "DIGITALME_"


class ConfigError(Exception):
    """One or more settings are invalid; ``problems`` maps variable name to message."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        lines = [f"{name}: {message}" for name, message in self.problems.items()]
        super().__init__("invalid configuration:\n  " + "\n  ".join(lines))


# --- parsers: each takes the raw string and returns the value or raises ValueError -------


def _str(raw: str) -> str:
    return raw


def _optional_str(raw: str) -> str | None:
    return raw or None


def _path(raw: str) -> Path:
    if not raw:
        raise ValueError("must not be empty")
    return Path(raw)


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _float_range(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _days_or_zero(minimum: float, maximum: float = 3650) -> Callable[[str], float]:
    """Days to keep something: 0 (forever) or at least ``minimum``."""

    def parse(raw: str) -> float:
        value = _float_range(0, maximum)(raw)
        if 0 < value < minimum:
            raise ValueError(
                f"must be 0 (keep forever) or at least {minimum:g} days, got {value:g}"
            )
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _listen(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be HOST:PORT, got {raw!r}")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"host must be an IP address or localhost, got {host!r}") from None
    return host, _int_range(0, 65535)(port)


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def _optional_path(raw: str) -> Path | None:
    return Path(raw) if raw else None


def _url(raw: str) -> str | None:
    if not raw:
        return None
    if not raw.startswith(("http://", "https://")):
        raise ValueError(f"must be an http:// or https:// URL, got {raw!r}")
    return raw.rstrip("/")


@dataclass(frozen=True, repr=False)
class DatabaseUrl:
    """A PostgreSQL connection URL. Shown (``str``, ``repr``, logs, ``check-config``)
    without its password; the password is given to the driver apart from the URL when it
    comes from ``DIGITALME_DATABASE_PASSWORD``."""

    conninfo: str
    password: str | None = None

    def with_password(self, password: str | None) -> DatabaseUrl:
        return self if password is None else DatabaseUrl(self.conninfo, password)

    def __str__(self) -> str:
        parts = urlsplit(self.conninfo)
        if parts.password is None:
            return self.conninfo
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"{user}:***@{host}").geturl()

    __repr__ = __str__


def _database_url(raw: str) -> DatabaseUrl | None:
    """``postgresql://[user[:password]@][host][:port]/dbname[?param=value...]``, libpq's
    URI form; empty: SQLite at DIGITALME_DB_PATH. Nothing of the URL is echoed back in
    the error but its scheme: it may hold a password."""
    if not raw:
        return None
    scheme, sep, _ = raw.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        shown = scheme if sep and len(scheme) < 20 else "none"
        raise ValueError(
            f"must be a postgresql:// URL (postgresql://USER@HOST:PORT/DBNAME), got scheme "
            f"{shown!r}; leave it unset to use SQLite at DIGITALME_DB_PATH"
        )
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 (parses the port: raises ValueError when it is not one)
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(
            "is not a valid URL: expected postgresql://USER@HOST:PORT/DBNAME[?sslmode=...]"
        ) from None
    if not parts.path.strip("/") and "dbname" not in query:
        raise ValueError("names no database: expected postgresql://USER@HOST:PORT/DBNAME")
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(raw)  # libpq's own parser: unknown parameters, bad hosts
    except ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if not reason or "://" in reason or (parts.password and parts.password in reason):
            reason = "libpq cannot parse it"
        raise ValueError(f"is not a valid PostgreSQL URL: {reason}") from None
    return DatabaseUrl(raw)


def _telegram_secret(raw: str) -> str | None:
    if not raw:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", raw):
        raise ValueError("must be 1-256 characters of A-Z, a-z, 0-9, _ and - (Telegram's rule)")
    return raw


def _bearer_token(raw: str) -> str | None:
    if not raw:
        return None
    # RFC 6750's b64token characters: it travels in an Authorization header as it is.
    if not re.fullmatch(r"[A-Za-z0-9._~+/=-]{32,512}", raw):
        raise ValueError(
            "must be 32-512 characters of A-Z, a-z, 0-9 and ._~+/=- (make one "
            "with `openssl rand -hex 32`)"
        )
    return raw


def _github_handle(raw: str) -> str | None:
    handle = raw.removeprefix("@")
    if not handle:
        return None
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})", handle):
        raise ValueError(f"must be a GitHub login, got {raw!r}")
    return handle


def setting(
    env: str,
    default: str,
    parse: Callable[[str], Any],
    help: str,
    *,
    secret: bool = False,
) -> Any:
    """Declare one setting: its variable, default (as the raw string a user would write),
    parser and help. The parsed default becomes the dataclass default."""
    return field(
        default=parse(default),
        repr=not secret,  # a Settings printed or logged shows no secret
        metadata={
            "env": env,
            "raw_default": default,
            "parse": parse,
            "help": help,
            "secret": secret,
        },
    )


@dataclass(frozen=True)
class Settings:
    # --- service -------------------------------------------------------------------------
    environment: str = setting(
        "DIGITALME_ENV",
        "development",
        _str,
        "Name of this deployment (development, staging, production), shown in /info.",
    )
    listen: tuple[str, int] = setting(
        "DIGITALME_LISTEN",
        "127.0.0.1:8080",
        _listen,
        "Address the HTTP server binds, HOST:PORT. Keep it on loopback behind Caddy.",
    )
    db_path: Path = setting(
        "DIGITALME_DB_PATH",
        "digitalme.db",
        _path,
        "SQLite database file. `digitalme migrate` creates and migrates it; the service "
        "refuses to start on a database that lacks a migration.",
    )
    database_url: DatabaseUrl | None = setting(
        "DIGITALME_DATABASE_URL",
        "",
        _database_url,
        "PostgreSQL database to use instead of SQLite, as a libpq URL "
        "(postgresql://USER@HOST:PORT/DBNAME?sslmode=verify-full); then DIGITALME_DB_PATH is "
        "not used. Several app hosts can share it (docs/scale-out.md). Shown without its "
        "password; better keep the password in DIGITALME_DATABASE_PASSWORD. Empty: SQLite.",
    )
    database_password: str | None = setting(
        "DIGITALME_DATABASE_PASSWORD",
        "",
        _optional_str,
        "Password for DIGITALME_DATABASE_URL, given to the driver apart from the URL (best "
        "as a systemd credential). Empty: the URL's own, or libpq's ~/.pgpass.",
        secret=True,
    )
    log_level: str = setting(
        "DIGITALME_LOG_LEVEL",
        "info",
        _choice("debug", "info", "warning", "error"),
        "Log verbosity: debug, info, warning or error.",
    )
    commit: str | None = setting(
        "DIGITALME_COMMIT",
        "",
        _optional_str,
        "Source commit of this build, shown in /info and digitalme_build_info (a container "
        "build sets it; the roles' releases carry it in DIGITALME_RELEASE_INFO instead).",
    )
    release_info: Path | None = setting(
        "DIGITALME_RELEASE_INFO",
        "",
        _optional_path,
        "JSON file describing the installed release (release id, version, commit, build "
        "time), read once at start and shown in /info. The digitalme role points it at "
        "/opt/digitalme/current/release.json. Empty: not shown.",
    )
    deploy_record: Path | None = setting(
        "DIGITALME_DEPLOY_RECORD",
        "",
        _optional_path,
        "JSON record of the last deploy or rollback (who, when, from and to which release, "
        "durations, result), written by digitalme-deploy and shown in /info. Empty: not "
        "shown.",
    )
    # --- HTTP hardening ------------------------------------------------------------------
    rate_limit_per_minute: int = setting(
        "DIGITALME_RATE_LIMIT_PER_MINUTE",
        "100",
        _int_range(0, 1_000_000),
        "Requests per minute allowed per client (API token, or address when anonymous); "
        "0 turns the limit off. Health, info and metrics are not limited.",
    )
    max_body_bytes: int = setting(
        "DIGITALME_MAX_BODY_BYTES",
        "1048576",
        _int_range(1024, 64 * 1024 * 1024),
        "Largest request body accepted; larger requests get 413.",
    )
    max_message_chars: int = setting(
        "DIGITALME_MAX_MESSAGE_CHARS",
        "16000",
        _int_range(1, 1_000_000),
        "Longest chat message accepted, in characters; longer ones get 400.",
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        "DIGITALME_TRUSTED_PROXIES",
        "127.0.0.1,::1",
        _networks,
        "Comma-separated addresses or networks of reverse proxies whose X-Forwarded-For "
        "is believed (for rate limiting and logs). Requests arriving through a proxy are "
        "never served /metrics.",
    )
    metrics_token: str | None = setting(
        "DIGITALME_METRICS_TOKEN",
        "",
        _bearer_token,
        "Bearer token that GET /metrics requires (Authorization: Bearer ...), so that only "
        "the scraper that holds it reads the metrics, not any local user. Unset: /metrics "
        "is off (404), like a channel without its secret.",
        secret=True,
    )
    # --- Claude --------------------------------------------------------------------------
    anthropic_api_key: str | None = setting(
        "ANTHROPIC_API_KEY",
        "",
        _optional_str,
        "Anthropic API key. Without it the service runs but chat answers 503.",
        secret=True,
    )
    anthropic_base_url: str | None = setting(
        "ANTHROPIC_BASE_URL",
        "",
        _url,
        "Anthropic API base URL; empty means the SDK's default (https://api.anthropic.com).",
    )
    model: str = setting("DIGITALME_MODEL", "claude-sonnet-4-5", _str, "Claude model that answers.")
    max_tokens: int = setting(
        "DIGITALME_MAX_TOKENS", "1024", _int_range(1, 64000), "Largest reply, in tokens."
    )
    context_token_budget: int = setting(
        "DIGITALME_CONTEXT_TOKEN_BUDGET",
        "8000",
        _int_range(100, 1_000_000),
        "Estimated tokens of conversation history (including the new message) sent with "
        "each call; older turns that do not fit are left out. The persona comes on top.",
    )
    claude_timeout_seconds: float = setting(
        "DIGITALME_CLAUDE_TIMEOUT_SECONDS",
        "60",
        _float_range(1, 600),
        "Read timeout of one Claude request: the longest silence allowed while waiting for "
        "an answer or between chunks of a streamed one (each retry gets its own).",
    )
    claude_connect_timeout_seconds: float = setting(
        "DIGITALME_CLAUDE_CONNECT_TIMEOUT_SECONDS",
        "5",
        _float_range(0.1, 60),
        "Timeout for connecting to the Claude API.",
    )
    claude_deadline_seconds: float = setting(
        "DIGITALME_CLAUDE_DEADLINE_SECONDS",
        "90",
        _float_range(1, 3600),
        "Longest wait for Claude to start answering, all retries and their Retry-After "
        "waits included; past it the caller gets a quick 503.",
    )
    claude_max_retries: int = setting(
        "DIGITALME_CLAUDE_MAX_RETRIES",
        "2",
        _int_range(0, 10),
        "Retries of a failed Claude request (429, 5xx, connection errors), by the SDK.",
    )
    breaker_failure_threshold: int = setting(
        "DIGITALME_BREAKER_FAILURE_THRESHOLD",
        "3",
        _int_range(1, 1000),
        "Consecutive failed Claude calls that open the circuit breaker.",
    )
    breaker_reset_seconds: float = setting(
        "DIGITALME_BREAKER_RESET_SECONDS",
        "30",
        _float_range(0.1, 3600),
        "How long the breaker stays open before one trial call is let through.",
    )
    daily_token_budget: int = setting(
        "DIGITALME_DAILY_TOKEN_BUDGET",
        "0",
        _int_range(0, 10**12),
        "Tokens (input + output, UTC day) the clone may spend per day; 0 means no limit. "
        "Past it, chat answers 429 until midnight UTC.",
    )
    price_input_per_mtok: float = setting(
        "DIGITALME_PRICE_INPUT_PER_MTOK",
        "3.00",
        _float_range(0, 1000),
        "USD per million input tokens, for the cost estimate.",
    )
    price_output_per_mtok: float = setting(
        "DIGITALME_PRICE_OUTPUT_PER_MTOK",
        "15.00",
        _float_range(0, 1000),
        "USD per million output tokens, for the cost estimate.",
    )
    price_cache_write_per_mtok: float = setting(
        "DIGITALME_PRICE_CACHE_WRITE_PER_MTOK",
        "3.75",
        _float_range(0, 1000),
        "USD per million tokens written to the prompt cache.",
    )
    price_cache_read_per_mtok: float = setting(
        "DIGITALME_PRICE_CACHE_READ_PER_MTOK",
        "0.30",
        _float_range(0, 1000),
        "USD per million tokens read from the prompt cache.",
    )

    # --- channels: the durable inbox and its worker -----------------------------------------
    worker_concurrency: int = setting(
        "DIGITALME_WORKER_CONCURRENCY",
        "16",
        _int_range(1, 64),
        "Webhook deliveries the background worker processes at once (Claude calls and "
        "outbound replies); one conversation's deliveries are always answered one at a "
        "time, in order.",
    )
    worker_poll_seconds: float = setting(
        "DIGITALME_WORKER_POLL_SECONDS",
        "5",
        _float_range(0.05, 300),
        "How often the worker looks for due deliveries when nothing woke it (retries, and "
        "items set back to pending by `digitalme inbox retry` from another process).",
    )
    inbox_max_attempts: int = setting(
        "DIGITALME_INBOX_MAX_ATTEMPTS",
        "8",
        _int_range(1, 100),
        "Attempts at a delivery before it is marked failed (Claude outages do not count: "
        "they only delay).",
    )
    inbox_retry_base_seconds: float = setting(
        "DIGITALME_INBOX_RETRY_BASE_SECONDS",
        "5",
        _float_range(0.01, 3600),
        "First delay before a failed delivery is tried again; it doubles each attempt.",
    )
    inbox_retry_max_seconds: float = setting(
        "DIGITALME_INBOX_RETRY_MAX_SECONDS",
        "900",
        _float_range(0.01, 86400),
        "Longest delay between two attempts at a delivery.",
    )
    inbox_retention_days: float = setting(
        "DIGITALME_INBOX_RETENTION_DAYS",
        "14",
        _days_or_zero(8),
        "Days a delivery that is done or ignored is kept after it finished; then the prune "
        "deletes it (in batches). Its id is what makes a platform's redelivery a no-op, so "
        "it must outlast every redelivery window (Telegram 24 h, Slack's retries minutes, "
        "GitHub's manual redelivery 3 days, 7 on Enterprise Server): at least 8. A delivery "
        "whose event is in the activity log stays as long as that event. 0 keeps them all.",
    )
    inbox_failed_retention_days: float = setting(
        "DIGITALME_INBOX_FAILED_RETENTION_DAYS",
        "30",
        _days_or_zero(8),
        "Days a failed delivery is kept (for `digitalme inbox retry`) after it failed; "
        "then the prune deletes it. At least 8, or 0 to keep them all.",
    )
    prune_interval_minutes: float = setting(
        "DIGITALME_PRUNE_INTERVAL_MINUTES",
        "60",
        _float_range(1, 1440),
        "How often the service prunes old deliveries and activity (the first run comes a "
        "minute after start). Deletes go in small batches between other writes.",
    )
    outbound_timeout_seconds: float = setting(
        "DIGITALME_OUTBOUND_TIMEOUT_SECONDS",
        "10",
        _float_range(0.1, 120),
        "Total timeout of one outbound call to Telegram, Slack, GitHub or ClickUp.",
    )
    outbound_connect_timeout_seconds: float = setting(
        "DIGITALME_OUTBOUND_CONNECT_TIMEOUT_SECONDS",
        "5",
        _float_range(0.1, 60),
        "Timeout for connecting to Telegram, Slack, GitHub or ClickUp.",
    )
    outbound_retries: int = setting(
        "DIGITALME_OUTBOUND_RETRIES",
        "2",
        _int_range(0, 10),
        "Immediate retries of an outbound call after 429, 5xx or a connection error (with "
        "backoff, honouring Retry-After up to 30 s); after that the delivery is retried later.",
    )
    # --- Telegram ------------------------------------------------------------------------
    telegram_bot_token: str | None = setting(
        "DIGITALME_TELEGRAM_BOT_TOKEN",
        "",
        _optional_str,
        "Telegram bot token from @BotFather, for sendMessage and setWebhook.",
        secret=True,
    )
    telegram_secret_token: str | None = setting(
        "DIGITALME_TELEGRAM_SECRET_TOKEN",
        "",
        _telegram_secret,
        "Secret Telegram sends in X-Telegram-Bot-Api-Secret-Token (1-256 of A-Z a-z 0-9 _ -). "
        "Unset: the Telegram channel is off.",
        secret=True,
    )
    telegram_api_base: str | None = setting(
        "DIGITALME_TELEGRAM_API_BASE",
        "https://api.telegram.org",
        _url,
        "Telegram Bot API base URL.",
    )
    # --- Slack ---------------------------------------------------------------------------
    slack_signing_secret: str | None = setting(
        "DIGITALME_SLACK_SIGNING_SECRET",
        "",
        _optional_str,
        "Slack app signing secret, to verify Events API and slash-command requests. "
        "Unset: the Slack channel is off.",
        secret=True,
    )
    slack_bot_token: str | None = setting(
        "DIGITALME_SLACK_BOT_TOKEN",
        "",
        _optional_str,
        "Slack bot token (xoxb-...), for chat.postMessage.",
        secret=True,
    )
    slack_api_base: str | None = setting(
        "DIGITALME_SLACK_API_BASE",
        "https://slack.com/api",
        _url,
        "Slack Web API base URL. response_url replies go only to hooks.slack.com or this host.",
    )
    # --- GitHub --------------------------------------------------------------------------
    github_webhook_secret: str | None = setting(
        "DIGITALME_GITHUB_WEBHOOK_SECRET",
        "",
        _optional_str,
        "GitHub webhook secret, to verify X-Hub-Signature-256. Unset: the GitHub channel is off.",
        secret=True,
    )
    github_token: str | None = setting(
        "DIGITALME_GITHUB_TOKEN",
        "",
        _optional_str,
        "GitHub token of the clone's account, to answer mentions with a comment. Unset: "
        "events are still recorded as activity.",
        secret=True,
    )
    github_api_base: str | None = setting(
        "DIGITALME_GITHUB_API_BASE", "https://api.github.com", _url, "GitHub REST API base URL."
    )
    github_handle: str | None = setting(
        "DIGITALME_GITHUB_HANDLE",
        "",
        _github_handle,
        "The clone's GitHub login (without @): a comment mentioning it is answered.",
    )
    # --- ClickUp -------------------------------------------------------------------------
    clickup_webhook_secret: str | None = setting(
        "DIGITALME_CLICKUP_WEBHOOK_SECRET",
        "",
        _optional_str,
        "ClickUp webhook secret, to verify X-Signature. Unset: the ClickUp webhook is off.",
        secret=True,
    )
    clickup_token: str | None = setting(
        "DIGITALME_CLICKUP_TOKEN",
        "",
        _optional_str,
        "ClickUp API token, for creating tasks (with DIGITALME_CLICKUP_LIST_ID).",
        secret=True,
    )
    clickup_api_base: str | None = setting(
        "DIGITALME_CLICKUP_API_BASE",
        "https://api.clickup.com",
        _url,
        "ClickUp API base URL (without /api/v2).",
    )
    clickup_list_id: str | None = setting(
        "DIGITALME_CLICKUP_LIST_ID",
        "",
        _optional_str,
        "The one ClickUp list the clone may create tasks in. Unset: no task tool.",
    )
    clickup_max_tasks_per_day: int = setting(
        "DIGITALME_CLICKUP_MAX_TASKS_PER_DAY",
        "5",
        _int_range(0, 1000),
        "ClickUp tasks the clone may create per UTC day; 0 disables the tool.",
    )
    # --- the owner's activity digest -----------------------------------------------------
    activity_digest_days: int = setting(
        "DIGITALME_ACTIVITY_DIGEST_DAYS",
        "7",
        _int_range(0, 365),
        "Days of GitHub and ClickUp activity summarised into each Claude call; 0 turns the "
        "digest off.",
    )
    activity_digest_max_events: int = setting(
        "DIGITALME_ACTIVITY_DIGEST_MAX_EVENTS",
        "20",
        _int_range(1, 500),
        "Most activity events (newest first) in the digest.",
    )
    activity_retention_days: float = setting(
        "DIGITALME_ACTIVITY_RETENTION_DAYS",
        "30",
        _days_or_zero(1),
        "Days of GitHub and ClickUp activity kept (by when the event happened); older "
        "events are pruned with their deliveries. At least DIGITALME_ACTIVITY_DIGEST_DAYS, "
        "or 0 to keep them all.",
    )
    activity_digest_max_tokens: int = setting(
        "DIGITALME_ACTIVITY_DIGEST_MAX_TOKENS",
        "600",
        _int_range(50, 100_000),
        "Estimated tokens the activity digest may take, on top of the history budget.",
    )

    # --- backups: Litestream's replication and the restore drill ----------------------------
    litestream_socket: Path | None = setting(
        "DIGITALME_LITESTREAM_SOCKET",
        "",
        _optional_path,
        "Litestream's control socket (/run/litestream/litestream.sock where the roles "
        "deployed it). The `backup` readiness check and the digitalme_backup_* metrics ask "
        "it when the replica last synced. Empty: replication is not checked.",
    )
    backup_max_lag_seconds: float = setting(
        "DIGITALME_BACKUP_MAX_LAG_SECONDS",
        "30",
        _float_range(1, 86400),
        "The `backup` readiness check fails when Litestream's last successful sync to the "
        "replica is older than this (it syncs every second while the replica accepts "
        "writes). It is reported, not required: the service stays in rotation.",
    )
    backup_drill_result: Path | None = setting(
        "DIGITALME_BACKUP_DRILL_RESULT",
        "",
        _optional_path,
        "JSON result of the last restore drill (written by digitalme-backup-drill.service), "
        "shown in the `backup` readiness check. Empty: drills are not shown.",
    )
    backup_drill_max_age_hours: float = setting(
        "DIGITALME_BACKUP_DRILL_MAX_AGE_HOURS",
        "48",
        _float_range(1, 24 * 366),
        "The `backup` readiness check fails when the last restore drill finished longer ago "
        "than this (the drill runs daily by default).",
    )

    @property
    def claude_configured(self) -> bool:
        return bool(self.anthropic_api_key)

    @property
    def database(self) -> Path | DatabaseUrl:
        """Where the data lives: the PostgreSQL URL (with DIGITALME_DATABASE_PASSWORD)
        when one is set, else the SQLite file."""
        if self.database_url is not None:
            return self.database_url.with_password(self.database_password)
        return self.db_path


@dataclass(frozen=True)
class SettingInfo:
    field: str
    env: str
    raw_default: str
    help: str
    secret: bool
    parse: Callable[[str], Any]


def declared_settings() -> Iterator[SettingInfo]:
    for f in dataclasses.fields(Settings):
        m = f.metadata
        yield SettingInfo(f.name, m["env"], m["raw_default"], m["help"], m["secret"], m["parse"])


def _credential(directory: str | None, name: str) -> str | None:
    if not directory:
        return None
    path = Path(directory) / name
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        return None


def load_settings(
    environ: Mapping[str, str] | None = None,
    credentials_directory: str | None = None,
) -> Settings:
    """Build the settings from the environment and credential files; raise ConfigError."""
    env = os.environ if environ is None else environ
    cred_dir = credentials_directory or env.get("CREDENTIALS_DIRECTORY")
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for info in declared_settings():
        raw = env.get(info.env)
        if raw is None:
            try:
                raw = _credential(cred_dir, info.env)
            except OSError as exc:
                problems[info.env] = f"cannot read credential file: {exc.strerror}"
                continue
        if raw is None:
            continue
        try:
            values[info.field] = info.parse(raw.strip())
        except ValueError as exc:
            problems[info.env] = str(exc)
    if not problems:
        problems.update(_combination_problems(Settings(**values)))
    if problems:
        raise ConfigError(problems)
    return Settings(**values)


def _combination_problems(settings: Settings) -> dict[str, str]:
    """Settings that are valid alone but not together."""
    problems = {}
    if settings.database_password is not None and settings.database_url is None:
        # (S105: a message about the password, not one.)
        problems["DIGITALME_DATABASE_PASSWORD"] = (
            "is set but DIGITALME_DATABASE_URL is not: SQLite needs no password; "  # noqa: S105
            "set the URL of the PostgreSQL database or remove the password"
        )
    if 0 < settings.activity_retention_days < settings.activity_digest_days:
        problems["DIGITALME_ACTIVITY_RETENTION_DAYS"] = (
            f"must be at least DIGITALME_ACTIVITY_DIGEST_DAYS ({settings.activity_digest_days})"
            f" or 0: the digest reads that far back, got {settings.activity_retention_days:g}"
        )
    return problems


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """DIGITALME_* variables that no setting declares: likely typos."""
    env = os.environ if environ is None else environ
    known = {info.env for info in declared_settings()}
    return sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)


class EnvFileError(ValueError):
    """An environment file that systemd would not read as we mean it."""


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an environment file as systemd's ``EnvironmentFile=`` reads the ones
    the role writes: ``NAME=value`` lines, the value shell-quoted or bare, ``#`` and ``;``
    comment lines, blank lines. Raise EnvFileError naming the line otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EnvFileError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise EnvFileError(f"{path}: not UTF-8 text") from None
    variables: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        name, sep, value = stripped.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise EnvFileError(f"{path} line {number}: expected NAME=value, got {line!r}")
        try:
            variables[name] = " ".join(shlex.split(value, comments=False, posix=True))
        except ValueError as exc:
            raise EnvFileError(f"{path} line {number}: {name}: {exc}") from None
    return variables


def settings_reference_markdown() -> str:
    """The reference table of every setting, as docs/configuration.md carries it."""
    lines = ["| Variable | Default | Secret | Meaning |", "| --- | --- | --- | --- |"]
    for info in declared_settings():
        default = f"`{info.raw_default}`" if info.raw_default else "(empty)"
        lines.append(f"| `{info.env}` | {default} | {'yes' if info.secret else ''} | {info.help} |")
    return "\n".join(lines) + "\n"


def effective_settings(settings: Settings) -> list[tuple[str, str, str]]:
    """(variable, shown value, help) for each setting, with secrets masked."""
    rows = []
    for info in declared_settings():
        value = getattr(settings, info.field)
        if info.secret:
            shown = "(set, hidden)" if value else "(not set)"
        elif value is None:
            shown = "(not set)"
        elif isinstance(value, tuple) and info.field == "listen":
            shown = f"{value[0]}:{value[1]}"
        elif isinstance(value, tuple):
            shown = ",".join(str(v) for v in value)
        else:
            shown = str(value)
        rows.append((info.env, shown, info.help))
    return rows
