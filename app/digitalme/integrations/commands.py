"""The commands the channels add to ``digitalme`` (each in its package's ``commands``
module, light at import), in the order ``digitalme --help`` lists them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .telegram import commands as telegram

CHANNEL_COMMANDS: tuple[Callable[[Any], None], ...] = (telegram.add_commands,)
