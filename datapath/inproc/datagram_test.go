package inproc_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
	"fwp/proxy"
)

// udpProxy is a UDP proxy on one unconnected socket: for each datagram it
// queries the records and context by the datagram's source, sends it on to
// the original destination with the records set, and relays the answer.
type udpProxy struct {
	pc       net.PacketConn
	dp       *inproc.Datapath
	original chan netip.AddrPort // one per datagram relayed
	errs     chan error
}

func startUDPProxy(t *testing.T, dp *inproc.Datapath, pc net.PacketConn) *udpProxy {
	p := &udpProxy{pc: pc, dp: dp, original: make(chan netip.AddrPort, 16), errs: make(chan error, 16)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if err := p.relay(buf[:n], from); err != nil {
				p.errs <- err
			}
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return p
}

func (p *udpProxy) relay(msg []byte, from net.Addr) error {
	recs, err := proxy.QueryDatagramRedirectRecords(p.pc, from)
	if err != nil {
		return fmt.Errorf("records of %v: %w", from, err)
	}
	rctx, err := proxy.QueryDatagramRedirectContext(p.pc, from)
	if err != nil {
		return fmt.Errorf("context of %v: %w", from, err)
	}
	var orig netip.AddrPort
	if err := orig.UnmarshalBinary(rctx); err != nil {
		return err
	}
	d := &inproc.Dialer{Datapath: p.dp}
	if err := proxy.SetRedirectRecords(d, recs); err != nil {
		return err
	}
	out, err := d.Dial("udp", orig.String())
	if err != nil {
		return err
	}
	defer out.Close()
	out.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := out.Write(msg); err != nil {
		return err
	}
	buf := make([]byte, 2048)
	n, err := out.Read(buf)
	if err != nil {
		return err
	}
	if via := out.(*inproc.Conn).RedirectedRemote(); via != orig {
		return fmt.Errorf("the proxy's own datagrams were redirected to %v", via)
	}
	p.original <- orig
	_, err = p.pc.WriteTo(append([]byte("via-proxy:"), buf[:n]...), from)
	return err
}

// A UDP proxy with one unconnected socket serves several redirected
// clients (an unconnected socket on a wildcard address, one on loopback, a
// connected one) by querying each datagram's records and context by its
// source: each client's answer comes from the server it addressed, through
// the proxy, and the proxy's own datagrams are not redirected again.
func TestUDPProxyQueriesDatagrams(t *testing.T) {
	srvA, srvB := udpResponder(t, "a:"), udpResponder(t, "b:")
	a, b := apOf(srvA.LocalAddr()), apOf(srvB.LocalAddr())
	cr := &engine.ConnectRedirect{}
	e, _ := newEngine(t, engine.Options{}, callout{key: "r", layer: engine.LayerALEConnectRedirectV4, sublayer: 1,
		conds: []engine.Condition{port(a.Port()), port(b.Port()), {Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)}}})
	dp := inproc.New(e, inproc.Options{})
	pxPC, err := (&inproc.ListenConfig{Datapath: dp}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cr.Handle, cr.Target = e.RedirectHandleCreate("udp"), redirectTo(apOf(pxPC.LocalAddr()), dp.Identity().PID)
	if err := e.RegisterCallout("r", cr.Registration()); err != nil {
		t.Fatal(err)
	}
	px := startUDPProxy(t, dp, pxPC)

	lc := &inproc.ListenConfig{Datapath: dp}
	wild, err := lc.ListenPacket(context.Background(), "udp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer wild.Close()
	lo, err := lc.ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lo.Close()
	buf := make([]byte, 2048)
	for i, c := range []struct {
		pc net.PacketConn
		to netip.AddrPort
	}{{wild, a}, {lo, b}, {wild, b}, {lo, a}} {
		c.pc.SetReadDeadline(time.Now().Add(10 * time.Second))
		msg := fmt.Sprint("m", i)
		if _, err := c.pc.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(c.to)); err != nil {
			t.Fatal(err)
		}
		n, from, err := c.pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("exchange %d: %v (proxy: %v)", i, err, drain(px.errs))
		}
		want := "via-proxy:" + map[netip.AddrPort]string{a: "a:", b: "b:"}[c.to] + msg
		if string(buf[:n]) != want || apOf(from) != c.to {
			t.Fatalf("exchange %d: %q from %v, want %q from %v", i, buf[:n], from, want, c.to)
		}
		if got := <-px.original; got != c.to {
			t.Fatalf("exchange %d: the proxy saw original destination %v, want %v", i, got, c.to)
		}
	}
	conn, err := (&inproc.Dialer{Datapath: dp}).Dial("udp4", a.String())
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte("conn")); err != nil {
		t.Fatal(err)
	}
	if n, err := conn.Read(buf); err != nil || string(buf[:n]) != "via-proxy:a:conn" {
		t.Fatalf("connected client: %q, %v (proxy: %v)", buf[:n], err, drain(px.errs))
	}
	if got := <-px.original; got != a {
		t.Fatalf("connected client: the proxy saw %v, want %v", got, a)
	}
	conn.Close()
	if err := drain(px.errs); err != nil {
		t.Fatal(err)
	}

	// A sender nobody redirected, and a client whose association is gone.
	plain, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	for _, from := range []net.Addr{plain.LocalAddr(), conn.LocalAddr()} {
		if _, err := proxy.QueryDatagramRedirectRecords(pxPC, from); !errors.Is(err, proxy.ErrNotFound) {
			t.Fatalf("records of datagrams from %v: %v, want ErrNotFound", from, err)
		}
	}
	wild.Close()
	lo.Close()
	pxPC.Close()
	e.RedirectHandleDestroy(cr.Handle)
	noLeaks(t, e)
}

func drain(errs chan error) error {
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

// The datagram queries on a proxy socket bound to a wildcard address
// (found by port), on a plain socket through the datapath as a registered
// backend, and from a process that is not the redirect target.
func TestUDPDatagramQueryVariants(t *testing.T) {
	srv := udpResponder(t, "srv:")
	e, _ := newEngine(t, engine.Options{}, callout{key: "r", layer: engine.LayerALEConnectRedirectV4, sublayer: 1, conds: []engine.Condition{port(apOf(srv.LocalAddr()).Port())}})
	dp := inproc.New(e, inproc.Options{})
	other := inproc.Identity{PID: dp.Identity().PID + 1, UID: -1, GID: -1}
	wildPx, err := (&inproc.ListenConfig{Datapath: dp, Identity: &other}).ListenPacket(context.Background(), "udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer wildPx.Close()
	// The policy sends datagrams to the proxy's port on 127.0.0.1.
	target := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), apOf(wildPx.LocalAddr()).Port())
	cr := &engine.ConnectRedirect{Handle: e.RedirectHandleCreate("r"), Target: redirectTo(target, dp.Identity().PID)}
	if err := e.RegisterCallout("r", cr.Registration()); err != nil {
		t.Fatal(err)
	}
	client, err := (&inproc.ListenConfig{Datapath: dp}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := client.WriteTo([]byte("x"), srv.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	wildPx.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64)
	n, from, err := wildPx.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "x" || apOf(from) != apOf(client.LocalAddr()) {
		t.Fatalf("proxy read %q from %v: %v", buf[:n], from, err)
	}
	recs, err := proxy.QueryDatagramRedirectRecords(wildPx, from)
	if err != nil {
		t.Fatalf("records on a wildcard-bound proxy: %v", err)
	}
	if r, err := e.UnmarshalRedirectRecords(recs); err != nil || r.Len() != 1 {
		t.Fatalf("records %v: %v", r, err)
	}
	// This proxy runs as another process than the callout named.
	if _, err := proxy.QueryDatagramRedirectContext(wildPx, from); !errors.Is(err, proxy.ErrAccessDenied) {
		t.Fatalf("context for a process that is not the target: %v, want ErrAccessDenied", err)
	}
	// A v4-mapped source (a dual-stack socket's view) is the same sender.
	mapped := &net.UDPAddr{IP: apOf(from).Addr().AsSlice(), Port: int(apOf(from).Port())}
	mapped.IP = mapped.IP.To16()
	if _, err := proxy.QueryDatagramRedirectRecords(wildPx, mapped); err != nil {
		t.Fatalf("v4-mapped source: %v", err)
	}

	// A plain net.PacketConn: no datagram backend, then the datapath as one.
	plain, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if _, err := proxy.QueryDatagramRedirectRecords(plain, from); !errors.Is(err, proxy.ErrNotSupported) {
		t.Fatalf("plain socket, no backend: %v, want ErrNotSupported", err)
	}
	unregister := proxy.Register(dp)
	defer unregister()
	if _, err := proxy.QueryDatagramRedirectRecords(plain, from); !errors.Is(err, proxy.ErrNotFound) {
		t.Fatalf("plain socket on another port: %v, want ErrNotFound", err)
	}
	asProxy := fakePacketConn{PacketConn: plain, local: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(target.Port())}}
	if c, err := proxy.QueryDatagramRedirectContext(asProxy, from); err != nil || len(c) == 0 {
		t.Fatalf("context through the datapath backend: %q, %v", c, err)
	}
	unregister()

	// Bad arguments.
	for name, c := range map[string]struct {
		pc   net.PacketConn
		from net.Addr
	}{
		"nil socket":       {nil, from},
		"typed nil socket": {(*inproc.PacketConn)(nil), from},
		"nil source":       {wildPx, nil},
		"typed nil source": {wildPx, (*net.UDPAddr)(nil)},
		"TCP source":       {wildPx, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9}},
		"port 0":           {wildPx, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}},
	} {
		if _, err := proxy.QueryDatagramRedirectRecords(c.pc, c.from); !errors.Is(err, proxy.ErrInvalidArgument) {
			t.Errorf("%s: %v, want ErrInvalidArgument", name, err)
		}
	}
	client.Close()
	wildPx.Close()
	e.RedirectHandleDestroy(cr.Handle)
	noLeaks(t, e)
}

// fakePacketConn reports another local address, as a socket bound there.
type fakePacketConn struct {
	net.PacketConn
	local net.Addr
}

func (f fakePacketConn) LocalAddr() net.Addr { return f.local }

// An association idle for the datapath's UDPIdleTimeout ends like a closed
// flow: its flow is deleted once, its redirect registration and reply
// mapping go, and the remote's next datagram is classified again.
func TestUDPAssociationIdleExpiry(t *testing.T) {
	cc, e := newCloseCounter(t)
	recvAccepts := make(chan engine.FlowHandle, 16)
	if err := e.Update(func(tx *engine.Txn) error {
		p, err := tx.AddProvider(engine.Provider{Key: "count"})
		if err != nil {
			return err
		}
		co, err := tx.AddCallout(engine.Callout{Key: "count", Provider: p, Layer: engine.LayerALEAuthRecvAcceptV4})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthRecvAcceptV4, Provider: p, Action: engine.Action{Type: engine.ActionCalloutInspection, Callout: co}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := e.RegisterCallout("count", engine.InlineInspection(func(req *engine.ClassifyRequest) { recvAccepts <- req.Meta.FlowHandle })); err != nil {
		t.Fatal(err)
	}
	dp := inproc.New(e, inproc.Options{UDPIdleTimeout: 200 * time.Millisecond})
	pc, err := (&inproc.ListenConfig{Datapath: dp}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	sender, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sender.Close()
	buf := make([]byte, 64)
	var flows []engine.FlowHandle
	for i := range 2 {
		if _, err := sender.WriteTo([]byte("hi"), pc.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		pc.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, from, err := pc.ReadFrom(buf); err != nil || string(buf[:n]) != "hi" || apOf(from) != apOf(sender.LocalAddr()) {
			t.Fatalf("datagram %d: %q from %v: %v", i, buf[:n], from, err)
		}
		flow := within(t, recvAccepts, "AUTH_RECV_ACCEPT")
		flows = append(flows, flow)
		waitFor(t, fmt.Sprintf("flow %d deleted on expiry", flow), func() bool { return cc.deletedCount(flow) == 1 })
	}
	if flows[0] == flows[1] {
		t.Fatalf("the second datagram after expiry reused flow %d", flows[0])
	}

	// Outbound, redirected: the reply mapping and the proxy's view go too.
	prox := udpResponder(t, "proxy:")
	srv := udpResponder(t, "srv:")
	cr := &engine.ConnectRedirect{Handle: e.RedirectHandleCreate("r"), Target: redirectTo(apOf(prox.LocalAddr()), dp.Identity().PID)}
	if err := e.Update(func(tx *engine.Txn) error {
		p, err := tx.AddProvider(engine.Provider{Key: "redirect"})
		if err != nil {
			return err
		}
		co, err := tx.AddCallout(engine.Callout{Key: "r", Provider: p, Layer: engine.LayerALEConnectRedirectV4})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEConnectRedirectV4, Provider: p, Conditions: []engine.Condition{port(apOf(srv.LocalAddr()).Port())},
			Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := e.RegisterCallout("r", cr.Registration()); err != nil {
		t.Fatal(err)
	}
	if _, err := pc.WriteTo([]byte("q"), srv.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	// The reply is from the server the application addressed (or, on a
	// machine so slow that the association expired first, from the proxy).
	if n, from, err := pc.ReadFrom(buf); err != nil || string(buf[:n]) != "proxy:q" ||
		apOf(from) != apOf(srv.LocalAddr()) && apOf(from) != apOf(prox.LocalAddr()) {
		t.Fatalf("redirected exchange: %q from %v: %v", buf[:n], from, err)
	}
	unregister := proxy.Register(dp)
	defer unregister()
	proxyView := fakePacketConn{PacketConn: pc, local: prox.LocalAddr()}
	waitFor(t, "redirected association expired", func() bool {
		_, err := proxy.QueryDatagramRedirectRecords(proxyView, pc.LocalAddr())
		return errors.Is(err, proxy.ErrNotFound)
	})
	// With the association gone, the proxy's next datagram is a new
	// remote's, reported from the proxy's own address.
	if _, err := prox.WriteTo([]byte("late"), pc.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	if n, from, err := pc.ReadFrom(buf); err != nil || string(buf[:n]) != "late" || apOf(from) != apOf(prox.LocalAddr()) {
		t.Fatalf("datagram after expiry: %q from %v: %v", buf[:n], from, err)
	}
	pc.Close()
	unregister()
	e.RedirectHandleDestroy(cr.Handle)
	noLeaks(t, e)
	cc.mu.Lock()
	defer cc.mu.Unlock()
	for f, n := range cc.deleted {
		if n != 1 {
			t.Fatalf("flow %d deleted %d times", f, n)
		}
	}
	// Two inbound, the redirected one, the proxy's (more only if a slow
	// machine expired the redirected one before its reply).
	if len(cc.deleted) < 4 {
		t.Fatalf("flow-delete for %d flows, want 4: %v", len(cc.deleted), cc.deleted)
	}
	if len(cc.closedEndpoints) != 1 {
		t.Fatalf("endpoint closure for %d endpoints, want the socket's alone: %v", len(cc.closedEndpoints), cc.closedEndpoints)
	}
}

func (cc *closeCounter) deletedCount(f engine.FlowHandle) int {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.deleted[f]
}

// waitFor polls cond for up to 10 s (a bound against hangs, not a speed
// requirement).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A datagram whose AUTH_RECV_ACCEPT is pended: ReadFrom returns at its
// read deadline with a timeout, and a later ReadFrom delivers the datagram
// once the callout permits it (or drops it when it blocks); a deadline set
// while ReadFrom waits applies; Close ends it all.
func TestUDPReadDeadlineDuringPend(t *testing.T) {
	leak := goroutines(t)
	e, pc, decide, asked := pendedRecvAccept(t)
	good, bad := mustPacket(t), mustPacket(t)
	buf := make([]byte, 64)
	type readResult struct {
		msg  string
		from net.Addr
		err  error
	}
	// read is bounded: a ReadFrom stuck on the pend fails the test.
	read := func() (string, net.Addr, error) {
		ch := make(chan readResult, 1)
		go func() {
			n, from, err := pc.ReadFrom(buf)
			ch <- readResult{string(buf[:n]), from, err}
		}()
		r := within(t, ch, "ReadFrom")
		return r.msg, r.from, r.err
	}

	// readPended reads until the callout is asked about the datagram
	// sent: each read ends at its deadline with a timeout, whether it gave
	// up on the pend or (on a slow machine) on a datagram held earlier.
	readPended := func(what string) {
		t.Helper()
		for end := time.Now().Add(10 * time.Second); ; {
			pc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if _, _, err := read(); !isTimeout(err) {
				t.Fatalf("%s: ReadFrom during a pend: %v, want a timeout", what, err)
			}
			select {
			case <-asked:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if time.Now().After(end) {
				t.Fatalf("%s: the callout was never asked", what)
			}
		}
	}
	if _, err := bad.WriteTo([]byte("from bad"), pc.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	readPended("first")
	// A deadline set while ReadFrom waits on the pend ends the wait.
	pc.SetReadDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() { _, _, err := pc.ReadFrom(make([]byte, 64)); errc <- err }()
	time.Sleep(20 * time.Millisecond) // let it wait (either way the test holds)
	pc.SetReadDeadline(time.Now())
	if err := within(t, errc, "ReadFrom after a new deadline"); !isTimeout(err) {
		t.Fatalf("ReadFrom after SetReadDeadline(now): %v, want a timeout", err)
	}
	decide <- engine.ActionBlock // the held datagram is dropped

	if _, err := good.WriteTo([]byte("from good"), pc.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	readPended("second")
	decide <- engine.ActionPermit
	pc.SetDeadline(time.Now().Add(10 * time.Second))
	if msg, from, err := read(); err != nil || msg != "from good" || apOf(from) != apOf(good.LocalAddr()) {
		t.Fatalf("held datagram after permit: %q from %v: %v", msg, from, err)
	}
	// The permitted remote's next datagram needs no classification.
	good.WriteTo([]byte("again"), pc.LocalAddr())
	if msg, _, err := read(); err != nil || msg != "again" {
		t.Fatalf("next datagram: %q: %v", msg, err)
	}

	// Close with a held datagram and its pend outstanding.
	third := mustPacket(t)
	third.WriteTo([]byte("third"), pc.LocalAddr())
	readPended("third")
	pc.SetReadDeadline(time.Time{})
	go func() { _, _, err := pc.ReadFrom(make([]byte, 64)); errc <- err }()
	if err := pc.Close(); err != nil {
		t.Fatal(err)
	}
	if err := within(t, errc, "ReadFrom after Close"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom after Close: %v, want net.ErrClosed", err)
	}
	noLeaks(t, e)
	leak()
}

// pendedRecvAccept is a UDP socket whose AUTH_RECV_ACCEPT an asynchronous
// authorizer pends (the engine's pend timeout out of reach).
func pendedRecvAccept(t *testing.T) (*engine.Engine, net.PacketConn, chan engine.ActionType, chan struct{}) {
	t.Helper()
	a, decide, asked := asyncAuth()
	e, _ := newEngine(t, engine.Options{PendTimeout: time.Hour}, callout{key: "in", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 1,
		action: engine.ActionCalloutTerminating, reg: a.Registration()})
	pc, err := (&inproc.ListenConfig{Datapath: inproc.New(e, inproc.Options{})}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return e, pc, decide, asked
}

func mustPacket(t *testing.T) net.PacketConn {
	t.Helper()
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) && errors.As(err, &ne) && ne.Timeout()
}

// A remote whose AUTH_RECV_ACCEPT is pended does not hold up the others:
// their datagrams are read meanwhile; the pended remote's datagrams, held
// in order, reach a ReadFrom already waiting once the callout permits.
func TestUDPPendedRemoteDoesNotBlockOthers(t *testing.T) {
	leak := goroutines(t)
	slow, fast := mustPacket(t), mustPacket(t)
	a, decide, asked := asyncAuth()
	e, _ := newEngine(t, engine.Options{PendTimeout: time.Hour}, callout{key: "in", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 1,
		action: engine.ActionCalloutTerminating, conds: []engine.Condition{port(apOf(slow.LocalAddr()).Port())}, reg: a.Registration()})
	pc, err := (&inproc.ListenConfig{Datapath: inproc.New(e, inproc.Options{})}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	type readResult struct {
		msg  string
		from netip.AddrPort
		err  error
	}
	reads := make(chan readResult, 1)
	startRead := func() {
		go func() {
			buf := make([]byte, 64)
			n, from, err := pc.ReadFrom(buf)
			var ap netip.AddrPort
			if from != nil {
				ap = apOf(from)
			}
			reads <- readResult{string(buf[:n]), ap, err}
		}()
	}
	expect := func(what, msg string, from net.PacketConn) {
		t.Helper()
		r := within(t, reads, what)
		if r.err != nil || r.msg != msg || r.from != apOf(from.LocalAddr()) {
			t.Fatalf("%s: got %q from %v (%v), want %q from %v", what, r.msg, r.from, r.err, msg, from.LocalAddr())
		}
	}
	send := func(c net.PacketConn, msg string) {
		t.Helper()
		if _, err := c.WriteTo([]byte(msg), pc.LocalAddr()); err != nil {
			t.Fatal(err)
		}
	}

	send(slow, "s1")
	startRead()
	within(t, asked, "the callout asked about the slow remote")
	send(fast, "f1")
	expect("a datagram of another remote during the pend", "f1", fast)
	send(slow, "s2") // behind s1
	send(fast, "f2")
	startRead()
	expect("the next one of the other remote", "f2", fast)
	startRead() // waits: nothing is ready
	select {
	case r := <-reads:
		t.Fatalf("ReadFrom returned %+v before the verdict", r)
	case <-time.After(50 * time.Millisecond):
	}
	decide <- engine.ActionPermit
	expect("the held datagram, to the waiting ReadFrom", "s1", slow)
	startRead()
	expect("the second held datagram, in order", "s2", slow)
	send(slow, "s3")
	startRead()
	expect("the permitted remote's next datagram", "s3", slow)

	if err := pc.Close(); err != nil {
		t.Fatal(err)
	}
	noLeaks(t, e)
	leak()
}
