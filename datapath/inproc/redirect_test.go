package inproc_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"fwp/datapath/inproc"
	"fwp/engine"
	"fwp/proxy"
)

// A client dials a server; a connect-redirect callout sends it through the
// local proxy. Bytes flow both ways, the proxy sees the original
// destination, its own outbound is REDIRECTED_BY_SELF and not redirected,
// and AUTH_CONNECT sees truthful metadata.
func TestRedirectThroughProxy(t *testing.T) {
	for _, async := range []bool{false, true} {
		t.Run(fmt.Sprintf("async=%v", async), func(t *testing.T) {
			cr := &engine.ConnectRedirect{Async: async}
			var states sync.Map // flow -> state before the redirect callout
			var authMu sync.Mutex
			var authSeen []engine.Metadata
			var authVals []engine.Values
			observe := engine.InlineInspection(func(req *engine.ClassifyRequest) {
				states.Store(req.Meta.FlowHandle, req.RedirectState(cr.Handle))
			})
			auth := engine.InlineInspection(func(req *engine.ClassifyRequest) {
				authMu.Lock()
				authSeen = append(authSeen, *req.Meta)
				authVals = append(authVals, *req.Values)
				authMu.Unlock()
			})
			srvAddr := reservePort(t)
			e, id := newEngine(t, engine.Options{},
				callout{key: "observe", layer: engine.LayerALEConnectRedirectV4, sublayer: 200, action: engine.ActionCalloutInspection, conds: []engine.Condition{port(srvAddr.Port())}, reg: observe},
				callout{key: "redirect", layer: engine.LayerALEConnectRedirectV4, sublayer: 100, conds: []engine.Condition{port(srvAddr.Port())}},
				callout{key: "auth", layer: engine.LayerALEAuthConnectV4, sublayer: 100, action: engine.ActionCalloutInspection, reg: auth},
			)
			dp := inproc.New(e, inproc.Options{})
			lc := &inproc.ListenConfig{Datapath: dp}
			srvLn, err := lc.Listen(context.Background(), "tcp4", srvAddr.String())
			if err != nil {
				t.Fatal(err)
			}
			srv := startEcho(t, srvLn)
			px := startProxy(t, dp, listen(t, lc))
			cr.Handle = e.RedirectHandleCreate("proxy")
			cr.Target = redirectTo(px.addr(), dp.Identity().PID)
			if err := e.RegisterCallout("redirect", cr.Registration()); err != nil {
				t.Fatal(err)
			}

			d := &inproc.Dialer{Datapath: dp}
			c, err := d.Dial("tcp", srv.addr().String())
			if err != nil {
				t.Fatal(err)
			}
			ic := c.(*inproc.Conn)
			if ic.RedirectedRemote() != px.addr() || apOf(c.RemoteAddr()) != srv.addr() {
				t.Fatalf("socket went to %v, RemoteAddr %v; want proxy %v, server %v", ic.RedirectedRemote(), c.RemoteAddr(), px.addr(), srv.addr())
			}
			if o, ok := ic.OriginalDestination(); !ok || o != srv.addr() {
				t.Fatalf("original destination %v %v", o, ok)
			}
			msg := bytes.Repeat([]byte("ping-"), 50000)
			got, err := roundTrip(c, msg)
			if err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("echo through proxy: %d bytes, err %v", len(got), err)
			}
			c.Close()
			px.stop()
			srv.stop()
			if errs := px.errors(); len(errs) != 0 {
				t.Fatalf("proxy errors: %v", errs)
			}
			if px.accepted.Load() != 1 || srv.accepted.Load() != 1 || len(px.original) != 1 || px.original[0] != srv.addr() {
				t.Fatalf("proxy accepted %d, server %d, originals %v", px.accepted.Load(), srv.accepted.Load(), px.original)
			}
			if st, _ := states.Load(ic.Flow()); st != engine.NotRedirected {
				t.Fatalf("client flow state %v", st)
			}
			if st, _ := states.Load(px.outFlows[0]); st != engine.RedirectedBySelf {
				t.Fatalf("proxy outbound state %v, want redirected_by_self", st)
			}

			// AUTH_CONNECT: the client's flow is redirected, the proxy's not.
			authMu.Lock()
			defer authMu.Unlock()
			var client, outbound *engine.Metadata
			for i := range authSeen {
				switch authSeen[i].FlowHandle {
				case ic.Flow():
					client = &authSeen[i]
					flags := uint32(authVals[i].Uint(engine.FieldFlags))
					if flags&engine.FlagIsConnectionRedirected == 0 || flags&engine.FlagIsLoopback == 0 ||
						authVals[i].Uint(engine.FieldIPRemotePort) != uint64(px.addr().Port()) ||
						authVals[i].Uint(engine.FieldALEOriginalRemotePort) != uint64(srv.addr().Port()) {
						t.Errorf("client auth values: %s", authVals[i].String())
					}
				case px.outFlows[0]:
					outbound = &authSeen[i]
					if uint32(authVals[i].Uint(engine.FieldFlags))&engine.FlagIsConnectionRedirected != 0 {
						t.Errorf("proxy outbound marked redirected: %s", authVals[i].String())
					}
				}
			}
			if client == nil || outbound == nil {
				t.Fatalf("auth-connect saw %d flows, not the client's and the proxy's", len(authSeen))
			}
			me := inproc.ProcessIdentity()
			if !client.Has(engine.MetaProcessID) || client.ProcessID != me.PID || !client.Has(engine.MetaProcessPath) || client.ProcessPath != me.Path ||
				!client.Has(engine.MetaFlowHandle) || !client.Has(engine.MetaPacketDirection) || client.Direction != engine.DirectionOutbound ||
				!client.Has(engine.MetaOriginalDestination) || client.OriginalDestination != srv.addr() ||
				!client.Has(engine.MetaLocalRedirectTargetPID) || client.LocalRedirectTargetPID != me.PID ||
				!client.Has(engine.MetaRedirectRecords) || client.RedirectRecords.Len() != 1 {
				t.Errorf("client auth metadata: %+v", *client)
			}
			if me.UID >= 0 && (!client.Has(engine.MetaUserID) || client.UserID != uint32(me.UID)) {
				t.Errorf("uid metadata: %+v", *client)
			}
			// What the datapath cannot know stays absent: before connect, no
			// interface, MTU or parent endpoint.
			for _, f := range []engine.MetaField{engine.MetaSourceInterfaceIndex, engine.MetaDestinationInterfaceIndex,
				engine.MetaParentEndpointHandle, engine.MetaPathMTU, engine.MetaRemoteScopeID} {
				if client.Has(f) {
					t.Errorf("metadata field %#x present, the datapath does not know it", f)
				}
			}
			if !outbound.Has(engine.MetaRedirectRecords) || outbound.RedirectRecords.Len() != 1 || outbound.Has(engine.MetaOriginalDestination) {
				t.Errorf("proxy outbound metadata: %+v", *outbound)
			}
			if r, _ := outbound.RedirectRecords.Last(); r.Filter != id["redirect"].filter {
				t.Errorf("records name filter %v", r.Filter)
			}
			e.RedirectHandleDestroy(cr.Handle)
			noLeaks(t, e)
		})
	}
}

// Two proxies of two providers in two sublayers both redirect the
// server's port: every connection goes client → A → B → server exactly
// once per hop, and never loops.
func TestTwoProxiesChain(t *testing.T) {
	const n = 1000
	srvAddr := reservePort(t)
	crA := &engine.ConnectRedirect{}
	crB := &engine.ConnectRedirect{Async: true}
	e, _ := newEngine(t, engine.Options{},
		callout{key: "A", layer: engine.LayerALEConnectRedirectV4, sublayer: 200, conds: []engine.Condition{port(srvAddr.Port())}},
		callout{key: "B", layer: engine.LayerALEConnectRedirectV4, sublayer: 100, conds: []engine.Condition{port(srvAddr.Port())}},
	)
	dp := inproc.New(e, inproc.Options{})
	lc := &inproc.ListenConfig{Datapath: dp}
	srvLn, err := lc.Listen(context.Background(), "tcp4", srvAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	srv := startEcho(t, srvLn)
	pa, pb := startProxy(t, dp, listen(t, lc)), startProxy(t, dp, listen(t, lc))
	crA.Handle, crA.Target = e.RedirectHandleCreate("A"), redirectTo(pa.addr(), dp.Identity().PID)
	crB.Handle, crB.Target = e.RedirectHandleCreate("B"), redirectTo(pb.addr(), dp.Identity().PID)
	for k, cr := range map[string]*engine.ConnectRedirect{"A": crA, "B": crB} {
		if err := e.RegisterCallout(k, cr.Registration()); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	var failed atomic.Int64
	errc := make(chan error, 1)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := &inproc.Dialer{Datapath: dp}
			c, err := d.Dial("tcp", srvAddr.String())
			if err == nil {
				msg := []byte(fmt.Sprintf("conn %d", i))
				var got []byte
				got, err = roundTrip(c, msg)
				c.Close()
				if err == nil && !bytes.Equal(got, msg) {
					err = fmt.Errorf("conn %d got %q", i, got)
				}
			}
			if err != nil && failed.Add(1) == 1 {
				errc <- err
			}
		}()
	}
	wg.Wait()
	if failed.Load() > 0 {
		pe := append(pa.errors(), pb.errors()...)
		if len(pe) > 3 {
			pe = pe[:3]
		}
		t.Fatalf("%d connections failed, first: %v; proxy errors: %v", failed.Load(), <-errc, pe)
	}
	pa.stop()
	pb.stop()
	srv.stop()
	if errs := append(pa.errors(), pb.errors()...); len(errs) > 0 {
		t.Fatalf("proxy errors (%d): %v", len(errs), errs[0])
	}
	if a, b, s := pa.accepted.Load(), pb.accepted.Load(), srv.accepted.Load(); a != n || b != n || s != n {
		t.Fatalf("hops: proxy A %d, proxy B %d, server %d; want %d each", a, b, s, n)
	}
	for _, o := range append(pa.original, pb.original...) {
		if o != srvAddr {
			t.Fatalf("a proxy saw original destination %v, want %v", o, srvAddr)
		}
	}
	e.RedirectHandleDestroy(crA.Handle)
	e.RedirectHandleDestroy(crB.Handle)
	noLeaks(t, e)
}

// Only the redirect target process may read the redirect context; the
// records are readable; a connection nobody redirected is not found.
func TestQueryRedirectContextAccessDenied(t *testing.T) {
	srvAddr := reservePort(t)
	cr := &engine.ConnectRedirect{}
	e, _ := newEngine(t, engine.Options{}, callout{key: "r", layer: engine.LayerALEConnectRedirectV4, sublayer: 1, conds: []engine.Condition{port(srvAddr.Port())}})
	dp := inproc.New(e, inproc.Options{})
	other := dp.Identity()
	other.PID++
	pxLn := listen(t, &inproc.ListenConfig{Datapath: dp, Identity: &other}) // plays another process
	cr.Handle, cr.Target = e.RedirectHandleCreate("r"), redirectTo(apOf(pxLn.Addr()), dp.Identity().PID)
	if err := e.RegisterCallout("r", cr.Registration()); err != nil {
		t.Fatal(err)
	}
	c, ac := dialAccept(t, dp, pxLn, srvAddr.String())
	if _, err := proxy.QueryRedirectContext(ac); !errors.Is(err, proxy.ErrAccessDenied) {
		t.Fatalf("context for a non-target caller: %v", err)
	}
	recs, err := proxy.QueryRedirectRecords(ac)
	if err != nil {
		t.Fatal(err)
	}
	if r, err := e.UnmarshalRedirectRecords(recs); err != nil || engine.QueryConnectionRedirectState(r, cr.Handle) != engine.RedirectedBySelf {
		t.Fatalf("records: %v", err)
	}

	// A plain listener's connection: the datapath answers by 4-tuple once
	// registered as a backend, and the caller is this process.
	plain, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	c2, ac2 := dialAccept(t, dp, plain, plain.Addr().String())
	if _, err := proxy.QueryRedirectRecords(ac2); !errors.Is(err, proxy.ErrNotSupported) {
		t.Fatalf("plain conn, no backend: %v", err)
	}
	unregister := proxy.Register(dp)
	defer unregister()
	if _, err := proxy.QueryRedirectRecords(ac2); !errors.Is(err, proxy.ErrNotFound) {
		t.Fatalf("plain conn nobody redirected: %v", err)
	}
	// The accepted connection of the redirect, seen as a plain net.Conn
	// (through NetConn unwrapping it would be found directly; here by tuple).
	plainView := struct{ net.Conn }{ac.(*inproc.Conn).Conn}
	got, err := proxy.QueryRedirectContext(plainView)
	var orig netip.AddrPort
	if err != nil || orig.UnmarshalBinary(got) != nil || orig != srvAddr {
		t.Fatalf("context by 4-tuple: %v %v", orig, err)
	}
	if _, err := (&inproc.Dialer{}).Dial("tcp", srvAddr.String()); !errors.Is(err, proxy.ErrInvalidArgument) {
		t.Fatalf("dialer without datapath: %v", err)
	}
	c.Close()
	c2.Close()
	ac.Close()
	pxLn.Close()
	e.RedirectHandleDestroy(cr.Handle)
	noLeaks(t, e)
}

func TestSetRedirectRecordsRejectsForeignRecords(t *testing.T) {
	e1, e2 := engine.New(engine.Options{}), engine.New(engine.Options{})
	rec := engine.NewRedirectRecords(engine.RedirectRecord{Handle: 1, Original: netip.MustParseAddrPort("10.0.0.1:80"), Redirected: netip.MustParseAddrPort("127.0.0.1:1")})
	d := &inproc.Dialer{Datapath: inproc.New(e1, inproc.Options{})}
	if err := proxy.SetRedirectRecords(d, e2.MarshalRedirectRecords(rec)); !errors.Is(err, proxy.ErrInvalidArgument) || !errors.Is(err, engine.ErrRecordsNotTrusted) {
		t.Fatalf("records of another engine: %v", err)
	}
	if err := proxy.SetRedirectRecords(d, e1.MarshalRedirectRecords(rec)); err != nil {
		t.Fatal(err)
	}
}

// FuzzSetRedirectRecords: the records blob comes from outside (a proxy
// may pass anything); bad input is a typed error, never a panic.
func FuzzSetRedirectRecords(f *testing.F) {
	e := engine.New(engine.Options{})
	good := e.MarshalRedirectRecords(engine.NewRedirectRecords(engine.RedirectRecord{Handle: 7, TargetPID: 9,
		Original: netip.MustParseAddrPort("[2001:db8::1]:443"), Redirected: netip.MustParseAddrPort("[::1]:8443")}))
	f.Add(good)
	f.Add([]byte{})
	f.Add([]byte("FWPR\x01\x00"))
	f.Add(good[:len(good)-1])
	d := &inproc.Dialer{Datapath: inproc.New(e, inproc.Options{})}
	f.Fuzz(func(t *testing.T, b []byte) {
		err := d.SetRedirectRecords(b)
		if err != nil && !errors.Is(err, proxy.ErrInvalidArgument) {
			t.Fatalf("untyped error: %v", err)
		}
		if err == nil && !bytes.Equal(b, good) {
			t.Fatalf("accepted records the engine never issued: %x", b)
		}
	})
}

// dialAccept dials addr through dp and accepts the connection on ln.
func dialAccept(t *testing.T, dp *inproc.Datapath, ln net.Listener, addr string) (net.Conn, net.Conn) {
	t.Helper()
	c, err := (&inproc.Dialer{Datapath: dp}).Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ac, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ac.Close() })
	return c, ac
}
