package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"fwp/api"
	"fwp/engine"
	"fwp/mgmt"
)

// typedErrs are the errors a refused call may match.
var typedErrs = []error{
	mgmt.ErrAccessDenied, mgmt.ErrTooLarge, mgmt.ErrTimeout, mgmt.ErrSessionNotFound, mgmt.ErrInvalidPolicy,
	mgmt.ErrLifetime, mgmt.ErrDynamicSession, mgmt.ErrStore, mgmt.ErrInternal, engine.ErrNotFound,
	engine.ErrAlreadyExists, engine.ErrInUse, engine.ErrInvalidLayer, engine.ErrInvalidField,
	engine.ErrInvalidCondition, engine.ErrInvalidMatchType, engine.ErrTypeMismatch, engine.ErrInvalidValue,
	engine.ErrInvalidWeight, engine.ErrInvalidAction, engine.ErrInvalidFlags, engine.ErrCalloutNotFound,
	engine.ErrIncompatibleLayer, engine.ErrInvalidArgument, engine.ErrTxnInProgress, engine.ErrNoTxnInProgress,
	engine.ErrTxnAborted,
}

func typed(err error) bool {
	for _, e := range typedErrs {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

type fixture struct {
	m    *mgmt.Manager
	srv  *Server
	sock string
}

func start(t *testing.T, cfg Config) *fixture {
	t.Helper()
	dir, err := os.MkdirTemp("", "fwpsrv") // t.TempDir can exceed a socket path's limit
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	m, err := mgmt.New(engine.New(engine.Options{}), mgmt.Options{StateDir: filepath.Join(dir, "state"), TxnTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Manager = m
	f := &fixture{m: m, srv: New(cfg), sock: filepath.Join(dir, "s")}
	l, err := net.Listen("unix", f.sock)
	if err != nil {
		t.Fatal(err)
	}
	go f.srv.Serve(l)
	t.Cleanup(func() { f.srv.Stop(); m.Close() })
	return f
}

// conn is a raw API connection, to send exactly the messages a test builds.
func (f *fixture) conn(t *testing.T) (api.ManagementClient, *grpc.ClientConn) {
	t.Helper()
	cc, err := grpc.NewClient("unix:"+f.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return api.NewManagementClient(cc), cc
}

// session opens a session on c; the returned context names it.
func session(t *testing.T, c api.ManagementClient, dynamic bool) (context.Context, uint64, context.CancelFunc) {
	t.Helper()
	sctx, cancel := context.WithCancel(context.Background())
	st, err := c.OpenSession(sctx, &api.OpenSessionRequest{Name: t.Name(), Dynamic: dynamic})
	if err != nil {
		t.Fatal(err)
	}
	s, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cancel)
	ctx := metadata.AppendToOutgoingContext(context.Background(), SessionHeader, strconv.FormatUint(s.GetId(), 10))
	return ctx, s.GetId(), cancel
}

// Every RPC gets zero-value and partial messages, with and without a
// session: each call succeeds or fails with a typed error, and the daemon
// keeps serving.
func TestZeroValueAndPartialRequests(t *testing.T) {
	f := start(t, Config{})
	c, _ := f.conn(t)
	sctx, _, _ := session(t, c, false)
	bad := metadata.AppendToOutgoingContext(context.Background(), SessionHeader, "not-a-number")
	gone := metadata.AppendToOutgoingContext(context.Background(), SessionHeader, "999999")
	objects := []*api.Object{
		{}, {Kind: &api.Object_Provider{}}, {Kind: &api.Object_ProviderContext{}}, {Kind: &api.Object_Sublayer{}},
		{Kind: &api.Object_Callout{}}, {Kind: &api.Object_Filter{}},
		{Kind: &api.Object_Sublayer{Sublayer: &api.Sublayer{Key: "s", Weight: 1 << 31, Lifetime: "forever"}}},
		{Kind: &api.Object_Callout{Callout: &api.Callout{Key: "c", Flags: []string{""}}}},
		{Kind: &api.Object_Filter{Filter: &api.Filter{Key: "f", Layer: "ALE_AUTH_CONNECT_V4"}}},
		{Kind: &api.Object_Filter{Filter: &api.Filter{Key: "f", Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Conditions: []*api.Condition{{}}}}},
		{Kind: &api.Object_Filter{Filter: &api.Filter{Key: "f", Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Weight: "index:", Flags: []string{"x"}}}},
		{Kind: &api.Object_Filter{Filter: &api.Filter{Key: "f", Layer: "ALE_AUTH_CONNECT_V4", Action: "callout_terminating"}}},
		{Kind: &api.Object_Filter{Filter: &api.Filter{Key: "f", Layer: "ALE_AUTH_CONNECT_V4", Action: "permit", Callout: "c", ProviderContext: "x", Sublayer: "y", Provider: "z"}}},
		{Kind: &api.Object_Filter{Filter: &api.Filter{Key: "f", Layer: "ALE_AUTH_CONNECT_V4", Action: "block",
			Conditions: []*api.Condition{{Field: "ip_remote_port", Match: "range", Value: "9-1"}, {Field: "ip_remote_address", Match: "prefix", Value: "::/200"}}}}},
	}
	var applies []*api.ApplyRequest
	applies = append(applies, &api.ApplyRequest{}, &api.ApplyRequest{Ops: []*api.Op{{}}},
		&api.ApplyRequest{Ops: []*api.Op{{Op: &api.Op_Delete{}}}},
		&api.ApplyRequest{Ops: []*api.Op{{Op: &api.Op_Delete{Delete: &api.ObjectRef{Kind: "filter"}}}}},
		&api.ApplyRequest{Ops: []*api.Op{{Op: &api.Op_Delete{Delete: &api.ObjectRef{Kind: "filter", Id: 1 << 62}}}}},
		&api.ApplyRequest{PolicyName: "p", Policy: []byte("\x00\xff: [")},
		&api.ApplyRequest{Policy: []byte("filters: [{key: a}]")})
	for _, o := range objects {
		applies = append(applies, &api.ApplyRequest{Ops: []*api.Op{{Op: &api.Op_Add{Add: o}}}})
	}
	calls := map[string]func(ctx context.Context) error{
		"CloseSession": func(ctx context.Context) error { _, err := c.CloseSession(ctx, &api.Empty{}); return err },
		"Sessions":     func(ctx context.Context) error { _, err := c.Sessions(ctx, &api.Empty{}); return err },
		"Begin":        func(ctx context.Context) error { _, err := c.Begin(ctx, &api.Empty{}); return err },
		"Commit":       func(ctx context.Context) error { _, err := c.Commit(ctx, &api.Empty{}); return err },
		"Abort":        func(ctx context.Context) error { _, err := c.Abort(ctx, &api.Empty{}); return err },
		"Get": func(ctx context.Context) error {
			for _, r := range []*api.ObjectRef{{}, {Kind: "filter"}, {Kind: "nope", Key: "k"}, {Kind: "sublayer", Id: 1 << 40}} {
				if _, err := c.Get(ctx, r); err != nil && !typed(api.FromStatus(err)) {
					return fmt.Errorf("get %v: %w", r, err)
				}
			}
			return nil
		},
		"List": func(ctx context.Context) error {
			for _, r := range []*api.ListRequest{{}, {Kind: "filter", Layer: "x"}, {Kind: "filter", Provider: "x", Action: "y"}, {Kind: "callout", Layer: "ALE_AUTH_CONNECT_V4"}} {
				if _, err := c.List(ctx, r); err != nil && !typed(api.FromStatus(err)) {
					return fmt.Errorf("list %v: %w", r, err)
				}
			}
			return nil
		},
		"Explain": func(ctx context.Context) error {
			for _, r := range []*api.ExplainRequest{{}, {Layer: "ALE_AUTH_CONNECT_V4"}, {Layer: "ALE_AUTH_CONNECT_V4", Values: map[string]string{"": ""}},
				{Layer: "ALE_AUTH_CONNECT_V4", Values: map[string]string{"ip_remote_address": "10.0.0.0/8", "ip_remote_port": "1-2"}}} {
				if _, err := c.Explain(ctx, r); err != nil && !typed(api.FromStatus(err)) {
					return fmt.Errorf("explain %v: %w", r, err)
				}
			}
			return nil
		},
		"Apply": func(ctx context.Context) error {
			for _, r := range applies {
				if _, err := c.Apply(ctx, r); err != nil && !typed(api.FromStatus(err)) {
					return fmt.Errorf("apply %v: %w", r, err)
				}
			}
			return nil
		},
		"NetEvents": func(ctx context.Context) error {
			st, err := c.NetEvents(ctx, &api.NetEventsRequest{})
			if err != nil {
				return err
			}
			_, err = st.Recv()
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		},
		"Subscribe": func(ctx context.Context) error {
			for _, r := range []*api.SubscribeRequest{{}, {Kinds: []string{""}}, {Kinds: []string{"filter", "bogus"}}} {
				cctx, cancel := context.WithCancel(ctx)
				err := subscribe(c, cctx, r)
				cancel()
				if err != nil && !typed(api.FromStatus(err)) {
					return fmt.Errorf("subscribe %v: %w", r, err)
				}
			}
			return nil
		},
	}
	for name, call := range calls {
		for cname, ctx := range map[string]context.Context{"no session": context.Background(), "bad header": bad, "unknown session": gone, "session": sctx} {
			if name == "CloseSession" && cname == "session" {
				continue // would end the session the others use
			}
			if err := call(ctx); err != nil && !typed(api.FromStatus(err)) {
				t.Errorf("%s with %s: untyped error %v", name, cname, err)
			}
		}
	}
	// A begin left open above is harmless; the daemon still serves.
	c.Abort(sctx, &api.Empty{})
	if _, err := c.Apply(sctx, &api.ApplyRequest{Policy: []byte("providers: [{key: still-serving}]")}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.m.Get(0, mgmt.Ref{Kind: mgmt.KindProvider, Key: "still-serving"}); err != nil {
		t.Fatal(err)
	}
}

// A reader cannot change anything through any RPC, in any session kind,
// and is told so with ErrAccessDenied; reads and subscriptions are
// allowed. (TestAccessMatrix checks every role against every RPC.)
func TestReadOnlyPeerCannotMutate(t *testing.T) {
	f := start(t, Config{NoRootAdmin: true, AdminGIDs: []uint32{uint32(os.Getgid()) + 4242}, ReaderGIDs: []uint32{uint32(os.Getgid())}})
	c, _ := f.conn(t)
	add := &api.Op{Op: &api.Op_Add{Add: &api.Object{Kind: &api.Object_Provider{Provider: &api.Provider{Key: "p"}}}}}
	del := &api.Op{Op: &api.Op_Delete{Delete: &api.ObjectRef{Kind: "sublayer", Key: "FWPM_SUBLAYER_UNIVERSAL"}}}
	for _, dynamic := range []bool{false, true} {
		sctx, _, _ := session(t, c, dynamic)
		for _, ctx := range []context.Context{sctx, context.Background()} {
			writes := map[string]func() error{
				"Begin":  func() error { _, err := c.Begin(ctx, &api.Empty{}); return err },
				"Commit": func() error { _, err := c.Commit(ctx, &api.Empty{}); return err },
				"Abort":  func() error { _, err := c.Abort(ctx, &api.Empty{}); return err },
				"Add":    func() error { _, err := c.Apply(ctx, &api.ApplyRequest{Ops: []*api.Op{add}}); return err },
				"Delete": func() error { _, err := c.Apply(ctx, &api.ApplyRequest{Ops: []*api.Op{del}}); return err },
				"Empty":  func() error { _, err := c.Apply(ctx, &api.ApplyRequest{}); return err },
				"Policy": func() error {
					_, err := c.Apply(ctx, &api.ApplyRequest{Policy: []byte("providers: [{key: q}]")})
					return err
				},
			}
			for name, w := range writes {
				if err := w(); !errors.Is(api.FromStatus(err), mgmt.ErrAccessDenied) {
					t.Errorf("%s (dynamic %v, session %v): want ErrAccessDenied, got %v", name, dynamic, ctx == sctx, err)
				}
			}
		}
		if _, err := c.List(sctx, &api.ListRequest{Kind: "sublayer"}); err != nil {
			t.Errorf("read: %v", err)
		}
		if err := subscribe(c, sctx, &api.SubscribeRequest{}); err != nil {
			t.Errorf("subscribe: %v", err)
		}
	}
	objs, _ := f.m.List(0, mgmt.KindProvider, mgmt.Template{})
	sls, _ := f.m.List(0, mgmt.KindSublayer, mgmt.Template{})
	if len(objs) != 0 || len(sls) != 1 {
		t.Fatalf("refused writes changed state: %v %v", objs, sls)
	}
}

// A client that goes away ends its session, aborts its transaction and
// ends its subscription and follow streams: no goroutine is left behind.
func TestDisconnectReleasesEverything(t *testing.T) {
	f := start(t, Config{})
	warm, _ := f.conn(t) // let gRPC start its own long-lived goroutines first
	warm.Sessions(context.Background(), &api.Empty{})
	base := runtime.NumGoroutine()

	c, cc := f.conn(t)
	sctx, _, _ := session(t, c, true)
	if _, err := c.Begin(sctx, &api.Empty{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(sctx, &api.ApplyRequest{Policy: []byte("providers: [{key: half}]")}); err != nil {
		t.Fatal(err)
	}
	if err := subscribe(c, sctx, &api.SubscribeRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.NetEvents(sctx, &api.NetEventsRequest{Follow: true}); err != nil {
		t.Fatal(err)
	}
	cc.Close()

	other := f.m.OpenSession(mgmt.SessionInfo{Name: "other"})
	deadline := time.Now().Add(10 * time.Second)
	added := false
	for {
		if !added {
			_, err := f.m.Add(context.Background(), other.ID, mgmt.Object{Provider: &mgmt.Provider{Key: "after"}})
			if err != nil && !errors.Is(err, mgmt.ErrTimeout) {
				t.Fatal(err)
			}
			added = err == nil // the transaction lock is free again
		}
		n := runtime.NumGoroutine()
		if added && len(f.m.Sessions()) == 1 && n <= base {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after disconnect: lock free %v, sessions %+v, goroutines %d > %d", added, f.m.Sessions(), n, base)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := f.m.Get(0, mgmt.Ref{Kind: mgmt.KindProvider, Key: "half"}); !errors.Is(err, engine.ErrNotFound) {
		t.Fatalf("half a transaction applied: %v", err)
	}
}

// A handler's panic becomes a typed error for that call only: a runtime
// error from a bad request (an index past what it sent) fails that call,
// naming the method and the fault, and the next call is served.
func TestPanicRecovered(t *testing.T) {
	s := New(Config{})
	info := &grpc.UnaryServerInfo{FullMethod: api.Management_Sessions_FullMethodName}
	h := func(_ context.Context, req any) (any, error) {
		b := req.([]byte)
		return b[3], nil // out of range for a short request
	}
	_, err := s.unary(peerContext(0), []byte("ab"), info, h)
	if e := api.FromStatus(err); !errors.Is(e, mgmt.ErrInternal) || !strings.Contains(e.Error(), api.Management_Sessions_FullMethodName) || !strings.Contains(e.Error(), "index out of range") {
		t.Fatalf("unary: %v", e)
	}
	if resp, err := s.unary(peerContext(0), []byte("abcd"), info, h); err != nil || resp != byte('d') {
		t.Fatalf("the call after a panic: %v, %v", resp, err)
	}
	err = s.stream(nil, ctxStream{ctx: peerContext(0)}, &grpc.StreamServerInfo{FullMethod: api.Management_Subscribe_FullMethodName}, func(any, grpc.ServerStream) error { panic("boom") })
	if e := api.FromStatus(err); !errors.Is(e, mgmt.ErrInternal) || !strings.Contains(e.Error(), "boom") {
		t.Fatalf("stream: %v", e)
	}
}

// Following with --since skips older events from the follow too, not
// only from the ring.
func TestFollowSince(t *testing.T) {
	f := start(t, Config{})
	c, _ := f.conn(t)
	sctx, sid, _ := session(t, c, false)
	if _, err := f.m.Add(context.Background(), sid, mgmt.Object{Filter: &mgmt.Filter{Key: "b", Layer: "ALE_AUTH_CONNECT_V4", Action: "block"}}); err != nil {
		t.Fatal(err)
	}
	vs := &engine.Values{}
	vs.SetTuple(6, netip.AddrPort{}, netip.MustParseAddrPort("127.0.0.1:1"))
	drop := func() { f.m.Engine().Classify(engine.LayerALEAuthConnectV4, vs, nil) }
	drop()
	drop()
	ctx, cancel := context.WithCancel(sctx)
	defer cancel()
	st, err := c.NetEvents(ctx, &api.NetEventsRequest{Since: 5, Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Header(); err != nil { // the follow is in place
		t.Fatal(err)
	}
	for range 4 {
		drop()
	}
	ev, err := st.Recv()
	if err != nil || ev.GetSeq() != 5 {
		t.Fatalf("first followed event: %v %v", ev, err)
	}
}

// A subscription ended by its session's close says so in one line.
func TestSubscribeEndsWithSession(t *testing.T) {
	f := start(t, Config{})
	c, _ := f.conn(t)
	sctx, _, _ := session(t, c, false)
	st, err := c.Subscribe(sctx, &api.SubscribeRequest{Kinds: []string{"filter"}})
	if err == nil {
		_, err = st.Header()
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.CloseSession(sctx, &api.Empty{}); err != nil {
		t.Fatal(err)
	}
	_, err = st.Recv()
	e := api.FromStatus(err)
	if !errors.Is(e, mgmt.ErrSessionNotFound) || strings.Contains(e.Error(), "\n") {
		t.Fatalf("end of subscription: %q", e)
	}
}

// subscribe subscribes and waits until the subscription is in place.
func subscribe(c api.ManagementClient, ctx context.Context, r *api.SubscribeRequest) error {
	st, err := c.Subscribe(ctx, r)
	if err != nil {
		return err
	}
	md, err := st.Header()
	if err == nil && md == nil {
		_, err = st.Recv() // ended without headers: the status says why
	}
	return err
}

// A session's subscriptions are bounded over the wire too.
func TestSubscriptionLimit(t *testing.T) {
	f := start(t, Config{})
	c, _ := f.conn(t)
	sctx, _, _ := session(t, c, false)
	var err error
	for i := 0; i <= mgmt.MaxSubscriptions && err == nil; i++ {
		err = subscribe(c, sctx, &api.SubscribeRequest{})
		if err == nil && i == mgmt.MaxSubscriptions {
			t.Fatal("no limit")
		}
	}
	if !errors.Is(api.FromStatus(err), mgmt.ErrTooLarge) {
		t.Fatalf("want ErrTooLarge, got %v", err)
	}
}
