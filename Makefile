.PHONY: demo test lint protos bootstrap

bootstrap:
	bash scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/ponyctl demo

test: bootstrap
	.venv/bin/python -m pytest -q

lint: bootstrap
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

protos:
	bash scripts/gen_protos.sh
