"""Which tests one pytest-xdist worker runs together (tests/conftest.py)."""

from __future__ import annotations

from tests.conftest import worker_scope


def test_the_shared_site_modules_are_one_unit() -> None:
    scopes = {
        worker_scope(f"tests/e2e/{module}.py::test_x")
        for module in ("test_site", "test_monitoring", "test_upgrade")
    }
    assert scopes == {"e2e:shared-site"}


def test_an_end_to_end_module_is_one_unit_and_modules_differ() -> None:
    a = worker_scope("tests/e2e/test_recovery.py::test_restore")
    b = worker_scope("tests/e2e/test_recovery.py::test_drill[sftp]")
    c = worker_scope("tests/e2e/test_container_runtime.py::test_restore")
    assert a == b == "e2e:test_recovery"
    assert c != a


def test_each_role_scenario_on_each_release_is_its_own_unit() -> None:
    scenario = "tests/e2e/test_roles.py::test_molecule_scenario_passes"
    scopes = {
        worker_scope(f"{scenario}[{role}-{suite}]")
        for role in ("caddy", "base")
        for suite in ("bookworm", "trixie")
    }
    # Four units: the two releases of one role run on two workers at once (their sandboxes
    # are named apart: sandbox/molecule/vars.yml).
    assert len(scopes) == 4
    assert all(scope.startswith("e2e:test_roles[") for scope in scopes)
    assert (
        worker_scope("tests/e2e/test_roles.py::test_every_deployment_role_has_a_scenario")
        == "e2e:test_roles"
    )


def test_each_release_of_the_compose_deployment_is_its_own_unit() -> None:
    bookworm = {
        worker_scope(f"tests/e2e/test_compose.py::{test}[bookworm]")
        for test in ("test_a", "test_b")
    }
    trixie = worker_scope("tests/e2e/test_compose.py::test_a[trixie]")
    assert bookworm == {"e2e:test_compose[bookworm]"}
    assert trixie == "e2e:test_compose[trixie]"


def test_fast_tests_are_spread_one_by_one() -> None:
    first = "tests/unit/test_config.py::test_a"
    assert worker_scope(first) == first
    assert worker_scope("tests/unit/test_config.py::test_b") != worker_scope(first)
