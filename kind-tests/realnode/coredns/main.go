// Command coredns is CoreDNS with only the plugins the real node's cluster DNS
// uses: the kubernetes plugin answers for cluster.local from the apiserver;
// nothing is forwarded (pod traffic never leaves the machine), so names
// outside the cluster do not resolve. Building CoreDNS this way, instead of
// its own main package, keeps the cloud-provider plugins (and their SDKs) out
// of the build.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	// The order plugins run in, as in CoreDNS's own plugin.cfg.
	dnsserver.Directives = []string{
		"ready",
		"health",
		"errors",
		"log",
		"loadbalance",
		"cache",
		"kubernetes",
	}
}

func main() {
	coremain.Run()
}
