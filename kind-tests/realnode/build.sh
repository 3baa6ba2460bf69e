#!/usr/bin/env bash
# build.sh installs and builds everything the realnode prototype needs and
# caches it; the last stdout line is the cache directory (everything else goes
# to stderr), like kind-tests/testenv/build.sh.
#
#   bash kind-tests/realnode/build.sh          # -> ~/.cache/contextos/realnode/<key>
#   REALNODE_KUBE_ROUTER=1 bash .../build.sh   # also build kube-router (stretch)
#
# What it puts in the cache directory:
#   bin/containerd, bin/containerd-shim-runc-v2, bin/ctr   containerd $CONTAINERD_VERSION, cgo off
#   bin/kubelet, bin/kube-proxy, bin/kube-scheduler        k8s.io/kubernetes v1.36.3 (module set of kube/go.mod,
#                                                          a copy of kind-tests/testenv's plus what these need)
#   bin/runc-wrapper                                       clamps oomScoreAdj >= 0, then execs /usr/sbin/runc
#   bin/pause, bin/mkimage                                 tools/ (stdlib only)
#   bin/realnode-cri                                       kube/cmd/realnode-cri: minimal CRI client for stop.sh
#   bin/coredns                                            coredns/: CoreDNS v1.15.0 with the cluster-DNS plugins only
#   images/pause.tar, images/busybox.tar, images/coredns.tar  OCI archives for `ctr -n k8s.io images import`
#   bin/kube-router                                        only with REALNODE_KUBE_ROUTER=1
#   bin/runsc, bin/containerd-shim-runsc-v1                gVisor $GVISOR_VERSION (the module's Go-only branch; static,
#                                                          cgo off: runsc re-executes itself inside its chroot)
#   bin/runsc-wrapper                                      runc-wrapper again, in front of runsc
# Debian packages (installed with apt-get when missing): runc, containernetworking-plugins,
# busybox-static, iptables, ipset, conntrack, nftables (nft: stop.sh drops the empty tables iptables-nft made),
# openssl (start.sh checks the node certificate's subject), curl and jq (start.sh asks the apiserver).
#
# Go builds run one at a time under `nice -n 10`; GOCACHE and GOMODCACHE are Go's defaults
# (or whatever the environment sets). Idempotent: each artefact is skipped when present.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

CONTAINERD_VERSION=v2.3.7
KUBE_ROUTER_VERSION=v2.1.0
# gVisor publishes no semver tags: this is the pseudo-version of a commit of its `go` branch.
GVISOR_VERSION=v0.0.0-20260905035102-160fafc42237
PAUSE_REF=localhost/contextos/pause:1
BUSYBOX_REF=localhost/contextos/busybox:1.35.0
COREDNS_REF=localhost/contextos/coredns:1.15.0
DEB_PACKAGES=(runc containernetworking-plugins busybox-static iptables ipset conntrack nftables openssl curl jq)

log() { echo "build.sh: $*" >&2; }

if ! command -v go >/dev/null 2>&1; then
	log "go not found in PATH (Go >= 1.26 needed)"
	exit 1
fi

# --- Debian packages -------------------------------------------------------
missing=()
for p in "${DEB_PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
	log "installing Debian packages: ${missing[*]}"
	if [[ $(id -u) -ne 0 ]]; then
		log "need root for apt-get"
		exit 1
	fi
	apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# --- cache key ---------------------------------------------------------------
go_version="$(go env GOVERSION)"
key="$(
	{
		echo "$go_version $(go env GOOS)/$(go env GOARCH) containerd=$CONTAINERD_VERSION gvisor=$GVISOR_VERSION"
		echo "$PAUSE_REF $BUSYBOX_REF $COREDNS_REF"
		dpkg-query -W -f='${Package} ${Version}\n' busybox-static
		cat build.sh kube/go.mod kube/go.sum tools/go.mod coredns/go.mod coredns/go.sum
		for f in $(LC_ALL=C find tools kube coredns -name '*.go' | LC_ALL=C sort); do
			echo "== $f"
			cat "$f"
		done
	} | sha256sum | cut -c1-16
)"
cache_root="${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/realnode"
out="$cache_root/$key"
mkdir -p "$out/bin" "$out/images"
export CGO_ENABLED=0

# build_go NAME DIR ARGS...: `go build` of one binary into bin/NAME, atomically.
build_go() {
	local name="$1" dir="$2"
	shift 2
	[[ -x "$out/bin/$name" ]] && return 0
	local t0=$SECONDS
	log "building $name"
	(cd "$dir" && nice -n 10 go build -trimpath -buildvcs=false -o "$out/bin/.$name.tmp" "$@" >&2)
	mv -f "$out/bin/.$name.tmp" "$out/bin/$name"
	log "built $name in $((SECONDS - t0)) s"
}

# --- small tools (stdlib only) ----------------------------------------------
build_go pause tools -ldflags "-s -w" ./pause
build_go runc-wrapper tools -ldflags "-s -w -X main.realRunc=/usr/sbin/runc" ./runc-wrapper
build_go mkimage tools -ldflags "-s -w" ./mkimage

# --- containerd 2.x ------------------------------------------------------------
if [[ ! -x "$out/bin/containerd" || ! -x "$out/bin/containerd-shim-runc-v2" || ! -x "$out/bin/ctr" ]]; then
	t0=$SECONDS
	log "building containerd $CONTAINERD_VERSION (cgo off; no btrfs/devmapper/zfs)"
	tmpbin="$(mktemp -d "$out/.gobin.XXXXXX")"
	v="$CONTAINERD_VERSION"
	(cd "$here/tools" && GOBIN="$tmpbin" nice -n 10 go install -trimpath -buildvcs=false \
		-tags 'no_btrfs no_devmapper no_zfs' \
		-ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$v" \
		"github.com/containerd/containerd/v2/cmd/containerd@$v" \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$v" \
		"github.com/containerd/containerd/v2/cmd/ctr@$v" >&2)
	mv -f "$tmpbin"/* "$out/bin/"
	rmdir "$tmpbin"
	log "built containerd in $((SECONDS - t0)) s"
fi

# --- gVisor: the node's second runtime (handler runsc, RuntimeClass gvisor) ---------------
# The shim lowers its own oom_score_adj to -999 and gives up when it cannot; this VM withholds
# CAP_SYS_RESOURCE, which that needs (the same reason as runc-wrapper). So it is built from a
# copy of the module with that one constant at 0 (the score it inherits); nothing else changes.
if [[ ! -x "$out/bin/runsc" || ! -x "$out/bin/containerd-shim-runsc-v1" ]]; then
	t0=$SECONDS
	log "building gVisor $GVISOR_VERSION (runsc and its containerd shim)"
	module="$(cd "$here/tools" && go mod download -json "gvisor.dev/gvisor@$GVISOR_VERSION" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
	[[ -d "$module" ]] || { log "cannot download gvisor.dev/gvisor@$GVISOR_VERSION"; exit 1; }
	src="$(mktemp -d "$out/.gvisor.XXXXXX")"
	trap 'rm -rf "$src" "$out/bin/.runsc.tmp" "$out/bin/.shim.tmp"' EXIT
	cp -r "$module/." "$src/"
	chmod -R u+w "$src"
	manager="$src/pkg/shim/v1/manager.go"
	sed -i 's/^\toomScoreMax = -999$/\toomScoreMax = 0/' "$manager"
	grep -q '^.oomScoreMax = 0$' "$manager" || { log "gVisor's shim no longer sets oomScoreMax = -999 in $manager: look again"; exit 1; }
	(cd "$src" && nice -n 10 go build -trimpath -buildvcs=false -ldflags "-s -w" -o "$out/bin/.runsc.tmp" ./runsc >&2 &&
		nice -n 10 go build -trimpath -buildvcs=false -ldflags "-s -w" -o "$out/bin/.shim.tmp" ./shim >&2)
	mv -f "$out/bin/.runsc.tmp" "$out/bin/runsc"
	mv -f "$out/bin/.shim.tmp" "$out/bin/containerd-shim-runsc-v1"
	rm -rf "$src"
	trap - EXIT
	log "built gVisor in $((SECONDS - t0)) s"
fi
# A name without a slash is looked for next to the wrapper (the cache directory may move).
build_go runsc-wrapper tools -ldflags "-s -w -X main.realRunc=runsc" ./runc-wrapper

# --- kubelet / kube-proxy v1.36.3 ---------------------------------------------
kube_version="$(sed -n 's#^[[:space:]]*k8s.io/kubernetes \(v[0-9][0-9.]*\)$#\1#p' kube/go.mod | head -n1)"
if [[ ! "$kube_version" =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]]; then
	log "cannot find the k8s.io/kubernetes version in kube/go.mod"
	exit 1
fi
vpkg=k8s.io/component-base/version
kube_ldflags="-s -w -X $vpkg.gitVersion=$kube_version -X $vpkg.gitMajor=${BASH_REMATCH[1]} -X $vpkg.gitMinor=${BASH_REMATCH[2]} -X $vpkg.gitTreeState=clean"
build_go kubelet kube -ldflags "$kube_ldflags" k8s.io/kubernetes/cmd/kubelet
build_go kube-scheduler kube -ldflags "$kube_ldflags" k8s.io/kubernetes/cmd/kube-scheduler
build_go realnode-cri kube -ldflags "-s -w" ./cmd/realnode-cri
if [[ "${REALNODE_KUBE_PROXY:-1}" == 1 ]]; then
	build_go kube-proxy kube -ldflags "$kube_ldflags" k8s.io/kubernetes/cmd/kube-proxy
fi

# --- cluster DNS -------------------------------------------------------------------
build_go coredns coredns -ldflags "-s -w" .

# --- kube-router (stretch: NetworkPolicy firewall only) ---------------------------
if [[ "${REALNODE_KUBE_ROUTER:-0}" == 1 && ! -x "$out/bin/kube-router" ]]; then
	t0=$SECONDS
	log "building kube-router $KUBE_ROUTER_VERSION"
	tmpbin="$(mktemp -d "$out/.gobin.XXXXXX")"
	(cd "$here/tools" && GOBIN="$tmpbin" nice -n 10 go install -trimpath -buildvcs=false -ldflags "-s -w" \
		"github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION" >&2)
	mv -f "$tmpbin/kube-router" "$out/bin/kube-router"
	rm -rf "$tmpbin"
	log "built kube-router in $((SECONDS - t0)) s"
fi

# --- images -----------------------------------------------------------------------
if [[ ! -s "$out/images/pause.tar" ]]; then
	log "making $PAUSE_REF"
	printf 'file %s /pause 0755\n' "$out/bin/pause" |
		"$out/bin/mkimage" -ref "$PAUSE_REF" -out "$out/images/pause.tar" -entrypoint /pause -user 65535:65535 >"$out/images/pause.digest"
fi
if [[ ! -s "$out/images/busybox.tar" ]]; then
	log "making $BUSYBOX_REF from Debian busybox-static"
	etc="$(mktemp -d)"
	trap 'rm -rf "$etc"' EXIT
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nnonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh\n' >"$etc/passwd"
	printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$etc/group"
	{
		echo "file /bin/busybox /bin/busybox 0755"
		/bin/busybox --list-full | LC_ALL=C sort | while read -r applet; do
			[[ "$applet" == bin/busybox ]] && continue
			echo "symlink /bin/busybox /$applet"
		done
		echo "file $etc/passwd /etc/passwd 0644"
		echo "file $etc/group /etc/group 0644"
		echo "dir /tmp 1777"
		echo "dir /root 0700"
		echo "dir /home/nonroot 0755"
		echo "dir /proc 0555"
		echo "dir /sys 0555"
		echo "dir /dev 0755"
		echo "dir /var/run 0755"
		# Writable by anyone, so that a probe shows it is the read-only root that stops a write.
		echo "dir /var/tmp 1777"
	} | "$out/bin/mkimage" -ref "$BUSYBOX_REF" -out "$out/images/busybox.tar" -cmd /bin/sh >"$out/images/busybox.digest"
	rm -rf "$etc"
	trap - EXIT
fi
if [[ ! -s "$out/images/coredns.tar" ]]; then
	log "making $COREDNS_REF"
	printf 'file %s /coredns 0755\ndir /etc/coredns 0755\ndir /tmp 1777\n' "$out/bin/coredns" |
		"$out/bin/mkimage" -ref "$COREDNS_REF" -out "$out/images/coredns.tar" -entrypoint /coredns -user 65532:65532 >"$out/images/coredns.digest"
fi
cat >"$out/versions.env" <<EOF
CONTAINERD_VERSION=$CONTAINERD_VERSION
KUBE_VERSION=$kube_version
PAUSE_REF=$PAUSE_REF
BUSYBOX_REF=$BUSYBOX_REF
COREDNS_REF=$COREDNS_REF
EOF

# Drop other keys' cache directories unused for a week.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -mtime +7 -exec rm -rf {} + 2>/dev/null || true
echo "$out"
