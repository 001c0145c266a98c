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
"""

from __future__ import annotations

import logging

from aiohttp import web_log
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from .keys import CLIENT_ADDRESS

SERVICE_FORMAT = '%a "%r" %s %b %Tfs'


class AccessLogger(AbstractAccessLogger):
    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._general = (None if log_format == SERVICE_FORMAT
                         else web_log.AccessLogger(logger, log_format))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if self._general is not None:
            self._general.log(request, response, time)
            return
        try:
            # The client, as the app sees it through trusted proxies (client_middleware):
            # behind Caddy, and load balancers, the peer is always a proxy.
            remote = request.get(CLIENT_ADDRESS) or request.remote or "-"
            version = request.version
            line = (f"{request.method} {request.path_qs} "
                    f"HTTP/{version.major}.{version.minor}")
            elapsed = f"{time:06f}"
            record = logging.LogRecord(
                self.logger.name, logging.INFO, __file__, 0,
                f'{remote} "{line}" {response.status} {response.body_length} {elapsed}s',
                None, None)
            record.remote_address = remote
            record.first_request_line = line
            record.response_status = response.status
            record.response_size = response.body_length
            record.request_time_frac = elapsed
            self.logger.handle(record)
        except Exception:
            self.logger.exception("Error in logging")
