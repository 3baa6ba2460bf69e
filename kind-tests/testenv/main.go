// main.go owns the command line, the start-up order, the stdout protocol and
// shutdown of testenv: a local Kubernetes control plane (embedded etcd,
// kube-apiserver, kube-controller-manager) in one process, for ContextOS's
// kind-tests. The same binary is also a multi-call `kubectl` (kubectl.go).
//
// Usage:
//
//	testenv DIR                 start the control plane with its state in DIR
//	testenv kubectl ARGS...     run kubectl (also when invoked as "kubectl")
//
// Protocol: once the control plane serves requests and the controllers run,
// exactly one line "READY <absolute path of DIR/kubeconfig>" goes to stdout.
// Logs go to stderr (errors only, unless TESTENV_LOG says otherwise). A start-up failure prints one
// line "testenv: <reason>" to stderr (as its last line) and exits 1.
// SIGTERM or SIGINT, or the death of the parent process, stops everything
// and exits 0 within a few seconds.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
)

// Per-phase bounds on shutdown; everything is in this process, so whatever
// is still running when they pass ends with the process.
const (
	kcmStopTimeout       = 2 * time.Second
	apiserverStopTimeout = 3 * time.Second
	etcdStopTimeout      = 2 * time.Second
)

func main() {
	if filepath.Base(os.Args[0]) == "kubectl" {
		runKubectl(os.Args[1:])
		return
	}
	if len(os.Args) >= 2 && os.Args[1] == "kubectl" {
		runKubectl(os.Args[2:])
		return
	}
	if len(os.Args) != 2 || os.Args[1] == "" || os.Args[1][0] == '-' {
		fmt.Fprintln(os.Stderr, "usage: testenv DIR | testenv kubectl ARGS...")
		os.Exit(2)
	}
	os.Exit(serve(os.Args[1]))
}

// fail prints the one-line start-up failure reason and returns exit code 1.
func fail(err error) int {
	klog.Flush()
	fmt.Fprintf(os.Stderr, "testenv: %v\n", oneLine(err))
	return 1
}

// serve runs the control plane until a signal arrives; it returns the exit code.
func serve(dirArg string) int {
	severity := configureLogs()

	dir, err := filepath.Abs(dirArg)
	if err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fail(err)
	}

	sigCtx, stopSignals := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stopSignals()
	// stopCtx ends on a signal, or when the parent process dies.
	stopCtx, stopNow := context.WithCancel(sigCtx)
	defer stopNow()
	go watchParent(stopCtx, stopNow)

	// The apiserver and the controller manager get their own contexts so
	// that shutdown can stop them in order: controllers first (they hold
	// watches open on the apiserver), then the apiserver, then etcd.
	apiCtx, stopAPI := context.WithCancel(context.Background())
	defer stopAPI()
	kcmCtx, stopKCM := context.WithCancel(context.Background())
	defer stopKCM()

	// Both components' own commands do this: the in-process clients would
	// otherwise log every deprecation warning the apiserver sends them.
	rest.SetDefaultWarningHandler(rest.NoWarnings{})

	etcd, err := startEtcd(filepath.Join(dir, "etcd"), severity)
	if err != nil {
		return fail(fmt.Errorf("etcd: %w", err))
	}
	closeEtcd := func() { waitFor(etcdStopTimeout, etcd.close) }

	node, err := nodeModeFromEnv()
	if err != nil {
		closeEtcd()
		return fail(err)
	}
	pki, err := writePKI(dir, node)
	if err != nil {
		closeEtcd()
		return fail(err)
	}

	api, err := startAPIServer(apiCtx, etcdClientURL(etcd), pki, node)
	if err != nil {
		closeEtcd()
		return fail(fmt.Errorf("kube-apiserver: %w", err))
	}

	abort := func(err error) int {
		stopAPI()
		<-waitChan(apiserverStopTimeout, api.done)
		closeEtcd()
		return fail(err)
	}

	if err := api.waitReady(stopCtx, 60*time.Second); err != nil {
		return abort(fmt.Errorf("kube-apiserver: %w", err))
	}

	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, api.url, pki); err != nil {
		return abort(err)
	}

	kcm, err := startControllerManager(kcmCtx, kubeconfig, pki, node)
	if err != nil {
		return abort(fmt.Errorf("kube-controller-manager: %w", err))
	}

	// READY means "usable": the serviceaccount controller has created the
	// default ServiceAccount, so pods can be admitted in "default".
	if err := waitDefaultServiceAccount(stopCtx, kubeconfig, kcm, 60*time.Second); err != nil {
		stopKCM()
		<-waitChan(kcmStopTimeout, kcm.done)
		return abort(fmt.Errorf("kube-controller-manager: %w", err))
	}

	if _, err := fmt.Fprintf(os.Stdout, "READY %s\n", kubeconfig); err != nil {
		return abort(err)
	}
	_ = os.Stdout.Sync()

	exit := 0
	select {
	case <-stopCtx.Done():
	case <-api.done:
		exit = fail(fmt.Errorf("kube-apiserver stopped: %v", api.err))
	case <-kcm.done:
		exit = fail(fmt.Errorf("kube-controller-manager stopped: %v", kcm.err))
	case err := <-etcd.Err():
		exit = fail(fmt.Errorf("etcd stopped: %v", err))
	}
	// A second signal skips the orderly shutdown.
	stopSignals()

	t0 := time.Now()
	stopKCM()
	<-waitChan(kcmStopTimeout, kcm.done)
	klog.InfoS("testenv: controller manager stopped", "after", time.Since(t0))
	stopAPI()
	<-waitChan(apiserverStopTimeout, api.done)
	klog.InfoS("testenv: apiserver stopped", "after", time.Since(t0))
	closeEtcd()
	klog.InfoS("testenv: etcd stopped", "after", time.Since(t0))
	klog.Flush()
	return exit
}

// configureLogs sets up klog, which all Kubernetes components log through.
// By default only errors reach stderr: at warning level a start prints some
// hundred lines of expected noise ("Skipping API ... because it has no
// resources", gRPC reconnects to etcd). TESTENV_LOG=warning shows warnings
// too, and TESTENV_LOG=<n> (a number) everything at klog verbosity n.
// It returns the chosen severity ("ERROR", "WARNING" or "INFO") for etcd's
// logger.
func configureLogs() string {
	threshold, verbosity := "ERROR", "0"
	switch level := os.Getenv("TESTENV_LOG"); level {
	case "", "error":
	case "warning":
		threshold = "WARNING"
	default:
		if _, err := strconv.ParseUint(level, 10, 8); err != nil {
			fmt.Fprintf(os.Stderr, "testenv: ignoring TESTENV_LOG=%q (error, warning or a number)\n", level)
			break
		}
		threshold, verbosity = "INFO", level
	}
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	for _, kv := range [][2]string{
		{"v", verbosity},
		{"logtostderr", "true"},
		{"legacy_stderr_threshold_behavior", "false"},
		{"stderrthreshold", threshold},
	} {
		if err := fs.Set(kv[0], kv[1]); err != nil {
			fmt.Fprintf(os.Stderr, "testenv: klog flag %s: %v\n", kv[0], err)
		}
	}
	return threshold
}

// watchParent calls stop when the process that started testenv has gone
// (this process was re-parented), so that a test harness killed with
// SIGKILL leaves no control plane behind. TESTENV_KEEP_ORPHAN=1 disables it.
func watchParent(ctx context.Context, stop func()) {
	if os.Getenv("TESTENV_KEEP_ORPHAN") == "1" {
		return
	}
	parent := os.Getppid()
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(500 * time.Millisecond):
		}
		if os.Getppid() != parent {
			klog.Warning("testenv: parent process gone, shutting down")
			stop()
			return
		}
	}
}

// waitChan closes the returned channel when done is closed or after d.
func waitChan(d time.Duration, done <-chan struct{}) <-chan struct{} {
	out := make(chan struct{})
	go func() {
		defer close(out)
		select {
		case <-done:
		case <-time.After(d):
		}
	}()
	return out
}

// waitFor runs f and waits for it at most d.
func waitFor(d time.Duration, f func()) {
	done := make(chan struct{})
	go func() { defer close(done); f() }()
	<-waitChan(d, done)
}

// oneLine flattens an error message to a single line.
func oneLine(err error) string {
	if err == nil {
		err = errors.New("unknown error")
	}
	b := []byte(err.Error())
	for i, c := range b {
		if c == '\n' || c == '\r' {
			b[i] = ' '
		}
	}
	return string(b)
}
