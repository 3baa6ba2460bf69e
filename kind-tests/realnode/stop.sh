#!/usr/bin/env bash
# stop.sh tears down what start.sh WORKDIR started and leaves nothing behind:
# kube-scheduler / kube-router / kube-proxy / kubelet, every pod sandbox (through the CRI, so the
# CNI DEL runs and the netns goes), containerd tasks and containers, containerd,
# left-over shims and container processes, mounts under WORKDIR, the cgroup
# trees, the iptables chains, the node address on lo and ip_forward.
# Logs stay in WORKDIR/logs; everything else in WORKDIR is removed.
#
#   bash kind-tests/realnode/stop.sh WORKDIR
#
# Safe to run twice, and after a failed start.
set -uo pipefail

t_start=$(date +%s.%N)
log() { echo "stop.sh: [$(awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s] $*" >&2; }
[[ $# -eq 1 ]] || {
	log "usage: stop.sh WORKDIR"
	exit 2
}
[[ -d "$1" ]] || {
	log "no such directory $1"
	exit 0
}
W="$(cd "$1" && pwd)"
if [[ ! -e "$W/realnode.env" ]]; then
	log "$W/realnode.env missing: nothing to stop"
	exit 0
fi
# shellcheck disable=SC1091
source "$W/realnode.env"

# stop_pid NAME SECONDS: SIGTERM the process in WORKDIR/NAME.pid, SIGKILL after SECONDS.
stop_pid() {
	local name="$1" secs="$2" pid
	[[ -f "$W/$name.pid" ]] || return 0
	pid="$(cat "$W/$name.pid")"
	# Only a process running one of this node's binaries: after a restart (a node left behind
	# by a killed run, stopped by the next run) the pid may belong to anything else.
	case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in
	"$(readlink -f "$B")"/bin/*) ;;
	*)
		rm -f "$W/$name.pid"
		return 0
		;;
	esac
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null
		for _ in $(seq 1 $((secs * 10))); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			log "$name ($pid) did not stop in ${secs}s: SIGKILL"
			kill -KILL "$pid" 2>/dev/null
			sleep 0.2
		fi
	fi
	rm -f "$W/$name.pid"
}

# Delete the Node object (and so the pods bound to it lose their node) while
# the apiserver is still there; ignore failures (it may be gone already).
node_delete() {
	local server token
	server="$(sed -n 's/^[[:space:]]*server:[[:space:]]*//p' "$ADMIN_KUBECONFIG" 2>/dev/null | head -n1)"
	token="$(sed -n 's/^[[:space:]]*token:[[:space:]]*//p' "$ADMIN_KUBECONFIG" 2>/dev/null | head -n1)"
	[[ -n "$server" && -n "$token" && -f "$W/ca.crt" ]] || return 0
	curl -sS -m 3 --cacert "$W/ca.crt" -H "Authorization: Bearer $token" -X DELETE \
		"$server/api/v1/nodes/$NODE_NAME" >/dev/null 2>&1 || true
}

stop_pid kube-scheduler 5
stop_pid kube-router 5
# (kube-router v2.1.0's --cleanup-config removes nothing and then panics in the
# service-proxy clean-up; its chains and ipsets are removed below.)
stop_pid kube-proxy 5
if [[ "${KUBE_PROXY:-0}" == 1 && -x "$B/bin/kube-proxy" ]]; then
	"$B/bin/kube-proxy" --cleanup --v=0 >"$W/logs/kube-proxy-cleanup.log" 2>&1 || log "kube-proxy --cleanup failed (see logs)"
fi
stop_pid kubelet 10
log "node components stopped"
node_delete

ctr_() { "$B/bin/ctr" -a "$SOCK" "$@"; }
if [[ -f "$W/containerd.pid" ]] && kill -0 "$(cat "$W/containerd.pid")" 2>/dev/null; then
	# Pod sandboxes first, through the CRI: containerd runs the CNI DEL and
	# removes the netns; the shims exit.
	"$B/bin/realnode-cri" -endpoint "unix://$SOCK" -timeout 60s rmp-all >&2 || log "CRI clean-up reported errors"
	# Anything started with ctr (any namespace).
	for ns in $(ctr_ namespaces ls -q 2>/dev/null); do
		for t in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do
			ctr_ -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1
		done
		sleep 0.3
		for t in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do
			ctr_ -n "$ns" tasks delete -f "$t" >/dev/null 2>&1
		done
		for c in $(ctr_ -n "$ns" containers ls -q 2>/dev/null); do
			ctr_ -n "$ns" containers delete "$c" >/dev/null 2>&1
		done
	done
fi
log "pods removed"
stop_pid containerd 10
log "containerd stopped"

# Shims outlive containerd: stop those serving this containerd (matched by
# their -address argument, killed by pid).
runsc="$(readlink -f "$B")/bin/runsc"
for p in /proc/[0-9]*; do
	cmd="$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)" || continue
	case "$cmd" in
	*containerd-shim-runc-v2*"-address $SOCK "* | *containerd-shim-runsc-v1*"-address $SOCK "*)
		log "killing left-over shim ${p#/proc/}"
		kill -KILL "${p#/proc/}" 2>/dev/null
		;;
	esac
	# gVisor's sandboxes and gofers run in their pod's cgroups (swept below); a runsc the
	# shim itself ran (create, wait) does not.
	if [[ "$(readlink "$p/exe" 2>/dev/null)" == "$runsc" ]]; then
		log "killing left-over runsc ${p#/proc/}"
		kill -KILL "${p#/proc/}" 2>/dev/null
	fi
done

# Container processes still in our cgroup trees (e.g. after a crash).
for h in /sys/fs/cgroup/*/; do
	h="${h%/}"
	[[ -d "$h$CGROUP_ROOT" ]] || continue
	find "$h$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r pid; do
		[[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null
	done
done
sleep 0.3

# Mounts under WORKDIR (rootfs overlays, netns bind mounts, kubelet's
# rshared bind of its root dir, pod volumes), deepest first.
for _ in 1 2 3; do
	mapfile -t mnts < <(awk -v w="$W/" '{ p = $5; gsub(/\\040/, " ", p); if (index(p, w) == 1) print p }' /proc/self/mountinfo | sort -r | uniq)
	((${#mnts[@]})) || break
	for m in "${mnts[@]}"; do
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
	done
done

# Cgroup trees, deepest first (kubelet's cgroupRoot, and what ctr made under it).
for h in /sys/fs/cgroup/*/; do
	h="${h%/}"
	[[ -d "$h$CGROUP_ROOT" ]] || continue
	find "$h$CGROUP_ROOT" -depth -type d -exec rmdir {} \; 2>/dev/null
	[[ -d "$h$CGROUP_ROOT" ]] && log "cgroup $h$CGROUP_ROOT still there"
done

# iptables: our chain, and every KUBE-* chain (kubelet: KUBE-FIREWALL,
# KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT; kube-proxy and kube-router: the
# rest), with the rules in other chains that jump to them. This assumes one
# realnode per machine and no other Kubernetes node on it. (portmap's per-pod
# chains go with the CNI DEL above; ptp with ipMasq false makes none.)
clean_chains() { # clean_chains iptables|ip6tables TABLE REGEX
	local ipt="$1" table="$2" re="$3" rule chains
	chains="$($ipt -w -t "$table" -S 2>/dev/null | sed -n 's/^-N \(.*\)$/\1/p' | grep -E "^($re)\$")" || return 0
	# Rules outside those chains that jump to one of them.
	$ipt -w -t "$table" -S | grep -E -- "-j ($re)( |\$)" | grep -vE -- "^-A ($re) " | while read -r rule; do
		eval "$ipt -w -t $table ${rule/#-A/-D}"
	done
	for c in $chains; do $ipt -w -t "$table" -F "$c"; done
	for c in $chains; do $ipt -w -t "$table" -X "$c"; done
}
clean_chains iptables filter "$CHAIN"
for ipt in iptables ip6tables; do
	for table in raw mangle nat filter; do
		clean_chains "$ipt" "$table" 'KUBE-[A-Za-z0-9_-]+'
	done
done
# ipsets made while the node ran (kube-router), now unreferenced.
for set in $(ipset list -n 2>/dev/null); do
	case " ${IPSETS_BEFORE:-} " in *" $set "*) continue ;; esac
	ipset destroy "$set" 2>/dev/null || log "ipset $set still in use"
done
# Conntrack entries of the pod range.
conntrack -D -s "$POD_CIDR" >/dev/null 2>&1 || true
conntrack -D -d "$POD_CIDR" >/dev/null 2>&1 || true
# iptables-nft leaves the (now empty) tables it created; drop those that did
# not exist before start.sh and hold no rule any more.
if command -v nft >/dev/null 2>&1; then
	for t in $(nft list tables 2>/dev/null | awk '{print $2 ":" $3}'); do
		case " ${NFT_TABLES_BEFORE:-} " in *" $t "*) continue ;; esac
		fam="${t%%:*}" name="${t#*:}"
		[[ "$fam" == ip || "$fam" == ip6 ]] || continue
		case "$name" in filter | nat | mangle | raw | security) ;; *) continue ;; esac
		# Empty: only "table", "chain", "type ... policy accept;" and braces.
		if nft list table "$fam" "$name" 2>/dev/null |
			awk '/^[[:space:]]*(table|chain|type|}|$)/ { next } { found = 1 } END { exit found ? 1 : 0 }'; then
			nft delete table "$fam" "$name" 2>/dev/null || true
		fi
	done
fi

if [[ "${ADDED_NODE_IP:-0}" == 1 ]]; then
	ip addr del "$NODE_IP/32" dev lo 2>/dev/null || true
fi
if [[ -n "${IP_FORWARD_BEFORE:-}" ]]; then
	sysctl -qw "net.ipv4.ip_forward=$IP_FORWARD_BEFORE"
fi

# Host veths of pods whose netns is gone disappear by themselves; report any
# left (named veth* by ptp, with an address in the pod range's gateway).
left="$(ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1)"
[[ -n "$left" ]] && log "veth interfaces still present: $left"

# Fixed paths that containerd and the kubelet use whatever their config says:
# containerd's shim sockets and fifos, libcni's result cache, the kubelet's
# device-plugin socket. Removed when start.sh found them absent (and, for the
# directories, when nothing else is left in them).
rmdir /run/containerd/s /run/containerd/fifo /run/containerd 2>/dev/null || true
rm -f /var/lib/cni/results/realnode-* 2>/dev/null
[[ "${VAR_LIB_CNI_BEFORE:-1}" == 0 ]] && rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null
if [[ "${VAR_LIB_KUBELET_BEFORE:-1}" == 0 ]]; then
	rm -f /var/lib/kubelet/device-plugins/kubelet.sock
	rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet 2>/dev/null
fi

find "$W" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf --one-file-system {} + 2>/dev/null
log "stopped"
