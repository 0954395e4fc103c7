package inproc_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
	"fwp/proxy"
)

// within fails the test when ch does not deliver in a generous bound: a
// liveness check (the operation would otherwise hang for 10-30 s), not a
// timing assertion.
func within[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: still blocked", what)
		panic("unreachable")
	}
}

// A client that dials the proxy directly is accepted and answered
// ErrNotFound at once, while a redirected dial to the same proxy is in
// flight (its socket made, its connect not yet done); the redirected one is
// still found once it connects.
func TestAcceptNotStalledByRedirectInFlight(t *testing.T) {
	leak := goroutines(t)
	srvAddr := reservePort(t)
	cr := &engine.ConnectRedirect{}
	e, _ := newEngine(t, engine.Options{}, callout{key: "r", layer: engine.LayerALEConnectRedirectV4, sublayer: 1, conds: []engine.Condition{port(srvAddr.Port())}})
	dp := inproc.New(e, inproc.Options{})
	pxLn := listen(t, &inproc.ListenConfig{Datapath: dp})
	cr.Handle, cr.Target = e.RedirectHandleCreate("r"), redirectTo(apOf(pxLn.Addr()), dp.Identity().PID)
	if err := e.RegisterCallout("r", cr.Registration()); err != nil {
		t.Fatal(err)
	}
	release, inControl := make(chan struct{}), make(chan struct{})
	d := &inproc.Dialer{Datapath: dp}
	var userHook atomic.Int32
	d.Net.Control = func(network, address string, c syscall.RawConn) error {
		userHook.Add(1)
		close(inControl)
		<-release
		return nil
	}
	dialed := make(chan net.Conn, 1)
	go func() {
		c, err := d.Dial("tcp", srvAddr.String())
		if err != nil {
			t.Error(err)
		}
		dialed <- c
	}()
	<-inControl

	direct, err := net.Dial("tcp4", pxLn.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		a, err := pxLn.Accept()
		if err != nil {
			t.Error(err)
		}
		accepted <- a
	}()
	a := within(t, accepted, "accept of a direct client behind an in-flight redirected dial")
	if apOf(a.RemoteAddr()) != apOf(direct.LocalAddr()) {
		t.Fatalf("accepted %v, want the direct client %v", a.RemoteAddr(), direct.LocalAddr())
	}
	if _, err := proxy.QueryRedirectRecords(a); !errors.Is(err, proxy.ErrNotFound) {
		t.Fatalf("direct client: %v", err)
	}
	a.Close()

	close(release)
	c := <-dialed
	if c == nil {
		t.FailNow()
	}
	defer c.Close()
	go func() {
		a, err := pxLn.Accept()
		if err != nil {
			t.Error(err)
		}
		accepted <- a
	}()
	a = within(t, accepted, "accept of the redirected client")
	defer a.Close()
	if userHook.Load() != 1 {
		t.Fatalf("the dialer's own Control hook ran %d times", userHook.Load())
	}
	if _, err := proxy.QueryRedirectRecords(a); err != nil {
		t.Fatalf("redirected client: %v", err)
	}
	c.Close()
	a.Close()
	pxLn.Close()
	e.RedirectHandleDestroy(cr.Handle)
	noLeaks(t, e)
	leak()
}

// Closing a listener with callers blocked in Accept and accepted
// connections held by pends nobody completes: Accept returns ErrClosed,
// the pends end, the held sockets close, nothing is left behind.
func TestListenerCloseWithPendsAndWaiters(t *testing.T) {
	leak := goroutines(t)
	a, _, asked := asyncAuth() // decides nothing
	e, _ := newEngine(t, engine.Options{PendTimeout: time.Hour}, callout{key: "acc", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 1,
		action: engine.ActionCalloutTerminating, reg: a.Registration()})
	dp := inproc.New(e, inproc.Options{})
	ln := listen(t, &inproc.ListenConfig{Datapath: dp})
	const n = 3
	var clients []net.Conn
	for range n {
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
		<-asked
	}
	errs := make(chan error, n)
	for range n {
		go func() {
			_, err := ln.Accept()
			errs <- err
		}()
	}
	closed := make(chan error, 1)
	go func() { closed <- ln.Close() }()
	if err := within(t, closed, "Close with pended accepts"); err != nil {
		t.Fatal(err)
	}
	for range n {
		if err := within(t, errs, "Accept after Close"); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("accept: %v", err)
		}
	}
	for _, c := range clients {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("a held connection is still open: %v", err)
		}
	}
	noLeaks(t, e)
	leak()
}

// A dial whose context ends while a callout holds it (a pended classify at
// CONNECT_REDIRECT, a pended operation at AUTH_CONNECT) returns the
// context's error; its flow is deleted once and the engine holds nothing.
func TestDialCanceledDuringPend(t *testing.T) {
	srv := startEcho(t, mustListen(t))
	var deleted atomic.Int32
	var assocID engine.CalloutID
	assoc := engine.CalloutRegistration{
		Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			if err := req.Engine().FlowAssociateContext(req.Meta.FlowHandle, req.Layer, assocID, 1); err != nil {
				t.Error(err)
			}
			out.Action = engine.ActionContinue
		},
		FlowDelete: func(engine.LayerID, engine.CalloutID, any) { deleted.Add(1) },
	}
	for _, at := range []string{"connect-redirect", "auth-connect"} {
		t.Run(at, func(t *testing.T) {
			leak := goroutines(t)
			deleted.Store(0)
			held, unblock := make(chan struct{}, 1), make(chan struct{})
			cs := []callout{{key: "assoc", layer: engine.LayerALEConnectRedirectV4, sublayer: 300, action: engine.ActionCalloutInspection, reg: assoc}}
			if at == "connect-redirect" {
				// A redirect callout that pends the classify and completes
				// it only after the dial gave up.
				var e *engine.Engine
				hold := engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
					h, err := req.AcquireClassifyHandle()
					if err != nil {
						t.Error(err)
						return
					}
					if _, err := e.PendClassify(h, out); err != nil {
						t.Error(err)
						e.ReleaseClassifyHandle(h)
						return
					}
					go func() {
						held <- struct{}{}
						<-unblock
						if err := e.CompleteClassify(h, engine.ClassifyOut{Action: engine.ActionPermit}); !errors.Is(err, engine.ErrPendResolved) && !errors.Is(err, engine.ErrHandleInvalid) {
							t.Errorf("late completion: %v", err)
						}
						e.ReleaseClassifyHandle(h)
					}()
				}}
				cs = append(cs, callout{key: "r", layer: engine.LayerALEConnectRedirectV4, sublayer: 1, conds: []engine.Condition{port(srv.addr().Port())}, reg: hold})
				var id map[string]ids
				e, id = newEngine(t, engine.Options{PendTimeout: time.Hour}, cs...)
				assocID = id["assoc"].callout
				runCanceledDial(t, e, srv, held, unblock, &deleted)
				noLeaks(t, e)
			} else {
				auth := &engine.AsyncAuthorizer{Decide: func(ctx context.Context, _ engine.LayerID, _ engine.Values, _ engine.Metadata) engine.ActionType {
					held <- struct{}{}
					<-unblock
					return engine.ActionPermit
				}}
				cs = append(cs, callout{key: "auth", layer: engine.LayerALEAuthConnectV4, sublayer: 1, action: engine.ActionCalloutTerminating,
					conds: []engine.Condition{port(srv.addr().Port())}, reg: auth.Registration()})
				e, id := newEngine(t, engine.Options{PendTimeout: time.Hour}, cs...)
				assocID = id["assoc"].callout
				runCanceledDial(t, e, srv, held, unblock, &deleted)
				noLeaks(t, e)
			}
			leak()
		})
	}
}

func runCanceledDial(t *testing.T, e *engine.Engine, srv *echoServer, held, unblock chan struct{}, deleted *atomic.Int32) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		c, err := (&inproc.Dialer{Datapath: inproc.New(e, inproc.Options{})}).DialContext(ctx, "tcp", srv.addr().String())
		if c != nil {
			c.Close()
		}
		errc <- err
	}()
	<-held
	cancel()
	if err := within(t, errc, "dial after cancel"); !errors.Is(err, context.Canceled) {
		t.Fatalf("dial: %v", err)
	}
	close(unblock) // the callout's late completion finds the pend gone
	noLeaks(t, e)
	if n := deleted.Load(); n != 1 {
		t.Fatalf("flow-delete called %d times", n)
	}
}

// Closing a UDP socket whose first datagram from a remote is held by a
// pend nobody completes: Close returns, the blocked ReadFrom returns, the
// pend and the association's flow are gone.
func TestPacketConnCloseEndsPend(t *testing.T) {
	leak := goroutines(t)
	e, pc, _, asked := pendedRecvAccept(t)
	sender, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sender.Close()
	read := make(chan error, 1)
	go func() {
		_, _, err := pc.ReadFrom(make([]byte, 64))
		read <- err
	}()
	if _, err := sender.WriteTo([]byte("hello"), pc.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	<-asked
	closed := make(chan error, 1)
	go func() { closed <- pc.Close() }()
	if err := within(t, closed, "Close with a pended datagram"); err != nil {
		t.Fatal(err)
	}
	if err := within(t, read, "ReadFrom after Close"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read: %v", err)
	}
	noLeaks(t, e)
	leak()
}

// ENDPOINT_CLOSURE and flow-delete run exactly once per flow however many
// goroutines close a Conn, a Listener and a PacketConn with associations
// at the same time.
func TestConcurrentCloseOnce(t *testing.T) {
	cc, e := newCloseCounter(t)
	dp := inproc.New(e, inproc.Options{})
	lc := &inproc.ListenConfig{Datapath: dp}
	ln := listen(t, lc)
	c, err := (&inproc.Dialer{Datapath: dp}).Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	ac, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	pc, err := lc.ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	peerA, peerB := udpResponder(t, "a:"), udpResponder(t, "b:")
	for _, p := range []net.PacketConn{peerA, peerB} {
		if _, err := pc.WriteTo([]byte("x"), p.LocalAddr()); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for range 8 {
		for _, cl := range []interface{ Close() error }{c, ac, ln, pc} {
			wg.Add(1)
			go func() { defer wg.Done(); cl.Close() }()
		}
	}
	wg.Wait()
	cc.mu.Lock()
	defer cc.mu.Unlock()
	// Flows: the dial, the accept, two UDP associations.
	if len(cc.deleted) != 4 {
		t.Fatalf("flow-delete for %d flows, want 4: %v", len(cc.deleted), cc.deleted)
	}
	for f, n := range cc.deleted {
		if n != 1 {
			t.Fatalf("flow %d deleted %d times", f, n)
		}
	}
	// Endpoints: the dial, the accept, the listener, the UDP socket.
	if len(cc.closedEndpoints) != 4 {
		t.Fatalf("endpoint closure for %d endpoints, want 4: %v", len(cc.closedEndpoints), cc.closedEndpoints)
	}
	for ep, n := range cc.closedEndpoints {
		if n != 1 {
			t.Fatalf("endpoint %d closed %d times", ep, n)
		}
	}
	noLeaks(t, e)
}

// A typed nil dialer or connection through the proxy API is an invalid
// argument, not a panic.
func TestProxyAPITypedNil(t *testing.T) {
	e := engine.New(engine.Options{})
	recs := e.MarshalRedirectRecords(engine.NewRedirectRecords(engine.RedirectRecord{Handle: 1,
		Original: netip.MustParseAddrPort("10.0.0.1:80"), Redirected: netip.MustParseAddrPort("127.0.0.1:1")}))
	if err := proxy.SetRedirectRecords((*inproc.Dialer)(nil), recs); !errors.Is(err, proxy.ErrInvalidArgument) {
		t.Fatalf("nil dialer: %v", err)
	}
	if _, err := proxy.QueryRedirectRecords((*inproc.Conn)(nil)); !errors.Is(err, proxy.ErrInvalidArgument) {
		t.Fatalf("nil conn: %v", err)
	}
	if _, err := proxy.QueryRedirectContext((*inproc.Conn)(nil)); !errors.Is(err, proxy.ErrInvalidArgument) {
		t.Fatalf("nil conn: %v", err)
	}
}
