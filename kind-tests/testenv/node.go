// node.go owns testenv's node mode: the control plane set up for a real node
// (kind-tests/realnode) whose pods must reach the apiserver and run
// Deployments, Services and volumes as in any cluster.
//
// TESTENV_NODE_ADDRESS=<IPv4> turns it on. That address must already be on
// one of the machine's interfaces (the real node puts it on lo). Then:
//
//   - the apiserver listens on that address instead of 127.0.0.1 and
//     advertises it, and the endpoint reconciler keeps the `kubernetes`
//     Service's endpoints pointing at it, so pods reach the apiserver at
//     10.0.0.1:443 through kube-proxy (the serving certificate names both);
//   - the controller manager also runs the controllers that Deployments,
//     StatefulSets, Services and PersistentVolumeClaims need (deployment,
//     replicaset, statefulset, endpointslice, persistentvolume-binder);
//   - the node (TESTENV_NODE_NAME, default: the address) gets a client
//     certificate (DIR/node.crt, DIR/node.key) for the Node authorizer.
//
// Without it nothing changes: loopback only, and no controller acts on pods
// of a node that does not exist (the process node binds pods itself).
package main

import (
	"fmt"
	"net"
	"os"
)

// nodeMode is the real node testenv serves; nil without one.
type nodeMode struct {
	address net.IP
	name    string
}

// nodeControllers run in node mode on top of the base set.
var nodeControllers = []string{
	"deployment-controller",
	"replicaset-controller",
	"statefulset-controller",
	"endpointslice-controller",
	"persistentvolume-binder-controller",
}

// nodeModeFromEnv reads TESTENV_NODE_ADDRESS and TESTENV_NODE_NAME.
func nodeModeFromEnv() (*nodeMode, error) {
	raw := os.Getenv("TESTENV_NODE_ADDRESS")
	if raw == "" {
		return nil, nil
	}
	ip := net.ParseIP(raw).To4()
	if ip == nil || ip.IsLoopback() || ip.IsUnspecified() {
		return nil, fmt.Errorf("TESTENV_NODE_ADDRESS=%q: want the node's IPv4 address (not loopback, not 0.0.0.0)", raw)
	}
	name := os.Getenv("TESTENV_NODE_NAME")
	if name == "" {
		name = ip.String()
	}
	return &nodeMode{address: ip, name: name}, nil
}

// listenAddress is where the apiserver listens (and what it advertises).
func (n *nodeMode) listenAddress() string {
	if n == nil {
		return "127.0.0.1"
	}
	return n.address.String()
}
