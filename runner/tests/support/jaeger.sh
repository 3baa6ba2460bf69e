#!/usr/bin/env bash
# Builds Jaeger (all-in-one: in-memory storage, OTLP receiver on 4317/4318, query API on 16686)
# from its Go module, once per version, and prints the path of the binary. The tracing tests
# export spans to it and read the traces back through its query API.
set -euo pipefail
JAEGER=v1.75.0
dir="${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/jaeger/$JAEGER"
bin="$dir/jaeger"
if [ ! -x "$bin" ]; then
	command -v go >/dev/null || { echo "jaeger.sh: Go is needed to build Jaeger" >&2; exit 1; }
	mkdir -p "$dir/module"
	cd "$dir/module"
	[ -f go.mod ] || go mod init contextos.dev/jaeger-build >&2
	go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER" >&2
	CGO_ENABLED=0 nice -n 10 go build -trimpath -o "$bin.tmp" github.com/jaegertracing/jaeger/cmd/jaeger >&2
	mv "$bin.tmp" "$bin"
fi
echo "$bin"
