package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/pflag"
	"go.etcd.io/etcd/server/v3/embed"

	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	cmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	cmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
	schedapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	schedoptions "k8s.io/kubernetes/cmd/kube-scheduler/app/options"
)

// clusterState is written to DIR/cluster.json once every component started,
// so that the Python side (and node-kubeconfig) can find the cluster.
type clusterState struct {
	Server          string `json:"server"`
	AdminKubeconfig string `json:"admin_kubeconfig"`
	CACert          string `json:"ca_cert"`
	EtcdURL         string `json:"etcd_url"`
	Pid             int    `json:"pid"`
}

const serviceCIDR = "10.96.0.0/16"

// clusterCIDR is split into one /24 per node by the controller-manager; test sessions pick their
// own so that two dev clusters on one host never hand the same pod CIDR to their nodes.
var clusterCIDR = "10.244.0.0/16"

// repeated collects the values of a flag given several times.
type repeated []string

func (r *repeated) String() string     { return fmt.Sprint(*r) }
func (r *repeated) Set(v string) error { *r = append(*r, v); return nil }

func readState(dir string) (*clusterState, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "cluster.json"))
	if err != nil {
		return nil, fmt.Errorf("no dev cluster in %s (run `up` first): %w", dir, err)
	}
	var s clusterState
	return &s, json.Unmarshal(raw, &s)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func freePorts(n int) ([]int, error) {
	ports := make([]int, n)
	for i := range ports {
		p, err := freePort()
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	return ports, nil
}

func up(args []string) error {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	dir := fs.String("dir", "", "cluster directory (certificates, etcd data, kubeconfigs)")
	port := fs.Int("port", 6443, "kube-apiserver secure port on 127.0.0.1")
	grace := fs.Duration("node-monitor-grace-period", 50*time.Second, "how long the node lifecycle controller waits before marking a silent node Unknown")
	fs.StringVar(&clusterCIDR, "cluster-cidr", clusterCIDR, "range the controller-manager splits into one /24 pod CIDR per node")
	var apiserverArgs repeated
	fs.Var(&apiserverArgs, "apiserver-arg", "one more kube-apiserver flag (--name=value), after the built-in ones; repeatable")
	schedQPS := fs.Float64("scheduler-qps", 0, "kube-scheduler's client QPS (burst twice that); 0 keeps its default of 50 (benchmarks binding thousands of Pods raise it)")
	signing := fs.Duration("cluster-signing-duration", 365*24*time.Hour, "lifetime of the certificates the controller-manager signs for CSRs (short values for rotation tests)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("up needs --dir DIR")
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	*dir = abs
	_ = os.Remove(filepath.Join(*dir, "cluster.json"))

	ports, err := freePorts(4)
	if err != nil {
		return err
	}
	etcdClient, etcdPeer, schedPort, cmPort := ports[0], ports[1], ports[2], ports[3]
	server := fmt.Sprintf("https://127.0.0.1:%d", *port)

	p, err := writePKI(*dir, server)
	if err != nil {
		return fmt.Errorf("certificates: %w", err)
	}

	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
	etcd, err := startEtcd(filepath.Join(*dir, "etcd"), etcdURL, fmt.Sprintf("http://127.0.0.1:%d", etcdPeer))
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer etcd.Close()

	apiCmd := apiserverapp.NewAPIServerCommand()
	ctx := apiCmd.Context() // the process's one signal context (SIGTERM/SIGINT)
	apiCmd.SetArgs(append([]string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(*port),
		"--endpoint-reconciler-type=none", // 127.0.0.1 is not a valid Endpoints address
		"--tls-cert-file=" + p.apiserverCert, "--tls-private-key-file=" + p.apiserverKey,
		"--client-ca-file=" + p.caCert,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.saPub,
		"--service-account-signing-key-file=" + p.saKey,
		"--service-cluster-ip-range=" + serviceCIDR,
		"--authorization-mode=Node,RBAC",
		// As kubeadm: bootstrap tokens authenticate joining nodes, and anonymous requests may
		// read what RBAC grants system:anonymous (only kube-public/cluster-info).
		"--enable-bootstrap-token-auth=true",
		"--anonymous-auth=true",
		"--enable-admission-plugins=NodeRestriction,RuntimeClass",
		"--kubelet-client-certificate=" + p.kubeletClientCert, "--kubelet-client-key=" + p.kubeletClientKey,
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		"--allow-privileged=true",
		"--profiling=false",
		"--cert-dir=" + filepath.Join(*dir, "pki", "apiserver-generated"),
		// The aggregation layer (APIService objects, e.g. metrics.k8s.io for `kubectl top`).
		"--requestheader-client-ca-file=" + p.frontProxyCACert,
		"--requestheader-allowed-names=" + frontProxyClientName,
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file=" + p.frontProxyClientCert, "--proxy-client-key-file=" + p.frontProxyClientKey,
		// Dial an aggregated API at its endpoints (an address on this host), never at its Service's
		// ClusterIP: with no kube-proxy here a ClusterIP is routed off the machine.
		"--enable-aggregator-routing=true",
	}, apiserverArgs...))
	apiErr := make(chan error, 1)
	go func() { apiErr <- apiCmd.Execute() }()

	if err := waitReady(ctx, p, apiErr); err != nil {
		return err
	}

	if err := bootstrapObjects(ctx, p.adminKubeconfig, server, p.caCert); err != nil {
		return fmt.Errorf("bootstrap objects: %w", err)
	}

	compErr := make(chan error, 2)
	go func() { compErr <- runScheduler(ctx, p.schedulerKubeconfig, schedPort, *schedQPS) }()
	go func() { compErr <- runControllerManager(ctx, p, cmPort, *grace, *signing) }()

	state := clusterState{Server: server, AdminKubeconfig: p.adminKubeconfig, CACert: p.caCert, EtcdURL: etcdURL, Pid: os.Getpid()}
	raw, _ := json.MarshalIndent(state, "", "  ")
	if err := os.WriteFile(filepath.Join(*dir, "cluster.json"), raw, 0o644); err != nil {
		return err
	}
	fmt.Printf("devcluster: ready at %s, admin kubeconfig %s\n", server, p.adminKubeconfig)

	select {
	case err := <-apiErr:
		return err
	case err := <-compErr:
		if ctx.Err() != nil {
			return <-apiErr
		}
		return err
	}
}

func startEtcd(dataDir, clientURL, peerURL string) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "devcluster"
	cfg.Dir = dataDir
	cu, _ := url.Parse(clientURL)
	pu, _ := url.Parse(peerURL)
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "error"
	// A throwaway cluster: skip fsync so Pod churn is not disk bound.
	cfg.UnsafeNoFsync = true
	// Benchmarks churn tens of thousands of Pods; etcd's 2 GiB default quota fills up (it counts
	// space freed by compaction until a defragmentation) and then refuses every write.
	cfg.QuotaBackendBytes = 8 << 30
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("etcd did not become ready within 60s")
	}
}

func parseInto(fs *pflag.FlagSet, args []string) error {
	fs.ParseErrorsAllowlist.UnknownFlags = false
	return fs.Parse(args)
}

func runScheduler(ctx context.Context, kubeconfig string, port int, qps float64) error {
	opts := schedoptions.NewOptions()
	fs := pflag.NewFlagSet("kube-scheduler", pflag.ContinueOnError)
	for _, f := range opts.Flags.FlagSets {
		fs.AddFlagSet(f)
	}
	var extra []string
	if qps > 0 { // the deprecated flags are the only way short of a config file
		extra = append(extra, fmt.Sprintf("--kube-api-qps=%g", qps), fmt.Sprintf("--kube-api-burst=%d", int(2*qps)))
	}
	if err := parseInto(fs, append([]string{
		"--kubeconfig=" + kubeconfig,
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--authentication-skip-lookup=true",
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
	}, extra...)); err != nil {
		return err
	}
	cc, sched, err := schedapp.Setup(ctx, opts)
	if err != nil {
		return fmt.Errorf("kube-scheduler: %w", err)
	}
	return schedapp.Run(ctx, cc, sched)
}

func runControllerManager(ctx context.Context, p *pkiPaths, port int, grace, signing time.Duration) error {
	s, err := cmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return err
	}
	fs := pflag.NewFlagSet("kube-controller-manager", pflag.ContinueOnError)
	for _, f := range s.Flags(cmapp.KnownControllers(), cmapp.ControllersDisabledByDefault(), cmapp.ControllerAliases()).FlagSets {
		fs.AddFlagSet(f)
	}
	if err := parseInto(fs, []string{
		"--kubeconfig=" + p.cmKubeconfig,
		"--authentication-kubeconfig=" + p.cmKubeconfig,
		"--authorization-kubeconfig=" + p.cmKubeconfig,
		"--authentication-skip-lookup=true",
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--allocate-node-cidrs=true",
		"--cluster-cidr=" + clusterCIDR,
		"--node-cidr-mask-size=24",
		"--service-cluster-ip-range=" + serviceCIDR,
		"--root-ca-file=" + p.caCert,
		"--service-account-private-key-file=" + p.saKey,
		"--use-service-account-credentials=true",
		"--cluster-signing-cert-file=" + p.caCert,
		"--cluster-signing-key-file=" + p.caKey,
		"--node-monitor-grace-period=" + grace.String(),
		"--cluster-signing-duration=" + signing.String(),
		// kubeadm turns these on (they are off by default): sign cluster-info with each bootstrap
		// token, and delete expired tokens.
		"--controllers=*,bootstrapsigner,tokencleaner",
	}); err != nil {
		return err
	}
	c, err := s.Config(ctx, cmapp.KnownControllers(), cmapp.ControllersDisabledByDefault(), cmapp.ControllerAliases())
	if err != nil {
		return fmt.Errorf("kube-controller-manager: %w", err)
	}
	return cmapp.Run(ctx, c.Complete())
}
