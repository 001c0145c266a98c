"""An S3 replica cannot be reached from the sandbox: render_s3.yml renders the role's
files for one on app-file (in a scratch folder, not in /etc) and validates them with
litestream itself and systemd-analyze. These checks read what it rendered."""

from __future__ import annotations

import re

import pytest
from conftest import REPORT
from verifier import ansible_playbook, record

testinfra_hosts = ["app-file"]

RENDERED = "/tmp/litestream-s3-render"
SECRET = "molecule/S3+secret-0123456789"


@pytest.fixture(scope="module")
def rendered():
    returncode, output = ansible_playbook(playbook="render_s3.yml")
    assert returncode == 0, output[-6000:]
    return output


def test_s3_configuration_is_accepted_by_litestream(host, rendered):
    config = host.file(f"{RENDERED}/litestream.yml").content_string
    for line in (
        "type: s3",
        'bucket: "digitalme-backups"',
        'path: "digitalme/app"',
        'endpoint: "https://s3.example.invalid"',
        'region: "eu-central-1"',
        "force-path-style: true",
        "sync-interval: 1s",
    ):
        assert line in config, line
    assert SECRET not in config and "AKIAMOLECULE" not in config
    listed = host.check_output(f"litestream databases -config {RENDERED}/litestream.yml")
    assert re.search(r"^/var/lib/digitalme/digitalme.db\s+s3$", listed, re.M), listed


def test_s3_credentials_go_to_a_root_only_environment_file(host, rendered):
    env = host.file(f"{RENDERED}/s3.env")
    assert (env.user, env.mode) == ("root", 0o600)
    assert f"LITESTREAM_SECRET_ACCESS_KEY='{SECRET}'" in env.content_string
    assert "LITESTREAM_ACCESS_KEY_ID='AKIAMOLECULE'" in env.content_string
    # systemd reads the values without the quotes.
    seen = host.check_output(
        f"systemd-run --quiet --pipe --wait --collect --property=EnvironmentFile={RENDERED}/s3.env "
        "printenv LITESTREAM_SECRET_ACCESS_KEY"
    )
    assert seen == SECRET
    assert SECRET not in rendered  # no_log and diff: false


def test_s3_units_reach_the_network_and_stay_hardened(host, rendered):
    for unit in ("litestream.service", "litestream-restore.service"):
        text = host.file(f"{RENDERED}/{unit}").content_string
        assert "EnvironmentFile=/etc/litestream/s3.env" in text
        assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in text
        assert "PrivateNetwork" not in text and "LoadCredential" not in text
        assert host.run(f"systemd-analyze verify {RENDERED}/{unit}").rc == 0
        report = host.check_output(
            f"systemd-analyze security --offline=yes {RENDERED}/{unit} --no-pager"
        )
        score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", report).group(1))
        record(REPORT, ("app-file (s3 rendering)", f"exposure {unit}"), score)
        assert score <= 4.0, report
