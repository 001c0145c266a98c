"""Testinfra checks of the caddy role on a sandbox host (run by `molecule verify`).

HTTPS is checked from the controller, as a client on the internet would see it: a TCP
connection to the host's address, SNI and Host set to the site's name, the certificate
verified against the root of Caddy's internal CA fetched from the host. The app is the
stand-in of prepare.yml (files/molecule-upstream.py) on 127.0.0.1:8080.
"""

import http.client
import json
import re
import socket
import ssl
import threading
import time

import pytest
from verifier import ansible_playbook, changed_tasks

DOMAIN = "digitalme.sandbox.test"  # converge.yml
UNIT = "caddy"
UPSTREAM_UNIT = "molecule-upstream"
ROOT_CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
MAX_BODY = 1024 * 1024  # caddy_max_body_size: 1MiB
HSTS = "max-age=31536000; includeSubDomains"


# --- Helpers -----------------------------------------------------------------------------


class SiteConnection(http.client.HTTPSConnection):
    """HTTPS to the host's address, with SNI, certificate name and Host set to DOMAIN."""

    def __init__(self, address, context, timeout=30):
        super().__init__(DOMAIN, 443, context=context, timeout=timeout)
        self.address = address

    def connect(self):
        sock = socket.create_connection((self.address, 443), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=DOMAIN)


@pytest.fixture
def journal(host):
    """Caddy's and the stand-in's journals, to show in a failure message."""
    return lambda: (
        host.run(
            f"journalctl -u {UNIT} -u {UPSTREAM_UNIT} --no-pager -n 60 -o short-precise"
        ).stdout
    )


@pytest.fixture
def address(host):
    return host.ansible.get_variables()["ansible_host"]


@pytest.fixture
def tls_context(host, tmp_path):
    """Trusts Caddy's internal root CA only (fetched from the host), verifies names."""
    root = tmp_path / "caddy-root.crt"
    root.write_text(host.file(ROOT_CA).content_string)
    return ssl.create_default_context(cafile=str(root))


@pytest.fixture
def https(address, tls_context, journal):
    """https(method, path, headers=None, body=None) -> (status, headers, body, seconds)."""

    def request(method, path, headers=None, body=None):
        connection = SiteConnection(address, tls_context)
        try:
            started = time.monotonic()
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            content = response.read()
            return response.status, response.headers, content, time.monotonic() - started
        finally:
            connection.close()

    # The certificate is issued in the background after a reload: wait for it.
    deadline = time.monotonic() + 30
    while True:
        try:
            request("GET", "/health")
            break
        except (OSError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise AssertionError(f"no HTTPS on {address}:443\n{journal()}") from None
            time.sleep(1)
    return request


def on_host(host, url):
    """GET url from the host itself: (status, body)."""
    fetch = host.run(
        'python3 -c "import urllib.request, urllib.error\n'
        "try:\n"
        f"    r = urllib.request.urlopen('{url}', timeout=10)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        '    print(e.code)"'
    )
    assert fetch.rc == 0, fetch.stderr
    status, _, body = fetch.stdout.partition("\n")
    return int(status), body


# --- Ansible: check mode, preflight, ACME configuration ---------------------------------


def test_check_mode_reports_no_change_on_the_converged_host():
    """`ansible-playbook --check --diff` on the converged host changes nothing.

    Runs first (file order), before the other tests touch the host; Molecule hands the
    verifier its inventory and ansible.cfg through the environment.
    """
    rc, output = ansible_playbook("--check", "--diff")
    assert rc == 0, output[-6000:]
    recap = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", output, re.MULTILINE)
    assert recap and all(changed == "0" for _, changed in recap), (
        f"changed in check mode: {changed_tasks(output)}\n{output[-6000:]}"
    )


def test_preflight_refuses_acme_for_a_reserved_name():
    """An impossible combination stops the play before any change, saying what to do."""
    rc, output = ansible_playbook("--check", "-e", "caddy_tls_mode=acme")
    assert rc != 0, output[-4000:]
    assert "Let's Encrypt does not issue certificates" in " ".join(output.split()), output[-4000:]
    assert "changed=0" in output, output[-4000:]


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (
            {"caddy_acme_ca": "http://ca.corp.internal/acme/directory"},
            "caddy_acme_ca must be the https:// URL of an ACME directory",
        ),
        (
            {
                "caddy_acme_ca": "https://ca.corp.internal/acme/directory",
                "caddy_acme_challenges": [],
            },
            "caddy_acme_challenges one or both of http-01 and tls-alpn-01 (now none)",
        ),
        (
            {
                "caddy_acme_ca": "https://ca.corp.internal/acme/directory",
                "caddy_acme_ca_root": "not a certificate",
            },
            "caddy_acme_ca_root the PEM text",
        ),
    ],
    ids=["plain-http-directory", "no-challenge", "root-not-pem"],
)
def test_preflight_refuses_acme_ca_settings_that_cannot_work(settings, says):
    extra = json.dumps({"caddy_tls_mode": "acme", **settings})
    rc, output = ansible_playbook("--check", "-e", extra)
    assert rc != 0, output[-4000:]
    assert says in " ".join(output.split()), output[-4000:]
    assert "changed=0" in output, output[-4000:]


def test_an_acme_ca_of_ones_own_may_certify_a_reserved_name():
    """Let's Encrypt refuses .test names; a private ACME CA (caddy_acme_ca) need not."""
    extra = json.dumps(
        {"caddy_tls_mode": "acme", "caddy_acme_ca": "https://ca.corp.internal/acme/directory"}
    )
    rc, output = ansible_playbook("--check", "-e", extra)
    assert rc == 0, output[-4000:]
    assert "Let's Encrypt does not issue certificates" not in output


def test_a_caddyfile_that_caddy_rejects_never_reaches_the_host(host):
    """A value preflight lets through but Caddy refuses: the converge fails, nothing changes."""
    before = host.file("/etc/caddy/Caddyfile").sha256sum
    rc, output = ansible_playbook("-e", "caddy_max_body_size=99999999999GiB")
    assert rc != 0, output[-4000:]
    assert "failed to validate" in output and "too large" in output, output[-4000:]
    assert host.file("/etc/caddy/Caddyfile").sha256sum == before
    assert host.service(UNIT).is_running


def test_acme_staging_configuration_renders_and_validates(host):
    """The production (ACME) branch of the template passes preflight and `caddy validate`."""
    scratch = "/root/Caddyfile.acme-check"
    rc, output = ansible_playbook(playbook="render_acme.yml")
    assert rc == 0, output[-6000:]
    try:
        adapted = host.run(f"caddy adapt --adapter caddyfile --config {scratch}")
        assert adapted.rc == 0, adapted.stderr
        config = json.loads(adapted.stdout)
        issuers = [
            issuer
            for policy in config["apps"]["tls"]["automation"]["policies"]
            for issuer in policy["issuers"]
        ]
        assert issuers, config["apps"]["tls"]
        assert all(issuer["module"] == "acme" for issuer in issuers), issuers
        assert {issuer["ca"] for issuer in issuers} == {
            "https://acme-staging-v02.api.letsencrypt.org/directory"
        }
        assert {issuer["email"] for issuer in issuers} == {"ops@digitalme.example.org"}
        assert "tls internal" not in host.file(scratch).content_string
        # Validation ran with a scratch storage: no CA or account left in root's home.
        assert not host.file("/root/.local/share/caddy").exists
    finally:
        host.run(f"rm -f {scratch}")


# --- Package, unit, files, sockets -----------------------------------------------------


def test_package_is_installed_and_the_unit_runs(host, journal):
    assert host.package("caddy").is_installed
    service = host.service(UNIT)
    assert service.is_enabled
    assert service.is_running, journal()
    failed = host.run("systemctl --failed --plain --no-legend").stdout
    assert failed.strip() == "", failed


def test_configuration_changes_were_reloaded_not_restarted(host):
    """The converge replaced the package's default site with a reload of the running Caddy."""
    log = host.run(f"journalctl -u {UNIT} --no-pager -o cat").stdout
    assert log.count("Started caddy.service") == 1, log[-3000:]
    assert "Reloaded caddy.service" in log, log[-3000:]


def test_caddyfile_is_ours_and_readable_by_caddy_only(host):
    caddyfile = host.file("/etc/caddy/Caddyfile")
    assert caddyfile.user == "root"
    assert caddyfile.group == "caddy"
    assert caddyfile.mode == 0o640
    content = caddyfile.content_string
    assert f"{DOMAIN} {{" in content
    assert "tls internal" in content
    assert ":80 {" not in content and "/usr/share/caddy" not in content  # package's default site


def test_internal_ca_lives_in_caddys_storage(host):
    root = host.file(ROOT_CA)
    assert root.exists and root.user == "caddy"
    key = host.file(ROOT_CA.replace("root.crt", "root.key"))
    assert key.user == "caddy" and key.mode == 0o600


def test_public_listeners_are_80_and_443_and_admin_is_on_loopback(host, address):
    assert host.socket("tcp://0.0.0.0:443").is_listening
    assert host.socket("tcp://0.0.0.0:80").is_listening
    assert host.socket("tcp://127.0.0.1:2019").is_listening
    admin = [line.split()[3] for line in host.run("ss -Htln 'sport = :2019'").stdout.splitlines()]
    assert admin == ["127.0.0.1:2019"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, 2019), timeout=5).close()


# --- HTTPS as a client sees it -------------------------------------------------------------


def test_certificate_chains_to_caddys_internal_root_for_the_domain(address, tls_context, https):
    with socket.create_connection((address, 443), 10) as sock:
        with tls_context.wrap_socket(sock, server_hostname=DOMAIN) as tls:
            cert = tls.getpeercert()
    assert ("DNS", DOMAIN) in cert["subjectAltName"]
    # A client that does not trust the root refuses the connection.
    untrusting = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection((address, 443), 10) as sock:
            untrusting.wrap_socket(sock, server_hostname=DOMAIN)


def test_http_redirects_to_https(address, https):
    connection = http.client.HTTPConnection(address, 80, timeout=10)
    try:
        connection.request("GET", "/chat?x=1", headers={"Host": DOMAIN})
        response = connection.getresponse()
        assert response.status == 308
        assert response.headers["Location"] == f"https://{DOMAIN}/chat?x=1"
    finally:
        connection.close()


def test_proxies_to_the_app_with_security_headers(https):
    status, headers, body, _ = https("GET", "/health")
    assert (status, body) == (200, b"ok\n")
    assert headers["Strict-Transport-Security"] == HSTS  # preload off by default
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert "Server" not in headers  # neither Caddy's nor the app's


def test_the_apps_own_security_headers_win(https):
    status, headers, _, _ = https("GET", "/own-headers")
    assert status == 200
    assert headers.get_all("X-Frame-Options") == ["SAMEORIGIN"]
    assert headers.get_all("Referrer-Policy") == ["no-referrer"]
    assert headers.get_all("Content-Security-Policy") == ["frame-ancestors 'self'"]
    assert headers["Strict-Transport-Security"] == HSTS


def test_metrics_are_not_proxied(host, https):
    status, headers, body, _ = https("GET", "/metrics")
    assert status == 404
    assert b"upstream_secret_metric" not in body
    assert headers["Strict-Transport-Security"] == HSTS
    # The app does serve them, on loopback, to scrapers on the host.
    assert on_host(host, "http://127.0.0.1:8080/metrics")[0] == 200


def test_caddys_own_metrics_are_on_the_admin_endpoint(host, https):
    """servers { metrics }: request metrics on localhost:2019/metrics (loopback), as the
    monitoring role scrapes them; the requests above are counted."""
    status, body = on_host(host, "http://localhost:2019/metrics")
    assert status == 200
    assert re.search(r'^caddy_http_request_duration_seconds_count\{[^}]*code="404"', body, re.M), (
        body[:3000]
    )


def test_request_body_limit(https):
    status, _, body, _ = https("POST", "/echo", body=b"a" * MAX_BODY)
    assert (status, body) == (200, f"received {MAX_BODY} bytes\n".encode())
    status, headers, _, _ = https("POST", "/echo", body=b"a" * (MAX_BODY + 1))
    assert status == 413
    assert headers["Strict-Transport-Security"] == HSTS


def test_server_sent_events_stream_without_buffering(address, tls_context, https):
    """The stand-in sends one event, waits 3 s, sends another: the first arrives at once."""
    connection = SiteConnection(address, tls_context)
    try:
        started = time.monotonic()
        connection.request("GET", "/events")
        response = connection.getresponse()
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        first = response.readline()
        first_after = time.monotonic() - started
        rest = response.read()
    finally:
        connection.close()
    assert first == b"data: first\n"
    assert first_after < 2, f"first event after {first_after:.1f}s: the stream was buffered"
    assert b"data: second" in rest


def test_a_request_waits_while_the_app_is_down(host, https, journal):
    """The app is down when the request arrives and back 2 s later: the client gets 200."""
    host.run_expect([0], f"systemctl stop {UPSTREAM_UNIT}")
    try:
        host.run_expect(
            [0],
            "systemd-run --on-active=2 --timer-property=AccuracySec=10ms "
            f"systemctl start {UPSTREAM_UNIT}",
        )
        status, _, body, seconds = https("GET", "/health")
    finally:
        host.run(f"systemctl start {UPSTREAM_UNIT}")
    assert (status, body) == (200, b"ok\n"), journal()
    assert seconds >= 1.5, f"answered after {seconds:.1f}s: was the app really down?"


def test_requests_across_an_app_restart_all_succeed(host, https, journal):
    statuses, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            statuses.append(https("GET", "/health")[0])

    workers = [threading.Thread(target=client) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        host.run_expect([0], f"systemctl restart {UPSTREAM_UNIT}")
        time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert statuses and set(statuses) == {200}, (statuses, journal())


def test_access_log_goes_to_the_journal_without_credentials(host, https):
    probe = f"probe-{time.time_ns()}"
    status, _, _, _ = https(
        "GET",
        f"/health?{probe}",
        headers={
            "Authorization": f"Bearer secret-{probe}",
            "Cookie": f"session=cookie-{probe}",
            "x-telegram-bot-api-secret-token": f"webhook-{probe}",  # any case on the wire
        },
    )
    assert status == 200
    deadline = time.monotonic() + 10
    while True:
        log = host.run(f"journalctl -u {UNIT} --no-pager -o cat --since -2min").stdout
        if probe in log or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    line = next((line for line in log.splitlines() if f"/health?{probe}" in line), None)
    assert line, log[-3000:]
    entry = json.loads(line)
    assert entry["logger"].startswith("http.log.access")
    assert entry["status"] == 200
    assert f"secret-{probe}" not in log
    assert f"cookie-{probe}" not in log
    assert f"webhook-{probe}" not in log


# --- The unit's hardening drop-in (last: the toggle test restarts Caddy) ------------------


def main_pid(host, unit):
    pid = host.check_output(f"systemctl show -p MainPID --value {unit}")
    assert pid not in ("", "0"), f"{unit} has no main process"
    return pid


def unit_process_status(host, unit):
    """/proc/<main PID>/status of a running unit, as a dict."""
    lines = host.check_output(f"cat /proc/{main_pid(host, unit)}/status").splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def exposure(host, unit):
    report = host.check_output(f"systemd-analyze security {unit}.service --no-pager")
    return float(re.search(r"exposure level for \S+: ([\d.]+)", report)[1]), report


def test_caddy_runs_hardened(host, https):
    dropin = host.file("/etc/systemd/system/caddy.service.d/hardening.conf")
    assert dropin.exists and dropin.user == "root" and dropin.mode == 0o644
    # What the kernel enforces on the running process, not only what the unit says.
    status = unit_process_status(host, UNIT)
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # a system-call filter is on
    assert int(status["CapBnd"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
    mounts = host.check_output(f"cat /proc/{main_pid(host, UNIT)}/mountinfo").splitlines()
    root = next(line.split() for line in mounts if line.split()[4] == "/")
    assert "ro" in root[5].split(","), root  # ProtectSystem=strict: / is read-only
    score, report = exposure(host, UNIT)
    print(f"systemd-analyze security caddy.service: {score}")
    assert score <= 2.0, report
    # And it still does its job: HTTPS through the proxy, certificates in its storage.
    assert https("GET", "/health")[0] == 200


def test_the_hardening_can_be_switched_off_and_on_again(host, https, journal):
    returncode, output = ansible_playbook("-e", "caddy_unit_hardening=false")
    assert returncode == 0, output[-3000:]
    assert not host.file("/etc/systemd/system/caddy.service.d/hardening.conf").exists
    assert int(unit_process_status(host, UNIT)["CapBnd"], 16) != 1 << 10, journal()
    assert https("GET", "/health")[0] == 200
    returncode, output = ansible_playbook()
    assert returncode == 0, output[-3000:]
    changed = changed_tasks(output)
    assert any(task.endswith("Harden the caddy unit (drop-in)") for task in changed), changed
    assert int(unit_process_status(host, UNIT)["CapBnd"], 16) == 1 << 10, journal()
    assert https("GET", "/health")[0] == 200
