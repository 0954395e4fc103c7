package engine

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// rtEngine builds an engine with one provider, sublayer and callout per
// spec on the given layers, and registers the callouts.
type rtCallout struct {
	key      string
	layer    LayerID
	sublayer uint16 // sublayer weight; each callout gets its own sublayer
	action   ActionType
	flags    FilterFlags
	conds    []Condition
	reg      CalloutRegistration
}

type rtIDs struct {
	callout CalloutID
	filter  FilterID
	sub     SublayerID
}

func rtEngine(t testing.TB, opts Options, cs ...rtCallout) (*Engine, map[string]rtIDs) {
	t.Helper()
	e := New(opts)
	ids := map[string]rtIDs{}
	err := e.Update(func(tx *Txn) error {
		for _, c := range cs {
			p, err := tx.AddProvider(Provider{Key: "prov-" + c.key})
			if err != nil {
				return err
			}
			sl, err := tx.AddSublayer(Sublayer{Key: "sub-" + c.key, Provider: p, Weight: c.sublayer})
			if err != nil {
				return err
			}
			co, err := tx.AddCallout(Callout{Key: c.key, Provider: p, Layer: c.layer})
			if err != nil {
				return err
			}
			act := c.action
			if act == 0 {
				act = ActionCalloutUnknown
			}
			f, err := tx.AddFilter(Filter{Layer: c.layer, Sublayer: sl, Provider: p, Conditions: c.conds,
				Action: Action{Type: act, Callout: co}, Flags: c.flags})
			if err != nil {
				return err
			}
			ids[c.key] = rtIDs{co, f, sl}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		if err := e.RegisterCallout(c.key, c.reg); err != nil {
			t.Fatal(err)
		}
	}
	return e, ids
}

func tcpValues(local, remote string) *Values {
	var vs Values
	vs.SetTuple(6, netip.MustParseAddrPort(local), netip.MustParseAddrPort(remote))
	return &vs
}

func noLeaks(t *testing.T, e *Engine) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		o := e.Outstanding()
		if o.Pends == 0 && o.ClassifyHandles == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("leak: %+v", o)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

var (
	client   = "10.0.0.5:40000"
	server   = "10.0.0.1:80"
	proxyA   = netip.MustParseAddrPort("127.0.0.1:1001")
	proxyB   = netip.MustParseAddrPort("127.0.0.1:1002")
	proxyC   = netip.MustParseAddrPort("127.0.0.1:1003")
	port80   = Condition{Field: FieldIPRemotePort, Match: MatchEqual, Value: Uint16(80)}
	redirLay = LayerALEConnectRedirectV4
)

func redirectTo(to netip.AddrPort, pid uint32) func(*ClassifyRequest) (RedirectTarget, bool) {
	return func(req *ClassifyRequest) (RedirectTarget, bool) {
		orig := addrPort(req.Values.Get(FieldIPRemoteAddress), req.Values.Get(FieldIPRemotePort))
		b, _ := orig.MarshalBinary()
		return RedirectTarget{To: to, TargetPID: pid, Context: b}, true
	}
}

// Seed 001, inline recipe: the callout redirects inside classify; the
// auth-connect layer then sees IS_CONNECTION_REDIRECTED, the original
// destination and the redirect target PID.
func TestInlineConnectRedirect(t *testing.T) {
	e0 := New(Options{})
	h := e0.RedirectHandleCreate("proxy")
	cr := &ConnectRedirect{Handle: h, Target: redirectTo(proxyA, 4242)}
	var authMeta Metadata
	var authVals Values
	e, ids := rtEngine(t, Options{},
		rtCallout{key: "redir", layer: redirLay, sublayer: 10, conds: []Condition{port80}, reg: cr.Registration()},
		rtCallout{key: "auth", layer: LayerALEAuthConnectV4, sublayer: 10, action: ActionCalloutInspection,
			conds: []Condition{{Field: FieldFlags, Match: MatchFlagsAllSet, Value: Uint32(FlagIsConnectionRedirected)}},
			reg:   InlineInspection(func(req *ClassifyRequest) { authMeta, authVals = *req.Meta, *req.Values })},
	)
	cr.Handle = e.RedirectHandleCreate("proxy")
	vs := tcpValues(client, server)
	res := e.Classify(redirLay, vs, &Metadata{})
	if !res.Permitted() || res.Filter != ids["redir"].filter || res.Redirect == nil || !res.Redirect.Redirected() {
		t.Fatalf("redirect classify: %v redirect=%+v", res, res.Redirect)
	}
	if got := res.Redirect.Remote(); got != proxyA {
		t.Fatalf("remote = %v, want %v", got, proxyA)
	}
	recs := res.Redirect.Records.Records()
	if len(recs) != 1 || recs[0].Handle != cr.Handle || recs[0].Original.String() != server || recs[0].Redirected != proxyA ||
		recs[0].TargetPID != 4242 || recs[0].Filter != ids["redir"].filter || recs[0].Callout != ids["redir"].callout {
		t.Fatalf("records = %+v", recs)
	}
	// Auth-connect of the redirected flow.
	meta := Metadata{}
	res.Redirect.ApplyTo(vs, &meta)
	ares := e.Classify(LayerALEAuthConnectV4, vs, &meta)
	if !ares.Permitted() {
		t.Fatalf("auth: %v", ares)
	}
	if !authMeta.Has(MetaOriginalDestination) || authMeta.OriginalDestination.String() != server {
		t.Fatalf("original destination metadata = %v (present %v)", authMeta.OriginalDestination, authMeta.Has(MetaOriginalDestination))
	}
	if !authMeta.Has(MetaLocalRedirectTargetPID) || authMeta.LocalRedirectTargetPID != 4242 {
		t.Fatalf("target pid metadata = %d", authMeta.LocalRedirectTargetPID)
	}
	var ctxDest netip.AddrPort
	if err := ctxDest.UnmarshalBinary(authMeta.RedirectContext); err != nil || ctxDest.String() != server {
		t.Fatalf("redirect context = %v %v", ctxDest, err)
	}
	if got := authVals.Get(FieldALEOriginalRemotePort).Uint(); got != 80 {
		t.Fatalf("original remote port value = %d", got)
	}
	if authVals.Get(FieldIPRemotePort).Uint() != uint64(proxyA.Port()) {
		t.Fatalf("auth-connect sees remote port %d", authVals.Get(FieldIPRemotePort).Uint())
	}
	// Another port is not redirected.
	res = e.Classify(redirLay, tcpValues(client, "10.0.0.1:443"), &Metadata{})
	if res.Redirect != nil || res.Reason != ReasonNoMatch {
		t.Fatalf("port 443: %v %+v", res, res.Redirect)
	}
	noLeaks(t, e)
}

// Seed 001, asynchronous recipe: pend classify, complete from another
// goroutine.
func TestAsyncConnectRedirect(t *testing.T) {
	cr := &ConnectRedirect{Target: redirectTo(proxyA, 7), Async: true}
	e, ids := rtEngine(t, Options{}, rtCallout{key: "redir", layer: redirLay, sublayer: 10, conds: []Condition{port80}, reg: cr.Registration()})
	cr.Handle = e.RedirectHandleCreate("proxy")

	res := e.Classify(redirLay, tcpValues(client, server), &Metadata{})
	if res.Pend == nil || res.Action != ActionBlock || res.Reason != ReasonPended || res.Filter != ids["redir"].filter {
		t.Fatalf("first classify should pend: %v", res)
	}
	p := res.Pend
	if p.Wait(context.Background()) != PendCompleted {
		t.Fatalf("pend outcome %v", p.Outcome())
	}
	res = e.finishPend(p, p.Outcome(), nil, nil)
	if !res.Permitted() || res.Redirect.Remote() != proxyA {
		t.Fatalf("resumed: %v %+v", res, res.Redirect)
	}
	// The one-call form a datapath uses.
	res, err := e.ClassifyWait(context.Background(), redirLay, tcpValues(client, server), &Metadata{}, nil)
	if err != nil || !res.Permitted() || res.Redirect.Remote() != proxyA || res.Redirect.Records.Len() != 1 {
		t.Fatalf("ClassifyWait: %v %v %+v", res, err, res.Redirect)
	}
	noLeaks(t, e)
}

func TestBindRedirect(t *testing.T) {
	to := netip.MustParseAddrPort("127.0.0.1:7000")
	for _, async := range []bool{false, true} {
		br := &BindRedirect{Async: async, Target: func(req *ClassifyRequest) (netip.AddrPort, bool) { return to, true }}
		e, _ := rtEngine(t, Options{}, rtCallout{key: "bind", layer: LayerALEBindRedirectV4, sublayer: 1,
			conds: []Condition{{Field: FieldIPLocalPort, Match: MatchEqual, Value: Uint16(6000)}}, reg: br.Registration()})
		var vs Values
		vs.Set(FieldIPLocalAddress, Addr(netip.MustParseAddr("127.0.0.1"))).Set(FieldIPLocalPort, Uint16(6000)).Set(FieldIPProtocol, Uint8(6))
		res, err := e.ClassifyWait(context.Background(), LayerALEBindRedirectV4, &vs, &Metadata{}, nil)
		if err != nil || !res.Permitted() || res.Redirect == nil || res.Redirect.Bind == nil ||
			res.Redirect.Bind.LocalAddressAndPort != to || res.Redirect.Original.Port() != 6000 || !res.Redirect.Redirected() {
			t.Fatalf("async=%v: %v %v %+v", async, res, err, res.Redirect)
		}
		noLeaks(t, e)
	}
}

// Only the bind layer may change the local address and port.
func TestConnectLayerRefusesLocalChange(t *testing.T) {
	var applyErr error
	reg := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		e := req.Engine()
		h, err := req.AcquireClassifyHandle()
		if err != nil {
			t.Error(err)
			return
		}
		defer e.ReleaseClassifyHandle(h)
		w, _ := e.AcquireConnectRequest(h)
		w.LocalAddressAndPort = netip.MustParseAddrPort("10.9.9.9:1")
		applyErr = e.ApplyConnectRequest(h, w, 0)
		if _, err := e.AcquireBindRequest(h); !errors.Is(err, ErrInvalidLayerData) {
			t.Errorf("bind request at connect layer: %v", err)
		}
	}}
	e, _ := rtEngine(t, Options{}, rtCallout{key: "bad", layer: redirLay, sublayer: 1, reg: reg})
	res := e.Classify(redirLay, tcpValues(client, server), &Metadata{})
	if !errors.Is(applyErr, ErrInvalidLayerData) {
		t.Fatalf("apply error = %v", applyErr)
	}
	if res.Redirect != nil {
		t.Fatalf("nothing was applied, yet %+v", res.Redirect)
	}
	noLeaks(t, e)
}

// Seed 002: pend operation, complete from another goroutine, the flow is
// reauthorized with IS_REAUTHORIZE, and pending then fails with CANNOT_PEND.
func TestPendOperationReauthorize(t *testing.T) {
	var mu sync.Mutex
	var calls []uint32
	var reauthPendErr error
	pends := make(chan *Pend, 1)
	reg := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		flags := uint32(req.Values.Uint(FieldFlags))
		mu.Lock()
		calls = append(calls, flags)
		mu.Unlock()
		if !req.Meta.Has(MetaCompletionHandle) && flags&FlagIsReauthorize == 0 {
			t.Error("no completion handle on an initial authorization")
		}
		if flags&FlagIsReauthorize != 0 {
			_, reauthPendErr = req.Engine().PendOperation(req.Meta.CompletionHandle)
			out.Action = ActionPermit
			return
		}
		p, err := req.Engine().PendOperation(req.Meta.CompletionHandle)
		if err != nil {
			t.Error(err)
			return
		}
		pends <- p
		out.Action = ActionBlock
		out.Flags |= OutAbsorb
	}}
	e, ids := rtEngine(t, Options{}, rtCallout{key: "auth", layer: LayerALEAuthConnectV4, sublayer: 1, action: ActionCalloutTerminating, reg: reg})
	go func() {
		p := <-pends
		time.Sleep(10 * time.Millisecond)
		if err := e.CompleteOperation(p, nil); err != nil {
			t.Error(err)
		}
		if err := e.CompleteOperation(p, nil); !errors.Is(err, ErrPendResolved) {
			t.Errorf("second completion: %v", err)
		}
	}()
	meta := &Metadata{Present: MetaFlowHandle, FlowHandle: e.NewFlowHandle()}
	res, err := e.ClassifyWait(context.Background(), LayerALEAuthConnectV4, tcpValues(client, server), meta, nil)
	if err != nil || !res.Permitted() || res.Filter != ids["auth"].filter || res.Reason != ReasonCalloutPermit {
		t.Fatalf("result %v err %v", res, err)
	}
	if len(calls) != 2 || calls[0]&FlagIsReauthorize != 0 || calls[1]&FlagIsReauthorize == 0 {
		t.Fatalf("calls with flags %x", calls)
	}
	if !errors.Is(reauthPendErr, ErrCannotPend) {
		t.Fatalf("pend during reauthorization: %v", reauthPendErr)
	}
	if meta.Has(MetaCompletionHandle) {
		t.Fatal("completion handle left in metadata after classify")
	}
	// A stale completion handle is refused.
	if _, err := e.PendOperation(CompletionHandle{}); !errors.Is(err, ErrHandleInvalid) {
		t.Fatalf("stale handle: %v", err)
	}
	noLeaks(t, e)
}

func TestPendOperationWrongLayer(t *testing.T) {
	var errs []error
	reg := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		_, err := req.PendOperation()
		errs = append(errs, err)
	}}
	e, _ := rtEngine(t, Options{}, rtCallout{key: "c", layer: redirLay, sublayer: 1, reg: reg},
		rtCallout{key: "d", layer: LayerALEFlowEstablishedV4, sublayer: 1, reg: reg})
	e.Classify(redirLay, tcpValues(client, server), &Metadata{})
	e.Classify(LayerALEFlowEstablishedV4, tcpValues(client, server), &Metadata{})
	if len(errs) != 2 || !errors.Is(errs[0], ErrCannotPend) || !errors.Is(errs[1], ErrCannotPend) {
		t.Fatalf("errs = %v", errs)
	}
	noLeaks(t, e)
}

// At AUTH_RECV_ACCEPT a completion carries the held data back for
// reinjection; the reauthorization answers from the kept decision.
func TestPendRecvAcceptReinject(t *testing.T) {
	for _, permit := range []bool{true, false} {
		var calls atomic.Int32
		a := &AsyncAuthorizer{Decide: func(ctx context.Context, l LayerID, vs Values, m Metadata) ActionType {
			calls.Add(1)
			if permit {
				return ActionPermit
			}
			return ActionBlock
		}}
		e, _ := rtEngine(t, Options{}, rtCallout{key: "acc", layer: LayerALEAuthRecvAcceptV4, sublayer: 1, action: ActionCalloutTerminating, reg: a.Registration()})
		held := &struct{ conn string }{"accepted"}
		meta := &Metadata{Present: MetaFlowHandle, FlowHandle: e.NewFlowHandle()}
		res := e.ClassifyLayerData(LayerALEAuthRecvAcceptV4, tcpValues(server, client), meta, held)
		if res.Pend == nil {
			t.Fatalf("no pend: %v", res)
		}
		res2, err := e.ClassifyWait(context.Background(), LayerALEAuthRecvAcceptV4, tcpValues(server, client), meta, held)
		if err != nil {
			t.Fatal(err)
		}
		res.Pend.Wait(context.Background())
		got := res.Pend.Reinjected()
		if permit && (got != held || !res2.Permitted()) || !permit && (got != nil || res2.Permitted()) {
			t.Fatalf("permit=%v: reinjected %v, result %v", permit, got, res2)
		}
		if calls.Load() != 2 {
			t.Fatalf("decide called %d times (the reauthorization must not decide again)", calls.Load())
		}
		noLeaks(t, e)
	}
}

// A pend that is never completed times out; the filter's
// PERMIT_IF_CALLOUT_UNREGISTERED flag chooses fail-open or fail-closed.
func TestPendTimeoutDefault(t *testing.T) {
	for _, failOpen := range []bool{false, true} {
		var flags FilterFlags
		if failOpen {
			flags = FilterPermitIfCalloutUnregistered
		}
		reg := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
			if _, err := req.PendOperation(); err == nil {
				out.Action, out.Flags = ActionBlock, OutAbsorb
			}
		}}
		e, _ := rtEngine(t, Options{PendTimeout: 20 * time.Millisecond},
			rtCallout{key: "slow", layer: LayerALEAuthConnectV4, sublayer: 1, action: ActionCalloutTerminating, flags: flags, reg: reg})
		res, err := e.ClassifyWait(context.Background(), LayerALEAuthConnectV4, tcpValues(client, server), &Metadata{}, nil)
		if err != nil || res.Reason != ReasonPendTimeout || res.Permitted() != failOpen {
			t.Fatalf("failOpen=%v: %v %v", failOpen, res, err)
		}
		noLeaks(t, e)
	}
}

func TestPendCanceledByContext(t *testing.T) {
	reg := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		if _, err := req.PendOperation(); err == nil {
			out.Action, out.Flags = ActionBlock, OutAbsorb
		}
	}}
	e, _ := rtEngine(t, Options{}, rtCallout{key: "slow", layer: LayerALEAuthConnectV4, sublayer: 1, action: ActionCalloutTerminating, reg: reg})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	res, err := e.ClassifyWait(ctx, LayerALEAuthConnectV4, tcpValues(client, server), &Metadata{}, nil)
	if !errors.Is(err, context.DeadlineExceeded) || res.Permitted() {
		t.Fatalf("%v %v", res, err)
	}
	noLeaks(t, e)
}

// Two callouts of two providers in two sublayers redirect port 80; then
// each proxy's outbound connection carries the records and is not
// redirected again by the callout that sent it there.
func TestTwoRedirectCalloutsAndProxyChain(t *testing.T) {
	crA := &ConnectRedirect{Target: redirectTo(proxyA, 100)}
	crB := &ConnectRedirect{Target: redirectTo(proxyB, 200), Async: true}
	e, ids := rtEngine(t, Options{},
		rtCallout{key: "A", layer: redirLay, sublayer: 200, conds: []Condition{port80}, reg: crA.Registration()},
		rtCallout{key: "B", layer: redirLay, sublayer: 100, conds: []Condition{port80}, reg: crB.Registration()},
	)
	crA.Handle = e.RedirectHandleCreate("A")
	crB.Handle = e.RedirectHandleCreate("B")
	classify := func(records []byte) Result {
		t.Helper()
		meta := &Metadata{}
		if records != nil {
			r, err := e.UnmarshalRedirectRecords(records)
			if err != nil {
				t.Fatal(err)
			}
			meta.Present |= MetaRedirectRecords
			meta.RedirectRecords = r
		}
		res, err := e.ClassifyWait(context.Background(), redirLay, tcpValues(client, server), meta, nil)
		if err != nil || !res.Permitted() {
			t.Fatalf("classify: %v %v", res, err)
		}
		return res
	}
	// The client's flow: A (higher sublayer) redirects; B sees A's local
	// redirect in previousVersion and defers.
	res := classify(nil)
	if res.Redirect.Remote() != proxyA || res.Redirect.Records.Len() != 1 {
		t.Fatalf("client flow: %+v records %+v", res.Redirect.Remote(), res.Redirect.Records.Records())
	}
	if c := res.Redirect.Connect; c.ModifierFilterID != ids["B"].filter || c.PreviousVersion.ModifierFilterID != ids["A"].filter {
		t.Fatalf("version chain: last by %v, previous by %v", c.ModifierFilterID, c.PreviousVersion.ModifierFilterID)
	}
	blob := e.MarshalRedirectRecords(res.Redirect.Records)
	recs, _ := e.UnmarshalRedirectRecords(blob)
	if s := QueryConnectionRedirectState(recs, crA.Handle); s != RedirectedBySelf {
		t.Fatalf("state for A = %v", s)
	}
	if s := QueryConnectionRedirectState(recs, crB.Handle); s != RedirectedByOther {
		t.Fatalf("state for B = %v", s)
	}
	// Proxy A dials the original destination with the records: A lets it
	// be, B redirects it to proxy B.
	res = classify(blob)
	if res.Redirect.Remote() != proxyB || res.Redirect.Records.Len() != 2 {
		t.Fatalf("proxy A's outbound: %v", res.Redirect.Remote())
	}
	blob = e.MarshalRedirectRecords(res.Redirect.Records)
	recs, _ = e.UnmarshalRedirectRecords(blob)
	if s := QueryConnectionRedirectState(recs, crA.Handle); s != PreviouslyRedirectedBySelf {
		t.Fatalf("state for A = %v", s)
	}
	if s := QueryConnectionRedirectState(recs, crB.Handle); s != RedirectedBySelf {
		t.Fatalf("state for B = %v", s)
	}
	// Proxy B's outbound reaches the server: nobody redirects.
	res = classify(blob)
	if res.Redirect != nil && res.Redirect.Redirected() {
		t.Fatalf("proxy B's outbound redirected again to %v", res.Redirect.Remote())
	}
	noLeaks(t, e)
}

// A chain of three proxies terminates.
func TestThreeProxyChainTerminates(t *testing.T) {
	targets := []netip.AddrPort{proxyA, proxyB, proxyC}
	crs := make([]*ConnectRedirect, 3)
	var specs []rtCallout
	for i := range crs {
		crs[i] = &ConnectRedirect{Target: redirectTo(targets[i], uint32(i+1)), Async: i == 1}
		specs = append(specs, rtCallout{key: string(rune('A' + i)), layer: redirLay, sublayer: uint16(300 - 100*i), conds: []Condition{port80}, reg: crs[i].Registration()})
	}
	e, _ := rtEngine(t, Options{}, specs...)
	for i := range crs {
		crs[i].Handle = e.RedirectHandleCreate(string(rune('A' + i)))
	}
	var blob []byte
	var path []netip.AddrPort
	for hop := 0; hop < 10; hop++ {
		meta := &Metadata{}
		if blob != nil {
			r, err := e.UnmarshalRedirectRecords(blob)
			if err != nil {
				t.Fatal(err)
			}
			meta.Present, meta.RedirectRecords = MetaRedirectRecords, r
		}
		res, err := e.ClassifyWait(context.Background(), redirLay, tcpValues(client, server), meta, nil)
		if err != nil || !res.Permitted() {
			t.Fatal(res, err)
		}
		if res.Redirect == nil || !res.Redirect.Redirected() {
			break
		}
		path = append(path, res.Redirect.Remote())
		blob = e.MarshalRedirectRecords(res.Redirect.Records)
	}
	if len(path) != 3 || path[0] != proxyA || path[1] != proxyB || path[2] != proxyC {
		t.Fatalf("path = %v", path)
	}
	noLeaks(t, e)
}

// REAUTHORIZE_IF_MODIFIED_BY_OTHERS: a callout that applied with the flag
// is classified again when a later callout modifies the data.
func TestReauthorizeIfModifiedByOthers(t *testing.T) {
	var seen []FilterID
	var secondHandle RedirectHandle
	first := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		e := req.Engine()
		h, _ := req.AcquireClassifyHandle()
		defer e.ReleaseClassifyHandle(h)
		w, _ := e.AcquireConnectRequest(h)
		seen = append(seen, w.PreviousVersion.ModifierFilterID)
		if w.PreviousVersion.ModifierFilterID != 0 {
			return // someone else has changed it: leave it
		}
		if err := e.ApplyConnectRequest(h, w, ApplyReauthorizeIfModifiedByOthers); err != nil {
			t.Error(err)
		}
	}}
	second := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		e := req.Engine()
		h, _ := req.AcquireClassifyHandle()
		defer e.ReleaseClassifyHandle(h)
		w, _ := e.AcquireConnectRequest(h)
		if w.RemoteAddressAndPort == proxyB {
			return
		}
		w.RemoteAddressAndPort, w.LocalRedirectHandle = proxyB, secondHandle
		if err := e.ApplyConnectRequest(h, w, 0); err != nil {
			t.Error(err)
		}
	}}
	e, ids := rtEngine(t, Options{},
		rtCallout{key: "first", layer: redirLay, sublayer: 20, reg: first},
		rtCallout{key: "second", layer: redirLay, sublayer: 10, reg: second})
	secondHandle = e.RedirectHandleCreate("second")
	res := e.Classify(redirLay, tcpValues(client, server), &Metadata{})
	if res.Redirect.Remote() != proxyB {
		t.Fatalf("remote %v", res.Redirect.Remote())
	}
	if len(seen) != 2 || seen[0] != 0 || seen[1] != ids["second"].filter {
		t.Fatalf("first callout saw modifiers %v; want [0 %v]", seen, ids["second"].filter)
	}
	noLeaks(t, e)
}

// Flow contexts reach later classifies; flow-delete is called exactly once;
// conditional-on-flow callouts are skipped without a context.
func TestFlowContexts(t *testing.T) {
	var got []any
	var deleted []any
	reg := CalloutRegistration{
		Flags: CalloutConditionalOnFlow,
		Classify: func(req *ClassifyRequest, out *ClassifyOut) {
			got = append(got, req.FlowContext)
			out.Action = ActionBlock
		},
		FlowDelete: func(l LayerID, c CalloutID, ctx any) { deleted = append(deleted, ctx) },
	}
	e, ids := rtEngine(t, Options{}, rtCallout{key: "flow", layer: LayerALEFlowEstablishedV4, sublayer: 1, reg: reg})
	flow := e.NewFlowHandle()
	meta := &Metadata{Present: MetaFlowHandle, FlowHandle: flow}
	if res := e.Classify(LayerALEFlowEstablishedV4, tcpValues(client, server), meta); !res.Permitted() || len(got) != 0 {
		t.Fatalf("conditional-on-flow callout called without a context: %v %v", res, got)
	}
	if err := e.FlowAssociateContext(flow, LayerALEFlowEstablishedV4, ids["flow"].callout, "ctx-1"); err != nil {
		t.Fatal(err)
	}
	if err := e.FlowAssociateContext(flow, LayerALEFlowEstablishedV4, ids["flow"].callout, "again"); !errors.Is(err, ErrAlreadyExists) {
		t.Fatalf("double associate: %v", err)
	}
	res := e.Classify(LayerALEFlowEstablishedV4, tcpValues(client, server), meta)
	if res.Permitted() || len(got) != 1 || got[0] != "ctx-1" {
		t.Fatalf("with context: %v %v", res, got)
	}
	if e.Outstanding().FlowContexts != 1 {
		t.Fatal("flow context not counted")
	}
	if hs := e.FlowHandles(); len(hs) != 1 || hs[0] != flow {
		t.Fatalf("FlowHandles = %v, want [%d]", hs, flow)
	}
	if n := e.FlowDeleted(flow); n != 1 || len(deleted) != 1 || deleted[0] != "ctx-1" {
		t.Fatalf("flow deleted: n=%d deleted=%v", n, deleted)
	}
	if n := e.FlowDeleted(flow); n != 0 || len(deleted) != 1 {
		t.Fatalf("second FlowDeleted called flow-delete again: %v", deleted)
	}
	if err := e.FlowRemoveContext(flow, LayerALEFlowEstablishedV4, ids["flow"].callout); !errors.Is(err, ErrNotFound) {
		t.Fatalf("remove after delete: %v", err)
	}
	if e.Outstanding().FlowContexts != 0 || len(e.FlowHandles()) != 0 {
		t.Fatal("flow contexts leak")
	}
}

// Load: 10,000 pended classifications completed from many goroutines in
// random order, and 10,000 that time out, at the same time; every one
// resolves exactly once and nothing is left outstanding.
func TestPendLoad(t *testing.T) {
	const n = 10000
	pends := make(chan *Pend, n)
	reg := func(keep bool) CalloutRegistration {
		if !keep {
			return pendingAuthorizer(t, nil)
		}
		return pendingAuthorizer(t, func(_ *ClassifyRequest, p *Pend) { pends <- p })
	}
	completed, _ := rtEngine(t, Options{PendTimeout: time.Minute},
		rtCallout{key: "load", layer: LayerALEAuthConnectV4, sublayer: 1, action: ActionCalloutTerminating, reg: reg(true)})
	abandoned, _ := rtEngine(t, Options{PendTimeout: 300 * time.Millisecond},
		rtCallout{key: "load", layer: LayerALEAuthConnectV4, sublayer: 1, action: ActionCalloutTerminating, reg: reg(false)})

	// The completer gathers every pend, then completes them in random
	// order from 16 goroutines.
	var completions atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		all := make([]*Pend, 0, n)
		for len(all) < n {
			all = append(all, <-pends)
		}
		rand.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
		var wg sync.WaitGroup
		for w := 0; w < 16; w++ {
			wg.Go(func() {
				for i := w; i < len(all); i += 16 {
					if err := completed.CompleteOperation(all[i], nil); err == nil {
						completions.Add(1)
					}
					if err := completed.CompleteOperation(all[i], nil); !errors.Is(err, ErrPendResolved) {
						t.Errorf("second completion: %v", err)
					}
				}
			})
		}
		wg.Wait()
	}()

	var permitted, timedOut atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 2*n; i++ {
		wg.Go(func() {
			e := completed
			if i%2 == 1 {
				e = abandoned
			}
			res, err := e.ClassifyWait(context.Background(), LayerALEAuthConnectV4, tcpValues(client, server), &Metadata{}, nil)
			switch {
			case err != nil:
				t.Error(err)
			case e == abandoned && res.Reason == ReasonPendTimeout && !res.Permitted():
				timedOut.Add(1)
			case e == completed && res.Permitted() && res.Reason == ReasonCalloutPermit:
				permitted.Add(1)
			default:
				t.Errorf("abandoned=%v: %v", e == abandoned, res)
			}
		})
	}
	wg.Wait()
	<-done
	if permitted.Load() != n || timedOut.Load() != n || completions.Load() != n {
		t.Fatalf("permitted %d, timed out %d, completions %d", permitted.Load(), timedOut.Load(), completions.Load())
	}
	noLeaks(t, completed)
	noLeaks(t, abandoned)
}

func TestRedirectRecordsBlob(t *testing.T) {
	e := New(Options{})
	recs := NewRedirectRecords(
		RedirectRecord{Handle: 1, Callout: 2, Filter: 3, TargetPID: 4, Original: netip.MustParseAddrPort("10.0.0.1:80"), Redirected: proxyA},
		RedirectRecord{Handle: 9, Original: netip.MustParseAddrPort("[2001:db8::1]:443"), Redirected: netip.MustParseAddrPort("[::1]:8443")},
	)
	blob := e.MarshalRedirectRecords(recs)
	got, err := e.UnmarshalRedirectRecords(blob)
	if err != nil || got.Len() != 2 || got.Records()[1].Redirected.Port() != 8443 {
		t.Fatalf("%v %+v", err, got.Records())
	}
	// Another engine did not issue it.
	if _, err := New(Options{}).UnmarshalRedirectRecords(blob); !errors.Is(err, ErrRecordsNotTrusted) {
		t.Fatalf("foreign blob: %v", err)
	}
	// Tampering is detected; truncation and junk are malformed.
	bad := bytes.Clone(blob)
	bad[10] ^= 1
	if _, err := e.UnmarshalRedirectRecords(bad); !errors.Is(err, ErrRecordsNotTrusted) {
		t.Fatalf("tampered: %v", err)
	}
	for _, b := range [][]byte{nil, blob[:5], blob[:len(blob)-1], append(bytes.Clone(blob), 0), []byte("FWPR\x02\x00" + string(make([]byte, 16)))} {
		if _, err := e.UnmarshalRedirectRecords(b); !errors.Is(err, ErrRedirectRecords) {
			t.Fatalf("%x: %v", b, err)
		}
	}
	// At most MaxRedirectRecords records per flow.
	many := make([]RedirectRecord, MaxRedirectRecords+1)
	if len(encodeRecords(NewRedirectRecords(many...))) <= MaxRedirectRecordsSize-recordsTag {
		if _, err := ParseRedirectRecords(append(encodeRecords(NewRedirectRecords(many...)), make([]byte, 16)...)); err == nil {
			t.Fatal("too many records accepted")
		}
	}
}

func FuzzRedirectRecords(f *testing.F) {
	e := New(Options{})
	f.Add(e.MarshalRedirectRecords(nil))
	f.Add(e.MarshalRedirectRecords(NewRedirectRecords(RedirectRecord{Handle: 1, Original: netip.MustParseAddrPort("10.0.0.1:80"), Redirected: proxyA})))
	f.Add(e.MarshalRedirectRecords(NewRedirectRecords(RedirectRecord{Handle: 2, Original: netip.MustParseAddrPort("[2001:db8::1]:80")}, RedirectRecord{})))
	f.Add([]byte("FWPR"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRedirectRecords(b)
		if err != nil {
			if !errors.Is(err, ErrRedirectRecords) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		// Canonical: encoding again gives the same bytes.
		if enc := encodeRecords(r); !bytes.Equal(enc, b[:len(b)-recordsTag]) {
			t.Fatalf("not canonical:\n%x\n%x", enc, b)
		}
		// The engine accepts only what it signed.
		if _, err := e.UnmarshalRedirectRecords(b); err != nil && !errors.Is(err, ErrRecordsNotTrusted) {
			t.Fatal(err)
		}
		if _, err := e.UnmarshalRedirectRecords(e.MarshalRedirectRecords(r)); err != nil {
			t.Fatal(err)
		}
	})
}

// ClassifyWaitNotify calls pended once when a callout pends, before the
// wait, and not at all when none does.
func TestClassifyWaitNotify(t *testing.T) {
	reg := pendingAuthorizer(t, func(req *ClassifyRequest, p *Pend) { go req.Engine().CompleteOperation(p, nil) })
	e, _ := rtEngine(t, Options{}, rtCallout{key: "p", layer: LayerALEAuthConnectV4, sublayer: 1, action: ActionCalloutTerminating, reg: reg})
	for _, tc := range []struct {
		layer LayerID
		want  int
	}{{LayerALEAuthConnectV4, 1}, {LayerALEAuthListenV4, 0}} {
		calls := 0
		res, err := e.ClassifyWaitNotify(context.Background(), tc.layer, tcpValues(client, server), &Metadata{}, nil, func() { calls++ })
		if err != nil || !res.Permitted() || calls != tc.want {
			t.Fatalf("%v: %v, %v; pended called %d times, want %d", tc.layer, res, err, calls, tc.want)
		}
	}
}

// pendingAuthorizer pends each operation it classifies (giving the pend
// to pended, when not nil) and permits its reauthorization.
func pendingAuthorizer(t testing.TB, pended func(*ClassifyRequest, *Pend)) CalloutRegistration {
	return CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		if uint32(req.Values.Uint(FieldFlags))&FlagIsReauthorize != 0 {
			out.Action = ActionPermit
			return
		}
		p, err := req.PendOperation()
		if err != nil {
			t.Error(err)
			return
		}
		out.Action, out.Flags = ActionBlock, OutAbsorb
		if pended != nil {
			pended(req, p)
		}
	}}
}
