"""Every role's public variables are documented in meta/argument_specs.yml, with the
default that defaults/main.yml really has (STYLE.md: the two are kept in sync)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(path.parents[1].name for path in REPO.glob("roles/*/defaults/main.yml"))


def documented(role: str) -> dict[str, Any]:
    specs = yaml.safe_load((REPO / "roles" / role / "meta/argument_specs.yml").read_text())
    options: dict[str, Any] = {}
    for entry_point in specs["argument_specs"].values():
        options.update(entry_point.get("options", {}))
    return options


@pytest.mark.parametrize("role", ROLES)
def test_defaults_and_argument_specs_agree(role: str) -> None:
    defaults = yaml.safe_load((REPO / "roles" / role / "defaults/main.yml").read_text()) or {}
    options = documented(role)
    assert sorted(set(defaults) - set(options)) == [], "undocumented defaults"
    assert sorted(set(options) - set(defaults)) == [], "documented but not in defaults"
    differ = {
        name: (value, options[name].get("default"))
        for name, value in defaults.items()
        if options[name].get("default") != value
    }
    assert differ == {}, "defaults/main.yml value vs argument_specs default"
    undescribed = [name for name, spec in options.items() if not spec.get("description")]
    assert undescribed == []
