//go:build linux

package nfqueue

import (
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"fwp/engine"
)

// slowPolicy: the client helper's fail-closed port (portFailClosed) and
// fail-open port (portFailOpen) go to a slow Go callout that blocks every
// flow after slow — a callout that cannot keep up.
func slowPolicy(slow time.Duration) func(fx *fixture, tx *engine.Txn) error {
	return func(fx *fixture, tx *engine.Txn) error {
		if err := fx.eng.RegisterCallout("test.slow", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			fx.calls.Add(1)
			time.Sleep(slow)
			out.Action = engine.ActionBlock
		}}); err != nil {
			return err
		}
		p, err := tx.AddProvider(engine.Provider{Key: "slow"})
		if err != nil {
			return err
		}
		sl, err := tx.AddSublayer(engine.Sublayer{Key: "slow", Provider: p, Weight: 10})
		if err != nil {
			return err
		}
		co, err := tx.AddCallout(engine.Callout{Key: "test.slow", Provider: p, Layer: engine.LayerALEAuthConnectV4})
		if err != nil {
			return err
		}
		for port, flags := range map[int]engine.FilterFlags{portFailClosed: 0, portFailOpen: engine.FilterPermitIfCalloutUnregistered} {
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Sublayer: sl, Provider: p, Flags: flags,
				Conditions: []engine.Condition{
					{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(port))},
				},
				Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co}}); err != nil {
				return err
			}
		}
		return nil
	}
}

// TestFloodFailClosedLetsNoneThrough: 20,000 new connects (200 at a time)
// toward a fail-closed callout filter whose callout is slow: the queues
// (64 packets each) overflow, and every SYN that does not fit is refused
// at once by the filter's flag (a reset), never let through, never left
// to the SYN timer; those the callout sees it blocks. None connects.
func TestFloodFailClosedLetsNoneThrough(t *testing.T) {
	var events, wrong atomic.Int64
	fx := customFixture(t, "client", Options{MaxLen: 64, OnFallback: func(fb Fallback) {
		events.Add(1)
		if fb.FailOpen || fb.Remote.Port() != portFailClosed || fb.Protocol != 6 || !fb.HasUID {
			wrong.Add(1)
		}
	}}, 5*time.Second, slowPolicy(2*time.Millisecond))
	const n = 20000
	start := time.Now()
	f := fx.call(t, fmt.Sprintf("dial %d %d %d", portFailClosed, n, 200))
	took := time.Since(start)
	open, closed, err := fx.path.Fallbacks()
	if err != nil {
		t.Fatal(err)
	}
	st := fx.path.Stats()
	t.Logf("%d connects in %v: %v; callout calls %d; stats %+v; refused by the flag %d (fail-open passes %d)", n, took, f, fx.calls.Load(), st, closed, open)
	if f[0] != "0" || f[1] != strconv.Itoa(n) {
		t.Fatalf("flood toward a fail-closed filter: %s connected, %s failed; want none through", f[0], f[1])
	}
	if closed == 0 {
		t.Fatalf("the queues never overflowed into the flag (fallback closed %d): the test proves nothing", closed)
	}
	// Net events: NFLOG copies of the refused SYNs (some may be lost
	// under the flood; none invented).
	time.Sleep(300 * time.Millisecond)
	t.Logf("fallback events %d (wrong %d)", events.Load(), wrong.Load())
	if events.Load() == 0 || uint64(events.Load()) > closed || wrong.Load() != 0 {
		t.Fatalf("fallback events %d (%d wrong) for %d refused by the flag", events.Load(), wrong.Load(), closed)
	}
	// (NoFlow: a SYN whose record was gone, refused by its mark's flag.)
	if st.Blocked+st.NoFlow+closed < n {
		t.Fatalf("%d blocked by the callout + %d by their mark + %d refused by the flag < %d connects", st.Blocked, st.NoFlow, closed, n)
	}
	fx.checkClean(t)
}

// TestQueueFullFailOpen: the same overflow toward a fail-open callout
// filter lets the SYNs that do not fit on (the filter's flag), so every
// connect the slow callout does not see succeeds at once.
func TestQueueFullFailOpen(t *testing.T) {
	fx := customFixture(t, "client", Options{MaxLen: 16}, 5*time.Second, slowPolicy(5*time.Millisecond))
	const n = 2000
	f := fx.call(t, fmt.Sprintf("dial %d %d %d", portFailOpen, n, 200))
	open, closed, err := fx.path.Fallbacks()
	if err != nil {
		t.Fatal(err)
	}
	st := fx.path.Stats()
	t.Logf("%v; stats %+v; passed by the flag %d, refused %d", f, st, open, closed)
	ok, _ := strconv.Atoi(f[0])
	if open == 0 || closed != 0 {
		t.Fatalf("fallback open %d closed %d: want the overflow passed by the fail-open flag, none refused", open, closed)
	}
	// The callout blocks what it sees; the flag passes the rest.
	if uint64(ok) != open || uint64(ok)+st.Blocked != n {
		t.Fatalf("%d connected, %d passed by the flag, %d blocked by the callout: want connected == passed, and all %d accounted for", ok, open, st.Blocked, n)
	}
	fx.checkClean(t)
}
