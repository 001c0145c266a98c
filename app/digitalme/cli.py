"""The ``digitalme`` command: serve, migrate, check the configuration, manage the persona
and API tokens. This is the only module with side effects at the top level of a call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import yaml

from . import __version__
from .commands import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, CommandError
from .config import (
    ConfigError,
    EnvFileError,
    Settings,
    effective_settings,
    load_settings,
    read_env_file,
    settings_reference_markdown,
    unknown_variables,
)
from .db import Database, database_for
from .engine import DatabaseError, first_line
from .inbox import STATUSES
from .integrations.commands import CHANNEL_COMMANDS
from .loglines import LineFormatter, LineHandler
from .persona import PersonaError, PersonaStore, build_prompt, load_persona_file
from .tokens import SCOPES, TokenError, TokenStore

log = logging.getLogger("digitalme")
T = TypeVar("T")


def _setup_logging(level: str) -> None:
    # Under systemd the journal stamps time and unit; elsewhere we do.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # As logging.basicConfig(level=..., format=fmt, stream=sys.stderr), with a handler
    # that keeps a line per request cheap (loglines.py).
    handler = LineHandler(sys.stderr)
    handler.setFormatter(LineFormatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler])


async def _with_database(
    settings: Settings, work: Callable[[Database], Awaitable[T]], *, migrated: bool = True
) -> T:
    """Open the database (refusing one that lacks a migration, unless ``migrated`` is
    false: the migration commands themselves), run ``work``, close it. A failure of the
    driver (a lost PostgreSQL server) is a :class:`DatabaseError`: one line, no traceback."""
    db = database_for(settings)
    await db.open()
    try:
        if migrated:
            await db.require_migrated()
        return await work(db)
    except db.errors as exc:
        raise DatabaseError(f"{db.name}: {first_line(exc)}") from exc
    finally:
        await db.close()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# --- commands -----------------------------------------------------------------------------


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from .serve import SocketError, serve
    from .web import SHUTDOWN_GRACE_SECONDS, create_app

    for name in unknown_variables():
        log.warning("ignoring unknown setting %s (typo?)", name)
    try:
        _run(
            serve(
                create_app(settings),
                settings.listen,
                shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
                access_log_format='%a "%r" %s %b %Tfs',
            )
        )
    except SocketError as exc:
        raise CommandError(str(exc)) from None
    return EXIT_OK


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    if args.status:
        # Read-only, as JSON: what the deploy tool reads to plan an upgrade on either engine.
        async def status(db: Database) -> dict[str, Any]:
            applied = await db.applied_migrations()
            pending = [m.version for m in (await db.migration_state()).pending]
            return {"database": db.name, "applied": sorted(applied), "pending": pending}

        print(json.dumps(_run(_with_database(settings, status, migrated=False))))
        return EXIT_OK

    async def migrate(db: Database) -> tuple[str, list[str]]:
        return db.name, [m.label for m in await db.migrate()]

    name, applied = _run(_with_database(settings, migrate, migrated=False))
    if applied:
        print(f"applied {len(applied)} migration(s) to {name}: {', '.join(applied)}")
    else:
        print(f"{name} is up to date")
    return EXIT_OK


def cmd_migrate_data(settings: Settings, args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from .transfer import copy_data, describe, parse_target

    ends = []
    for option, raw in (("--from", args.source), ("--to", args.target)):
        if raw.startswith(("postgresql://", "postgres://")) and urlsplit(raw).password:
            # Command lines are visible to every local user (ps, /proc).
            raise CommandError(
                f"{option}: leave the password out of the URL; give it as "
                "DIGITALME_DATABASE_PASSWORD (environment or credential "
                "file) or in ~/.pgpass"
            )
        try:
            end = parse_target(raw)
        except ValueError as exc:
            raise CommandError(f"{option}: {exc}") from None
        if not isinstance(end, Path):
            end = end.with_password(settings.database_password)
        ends.append(end)
    source, target = ends
    copied = copy_data(source, target)
    width = max(len(c.table) for c in copied)
    for c in copied:
        print(f"{c.table:<{width}}  {c.rows:>9} rows  sha256 {c.sha256[:16]}")
    print(
        f"copied {sum(c.rows for c in copied)} rows in {len(copied)} tables from "
        f"{describe(source)} to {describe(target)}: counts and checksums match"
    )
    return EXIT_OK


def cmd_smoke_test(settings: Settings, args: argparse.Namespace) -> int:

    from .smoke import SmokeTestFailed, smoke_test

    async def work(db: Database) -> Any:
        return await smoke_test(db, args.url, args.timeout)

    try:
        result = _run(_with_database(settings, work))
    except SmokeTestFailed as exc:
        raise CommandError(f"smoke test failed: {exc}") from None
    print(
        json.dumps(
            {
                "ok": True,
                "seconds": result.seconds,
                "reply_chars": result.reply_chars,
                "model": result.model,
            }
        )
    )
    return EXIT_OK


def cmd_check_config(settings: Settings, args: argparse.Namespace) -> int:
    if args.reference:
        print(settings_reference_markdown(), end="")
        return EXIT_OK
    rows = effective_settings(settings)
    width = max(len(name) for name, _, _ in rows)
    for name, shown, _help in rows:
        print(f"{name:<{width}}  {shown}")
    problems = 0
    environ = args.environ  # the --env-file's variables, read once by main()
    for name in unknown_variables(environ):
        level = "error" if args.strict else "warning"
        print(f"{level}: {name} is set but is not a DigitalMe setting (typo?)", file=sys.stderr)
        problems += 1 if args.strict else 0
    # The host's state is judged for the environment the command runs in; a file is judged
    # by its content alone (the role checks the file before the folders may exist).
    if environ is None and settings.database_url is None and not settings.db_path.parent.exists():
        print(
            f"error: DIGITALME_DB_PATH: directory {settings.db_path.parent} does not exist",
            file=sys.stderr,
        )
        problems += 1
    if settings.database_url is not None and settings.litestream_socket is not None:
        print(
            "warning: DIGITALME_LITESTREAM_SOCKET is set, but Litestream replicates SQLite "
            "only and DIGITALME_DATABASE_URL puts the data in PostgreSQL: back that up "
            "instead (docs/scale-out.md)",
            file=sys.stderr,
        )
    if not settings.claude_configured:
        print(
            "warning: ANTHROPIC_API_KEY is not set: the service starts, but chat answers 503",
            file=sys.stderr,
        )
    print(
        "configuration is valid" if not problems else "configuration has problems", file=sys.stderr
    )
    return EXIT_CONFIG if problems else EXIT_OK


def cmd_persona_import(settings: Settings, args: argparse.Namespace) -> int:
    persona, digest = load_persona_file(Path(args.file))

    async def work(db: Database) -> bool:
        store = PersonaStore(db)
        if args.if_changed:
            current = await store.load()
            if current is not None and current.source_sha256 == digest:
                return False
        await store.save(persona, digest)
        return True

    if _run(_with_database(settings, work)):
        print(
            f"imported persona {persona.name!r} with {len(persona.traits)} trait(s) "
            f"from {args.file} (sha256 {digest[:12]})"
        )
    else:
        print(f"persona unchanged: the stored one came from this file (sha256 {digest[:12]})")
    return EXIT_OK


def _load_persona(settings: Settings) -> Any:
    async def work(db: Database) -> Any:
        return await PersonaStore(db).load()

    stored = _run(_with_database(settings, work))
    if stored is None:
        raise CommandError("no persona imported yet: run `digitalme persona import FILE`")
    return stored


def cmd_persona_show(settings: Settings, args: argparse.Namespace) -> int:
    stored = _load_persona(settings)
    if args.format == "json":
        print(json.dumps(stored.persona.to_document(), indent=2, ensure_ascii=False))
    else:
        print(f"# imported {stored.imported_at}, source sha256 {stored.source_sha256}")
        print(
            yaml.safe_dump(
                stored.persona.to_document(), sort_keys=False, allow_unicode=True, width=100
            ),
            end="",
        )
    return EXIT_OK


def cmd_persona_prompt(settings: Settings, args: argparse.Namespace) -> int:
    sys.stdout.write(build_prompt(_load_persona(settings).persona))
    return EXIT_OK


def cmd_token_create(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> Any:
        return await TokenStore(db).create(args.name, args.scope)

    secret, info = _run(_with_database(settings, work))
    if args.quiet:
        print(secret)
    else:
        print(
            f"created token {info.id} {info.name!r} (scope {info.scope}). "
            "Copy it now, it is not shown again:",
            file=sys.stderr,
        )
        print(secret)
    return EXIT_OK


def cmd_token_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> Any:
        return await TokenStore(db).all()

    tokens = _run(_with_database(settings, work))
    if not tokens:
        print("no tokens; create one with `digitalme token create --name NAME --scope chat`")
        return EXIT_OK
    print(
        f"{'ID':>4}  {'NAME':<24} {'SCOPE':<6} {'PREFIX':<10} {'CREATED':<26} "
        f"{'LAST USED':<26} STATUS"
    )
    for t in tokens:
        status = f"revoked {t.revoked_at}" if t.revoked_at else "active"
        print(
            f"{t.id:>4}  {t.name[:24]:<24} {t.scope:<6} {t.prefix:<10} {t.created_at:<26} "
            f"{t.last_used_at or '-':<26} {status}"
        )
    return EXIT_OK


def cmd_token_revoke(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> Any:
        return await TokenStore(db).revoke(args.id)

    info = _run(_with_database(settings, work))
    if info is None:
        raise CommandError(f"no token with id {args.id} (see `digitalme token list`)")
    print(f"token {info.id} {info.name!r} revoked at {info.revoked_at}")
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------


def cmd_inbox_list(settings: Settings, args: argparse.Namespace) -> int:
    from .inbox import InboxStore

    async def work(db: Database) -> Any:
        return await InboxStore(db).recent(status=args.status, limit=args.limit)

    items = _run(_with_database(settings, work))
    if not items:
        print(
            "the inbox is empty"
            if args.status is None
            else f"no inbox items with status {args.status}"
        )
        return EXIT_OK
    print(
        f"{'ID':>6}  {'CHANNEL':<9} {'KIND':<22} {'STATUS':<10} {'TRIES':>5}  "
        f"{'RECEIVED':<24} DETAIL"
    )
    for item in items:
        detail = (
            item.last_error
            if item.status in ("failed", "pending") and item.last_error
            else item.result or ""
        )
        print(
            f"{item.id:>6}  {item.channel:<9} {item.kind[:22]:<22} {item.status:<10} "
            f"{item.attempts:>5}  {item.received_at:<24} {' '.join(detail.split())[:160]}"
        )
    return EXIT_OK


def cmd_inbox_retry(settings: Settings, args: argparse.Namespace) -> int:
    from .inbox import InboxStore

    async def work(db: Database) -> Any:
        store = InboxStore(db)
        before = await store.get(args.id)
        if before is None:
            return None, None
        return before, await store.retry(args.id)

    before, after = _run(_with_database(settings, work))
    if before is None:
        raise CommandError(f"no inbox item {args.id} (see `digitalme inbox list`)")
    if before.status not in ("failed", "ignored"):
        raise CommandError(
            f"inbox item {args.id} is {before.status}, not failed or ignored: nothing to retry"
        )
    print(
        f"inbox item {after.id} ({after.channel} {after.kind}) is pending again; the "
        "running service picks it up within DIGITALME_WORKER_POLL_SECONDS"
    )
    return EXIT_OK


def cmd_inbox_prune(settings: Settings, args: argparse.Namespace) -> int:
    from .metrics import Metrics
    from .retention import Retention

    async def work(db: Database) -> Any:
        return await Retention(db, settings, Metrics()).prune()

    pruned = _run(_with_database(settings, work))

    def kept(days: float) -> str:
        return f"{days:g} days" if days else "forever"

    print(
        f"pruned {pruned.inbox} deliveries and {pruned.activity} activity events "
        f"({pruned.seconds:.2f}s); kept: done and ignored deliveries "
        f"{kept(settings.inbox_retention_days)}, failed ones "
        f"{kept(settings.inbox_failed_retention_days)}, activity "
        f"{kept(settings.activity_retention_days)}"
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digitalme",
        description="DigitalMe: a persona-driven Claude agent. Settings come from DIGITALME_* "
        "environment variables (see `digitalme check-config` and docs/"
        "configuration.md). Only `digitalme migrate` changes the database's "
        "schema; the other commands refuse a database that lacks a migration.",
    )
    parser.add_argument("--version", action="version", version=f"digitalme {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the HTTP service (what systemd starts)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("migrate", help="apply pending database migrations and exit")
    p.add_argument(
        "--status",
        action="store_true",
        help="change nothing: print the applied and the pending migrations' "
        'versions as JSON ({"database", "applied", "pending"})',
    )
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser(
        "migrate-data",
        help="copy every row from SQLite to an empty PostgreSQL database, or back, verified "
        "by row counts and per-table checksums (docs/scale-out.md)",
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL",
        help="sqlite:///path/to/digitalme.db or postgresql://USER@HOST/DBNAME",
    )
    p.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="URL",
        help="the other engine's database; migrated here, and it must hold no "
        "rows. A PostgreSQL password comes from DIGITALME_DATABASE_PASSWORD "
        "or ~/.pgpass, never from the command line",
    )
    p.set_defaults(func=cmd_migrate_data)
    p = sub.add_parser(
        "smoke-test",
        help="one chat turn through the running service, as a throw-away "
        "token that is deleted afterwards (the deploy's health gate)",
    )
    p.add_argument(
        "--url",
        default="http://127.0.0.1:8080",
        help="the service's base URL (default http://127.0.0.1:8080)",
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds the whole turn may take (default 60)"
    )
    p.set_defaults(func=cmd_smoke_test)
    p = sub.add_parser("check-config", help="validate the settings and print them, secrets masked")
    p.add_argument(
        "--reference",
        action="store_true",
        help="print the reference table of all settings (Markdown) and exit",
    )
    p.add_argument(
        "--env-file",
        metavar="FILE",
        type=Path,
        help="check the settings of FILE (NAME=value lines, as systemd's "
        "EnvironmentFile= reads them) instead of this process's environment; "
        "only the file's content is judged, not the folders it names",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="a DIGITALME_* variable that is no setting (a typo) is an error "
        f"(exit {EXIT_CONFIG}), not a warning",
    )
    p.set_defaults(func=cmd_check_config)

    persona = sub.add_parser("persona", help="import and inspect the persona")
    psub = persona.add_subparsers(dest="persona_command", required=True, metavar="ACTION")
    p = psub.add_parser(
        "import",
        help="import a persona from YAML or Markdown with front matter (replaces the current one)",
    )
    p.add_argument("file", help="persona file (.yaml, .yml, .md)")
    p.add_argument(
        "--if-changed",
        action="store_true",
        help="do nothing when the stored persona was imported from this very file "
        "(same SHA-256); for deployment tools",
    )
    p.set_defaults(func=cmd_persona_import)
    p = psub.add_parser("show", help="print the stored persona")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml")
    p.set_defaults(func=cmd_persona_show)
    p = psub.add_parser("prompt", help="print the system prompt built from the persona")
    p.set_defaults(func=cmd_persona_prompt)

    token = sub.add_parser("token", help="manage API bearer tokens")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = tsub.add_parser("create", help="create a token and print it (once)")
    p.add_argument("--name", required=True, help="who or what the token is for")
    p.add_argument(
        "--scope",
        required=True,
        choices=SCOPES,
        help="chat: talk to the clone; admin: also manage persona and tokens",
    )
    p.add_argument("--quiet", action="store_true", help="print only the token")
    p.set_defaults(func=cmd_token_create)
    p = tsub.add_parser("list", help="list tokens (never their secrets)")
    p.set_defaults(func=cmd_token_list)
    p = tsub.add_parser("revoke", help="revoke a token by id")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_token_revoke)

    inbox = sub.add_parser("inbox", help="show, retry and prune webhook deliveries")
    isub = inbox.add_subparsers(dest="inbox_command", required=True, metavar="ACTION")
    p = isub.add_parser("list", help="list deliveries, newest first, with their last error")
    p.add_argument("--status", choices=STATUSES, help="only deliveries with this status")
    p.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    p.set_defaults(func=cmd_inbox_list)
    p = isub.add_parser(
        "retry",
        help="set a failed (or ignored) delivery back to pending; "
        "the running service processes it again",
    )
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_inbox_retry)
    p = isub.add_parser(
        "prune",
        help="delete finished deliveries and activity past their "
        "retention now (the service does it every "
        "DIGITALME_PRUNE_INTERVAL_MINUTES)",
    )
    p.set_defaults(func=cmd_inbox_prune)

    for add_commands in CHANNEL_COMMANDS:  # each channel's own (integrations/)
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env_file: Path | None = getattr(args, "env_file", None)
    try:
        # With --env-file, the file's variables alone (secrets are never in it).
        args.environ = read_env_file(env_file) if env_file else None
        settings = load_settings(args.environ)
    except EnvFileError as exc:
        print(f"digitalme: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"digitalme: {env_file}: {exc}" if env_file else f"digitalme: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(settings.log_level)
    try:
        result: int = args.func(settings, args)
        return result
    except (CommandError, PersonaError, TokenError) as exc:
        print(f"digitalme: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except DatabaseError as exc:
        print(f"digitalme: database error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"digitalme: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
