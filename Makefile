# Entry points. `make test` is what CI runs (.ci/run); `make quickstart` is the main job.
SHELL := /bin/bash
CARGO ?= cargo
# Stable cache locations so repeated runs on one machine reuse earlier work.
export CARGO_TARGET_DIR ?= $(CURDIR)/target

.PHONY: test lint unit crds quickstart

## test: everything CI checks — formatting, clippy, generated CRDs, unit and integration tests.
test: lint unit

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --workspace --locked

## crds: regenerate manifests/crds from the types in crds/src.
crds:
	$(CARGO) run --locked -q -p contextos-crds --bin crdgen
