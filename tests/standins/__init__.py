"""Local stand-ins for external services used by the tests.

``tests.standins.anthropic_api``: the Anthropic Messages API (see its docstring and README.md).
Import from the submodules directly; this package deliberately imports nothing, so that
``python -m tests.standins.anthropic_api`` runs cleanly.
"""
