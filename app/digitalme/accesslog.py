"""The access log: one line per request, as aiohttp's own access logger writes it, for a
fraction of its cost.

``create_app`` hands :class:`AccessLogger` to aiohttp (``handler_args``), so whoever runs
the app keeps choosing the logger, its level and the line's format. For the format the
service uses (:data:`SERVICE_FORMAT`, set by ``digitalme serve``), the line is built
directly and handed to the logger as a ready record: aiohttp's general logger compiles
the format into a list of functions, collects their values and ``extra`` fields through
them, and ``Logger.info`` looks for the caller's frame, which together cost as much as the
rest of a ``GET /health``. The record carries the same message and the same ``extra``
fields (``remote_address``, ``first_request_line``, ``response_status``,
``response_size``, ``request_time_frac``), except that the address is the client's as the
app sees it through trusted proxies (DIGITALME_TRUSTED_PROXIES), not the proxy's. Any
other format goes to aiohttp's logger.

The record itself is a copy of one made the standard way, with this request's message,
fields and time: ``LogRecord.__init__`` works out the file name, module, thread, process
and task again for every record, and all but the time and the task are the same for every
access line (lines are logged on the event loop's thread); a copy costs a fraction.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from aiohttp import web_log
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from .keys import CLIENT_ADDRESS

SERVICE_FORMAT = '%a "%r" %s %b %Tfs'


class AccessLogger(AbstractAccessLogger):
    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._general = (
            None if log_format == SERVICE_FORMAT else web_log.AccessLogger(logger, log_format)
        )
        # The fields every record of this logger shares, and the (thread, process) that
        # made them: another thread or a forked child makes its own.
        self._template: dict[str, Any] = {}
        self._made_in = (0, 0)
        self._start = 0.0  # logging's start time, which relativeCreated counts from

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def _record(self, message: str) -> logging.LogRecord:
        """``LogRecord(logger name, INFO, __file__, 0, message, None, None)``."""
        made_in = (threading.get_ident(), os.getpid())
        if made_in != self._made_in:
            self._template = dict(
                vars(logging.LogRecord(self.logger.name, logging.INFO, __file__, 0, "", None, None))
            )
            self._made_in = made_in
            self._start = self._template["created"] - self._template["relativeCreated"] / 1000
        record = logging.LogRecord.__new__(logging.LogRecord)
        fields = record.__dict__
        fields.update(self._template)
        created = time.time()  # as LogRecord.__init__ derives its times from it
        fields["msg"] = message
        fields["created"] = created
        fields["msecs"] = int((created - int(created)) * 1000) + 0.0
        fields["relativeCreated"] = (created - self._start) * 1000
        if "taskName" in fields:  # Python 3.12+: the task that logs, as LogRecord finds it
            fields["taskName"] = _task_name()
        return record

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if self._general is not None:
            self._general.log(request, response, time)
            return
        try:
            # The client, as the app sees it through trusted proxies (client_middleware):
            # behind Caddy, and load balancers, the peer is always a proxy.
            remote = request.get(CLIENT_ADDRESS) or request.remote or "-"
            version = request.version
            line = f"{request.method} {request.path_qs} HTTP/{version.major}.{version.minor}"
            elapsed = f"{time:06f}"
            status, size = response.status, response.body_length
            record = self._record(f'{remote} "{line}" {status} {size} {elapsed}s')
            record.remote_address = remote
            record.first_request_line = line
            record.response_status = status
            record.response_size = size
            record.request_time_frac = elapsed
            self.logger.handle(record)
        except Exception:
            self.logger.exception("Error in logging")


def _task_name() -> str | None:
    if not getattr(logging, "logAsyncioTasks", False):
        return None
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    return task.get_name() if task is not None else None
