"""What each route is, for the request pipeline: declared with the route (routes.py and the
channels' own routes), read by middlewares.py, so that no list of paths is kept there.

* ``OPS``: health, readiness, info and metrics: never rate-limited (monitoring must always
  work), no bearer token (``/metrics`` checks its own);
* ``PUBLIC``: the web chat and its files, and anything that matches no route: rate-limited
  by the client's address;
* ``API``: a bearer token, checked here (each handler checks its scope), then rate-limited
  by token; failed tokens count against the address;
* ``webhook(channel)``: signed by the platform, verified by the channel: valid deliveries
  are never rate-limited, failed verifications count against the address; its deliveries
  are counted by channel.

Answers to ``OPS`` and ``API`` routes are not to be stored by caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource


@dataclass(frozen=True)
class Mark:
    kind: Literal["ops", "public", "api", "webhook"]
    channel: str | None = None  # a webhook's channel

    @property
    def no_store(self) -> bool:
        return self.kind in ("ops", "api")


OPS = Mark("ops")
PUBLIC = Mark("public")
API = Mark("api")


def webhook(channel: str) -> Mark:
    return Mark("webhook", channel)


class RouteMarks:
    """Every route's mark. A request's is found by its path when the route's path is
    fixed (so a wrong method on a webhook is still that webhook's, although no route
    matched), else by the resource that matched; ``PUBLIC`` when none did."""

    def __init__(self) -> None:
        self._by_path: dict[str, Mark] = {}
        self._by_resource: dict[AbstractResource, Mark] = {}

    def add(self, app: web.Application, mark: Mark, routes: Sequence[web.AbstractRouteDef]) -> None:
        """Add ``routes`` to ``app``, each with ``mark``."""
        for route in app.add_routes(routes):
            resource = route.resource
            assert resource is not None
            path = resource.get_info().get("path")
            if isinstance(path, str):
                known = self._by_path.setdefault(path, mark)
            else:
                known = self._by_resource.setdefault(resource, mark)
            if known != mark:
                raise ValueError(f"{resource.canonical} is marked both {known} and {mark}")

    def of(self, request: web.Request) -> Mark:
        mark = self._by_path.get(request.path)
        if mark is None:
            resource = request.match_info.route.resource
            mark = PUBLIC if resource is None else self._by_resource.get(resource, PUBLIC)
        return mark

    def unmarked(self, app: web.Application) -> list[str]:
        """The app's resources that have no mark (a route added around ``add``)."""
        return [
            resource.canonical
            for resource in app.router.resources()
            if resource.get_info().get("path") not in self._by_path
            and resource not in self._by_resource
        ]
