package inproc_test

import (
	"bytes"
	"context"
	"net/netip"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
	"fwp/proxy"
)

// The redirect scenario on IPv6 and through a dual-stack proxy listener
// (a "tcp" wildcard socket that accepts IPv4 clients as v4-mapped
// addresses): the proxy finds the redirect, the client's bytes reach the
// server.
func TestRedirectFamilies(t *testing.T) {
	for _, tc := range []struct {
		name            string
		srvNet, srvAddr string
		pxNet, pxAddr   string
		dialNet         string
		redirectLayer   engine.LayerID
		pxConnect       func(netip.AddrPort) netip.AddrPort // the address the callout redirects to
	}{
		{"tcp6", "tcp6", "[::1]:0", "tcp6", "[::1]:0", "tcp6", engine.LayerALEConnectRedirectV6, nil},
		{"dual-stack proxy, v4 client", "tcp4", "127.0.0.1:0", "tcp", ":0", "tcp", engine.LayerALEConnectRedirectV4,
			func(p netip.AddrPort) netip.AddrPort {
				return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), p.Port())
			}},
		{"dual-stack proxy, v6 client", "tcp6", "[::1]:0", "tcp", "[::]:0", "tcp6", engine.LayerALEConnectRedirectV6,
			func(p netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(netip.IPv6Loopback(), p.Port()) }},
		{"v4-mapped redirect target", "tcp4", "127.0.0.1:0", "tcp", ":0", "tcp", engine.LayerALEConnectRedirectV4,
			func(p netip.AddrPort) netip.AddrPort {
				return netip.AddrPortFrom(netip.MustParseAddr("::ffff:127.0.0.1"), p.Port())
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, _ := newEngine(t, engine.Options{}, callout{key: "r", layer: tc.redirectLayer, sublayer: 1})
			dp := inproc.New(e, inproc.Options{})
			lc := &inproc.ListenConfig{Datapath: dp}
			srvLn, err := lc.Listen(context.Background(), tc.srvNet, tc.srvAddr)
			if err != nil {
				t.Fatal(err)
			}
			srv := startEcho(t, srvLn)
			pxLn, err := lc.Listen(context.Background(), tc.pxNet, tc.pxAddr)
			if err != nil {
				t.Fatal(err)
			}
			px := startProxy(t, dp, pxLn)
			to := px.addr()
			if tc.pxConnect != nil {
				to = tc.pxConnect(to)
			}
			srvAddr := srv.addr()
			cr := &engine.ConnectRedirect{Handle: e.RedirectHandleCreate("r"), Target: func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
				if uint16(req.Values.Uint(engine.FieldIPRemotePort)) != srvAddr.Port() {
					return engine.RedirectTarget{}, false
				}
				return redirectTo(to, dp.Identity().PID)(req)
			}}
			if err := e.RegisterCallout("r", cr.Registration()); err != nil {
				t.Fatal(err)
			}
			c, err := (&inproc.Dialer{Datapath: dp}).Dial(tc.dialNet, srvAddr.String())
			if err != nil {
				t.Fatal(err)
			}
			if got := apOf(c.RemoteAddr()); got != srvAddr {
				t.Fatalf("RemoteAddr %v, want the server %v", got, srvAddr)
			}
			msg := bytes.Repeat([]byte("v6"), 1000)
			got, err := roundTrip(c, msg)
			if err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("echo: %d bytes, %v; proxy errors %v", len(got), err, px.errors())
			}
			c.Close()
			px.stop()
			srv.stop()
			if errs := px.errors(); len(errs) > 0 || len(px.original) != 1 || px.original[0] != srvAddr {
				t.Fatalf("proxy saw %v, errors %v", px.original, errs)
			}
			e.RedirectHandleDestroy(cr.Handle)
			noLeaks(t, e)
		})
	}
}

// UDP over IPv6, on an unconnected socket and a connected one.
func TestUDP6Redirect(t *testing.T) {
	server, prox := udpResponderOn(t, "udp6", "[::1]:0", "server:"), udpResponderOn(t, "udp6", "[::1]:0", "proxy:")
	srvAddr, pxAddr := apOf(server.LocalAddr()), apOf(prox.LocalAddr())
	e, dp, cr := newRedirect(t, engine.LayerALEConnectRedirectV6, []engine.Condition{port(srvAddr.Port())}, pxAddr)
	pc, err := (&inproc.ListenConfig{Datapath: dp}).ListenPacket(context.Background(), "udp6", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 100)
	if _, err := pc.WriteTo([]byte("one"), server.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	if n, from, err := pc.ReadFrom(buf); err != nil || string(buf[:n]) != "proxy:one" || apOf(from) != srvAddr {
		t.Fatalf("reply %q from %v: %v", buf[:n], from, err)
	}
	pc.Close()
	c, err := (&inproc.Dialer{Datapath: dp}).Dial("udp6", srvAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("two")); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "proxy:two" || apOf(c.RemoteAddr()) != srvAddr {
		t.Fatalf("connected reply %q (remote %v): %v", buf[:n], c.RemoteAddr(), err)
	}
	if _, err := proxy.QueryRedirectRecords(c); err == nil {
		t.Fatal("an outbound connection answered a proxy query")
	}
	c.Close()
	e.RedirectHandleDestroy(cr.Handle)
	noLeaks(t, e)
}
