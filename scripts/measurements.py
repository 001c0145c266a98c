"""The figures the end-to-end tests measure, as the docs show them: generated from the
tests' own output, never copied by hand.

Each end-to-end module writes its figures to ``artifacts/<source>-timings.json``. After a
full run (the README's test command), ``record`` keeps a copy of them in
``docs/measured/<source>.json`` with the run's date and commit, and ``write`` renders every
measured block of the docs from those copies::

    <!-- measured: recovery -->
    (the table, generated)
    <!-- /measured -->

tests/unit/test_measurements.py fails when a block differs from what its copy renders, or
when a copy holds a figure this module does not describe. So, after a run::

    .venv/bin/python -m scripts.measurements record   # artifacts/ -> docs/measured/
    .venv/bin/python -m scripts.measurements write    # docs/measured/ -> the docs' blocks
    .venv/bin/python -m scripts.measurements check    # what the test checks
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
MEASURED = REPO / "docs" / "measured"
BLOCK = re.compile(
    r"(<!-- measured: (?P<source>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /measured -->)", re.DOTALL
)


@dataclass(frozen=True)
class Figure:
    key: str  # a key of the JSON file, or a pattern with one {} (a name, e.g. an alert's)
    what: str  # the table's words; {} is the name the pattern matched
    unit: str  # s, count, ratio, rate (per second), MB, bytes, score


def _s(key: str, what: str) -> Figure:
    return Figure(key, what, "s")


def _n(key: str, what: str) -> Figure:
    return Figure(key, what, "count")


# Per source (artifacts/<source>-timings.json), in the order the tables show them.
FIGURES: dict[str, tuple[Figure, ...]] = {
    "site": (
        _s("site_fresh_seconds", "`site.yml` on fresh hosts (app with monitoring, SFTP target)"),
        _s("site_rerun_seconds", "`site.yml` again, nothing to change (`changed=0`)"),
        _s(
            "package_install_floor_seconds",
            "`apt-get install` of the same packages on a bare host (the floor)",
        ),
        Figure("site_fresh_over_floor", "fresh `site.yml` over the floor", "ratio"),
        _s("replica_visible_seconds", "a chat turn acknowledged to it being on the SFTP target"),
        Figure("exposure_{}", "`systemd-analyze security` exposure of `{}`", "score"),
    ),
    "upgrade": (
        _s("deploy_previous_release_seconds", "`site.yml` deploying the previous commit"),
        _s("upgrade_play_seconds", "`upgrade.yml` to the checkout, under load: the play"),
        _s("upgrade_deploy_seconds", "of which the deploy (lock to passed gate)"),
        _s(
            "upgrade_restart_seconds",
            "the restart (`systemctl restart` until the new process accepted)",
        ),
        _s("upgrade_gate_seconds", "the health gate (readiness and a smoke chat turn)"),
        _n("upgrade_requests_during", "requests during the play"),
        _n("upgrade_requests_failed", "of which failed"),
        _n("upgrade_requests_held", "requests in flight across the restart"),
        _s("upgrade_held_added_p99_seconds", "latency the restart added to them (p99)"),
        _s("upgrade_held_added_max_seconds", "latency the restart added to them (max)"),
        _s("upgrade_p99_before_seconds", "p99 latency before the play"),
        _s("upgrade_p99_during_seconds", "p99 latency during the play"),
        _s("upgrade_nothing_new_seconds", "`upgrade.yml` with nothing new (`changed=0`)"),
        _s(
            "automatic_rollback_seconds",
            "automatic rollback of a release that never became ready (back to ready)",
        ),
        _s("rollback_code_play_seconds", "`rollback.yml`, code only: the play"),
        _s("rollback_code_seconds", "`rollback.yml`, code only: the deploy tool"),
        _s("rollback_data_play_seconds", "`rollback.yml`, code and data: the play"),
        _s("rollback_data_seconds", "`rollback.yml`, code and data: the deploy tool"),
    ),
    "monitoring": (
        _s("fault_to_firing_{}_seconds", "fault to `{}` notified (firing)"),
        _s("fix_to_resolved_{}_seconds", "fix to `{}` notified (resolved)"),
    ),
    "recovery": (
        _s("site_fresh_seconds", "`site.yml` on fresh hosts (app, SFTP target)"),
        _n(
            "sigkill_acknowledged_writes_restored",
            "acknowledged writes restored after Litestream's SIGKILL",
        ),
        Figure("database_bytes", "database size", "bytes"),
        _n("acknowledged_before_loss", "writes acknowledged before the loss (20 s of writes)"),
        _n("lost_tail_writes", "lost tail writes"),
        _s("rpo_seconds", "RPO: how long before the loss the oldest lost write was acknowledged"),
        _s("host_boot_seconds", "a fresh host booted under the same name and address"),
        _s("rto_seconds", "RTO: `site.yml` start to ready on the fresh host"),
        _s("recovery_site_seconds", "of which `site.yml` (restoring the database first)"),
        _s("restore_seconds", "of which `litestream-restore.service`"),
        _s("restore_playbook_seconds", "`restore.yml` check afterwards"),
        _s("raw_copy_seconds", "raw SFTP copy of the same file between the same hosts (floor)"),
        Figure("rto_over_raw_copy", "RTO over the raw copy", "ratio"),
        Figure("restore_over_raw_copy", "restore over the raw copy", "ratio"),
        _s("drill_seconds", "restore drill on the recovered host"),
        _s(
            "new_replica_synced_seconds",
            "a corrupted replica replaced: `backup.yml` to the new replica synced",
        ),
    ),
    "s3": (
        _s("site_fresh_seconds", "`site.yml` on a fresh app host replicating to S3"),
        _s("restore_point_in_time_seconds", "`restore.yml` to a point in time (forced)"),
        _s("restore_latest_seconds", "`restore.yml` of the latest state (forced)"),
        _s("site_recovery_seconds", "`site.yml` on a fresh host, restoring from the bucket"),
        _s("restore_check_seconds", "`restore.yml` check afterwards"),
    ),
    "acme": (
        _s("site_fresh_seconds", "`site.yml` on a fresh app host, certificate over HTTP-01"),
        _s("proxy_again_seconds", "`proxy.yml` again, nothing to change"),
        _n("requests_during_renewal", "requests during a renewal (all verified, none failed)"),
        _s("proxy_tls_alpn_seconds", "`proxy.yml` switching to TLS-ALPN-01 alone"),
        _s(
            "proxy_tls_alpn_fresh_seconds",
            "`proxy.yml` getting a first certificate over TLS-ALPN-01, port 80 closed",
        ),
        _s(
            "proxy_blocked_seconds",
            "`proxy.yml` failing with both challenge ports closed (to the CA's error)",
        ),
        _s("proxy_unblocked_seconds", "`proxy.yml` once the ports are open again"),
    ),
    "container": (
        _s("site_fresh_seconds", "`site.yml` on fresh hosts, container runtime (app, replica)"),
        Figure(
            "exposure_digitalme_unit",
            "`systemd-analyze security` exposure of `digitalme.service` (the container's unit)",
            "score",
        ),
        Figure("image_megabytes", "the release's image", "MB"),
        _s("image_build_no_cache_seconds", "building the image again without cache"),
        _s("replica_visible_seconds", "a chat turn acknowledged to it being on the replica host"),
        _s("upgrade_seconds", "`upgrade.yml` to a new image, under load: the play"),
        _n("upgrade_requests_during", "requests during the upgrade"),
        _n("upgrade_requests_failed", "of which failed"),
        _s("upgrade_restart_seconds", "the restart"),
        _s("upgrade_gate_seconds", "the health gate"),
        _s("rollback_seconds", "`rollback.yml` to the previous image"),
        _s("site_rerun_seconds", "`site.yml` again, nothing to change"),
        _s("site_fresh_host_seconds", "`site.yml` on a fresh host, restoring from the replica"),
    ),
    "compose": (
        _s(
            "{}_engine_install_seconds",
            "{}: `apt-get install` of Docker Engine and Compose on the host",
        ),
        _s("{}_up_build_seconds", "{}: `compose up --build -d` (images built, nothing cached)"),
        _s("{}_up_to_ready_seconds", "{}: from `up --build` to `/health/ready` through Caddy"),
        _s(
            "{}_replica_visible_seconds",
            "{}: a chat turn acknowledged to it restoring from the replica volume",
        ),
        _s("{}_restart_to_ready_seconds", "{}: `down`, then `up -d` to `/health/ready` again"),
    ),
    "scale-out": (
        _s(
            "site-fresh_seconds",
            "fresh `site.yml`: database, load balancer and monitoring host, two app hosts",
        ),
        _s("site-second_seconds", "second `site.yml`, nothing to change (`changed=0`)"),
        _s("failover_kill_seconds", "the kill of an app host (`sandbox.py kill`, a power cut)"),
        Figure(
            "failover_turns_per_second_two_hosts",
            "chat turns through the load balancer, two app hosts",
            "rate",
        ),
        Figure("failover_turns_per_second_one_host", "the same after one is killed", "rate"),
        _n("failover_requests", "requests under load across the kill"),
        _n("failover_failed_in_flight", "of which failed (in flight on the killed host)"),
        _s(
            "restore-refused_seconds",
            "`restore-database.yml` refusing a target the backups cannot reach",
        ),
        _s("restore-database_seconds", "`restore-database.yml` to a point in time"),
        _s("restore-undo_seconds", "undoing it"),
        _s(
            "database_recovery_seconds",
            "the database host lost: `site.yml` on it and a bare app host, restore included",
        ),
        _n(
            "database_recovery_messages_lost",
            "chat turns lost (written after the last archived WAL segment)",
        ),
        _s("site-recovery_seconds", "of which `site.yml`"),
    ),
    "trixie": (
        _s(
            "trixie-site-fresh_seconds",
            "`site.yml` on fresh Debian 13 hosts (app with monitoring, replica)",
        ),
        _s("trixie-site-rerun_seconds", "`site.yml` again, nothing to change"),
        _s(
            "remote_litestream_down_alert_seconds",
            "Litestream stopped on the app host to the monitoring host's alert",
        ),
    ),
}


def describe(source: str, key: str) -> tuple[int, str, str] | None:
    """(order, the table's words, unit) for a key, or None when it is not described."""
    for order, figure in enumerate(FIGURES.get(source, ())):
        if "{}" not in figure.key:
            if figure.key == key:
                return order, figure.what, figure.unit
            continue
        head, tail = figure.key.split("{}")
        if key.startswith(head) and key.endswith(tail) and len(key) > len(head) + len(tail):
            name = key[len(head) : len(key) - len(tail)]
            return order, figure.what.format(name), figure.unit
    return None


def value_text(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"
    if unit == "count":
        return f"{int(value):,}"
    if unit == "bytes":
        return f"{value / 2**20:.0f} MiB ({int(value):,} bytes)"
    if unit == "MB":
        return f"{value:.0f} MB"
    if unit == "ratio":
        return f"{value:.2f}"
    if unit == "rate":
        return f"{value:.1f}/s"
    return f"{value:.1f}"  # score


def undescribed(source: str, figures: dict[str, float]) -> list[str]:
    return [key for key in figures if describe(source, key) is None]


def render(source: str, measured: dict[str, object]) -> str:
    """The block's body for one source's copy: when and where it was measured, then one
    row per figure, in FIGURES' order."""
    figures: dict[str, float] = measured["figures"]  # type: ignore[assignment]
    missing = undescribed(source, figures)
    if missing:
        raise ValueError(
            f"{source}: figures not described in scripts/measurements.py: {', '.join(missing)}"
        )
    rows = sorted((describe(source, key), key) for key in figures)  # type: ignore[type-var]
    lines = [
        f"Recorded {measured['recorded']} at commit `{measured['commit']}` by the "
        f"README's test command (`docs/measured/{source}.json`, from "
        f"`artifacts/{source}-timings.json`):",
        "",
        "| Figure | Value | Key |",
        "| --- | --- | --- |",
    ]
    for (_, what, unit), key in rows:
        lines.append(f"| {what} | {value_text(figures[key], unit)} | `{key}` |")
    return "\n".join(lines) + "\n"


def load(source: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((MEASURED / f"{source}.json").read_text())
    return data


def docs_with_blocks() -> list[Path]:
    return sorted(
        path for path in (REPO / "docs").rglob("*.md") if "<!-- measured: " in path.read_text()
    )


def rendered_docs() -> dict[Path, tuple[str, str]]:
    """Each doc with a block: (its text now, its text with every block rendered)."""
    result = {}
    for path in docs_with_blocks():
        text = path.read_text()
        new = BLOCK.sub(
            lambda m: m[1] + "\n" + render(m["source"], load(m["source"])) + "\n" + m[4], text
        )
        result[path] = (text, new)
    return result


def record(artifacts: Path) -> list[str]:
    """Copy every described source's artifacts into docs/measured/; what it copied. The
    commit is the one of the checkout the artifacts folder is in (a clean clone's, say),
    else this one's."""
    commit = ""
    for checkout in (artifacts.resolve().parent, REPO):
        commit = subprocess.run(  # noqa: S603
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if commit:
            break
    MEASURED.mkdir(exist_ok=True)
    copied = []
    for source in FIGURES:
        path = artifacts / f"{source}-timings.json"
        if not path.exists():
            continue
        figures = {
            k: v for k, v in json.loads(path.read_text()).items() if isinstance(v, int | float)
        }
        missing = undescribed(source, figures)
        if missing:
            raise SystemExit(
                f"{path}: describe these figures in scripts/measurements.py "
                f"first: {', '.join(missing)}"
            )
        recorded = time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime))
        (MEASURED / f"{source}.json").write_text(
            json.dumps({"recorded": recorded, "commit": commit, "figures": figures}, indent=2)
            + "\n"
        )
        copied.append(source)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    recording = commands.add_parser(
        "record", help="copy artifacts/*-timings.json into docs/measured/ (after a full test run)"
    )
    recording.add_argument(
        "--artifacts",
        type=Path,
        default=ARTIFACTS,
        help="the run's artifacts folder (default: artifacts/)",
    )
    commands.add_parser("write", help="render the docs' measured blocks from docs/measured/")
    commands.add_parser("check", help="exit 1 when a block differs from its copy")
    args = parser.parse_args(argv)
    if args.command == "record":
        copied = record(args.artifacts)
        print(f"recorded: {', '.join(copied) or 'nothing (no artifacts)'}")
        return 0
    stale = {path: new for path, (text, new) in rendered_docs().items() if text != new}
    if args.command == "check":
        for path in stale:
            print(
                f"{path.relative_to(REPO)}: a measured block differs from docs/measured/ "
                "(run: python -m scripts.measurements write)",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path, new in stale.items():
        path.write_text(new)
    print(f"wrote: {', '.join(str(p.relative_to(REPO)) for p in stale) or 'nothing changed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
