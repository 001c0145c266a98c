"""Slack: direct messages and mentions answered in thread, and the /digitalme command."""
