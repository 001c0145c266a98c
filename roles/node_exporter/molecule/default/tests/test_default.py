"""Testinfra checks of the node_exporter role on a sandbox host (run by `molecule verify`)."""

import re
import shlex
import socket
import time

import pytest
from verifier import ansible_playbook, changed_tasks

TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
TEXTFILE_GROUP = "node-exporter-textfile"
UNIT = "prometheus-node-exporter"


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


def test_preflight_refuses_a_public_listen_address():
    """An impossible setting stops the play before any change, saying what to do."""
    rc, output = ansible_playbook("--check", "-e", "node_exporter_listen_address=0.0.0.0:9100")
    assert rc != 0, output[-4000:]
    assert "use a loopback" in output and "changed=0" in output, output[-4000:]


def test_a_flag_the_binary_rejects_never_reaches_the_host(host):
    """A flag preflight lets through but node-exporter refuses: the converge fails, no change."""
    before = host.file("/etc/default/prometheus-node-exporter").sha256sum
    rc, output = ansible_playbook("-e", '{"node_exporter_extra_args": ["--collector.bogus"]}')
    assert rc != 0, output[-4000:]
    assert "failed to validate" in output and "collector.bogus" in output, output[-4000:]
    assert host.file("/etc/default/prometheus-node-exporter").sha256sum == before
    assert host.service(UNIT).is_running


@pytest.fixture
def journal(host):
    """The unit's journal, to show in a failure message."""
    return lambda: host.run(f"journalctl -u {UNIT} --no-pager -n 60").stdout


def metrics(host):
    page = host.run(
        'python3 -c "import urllib.request; print(urllib.request.urlopen('
        "'http://127.0.0.1:9100/metrics', timeout=10).read().decode())\""
    )
    assert page.rc == 0, page.stderr
    return page.stdout


def test_package_is_installed_without_recommends(host):
    assert host.package("prometheus-node-exporter").is_installed
    for recommended in ("prometheus-node-exporter-collectors", "nvme-cli"):
        assert not host.package(recommended).is_installed, recommended


def test_unit_is_enabled_and_running_and_nothing_failed(host, journal):
    service = host.service(UNIT)
    assert service.is_enabled
    assert service.is_running, journal()
    failed = host.run("systemctl --failed --plain --no-legend").stdout
    assert failed.strip() == "", failed


def test_arguments_are_in_the_environment_file(host):
    args = host.file("/etc/default/prometheus-node-exporter")
    assert args.user == "root" and args.group == "root"
    assert args.mode == 0o644
    assert (
        'ARGS="--web.listen-address=127.0.0.1:9100 --collector.systemd '
        f'--collector.textfile.directory={TEXTFILE_DIR}"'
    ) in args.content_string
    cmdline = host.run(f"cat /proc/$(systemctl show -p MainPID --value {UNIT})/cmdline")
    assert "--web.listen-address=127.0.0.1:9100" in cmdline.stdout


def test_listens_on_loopback_only(host, journal):
    assert host.socket("tcp://127.0.0.1:9100").is_listening, journal()
    assert not host.socket("tcp://0.0.0.0:9100").is_listening
    assert not host.socket("tcp://:::9100").is_listening
    listeners = host.run("ss -Htln 'sport = :9100'").stdout.split()
    assert [field for field in listeners if field.endswith(":9100")] == ["127.0.0.1:9100"]


def test_is_not_reachable_from_the_controller(host):
    address = host.ansible.get_variables()["ansible_host"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, 9100), timeout=5).close()


def test_textfile_directory_is_group_writable_and_setgid(host):
    directory = host.file(TEXTFILE_DIR)
    assert directory.is_directory
    assert directory.user == "root"
    assert directory.group == TEXTFILE_GROUP
    assert directory.mode == 0o2775
    assert host.group(TEXTFILE_GROUP).exists
    assert TEXTFILE_GROUP in host.user("prometheus").groups
    assert TEXTFILE_GROUP in host.user("digitalme").groups


def test_systemd_collector_reports_unit_states(host, journal):
    page = metrics(host)
    assert (
        f'node_systemd_unit_state{{name="{UNIT}.service",state="active",type="simple"}} 1'
    ) in page, journal()


def test_a_service_user_publishes_a_textfile_metric(host, journal):
    """A drill running as digitalme writes a .prom file (atomically, umask 027)."""
    run_id = str(time.time_ns())
    content = f'# TYPE molecule_drill_success gauge\nmolecule_drill_success{{run="{run_id}"}} 1\n'
    final = f"{TEXTFILE_DIR}/molecule_drill.prom"
    script = (
        "import os; os.umask(0o027); "
        f"open({final + '.tmp'!r}, 'w').write({content!r}); "
        f"os.rename({final + '.tmp'!r}, {final!r})"
    )
    write = host.run(f"runuser -u digitalme -- python3 -c {shlex.quote(script)}")
    assert write.rc == 0, write.stderr
    written = host.file(final)
    assert written.user == "digitalme" and written.group == TEXTFILE_GROUP
    assert written.mode == 0o640
    page = metrics(host)
    assert f'molecule_drill_success{{run="{run_id}"}} 1' in page, journal()
    assert "node_textfile_scrape_error 0" in page


# --- The unit's hardening drop-in (last: the toggle test restarts the exporter) -----------


def unit_process_status(host):
    """/proc/<main PID>/status of the running exporter, as a dict."""
    pid = host.check_output(f"systemctl show -p MainPID --value {UNIT}")
    assert pid not in ("", "0"), "node-exporter has no main process"
    lines = host.check_output(f"cat /proc/{pid}/status").splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def collector_results(host):
    page = metrics(host)
    results = {
        m[1]: float(m[2])
        for m in re.finditer(
            r'^node_scrape_collector_success\{collector="([^"]+)"\} (\S+)$', page, re.M
        )
    }
    # node-exporter 1.9.0 (Debian 13) reports the pressure collector failed on a kernel
    # without /proc/pressure/irq, after exporting the CPU, I/O and memory pressure
    # (prometheus/node_exporter#3259, fixed in 1.9.1): there, those metrics say it works.
    exported = {m[1] for m in re.finditer(r"^node_pressure_(cpu|io|memory)_\w+ \S+$", page, re.M)}
    if (
        results.get("pressure") == 0
        and exported == {"cpu", "io", "memory"}
        and not host.file("/proc/pressure/irq").exists
    ):
        results["pressure"] = 1.0
    return results


# Collectors that work on the sandbox hosts without the drop-in (the others, such as
# hwmon, dmi, timex, fail there either way: a container has no such hardware or rights).
WORKING_COLLECTORS = (
    "cpu",
    "diskstats",
    "filesystem",
    "loadavg",
    "meminfo",
    "netdev",
    "netstat",
    "pressure",
    "stat",
    "systemd",
    "textfile",
    "uname",
    "vmstat",
)


def test_node_exporter_runs_hardened_and_its_collectors_still_work(host, journal):
    dropin = host.file(f"/etc/systemd/system/{UNIT}.service.d/hardening.conf")
    assert dropin.exists and dropin.user == "root" and dropin.mode == 0o644
    status = unit_process_status(host)
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    assert int(status["CapBnd"], 16) == 0
    report = host.check_output(f"systemd-analyze security {UNIT}.service --no-pager")
    score = float(re.search(r"exposure level for \S+: ([\d.]+)", report)[1])
    print(f"systemd-analyze security {UNIT}.service: {score}")
    assert score <= 2.5, report
    results = collector_results(host)
    failed = [name for name in WORKING_COLLECTORS if results.get(name) != 1]
    assert not failed, (failed, journal())


def test_the_hardening_can_be_switched_off_and_on_again(host, journal):
    returncode, output = ansible_playbook("-e", "node_exporter_unit_hardening=false")
    assert returncode == 0, output[-3000:]
    assert not host.file(f"/etc/systemd/system/{UNIT}.service.d/hardening.conf").exists
    assert unit_process_status(host)["NoNewPrivs"].strip() == "0", journal()
    unhardened = collector_results(host)
    returncode, output = ansible_playbook()
    assert returncode == 0, output[-3000:]
    changed = changed_tasks(output)
    assert any(task.endswith("Harden the node-exporter unit (drop-in)") for task in changed), (
        changed
    )
    assert unit_process_status(host)["NoNewPrivs"].strip() == "1", journal()
    # The drop-in takes no collector away that works without it.
    hardened = collector_results(host)
    lost = sorted(name for name, ok in unhardened.items() if ok == 1 and hardened.get(name) != 1)
    assert not lost, (lost, journal())
