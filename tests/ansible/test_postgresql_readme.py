"""roles/postgresql/README.md's variables table lists every variable of
meta/argument_specs.yml with the same default (a table copied by hand would drift)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROLE = Path(__file__).resolve().parents[2] / "roles" / "postgresql"


def test_readme_table_lists_every_variable_with_its_default() -> None:
    specs = yaml.safe_load((ROLE / "meta/argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    readme = (ROLE / "README.md").read_text()
    rows = {
        name: default.replace("\\|", "|")
        for name, default in re.findall(r"^\| `(\w+)` \| `((?:[^`])*)` \|", readme, re.M)
    }
    documented = {
        name: ('""' if spec["default"] == "" else str(spec["default"]))
        for name, spec in options.items()
    }
    assert rows == documented
