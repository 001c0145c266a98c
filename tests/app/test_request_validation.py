"""Request bodies and queries are read with their models (models.py); a 400 names the field
in the service's words, whatever pydantic calls the problem."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Service


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({"scope": "chat"}, "missing_field", "field 'name' is required"),
        ({"name": None, "scope": "chat"}, "missing_field", "field 'name' is required"),
        ({"name": 7, "scope": "chat"}, "invalid_field", "field 'name' must be a string"),
        ({"name": "  ", "scope": "chat"}, "invalid_field", "field 'name' must not be empty"),
        (
            {"name": "x" * 101, "scope": "chat"},
            "invalid_field",
            "field 'name' is longer than 100 characters",
        ),
        ({"name": "ci"}, "missing_field", "field 'scope' is required"),
        ({"name": "ci", "scope": 1}, "invalid_field", "field 'scope' must be a string"),
        ({"name": "ci", "scope": " "}, "invalid_field", "field 'scope' must not be empty"),
        (
            {"name": "ci", "scope": "root"},
            "invalid_field",
            "field 'scope' must be one of: chat, admin",
        ),
    ],
)
async def test_token_body_errors_name_the_field(
    service: Service, body: dict[str, Any], code: str, message: str
) -> None:
    response = await service.client.post("/api/v1/tokens", json=body, headers=service.admin)
    assert response.status == 400
    assert await response.json() == {
        "error": code,
        "message": message,
        "field": message.split("'")[1],
    }


async def test_bodies_are_stripped_and_unknown_fields_ignored(service: Service) -> None:
    response = await service.client.post(
        "/api/v1/tokens",
        headers=service.admin,
        json={"name": "  ci  ", "scope": " admin ", "comment": "ignored"},
    )
    assert response.status == 201
    created = await response.json()
    assert (created["name"], created["scope"]) == ("ci", "admin")
    response = await service.client.post(
        "/api/v1/conversations", headers=service.auth(), json={"title": "  Roadmap "}
    )
    assert (await response.json())["title"] == "Roadmap"
    response = await service.client.post(
        "/api/v1/conversations", headers=service.auth(), json={"title": 5}
    )
    assert (await response.json())["message"] == "field 'title' must be a string"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=abc", "'limit' must be a whole number"),
        ("limit=10.0", "'limit' must be a whole number"),
        ("limit=0", "'limit' must be between 1 and 500"),
        ("limit=501", "'limit' must be between 1 and 500"),
    ],
)
async def test_query_errors_name_the_parameter(service: Service, query: str, message: str) -> None:
    response = await service.client.get(f"/api/v1/conversations?{query}", headers=service.auth())
    assert response.status == 400
    assert await response.json() == {"error": "invalid_parameter", "message": message}


async def test_query_values_are_whole_numbers_as_python_reads_them(service: Service) -> None:
    conversation = await service.new_conversation()
    for query in ("limit=%2010", "limit=1_0", "before=1&limit=5&limit=x"):
        response = await service.client.get(
            f"/api/v1/conversations/{conversation}/messages?{query}", headers=service.auth()
        )
        assert response.status == 200, query
