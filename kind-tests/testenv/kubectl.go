// kubectl.go owns the multi-call mode: `testenv kubectl ARGS...`, or the
// binary invoked under the name "kubectl", runs the real kubectl of the same
// Kubernetes version (k8s.io/kubectl), as cmd/kubectl's main does.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"

	// Client auth plugins (exec, OIDC), as in the kubectl binary.
	_ "k8s.io/client-go/plugin/pkg/client/auth"
)

func runKubectl(args []string) {
	// kubectl reads its arguments (and looks up plugins) from os.Args.
	os.Args = append([]string{"kubectl"}, args...)
	_, _ = logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args))
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err) // prints the error and exits non-zero
	}
	os.Exit(0)
}
