package server

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"testing"

	"fwp/api"
	"fwp/proxy"
)

// fakeRedirects knows one connection per map entry, keyed by "local remote".
type fakeRedirects map[string]proxy.Redirect

func (f fakeRedirects) QueryProxyRedirect(local, remote netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	r, ok := f[local.String()+" "+remote.String()]
	if !ok {
		return proxy.Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: %s -> %s", proxy.ErrNotFound, remote, local)
	}
	return r, netip.MustParseAddrPort("10.0.0.1:80"), nil
}

func TestQueryRedirect(t *testing.T) {
	src := fakeRedirects{
		"127.0.0.1:3128 127.0.0.1:40000": {Records: []byte("rec"), Context: []byte("secret"), TargetPID: uint32(os.Getpid())},
		"127.0.0.1:3128 127.0.0.1:40001": {Records: []byte("rec"), Context: []byte("other"), TargetPID: uint32(os.Getpid()) + 1},
		"127.0.0.1:3128 127.0.0.1:40002": {Records: []byte("rec")},
	}
	c, _ := start(t, Config{Redirects: src}).conn(t)
	q := func(local, remote string) (*api.RedirectInfo, error) {
		r, err := c.QueryRedirect(context.Background(), &api.QueryRedirectRequest{Local: local, Remote: remote})
		return r, api.FromStatus(err)
	}
	r, err := q("127.0.0.1:3128", "127.0.0.1:40000")
	if err != nil || string(r.Records) != "rec" || string(r.Context) != "secret" || r.Original != "10.0.0.1:80" || r.TargetPid != uint32(os.Getpid()) {
		t.Fatalf("the target's query: %v, %v", r, err)
	}
	for _, remote := range []string{"127.0.0.1:40001", "127.0.0.1:40002"} {
		_, err := q("127.0.0.1:3128", remote)
		// Root may read the maps anyway; anyone else only as the target.
		if root := os.Getuid() == 0; root && err != nil || !root && !errors.Is(err, proxy.ErrAccessDenied) {
			t.Errorf("query of %s by uid %d (not the target): %v", remote, os.Getuid(), err)
		}
	}
	if _, err := q("127.0.0.1:3128", "127.0.0.1:9"); !errors.Is(err, proxy.ErrNotFound) {
		t.Errorf("unknown connection: %v; want proxy.ErrNotFound", err)
	}
	for _, bad := range [][2]string{{"", ""}, {"127.0.0.1", "127.0.0.1:1"}, {"127.0.0.1:1", "x"}} {
		if _, err := q(bad[0], bad[1]); !errors.Is(err, proxy.ErrInvalidArgument) {
			t.Errorf("query %q: %v; want proxy.ErrInvalidArgument", bad, err)
		}
	}
	// Without a kernel datapath.
	c2, _ := start(t, Config{}).conn(t)
	_, err = c2.QueryRedirect(context.Background(), &api.QueryRedirectRequest{Local: "127.0.0.1:1", Remote: "127.0.0.1:2"})
	if err = api.FromStatus(err); !errors.Is(err, proxy.ErrNotSupported) {
		t.Errorf("no datapath: %v; want proxy.ErrNotSupported", err)
	}
}
