package inproc_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
)

func TestBlockIsTyped(t *testing.T) {
	srv := startEcho(t, mustListen(t))
	// A context associated before the block is deleted with the flow.
	var deleted atomic.Int32
	var assocID engine.CalloutID
	assoc := engine.CalloutRegistration{
		Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			if err := req.Engine().FlowAssociateContext(req.Meta.FlowHandle, req.Layer, assocID, "ctx"); err != nil {
				t.Error(err)
			}
			out.Action = engine.ActionContinue
		},
		FlowDelete: func(engine.LayerID, engine.CalloutID, any) { deleted.Add(1) },
	}
	e, id := newEngine(t, engine.Options{},
		callout{key: "block", layer: engine.LayerALEAuthConnectV4, sublayer: 1, action: engine.ActionBlock, conds: []engine.Condition{port(srv.addr().Port())}},
		callout{key: "assoc", layer: engine.LayerALEConnectRedirectV4, sublayer: 1, action: engine.ActionCalloutInspection, reg: assoc})
	assocID = id["assoc"].callout
	dp := inproc.New(e, inproc.Options{})
	_, err := (&inproc.Dialer{Datapath: dp}).Dial("tcp", srv.addr().String())
	var be *inproc.BlockedError
	if !errors.As(err, &be) || !errors.Is(err, inproc.ErrBlocked) {
		t.Fatalf("dial: %v", err)
	}
	if be.Filter != id["block"].filter || be.Layer != engine.LayerALEAuthConnectV4 || be.Reason != engine.ReasonFilterBlock {
		t.Fatalf("blocked error %+v", be)
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "dial" {
		t.Fatalf("not a net.OpError: %T", err)
	}
	srv.stop()
	if n := srv.accepted.Load(); n != 0 {
		t.Fatalf("the server accepted %d connections of a blocked dial", n)
	}
	if n := deleted.Load(); n != 1 {
		t.Fatalf("flow-delete called %d times for the blocked flow", n)
	}
	noLeaks(t, e)
}

// asyncAuth is an AsyncAuthorizer whose decisions the test hands in.
func asyncAuth() (*engine.AsyncAuthorizer, chan engine.ActionType, chan struct{}) {
	decide := make(chan engine.ActionType)
	asked := make(chan struct{}, 16)
	return &engine.AsyncAuthorizer{Decide: func(ctx context.Context, l engine.LayerID, vs engine.Values, m engine.Metadata) engine.ActionType {
		asked <- struct{}{}
		select {
		case a := <-decide:
			return a
		case <-ctx.Done():
			return engine.ActionBlock
		}
	}}, decide, asked
}

// Pend at AUTH_CONNECT: the dial waits for the out-of-band decision.
func TestDialPend(t *testing.T) {
	for _, permit := range []bool{true, false} {
		srv := startEcho(t, mustListen(t))
		a, decide, asked := asyncAuth()
		e, id := newEngine(t, engine.Options{}, callout{key: "auth", layer: engine.LayerALEAuthConnectV4, sublayer: 1,
			action: engine.ActionCalloutTerminating, conds: []engine.Condition{port(srv.addr().Port())}, reg: a.Registration()})
		dp := inproc.New(e, inproc.Options{})
		done := make(chan error, 1)
		var conn net.Conn
		go func() {
			var err error
			conn, err = (&inproc.Dialer{Datapath: dp}).Dial("tcp", srv.addr().String())
			done <- err
		}()
		<-asked
		select {
		case err := <-done:
			t.Fatalf("dial returned before the decision: %v", err)
		default:
		}
		if permit {
			decide <- engine.ActionPermit
		} else {
			decide <- engine.ActionBlock
		}
		err := <-done
		var be *inproc.BlockedError
		switch {
		case permit && err != nil:
			t.Fatalf("pend then permit: %v", err)
		case permit:
			if got, err := roundTrip(conn, []byte("hi")); err != nil || string(got) != "hi" {
				t.Fatalf("echo %q %v", got, err)
			}
			conn.Close()
		case !errors.As(err, &be) || be.Filter != id["auth"].filter || be.Reason != engine.ReasonCalloutBlock:
			t.Fatalf("pend then block: %v", err)
		}
		srv.stop()
		noLeaks(t, e)
	}
}

// A pend nobody completes: the engine's timeout applies the filter's
// default (block); a context that ends first cancels the dial.
func TestDialPendTimeout(t *testing.T) {
	srv := startEcho(t, mustListen(t))
	never := engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		if _, err := req.PendOperation(); err == nil {
			out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
		}
	}}
	e, _ := newEngine(t, engine.Options{PendTimeout: 30 * time.Millisecond}, callout{key: "slow", layer: engine.LayerALEAuthConnectV4,
		sublayer: 1, action: engine.ActionCalloutTerminating, conds: []engine.Condition{port(srv.addr().Port())}, reg: never})
	dp := inproc.New(e, inproc.Options{})
	_, err := (&inproc.Dialer{Datapath: dp}).Dial("tcp", srv.addr().String())
	var be *inproc.BlockedError
	if !errors.As(err, &be) || be.Reason != engine.ReasonPendTimeout {
		t.Fatalf("pend timeout: %v", err)
	}
	// The dialer's own timeout ends the wait first.
	e2, _ := newEngine(t, engine.Options{PendTimeout: time.Hour}, callout{key: "slow", layer: engine.LayerALEAuthConnectV4,
		sublayer: 1, action: engine.ActionCalloutTerminating, conds: []engine.Condition{port(srv.addr().Port())}, reg: never})
	d := &inproc.Dialer{Datapath: inproc.New(e2, inproc.Options{})}
	d.Net.Timeout = 20 * time.Millisecond
	if _, err := d.Dial("tcp", srv.addr().String()); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dialer timeout: %v", err)
	}
	// And so does the datapath's pend bound.
	dp3 := inproc.New(e2, inproc.Options{PendTimeout: 20 * time.Millisecond})
	if _, err := (&inproc.Dialer{Datapath: dp3}).Dial("tcp", srv.addr().String()); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("datapath pend bound: %v", err)
	}
	srv.stop()
	noLeaks(t, e)
	noLeaks(t, e2)
}

// BIND_REDIRECT moves the listener; RESOURCE_ASSIGNMENT sees where it
// really is; AUTH_LISTEN can block.
func TestBindRedirect(t *testing.T) {
	to, denied := reservePort(t), reservePort(t)
	var assigned atomic.Value
	br := &engine.BindRedirect{Target: func(req *engine.ClassifyRequest) (netip.AddrPort, bool) { return to, true }}
	e, id := newEngine(t, engine.Options{},
		callout{key: "bind", layer: engine.LayerALEBindRedirectV4, sublayer: 1, reg: br.Registration(),
			conds: []engine.Condition{{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(0)}}},
		callout{key: "assign", layer: engine.LayerALEResourceAssignmentV4, sublayer: 1, action: engine.ActionCalloutInspection,
			reg: engine.InlineInspection(func(req *engine.ClassifyRequest) {
				assigned.Store(netip.AddrPortFrom(req.Values.Get(engine.FieldIPLocalAddress).Addr(), uint16(req.Values.Uint(engine.FieldIPLocalPort))))
			})},
		callout{key: "nolisten", layer: engine.LayerALEAuthListenV4, sublayer: 1, action: engine.ActionBlock,
			conds: []engine.Condition{{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(denied.Port())}}},
	)
	dp := inproc.New(e, inproc.Options{})
	lc := &inproc.ListenConfig{Datapath: dp}
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if got := apOf(ln.Addr()); got != to {
		t.Fatalf("listening on %v, bind redirect said %v", got, to)
	}
	if got := assigned.Load(); got != to {
		t.Fatalf("resource assignment saw %v", got)
	}
	srv := startEcho(t, ln)
	c, err := (&inproc.Dialer{Datapath: dp}).Dial("tcp", to.String())
	if err != nil {
		t.Fatal(err)
	}
	if got, err := roundTrip(c, []byte("x")); err != nil || string(got) != "x" {
		t.Fatalf("echo %q %v", got, err)
	}
	c.Close()
	srv.stop()

	// AUTH_LISTEN blocks a listen after the bind; the socket is released.
	_, err = lc.Listen(context.Background(), "tcp4", denied.String())
	var be *inproc.BlockedError
	if !errors.As(err, &be) || be.Filter != id["nolisten"].filter || be.Layer != engine.LayerALEAuthListenV4 {
		t.Fatalf("auth listen block: %v", err)
	}
	if l, err := net.Listen("tcp4", denied.String()); err != nil {
		t.Fatalf("the blocked listener still holds its port: %v", err)
	} else {
		l.Close()
	}
	noLeaks(t, e)
}

// AUTH_RECV_ACCEPT: a blocked connection is closed and never returned; a
// pended one does not stall the others and is returned once permitted.
func TestAcceptBlockAndPend(t *testing.T) {
	var n atomic.Int32
	seen := make(chan struct{}, 3)
	var held *engine.Pend
	var heldData any
	var mu sync.Mutex
	reg := engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		defer func() { seen <- struct{}{} }()
		switch n.Add(1) {
		case 1: // pend
			p, err := req.PendOperation()
			if err != nil {
				out.Action = engine.ActionBlock
				return
			}
			mu.Lock()
			held, heldData = p, req.LayerData
			mu.Unlock()
			out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
		case 2:
			out.Action = engine.ActionBlock
		default:
			out.Action = engine.ActionPermit
		}
	}}
	e, _ := newEngine(t, engine.Options{}, callout{key: "acc", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 1,
		action: engine.ActionCalloutTerminating, reg: reg})
	dp := inproc.New(e, inproc.Options{})
	ln := listen(t, &inproc.ListenConfig{Datapath: dp})
	defer ln.Close()
	clients := make([]net.Conn, 3)
	for i := range clients {
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients[i] = c
		<-seen // classified in order
	}
	// The permitted third comes first; the pended first is still held.
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if apOf(a.RemoteAddr()) != apOf(clients[2].LocalAddr()) {
		t.Fatalf("accepted %v, want the permitted %v", a.RemoteAddr(), clients[2].LocalAddr())
	}
	a.Close()
	// The blocked second was closed by the datapath.
	clients[1].SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := clients[1].Read(make([]byte, 1)); err == nil {
		t.Fatal("the blocked connection is open")
	}
	mu.Lock()
	p, data := held, heldData
	mu.Unlock()
	if _, ok := data.(net.Conn); !ok {
		t.Fatalf("layer data is %T, want the accepted net.Conn", data)
	}
	if err := e.CompleteOperation(p, data); err != nil {
		t.Fatal(err)
	}
	a, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if apOf(a.RemoteAddr()) != apOf(clients[0].LocalAddr()) {
		t.Fatalf("accepted %v, want the pended %v", a.RemoteAddr(), clients[0].LocalAddr())
	}
	a.Write([]byte("ok"))
	a.Close()
	if b, err := io.ReadAll(clients[0]); err != nil || string(b) != "ok" {
		t.Fatalf("pended client read %q %v", b, err)
	}
	ln.Close()
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("accept after close: %v", err)
	}
	noLeaks(t, e)
}

// Flow contexts associated at FLOW_ESTABLISHED are deleted exactly once
// per flow, and ENDPOINT_CLOSURE sees every flow, however often Close runs.
func TestFlowDeleteOnceAndEndpointClosure(t *testing.T) {
	cc, e := newCloseCounter(t)
	dp := inproc.New(e, inproc.Options{})
	ln := listen(t, &inproc.ListenConfig{Datapath: dp})
	const n = 20
	var flows []engine.FlowHandle
	for range n {
		c, err := (&inproc.Dialer{Datapath: dp}).Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		a, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		flows = append(flows, c.(*inproc.Conn).Flow(), a.(*inproc.Conn).Flow())
		for range 2 {
			c.Close()
			a.Close()
		}
	}
	ln.Close()
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if len(cc.deleted) != 2*n || len(cc.closedFlows) != 2*n {
		t.Fatalf("flow-delete for %d flows, closure for %d; want %d", len(cc.deleted), len(cc.closedFlows), 2*n)
	}
	for _, f := range flows {
		if cc.deleted[f] != 1 || cc.closedFlows[f] != 1 {
			t.Fatalf("flow %d: deleted %d times, closure %d times", f, cc.deleted[f], cc.closedFlows[f])
		}
	}
	noLeaks(t, e)
}

func mustListen(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}
