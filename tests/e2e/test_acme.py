"""The production TLS path end to end: Caddy gets its certificate from a real ACME server.

The server is Debian's `pebble`, Let's Encrypt's test ACME server (installed by
scripts/bootstrap.sh), run on the controller with `-strict`, its own HTTPS listener
certificate (a CA this module makes, as a company CA would be), `httpPort` 80 and
`tlsPort` 443 so that it validates against the real Caddy, and `pebble-challtestsrv` as
its DNS server, answering the sandbox domain with the app host's address. Certificates are
valid for CERT_SECONDS, so renewals happen while the module runs.

The site is configured as an owner points it at a CA of their own (docs/deployment.md):
`caddy_acme_ca` (the directory), `caddy_acme_ca_root` (the root of the server's own HTTPS
certificate), `caddy_acme_challenges`, `caddy_acme_renew_interval`. The root that signs
the issued certificates (Pebble's, new on every start) is put in the app host's trust
store, as Let's Encrypt's is on any Debian host, so the role's readiness check through
Caddy verifies the chain like a client would.

One deployment, made once for the module: an app host alone. In order:

1. site.yml issues a certificate over HTTP-01 (TLS-ALPN-01 turned off): HTTPS verifies
   against Pebble's root, not without it; Caddy's journal shows the HTTP-01 challenge
   answered to Pebble; a re-run of the proxy play changes nothing.
2. The certificate is renewed before it expires, while requests go on: every request
   verified, none failed.
3. TLS-ALPN-01 alone, port 80 closed to the CA: a host without a certificate gets one.
4. Both challenge ports closed: the play fails within caddy_certificate_wait_seconds,
   quoting the CA's own error, and the site serves no certificate at all (never a
   self-signed one); once the ports are open, the play gets one again.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.deployments import DOMAIN, STANDIN_PORT, Deployment, chat_turn, free_port, recap
from tests.e2e.sandboxes import REPO, Sandbox, add_group_vars
from tests.support.process import StandinProcess

pytestmark = pytest.mark.e2e

HOSTS = ("app:digitalme",)
TIMINGS = REPO / "artifacts" / "acme-timings.json"
CERT_SECONDS = 90  # Caddy renews with a third of the lifetime left: after about 60 s
RENEW_INTERVAL = "10s"
HOST_TRUSTED_ROOT = "/usr/local/share/ca-certificates/e2e-pebble-root.crt"
BLOCK_TABLE = "e2e_acme_block"  # nftables table of the tests' own port blocks on the host


@dataclass
class Pebble:
    """pebble and pebble-challtestsrv on the controller's address in the sandbox network."""

    directory: str
    management: str
    listener_ca: str  # PEM of the CA of pebble's own HTTPS listener
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def get(self, url: str) -> bytes:
        context = ssl.create_default_context(cadata=self.listener_ca)
        with urllib.request.urlopen(url, timeout=10, context=context) as answer:
            data: bytes = answer.read()
            return data

    def issuing_root(self) -> str:
        """The root that signs the issued certificates (made anew on every pebble start)."""
        return self.get(f"{self.management}/roots/0").decode()

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=30)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def listener_certificate(workdir: Path, address: str) -> None:
    """ca.pem, and cert.pem + key.pem for ``address`` signed by it: pebble's HTTPS listener,
    keys made by this run."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=DigitalMe e2e ACME listener CA",
        cwd=workdir,
    )
    openssl(
        "req", *ec, "-keyout", "key.pem", "-out", "listener.csr", "-subj", "/CN=pebble", cwd=workdir
    )
    (workdir / "listener.ext").write_text(
        f"subjectAltName=IP:{address}\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "listener.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "listener.ext",
        "-out",
        "cert.pem",
        cwd=workdir,
    )


def start_pebble(address: str, app_address: str, workdir: Path) -> Pebble:
    listener_certificate(workdir, address)
    acme, management, dns, dns_management = (free_port(address) for _ in range(4))
    (workdir / "pebble.json").write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"{address}:{acme}",
                    "managementListenAddress": f"{address}:{management}",
                    "certificate": str(workdir / "cert.pem"),
                    "privateKey": str(workdir / "key.pem"),
                    "httpPort": 80,
                    "tlsPort": 443,  # the challenges reach the real Caddy
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                    "certificateValidityPeriod": CERT_SECONDS,
                }
            }
        )
    )
    pebble = Pebble(
        f"https://{address}:{acme}/dir",
        f"https://{address}:{management}",
        (workdir / "ca.pem").read_text(),
        workdir,
    )
    # DNS for pebble's validations: every name is the app host (no other listener).
    pebble.processes.append(
        subprocess.Popen(
            [
                "pebble-challtestsrv",
                "-defaultIPv4",
                app_address,
                "-defaultIPv6",
                "",
                "-dns01",
                f"{address}:{dns}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                f"{address}:{dns_management}",
            ],
            stdout=(workdir / "challtestsrv.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
    )
    environment = {
        "PATH": "/usr/bin:/bin",
        "PEBBLE_VA_NOSLEEP": "1",  # no random 0-15 s sleep before validating
        "PEBBLE_WFE_NONCEREJECT": "0",  # no deliberately rejected nonces
        "PEBBLE_AUTHZREUSE": "0",
    }  # every order solves its challenge
    pebble.processes.append(
        subprocess.Popen(
            [
                "pebble",
                "-strict",
                "-config",
                str(workdir / "pebble.json"),
                "-dnsserver",
                f"{address}:{dns}",
            ],
            env=environment,
            stdout=(workdir / "pebble.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            pebble.get(pebble.directory)
            return pebble
        except OSError:
            dead = [p.args for p in pebble.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                pebble.stop()
                raise AssertionError(
                    f"pebble did not start ({dead}):\n" + (workdir / "pebble.log").read_text()
                ) from None
            time.sleep(0.2)


@dataclass
class AcmeSite:
    deployment: Deployment
    pebble: Pebble

    @property
    def sandbox(self) -> Sandbox:
        return self.deployment.sandbox


def acme_settings(pebble: Pebble, challenges: list[str]) -> dict[str, dict[str, object]]:
    return {
        "digitalme": {
            "caddy_tls_mode": "acme",
            "caddy_acme_ca": pebble.directory,
            "caddy_acme_ca_root": pebble.listener_ca,
            "caddy_acme_email": "owner@digitalme.example.org",
            "caddy_acme_challenges": challenges,
            "caddy_acme_renew_interval": RENEW_INTERVAL,
            # Readiness through Caddy against the system's trust store (where Pebble's root is,
            # as Let's Encrypt's is on any host), instead of the sandbox's Caddy internal root.
            "digitalme_ready_ca_file": "",
        }
    }


def succeeded(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    counters = recap(result.stdout).get("app", {})
    assert result.returncode == 0 and counters.get("failed") == 0, result.stdout[-5000:]
    return counters


@pytest.fixture(scope="module")
def site(sandbox_hosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeSite]:
    sandbox = sandbox_hosts(*HOSTS)
    workdir = tmp_path_factory.mktemp("acme")
    pebble = start_pebble(sandbox.controller_address, sandbox.hosts["app"].address, workdir)
    standin = StandinProcess(workdir, host=sandbox.controller_address, port=STANDIN_PORT)
    try:
        standin.start()
        root = pebble.issuing_root()
        sandbox.hosts["app"].run(
            f"cat > {HOST_TRUSTED_ROOT} <<'EOF'\n{root}EOF\nupdate-ca-certificates >/dev/null"
        )
        add_group_vars(sandbox.inventory, acme_settings(pebble, ["http-01"]))
        TIMINGS.unlink(missing_ok=True)
        deployment = Deployment(sandbox, workdir, TIMINGS, log_prefix="acme-")
        deployment.ca_file.write_text(root)  # curl from the controller trusts Pebble's root
        succeeded(deployment.playbook("site.yml", "site_fresh"))
        yield AcmeSite(deployment, pebble)
    finally:
        standin.stop()
        pebble.stop()


def served_certificate(deployment: Deployment) -> dict[str, str]:
    """Serial, issuer and expiry of the certificate Caddy serves for the domain (from the
    host itself; {} when it serves none)."""
    shown = deployment.on_app(
        f"openssl s_client -connect 127.0.0.1:443 -servername {DOMAIN} </dev/null 2>/dev/null"
        " | openssl x509 -noout -serial -issuer -enddate -nameopt RFC2253",
        check=False,
    )
    return dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)


def caddy_log(deployment: Deployment, since: float) -> list[dict[str, object]]:
    """Caddy's JSON log records since the epoch time ``since``."""
    lines = deployment.on_app(
        f"journalctl -u caddy -o cat --no-pager --since @{int(since)}"
    ).stdout.splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def wait_for_new_certificate(
    deployment: Deployment, old_serial: str, timeout: float
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        served = served_certificate(deployment)
        if served.get("serial") not in (None, old_serial):
            return served
        assert time.monotonic() < deadline, f"still {old_serial} after {timeout} s"
        time.sleep(2)


def block_from_controller(site: AcmeSite, ports: list[int]) -> None:
    """The app host refuses the controller's (Pebble's) connections to ``ports``, as a
    provider's firewall would: a table of its own, before the base role's."""
    controller = site.sandbox.controller_address
    site.deployment.on_app(
        f"nft add table inet {BLOCK_TABLE} && nft add chain inet {BLOCK_TABLE} input "
        "'{ type filter hook input priority -10; }' && "
        f"nft add rule inet {BLOCK_TABLE} input ip saddr {controller} tcp dport "
        f"'{{ {', '.join(map(str, ports))} }}' reject with tcp reset"
    )


def unblock(site: AcmeSite) -> None:
    site.deployment.on_app(f"nft delete table inet {BLOCK_TABLE}", check=False)


def forget_certificates(site: AcmeSite) -> None:
    """Caddy as on a fresh host: no certificate and no ACME account in its storage, started
    again. (A new account also has no valid authorization the CA could reuse: Pebble
    issued to the old one without a challenge while both ports were blocked, once.)"""
    storage = "/var/lib/caddy/.local/share/caddy"
    site.deployment.on_app(
        f"systemctl stop caddy && rm -rf {storage}/certificates {storage}/acme"
        " && systemctl start caddy"
    )


def test_site_yml_gets_a_certificate_over_http01(site: AcmeSite) -> None:
    deployment = site.deployment
    health = deployment.curl(f"https://{DOMAIN}/health/ready", "--fail")
    assert health.returncode == 0, health.stderr
    served = served_certificate(deployment)
    assert served["issuer"].startswith("CN=Pebble Intermediate CA"), served
    # Without Pebble's root the chain is not trusted: the certificate is Pebble's, signed
    # by nothing curl knows, not accepted by default.
    untrusted = subprocess.run(
        [
            "curl",
            "--silent",
            "--noproxy",
            "*",
            "--max-time",
            "20",
            "--resolve",
            f"{DOMAIN}:443:{deployment.app.address}",
            f"https://{DOMAIN}/health",
        ],
        capture_output=True,
        text=True,
    )
    assert untrusted.returncode == 60, (untrusted.returncode, untrusted.stderr)
    chat_turn(deployment, "hello over a certificate from the ACME CA", token_name="e2e-acme")

    log = caddy_log(deployment, since=0)
    answered = [r for r in log if r.get("msg") == "served key authentication"]
    assert answered and {r["challenge"] for r in answered} == {"http-01"}, answered
    assert {str(r["remote"]).rsplit(":", 1)[0] for r in answered} == {
        site.sandbox.controller_address
    }
    tried = {r.get("challenge_type") for r in log if r.get("msg") == "trying to solve challenge"}
    assert tried == {"http-01"}, tried  # tls-alpn-01 turned off by caddy_acme_challenges
    certificate_errors = [
        r
        for r in log
        if r.get("level") == "error" and str(r.get("logger", "")).startswith(("tls", "http.acme"))
    ]
    assert certificate_errors == []

    # The ACME branch of the caddy role converged: a re-run changes nothing (site.yml's own
    # re-run is test_site's; this is the proxy play alone).
    again = succeeded(deployment.playbook("proxy.yml", "proxy_again"))
    assert again["changed"] == 0, again


def test_the_certificate_is_renewed_before_it_expires_without_a_failed_request(
    site: AcmeSite,
) -> None:
    deployment = site.deployment
    before = served_certificate(deployment)
    results: list[int] = []
    stop = threading.Event()

    def requests() -> None:
        while not stop.is_set():
            answer = deployment.curl(f"https://{DOMAIN}/health", "--fail", max_time=10)
            results.append(answer.returncode)
            time.sleep(0.2)

    started = time.time()
    worker = threading.Thread(target=requests)
    worker.start()
    try:
        after = wait_for_new_certificate(deployment, before["serial"], timeout=CERT_SECONDS * 2)
        time.sleep(2)  # requests on the new certificate too
    finally:
        stop.set()
        worker.join()
    assert after["issuer"].startswith("CN=Pebble Intermediate CA"), after
    assert ssl.cert_time_to_seconds(after["notAfter"]) > ssl.cert_time_to_seconds(
        before["notAfter"]
    )
    renewed = [
        r
        for r in caddy_log(deployment, started)
        if r.get("msg") == "certificate renewed successfully"
    ]
    assert renewed, "Caddy did not log the renewal"
    assert results and set(results) == {0}, (len(results), results.count(0))
    deployment.record("requests_during_renewal", len(results))


def test_tls_alpn01_alone_gets_a_certificate_with_port_80_closed(site: AcmeSite) -> None:
    deployment = site.deployment
    add_group_vars(site.sandbox.inventory, acme_settings(site.pebble, ["tls-alpn-01"]))
    succeeded(deployment.playbook("proxy.yml", "proxy_tls_alpn"))
    block_from_controller(site, [80])
    try:
        started = time.time()
        forget_certificates(site)
        succeeded(deployment.playbook("proxy.yml", "proxy_tls_alpn_fresh"))
        served = served_certificate(deployment)
        assert served["issuer"].startswith("CN=Pebble Intermediate CA"), served
        log = caddy_log(deployment, started)
        tried = {
            r.get("challenge_type") for r in log if r.get("msg") == "trying to solve challenge"
        }
        assert tried == {"tls-alpn-01"}, tried
        assert [r for r in log if r.get("msg") == "certificate obtained successfully"]
        assert deployment.curl(f"https://{DOMAIN}/health", "--fail").returncode == 0
    finally:
        unblock(site)


def test_blocked_challenge_ports_fail_the_play_and_no_certificate_is_served(site: AcmeSite) -> None:
    deployment = site.deployment
    block_from_controller(site, [80, 443])
    try:
        forget_certificates(site)
        started = time.monotonic()
        failed = deployment.playbook(
            "proxy.yml", "proxy_blocked", "-e", "caddy_certificate_wait_seconds=20"
        )
        took = time.monotonic() - started
        assert failed.returncode != 0 and recap(failed.stdout)["app"]["failed"] == 1
        said = " ".join(failed.stdout.split())
        assert f"Caddy serves no certificate for {DOMAIN} after 20 s" in said, said[-3000:]
        assert "port 443 (tls-alpn-01)" in said and site.pebble.directory in said
        # The CA's own words about the challenge, not only Caddy's summary.
        assert re.search(r"tls-alpn-01: .*Failed to connect to [0-9.]+:443", said), said[-3000:]
        assert took < 120, took
        # No self-signed or internal stand-in: the site serves no certificate at all.
        assert served_certificate(deployment) == {}
    finally:
        unblock(site)
    # Ports open again: the next run asks Caddy to retry at once and gets a certificate.
    again = deployment.playbook("proxy.yml", "proxy_unblocked")
    succeeded(again)
    assert re.search(r"Ask Caddy to try its CA again now.*\nchanged: \[app\]", again.stdout)
    assert served_certificate(deployment)["issuer"].startswith("CN=Pebble Intermediate CA")
    assert deployment.curl(f"https://{DOMAIN}/health", "--fail").returncode == 0
