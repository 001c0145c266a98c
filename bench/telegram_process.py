"""Telegram's Bot API stand-in (standins/telegram_api.py) as a process of its own,
for the benches: the service's replies must not load the process that generates the load
and times it. Prints ``telegram-standin listening on URL`` once ready; on SIGTERM it writes
the message ids its accepted replies answered (``reply_parameters.message_id``, one entry
per reply) to ``--report`` as JSON, and exits.

    python -m bench.telegram_process --token TOKEN --report replies.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from standins.platform import running  # noqa: E402
from standins.telegram_api import TelegramStandin  # noqa: E402


async def serve(token: str, report: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running(TelegramStandin(token)) as telegram:
        print(f"telegram-standin listening on {telegram.base_url}", flush=True)
        await stop.wait()
        replies = [body.get("reply_parameters", {}).get("message_id") for body in telegram.sent]
    await asyncio.to_thread(report.write_text, json.dumps(replies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--token", required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.token, args.report))


if __name__ == "__main__":
    main()
