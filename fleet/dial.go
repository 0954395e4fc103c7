package fleet

import (
	"crypto/tls"
	"errors"
	"strings"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Endpoint says how to reach etcd: comma-separated client URLs and,
// for TLS, a client certificate and key and the CA of the servers.
type Endpoint struct {
	URLs              string
	Cert, Key, CACert string
}

// Dial returns a client of etcd. It does not wait for a connection: an
// unreachable etcd is not an error here (a host keeps enforcing its
// policy and connects when it can).
func Dial(e Endpoint) (*clientv3.Client, error) {
	var eps []string
	for _, u := range strings.Split(e.URLs, ",") {
		if u = strings.TrimSpace(u); u != "" {
			eps = append(eps, u)
		}
	}
	if len(eps) == 0 {
		return nil, errors.New("fleet: no etcd endpoints given")
	}
	var tc *tls.Config
	if e.Cert != "" || e.Key != "" || e.CACert != "" {
		var err error
		tc, err = transport.TLSInfo{CertFile: e.Cert, KeyFile: e.Key, TrustedCAFile: e.CACert}.ClientConfig()
		if err != nil {
			return nil, err
		}
	}
	// Keepalives notice a dead connection in seconds, so the client moves
	// to another member.
	return clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, TLS: tc, Logger: zap.NewNop(),
		DialKeepAliveTime: 2 * time.Second, DialKeepAliveTimeout: 2 * time.Second})
}
