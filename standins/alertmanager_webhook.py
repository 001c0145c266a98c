"""A receiver for Alertmanager's webhook notifications, for end-to-end tests.

Alertmanager POSTs one JSON document per notification (a group of alerts, firing or
resolved; version 4 of its webhook format). The receiver keeps each with the time it
arrived, and answers 200. It runs in a thread, so a synchronous test can cause a fault,
then wait for the alert::

    with AlertReceiver(host=sandbox.controller_address, port=8766) as receiver:
        ...  # Alertmanager's webhook_configs url: http://<host>:8766/alertmanager
        fault_at = time.time()
        arrival = receiver.wait_for("firing", alertname="LitestreamDown", host="app",
                                    after=fault_at, timeout=120)
        print(arrival.received_at - fault_at)

Only the standard library; listens on exactly the address given.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Arrival:
    """One alert of a notification, and when the notification arrived (Unix time)."""

    received_at: float
    status: str  # firing or resolved
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    ends_at: str


class AlertReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, path: str = "/alertmanager"):
        self.path = path
        self.notifications: list[tuple[float, dict[str, Any]]] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != receiver.path:
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._add(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def start(self) -> AlertReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> AlertReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _add(self, payload: dict[str, Any]) -> None:
        with self._changed:
            self.notifications.append((time.time(), payload))
            self._changed.notify_all()

    def arrivals(self) -> list[Arrival]:
        with self._changed:
            notifications = list(self.notifications)
        return [
            Arrival(
                received_at,
                alert["status"],
                alert["labels"],
                alert["annotations"],
                alert["startsAt"],
                alert["endsAt"],
            )
            for received_at, payload in notifications
            for alert in payload["alerts"]
        ]

    def find(self, status: str, *, after: float = 0.0, **labels: str) -> Arrival | None:
        """The first alert with this status and these labels that arrived after ``after``."""
        for arrival in self.arrivals():
            if (
                arrival.status == status
                and arrival.received_at >= after
                and all(arrival.labels.get(k) == v for k, v in labels.items())
            ):
                return arrival
        return None

    def wait_for(
        self, status: str, *, after: float = 0.0, timeout: float = 120.0, **labels: str
    ) -> Arrival | None:
        """Wait until :meth:`find` finds one (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self._changed:  # an RLock: find() takes it again
            while True:
                found = self.find(status, after=after, **labels)
                left = deadline - time.monotonic()
                if found is not None or left <= 0:
                    return found
                self._changed.wait(min(left, 1.0))

    def summary(self) -> str:
        """What arrived, one line per alert, for failure messages."""
        return (
            "\n".join(
                f"{time.strftime('%H:%M:%S', time.localtime(a.received_at))} {a.status:8} "
                f"{a.labels.get('alertname')} {json.dumps(a.labels, sort_keys=True)}"
                for a in self.arrivals()
            )
            or "(nothing arrived)"
        )
