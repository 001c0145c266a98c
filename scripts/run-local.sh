#!/usr/bin/env bash
# Runs DigitalMe on this machine, on the sample persona, for a quick look:
#   scripts/run-local.sh            # http://127.0.0.1:8080
# With ANTHROPIC_API_KEY set it talks to Claude; without it, to a local stand-in of the
# Anthropic API that answers "Stand-in reply to: ..." (clearly not the real thing).
# State lives in .cache/local/ (delete it to start over). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --app
# The stand-in lives with the tests; it needs nothing the app does not have.
state=.cache/local
mkdir -p "$state"
export DIGITALME_DB_PATH=$PWD/$state/digitalme.db
export DIGITALME_LISTEN=${DIGITALME_LISTEN:-127.0.0.1:8080}
export DIGITALME_ENV=local
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null; }
trap cleanup EXIT INT TERM
if [[ -z ${ANTHROPIC_API_KEY:-} ]]; then
    port=8765
    .venv/bin/python -m standins.anthropic_api --host 127.0.0.1 --port "$port" \
        --delay 0.2 >"$state/standin.log" 2>&1 &
    pids+=($!)
    export ANTHROPIC_API_KEY=local-standin-key ANTHROPIC_BASE_URL=http://127.0.0.1:$port
    echo "run-local: no ANTHROPIC_API_KEY: replies come from a local stand-in of Claude"
fi
.venv/bin/digitalme migrate
.venv/bin/digitalme persona import docs/examples/persona.yaml
token=$(.venv/bin/digitalme token create --name "local-$(date +%s)" --scope admin --quiet)
.venv/bin/digitalme serve &
pids+=($!)
for _ in $(seq 1 100); do
    curl -fsS "http://$DIGITALME_LISTEN/health" >/dev/null 2>&1 && break
    sleep 0.1
done
cat <<MSG

DigitalMe is running at http://$DIGITALME_LISTEN/  (Ctrl-C stops it)
Open it in a browser and paste this admin token:

    $token

Or from a shell:
    curl -s -X POST http://$DIGITALME_LISTEN/api/v1/conversations -H "Authorization: Bearer $token"
MSG
wait
