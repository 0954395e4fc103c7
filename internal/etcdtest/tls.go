package etcdtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// TLSFiles are the PEM files of a TLS cluster.
type TLSFiles struct {
	CA                    string
	ServerCert, ServerKey string
	ClientCert, ClientKey string
	// OtherCert and OtherKey are a client certificate signed by another
	// CA: the servers refuse it.
	OtherCert, OtherKey string
}

func writeTLS(dir string) (*TLSFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f := &TLSFiles{}
	caKey, caCert, caDER, err := newCA("etcdtest CA")
	if err != nil {
		return nil, err
	}
	if f.CA, err = writePEM(dir, "ca.pem", "CERTIFICATE", caDER); err != nil {
		return nil, err
	}
	leaf := func(name string, cn string, client bool, key *ecdsa.PrivateKey, ca *x509.Certificate) (string, string, error) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return "", "", err
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
		if client {
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		} else {
			tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, key)
		if err != nil {
			return "", "", err
		}
		kb, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			return "", "", err
		}
		cp, err := writePEM(dir, name+".pem", "CERTIFICATE", der)
		if err != nil {
			return "", "", err
		}
		kp, err := writePEM(dir, name+"-key.pem", "EC PRIVATE KEY", kb)
		return cp, kp, err
	}
	if f.ServerCert, f.ServerKey, err = leaf("server", "etcd", false, caKey, caCert); err != nil {
		return nil, err
	}
	if f.ClientCert, f.ClientKey, err = leaf("client", "fwpd", true, caKey, caCert); err != nil {
		return nil, err
	}
	otherKey, otherCert, _, err := newCA("another CA")
	if err != nil {
		return nil, err
	}
	if f.OtherCert, f.OtherKey, err = leaf("other", "intruder", true, otherKey, otherCert); err != nil {
		return nil, err
	}
	return f, nil
}

func newCA(cn string) (*ecdsa.PrivateKey, *x509.Certificate, []byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		return nil, nil, nil, err
	}
	c, err := x509.ParseCertificate(der)
	return k, c, der, err
}

func writePEM(dir, name, typ string, der []byte) (string, error) {
	p := filepath.Join(dir, name)
	return p, os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}
