"""Local stand-ins of the external services DigitalMe talks to, for the tests, the demo,
local development and the benchmarks (README.md).

``standins.anthropic_api``: the Anthropic Messages API (see its docstring and README.md).
Import from the submodules directly; this package deliberately imports nothing, so that
``python -m standins.anthropic_api`` runs cleanly.
"""
