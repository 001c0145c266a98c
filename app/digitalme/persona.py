"""The persona: the owner's profile and weighted traits, and the system prompt built from it.

A persona is written by the owner as YAML (or Markdown with YAML front matter, whose body
becomes the biography), validated into a :class:`~digitalme.models.Persona` (its one
declaration), stored in SQLite and turned into a system prompt by :func:`build_prompt`.
The prompt depends on nothing but the persona, so the same persona always gives the same
bytes, which is what makes prompt caching work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .db import Database
from .engine import Connection
from .models import MAX_WEIGHT, MIN_WEIGHT, Persona

MAX_PERSONA_BYTES = 256 * 1024


class PersonaError(ValueError):
    """The persona document is invalid; the message says where and why."""


# --- validation: the shape is models.Persona; here, what to tell the person who wrote it ---


def persona_from_document(doc: Any) -> Persona:
    try:
        return Persona.model_validate(doc)
    except ValidationError as exc:
        raise PersonaError(_explain(exc.errors(include_url=False))) from None


def _explain(errors: list[ErrorDetails]) -> str:
    """The first problem, in the importer's words (unknown keys first, all of a mapping's)."""
    unknown: dict[tuple[int | str, ...], list[str]] = {}
    for error in errors:
        if error["type"] == "extra_forbidden":
            unknown.setdefault(error["loc"][:-1], []).append(str(error["loc"][-1]))
    for where, keys in unknown.items():
        if not where:
            return (
                f"unknown keys: {', '.join(sorted(keys))} "
                f"(allowed: {', '.join(sorted(Persona.model_fields))})"
            )
        return f"{_path(where)} has unknown keys: {', '.join(sorted(keys))}"
    error = errors[0]
    loc, kind, given = error["loc"], error["type"], error["input"]
    if kind == "model_type":
        if not loc:
            return "the persona must be a mapping with at least name and bio"
        return f"{_path(loc)} must be a mapping with category, name, weight"
    return f"{_path(loc)} {_problem(loc, kind, given, error['msg'])}".strip()


def _problem(loc: tuple[int | str, ...], kind: str, given: Any, message: str) -> str:
    in_list = bool(loc) and isinstance(loc[-1], int)
    if kind in ("float_type", "missing") and loc[-1:] == ("weight",):
        return f"must be a number from {MIN_WEIGHT} to {MAX_WEIGHT}"
    if kind in ("greater_than_equal", "less_than_equal"):
        return f"must be between {MIN_WEIGHT} and {MAX_WEIGHT}, got {given}"
    if kind == "missing" or (kind == "string_type" and given is None and not in_list):
        return "is required"
    if in_list and isinstance(given, dict):
        return "was read as a mapping: an item containing ': ' must be put in quotes in YAML"
    if in_list and kind in ("string_type", "string_pattern_mismatch"):
        return "must be a non-empty text"
    if kind == "string_type":
        return f"must be text, got {type(given).__name__}"
    if kind == "string_pattern_mismatch":
        return "must not be empty"
    return message  # our own (models.py): "must be a list", "trait a/b is listed twice"


def _path(loc: tuple[int | str, ...]) -> str:
    """("traits", 1, "weight") -> "traits[1].weight", as the owner would look it up."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)[1:]


def parse_persona_text(text: str, *, markdown: bool) -> Persona:
    """Parse YAML, or Markdown whose ``---`` front matter is YAML and whose body is the bio."""
    body = ""
    if markdown:
        if not text.startswith("---"):
            raise PersonaError("a Markdown persona must start with '---' front matter")
        parts = text.split("\n---", 1)
        if len(parts) != 2:
            raise PersonaError("the front matter is not closed by a '---' line")
        text = parts[0][3:]
        body = parts[1].split("\n", 1)[1] if "\n" in parts[1] else ""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PersonaError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if markdown and body.strip():
        if not isinstance(doc, dict):
            raise PersonaError("the front matter must be a mapping")
        if doc.get("bio"):
            raise PersonaError("give the bio either in the front matter or as the body, not both")
        doc["bio"] = body.strip()
    return persona_from_document(doc)


def load_persona_file(path: Path) -> tuple[Persona, str]:
    """Read and validate a persona file; returns the persona and the file's SHA-256."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PersonaError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_PERSONA_BYTES:
        raise PersonaError(f"{path} is larger than {MAX_PERSONA_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PersonaError(f"{path} is not UTF-8 text") from None
    markdown = path.suffix.lower() in {".md", ".markdown"}
    return parse_persona_text(text, markdown=markdown), hashlib.sha256(raw).hexdigest()


# --- the system prompt --------------------------------------------------------------------


def _format_weight(weight: float) -> str:
    return f"{weight:g}"


def build_prompt(persona: Persona) -> str:
    """The system prompt: a pure function of the persona (same persona, same bytes)."""
    p = persona
    lines = [
        f"You are the digital clone of {p.name}. You answer as {p.name} would: in the first "
        f"person, in their voice, with their knowledge, values and habits as described below.",
        "If you are asked whether you are an AI, say honestly that you are "
        f"{p.name}'s digital clone, an AI assistant speaking for them.",
        "Do not invent commitments, promises or facts about "
        f"{p.name}'s life that are not given here; offer to pass a question on instead.",
        "",
        "## Biography",
        p.bio,
    ]
    if p.languages:
        lines += [
            "",
            "## Languages",
            f"Answer in the language you are addressed in when it is one of: "
            f"{', '.join(p.languages)}. Otherwise answer in {p.languages[0]}.",
        ]
    if p.values:
        lines += ["", "## Core values", *(f"- {v}" for v in p.values)]
    if p.communication_style:
        lines += ["", "## Communication style", p.communication_style]
    if p.technical_preferences:
        lines += ["", "## Technical preferences", *(f"- {v}" for v in p.technical_preferences)]
    if p.traits:
        lines += [
            "",
            "## Traits",
            "Weighted 0 to 10; the higher the weight, the more strongly it shows.",
        ]
        ordered = sorted(p.traits, key=lambda t: (-t.weight, t.category.lower(), t.name.lower()))
        for t in ordered:
            head = f"- [{t.category}] {t.name} (weight {_format_weight(t.weight)})"
            if t.description:
                head += f": {t.description}"
            lines.append(head)
            lines += [f'  - e.g. "{example}"' for example in t.examples]
    return "\n".join(lines).strip() + "\n"


# --- storage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredPersona:
    persona: Persona
    source_sha256: str
    imported_at: str


class PersonaStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        # The last prompt built, by (source_sha256, imported_at) of the persona it is of.
        self._prompt: tuple[tuple[str, str], str] | None = None

    async def prompt(self) -> str | None:
        """The system prompt of the stored persona (None when there is none). Every chat
        turn needs it: it is built again only when the stored persona changed (an import
        from this process, another one or the API), which one indexed read tells."""
        row = await self.db.lookup_one(
            "SELECT source_sha256, imported_at FROM persona_profile WHERE id = 1"
        )
        if row is None:
            return None
        if self._prompt is None or self._prompt[0] != (row[0], row[1]):
            stored = await self.load()
            if stored is None:
                return None
            self._prompt = (
                (stored.source_sha256, stored.imported_at),
                build_prompt(stored.persona),
            )
        return self._prompt[1]

    async def save(self, persona: Persona, source_sha256: str) -> StoredPersona:
        doc = persona.to_document()
        del doc["traits"]  # they live in persona_traits
        imported_at = datetime.now(UTC).isoformat(timespec="seconds")
        document = json.dumps(doc, ensure_ascii=False, sort_keys=True)
        traits = [
            (
                i,
                t.category,
                t.name,
                t.description,
                t.weight,
                json.dumps(list(t.examples), ensure_ascii=False),
            )
            for i, t in enumerate(persona.traits)
        ]

        def replace(conn: Connection) -> None:
            conn.execute("DELETE FROM persona_traits")
            conn.execute(
                "INSERT INTO persona_profile (id, name, document, source_sha256, imported_at)"
                " VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET name=excluded.name,"
                " document=excluded.document, source_sha256=excluded.source_sha256,"
                " imported_at=excluded.imported_at",
                (persona.name, document, source_sha256, imported_at),
            )
            conn.executemany(
                "INSERT INTO persona_traits (position, category, name, description, weight,"
                " examples) VALUES (?, ?, ?, ?, ?, ?)",
                traits,
            )

        await self.db.write(replace)
        return StoredPersona(persona, source_sha256, imported_at)

    async def load(self) -> StoredPersona | None:
        row = await self.db.fetchone(
            "SELECT document, source_sha256, imported_at FROM persona_profile WHERE id = 1"
        )
        if row is None:
            return None
        doc = json.loads(row["document"])
        traits = await self.db.fetchall(
            "SELECT category, name, description, weight, examples FROM persona_traits"
            " ORDER BY position"
        )
        doc["traits"] = [
            {
                "category": t["category"],
                "name": t["name"],
                "description": t["description"],
                "weight": t["weight"],
                "examples": json.loads(t["examples"]),
            }
            for t in traits
        ]
        return StoredPersona(persona_from_document(doc), row["source_sha256"], row["imported_at"])


def document_sha256(doc: Any) -> str:
    """SHA-256 of a persona given as data (API import), over its canonical JSON."""
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
