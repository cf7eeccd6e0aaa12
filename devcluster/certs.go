package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// frontProxyClientName is the one common name the API server accepts request headers from.
const frontProxyClientName = "front-proxy-client"

type pkiPaths struct {
	caCert, caKey                       string
	apiserverCert, apiserverKey         string
	kubeletClientCert, kubeletClientKey string
	saKey, saPub                        string
	adminKubeconfig                     string
	schedulerKubeconfig, cmKubeconfig   string
	adminCert, adminKey                 string
	// The aggregation layer: the API server proxies to aggregated APIs (metrics-server) with the
	// front-proxy client certificate, from a CA of its own as kubeadm makes it, so that no other
	// cluster certificate can assert X-Remote-User.
	frontProxyCACert                          string
	frontProxyClientCert, frontProxyClientKey string
}

// writePKI creates (or reuses) every certificate and kubeconfig the control
// plane and its clients need.
func writePKI(dir, server string) (*pkiPaths, error) {
	pkiDir := filepath.Join(dir, "pki")
	ca, err := ensureCA(pkiDir)
	if err != nil {
		return nil, err
	}
	p := &pkiPaths{caCert: filepath.Join(pkiDir, "ca.crt"), caKey: filepath.Join(pkiDir, "ca.key")}
	host, _ := os.Hostname()
	if p.apiserverCert, p.apiserverKey, err = issue(pkiDir, ca, certSpec{
		name: "apiserver", cn: "kube-apiserver", server: true,
		dns: []string{"localhost", host, "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		ips: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")},
	}); err != nil {
		return nil, err
	}
	// The apiserver's identity toward kubelets (logs, exec, port-forward).
	if p.kubeletClientCert, p.kubeletClientKey, err = issue(pkiDir, ca, certSpec{
		name: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"},
	}); err != nil {
		return nil, err
	}
	if p.saKey, p.saPub, err = ensureServiceAccountKey(pkiDir); err != nil {
		return nil, err
	}
	frontProxyCA, err := ensureNamedCA(pkiDir, "front-proxy-ca", "kubelet-emu-devcluster-front-proxy-ca")
	if err != nil {
		return nil, err
	}
	p.frontProxyCACert = filepath.Join(pkiDir, "front-proxy-ca.crt")
	if p.frontProxyClientCert, p.frontProxyClientKey, err = issue(pkiDir, frontProxyCA, certSpec{
		name: "front-proxy-client", cn: frontProxyClientName,
	}); err != nil {
		return nil, err
	}
	// metrics-server (started by `up --metrics-server` on the Python side): a client identity for
	// its kubeconfig, and a serving certificate for the name the aggregator dials it by.
	if _, _, err = issue(pkiDir, ca, certSpec{
		name: "metrics-server-serving", cn: "metrics-server", server: true,
		dns: []string{"metrics-server.kube-system.svc", "metrics-server.kube-system.svc.cluster.local", "localhost"},
		ips: []net.IP{net.ParseIP("127.0.0.1")},
	}); err != nil {
		return nil, err
	}
	clients := []struct {
		name, cn, org string
		out           *string
	}{
		{"admin", "kubernetes-admin", "system:masters", &p.adminKubeconfig},
		{"kube-scheduler", "system:kube-scheduler", "", &p.schedulerKubeconfig},
		{"kube-controller-manager", "system:kube-controller-manager", "", &p.cmKubeconfig},
		{"metrics-server", "system:metrics-server", "", new(string)},
	}
	for _, c := range clients {
		var orgs []string
		if c.org != "" {
			orgs = []string{c.org}
		}
		certPath, keyPath, err := issue(pkiDir, ca, certSpec{name: c.name, cn: c.cn, orgs: orgs})
		if err != nil {
			return nil, err
		}
		if c.name == "admin" {
			p.adminCert, p.adminKey = certPath, keyPath
		}
		*c.out = filepath.Join(dir, c.name+".kubeconfig")
		if err := writeKubeconfig(*c.out, server, p.caCert, certPath, keyPath, c.cn); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// waitReady polls /readyz with the admin identity until the apiserver answers.
func waitReady(ctx context.Context, p *pkiPaths, apiErr <-chan error) error {
	caPEM, err := os.ReadFile(p.caCert)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(p.adminCert, p.adminKey)
	if err != nil {
		return err
	}
	// Under an emulated CPU (the cgroup v2 lane's VM) one TLS request can take several seconds.
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
	}}
	server, err := readServer(p.adminKubeconfig)
	if err != nil {
		return err
	}
	wait := readyTimeout()
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		select {
		case err := <-apiErr:
			return fmt.Errorf("kube-apiserver exited: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		resp, err := client.Get(server + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
	}
	return fmt.Errorf("kube-apiserver not ready after %s", wait)
}

// readyTimeout is 120s, or KUBELET_EMU_DEVCLUSTER_READY_TIMEOUT seconds (manage.py reads the same).
func readyTimeout() time.Duration {
	if s, err := strconv.ParseFloat(os.Getenv("KUBELET_EMU_DEVCLUSTER_READY_TIMEOUT"), 64); err == nil && s > 0 {
		return time.Duration(s * float64(time.Second))
	}
	return 120 * time.Second
}
