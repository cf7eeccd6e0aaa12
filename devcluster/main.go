// devcluster runs a real Kubernetes control plane for kubelet-emu's tests and
// demo: embedded etcd, kube-apiserver, kube-scheduler and
// kube-controller-manager in one process on 127.0.0.1. The same binary is
// also kubectl (as `devcluster kubectl ...` or when invoked as "kubectl").
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
)

const usage = `usage:
  devcluster up --dir DIR [--port N] [--node-monitor-grace-period DURATION] [--cluster-signing-duration DURATION]
                [--apiserver-arg=--flag=value ...]
  devcluster token-create --dir DIR [--ttl DURATION]   (prints the join command)
  devcluster node-kubeconfig --dir DIR NODE
  devcluster kubectl [kubectl args...]      (or invoke this binary as "kubectl")
`

func main() {
	if filepath.Base(os.Args[0]) == "kubectl" {
		runKubectl(os.Args[1:])
		return
	}
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "kubectl":
		runKubectl(os.Args[2:])
		return
	case "up":
		err = up(os.Args[2:])
	case "node-kubeconfig":
		err = nodeKubeconfigCmd(os.Args[2:])
	case "token-create":
		err = tokenCreateCmd(os.Args[2:])
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "devcluster: %v\n", err)
		os.Exit(1)
	}
}

func runKubectl(args []string) {
	os.Args = append([]string{"kubectl"}, args...)
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) //nolint:errcheck
	if err := cli.RunNoErrOutput(kubectlcmd.NewDefaultKubectlCommand()); err != nil {
		kubectlutil.CheckErr(err)
	}
}

func nodeKubeconfigCmd(args []string) error {
	var dir, node string
	for i := 0; i < len(args); i++ {
		switch {
		case args[i] == "--dir" && i+1 < len(args):
			i++
			dir = args[i]
		case strings.HasPrefix(args[i], "--dir="):
			dir = strings.TrimPrefix(args[i], "--dir=")
		default:
			node = args[i]
		}
	}
	if dir == "" || node == "" {
		return fmt.Errorf("node-kubeconfig needs --dir DIR and a NODE name")
	}
	if errs := validation.IsDNS1123Subdomain(node); len(errs) > 0 {
		return fmt.Errorf("node name %q is not valid: %s", node, strings.Join(errs, "; "))
	}
	state, err := readState(dir)
	if err != nil {
		return err
	}
	path, err := nodeKubeconfig(dir, state.Server, node)
	if err != nil {
		return err
	}
	fmt.Println(path)
	return nil
}
