#!/usr/bin/env bash
# start.sh starts a real single-node Kubernetes node (containerd 2.x + runc via
# runc-wrapper + CNI ptp/host-local/portmap + kubelet v1.36.3) on this machine,
# registered with an already running apiserver (kind-tests/testenv).
#
#   bash kind-tests/realnode/start.sh WORKDIR KUBECONFIG
#
# KUBECONFIG is the testenv admin kubeconfig (bearer token of system:masters).
# The kubelet authenticates as system:node:<node> in group system:nodes, so its
# requests are authorized by the Node authorizer like a real node's: with the
# client certificate testenv issues in node mode (node.crt next to KUBECONFIG,
# TESTENV_NODE_ADDRESS set), otherwise with the admin token *impersonating*
# that user (testenv without node mode issues no node certificate).
#
# Environment (defaults):
#   REALNODE_NODE_IP=10.250.255.1        added as /32 on lo; kubelet listens there (port 10250)
#   REALNODE_NODE_NAME=\$REALNODE_NODE_IP node name (a name that is not an IP makes the apiserver
#                                        resolve it through DNS for logs/exec: keep the default)
#   REALNODE_POD_CIDR=10.244.0.0/24      host-local range of the ptp CNI network
#   REALNODE_CGROUP_ROOT=/contextos-realnode  kubelet cgroupRoot (pre-created in every hierarchy)
#   REALNODE_KUBELET_PORT=10250, REALNODE_HEALTHZ_PORT=10248
#   REALNODE_NO_KUBELET=1                start containerd only (images imported)
#   REALNODE_KUBE_PROXY=1                also run kube-proxy (iptables mode, admin kubeconfig; NodePorts on NODE_IP only)
#   REALNODE_KUBE_ROUTER=1               also run kube-router (NetworkPolicy firewall only)
#   REALNODE_SCHEDULER=1                 also run kube-scheduler (admin kubeconfig; pods need not name the node)
#   REALNODE_IP_FORWARD_BEFORE=         net.ipv4.ip_forward to restore on stop (default: its value now; a
#                                        start after a failed one passes the value from before that)
#   REALNODE_DNS=1                       also run the cluster DNS: CoreDNS as Deployment kube-system/coredns,
#                                        Service kube-system/kube-dns at 10.0.0.10 (needs kube-proxy, the
#                                        scheduler, and testenv in node mode so pods reach the apiserver)
# The node's state (settings, pids) is kept in WORKDIR/realnode.env for stop.sh.
# Prints "READY <node-name>" when the Node is Ready. Needs root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "start.sh: $*" >&2; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
die() {
	log "$*"
	exit 1
}

[[ $# -eq 2 ]] || die "usage: start.sh WORKDIR KUBECONFIG"
[[ $(id -u) -eq 0 ]] || die "needs root"
for tool in curl jq; do
	command -v "$tool" >/dev/null || die "$tool not found (build.sh installs it with apt-get)"
done
t_start=$(date +%s.%N)
mkdir -p "$1"
W="$(cd "$1" && pwd)"
ADMIN_KUBECONFIG="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
[[ -r "$ADMIN_KUBECONFIG" ]] || die "cannot read $ADMIN_KUBECONFIG"
[[ ! -e "$W/realnode.env" ]] || die "$W/realnode.env exists: run stop.sh $W first"

B="$(bash "$here/build.sh" | tail -n1)"
[[ -x "$B/bin/kubelet" ]] || die "build.sh did not produce $B/bin/kubelet"
# shellcheck disable=SC1091
source "$B/versions.env"

NODE_IP="${REALNODE_NODE_IP:-10.250.255.1}"
# The node name defaults to the node IP: testenv's apiserver reaches the
# kubelet (logs, exec, port-forward) at the node's Hostname address first, and
# a name like "realnode" would be looked up in the machine's DNS (and fail).
NODE_NAME="${REALNODE_NODE_NAME:-$NODE_IP}"
POD_CIDR="${REALNODE_POD_CIDR:-10.244.0.0/24}"
CGROUP_ROOT="${REALNODE_CGROUP_ROOT:-/contextos-realnode}"
# testenv's --service-cluster-ip-range.
SERVICE_CIDR="${REALNODE_SERVICE_CIDR:-10.0.0.0/24}"
DNS_IP="${REALNODE_DNS_IP:-10.0.0.10}"
KUBELET_PORT="${REALNODE_KUBELET_PORT:-10250}"
HEALTHZ_PORT="${REALNODE_HEALTHZ_PORT:-10248}"
CHAIN="REALNODE-FWD"
EXT_IF="$(ip -4 route show default | awk '{for(i=1;i<=NF;i++) if($i=="dev") {print $(i+1); exit}}')"
SOCK="$W/containerd/containerd.sock"

mkdir -p "$W/logs" "$W/containerd" "$W/cni/net.d" "$W/cni/ipam" "$W/kubelet" "$W/pod-logs"

# State for stop.sh, written first so that a failed start can be torn down.
cat >"$W/realnode.env" <<EOF
B='$B'
W='$W'
ADMIN_KUBECONFIG='$ADMIN_KUBECONFIG'
NODE_NAME='$NODE_NAME'
NODE_IP='$NODE_IP'
POD_CIDR='$POD_CIDR'
CGROUP_ROOT='$CGROUP_ROOT'
CHAIN='$CHAIN'
EXT_IF='$EXT_IF'
SOCK='$SOCK'
IP_FORWARD_BEFORE='${REALNODE_IP_FORWARD_BEFORE:-$(sysctl -n net.ipv4.ip_forward)}'
NFT_TABLES_BEFORE='$(nft list tables 2>/dev/null | awk '{printf "%s:%s ", $2, $3}')'
IPSETS_BEFORE='$(ipset list -n 2>/dev/null | tr '\n' ' ')'
VAR_LIB_CNI_BEFORE=$([[ -e /var/lib/cni ]] && echo 1 || echo 0)
VAR_LIB_KUBELET_BEFORE=$([[ -e /var/lib/kubelet ]] && echo 1 || echo 0)
EOF
trap 'log "start failed; run: bash $here/stop.sh $W"' ERR

# --- kernel/network prerequisites ---------------------------------------------
sysctl -qw net.ipv4.ip_forward=1
if ! ip -4 addr show dev lo | grep -q " $NODE_IP/32 "; then
	ip addr add "$NODE_IP/32" dev lo
	echo "ADDED_NODE_IP=1" >>"$W/realnode.env"
fi
# Pod traffic stays on this machine: forwarded packets from the pod range to
# anything outside it (and into it from outside) are dropped, and nothing is
# masqueraded.
iptables -w -N "$CHAIN" 2>/dev/null || iptables -w -F "$CHAIN"
iptables -w -A "$CHAIN" -s "$POD_CIDR" ! -d "$POD_CIDR" -j DROP
iptables -w -A "$CHAIN" -d "$POD_CIDR" ! -s "$POD_CIDR" -j DROP
[[ -n "$EXT_IF" ]] && iptables -w -A "$CHAIN" -o "$EXT_IF" -s "$POD_CIDR" -j DROP
iptables -w -C FORWARD -j "$CHAIN" 2>/dev/null || iptables -w -I FORWARD 1 -j "$CHAIN"

# --- cgroups (v1 hierarchies + the v2 "unified" one of the hybrid layout) -------
for h in /sys/fs/cgroup/*/; do
	h="${h%/}"
	mountpoint -q "$h" || continue
	mkdir -p "$h$CGROUP_ROOT"
	if [[ -e "$h/cpuset.cpus" ]]; then
		# A new v1 cpuset starts empty; copy the parent's (root's) sets.
		cat "$h/cpuset.cpus" >"$h$CGROUP_ROOT/cpuset.cpus"
		cat "$h/cpuset.mems" >"$h$CGROUP_ROOT/cpuset.mems"
	fi
done

# --- containerd ---------------------------------------------------------------------
# runsc's settings for the gVisor shim: runsc behind runc-wrapper (the same clamp of the
# kubelet's negative oomScoreAdj), the systrap platform (no KVM needed), its state under
# WORKDIR so that stop.sh finds it.
cat >"$W/containerd/runsc.toml" <<EOF
binary_name = "$B/bin/runsc-wrapper"
root = "$W/containerd/runsc"
[runsc_config]
  platform = "systrap"
EOF
cat >"$W/containerd/config.toml" <<EOF
version = 3
root = "$W/containerd/root"
state = "$W/containerd/state"
temp = "$W/containerd/tmp"
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$W/containerd/opt"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_REF"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$B/bin/runc-wrapper"
        Root = "$W/containerd/runc"
        SystemdCgroup = false
    # gVisor: the RuntimeClass gvisor names this handler. Its shim (containerd-shim-runsc-v1,
    # found on containerd's PATH) reads runsc's settings from ConfigPath.
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runsc]
      runtime_type = "io.containerd.runsc.v1"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runsc.options]
        TypeUrl = "io.containerd.runsc.v1.options"
        ConfigPath = "$W/containerd/runsc.toml"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$W/cni/net.d"
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF

cat >"$W/cni/net.d/10-realnode.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "realnode",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "mtu": 1500,
      "ipam": {
        "type": "host-local",
        "dataDir": "$W/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

# Processes are started in their own session (setsid) so that they outlive
# this script; stop.sh stops them by pid.
start_daemon() {
	local name="$1"
	shift
	setsid "$@" >"$W/logs/$name.log" 2>&1 </dev/null &
	echo "$!" >"$W/$name.pid"
}

t0=$(date +%s.%N)
PATH="$B/bin:$PATH" start_daemon containerd "$B/bin/containerd" --config "$W/containerd/config.toml"
for _ in $(seq 1 100); do
	[[ -S "$SOCK" ]] && "$B/bin/ctr" -a "$SOCK" version >/dev/null 2>&1 && break
	kill -0 "$(cat "$W/containerd.pid")" 2>/dev/null || die "containerd exited; see $W/logs/containerd.log"
	sleep 0.1
done
"$B/bin/ctr" -a "$SOCK" version >/dev/null || die "containerd not answering; see $W/logs/containerd.log"
log "containerd up in $(since $t0) s"
for img in pause busybox coredns; do
	"$B/bin/ctr" -a "$SOCK" -n k8s.io images import "$B/images/$img.tar" >&2
done
"$B/bin/ctr" -a "$SOCK" -n k8s.io images ls -q >&2

if [[ "${REALNODE_NO_KUBELET:-0}" == 1 ]]; then
	trap - ERR
	echo "READY containerd $SOCK"
	exit 0
fi

# --- kubelet ------------------------------------------------------------------------
# The admin kubeconfig testenv writes has single-line server, CA data and token.
kv() { sed -n "s/^[[:space:]]*$1:[[:space:]]*//p" "$ADMIN_KUBECONFIG" | head -n1 | tr -d '"'; }
SERVER="$(kv server)"
CA_DATA="$(kv certificate-authority-data)"
TOKEN="$(kv token)"
[[ -n "$SERVER" && -n "$CA_DATA" && -n "$TOKEN" ]] || die "cannot read server/CA/token from $ADMIN_KUBECONFIG"
echo "$CA_DATA" | base64 -d >"$W/ca.crt"
# node_credentials: the kubelet's user entry, indented for the kubeconfig.
node_credentials() {
	local pki
	pki="$(dirname "$ADMIN_KUBECONFIG")"
	if [[ -r "$pki/node.crt" && -r "$pki/node.key" ]]; then
		local subject
		subject="$(openssl x509 -in "$pki/node.crt" -noout -subject -nameopt RFC2253 2>/dev/null)" ||
			die "cannot read $pki/node.crt (openssl)"
		[[ "$subject" == "subject=CN=system:node:$NODE_NAME,O=system:nodes" ]] ||
			die "$pki/node.crt is issued to '$subject', not system:node:$NODE_NAME (TESTENV_NODE_NAME and REALNODE_NODE_NAME must agree)"
		echo "    client-certificate: $pki/node.crt"
		echo "    client-key: $pki/node.key"
	else
		echo "    token: $TOKEN"
		echo "    as: system:node:$NODE_NAME"
		echo '    as-groups: ["system:nodes", "system:authenticated"]'
	fi
}
# Outside the heredoc: a die in a command substitution inside it would not stop this script.
NODE_CREDENTIALS="$(node_credentials)" || exit 1
umask 077
cat >"$W/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: $SERVER
    certificate-authority-data: $CA_DATA
users:
- name: node
  user:
$NODE_CREDENTIALS
contexts:
- name: node
  context: {cluster: testenv, user: node}
current-context: node
EOF
umask 022
printf 'nameserver 127.0.0.1\noptions ndots:1\n' >"$W/resolv.conf"

cat >"$W/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
cgroupsPerQOS: true
failSwapOn: false
containerRuntimeEndpoint: unix://$SOCK
imageServiceEndpoint: unix://$SOCK
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $HEALTHZ_PORT
# The apiserver (testenv) calls the kubelet without a client certificate
# (no --kubelet-client-certificate); the kubelet listens only on NODE_IP (lo).
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
oomScoreAdj: 0
podLogsDir: $W/pod-logs
resolvConf: $W/resolv.conf
clusterDomain: cluster.local
$([[ "${REALNODE_DNS:-0}" == 1 ]] && echo "clusterDNS: [$DNS_IP]")
podCIDR: $POD_CIDR
# The pod range is a /24: room for a 200-Session scale run and what else is scheduled.
maxPods: 250
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
imageMinimumGCAge: 876000h
evictionHard:
  memory.available: "0%"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
  imagefs.inodesFree: "0%"
evictionPressureTransitionPeriod: 1s
serializeImagePulls: false
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
localStorageCapacityIsolation: true
containerLogMaxSize: 10Mi
containerLogMaxFiles: 2
syncFrequency: 10s
fileCheckFrequency: 20s
nodeStatusReportFrequency: 10s
EOF

# A kubelet of an earlier test node whose work directory is gone (its stop was cut short) still
# holds the node's address and ports: it belongs to no node any more, so it is stopped.
for pid in $(pgrep -f -- "kubelet --config=" 2>/dev/null || true); do
	config="$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | sed -n 's/^--config=//p' | head -n1)" || continue
	[[ -n "$config" && "$config" != "$W/kubelet.yaml" && ! -e "$config" ]] || continue
	log "stopping kubelet $pid of a node that is gone ($config)"
	kill "$pid" 2>/dev/null || true
	sleep 1
	kill -9 "$pid" 2>/dev/null || true
done

t0=$(date +%s.%N)
start_daemon kubelet "$B/bin/kubelet" \
	--config="$W/kubelet.yaml" \
	--kubeconfig="$W/kubelet.kubeconfig" \
	--root-dir="$W/kubelet" \
	--cert-dir="$W/kubelet/pki" \
	--hostname-override="$NODE_NAME" \
	--node-ip="$NODE_IP" \
	--v="${REALNODE_KUBELET_V:-1}"

# apply PATH YAML: server-side apply of one object (field manager realnode).
apply() {
	curl -sS -f --cacert "$W/ca.crt" -H "Authorization: Bearer $TOKEN" -X PATCH \
		-H 'Content-Type: application/apply-patch+yaml' --data-binary @- \
		"$SERVER$1?fieldManager=realnode&force=true" >/dev/null || die "cannot apply $1"
}

# start_cluster_dns: CoreDNS as kind runs it (kube-system, k8s-app=kube-dns, Service kube-dns),
# answering for cluster.local from the apiserver and nothing else: no forwarder, so no query
# leaves the machine. Port 53 as non-root through the namespaced (safe) sysctl
# ip_unprivileged_port_start, not a capability. Returns once the Service answers a query.
start_cluster_dns() {
	apply /api/v1/namespaces/kube-system/serviceaccounts/coredns <<YAML
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
YAML
	apply /apis/rbac.authorization.k8s.io/v1/clusterroles/system:coredns <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
  - {apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}
  - {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
YAML
	apply /apis/rbac.authorization.k8s.io/v1/clusterrolebindings/system:coredns <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
YAML
	apply /api/v1/namespaces/kube-system/configmaps/coredns <<YAML
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            ttl 30
        }
        cache 30
        loadbalance
    }
YAML
	apply /apis/apps/v1/namespaces/kube-system/deployments/coredns <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
        sysctls: [{name: net.ipv4.ip_unprivileged_port_start, value: "53"}]
      containers:
        - name: coredns
          image: $COREDNS_REF
          imagePullPolicy: Never
          args: [-conf, /etc/coredns/Corefile]
          ports:
            - {name: dns, containerPort: 53, protocol: UDP}
            - {name: dns-tcp, containerPort: 53, protocol: TCP}
          readinessProbe:
            httpGet: {path: /ready, port: 8181}
            periodSeconds: 1
          resources:
            requests: {cpu: 50m, memory: 32Mi}
            limits: {memory: 128Mi}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
YAML
	apply /api/v1/namespaces/kube-system/services/kube-dns <<YAML
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_IP
  selector: {k8s-app: kube-dns}
  ports:
    - {name: dns, port: 53, protocol: UDP}
    - {name: dns-tcp, port: 53, protocol: TCP}
YAML
	local answer="" deadline=$((SECONDS + 180))
	while ((SECONDS < deadline)); do
		answer="$(timeout 3 /bin/busybox nslookup kubernetes.default.svc.cluster.local "$DNS_IP" 2>/dev/null | awk '/^Address/ { a = $2 } END { print a }' || true)"
		[[ "$answer" == 10.0.0.1 ]] && return 0
		sleep 0.5
	done
	log "the cluster DNS pods: $(api '/api/v1/namespaces/kube-system/pods?labelSelector=k8s-app%3Dkube-dns' |
		jq -c '[.items[] | {name: .metadata.name, node: .spec.nodeName, phase: .status.phase, conditions: .status.conditions, containers: .status.containerStatuses}]' 2>&1)"
	die "cluster DNS did not answer at $DNS_IP within 180 s; see kubectl -n kube-system describe pod -l k8s-app=kube-dns"
}

# Bounded: an apiserver that accepts but never answers must not outlast the deadlines below.
api() { curl -sS -m 5 --cacert "$W/ca.crt" -H "Authorization: Bearer $TOKEN" "$SERVER$1"; }
ready=""
deadline=$((SECONDS + 180))
while ((SECONDS < deadline)); do
	kill -0 "$(cat "$W/kubelet.pid")" 2>/dev/null || die "kubelet exited; see $W/logs/kubelet.log"
	st="$(api "/api/v1/nodes/$NODE_NAME" 2>/dev/null | jq -r '.status.conditions[]? | select(.type=="Ready") | .status' 2>/dev/null || true)"
	if [[ "$st" == True ]]; then
		ready=1
		break
	fi
	sleep 0.5
done
if [[ -z "$ready" ]]; then
	log "node $NODE_NAME conditions: $(api "/api/v1/nodes/$NODE_NAME" | jq -c '.status.conditions' 2>&1)"
	die "node $NODE_NAME not Ready after 180 s; see $W/logs/kubelet.log"
fi
log "node $NODE_NAME Ready $(since $t0) s after kubelet start"
# testenv runs no node-ipam controller: give the Node its pod range (settable
# once, by the admin) as a real cluster would; kube-router reads it. Nor a
# node-lifecycle controller: drop the not-ready taint the kubelet registers
# with (pods here name their node, but a scheduler would honour it).
api "/api/v1/nodes/$NODE_NAME" >/dev/null
curl -sS --cacert "$W/ca.crt" -H "Authorization: Bearer $TOKEN" -X PATCH \
	-H 'Content-Type: application/merge-patch+json' \
	--data "{\"spec\":{\"podCIDR\":\"$POD_CIDR\",\"podCIDRs\":[\"$POD_CIDR\"],\"taints\":null}}" \
	"$SERVER/api/v1/nodes/$NODE_NAME" | jq -e --arg c "$POD_CIDR" '.spec.podCIDR == $c' >/dev/null ||
	log "warning: could not set spec.podCIDR of node $NODE_NAME"

# --- optional: kube-proxy, kube-router ---------------------------------------------------
if [[ "${REALNODE_KUBE_PROXY:-0}" == 1 ]]; then
	cat >"$W/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: $ADMIN_KUBECONFIG
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
nodePortAddresses: ["primary"]
iptables:
  masqueradeAll: false
  # true would set net.ipv4.conf.all.route_localnet=1 on the host
  localhostNodePorts: false
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
	start_daemon kube-proxy "$B/bin/kube-proxy" --config="$W/kube-proxy.yaml" --v=1
	echo "KUBE_PROXY=1" >>"$W/realnode.env"
fi
if [[ "${REALNODE_KUBE_ROUTER:-0}" == 1 ]]; then
	[[ -x "$B/bin/kube-router" ]] || die "kube-router not built: REALNODE_KUBE_ROUTER=1 bash $here/build.sh"
	start_daemon kube-router "$B/bin/kube-router" --kubeconfig="$ADMIN_KUBECONFIG" \
		--run-firewall=true --run-router=false --run-service-proxy=false \
		--hostname-override="$NODE_NAME" --service-cluster-ip-range="$SERVICE_CIDR" \
		--health-port=0 --metrics-port=0 --v=1
	echo "KUBE_ROUTER=1" >>"$W/realnode.env"
fi

if [[ "${REALNODE_SCHEDULER:-0}" == 1 ]]; then
	# No serving port: nothing scrapes it here, and a port would be one more listener.
	start_daemon kube-scheduler "$B/bin/kube-scheduler" --kubeconfig="$ADMIN_KUBECONFIG" \
		--leader-elect=false --secure-port=0 --v=1
fi

# The node's second runtime, for pods that ask for a kernel of their own (gVisor's).
[[ -x "$B/bin/runsc" && -x "$B/bin/containerd-shim-runsc-v1" ]] || die "gVisor not built: bash $here/build.sh"
apply /apis/node.k8s.io/v1/runtimeclasses/gvisor <<YAML
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {name: gvisor}
handler: runsc
YAML

if [[ "${REALNODE_DNS:-0}" == 1 ]]; then
	t0=$(date +%s.%N)
	start_cluster_dns
	log "cluster DNS answering at $DNS_IP after $(since $t0) s"
fi

trap - ERR
log "started in $(since $t_start) s"
echo "READY $NODE_NAME"
