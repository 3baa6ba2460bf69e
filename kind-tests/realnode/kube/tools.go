//go:build tools

// Package kube only pins the node components that realnode builds from the
// same module set as kind-tests/testenv (k8s.io/kubernetes v1.36.3 and its
// staging modules at v0.36.3): build.sh runs
// `go build k8s.io/kubernetes/cmd/kubelet` (and kube-proxy, kube-scheduler) in this module.
package kube

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
