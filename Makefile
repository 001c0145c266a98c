# Entry points. The README's two commands call scripts/ directly so that a fresh
# machine needs nothing but bash; these targets are shortcuts for people.
.PHONY: test lint
test:
	scripts/test.sh

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# Sandbox hosts (sandbox/sandbox.py, docs/sandbox.md): HOSTS="app replica" or
# HOSTS="app:digitalme replica:backup_targets"; SANDBOX names the sandbox (default dev);
# SUITE=trixie boots Debian 13 hosts (default bookworm, Debian 12).
SANDBOX ?= dev
HOSTS ?= app
SUITE ?= bookworm
.PHONY: sandbox sandbox-down sandbox-status
sandbox:
	scripts/bootstrap.sh
	python3 sandbox/sandbox.py up --name $(SANDBOX) --suite $(SUITE) --inventory inventory/sandbox/hosts.yml $(HOSTS)

sandbox-down:
	python3 sandbox/sandbox.py down --name $(SANDBOX)

sandbox-status:
	python3 sandbox/sandbox.py status
