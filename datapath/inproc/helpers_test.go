package inproc_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
	"fwp/proxy"
)

// callout is one provider+sublayer+callout+filter for a test engine.
type callout struct {
	key      string
	layer    engine.LayerID
	sublayer uint16
	action   engine.ActionType // default CALLOUT_UNKNOWN
	flags    engine.FilterFlags
	conds    []engine.Condition
	reg      engine.CalloutRegistration
}

type ids struct {
	callout engine.CalloutID
	filter  engine.FilterID
}

func newEngine(t testing.TB, opts engine.Options, cs ...callout) (*engine.Engine, map[string]ids) {
	t.Helper()
	e := engine.New(opts)
	out := map[string]ids{}
	err := e.Update(func(tx *engine.Txn) error {
		for _, c := range cs {
			p, err := tx.AddProvider(engine.Provider{Key: "prov-" + c.key})
			if err != nil {
				return err
			}
			sl, err := tx.AddSublayer(engine.Sublayer{Key: "sub-" + c.key, Provider: p, Weight: c.sublayer})
			if err != nil {
				return err
			}
			act := c.action
			if act == 0 {
				act = engine.ActionCalloutUnknown
			}
			f := engine.Filter{Layer: c.layer, Sublayer: sl, Provider: p, Conditions: c.conds, Flags: c.flags, Action: engine.Action{Type: act}}
			var co engine.CalloutID
			if act.IsCallout() {
				if co, err = tx.AddCallout(engine.Callout{Key: c.key, Provider: p, Layer: c.layer}); err != nil {
					return err
				}
				f.Action.Callout = co
			}
			id, err := tx.AddFilter(f)
			if err != nil {
				return err
			}
			out[c.key] = ids{co, id}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		if c.reg.Classify != nil {
			if err := e.RegisterCallout(c.key, c.reg); err != nil {
				t.Fatal(err)
			}
		}
	}
	return e, out
}

// noLeaks waits for the engine to hold nothing: pends, handles, flow
// contexts, redirect handles (destroy yours first).
func noLeaks(t testing.TB, e *engine.Engine) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		o := e.Outstanding()
		if o == (engine.Outstanding{}) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("engine still holds %+v", o)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func port(p uint16) engine.Condition {
	return engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(p)}
}

func apOf(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		return a.AddrPort()
	case *net.UDPAddr:
		return a.AddrPort()
	}
	return netip.AddrPort{}
}

// redirectTo sends a flow to a local proxy with its original destination
// as context, as WFPSampler's proxy callout does.
func redirectTo(to netip.AddrPort, pid uint32) func(*engine.ClassifyRequest) (engine.RedirectTarget, bool) {
	return func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
		orig := netip.AddrPortFrom(req.Values.Get(engine.FieldIPRemoteAddress).Addr(), uint16(req.Values.Uint(engine.FieldIPRemotePort)))
		b, _ := orig.MarshalBinary()
		return engine.RedirectTarget{To: to, TargetPID: pid, Context: b}, true
	}
}

// reservePort returns a loopback TCP port that was free a moment ago.
func reservePort(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := apOf(ln.Addr())
	ln.Close()
	return ap
}

// echoServer accepts on ln and echoes each connection, counting them.
type echoServer struct {
	ln       net.Listener
	accepted atomic.Int64
	wg       sync.WaitGroup
}

// settled waits (bounded) until the server has accepted want connections,
// so that a later count sees no accept of an earlier dial arriving late.
func (s *echoServer) settled(t testing.TB, want int64) int64 {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for s.accepted.Load() < want && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	n := s.accepted.Load()
	if n != want {
		t.Fatalf("the server accepted %d connections, want the %d dialed", n, want)
	}
	return n
}

func startEcho(t testing.TB, ln net.Listener) *echoServer {
	s := &echoServer{ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.accepted.Add(1)
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(s.stop)
	return s
}

func (s *echoServer) stop() { s.ln.Close(); s.wg.Wait() }

func (s *echoServer) addr() netip.AddrPort { return apOf(s.ln.Addr()) }

// testProxy is the proxy of seed 000: query, dial the original
// destination with the records set, splice.
type testProxy struct {
	ln       net.Listener
	dp       *inproc.Datapath
	accepted atomic.Int64
	wg       sync.WaitGroup
	mu       sync.Mutex
	original []netip.AddrPort
	outFlows []engine.FlowHandle
	errs     []error
}

func startProxy(t testing.TB, dp *inproc.Datapath, ln net.Listener) *testProxy {
	p := &testProxy{ln: ln, dp: dp}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.accepted.Add(1)
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				defer c.Close()
				if err := p.handle(c); err != nil {
					p.mu.Lock()
					p.errs = append(p.errs, err)
					p.mu.Unlock()
				}
			}()
		}
	}()
	t.Cleanup(p.stop)
	return p
}

func (p *testProxy) handle(c net.Conn) error {
	recs, err := proxy.QueryRedirectRecords(c)
	if err != nil {
		return err
	}
	rctx, err := proxy.QueryRedirectContext(c)
	if err != nil {
		return err
	}
	var orig netip.AddrPort
	if err := orig.UnmarshalBinary(rctx); err != nil {
		return err
	}
	d := &inproc.Dialer{Datapath: p.dp}
	if err := proxy.SetRedirectRecords(d, recs); err != nil {
		return err
	}
	out, err := d.DialContext(context.Background(), "tcp", orig.String())
	if err != nil {
		return err
	}
	defer out.Close()
	p.mu.Lock()
	p.original = append(p.original, orig)
	p.outFlows = append(p.outFlows, out.(*inproc.Conn).Flow())
	p.mu.Unlock()
	_, _, err = proxy.Splice(c, out)
	return err
}

func (p *testProxy) stop() { p.ln.Close(); p.wg.Wait() }

func (p *testProxy) addr() netip.AddrPort { return apOf(p.ln.Addr()) }

func (p *testProxy) errors() []error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]error(nil), p.errs...)
}

// roundTrip writes msg, half-closes and reads everything back.
func roundTrip(c net.Conn, msg []byte) ([]byte, error) {
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		if err == nil {
			err = c.(interface{ CloseWrite() error }).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if werr := <-errc; err == nil {
		err = werr
	}
	return got, err
}

func listen(t testing.TB, lc *inproc.ListenConfig) net.Listener {
	t.Helper()
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func isBlocked(err error) bool {
	var be *inproc.BlockedError
	return errors.As(err, &be) && errors.Is(err, inproc.ErrBlocked)
}

// goroutines returns a check that the goroutine count comes back to what
// it is now (the goleak idea, without the dependency): call it at the end.
func goroutines(t testing.TB) func() {
	t.Helper()
	base := runtime.NumGoroutine()
	return func() {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= base {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Fatalf("%d goroutines, %d before:\n%s", n, base, buf[:runtime.Stack(buf, true)])
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// closeCounter counts the flow-deletes of a context associated with each
// flow at FLOW_ESTABLISHED, and the ENDPOINT_CLOSURE classifications per
// flow and per endpoint.
type closeCounter struct {
	mu              sync.Mutex
	deleted         map[engine.FlowHandle]int
	closedFlows     map[engine.FlowHandle]int
	closedEndpoints map[uint64]int
}

func newCloseCounter(t testing.TB) (*closeCounter, *engine.Engine) {
	cc := &closeCounter{deleted: map[engine.FlowHandle]int{}, closedFlows: map[engine.FlowHandle]int{}, closedEndpoints: map[uint64]int{}}
	var assocID engine.CalloutID
	assoc := engine.CalloutRegistration{
		Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			if err := req.Engine().FlowAssociateContext(req.Meta.FlowHandle, req.Layer, assocID, req.Meta.FlowHandle); err != nil {
				t.Error(err)
			}
			out.Action = engine.ActionContinue
		},
		FlowDelete: func(_ engine.LayerID, _ engine.CalloutID, ctx any) {
			cc.mu.Lock()
			cc.deleted[ctx.(engine.FlowHandle)]++
			cc.mu.Unlock()
		},
	}
	closure := engine.InlineInspection(func(req *engine.ClassifyRequest) {
		cc.mu.Lock()
		defer cc.mu.Unlock()
		cc.closedEndpoints[req.Meta.TransportEndpointHandle]++
		if req.Meta.Has(engine.MetaFlowHandle) {
			cc.closedFlows[req.Meta.FlowHandle]++
		}
	})
	e, id := newEngine(t, engine.Options{},
		callout{key: "assoc", layer: engine.LayerALEFlowEstablishedV4, sublayer: 1, action: engine.ActionCalloutInspection, reg: assoc},
		callout{key: "closure", layer: engine.LayerALEEndpointClosureV4, sublayer: 1, action: engine.ActionCalloutInspection, reg: closure},
	)
	assocID = id["assoc"].callout
	return cc, e
}

// udpResponderOn answers each datagram on network/address with prefix+payload.
func udpResponderOn(t *testing.T, network, address, prefix string) net.PacketConn {
	t.Helper()
	pc, err := net.ListenPacket(network, address)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(append([]byte(prefix), buf[:n]...), from)
		}
	}()
	t.Cleanup(func() { pc.Close() })
	return pc
}

// newRedirect is an engine with one ConnectRedirect callout on layer (its
// filter's conditions conds) sending flows to to, and a datapath on it.
func newRedirect(t testing.TB, layer engine.LayerID, conds []engine.Condition, to netip.AddrPort) (*engine.Engine, *inproc.Datapath, *engine.ConnectRedirect) {
	t.Helper()
	e, _ := newEngine(t, engine.Options{}, callout{key: "r", layer: layer, sublayer: 1, conds: conds})
	dp := inproc.New(e, inproc.Options{})
	cr := &engine.ConnectRedirect{Handle: e.RedirectHandleCreate("r"), Target: redirectTo(to, dp.Identity().PID)}
	if err := e.RegisterCallout("r", cr.Registration()); err != nil {
		t.Fatal(err)
	}
	return e, dp, cr
}
