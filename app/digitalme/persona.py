"""The persona: the owner's profile and weighted traits, and the system prompt built from it.

A persona is written by the owner as YAML (or Markdown with YAML front matter, whose body
becomes the biography), validated into a :class:`Persona`, stored in SQLite and turned into
a system prompt by :func:`build_prompt`. The prompt depends on nothing but the persona,
so the same persona always gives the same bytes, which is what makes prompt caching work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from .db import Connection, Database

MAX_PERSONA_BYTES = 256 * 1024


class PersonaError(ValueError):
    """The persona document is invalid; the message says where and why."""


@dataclass(frozen=True)
class Trait:
    category: str
    name: str
    description: str
    weight: float
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Persona:
    name: str
    bio: str
    languages: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    communication_style: str = ""
    technical_preferences: tuple[str, ...] = ()
    traits: tuple[Trait, ...] = field(default_factory=tuple)

    def to_document(self) -> dict[str, Any]:
        """Plain data (the YAML/JSON shape), stable field order."""
        doc = asdict(self)
        for key, value in doc.items():
            if isinstance(value, tuple):
                doc[key] = list(value)
        doc["traits"] = [
            {**asdict(t), "examples": list(t.examples)} for t in self.traits]
        return doc


# --- parsing and validation ---------------------------------------------------------------

_PROFILE_KEYS = {"name", "bio", "languages", "values", "communication_style",
                 "technical_preferences", "traits"}
_TRAIT_KEYS = {"category", "name", "description", "weight", "examples"}


def _text(doc: Mapping[str, Any], key: str, where: str, *, required: bool) -> str:
    value = doc.get(key)
    if value is None:
        if required:
            raise PersonaError(f"{where}{key} is required")
        return ""
    if not isinstance(value, str):
        raise PersonaError(f"{where}{key} must be text, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise PersonaError(f"{where}{key} must not be empty")
    return value


def _text_list(doc: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = doc.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise PersonaError(f"{where}{key} must be a list of texts")
    for i, item in enumerate(value):
        if isinstance(item, dict):
            raise PersonaError(
                f"{where}{key}[{i}] was read as a mapping: an item containing ': ' must be "
                "put in quotes in YAML")
        if not isinstance(item, str) or not item.strip():
            raise PersonaError(f"{where}{key}[{i}] must be a non-empty text")
    return tuple(v.strip() for v in value)


def _trait(raw: Any, index: int) -> Trait:
    where = f"traits[{index}]."
    if not isinstance(raw, Mapping):
        raise PersonaError(f"traits[{index}] must be a mapping with category, name, weight")
    unknown = set(raw) - _TRAIT_KEYS
    if unknown:
        raise PersonaError(f"{where} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
    weight = raw.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise PersonaError(f"{where}weight must be a number from 0 to 10")
    if not 0 <= weight <= 10:
        raise PersonaError(f"{where}weight must be between 0 and 10, got {weight}")
    return Trait(
        category=_text(raw, "category", where, required=True),
        name=_text(raw, "name", where, required=True),
        description=_text(raw, "description", where, required=False),
        weight=float(weight),
        examples=_text_list(raw, "examples", where),
    )


def persona_from_document(doc: Any) -> Persona:
    if not isinstance(doc, Mapping):
        raise PersonaError("the persona must be a mapping with at least name and bio")
    unknown = set(doc) - _PROFILE_KEYS
    if unknown:
        raise PersonaError(f"unknown keys: {', '.join(sorted(map(str, unknown)))} "
                           f"(allowed: {', '.join(sorted(_PROFILE_KEYS))})")
    traits_raw = doc.get("traits")
    if traits_raw is None:
        traits_raw = []
    if not isinstance(traits_raw, list):
        raise PersonaError("traits must be a list")
    traits = tuple(_trait(raw, i) for i, raw in enumerate(traits_raw))
    seen: set[tuple[str, str]] = set()
    for trait in traits:
        key = (trait.category.lower(), trait.name.lower())
        if key in seen:
            raise PersonaError(f"trait {trait.category}/{trait.name} is listed twice")
        seen.add(key)
    return Persona(
        name=_text(doc, "name", "", required=True),
        bio=_text(doc, "bio", "", required=True),
        languages=_text_list(doc, "languages", ""),
        values=_text_list(doc, "values", ""),
        communication_style=_text(doc, "communication_style", "", required=False),
        technical_preferences=_text_list(doc, "technical_preferences", ""),
        traits=traits,
    )


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
        lines += ["", "## Languages",
                  f"Answer in the language you are addressed in when it is one of: "
                  f"{', '.join(p.languages)}. Otherwise answer in {p.languages[0]}."]
    if p.values:
        lines += ["", "## Core values", *(f"- {v}" for v in p.values)]
    if p.communication_style:
        lines += ["", "## Communication style", p.communication_style]
    if p.technical_preferences:
        lines += ["", "## Technical preferences", *(f"- {v}" for v in p.technical_preferences)]
    if p.traits:
        lines += ["", "## Traits",
                  "Weighted 0 to 10; the higher the weight, the more strongly it shows."]
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
            "SELECT source_sha256, imported_at FROM persona_profile WHERE id = 1")
        if row is None:
            return None
        if self._prompt is None or self._prompt[0] != (row[0], row[1]):
            stored = await self.load()
            if stored is None:
                return None
            self._prompt = ((stored.source_sha256, stored.imported_at),
                            build_prompt(stored.persona))
        return self._prompt[1]

    async def save(self, persona: Persona, source_sha256: str) -> StoredPersona:
        doc = persona.to_document()
        del doc["traits"]  # they live in persona_traits
        imported_at = datetime.now(UTC).isoformat(timespec="seconds")
        document = json.dumps(doc, ensure_ascii=False, sort_keys=True)
        traits = [(i, t.category, t.name, t.description, t.weight,
                   json.dumps(list(t.examples), ensure_ascii=False))
                  for i, t in enumerate(persona.traits)]

        def replace(conn: Connection) -> None:
            conn.execute("DELETE FROM persona_traits")
            conn.execute(
                "INSERT INTO persona_profile (id, name, document, source_sha256, imported_at)"
                " VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET name=excluded.name,"
                " document=excluded.document, source_sha256=excluded.source_sha256,"
                " imported_at=excluded.imported_at",
                (persona.name, document, source_sha256, imported_at))
            conn.executemany(
                "INSERT INTO persona_traits (position, category, name, description, weight,"
                " examples) VALUES (?, ?, ?, ?, ?, ?)", traits)
        await self.db.write(replace)
        return StoredPersona(persona, source_sha256, imported_at)

    async def load(self) -> StoredPersona | None:
        row = await self.db.fetchone(
            "SELECT document, source_sha256, imported_at FROM persona_profile WHERE id = 1")
        if row is None:
            return None
        doc = json.loads(row["document"])
        traits = await self.db.fetchall(
            "SELECT category, name, description, weight, examples FROM persona_traits"
            " ORDER BY position")
        doc["traits"] = [
            {"category": t["category"], "name": t["name"], "description": t["description"],
             "weight": t["weight"], "examples": json.loads(t["examples"])} for t in traits]
        return StoredPersona(persona_from_document(doc), row["source_sha256"], row["imported_at"])


def document_sha256(doc: Any) -> str:
    """SHA-256 of a persona given as data (API import), over its canonical JSON."""
    return hashlib.sha256(
        json.dumps(doc, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
