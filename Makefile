# Entry points. The README's two commands call scripts/ directly so that a fresh
# machine needs nothing but bash; these targets are shortcuts for people.
.PHONY: test lint
test:
	scripts/test.sh

lint:
	.venv/bin/ruff check app tests bench
	.venv/bin/mypy
