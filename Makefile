# The two commands of the README. Both set everything up first (scripts/bootstrap.sh).
.PHONY: demo test lint bootstrap clean

bootstrap:
	./scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/flad demo

lint: bootstrap
	.venv/bin/ruff check src test docker setup.py
	.venv/bin/hadolint docker/Dockerfile.vehicle docker/Dockerfile.edge

test: lint
	.venv/bin/python -m pytest -q

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
