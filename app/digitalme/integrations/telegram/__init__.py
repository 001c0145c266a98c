"""Telegram: a bot that answers text messages in their chat (webhook + Bot API)."""
