"""Testinfra checks of the sample role on a sandbox host (run by `molecule verify`)."""

import pytest

PORT = 8080
MESSAGE = "Hello from a sandbox host"


@pytest.fixture
def journal(host):
    """The unit's journal, to show in a failure message."""
    return lambda: host.run("journalctl -u sandbox-sample --no-pager -n 40").stdout


def test_package_is_installed_from_the_mirror(host):
    assert host.package("busybox").is_installed


def test_unit_is_enabled_and_running(host, journal):
    service = host.service("sandbox-sample")
    assert service.is_enabled
    assert service.is_running, journal()


def test_unit_listens_and_serves_the_page(host, journal):
    assert host.socket(f"tcp://0.0.0.0:{PORT}").is_listening, journal()
    page = host.run(
        f'python3 -c "import urllib.request; print(urllib.request.urlopen('
        f"'http://127.0.0.1:{PORT}/index.html', timeout=5).read().decode())\""
    )
    assert page.rc == 0, page.stderr
    assert MESSAGE in page.stdout


def test_unit_runs_as_a_dynamic_user_with_no_capabilities(host):
    show = host.run("systemctl show -p MainPID --value sandbox-sample").stdout.strip()
    status = host.file(f"/proc/{show}/status").content_string
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid) >= 61184, status  # systemd's DynamicUser range
    cap_eff = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    assert int(cap_eff, 16) == 0, status


def test_page_file_is_read_only_for_the_service(host):
    page = host.file("/srv/sandbox-sample/index.html")
    assert page.user == "root"
    assert page.mode == 0o644
