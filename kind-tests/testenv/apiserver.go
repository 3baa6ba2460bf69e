// apiserver.go owns kube-apiserver, run in-process: its flags, its listener
// (127.0.0.1, port chosen by the kernel and handed over, so there is no
// port race), and the /readyz wait.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/spf13/pflag"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	apiapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	apioptions "k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

// component is a server running in a goroutine of this process.
type component struct {
	done chan struct{} // closed when it has returned
	err  error         // what it returned; read only after done is closed
}

func runComponent(run func() error) *component {
	c := &component{done: make(chan struct{})}
	go func() {
		defer close(c.done)
		c.err = run()
	}()
	return c
}

type apiServer struct {
	*component
	url    string
	token  string
	client *http.Client
}

// apiserverFlags are the kube-apiserver flags used; everything not set here
// keeps the kube-apiserver default (notably the default admission plugins,
// which include PodSecurity and ValidatingAdmissionPolicy).
func apiserverFlags(etcdURL string, p *pkiFiles, node *nodeMode) []string {
	// The loopback address cannot be an Endpoints address: without a node
	// nothing reaches the apiserver through its Service.
	reconciler := "none"
	if node != nil {
		reconciler = "lease"
	}
	return []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=" + node.listenAddress(),
		"--advertise-address=" + node.listenAddress(),
		"--endpoint-reconciler-type=" + reconciler,
		"--service-cluster-ip-range=" + serviceClusterIPRange,
		"--tls-cert-file=" + p.tlsCertFile,
		"--tls-private-key-file=" + p.tlsKeyFile,
		"--client-ca-file=" + p.caCertFile,
		"--token-auth-file=" + p.tokensFile,
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.saKeyFile,
		"--service-account-signing-key-file=" + p.saKeyFile,
		// As kind and kubeadm clusters do; a privileged pod is then
		// refused by PodSecurity (namespace labels), not by validation.
		"--allow-privileged=true",
		"--profiling=false",
	}
}

func startAPIServer(ctx context.Context, etcdURL string, p *pkiFiles, node *nodeMode) (*apiServer, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(node.listenAddress(), "0"))
	if err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port

	s := apioptions.NewServerRunOptions()
	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	for _, f := range s.Flags().FlagSets {
		fs.AddFlagSet(f)
	}
	args := append(apiserverFlags(etcdURL, p, node), fmt.Sprintf("--secure-port=%d", port))
	if err := fs.Parse(args); err != nil {
		ln.Close()
		return nil, err
	}
	s.SecureServing.Listener = ln
	// Default metrics options only log an error at every start (about an
	// empty label allow-list); nil options apply nothing, without that.
	s.Metrics = nil

	// As the kube-apiserver command does before running: apply emulation
	// version and feature gates (the defaults here) to the global registry.
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		ln.Close()
		return nil, err
	}
	completed, err := s.Complete(ctx)
	if err != nil {
		ln.Close()
		return nil, err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		ln.Close()
		return nil, utilerrors.NewAggregate(errs)
	}

	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(p.caCert) {
		ln.Close()
		return nil, errors.New("cannot parse own CA certificate")
	}
	return &apiServer{
		component: runComponent(func() error { return apiapp.Run(ctx, completed) }),
		url:       "https://" + net.JoinHostPort(node.listenAddress(), fmt.Sprint(port)),
		token:     p.adminToken,
		// Verifies the serving certificate against the CA the kubeconfig
		// will carry: /readyz passing also proves the TLS set-up.
		client: &http.Client{
			Timeout: 5 * time.Second,
			Transport: &http.Transport{
				TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: node.listenAddress()},
			},
		},
	}, nil
}

// waitReady polls /readyz until it answers 200.
func (a *apiServer) waitReady(ctx context.Context, timeout time.Duration) error {
	defer a.client.CloseIdleConnections()
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.url+"/readyz", nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+a.token)
		resp, err := a.client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("/readyz %d: %s", resp.StatusCode, lastLines(body))
		} else {
			last = err.Error()
		}
		select {
		case <-a.done:
			return fmt.Errorf("exited before ready: %v", a.err)
		case <-ctx.Done():
			return errors.New("interrupted before ready")
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %s (%s)", timeout, last)
		}
	}
}

// lastLines keeps the failing checks of a verbose /readyz answer.
func lastLines(b []byte) string {
	var out []byte
	start := 0
	for i := 0; i <= len(b); i++ {
		if i == len(b) || b[i] == '\n' {
			line := b[start:i]
			if bytes.HasPrefix(line, []byte("[-]")) {
				out = append(append(out, line...), ' ')
			}
			start = i + 1
		}
	}
	if len(out) == 0 {
		return string(b)
	}
	return string(out)
}
