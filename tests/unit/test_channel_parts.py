"""Small pure parts of the channels: splitting replies, classifying errors and deliveries,
mentions, timestamps, allowed response URLs, backoff."""

from __future__ import annotations

from digitalme.activity import iso_utc
from digitalme.config import load_settings
from digitalme.integrations.channel import secrets_match, split_text
from digitalme.integrations.github.act import mentions
from digitalme.integrations.slack.webhook import classify as slack_classify
from digitalme.integrations.slack.webhook import response_url_allowed, without_mentions
from digitalme.integrations.telegram.act import command_of
from digitalme.integrations.telegram.webhook import classify as telegram_classify
from digitalme.outbound import PermanentError, TransientError, backoff_delay, classify_status
from digitalme.worker import retry_delay


def test_split_text_respects_the_limit_and_prefers_boundaries() -> None:
    text = ("alpha " * 300).strip() + "\n\n" + "b" * 5000
    parts = split_text(text, 1000)
    assert all(0 < len(p) <= 1000 for p in parts)
    assert parts[0].endswith("alpha") and not parts[0].endswith(" ")
    assert "".join(parts).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace(
        "\n", ""
    )
    assert split_text("short", 10) == ["short"]
    assert split_text("   ", 10) == ["…"]


def test_outbound_errors_are_classified() -> None:
    assert isinstance(classify_status("x", 429, {"Retry-After": "7"}, ""), TransientError)
    assert classify_status("x", 429, {"Retry-After": "7"}, "").retry_after == 7.0
    assert isinstance(classify_status("x", 503, {}, ""), TransientError)
    assert isinstance(classify_status("x", 408, {}, ""), TransientError)
    assert isinstance(classify_status("x", 403, {}, ""), PermanentError)
    assert isinstance(classify_status("x", 404, {}, ""), PermanentError)
    assert backoff_delay(1, 3.0) == 3.0
    assert 0.25 <= backoff_delay(1, None) <= 0.5
    assert backoff_delay(20, None) <= 8.0


def test_inbox_backoff_doubles_up_to_the_cap() -> None:
    settings = load_settings(
        {"DIGITALME_INBOX_RETRY_BASE_SECONDS": "5", "DIGITALME_INBOX_RETRY_MAX_SECONDS": "60"}
    )
    assert [retry_delay(settings, n) for n in (1, 2, 3, 4, 5, 9)] == [5, 10, 20, 40, 60, 60]


def test_secrets_match_is_safe_on_any_input() -> None:
    assert secrets_match("abc", "abc")
    assert not secrets_match("abc", None)
    assert not secrets_match("abc", "abd")
    assert not secrets_match("abc", "ábc")  # non-ASCII does not raise


def test_telegram_classification_and_commands() -> None:
    message = {"message_id": 1, "chat": {"id": 5}, "from": {"is_bot": False}, "text": "hi"}
    assert telegram_classify({"update_id": 1, "message": message}) == ("message", False)
    assert telegram_classify({"update_id": 1, "message": {**message, "text": " "}}) == (
        "message_without_text",
        True,
    )
    assert telegram_classify({"update_id": 1, "message": {**message, "from": "x"}}) == (
        "message",
        False,
    )
    assert telegram_classify({"update_id": 1, "channel_post": {}}) == ("channel_post", True)
    assert command_of("/Help@SomeBot now") == "/help"
    assert command_of("hello /start") is None


def test_slack_classification() -> None:
    body = {"authorizations": [{"user_id": "UBOT", "is_bot": True}]}
    dm = {
        "type": "message",
        "channel_type": "im",
        "channel": "D1",
        "ts": "1.1",
        "user": "U1",
        "text": "hi",
    }
    assert slack_classify(body, dm) == ("direct_message", False)
    assert slack_classify(body, {**dm, "user": "UBOT"}) == ("message.bot", True)
    mention = {
        "type": "app_mention",
        "channel": "C1",
        "ts": "1.1",
        "user": "U1",
        "text": "<@UBOT> hi",
    }
    assert slack_classify(body, mention) == ("mention", False)
    assert slack_classify(body, {**mention, "text": "<@UBOT>"}) == ("app_mention.ignored", True)
    assert slack_classify(body, {**mention, "channel": "D1"}) == ("app_mention.dm", True)
    assert without_mentions("<@UBOT|clone>  what   now?") == "what now?"


def test_slack_response_urls() -> None:
    assert response_url_allowed("https://hooks.slack.com/commands/T/1/x", None)
    assert not response_url_allowed("http://hooks.slack.com/commands/T/1/x", None)
    assert not response_url_allowed("https://hooks.slack.com.evil.test/x", None)
    assert response_url_allowed("http://127.0.0.1:9/response/x", "http://127.0.0.1:9/api")
    assert not response_url_allowed("http://10.0.0.1/x", "https://slack.com/api")
    assert not response_url_allowed("https://slack.com.evil.test/x", "https://slack.com/api")
    assert not response_url_allowed("http://127.0.0.1:10/x", "http://127.0.0.1:9/api")


def test_github_mentions() -> None:
    assert mentions("hey @Clone-Bot, look", "clone-bot")
    assert mentions("@clone-bot", "clone-bot")
    assert not mentions("@clone-bot-2", "clone-bot")
    assert not mentions("mail me at x@clone-bot.io", "clone-bot")
    assert mentions("thanks @clone-bot.", "clone-bot")
    assert not mentions("email@clone-bot", "clone-bot")


def test_platform_timestamps_become_utc() -> None:
    assert iso_utc("2026-11-01T11:00:00+01:00") == "2026-11-01T10:00:00.000Z"
    assert iso_utc("2026-11-01T10:00:00Z") == "2026-11-01T10:00:00.000Z"
    assert iso_utc("1793527200000") == "2026-11-01T10:00:00.000Z"  # ClickUp: milliseconds
    assert iso_utc("1793527200") == "2026-11-01T10:00:00.000Z"
    assert iso_utc("garbage").endswith("Z")
