"""DigitalMe: a persona-driven Claude agent with its operations surface."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("digitalme")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
