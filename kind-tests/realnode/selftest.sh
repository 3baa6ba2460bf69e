#!/usr/bin/env bash
# selftest.sh: the real-node prototype end to end, as one command (`make realnode-check`):
# builds it (cached), starts a local control plane (kind-tests/testenv) and the node against it,
# runs check.sh (restricted pods, seccomp, read-only root, pod-to-pod traffic, a ClusterIP
# Service through kube-proxy, NetworkPolicy through kube-router), and tears everything down
# again on any exit. Needs root. Set CONTEXTOS_KEEP_TESTENV=1 to keep the logs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="$(mktemp -d /tmp/contextos-realnode-XXXXXX)"
testenv_pid=""
cleanup() {
	bash "$here/stop.sh" "$work/node" >&2 || true
	if [[ -n "$testenv_pid" ]]; then
		kill "$testenv_pid" 2>/dev/null || true
		wait "$testenv_pid" 2>/dev/null || true
	fi
	if [[ -n "${CONTEXTOS_KEEP_TESTENV:-}" ]]; then
		echo "selftest.sh: kept $work" >&2
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT
export REALNODE_KUBE_PROXY=1 REALNODE_KUBE_ROUTER=1
bash "$here/build.sh" >&2
testenv="$(bash "$repo/kind-tests/testenv/build.sh" | tail -n1)"
mkdir -p "$work/testenv"
"$testenv" "$work/testenv" >"$work/testenv.out" 2>"$work/testenv.err" &
testenv_pid=$!
for _ in $(seq 1 120); do
	grep -q '^READY ' "$work/testenv.out" 2>/dev/null && break
	kill -0 "$testenv_pid" 2>/dev/null || { cat "$work/testenv.err" >&2; exit 1; }
	sleep 0.5
done
kubeconfig="$(sed -n 's/^READY //p' "$work/testenv.out")"
[[ -n "$kubeconfig" ]] || { echo "selftest.sh: testenv did not become ready" >&2; exit 1; }
bash "$here/start.sh" "$work/node" "$kubeconfig"
bash "$here/check.sh" "$work/node"
