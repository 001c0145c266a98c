"""The models (app/digitalme/models.py) and the OpenAPI document generated from them."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel
from schemathesis.specs.openapi.definitions import OPENAPI_31

from digitalme import models
from digitalme.openapi import openapi_document
from digitalme.operations import operation_of
from digitalme.persona import load_persona_file
from digitalme.routes import API_ROUTES

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "docs" / "examples" / "persona.yaml"
PERSONA_DOC = REPO / "docs" / "persona.md"


def _schema_of(name: str) -> dict[str, Any]:
    """A component as a standalone JSON Schema (its $refs resolved in the document)."""
    document = openapi_document()
    return {"$ref": f"#/components/schemas/{name}", "components": document["components"]}


def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        _schema_of(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_the_document_is_valid_openapi_3_1() -> None:
    document = json.loads(json.dumps(openapi_document()))  # plain JSON, as served
    jsonschema.Draft202012Validator(OPENAPI_31).validate(document)
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_every_ref_resolves() -> None:
    text = json.dumps(openapi_document())
    schemas = openapi_document()["components"]["schemas"]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
    assert refs and refs <= set(schemas), refs - set(schemas)


def test_every_api_route_is_described_with_its_parameters_and_scope() -> None:
    paths = openapi_document()["paths"]
    for route in API_ROUTES:
        described = paths[route.path][route.method.lower()]
        assert described["operationId"] == operation_of(route.handler).operation_id
        in_path = {p["name"] for p in described.get("parameters", ()) if p["in"] == "path"}
        assert in_path == set(re.findall(r"{(\w+)}", route.path)), route.path
        scope = route.handler.required_scope  # type: ignore[attr-defined]
        assert f"`{scope}`" in described["description"]
        for status in ("401", "403", "429"):
            assert status in described["responses"], (route.path, status)
    assert sum(len(methods) for methods in paths.values()) == len(API_ROUTES)


def test_each_handler_reads_what_its_operation_declares() -> None:
    """@operation(body=..., query=...) and the handler's read_body/read_query name the same
    model (the document is generated from the first, requests are read with the second)."""
    for route in API_ROUTES:
        declared = operation_of(route.handler)
        # Without white space: the formatter may spread a call over lines.
        source = re.sub(r"\s+", "", inspect.getsource(inspect.unwrap(route.handler)))
        if declared.body is models.Persona:
            assert "persona_from_document(" in source
        elif declared.body is not None:
            optional = "" if declared.body_required else ",optional=True"
            assert f"read_body(request,models.{declared.body.__name__}{optional}" in source
        else:
            assert "read_body(" not in source and "json_object(" not in source, route.path
        if declared.query is not None:
            assert f"read_query(request,models.{declared.query.__name__})" in source
        else:
            assert "read_query(" not in source, route.path


def _models() -> list[type[BaseModel]]:
    return [
        value
        for value in vars(models).values()
        if isinstance(value, type)
        and issubclass(value, BaseModel)
        and value.__module__ == models.__name__
        and value is not models.Answer
    ]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_example_validates(model: type[BaseModel]) -> None:
    examples = model.model_json_schema().get("examples", [])
    for example in examples:
        model.model_validate(example)
        if model.__name__ in openapi_document()["components"]["schemas"]:
            _validator(model.__name__).validate(example)


def test_request_bodies_and_the_persona_have_examples() -> None:
    for name in ("NewConversation", "NewMessage", "NewToken", "Persona"):
        assert openapi_document()["components"]["schemas"][name]["examples"], name


def test_the_sample_persona_and_its_stored_form_match_the_schema() -> None:
    """What the importer accepts and what the API shows both fit the published schema."""
    validator = _validator("Persona")
    validator.validate(yaml.safe_load(SAMPLE.read_text()))
    persona, _ = load_persona_file(SAMPLE)
    validator.validate(persona.to_document())
    assert models.Persona.model_validate(persona.to_document()) == persona


def test_answers_match_their_schemas() -> None:
    from digitalme.conversations import Message

    user = Message(1, "c", "user", "hi", "2026-01-01T00:00:00.000Z")
    reply = Message(
        2,
        "c",
        "assistant",
        "hello",
        "2026-01-01T00:00:01.000Z",
        model="m",
        input_tokens=3,
        output_tokens=4,
        cost_usd=0.5,
        stop_reason="end_turn",
    )
    _validator("MessageList").validate({"messages": [user.to_json(), reply.to_json()]})
    assert user.to_json() == {
        "id": 1,
        "conversation_id": "c",
        "role": "user",
        "text": "hi",
        "created_at": "2026-01-01T00:00:00.000Z",
    }
    assert reply.to_json()["usage"] == {
        "input_tokens": 3,
        "output_tokens": 4,
        "cache_read_tokens": None,
        "cache_write_tokens": None,
    }


def _doc_table(heading_line: str) -> dict[str, tuple[bool, str]]:
    """Key -> (required, meaning) from the Markdown table after ``heading_line``."""
    lines = PERSONA_DOC.read_text().splitlines()
    start = lines.index(heading_line)
    rows: dict[str, tuple[bool, str]] = {}
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[2] == "yes", cells[3])
    return rows


@pytest.mark.parametrize(
    ("heading", "model"),
    [
        (
            "YAML, or Markdown whose front matter is YAML (then the Markdown body is the "
            "biography).",
            models.Persona,
        ),
        ("Each trait:", models.Trait),
    ],
)
def test_docs_persona_tables_match_the_models(heading: str, model: type[BaseModel]) -> None:
    documented = _doc_table(heading)
    declared = {
        name: (field.is_required(), field.description or "")
        for name, field in model.model_fields.items()
    }
    assert documented == declared
