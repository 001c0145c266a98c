"""How long `playbooks/site.yml` takes, over Mitogen (ansible.cfg's strategy), over
Mitogen's strategy as shipped (without the per-run memory of
playbooks/strategy_plugins/mitogen_linear.py) and with Ansible's own linear strategy,
side by side on the same deployment.

Boots a sandbox (app host in `digitalme` and `monitoring`, SFTP replica in
`backup_targets`: the example inventory's layout; docs/sandbox.md), runs a fresh
site.yml over Mitogen, then ``--rounds`` rounds of no-change runs (linear, Mitogen as
shipped, ours, in turn) and a ``--check --diff`` run over Mitogen. Every run must end
with failed=0, and every no-change and check run with changed=0 on both hosts, or the
bench fails: a fast run that changes something is not the same work. Prints each time
and the ratios of the medians (linear / ours, Mitogen as shipped / ours); the sandbox is
removed at the end (``--keep`` keeps it).

Needs root (sandbox hosts) and the repository's .venv; the Claude stand-in runs on the
controller for the deployment's health gate. About 13 minutes on a quiet 2-core machine:

    sudo .venv/bin/python -m bench.deploy_bench --rounds 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.sandboxes import REPO, Sandbox, boot_sandbox, run_tool
from tests.support.process import StandinProcess

HOSTS = ("app:digitalme,monitoring", "replica:backup_targets")
STANDIN_PORT = 8765  # digitalme_anthropic_base_url in inventory/sandbox/group_vars
STRATEGIES = {"mitogen": "mitogen_linear", "mitogen-shipped": "mitogen_linear", "linear": "linear"}
# Mitogen's own plugin folder instead of ansible.cfg's: its mitogen_linear, not the shim's.
SHIPPED_PLUGINS = (
    Path(importlib.util.find_spec("ansible_mitogen").origin or "").parent / "plugins" / "strategy"
)


def recap(output: str) -> dict[str, dict[str, int]]:
    return {
        host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counters)}
        for host, counters in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.MULTILINE)
    }


def site_yml(sandbox: Sandbox, strategy: str, *args: str, unchanged: bool) -> float:
    """One site.yml run with ``strategy``; its seconds. Exits when it failed, or changed
    something where nothing should change."""
    os.environ["ANSIBLE_STRATEGY"] = STRATEGIES[strategy]
    if strategy == "mitogen-shipped":
        os.environ["ANSIBLE_STRATEGY_PLUGINS"] = str(SHIPPED_PLUGINS)
    else:
        os.environ.pop("ANSIBLE_STRATEGY_PLUGINS", None)
    started = time.monotonic()
    result = sandbox.ansible_playbook("playbooks/site.yml", *args, check=False, timeout=3600)
    seconds = time.monotonic() - started
    counts = recap(result.stdout)
    failed = (
        result.returncode != 0
        or not counts
        or any(c["failed"] or c["unreachable"] for c in counts.values())
    )
    changed = unchanged and any(c["changed"] for c in counts.values())
    if failed or changed:
        sys.exit(
            f"deploy_bench: site.yml {' '.join(args)} with {strategy} "
            f"{'failed' if failed else 'changed something'}: {counts}\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
        )
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of no-change runs: linear, Mitogen as shipped, ours (default 2)",
    )
    parser.add_argument(
        "--suite",
        choices=("bookworm", "trixie"),
        default="bookworm",
        help="the hosts' Debian release (default bookworm)",
    )
    parser.add_argument("--name", default="bench-deploy", help="the sandbox's name")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox afterwards")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if os.geteuid() != 0:
        parser.error("sandbox hosts need root: run it with sudo")

    workdir = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    sandbox = boot_sandbox(args.name, HOSTS, workdir / "inventory", suite=args.suite)
    standin = StandinProcess(workdir, host=sandbox.controller_address, port=STANDIN_PORT)
    standin.start()
    times: dict[str, list[float]] = {"linear": [], "mitogen-shipped": [], "mitogen": []}
    try:
        fresh = site_yml(sandbox, "mitogen", unchanged=False)
        print(f"fresh site.yml (mitogen): {fresh:.1f} s", flush=True)
        for round_ in range(1, args.rounds + 1):
            for strategy in times:
                seconds = site_yml(sandbox, strategy, unchanged=True)
                times[strategy].append(seconds)
                print(
                    f"round {round_}: no-change site.yml ({strategy}): {seconds:.1f} s", flush=True
                )
        check = site_yml(sandbox, "mitogen", "--check", "--diff", unchanged=True)
        print(f"--check --diff (mitogen): {check:.1f} s")
    finally:
        standin.stop()
        if not args.keep:
            run_tool("down", "--name", args.name, timeout=300)
    medians = {strategy: statistics.median(runs) for strategy, runs in times.items()}
    ratio = medians["linear"] / medians["mitogen"]
    shipped_ratio = medians["mitogen-shipped"] / medians["mitogen"]
    print(
        f"no-change site.yml: linear {medians['linear']:.1f} s, Mitogen as shipped "
        f"{medians['mitogen-shipped']:.1f} s, ours {medians['mitogen']:.1f} s (medians): "
        f"ours is {ratio:.2f}x faster than linear, {shipped_ratio:.2f}x than Mitogen as "
        f"shipped; load average now {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "fresh_mitogen_seconds": round(fresh, 1),
                    "no_change_seconds": times,
                    "check_mitogen_seconds": round(check, 1),
                    "ratio_linear_over_mitogen": round(ratio, 2),
                    "ratio_shipped_over_mitogen": round(shipped_ratio, 2),
                    "repo": str(REPO),
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
