#!/usr/bin/python3
"""Stand-in for the DigitalMe app in the caddy role's Molecule scenario (stdlib only)."""

import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    server_version = "molecule-upstream"

    def _send(self, status, body, content_type="text/plain", headers=()):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/health":
            self._send(200, "ok\n")
        elif path == "/own-headers":
            # An app that sends stricter values of its own: Caddy must keep them.
            self._send(
                200,
                "own headers\n",
                headers=(
                    ("X-Frame-Options", "SAMEORIGIN"),
                    ("Referrer-Policy", "no-referrer"),
                    ("Content-Security-Policy", "frame-ancestors 'self'"),
                ),
            )
        elif path == "/metrics":
            self._send(200, "upstream_secret_metric 1\n")
        elif path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.write(b"data: first\n\n")
            self.wfile.flush()
            time.sleep(3)
            self.wfile.write(b"data: second\n\n")
            self.wfile.flush()
            self.close_connection = True
        else:
            self._send(404, "not found\n")

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        received = len(self.rfile.read(length))
        self._send(200, f"received {received} bytes\n")


if __name__ == "__main__":
    host, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8080").rsplit(":", 1)
    ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
