"""Schemathesis hooks for tests/app/test_openapi_fuzz.py, loaded by ``st run`` through
``SCHEMATHESIS_HOOKS=tests.support.schemathesis_hooks``.

The fuzzer holds one admin token. Schemathesis learns ids from responses (GET
/api/v1/tokens lists that token's id), so it would soon DELETE its own token and spend the
rest of the run on 401s. This hook keeps that one id out of the generated cases; every
other token id, existing or not, is still fuzzed.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

PROTECTED_TOKEN_ID_ENV = "FUZZ_PROTECTED_TOKEN_ID"


@schemathesis.hook
def filter_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> bool:
    protected = os.environ.get(PROTECTED_TOKEN_ID_ENV)
    if not protected or not path_parameters:
        return True
    return str(path_parameters.get("token_id")) != protected
