"""The persona format, its validation, and the prompt built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from digitalme.persona import PersonaError, build_prompt, load_persona_file, parse_persona_text

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "docs" / "examples" / "persona.yaml"
SNAPSHOT = Path(__file__).parent / "snapshots" / "sample_persona_prompt.txt"


def test_sample_persona_loads() -> None:
    persona, digest = load_persona_file(SAMPLE)
    assert persona.name == "Mara Lindqvist"
    assert len(persona.traits) == 4
    assert persona.languages == ("English", "Swedish")
    assert len(digest) == 64


def test_prompt_is_deterministic_and_matches_the_snapshot() -> None:
    persona, _ = load_persona_file(SAMPLE)
    again, _ = load_persona_file(SAMPLE)
    prompt = build_prompt(persona)
    assert prompt == build_prompt(again)
    # The snapshot pins the prompt's shape; update it deliberately when the shape changes:
    #   .venv/bin/digitalme persona prompt > tests/unit/snapshots/sample_persona_prompt.txt
    assert prompt == SNAPSHOT.read_text(encoding="utf-8")


def test_traits_are_ordered_by_weight_in_the_prompt() -> None:
    persona, _ = load_persona_file(SAMPLE)
    prompt = build_prompt(persona)
    positions = [
        prompt.index(f"] {t.name} (weight") for t in sorted(persona.traits, key=lambda t: -t.weight)
    ]
    assert positions == sorted(positions)


def test_markdown_with_front_matter() -> None:
    persona = parse_persona_text(
        "---\nname: Kim Example\nlanguages: [English]\n---\nKim builds bridges.\n", markdown=True
    )
    assert persona.name == "Kim Example"
    assert persona.bio == "Kim builds bridges."


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: X\n", "bio is required"),
        ("bio: x\n", "name is required"),
        ("name: X\nbio: y\nhobbies: [chess]\n", "unknown keys: hobbies"),
        (
            "name: X\nbio: y\ntraits:\n  - {category: a, name: b, weight: 11}\n",
            "traits[0].weight must be between 0 and 10",
        ),
        (
            "name: X\nbio: y\ntraits:\n  - {category: a, name: b, weight: high}\n",
            "traits[0].weight must be a number",
        ),
        (
            "name: X\nbio: y\ntraits:\n  - {category: a, name: b, weight: 1}\n"
            "  - {category: A, name: B, weight: 2}\n",
            "listed twice",
        ),
        ("name: X\nbio: y\nvalues:\n  - Honesty: always\n", "put in quotes"),
        ("name: [unclosed\n", "not valid YAML at line"),
        ("- just a list\n", "must be a mapping"),
    ],
)
def test_invalid_personas_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PersonaError, match=None) as caught:
        parse_persona_text(text, markdown=False)
    assert message in str(caught.value)


def test_unreadable_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(PersonaError, match="cannot read"):
        load_persona_file(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("name: x\nbio: " + "y" * 300_000)
    with pytest.raises(PersonaError, match="larger than"):
        load_persona_file(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PersonaError, match="not UTF-8"):
        load_persona_file(binary)


def test_import_if_changed_skips_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from digitalme.cli import main

    monkeypatch.setenv("DIGITALME_DB_PATH", str(tmp_path / "p.db"))
    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["persona", "import", "--if-changed", str(SAMPLE)]) == 0
    assert capsys.readouterr().out.startswith("imported persona 'Mara Lindqvist'")
    assert main(["persona", "import", "--if-changed", str(SAMPLE)]) == 0
    assert capsys.readouterr().out.startswith("persona unchanged")
    changed = tmp_path / "p.yaml"
    changed.write_text(SAMPLE.read_text().replace("Mara Lindqvist", "Mara L."))
    assert main(["persona", "import", "--if-changed", str(changed)]) == 0
    assert capsys.readouterr().out.startswith("imported persona 'Mara L.'")
