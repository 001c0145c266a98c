"""Where the service's log lines go: stderr (the journal under systemd), for less per line.

With the access log at info, every request logs a line; :class:`LineHandler` and
:class:`LineFormatter` keep that cheap without changing a byte of what is written:

- the timestamp's text is made once a second (``time.localtime`` and ``strftime`` for
  every line were a tenth of the cost of a ``GET /health``), the milliseconds per line;
- lines logged on an event loop are written together once the loop has run what is ready
  (one ``write(2)`` for all the requests answered in that turn, rather than one each).
  A line at WARNING or above, or from a thread without a running loop, is written at once
  with any lines before it, so nothing waits behind an error, and the order is kept.
  ``logging.shutdown`` (at exit) writes what is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TextIO


class LineFormatter(logging.Formatter):
    """:class:`logging.Formatter`, with the seconds of ``%(asctime)s`` formatted once per
    second (when no ``datefmt`` is given and the converter is the default)."""

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None or self.converter is not time.localtime:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, time.localtime(second))
            self._second = second
        if self.default_msec_format:
            return self.default_msec_format % (self._stamp, record.msecs)
        return self._stamp


class LineHandler(logging.StreamHandler[TextIO]):
    """A :class:`logging.StreamHandler` that writes the lines of one turn of the event loop
    together (see the module's docstring)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING or not self._later():
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _later(self) -> bool:
        """Have the running loop write the lines after this turn; False without one."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._flush_on is not loop:
            self._flush_on = loop
            loop.call_soon(self._flush_turn)
        return True

    def _flush_turn(self) -> None:
        self._flush_on = None
        self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr] # created by Handler.__init__
            if self._lines:
                text, self._lines = "".join(self._lines), []
                self.stream.write(text)
            super().flush()
