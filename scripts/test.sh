#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what it needs, then runs pytest.
# Extra arguments go to pytest (for example: scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
mkdir -p artifacts
set +e
# Four workers by default (PYTEST_WORKERS=0 runs in this process): on 2 cores the workers
# mostly wait on hosts (boots, services, timers, alerts), so more of them fill the CPU: the
# whole suite took 37:50 and 42:37 on four, 44 on three (clean clones, 2026-12-07; CPU idle 16-18%
# either way) and 52 on two before every play ran over Mitogen (issue 12). Modules that
# share a sandbox stay on one worker (tests/conftest.py: pytest_xdist_make_scheduler).
# --durations: where the time goes, in every run (the 40-minute budget, issue 12).
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-4}" --dist loadscope --durations=30 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit $rc
