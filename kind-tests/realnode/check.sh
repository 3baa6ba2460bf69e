#!/usr/bin/env bash
# check.sh runs the realnode milestones against a node started by start.sh:
# pods through the apiserver (non-root, read-only root, RuntimeDefault seccomp,
# own IPs), pod-to-pod traffic, and, when the node runs them, a ClusterIP
# Service (kube-proxy) and a default-deny NetworkPolicy (kube-router).
#
#   bash kind-tests/realnode/check.sh WORKDIR
#
# Uses the admin kubeconfig recorded by start.sh and testenv's built-in
# kubectl. Everything happens in namespace realnode-check (PodSecurity
# "restricted" enforced), deleted at the end. Last line: "N passed, N failed".
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $# -eq 1 && -f "$1/realnode.env" ]] || {
	echo "usage: check.sh WORKDIR (of a running start.sh)" >&2
	exit 2
}
# shellcheck disable=SC1091
source "$1/realnode.env"
TESTENV="$(bash "$here/../testenv/build.sh" | tail -n1)"
kc() { "$TESTENV" kubectl --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }
k() { kc -n realnode-check "$@"; }
pass=0 fail=0
ok() {
	echo "PASS $*"
	pass=$((pass + 1))
}
bad() {
	echo "FAIL $*"
	fail=$((fail + 1))
}
# A namespace left Terminating by an earlier run (its pods were bound to a
# node that was stopped before they were confirmed gone): force it out.
if kc get namespace realnode-check >/dev/null 2>&1; then
	k delete pods --all --grace-period=0 --force >/dev/null 2>&1
	# The kubelet kills the pods and confirms their deletion (a few seconds);
# the rest of the namespace has no finalizers to wait for.
k delete pods --all --timeout=60s >/dev/null || bad "pods not deleted by the kubelet"
kc delete namespace realnode-check --wait=false >/dev/null 2>&1
	kc wait --for=delete namespace/realnode-check --timeout=60s >/dev/null 2>&1 || true
fi
kc create namespace realnode-check >/dev/null 2>&1 || true
kc label namespace realnode-check pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null

pod() { # pod NAME LABEL
	cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, labels: {app: $2}}
spec:
  nodeName: $NODE_NAME
  terminationGracePeriodSeconds: 1
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    seccompProfile: {type: RuntimeDefault}
  containers:
  - name: main
    image: localhost/contextos/busybox:1.35.0
    imagePullPolicy: Never
    command: ["sh", "-c", "httpd -f -p 8080 -h /etc & exec sleep 3600"]
    ports: [{containerPort: 8080}]
    securityContext:
      readOnlyRootFilesystem: true
      allowPrivilegeEscalation: false
      capabilities: {drop: ["ALL"]}
---
EOF
}
t0=$(date +%s.%N)
{
	pod bb1 a
	pod bb2 b
} | k apply -f - >/dev/null
if k wait --for=condition=Ready pod/bb1 pod/bb2 --timeout=60s >/dev/null; then
	ok "two pods Ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
else
	bad "pods not Ready: $(k get pods -o wide 2>&1 | tr '\n' ' ')"
fi
IP1="$(k get pod bb1 -o jsonpath='{.status.podIP}')"
IP2="$(k get pod bb2 -o jsonpath='{.status.podIP}')"
echo "bb1=$IP1 bb2=$IP2"

out="$(k exec bb1 -- sh -c 'id -u; grep -E "^Seccomp:" /proc/self/status; touch /probe 2>&1; true')"
[[ "$(sed -n 1p <<<"$out")" == 65532 ]] && ok "non-root (uid 65532)" || bad "uid: $out"
grep -q 'Seccomp:[[:space:]]*2' <<<"$out" && ok "seccomp filter mode (RuntimeDefault)" || bad "seccomp: $out"
grep -q 'Read-only file system' <<<"$out" && ok "read-only root enforced" || bad "read-only root: $out"
in_cidr() { # in_cidr IP: is IP in POD_CIDR (a /24 or wider /16 prefix match is enough here)
	local net="${POD_CIDR%/*}" bits="${POD_CIDR#*/}" a b i
	IFS=. read -r -a a <<<"$1"
	IFS=. read -r -a b <<<"$net"
	for i in 0 1 2 3; do
		((bits >= 8)) || break
		[[ "${a[$i]}" == "${b[$i]}" ]] || return 1
		bits=$((bits - 8))
	done
}
[[ -n "$IP1" && -n "$IP2" && "$IP1" != "$IP2" ]] && in_cidr "$IP1" && in_cidr "$IP2" &&
	ok "own IPs from $POD_CIDR" || bad "pod IPs $IP1 $IP2 not distinct / not in $POD_CIDR"

fetch() { # fetch FROM_POD IP PORT: HTTP GET /group over nc (busybox-static's wget segfaults)
	k exec "$1" -- sh -c "printf 'GET /group HTTP/1.0\r\n\r\n' | nc -w 3 $2 $3" 2>/dev/null | grep -q '^nonroot:'
}
fetch bb1 "$IP2" 8080 && ok "bb1 -> bb2 by pod IP" || bad "bb1 -> bb2 by pod IP"
fetch bb2 "$IP1" 8080 && ok "bb2 -> bb1 by pod IP" || bad "bb2 -> bb1 by pod IP"

if [[ "${KUBE_PROXY:-0}" == 1 ]]; then
	# testenv runs no endpointslice controller: the slice is written by hand.
	cat <<EOF | k apply -f - >/dev/null
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: b}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-manual
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: realnode-check}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: ["$IP2"]
  conditions: {ready: true}
  nodeName: $NODE_NAME
EOF
	CIP="$(k get svc web -o jsonpath='{.spec.clusterIP}')"
	got=""
	for _ in $(seq 1 20); do
		fetch bb1 "$CIP" 80 && got=1 && break
		sleep 0.5
	done
	[[ -n "$got" ]] && ok "bb1 -> Service web ($CIP:80) via kube-proxy" || bad "bb1 -> ClusterIP $CIP:80"
fi

if [[ "${KUBE_ROUTER:-0}" == 1 ]]; then
	cat <<EOF | k apply -f - >/dev/null
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny}
spec:
  podSelector: {}
  policyTypes: [Ingress]
EOF
	denied=""
	for _ in $(seq 1 20); do
		fetch bb1 "$IP2" 8080 || {
			denied=1
			break
		}
		sleep 0.5
	done
	[[ -n "$denied" ]] && ok "default-deny NetworkPolicy blocks bb1 -> bb2 (kube-router)" || bad "NetworkPolicy not enforced"
	cat <<EOF | k apply -f - >/dev/null
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-a-to-b}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 8080, protocol: TCP}]}]
EOF
	allowed=""
	for _ in $(seq 1 20); do
		fetch bb1 "$IP2" 8080 && allowed=1 && break
		sleep 0.5
	done
	[[ -n "$allowed" ]] && ok "allow policy a->b lets bb1 -> bb2 through" || bad "allow policy not applied"
	fetch bb2 "$IP1" 8080 && bad "bb2 -> bb1 still allowed under default deny" || ok "bb2 -> bb1 still denied"
	k delete networkpolicy --all >/dev/null
fi

# The kubelet kills the pods and confirms their deletion (a few seconds);
# the rest of the namespace has no finalizers to wait for.
k delete pods --all --timeout=60s >/dev/null || bad "pods not deleted by the kubelet"
kc delete namespace realnode-check --wait=false >/dev/null
echo "$pass passed, $fail failed"
[[ $fail -eq 0 ]]
