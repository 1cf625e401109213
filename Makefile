.PHONY: demo test lint protos bootstrap images images-test

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

# Container images the dev overlay deploys, built here without a registry (scripts/images.sh; README "Container
# images"); images-test also runs each service's container as its Pod runs it.
images:
	bash scripts/images.sh build

images-test: bootstrap
	bash scripts/images.sh test
