"""The baseline for bench/http_bench.py: a bare aiohttp server whose ``GET /health``
answers what DigitalMe's does (``{"status": "ok"}``), with no middleware, no access log.

    python -m bench.hello_server --port 8081
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/health", health)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
