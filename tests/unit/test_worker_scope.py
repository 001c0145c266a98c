"""Which tests one pytest-xdist worker runs together (tests/conftest.py)."""

from __future__ import annotations

from tests.conftest import expected_seconds, worker_scope


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
    scopes = {worker_scope(f"{scenario}[{role}-{suite}]")
              for role in ("caddy", "base") for suite in ("bookworm", "trixie")}
    # Four units: the two releases of one role run on two workers at once (their sandboxes
    # are named apart: sandbox/molecule/vars.yml).
    assert len(scopes) == 4
    assert all(scope.startswith("e2e:test_roles[") for scope in scopes)
    assert worker_scope("tests/e2e/test_roles.py::test_every_deployment_role_has_a_scenario") \
        == "e2e:test_roles"


def test_fast_tests_are_spread_one_by_one() -> None:
    first = "tests/unit/test_config.py::test_a"
    assert worker_scope(first) == first
    assert worker_scope("tests/unit/test_config.py::test_b") != worker_scope(first)


def test_the_longest_units_go_first() -> None:
    scenario = "tests/e2e/test_roles.py::test_molecule_scenario_passes"
    units = [worker_scope(nodeid) for nodeid in (
        "tests/unit/test_config.py::test_a",
        f"{scenario}[node_exporter-bookworm]",
        f"{scenario}[postgresql-trixie]",
        "tests/e2e/test_site.py::test_x",
        "tests/e2e/test_some_new_module.py::test_x",
    )]
    ordered = sorted(units, key=lambda unit: -expected_seconds(unit))
    assert ordered == ["e2e:shared-site", "e2e:test_roles[postgresql-trixie]",
                       "e2e:test_some_new_module", "e2e:test_roles[node_exporter-bookworm]",
                       "tests/unit/test_config.py::test_a"]


def test_every_role_scenario_and_end_to_end_module_has_an_expected_time() -> None:
    from pathlib import Path

    from tests.conftest import E2E_SECONDS, ROLE_SCENARIO_SECONDS, SHARED_SITE_MODULES

    root = Path(__file__).resolve().parents[2]
    roles = {path.parents[2].name for path in root.glob("roles/*/molecule/default/molecule.yml")}
    assert roles - {"sandbox_sample"} == set(ROLE_SCENARIO_SECONDS)
    modules = {worker_scope(f"tests/e2e/{path.name}::test_x")
               for path in root.glob("tests/e2e/test_*.py")
               if path.stem not in ("test_roles", *SHARED_SITE_MODULES)}
    assert modules | {"e2e:shared-site"} == set(E2E_SECONDS)
