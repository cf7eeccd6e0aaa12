package main

// What makes the dev cluster join-able the way a kubeadm cluster is: the cluster-info ConfigMap
// in kube-public (readable anonymously, signed by the bootstrapsigner controller with each
// bootstrap token), kubeadm's RBAC for TLS bootstrap and CSR auto-approval, and bootstrap tokens.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

const (
	clusterInfoRole    = "kubeadm:bootstrap-signer-clusterinfo"
	bootstrappersGroup = "system:bootstrappers"
	tokenExtraGroup    = "system:bootstrappers:kubeadm:default-node-token"
)

func adminClient(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

// clusterInfoKubeconfig is what kubeadm puts in cluster-info: the server and the CA, no user.
func clusterInfoKubeconfig(server, caPath string) (string, error) {
	ca, err := os.ReadFile(caPath)
	if err != nil {
		return "", err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[""] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	raw, err := clientcmd.Write(*cfg)
	return string(raw), err
}

// bootstrapObjects creates (or brings up to date) cluster-info and kubeadm's bootstrap RBAC.
// Objects a person removed on purpose in a running cluster come back at the next `up` only.
func bootstrapObjects(ctx context.Context, adminKubeconfig, server, caPath string) error {
	cs, err := adminClient(adminKubeconfig)
	if err != nil {
		return err
	}
	kubeconfig, err := clusterInfoKubeconfig(server, caPath)
	if err != nil {
		return err
	}
	// kube-public is made by the API server shortly after it is ready.
	deadline := time.Now().Add(60 * time.Second)
	for {
		_, err = cs.CoreV1().Namespaces().Get(ctx, metav1.NamespacePublic, metav1.GetOptions{})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("namespace kube-public: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	cms := cs.CoreV1().ConfigMaps(metav1.NamespacePublic)
	cm, err := cms.Get(ctx, "cluster-info", metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: "cluster-info", Namespace: metav1.NamespacePublic},
			Data:       map[string]string{"kubeconfig": kubeconfig},
		}, metav1.CreateOptions{})
	case err == nil && cm.Data["kubeconfig"] != kubeconfig:
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data["kubeconfig"] = kubeconfig // the bootstrapsigner signs it again
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("configmap kube-public/cluster-info: %w", err)
	}

	rbac := cs.RbacV1()
	_, err = rbac.Roles(metav1.NamespacePublic).Create(ctx, &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: clusterInfoRole, Namespace: metav1.NamespacePublic},
		Rules: []rbacv1.PolicyRule{{
			Verbs: []string{"get"}, APIGroups: []string{""}, Resources: []string{"configmaps"},
			ResourceNames: []string{"cluster-info"},
		}},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("role %s: %w", clusterInfoRole, err)
	}
	_, err = rbac.RoleBindings(metav1.NamespacePublic).Create(ctx, &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: clusterInfoRole, Namespace: metav1.NamespacePublic},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: clusterInfoRole},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: "system:anonymous"}},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("rolebinding %s: %w", clusterInfoRole, err)
	}
	bindings := []struct{ name, role, group string }{
		// Bootstrap tokens may create CSRs ...
		{"kubeadm:kubelet-bootstrap", "system:node-bootstrapper", bootstrappersGroup},
		// ... which the csrapproving controller approves for a first node client certificate ...
		{"kubeadm:node-autoapprove-bootstrap", "system:certificates.k8s.io:certificatesigningrequests:nodeclient", bootstrappersGroup},
		// ... and for a node renewing its own client certificate.
		{"kubeadm:node-autoapprove-certificate-rotation", "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient", "system:nodes"},
	}
	for _, b := range bindings {
		_, err = rbac.ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: b.name},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: b.role},
			Subjects:   []rbacv1.Subject{{Kind: rbacv1.GroupKind, APIGroup: rbacv1.GroupName, Name: b.group}},
		}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("clusterrolebinding %s: %w", b.name, err)
		}
	}
	return nil
}

// caCertHash is kubeadm's --discovery-token-ca-cert-hash: sha256 of the DER SubjectPublicKeyInfo.
func caCertHash(caPath string) (string, error) {
	raw, err := os.ReadFile(caPath)
	if err != nil {
		return "", err
	}
	block, _ := pem.Decode(raw)
	if block == nil {
		return "", fmt.Errorf("%s is not PEM", caPath)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return "sha256:" + hex.EncodeToString(sum[:]), nil
}

func randomString(n int) (string, error) {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	out := make([]byte, n)
	for i := range out {
		k, err := rand.Int(rand.Reader, big.NewInt(int64(len(alphabet))))
		if err != nil {
			return "", err
		}
		out[i] = alphabet[k.Int64()]
	}
	return string(out), nil
}

// tokenCreateCmd makes a bootstrap token as `kubeadm token create --print-join-command` does: a
// Secret bootstrap-token-<id> in kube-system, for authentication and for signing cluster-info.
func tokenCreateCmd(args []string) error {
	fs := flag.NewFlagSet("token-create", flag.ContinueOnError)
	dir := fs.String("dir", "", "cluster directory")
	ttl := fs.Duration("ttl", 24*time.Hour, "how long the token is valid (0: forever)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("token-create needs --dir DIR")
	}
	state, err := readState(*dir)
	if err != nil {
		return err
	}
	cs, err := adminClient(state.AdminKubeconfig)
	if err != nil {
		return err
	}
	id, err := randomString(6)
	if err != nil {
		return err
	}
	secret, err := randomString(16)
	if err != nil {
		return err
	}
	data := map[string]string{
		"description":                    "made by kubelet-emu dev-cluster token create",
		"token-id":                       id,
		"token-secret":                   secret,
		"usage-bootstrap-authentication": "true",
		"usage-bootstrap-signing":        "true",
		"auth-extra-groups":              tokenExtraGroup,
	}
	if *ttl > 0 {
		data["expiration"] = time.Now().Add(*ttl).UTC().Format(time.RFC3339)
	}
	_, err = cs.CoreV1().Secrets(metav1.NamespaceSystem).Create(context.Background(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "bootstrap-token-" + id, Namespace: metav1.NamespaceSystem},
		Type:       corev1.SecretTypeBootstrapToken,
		StringData: data,
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("bootstrap token secret: %w", err)
	}
	hash, err := caCertHash(state.CACert)
	if err != nil {
		return err
	}
	fmt.Printf("kubelet-emu join %s --token %s.%s --discovery-token-ca-cert-hash %s\n", state.Server, id, secret, hash)
	return nil
}
