package fleet

import (
	"context"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"fwp/internal/etcdtest"
)

// TestTLS: with client certificates a follower and a writer work; a
// client without a certificate, or with one another CA signed, gets
// nothing.
func TestTLS(t *testing.T) {
	c := etcdtest.StartWith(t, 1, etcdtest.Options{TLS: true})
	ep := Endpoint{URLs: strings.Join(c.Endpoints(), ","), Cert: c.TLS.ClientCert, Key: c.TLS.ClientKey, CACert: c.TLS.CA}
	cl, err := Dial(ep)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx := context.Background()
	m := newManager(t, "")
	f, err := NewFollower(Config{Client: cl, Prefix: "/tls/", Manager: m, Node: Node{Name: "h"}})
	if err != nil {
		t.Fatal(err)
	}
	fctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); f.Run(fctx) }()
	defer func() { cancel(); <-done }()
	rev, err := PutDocument(ctx, cl, "/tls/", "d", []byte(docBase))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "the policy over TLS", func() bool { return f.Status().Revision >= rev })
	for _, bad := range []Endpoint{
		{URLs: ep.URLs, CACert: ep.CACert},                                             // no client certificate
		{URLs: ep.URLs, Cert: c.TLS.OtherCert, Key: c.TLS.OtherKey, CACert: ep.CACert}, // signed by another CA
	} {
		bc, err := Dial(bad)
		if err != nil {
			t.Fatal(err)
		}
		gctx, gcancel := context.WithTimeout(ctx, 2*time.Second)
		_, err = bc.Get(gctx, "/tls/", clientv3.WithPrefix())
		gcancel()
		bc.Close()
		if err == nil {
			t.Fatalf("a client with %+v read the fleet", bad)
		}
	}
	if _, err := Dial(Endpoint{URLs: ep.URLs, Cert: "/nonexistent.pem", Key: ep.Key}); err == nil {
		t.Fatal("Dial with a missing certificate file succeeded")
	}
}
