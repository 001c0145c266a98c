"""Every JSON body of /api/v1, and the persona, each declared once as a typed model.

The handlers read requests and shape answers with these models, the persona importer
validates with :class:`Persona`, and :mod:`digitalme.openapi` writes the API's
description from them and the URL table, so the three cannot drift apart. The wording
of errors stays where it is said: :mod:`digitalme.validation` (400s naming the field) and
:mod:`digitalme.persona` (the importer's hints) translate pydantic's errors.

Why pydantic (v2) and not msgspec: pydantic is already in the app's wheelhouse (the
``anthropic`` SDK is built on it; pinned in pyproject.toml), so nothing is added to what
production installs; it writes JSON Schema 2020-12, the dialect of OpenAPI 3.1, with
constraints, descriptions and examples; and its errors carry the kind and location of
each problem, which is what lets 400s keep naming the field in our words. msgspec
decodes faster, but no body here is on a hot path: the requests the bench measures
(``GET /health``, and the messages page, which SQLite renders as JSON) read no body and
build no model, and a chat turn spends milliseconds with Claude against microseconds of
validation (in pydantic-core, compiled).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple, Protocol, get_args, get_type_hints

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

Scope = Literal["chat", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)

# A text with at least one non-blank character, stripped (the pattern is checked after
# stripping, so "   " is refused; the schema says the same).
Text = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"\S")]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


# The URL's variables (routes.py), for the API's description.
PATH_PARAMETERS: dict[str, Any] = {
    "conversation_id": Annotated[str, Field(max_length=64)],
    "token_id": Annotated[int, Field(ge=1)],
}


# --- the persona --------------------------------------------------------------------------

MIN_WEIGHT, MAX_WEIGHT = 0, 10


def _none_as_empty(value: Any) -> Any:
    return "" if value is None else value


def _as_list(value: Any) -> Any:
    """YAML's conveniences: one text stands for a one-item list, null for none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError("not_a_list", "must be a list of texts")
    return value


def _traits_list(value: Any) -> Any:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PydanticCustomError("not_a_list", "must be a list")
    return value


OptionalText = Annotated[
    str,
    StringConstraints(strip_whitespace=True),
    BeforeValidator(_none_as_empty, json_schema_input_type=str | None),
]
Texts = Annotated[
    tuple[Text, ...], BeforeValidator(_as_list, json_schema_input_type=Text | list[Text] | None)
]


class Trait(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    category: Text = Field(
        description="A grouping, e.g. `communication`, `leadership`, `technical`."
    )
    name: Text = Field(
        description="The trait, e.g. `Direct`. Category and name together must be unique."
    )
    description: OptionalText = Field("", description="What the trait means for this person.")
    weight: float = Field(
        strict=True,
        ge=MIN_WEIGHT,
        le=MAX_WEIGHT,
        description="How strongly it shows; the prompt lists traits by weight.",
    )
    examples: Texts = Field((), description="Phrases the owner would actually say.")


class Persona(BaseModel):
    """The owner's profile and weighted traits; written as YAML (docs/persona.md)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "Kim Example",
                    "bio": "Kim runs the platform team at a fictional bank.",
                    "languages": ["English"],
                    "traits": [{"category": "communication", "name": "Concise", "weight": 8}],
                }
            ]
        },
    )

    name: Text = Field(description="The owner's name, as the clone introduces itself.")
    bio: Text = Field(
        description="A short biography: role, history, where they live, what they care about."
    )
    languages: Texts = Field(
        (), description="Languages the clone answers in; the first is the default."
    )
    values: Texts = Field((), description="Core values, one per item.")
    communication_style: OptionalText = Field(
        "", description="How the owner writes: length, tone, habits."
    )
    technical_preferences: Texts = Field(
        (), description="Tools, languages, practices the owner prefers."
    )
    traits: Annotated[
        tuple[Trait, ...], BeforeValidator(_traits_list, json_schema_input_type=list[Trait] | None)
    ] = Field((), description="Weighted traits, below.")

    @model_validator(mode="after")
    def _traits_are_unique(self) -> Persona:
        seen: set[tuple[str, str]] = set()
        for trait in self.traits:
            key = (trait.category.lower(), trait.name.lower())
            if key in seen:
                raise PydanticCustomError(
                    "duplicate_trait",
                    "trait {category}/{name} is listed twice",
                    {"category": trait.category, "name": trait.name},
                )
            seen.add(key)
        return self

    def to_document(self) -> dict[str, Any]:
        """Plain data (the YAML/JSON shape), stable field order."""
        return self.model_dump(mode="json")


# --- request bodies -----------------------------------------------------------------------


def _stripped(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


class NewConversation(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"title": "Roadmap"}]})

    title: Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)] | None = None


class NewMessage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"text": "Should we rewrite the planner in Rust?"}]}
    )

    text: Text = Field(description="At most DIGITALME_MAX_MESSAGE_CHARS characters.")

    @field_validator("text")
    @classmethod
    def _fits(cls, text: str, info: ValidationInfo) -> str:
        """The limit is a setting: validate with ``context={"max_chars": N}``."""
        limit = (info.context or {}).get("max_chars")
        if limit is not None and len(text) > limit:
            raise PydanticCustomError(
                "string_too_long", "is longer than {max_length} characters", {"max_length": limit}
            )
        return text


class NewToken(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "alice", "scope": "chat"}]})

    name: Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"\S", max_length=100)]
    scope: Annotated[Scope, BeforeValidator(_stripped)]


# Queries are named tuples of whole numbers, read by validation.read_query from their
# declared bounds: the messages page is the request the bench measures, and building a
# pydantic model (or a frozen dataclass) there costs more than reading the query did.


class ConversationsQuery(NamedTuple):
    limit: Annotated[int, Field(ge=1, le=500)] = 50


class MessagesQuery(NamedTuple):
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    before: Annotated[
        int, Field(ge=1, le=2**62, description="Only messages with a smaller id.")
    ] = 2**62


def query_parameters(query: type[tuple[Any, ...]]) -> dict[str, dict[str, Any]]:
    """The JSON Schema of each parameter of a query, with its default."""
    hints = get_type_hints(query, include_extras=True)
    names: tuple[str, ...] = query._fields  # type: ignore[attr-defined]
    defaults: dict[str, Any] = query._field_defaults  # type: ignore[attr-defined]
    return {
        name: {**TypeAdapter(hints[name]).json_schema(), "default": defaults[name]}
        for name in names
    }


# --- answers ------------------------------------------------------------------------------


class Answer(BaseModel):
    """Built from the service's own records: fields are read from their attributes."""

    model_config = ConfigDict(frozen=True, from_attributes=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Error(Answer):
    """Every error the service answers has this shape (errors.py)."""

    error: str = Field(description="Machine-readable code.")
    message: str = Field(description="What went wrong and what to do.")
    field: str | None = Field(None, description="The request body's field at fault.")


class Conversation(Answer):
    id: str
    channel: str
    title: str | None
    created_at: Timestamp
    updated_at: Timestamp


class ConversationList(Answer):
    conversations: list[Conversation]


class Usage(Answer):
    input_tokens: int | None
    output_tokens: int | None
    cache_read_tokens: int | None
    cache_write_tokens: int | None


class MessageRecord(Protocol):
    """What the answers below read of a stored message (conversations.Message, which
    renders itself with them: this module does not import it)."""

    @property
    def id(self) -> int: ...
    @property
    def conversation_id(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def created_at(self) -> str: ...
    @property
    def model(self) -> str | None: ...
    @property
    def stop_reason(self) -> str | None: ...
    @property
    def cost_usd(self) -> float | None: ...


class UserMessage(Answer):
    id: int
    conversation_id: str
    role: Literal["user"]
    text: str
    created_at: Timestamp


class AssistantMessage(Answer):
    id: int
    conversation_id: str
    role: Literal["assistant"]
    text: str
    created_at: Timestamp
    model: str | None
    stop_reason: str | None
    usage: Usage
    cost_usd: float | None = Field(description="Estimated, in US dollars.")

    @classmethod
    def of(cls, message: MessageRecord) -> AssistantMessage:
        """The record keeps the usage in columns of its own; here it is one object."""
        return cls(
            id=message.id,
            conversation_id=message.conversation_id,
            role="assistant",
            text=message.text,
            created_at=message.created_at,
            model=message.model,
            stop_reason=message.stop_reason,
            cost_usd=message.cost_usd,
            usage=Usage.model_validate(message),
        )


Message = Annotated[UserMessage | AssistantMessage, Field(discriminator="role")]


def message_answer(message: MessageRecord) -> UserMessage | AssistantMessage:
    """A stored message as the API shows it (conversations.py renders the same in SQL)."""
    if message.role == "assistant":
        return AssistantMessage.of(message)
    return UserMessage.model_validate(message)


class MessageList(Answer):
    messages: list[Message]


class MessageAndReply(Answer):
    message: UserMessage
    reply: AssistantMessage


class ImportedPersona(Answer):
    persona: Persona
    source_sha256: str = Field(description="SHA-256 of the imported file or document.")
    imported_at: Timestamp


class Token(Answer):
    id: int
    name: str
    scope: Scope
    prefix: str = Field(description="First characters, to recognise it.")
    created_at: Timestamp
    last_used_at: Timestamp | None
    revoked_at: Timestamp | None


class CreatedToken(Token):
    token: str = Field(description="The secret: shown in this answer only.")


class TokenList(Answer):
    tokens: list[Token]


class TokenIdentity(Answer):
    id: int
    name: str
    scope: Scope


class Clone(Answer):
    name: str | None = Field(description="The persona's name; null before an import.")
    languages: list[str]


class Me(Answer):
    token: TokenIdentity
    clone: Clone


class Document(RootModel[dict[str, Any]]):
    """A JSON object (the OpenAPI document itself)."""
