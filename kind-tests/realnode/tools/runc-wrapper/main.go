// runc-wrapper sits between containerd's runc shim and the real runc (set as
// the CRI runtime's BinaryName). On `create` and `run` it clamps the bundle's
// process.oomScoreAdj to >= 0 before exec'ing runc, because this VM withholds
// CAP_SYS_RESOURCE: writing a negative oom_score_adj fails, and the kubelet
// asks for -998 on every pod sandbox (runc then dies with "can't get final
// child's PID from pipe: EOF"). Every other call is passed through unchanged.
// Built a second time (runsc-wrapper) in front of gVisor's runsc, whose CLI is runc's, for the
// same reason.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// realRunc can be changed with -ldflags "-X main.realRunc=/path"; a name without a slash is
// looked for in the wrapper's own directory.
var realRunc = "/usr/sbin/runc"

// runc's global flags that take a value (runc 1.1).
var globalWithValue = map[string]bool{
	"--root": true, "--log": true, "--log-format": true, "--criu": true, "--rootless": true,
}

func main() {
	args := os.Args[1:]
	if err := maybeClamp(args); err != nil {
		fmt.Fprintf(os.Stderr, "runc-wrapper: %v\n", err)
		os.Exit(1)
	}
	real := realRunc
	if !strings.Contains(real, "/") {
		self, err := os.Executable()
		if err != nil {
			fmt.Fprintf(os.Stderr, "runc-wrapper: cannot find its own directory: %v\n", err)
			os.Exit(127)
		}
		real = filepath.Join(filepath.Dir(self), real)
	}
	argv := append([]string{real}, args...)
	err := syscall.Exec(real, argv, os.Environ())
	fmt.Fprintf(os.Stderr, "runc-wrapper: exec %s: %v\n", real, err)
	os.Exit(127)
}

func maybeClamp(args []string) error {
	i := 0
	for i < len(args) {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			break
		}
		if globalWithValue[a] {
			i++
		}
		i++
	}
	if i >= len(args) || (args[i] != "create" && args[i] != "run") {
		return nil
	}
	bundle := "."
	for j := i + 1; j < len(args); j++ {
		a := args[j]
		switch {
		case a == "--bundle" || a == "-b":
			if j+1 < len(args) {
				bundle = args[j+1]
			}
		case strings.HasPrefix(a, "--bundle="):
			bundle = strings.TrimPrefix(a, "--bundle=")
		case strings.HasPrefix(a, "-b="):
			bundle = strings.TrimPrefix(a, "-b=")
		}
	}
	path := filepath.Join(bundle, "config.json")
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var spec map[string]any
	if err := json.Unmarshal(data, &spec); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	proc, ok := spec["process"].(map[string]any)
	if !ok {
		return nil
	}
	v, ok := proc["oomScoreAdj"].(float64)
	if !ok || v >= 0 {
		return nil
	}
	proc["oomScoreAdj"] = 0
	out, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	tmp := path + ".clamp"
	if err := os.WriteFile(tmp, out, st.Mode().Perm()); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
