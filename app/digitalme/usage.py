"""Token usage of a Claude reply and its estimated cost.

Kept apart from llm.py so that what stores usage (conversations, the CLI) does not have to
import the Anthropic SDK, which is slow to import.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Settings


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
        )

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
        )

    def cost_usd(self, settings: Settings) -> float:
        return (
            self.input_tokens * settings.price_input_per_mtok
            + self.output_tokens * settings.price_output_per_mtok
            + self.cache_write_tokens * settings.price_cache_write_per_mtok
            + self.cache_read_tokens * settings.price_cache_read_per_mtok
        ) / 1_000_000
