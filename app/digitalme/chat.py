"""One chat turn: store the message, assemble what Claude sees, ask, store the reply.

Every channel (API, web chat, Telegram, Slack, ...) goes through :class:`ChatService`, so
they all get the same persona, history budget, tools, usage accounting and failure modes.

What Claude sees, in order:

1. the persona prompt, as the first system block, marked for prompt caching;
2. extra context blocks from registered providers (e.g. the owner's recent activity);
3. as many of the latest turns as fit ``DIGITALME_CONTEXT_TOKEN_BUDGET`` (estimated),
   ending with the new message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from .config import Settings
from .conversations import Conversation, ConversationStore, Message
from .llm import Claude, Reply, TextDelta
from .metrics import Metrics
from .persona import PersonaStore
from .usage import Usage

log = logging.getLogger(__name__)

MAX_TOOL_ROUNDS = 3


def estimate_tokens(text: str) -> int:
    """A deliberately pessimistic token estimate (about 4 characters a token, plus framing).

    Used only to decide how much history fits the budget; real counts come back from
    Claude and are what we store and bill.
    """
    return math.ceil(len(text) / 3.5) + 4


def fit_history(turns: Sequence[tuple[str, str]], budget: int) -> list[dict[str, Any]]:
    """The newest turns that fit ``budget`` estimated tokens, as Claude messages.

    ``turns`` are (role, text), oldest first, the last being the new user message, which is
    always kept. Consecutive turns of one role (e.g. a user message whose reply failed) are
    joined, and the list starts with a user turn, as the Messages API requires.
    """
    kept: list[tuple[str, str]] = []
    used = 0
    for role, text in reversed(turns):
        cost = estimate_tokens(text)
        if kept and used + cost > budget:
            break
        kept.append((role, text))
        used += cost
    kept.reverse()
    while kept and kept[0][0] != "user":
        kept.pop(0)
    messages: list[dict[str, Any]] = []
    for role, text in kept:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


class PersonaMissing(Exception):
    pass


class BudgetExhausted(Exception):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__("the daily token budget is spent")


class Tool(Protocol):
    """A capability Claude may call during a chat turn (e.g. create a ClickUp task)."""

    name: str

    def definition(self) -> dict[str, Any]: ...

    async def run(self, arguments: dict[str, Any], conversation: Conversation) -> str: ...


ContextProvider = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True)
class Turn:
    """The outcome of a chat turn: both stored messages."""

    user: Message
    reply: Message


class ChatService:
    def __init__(
        self,
        settings: Settings,
        conversations: ConversationStore,
        personas: PersonaStore,
        claude: Claude,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.conversations = conversations
        self.personas = personas
        self.claude = claude
        self.metrics = metrics
        self.context_providers: list[ContextProvider] = []
        self.tools: dict[str, Tool] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._detached: set[asyncio.Task[None]] = set()

    def add_context_provider(self, provider: ContextProvider) -> None:
        self.context_providers.append(provider)

    def add_tool(self, tool: Tool) -> None:
        self.tools[tool.name] = tool

    def _lock(self, conversation_id: str) -> asyncio.Lock:
        lock = self._locks.get(conversation_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[conversation_id] = lock
        return lock

    # --- request assembly ----------------------------------------------------------------

    async def system_blocks(self) -> list[dict[str, Any]]:
        prompt = await self.personas.prompt()
        if prompt is None:
            raise PersonaMissing(
                "no persona has been imported: run `digitalme persona import FILE`"
            )
        blocks: list[dict[str, Any]] = [
            {"type": "text", "text": prompt, "cache_control": {"type": "ephemeral"}}
        ]
        for provider in self.context_providers:
            try:
                text = await provider()
            except Exception:
                log.exception("context provider %r failed; answering without it", provider)
                continue
            if text:
                blocks.append({"type": "text", "text": text})
        return blocks

    async def _history(self, conversation: Conversation) -> list[dict[str, Any]]:
        # Enough recent messages to fill any budget: each costs at least 5 estimated tokens.
        limit = self.settings.context_token_budget // 5 + 1
        turns = await self.conversations.turns(conversation.id, limit=limit)
        return fit_history(turns, self.settings.context_token_budget)

    async def _check_budget(self) -> None:
        budget = self.settings.daily_token_budget
        if not budget:
            return
        now = datetime.now(UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        used = await self.conversations.tokens_used_since(
            midnight.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        if used >= budget:
            seconds_left = 86400 - (now - midnight).total_seconds()
            raise BudgetExhausted(retry_after=max(1.0, seconds_left))

    # --- a turn --------------------------------------------------------------------------

    async def reply(
        self,
        conversation: Conversation,
        text: str,
        *,
        channel_message_id: str | None = None,
        user_message: Message | None = None,
    ) -> Turn:
        """Store ``text``, get Claude's answer, store and return both."""
        final: Turn | None = None
        async for item in self.stream_reply(
            conversation,
            text,
            channel_message_id=channel_message_id,
            user_message=user_message,
            deltas=False,
        ):
            if isinstance(item, Turn):
                final = item
        assert final is not None
        return final

    async def stream_reply(
        self,
        conversation: Conversation,
        text: str,
        *,
        channel_message_id: str | None = None,
        user_message: Message | None = None,
        deltas: bool = True,
    ) -> AsyncIterator[TextDelta | Message | Turn]:
        """Yield the stored user :class:`Message`, text deltas, then the :class:`Turn`.

        ``deltas=False`` is for callers that only want the turn (the JSON API, channels):
        no text deltas are yielded, and Claude is asked for its whole answer at once when
        the settings allow it (:attr:`Claude.answers_whole`), which costs less than a stream.

        The user message is stored (durably) before Claude is asked, so a failed call
        loses nothing. A retry passes that stored ``user_message`` back instead of storing
        the text again (the channel inbox does, after an outage or a crash). Exceptions:
        PersonaMissing, BudgetExhausted, ClaudeUnavailable, ClaudeRejected.
        """
        async with self._lock(conversation.id):
            system = await self.system_blocks()
            await self._check_budget()
            user = user_message or await self.conversations.add_message(
                conversation.id, "user", text, channel_message_id=channel_message_id
            )
            yield user
            messages = await self._history(conversation)
            if messages and messages[-1]["role"] != "user":
                # A retried message that newer turns have overtaken: ask it again last.
                messages.append({"role": "user", "content": text})
            tools = [tool.definition() for tool in self.tools.values()] or None
            texts: list[str] = []
            usage = Usage()
            reply: Reply | None = None
            whole = not deltas and self.claude.answers_whole
            for _round in range(MAX_TOOL_ROUNDS + 1):
                reply = None
                if whole:
                    reply = await self.claude.create(system, messages, tools)
                else:
                    async for item in self.claude.stream(system, messages, tools):
                        if isinstance(item, TextDelta):
                            if deltas:
                                yield item
                        else:
                            reply = item
                assert reply is not None
                usage += reply.usage
                if reply.text:
                    texts.append(reply.text)
                if not reply.tool_uses or _round == MAX_TOOL_ROUNDS:
                    break
                messages = [
                    *messages,
                    {"role": "assistant", "content": reply.content},
                    {"role": "user", "content": await self._run_tools(reply, conversation)},
                ]
            assert reply is not None
            answer = "\n\n".join(t.strip() for t in texts if t.strip()) or "…"
            stored = await self.conversations.add_message(
                conversation.id,
                "assistant",
                answer,
                model=reply.model,
                usage=usage,
                cost_usd=round(usage.cost_usd(self.settings), 6),
                stop_reason=reply.stop_reason,
            )
            self.metrics.chat_replies.labels(conversation.channel).inc()
            yield Turn(user, stored)

    async def detached(
        self,
        turn: AsyncIterator[TextDelta | Message | Turn],
    ) -> AsyncIterator[TextDelta | Message | Turn]:
        """Run ``turn`` in its own task and relay what it yields.

        If the caller goes away (a browser closes the stream), the turn still completes and
        its reply is stored; :meth:`drain` waits for such turns at shutdown.
        """
        queue: asyncio.Queue[TextDelta | Message | Turn | BaseException | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for item in turn:
                    queue.put_nowait(item)
            except Exception as exc:
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(pump())
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def drain(self, grace_seconds: float) -> None:
        """Wait (up to ``grace_seconds``) for detached turns to finish."""
        if self._detached:
            await asyncio.wait(set(self._detached), timeout=grace_seconds)

    async def _run_tools(
        self,
        reply: Reply,
        conversation: Conversation,
    ) -> list[dict[str, Any]]:
        results = []
        for use in reply.tool_uses:
            tool = self.tools.get(use.name)
            if tool is None:
                content, is_error = f"unknown tool {use.name!r}", True
            else:
                try:
                    content, is_error = await tool.run(use.input, conversation), False
                except Exception as exc:  # a tool failing must not fail the turn
                    log.warning("tool %s failed: %s", use.name, exc)
                    content, is_error = f"the tool failed: {exc}", True
            results.append(
                {
                    "type": "tool_result",
                    "tool_use_id": use.id,
                    "content": content,
                    "is_error": is_error,
                }
            )
            log.info("tool %s ran (error=%s): %s", use.name, is_error, json.dumps(use.input)[:200])
        return results
