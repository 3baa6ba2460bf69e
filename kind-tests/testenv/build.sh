#!/usr/bin/env bash
# build.sh builds the testenv binary (embedded etcd + kube-apiserver +
# kube-controller-manager + kubectl) once and caches it.
#
#   bash kind-tests/testenv/build.sh      # last stdout line: path of the binary
#
# Cache: ${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/testenv/<key>/testenv,
# where <key> hashes go.mod, go.sum, *.go, this script and `go version`.
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
		for f in $(LC_ALL=C ls -1 ./*.go); do
			echo "== $f"
			cat "$f"
		done
	} | sha256sum | cut -c1-16
)"
cache_root="${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/testenv"
out_dir="$cache_root/$key"
bin="$out_dir/testenv"

if [[ -x "$bin" ]]; then
	echo "$bin"
	exit 0
fi

# The Kubernetes version stamped into the binary (/version, emulation
# version) is the one go.mod pins.
kube_version="$(sed -n 's#^[[:space:]]*k8s.io/kubernetes \(v[0-9][0-9.]*\)$#\1#p' go.mod | head -n1)"
if [[ ! "$kube_version" =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]]; then
	echo "build.sh: cannot find the k8s.io/kubernetes version in go.mod" >&2
	exit 1
fi
major="${BASH_REMATCH[1]}"
minor="${BASH_REMATCH[2]}"
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"

mkdir -p "$out_dir"
tmp="$(mktemp "$out_dir/.testenv.XXXXXX")"
trap 'rm -f "$tmp"' EXIT

echo "build.sh: building testenv ($kube_version, $go_version) into $out_dir; a cold build takes several minutes" >&2
# nice: a parallel Rust build on the same (2-core) machine keeps going.
CGO_ENABLED=0 nice -n 10 go build -trimpath -buildvcs=false -ldflags "$ldflags" -o "$tmp" . >&2
chmod 755 "$tmp"
mv -f "$tmp" "$bin"
trap - EXIT
# Drop binaries of other versions of this directory built over a week ago
# (about 130 MB each); with a warm GOCACHE a rebuild only relinks.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -mtime +7 -exec rm -rf {} + 2>/dev/null || true
echo "$bin"
