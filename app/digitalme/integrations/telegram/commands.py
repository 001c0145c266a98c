"""``digitalme telegram set-webhook``: the Telegram channel's command. Light at import
(``digitalme --help`` builds every command's parser): the rest is imported when it runs."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ...commands import EXIT_OK, CommandError
from ...config import Settings


def add_commands(sub: Any) -> None:
    """``sub``: the ``digitalme`` command's subparsers."""
    telegram = sub.add_parser("telegram", help="set up the Telegram bot")
    tgsub = telegram.add_subparsers(dest="telegram_command", required=True, metavar="ACTION")
    p = tgsub.add_parser(
        "set-webhook",
        help="register URL as the bot's webhook, with the secret token and the update types "
        "we handle",
    )
    p.add_argument(
        "url",
        help="public URL of /webhooks/telegram, e.g. https://clone.example.org/webhooks/telegram",
    )
    p.set_defaults(func=set_webhook)


def set_webhook(settings: Settings, args: argparse.Namespace) -> int:
    from ...metrics import Metrics
    from ...outbound import Outbound, OutboundError
    from .act import TelegramApi
    from .webhook import ALLOWED_UPDATES

    if not settings.telegram_bot_token:
        raise CommandError(
            "DIGITALME_TELEGRAM_BOT_TOKEN is not set (environment or systemd "
            "credential): it is the token @BotFather gave the bot"
        )
    if not settings.telegram_secret_token:
        raise CommandError(
            "DIGITALME_TELEGRAM_SECRET_TOKEN is not set: choose a random "
            "secret (1-256 of A-Z a-z 0-9 _ -) so the service can tell "
            "Telegram's deliveries from forgeries"
        )
    if not args.url.startswith(("https://", "http://")):
        raise CommandError(f"the webhook URL must start with https:// (got {args.url!r})")

    async def work() -> Any:
        outbound = Outbound(settings, Metrics())
        await outbound.start()
        try:
            api = TelegramApi(
                outbound, settings.telegram_api_base or "", settings.telegram_bot_token or ""
            )
            return await api.set_webhook(
                args.url, settings.telegram_secret_token or "", ALLOWED_UPDATES
            )
        finally:
            await outbound.close()

    try:
        result = asyncio.run(work())
    except OutboundError as exc:
        raise CommandError(f"Telegram refused setWebhook: {exc}") from None
    print(
        f"webhook set to {args.url} (updates: {', '.join(ALLOWED_UPDATES)}; "
        f"secret token from DIGITALME_TELEGRAM_SECRET_TOKEN); Telegram said: {result}"
    )
    return EXIT_OK
