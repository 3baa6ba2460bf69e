// realnode-cri is the realnode prototype's minimal CRI client (no crictl on
// the machine): it lists pod sandboxes and containers, and tears all of them
// down through the CRI, so that containerd runs the CNI DEL, removes the
// network namespaces and the shims exit, before stop.sh stops containerd.
//
//	realnode-cri -endpoint unix:///path/containerd.sock ps
//	realnode-cri -endpoint unix:///path/containerd.sock rmp-all
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	cri "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func main() {
	endpoint := flag.String("endpoint", "", "unix:///path/to/containerd.sock")
	timeout := flag.Duration("timeout", 60*time.Second, "overall timeout")
	flag.Parse()
	if *endpoint == "" || flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: realnode-cri -endpoint unix:///sock ps|rmp-all")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	target := *endpoint
	if !strings.HasPrefix(target, "unix://") {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	rt := cri.NewRuntimeServiceClient(conn)
	switch flag.Arg(0) {
	case "ps":
		err = ps(ctx, rt)
	case "rmp-all":
		err = removeAll(ctx, rt)
	default:
		err = fmt.Errorf("unknown command %q", flag.Arg(0))
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "realnode-cri: %v\n", err)
	os.Exit(1)
}

func ps(ctx context.Context, rt cri.RuntimeServiceClient) error {
	pods, err := rt.ListPodSandbox(ctx, &cri.ListPodSandboxRequest{})
	if err != nil {
		return err
	}
	for _, p := range pods.Items {
		fmt.Printf("sandbox %s %s/%s %s\n", p.Id[:12], p.Metadata.Namespace, p.Metadata.Name, p.State)
	}
	ctrs, err := rt.ListContainers(ctx, &cri.ListContainersRequest{})
	if err != nil {
		return err
	}
	for _, c := range ctrs.Containers {
		fmt.Printf("container %s %s pod=%s %s\n", c.Id[:12], c.Metadata.Name, c.PodSandboxId[:12], c.State)
	}
	return nil
}

// removeAll stops and removes every container, then every pod sandbox
// (StopPodSandbox runs the CNI DEL and removes the sandbox's netns).
func removeAll(ctx context.Context, rt cri.RuntimeServiceClient) error {
	ctrs, err := rt.ListContainers(ctx, &cri.ListContainersRequest{})
	if err != nil {
		return err
	}
	var errs []string
	for _, c := range ctrs.Containers {
		if _, err := rt.StopContainer(ctx, &cri.StopContainerRequest{ContainerId: c.Id, Timeout: 0}); err != nil {
			errs = append(errs, fmt.Sprintf("stop container %s: %v", c.Id[:12], err))
		}
		if _, err := rt.RemoveContainer(ctx, &cri.RemoveContainerRequest{ContainerId: c.Id}); err != nil {
			errs = append(errs, fmt.Sprintf("remove container %s: %v", c.Id[:12], err))
		}
	}
	pods, err := rt.ListPodSandbox(ctx, &cri.ListPodSandboxRequest{})
	if err != nil {
		return err
	}
	for _, p := range pods.Items {
		if _, err := rt.StopPodSandbox(ctx, &cri.StopPodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			errs = append(errs, fmt.Sprintf("stop sandbox %s: %v", p.Id[:12], err))
		}
		if _, err := rt.RemovePodSandbox(ctx, &cri.RemovePodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			errs = append(errs, fmt.Sprintf("remove sandbox %s: %v", p.Id[:12], err))
		}
	}
	fmt.Printf("removed %d containers, %d sandboxes\n", len(ctrs.Containers), len(pods.Items))
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}
