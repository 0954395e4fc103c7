package client_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"

	"fwp/client"
	"fwp/internal/server"
	"fwp/proxy"
)

// oneRedirect knows the redirect of one local/remote pair.
type oneRedirect struct {
	local, remote netip.AddrPort
	r             proxy.Redirect
}

func (o oneRedirect) QueryProxyRedirect(local, remote netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	if local != o.local || remote != o.remote {
		return proxy.Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: %s -> %s", proxy.ErrNotFound, remote, local)
	}
	return o.r, netip.MustParseAddrPort("10.0.0.1:53"), nil
}

// A UDP proxy connects a socket to each client; ProxyBackend asks fwpd by
// that socket's addresses, as for an accepted TCP connection.
func TestProxyBackendQueriesConnectedUDP(t *testing.T) {
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	conn, err := net.DialUDP("udp4", nil, pc.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	local, remote, _ := proxy.ConnTuple(conn)
	want := proxy.Redirect{Records: []byte("rec"), Context: []byte("ctx"), TargetPID: uint32(os.Getpid())}
	sock, _ := startServer(t, server.Config{Redirects: oneRedirect{local, remote, want}})
	b := client.ProxyBackend{C: dial(t, sock, true)}
	got, err := b.QueryAccepted(conn)
	if err != nil || string(got.Records) != "rec" || string(got.Context) != "ctx" || got.TargetPID != want.TargetPID {
		t.Fatalf("QueryAccepted(connected UDP): %+v, %v", got, err)
	}
	// An unconnected socket has no peer to look up by.
	if _, err := b.QueryAccepted(pc); !errors.Is(err, proxy.ErrNotFound) {
		t.Fatalf("QueryAccepted(unconnected UDP): %v; want proxy.ErrNotFound", err)
	}
}

// A UDP proxy's unconnected socket: ProxyBackend asks fwpd by the socket's
// local address and the datagram's source, through the proxy package's
// datagram queries; a socket bound to a wildcard address is asked about as
// such (fwpd's datapath finds the flow by port).
func TestProxyBackendQueriesDatagrams(t *testing.T) {
	for _, bind := range []string{"127.0.0.1:0", "0.0.0.0:0"} {
		pc, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(bind)))
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		from := netip.MustParseAddrPort("127.0.0.1:40000")
		want := proxy.Redirect{Records: []byte("rec"), Context: []byte("ctx"), TargetPID: uint32(os.Getpid())}
		sock, _ := startServer(t, server.Config{Redirects: oneRedirect{pc.LocalAddr().(*net.UDPAddr).AddrPort(), from, want}})
		unregister := proxy.Register(client.ProxyBackend{C: dial(t, sock, true)})
		recs, err := proxy.QueryDatagramRedirectRecords(pc, net.UDPAddrFromAddrPort(from))
		if err != nil || string(recs) != "rec" {
			t.Fatalf("%s: records %q, %v", bind, recs, err)
		}
		if c, err := proxy.QueryDatagramRedirectContext(pc, net.UDPAddrFromAddrPort(from)); err != nil || string(c) != "ctx" {
			t.Fatalf("%s: context %q, %v", bind, c, err)
		}
		other := net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:40001"))
		if _, err := proxy.QueryDatagramRedirectRecords(pc, other); !errors.Is(err, proxy.ErrNotFound) {
			t.Fatalf("%s: unknown sender: %v; want proxy.ErrNotFound", bind, err)
		}
		unregister()
	}
}
