#!/usr/bin/env bash
# The main job, on this machine: boot throw-away Debian 12 hosts (real systemd, their own
# addresses: docs/sandbox.md), run `ansible-playbook playbooks/site.yml` against them exactly
# as against a VPS, and print how to talk to the clone over HTTPS.
#
#   scripts/demo.sh          # deploy (again: it converges what is there)
#   scripts/demo.sh down     # stop the Claude stand-in and remove the hosts
#
# The sandbox hosts cannot reach the internet, so the clone's Claude is a local stand-in of
# the Anthropic API running on this machine (it answers "Stand-in reply to: ..."). A real
# deployment points at api.anthropic.com: see docs/deployment.md.
set -euo pipefail
cd "$(dirname "$0")/.."

state=.cache/demo
standin_port=8765   # digitalme_anthropic_base_url in inventory/sandbox/group_vars/all/main.yml
domain=digitalme.sandbox.test

stop_standin() {
    if [[ -f $state/standin.pid ]]; then
        kill "$(cat "$state/standin.pid")" 2>/dev/null || true
        rm -f "$state/standin.pid"
    fi
}

if [[ ${1:-} == down ]]; then
    stop_standin
    make --no-print-directory sandbox-down
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "usage: scripts/demo.sh [down]" >&2
    exit 2
fi

scripts/bootstrap.sh
mkdir -p "$state"
started=$(date +%s)

echo "demo: booting sandbox hosts (app, replica)"
make --no-print-directory sandbox HOSTS="app:digitalme replica:backup_targets"
controller=$(.venv/bin/python - <<'PY'
import yaml
print(yaml.safe_load(open("inventory/sandbox/hosts.yml"))["all"]["vars"]["sandbox_controller_address"])
PY
)
app=$(.venv/bin/python - <<'PY'
import yaml
print(yaml.safe_load(open("inventory/sandbox/hosts.yml"))["all"]["hosts"]["app"]["ansible_host"])
PY
)

stop_standin
echo "demo: starting the Claude stand-in on $controller:$standin_port"
setsid .venv/bin/python -m standins.anthropic_api --host "$controller" \
    --port "$standin_port" --delay 0.1 >"$state/standin.log" 2>&1 < /dev/null &
echo $! > "$state/standin.pid"
for _ in $(seq 1 50); do
    grep -q "listening on" "$state/standin.log" 2>/dev/null && break
    sleep 0.2
done

echo "demo: ansible-playbook -i inventory/sandbox playbooks/site.yml"
.venv/bin/ansible-playbook -i inventory/sandbox playbooks/site.yml

ssh_admin=(python3 sandbox/sandbox.py ssh --user admin app --)
"${ssh_admin[@]}" sudo cat /var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt \
    > "$state/caddy-root.crt"
token=$("${ssh_admin[@]}" sudo /usr/local/sbin/digitalme token create \
    --name "demo-$(date +%s)" --scope chat --quiet)
echo "demo: checking https://$domain/health/ready through Caddy"
curl --fail --silent --show-error --noproxy '*' --resolve "$domain:443:$app" \
    --cacert "$state/caddy-root.crt" "https://$domain/health/ready" >/dev/null

cat <<MSG

DigitalMe is deployed on the sandbox host "app" ($app), in $(( $(date +%s) - started ))s:
  https://$domain/   (Caddy, certificate from its internal CA: $state/caddy-root.crt)

Talk to the clone with this chat token (also the one to paste into the web chat):

    $token

  curl --resolve $domain:443:$app --cacert $state/caddy-root.crt \\
       -H "Authorization: Bearer $token" -X POST https://$domain/api/v1/conversations
  curl --resolve $domain:443:$app --cacert $state/caddy-root.crt \\
       -H "Authorization: Bearer $token" --json '{"text": "Hello!"}' \\
       https://$domain/api/v1/conversations/<id from above>/messages

For a browser on this machine: add "$app $domain" to /etc/hosts and trust the CA file.
On the host:  python3 sandbox/sandbox.py ssh --user admin app -- sudo systemctl status digitalme
Tear down:    scripts/demo.sh down
MSG
