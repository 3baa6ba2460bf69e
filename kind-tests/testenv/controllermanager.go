// controllermanager.go owns kube-controller-manager, run in-process with a
// fixed set of controllers, and the wait for the default ServiceAccount that
// makes READY mean "pods can be created".
//
// Options are set as struct fields, never through the controller manager's
// flag set: building that flag set in a process that has already built the
// apiserver's registers the shared feature gates on a second flag set and
// panics ("unable to set WatchListClient feature gate").
package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kcmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
)

// controllers run by the controller manager. root-ca-certificate-publisher
// writes the kube-root-ca.crt ConfigMap into every namespace: the
// kube-api-access-* volume the ServiceAccount admission plugin adds to every
// pod needs it, so without it no pod could start. Left out on purpose:
// pod-garbage-collector-controller and node-lifecycle-controller, which
// would delete or evict pods bound to a node whose kubelet they do not see.
var controllers = []string{
	"job-controller",
	"garbage-collector-controller",
	"namespace-controller",
	"serviceaccount-controller",
	"serviceaccount-token-controller",
	"ttl-after-finished-controller",
	"root-ca-certificate-publisher-controller",
}

func startControllerManager(ctx context.Context, kubeconfig string, p *pkiFiles, node *nodeMode) (*component, error) {
	s, err := kcmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return nil, err
	}
	s.Generic.ClientConnection.Kubeconfig = kubeconfig
	s.Generic.ClientConnection.QPS = 200
	s.Generic.ClientConnection.Burst = 400
	s.Generic.Controllers = controllers
	if node != nil {
		s.Generic.Controllers = append(append([]string{}, controllers...), nodeControllers...)
	}
	s.Generic.LeaderElection.LeaderElect = false
	// Port 0 without a listener turns the controller manager's HTTPS
	// endpoint (healthz, metrics) off: nothing listens on :10257.
	s.SecureServing.BindPort = 0
	s.SAController.ServiceAccountKeyFile = p.saKeyFile
	s.SAController.RootCAFile = p.caCertFile
	s.ControllerShutdownTimeout = kcmStopTimeout
	s.Metrics = nil // see apiserver.go

	c, err := s.Config(ctx, kcmapp.KnownControllers(), kcmapp.ControllersDisabledByDefault(), kcmapp.ControllerAliases())
	if err != nil {
		return nil, err
	}
	return runComponent(func() error { return kcmapp.Run(ctx, c.Complete()) }), nil
}

// waitDefaultServiceAccount waits until the serviceaccount controller has
// created default/default.
func waitDefaultServiceAccount(ctx context.Context, kubeconfig string, kcm *component, timeout time.Duration) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		reqCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := client.CoreV1().ServiceAccounts(metav1.NamespaceDefault).Get(reqCtx, "default", metav1.GetOptions{})
		cancel()
		if err == nil {
			return nil
		}
		if !apierrors.IsNotFound(err) && ctx.Err() == nil {
			return fmt.Errorf("reading ServiceAccount default/default: %w", err)
		}
		select {
		case <-kcm.done:
			return fmt.Errorf("exited before the default ServiceAccount existed: %v", kcm.err)
		case <-ctx.Done():
			return errors.New("interrupted before ready")
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no ServiceAccount default/default after %s", timeout)
		}
	}
}
