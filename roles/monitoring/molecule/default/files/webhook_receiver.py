#!/usr/bin/python3
"""Alertmanager webhook stand-in: appends each notification (JSON) as one line to a file.

Usage: molecule-webhook-receiver ADDRESS PORT FILE
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        record = {"received_at": time.time(), "path": self.path, "payload": json.loads(body)}
        with open(sys.argv[3], "a") as log:
            log.write(json.dumps(record) + "\n")
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer((sys.argv[1], int(sys.argv[2])), Receiver).serve_forever()
