"""What the ``digitalme`` command and the commands a channel adds (integrations/<platform>/
commands.py) share: how a command fails in a way the user can fix, and its exit codes.
Imports nothing of the app, so that building the command line stays light."""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


class CommandError(Exception):
    """A command failed in a way the user can fix; the message says how."""
