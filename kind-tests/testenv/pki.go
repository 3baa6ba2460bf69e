// pki.go owns the credentials of the test cluster: a throw-away CA, the
// apiserver's serving certificate signed by it, the service-account signing
// key, the admin bearer token (tokens.csv) and the admin kubeconfig.
//
// Files written under DIR (all 0600):
//
//	ca.crt               CA certificate (the only block in the kubeconfig's CA data)
//	tls.crt, tls.key     serving certificate (IP SANs 127.0.0.1, 10.0.0.1 and the node address
//	                     in node mode; DNS localhost, kubernetes.*)
//	node.crt, node.key   node mode only: the kubelet's client certificate
//	                     (CN system:node:<name>, O system:nodes), as the Node authorizer expects
//	sa.key               ECDSA P-256 key that signs and verifies service-account tokens
//	tokens.csv           static token file: admin user in group system:masters
//	kubeconfig           admin kubeconfig (written once the apiserver is ready)
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

const serviceClusterIPRange = "10.0.0.0/24"

type pkiFiles struct {
	caCert      []byte // PEM
	caCertFile  string
	tlsCertFile string
	tlsKeyFile  string
	saKeyFile   string
	tokensFile  string
	adminToken  string
}

// pkiFile is one file writePKI writes (mode 0600).
type pkiFile struct {
	path string
	data []byte
}

// writePKI writes the cluster's credentials. With a node (node mode) the
// serving certificate also names the node's address, and the node gets a
// client certificate of its own.
func writePKI(dir string, node *nodeMode) (*pkiFiles, error) {
	p := &pkiFiles{
		caCertFile:  filepath.Join(dir, "ca.crt"),
		tlsCertFile: filepath.Join(dir, "tls.crt"),
		tlsKeyFile:  filepath.Join(dir, "tls.key"),
		saKeyFile:   filepath.Join(dir, "sa.key"),
		tokensFile:  filepath.Join(dir, "tokens.csv"),
	}

	now := time.Now()
	notBefore, notAfter := now.Add(-time.Hour), now.Add(10*365*24*time.Hour)

	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTemplate := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "testenv-ca"},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}

	// The in-cluster Service IP (first address of the service range) and
	// names are included so that pods of a later process-node can reach the
	// apiserver under its usual names too.
	tlsKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tlsTemplate := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv4(10, 0, 0, 1)},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default",
			"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
	}
	if node != nil {
		tlsTemplate.IPAddresses = append(tlsTemplate.IPAddresses, node.address)
	}
	tlsDER, err := x509.CreateCertificate(rand.Reader, tlsTemplate, caCert, &tlsKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}

	tokenBytes := make([]byte, 24)
	if _, err := rand.Read(tokenBytes); err != nil {
		return nil, err
	}
	p.adminToken = hex.EncodeToString(tokenBytes)

	p.caCert = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	tlsKeyPEM, err := ecKeyPEM(tlsKey)
	if err != nil {
		return nil, err
	}
	saKeyPEM, err := ecKeyPEM(saKey)
	if err != nil {
		return nil, err
	}
	files := []pkiFile{
		{p.caCertFile, p.caCert},
		{p.tlsCertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tlsDER})},
		{p.tlsKeyFile, tlsKeyPEM},
		{p.saKeyFile, saKeyPEM},
		// token,user,uid,"group1,group2"
		{p.tokensFile, []byte(fmt.Sprintf("%s,admin,admin,\"system:masters\"\n", p.adminToken))},
	}
	if node != nil {
		certPEM, keyPEM, err := nodeClientCert(node.name, caCert, caKey, notBefore, notAfter)
		if err != nil {
			return nil, err
		}
		files = append(files,
			pkiFile{filepath.Join(dir, "node.crt"), certPEM},
			pkiFile{filepath.Join(dir, "node.key"), keyPEM})
	}
	for _, f := range files {
		if err := os.WriteFile(f.path, f.data, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// nodeClientCert issues the kubelet's client certificate: the Node authorizer
// and the NodeRestriction admission plugin know a node by exactly this
// subject, so the kubelet can read and write only what its own pods need.
func nodeClientCert(name string, ca *x509.Certificate, caKey *ecdsa.PrivateKey, notBefore, notAfter time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	template := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "system:node:" + name, Organization: []string{"system:nodes"}},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err = ecKeyPEM(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}

func ecKeyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return big.NewInt(time.Now().UnixNano())
	}
	return n.Add(n, big.NewInt(1))
}

// writeKubeconfig writes the admin kubeconfig: bearer token, CA data holding
// only the CA certificate (a strict client such as rustls accepts a CA as a
// trust anchor; a leaf in the trust store would be wrong).
func writeKubeconfig(path, server string, p *pkiFiles) error {
	const name = "testenv"
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[name] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: p.caCert}
	cfg.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: p.adminToken}
	cfg.Contexts[name] = &clientcmdapi.Context{Cluster: name, AuthInfo: name, Namespace: "default"}
	cfg.CurrentContext = name
	return clientcmd.WriteToFile(*cfg, path)
}
