package main

// Certificates and kubeconfigs for the dev cluster. Everything is written as
// files under the cluster directory, and kubeconfigs reference those files
// (no inline data), so clients never need temporary copies.

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

const certValidity = 5 * 365 * 24 * time.Hour

type keyPair struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
}

func writePEM(path, kind string, der []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), mode)
}

func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func loadPair(certPath, keyPath string) (*keyPair, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, err
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, fmt.Errorf("%s or %s is not PEM", certPath, keyPath)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, err
	}
	key, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, err
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, errors.New("CA key cannot sign")
	}
	return &keyPair{cert: cert, key: signer}, nil
}

// ensureCA loads the cluster CA or creates it on first use.
func ensureCA(pkiDir string) (*keyPair, error) {
	return ensureNamedCA(pkiDir, "ca", "kubelet-emu-devcluster-ca")
}

// ensureNamedCA loads pki/<stem>.crt and .key or creates a CA with that common name.
func ensureNamedCA(pkiDir, stem, cn string) (*keyPair, error) {
	certPath, keyPath := filepath.Join(pkiDir, stem+".crt"), filepath.Join(pkiDir, stem+".key")
	if _, err := os.Stat(certPath); err == nil {
		return loadPair(certPath, keyPath)
	}
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          sn,
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(certValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	if err := writeKey(keyPath, key); err != nil {
		return nil, err
	}
	if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return nil, err
	}
	return loadPair(certPath, keyPath)
}

type certSpec struct {
	name   string // file stem under pki/
	cn     string
	orgs   []string
	server bool
	dns    []string
	ips    []net.IP
}

// issue writes pki/<name>.crt and .key signed by the CA, unless they exist.
func issue(pkiDir string, ca *keyPair, spec certSpec) (certPath, keyPath string, err error) {
	certPath, keyPath = filepath.Join(pkiDir, spec.name+".crt"), filepath.Join(pkiDir, spec.name+".key")
	if _, err := os.Stat(certPath); err == nil {
		return certPath, keyPath, nil
	}
	key, err := newKey()
	if err != nil {
		return "", "", err
	}
	sn, err := serial()
	if err != nil {
		return "", "", err
	}
	usage := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if spec.server {
		usage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn,
		Subject:      pkix.Name{CommonName: spec.cn, Organization: spec.orgs},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(certValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  usage,
		DNSNames:     spec.dns,
		IPAddresses:  spec.ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return "", "", err
	}
	if err := writeKey(keyPath, key); err != nil {
		return "", "", err
	}
	return certPath, keyPath, writePEM(certPath, "CERTIFICATE", der, 0o644)
}

// ensureServiceAccountKey writes the key pair that signs service-account tokens.
func ensureServiceAccountKey(pkiDir string) (string, string, error) {
	keyPath, pubPath := filepath.Join(pkiDir, "sa.key"), filepath.Join(pkiDir, "sa.pub")
	if _, err := os.Stat(keyPath); err == nil {
		return keyPath, pubPath, nil
	}
	key, err := newKey()
	if err != nil {
		return "", "", err
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", err
	}
	if err := writePEM(keyPath, "EC PRIVATE KEY", der, 0o600); err != nil {
		return "", "", err
	}
	pub, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return "", "", err
	}
	return keyPath, pubPath, writePEM(pubPath, "PUBLIC KEY", pub, 0o644)
}

func writeKubeconfig(path, server, caPath, certPath, keyPath, user string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["devcluster"] = &clientcmdapi.Cluster{Server: server, CertificateAuthority: caPath}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificate: certPath, ClientKey: keyPath}
	cfg.Contexts["devcluster"] = &clientcmdapi.Context{Cluster: "devcluster", AuthInfo: user}
	cfg.CurrentContext = "devcluster"
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return clientcmd.WriteToFile(*cfg, path)
}

// nodeKubeconfig mints a node identity (CN system:node:<name>, O system:nodes)
// and returns the path of its kubeconfig.
func nodeKubeconfig(dir, server, node string) (string, error) {
	pkiDir := filepath.Join(dir, "pki")
	ca, err := ensureCA(pkiDir)
	if err != nil {
		return "", err
	}
	certPath, keyPath, err := issue(pkiDir, ca, certSpec{
		name: "node-" + node, cn: "system:node:" + node, orgs: []string{"system:nodes"},
	})
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "nodes", node+".kubeconfig")
	return path, writeKubeconfig(path, server, filepath.Join(pkiDir, "ca.crt"), certPath, keyPath, "system:node:"+node)
}

func readServer(kubeconfig string) (string, error) {
	cfg, err := clientcmd.LoadFromFile(kubeconfig)
	if err != nil {
		return "", err
	}
	for _, c := range cfg.Clusters {
		return c.Server, nil
	}
	return "", fmt.Errorf("%s names no cluster", kubeconfig)
}
