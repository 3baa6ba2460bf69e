#!/usr/bin/env bash
# build.sh builds tikv-testserver (PD + TiKV gRPC in front of client-go's mock
# TiKV) once and caches it.
#
#   bash kind-tests/tikv-testserver/build.sh      # last stdout line: path of the binary
#
# Cache: ${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/tikv-testserver/<key>/tikv-testserver,
# where <key> hashes go.mod, go.sum, the non-test *.go, this script and `go version`.
# A cached binary makes this a no-op that takes milliseconds.
# Needs only Go >= 1.26 and the Go module proxy; modules come through `go`
# itself into GOMODCACHE, and GOCACHE keeps the compiled packages (both at
# Go's default paths unless set), so a rebuild after a small change is quick.
# Everything except the final path goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if ! command -v go >/dev/null 2>&1; then
	echo "build.sh: go not found in PATH (Go >= 1.26 needed)" >&2
	exit 1
fi

go_version="$(go env GOVERSION)"
key="$(
	{
		echo "$go_version $(go env GOOS)/$(go env GOARCH)"
		cat go.mod go.sum build.sh
		for f in $(LC_ALL=C ls -1 ./*.go | grep -v '_test\.go$'); do
			echo "== $f"
			cat "$f"
		done
	} | sha256sum | cut -c1-16
)"
cache_root="${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/tikv-testserver"
out_dir="$cache_root/$key"
bin="$out_dir/tikv-testserver"

if [[ -x "$bin" ]]; then
	echo "$bin"
	exit 0
fi

mkdir -p "$out_dir"
tmp="$(mktemp "$out_dir/.tikv-testserver.XXXXXX")"
trap 'rm -f "$tmp"' EXIT

echo "build.sh: building tikv-testserver ($go_version) into $out_dir; a cold build takes about a minute" >&2
# nice: a parallel Rust build on the same (2-core) machine keeps going.
CGO_ENABLED=0 nice -n 10 go build -trimpath -buildvcs=false -ldflags "-s -w" -o "$tmp" . >&2
chmod 755 "$tmp"
mv -f "$tmp" "$bin"
trap - EXIT
# Drop binaries of other versions of this directory built over a week ago
# (about 20 MB each); with a warm GOCACHE a rebuild only relinks.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -mtime +7 -exec rm -rf {} + 2>/dev/null || true
echo "$bin"
