package inproc_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
)

// udpResponder answers each datagram with prefix+payload, on IPv4 loopback.
func udpResponder(t *testing.T, prefix string) net.PacketConn {
	return udpResponderOn(t, "udp4", "127.0.0.1:0", prefix)
}

// A UDP connect redirect: the request goes to the proxy, and the reply is
// reported as coming from the server the client addressed.
func TestUDPRedirect(t *testing.T) {
	server := udpResponder(t, "server:")
	prox := udpResponder(t, "proxy:")
	srvAddr, pxAddr := apOf(server.LocalAddr()), apOf(prox.LocalAddr())
	cr := &engine.ConnectRedirect{}
	e, _ := newEngine(t, engine.Options{}, callout{key: "r", layer: engine.LayerALEConnectRedirectV4, sublayer: 1,
		conds: []engine.Condition{port(srvAddr.Port()), {Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)}}})
	dp := inproc.New(e, inproc.Options{})
	cr.Handle, cr.Target = e.RedirectHandleCreate("udp"), redirectTo(pxAddr, dp.Identity().PID)
	if err := e.RegisterCallout("r", cr.Registration()); err != nil {
		t.Fatal(err)
	}

	// Unconnected socket: WriteTo the server, the answer is the proxy's,
	// from the server's address.
	pc, err := (&inproc.ListenConfig{Datapath: dp}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2048)
	for i, msg := range []string{"one", "two"} {
		if _, err := pc.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(srvAddr)); err != nil {
			t.Fatal(err)
		}
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		if string(buf[:n]) != "proxy:"+msg || apOf(from) != srvAddr {
			t.Fatalf("reply %d: %q from %v; want %q from %v", i, buf[:n], from, "proxy:"+msg, srvAddr)
		}
	}
	// Another destination is not redirected.
	other := udpResponder(t, "other:")
	if _, err := pc.WriteTo([]byte("x"), other.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	if n, from, err := pc.ReadFrom(buf); err != nil || string(buf[:n]) != "other:x" || apOf(from) != apOf(other.LocalAddr()) {
		t.Fatalf("unredirected reply %q from %v: %v", buf[:n], from, err)
	}
	pc.Close()

	// Connected socket through the Dialer.
	c, err := (&inproc.Dialer{Datapath: dp}).Dial("udp4", srvAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("three")); err != nil {
		t.Fatal(err)
	}
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "proxy:three" || apOf(c.RemoteAddr()) != srvAddr {
		t.Fatalf("connected reply %q (remote %v): %v", buf[:n], c.RemoteAddr(), err)
	}
	c.Close()
	e.RedirectHandleDestroy(cr.Handle)
	noLeaks(t, e)
}

// The first datagram from each remote runs AUTH_RECV_ACCEPT: a blocked
// sender's datagrams are dropped, others delivered; a blocked WriteTo
// returns the typed error.
func TestUDPRecvAcceptAndBlock(t *testing.T) {
	bad, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	good, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	badPort := apOf(bad.LocalAddr()).Port()
	e, _ := newEngine(t, engine.Options{},
		callout{key: "in", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 1, action: engine.ActionBlock, conds: []engine.Condition{port(badPort)}},
		callout{key: "out", layer: engine.LayerALEAuthConnectV4, sublayer: 1, action: engine.ActionBlock, conds: []engine.Condition{port(badPort)}},
	)
	dp := inproc.New(e, inproc.Options{})
	pc, err := (&inproc.ListenConfig{Datapath: dp}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	bad.WriteTo([]byte("from bad"), pc.LocalAddr())
	good.WriteTo([]byte("from good"), pc.LocalAddr())
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 100)
	n, from, err := pc.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "from good" || apOf(from) != apOf(good.LocalAddr()) {
		t.Fatalf("read %q from %v: %v", buf[:n], from, err)
	}
	if _, err := pc.WriteTo([]byte("x"), bad.LocalAddr()); !isBlocked(err) {
		t.Fatalf("write to a blocked remote: %v", err)
	}
	if _, err := pc.WriteTo([]byte("reply"), from); err != nil {
		t.Fatal(err)
	}
	pc.Close()
	if _, err := pc.WriteTo([]byte("x"), from); err == nil {
		t.Fatal("write after close succeeded")
	}
	noLeaks(t, e)
}

// Two remotes redirected to one proxy from one socket, and the proxy's own
// address addressed directly: each reply is reported as from the remote
// the application sent to last, for exchanges taken in turn.
func TestUDPRedirectTwoRemotesOneProxy(t *testing.T) {
	prox := udpResponder(t, "proxy:")
	pxAddr := apOf(prox.LocalAddr())
	remoteA, remoteB := udpResponder(t, "a:"), udpResponder(t, "b:")
	e, dp, cr := newRedirect(t, engine.LayerALEConnectRedirectV4,
		[]engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchNotEqual, Value: engine.Uint16(pxAddr.Port())}}, pxAddr)
	pc, err := (&inproc.ListenConfig{Datapath: dp}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 100)
	for i, to := range []net.PacketConn{remoteA, remoteB, remoteA, prox, remoteB} {
		msg := fmt.Sprint("m", i)
		if _, err := pc.WriteTo([]byte(msg), to.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		if string(buf[:n]) != "proxy:"+msg || apOf(from) != apOf(to.LocalAddr()) {
			t.Fatalf("exchange %d: %q from %v, want %q from %v", i, buf[:n], from, "proxy:"+msg, to.LocalAddr())
		}
	}
	pc.Close()
	e.RedirectHandleDestroy(cr.Handle)
	noLeaks(t, e)
}

// WriteTo with no address, a nil one or a TCP one is an invalid argument,
// as on a net.UDPConn, not a panic.
func TestUDPWriteToBadAddress(t *testing.T) {
	e := engine.New(engine.Options{})
	pc, err := (&inproc.ListenConfig{Datapath: inproc.New(e, inproc.Options{})}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	for _, a := range []net.Addr{nil, (*net.UDPAddr)(nil), &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9}} {
		if _, err := pc.WriteTo([]byte("x"), a); !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("WriteTo(%#v): %v", a, err)
		}
	}
	pc.Close()
	noLeaks(t, e)
}
