package engine_test

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"fwp/engine"
)

// evWorld is an engine whose clock ticks one second per read, with a block
// filter on port 80, a permit filter on port 443 and an absorbing callout
// on port 25.
type evWorld struct {
	e                 *engine.Engine
	block, permit, ab engine.FilterID
	co                engine.CalloutID
}

var evEpoch = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func newEvWorld(t *testing.T, opts engine.Options) *evWorld {
	t.Helper()
	var mu sync.Mutex
	tick := evEpoch
	opts.Now = func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		tick = tick.Add(time.Second)
		return tick
	}
	w := &evWorld{e: engine.New(opts)}
	err := w.e.Update(func(tx *engine.Txn) (err error) {
		if w.block, err = tx.AddFilter(engine.Filter{Layer: v4, Conditions: []engine.Condition{condPort80}, Action: engine.Action{Type: engine.ActionBlock}}); err != nil {
			return err
		}
		if w.permit, err = tx.AddFilter(engine.Filter{Layer: v4, Conditions: []engine.Condition{condPort443}, Action: engine.Action{Type: engine.ActionPermit}}); err != nil {
			return err
		}
		if w.co, err = tx.AddCallout(engine.Callout{Key: "absorb", Layer: v4}); err != nil {
			return err
		}
		w.ab, err = tx.AddFilter(engine.Filter{Layer: v4, Conditions: []engine.Condition{cond(engine.FieldIPRemotePort, engine.MatchEqual, u16(25))},
			Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: w.co}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	err = w.e.RegisterCallout("absorb", engine.CalloutRegistration{Classify: func(_ *engine.ClassifyRequest, out *engine.ClassifyOut) {
		out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
	}})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *evWorld) classify(port uint16) engine.Result {
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("192.0.2.7:41000"), netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), port))
	vs.Set(engine.FieldALEAppID, str("/usr/bin/curl")).Set(engine.FieldALEUserID, u32(1000))
	meta := &engine.Metadata{Present: engine.MetaProcessID, ProcessID: 4242}
	return w.e.Classify(v4, &vs, meta)
}

func TestNetEventDrop(t *testing.T) {
	w := newEvWorld(t, engine.Options{})
	if r := w.classify(80); r.Action != engine.ActionBlock {
		t.Fatalf("classify: %s", r)
	}
	evs := w.e.NetEvents(0)
	if len(evs) != 1 {
		t.Fatalf("events %+v", evs)
	}
	want := engine.NetEvent{
		Seq: 1, Time: evEpoch.Add(time.Second), Type: engine.EventClassifyDrop, Layer: v4, Filter: w.block,
		Reason: engine.ReasonFilterBlock, Protocol: 6,
		Local: netip.MustParseAddrPort("192.0.2.7:41000"), Remote: netip.MustParseAddrPort("198.51.100.1:80"),
		AppID: "/usr/bin/curl", UserID: 1000, ProcessID: 4242,
	}
	if evs[0] != want {
		t.Fatalf("event\n got %+v\nwant %+v", evs[0], want)
	}
	if evs[0].Type.String() != "classify_drop" {
		t.Fatalf("type name %q", evs[0].Type)
	}
	// Permit (allow events off), no match and an absorbed block record nothing.
	w.classify(443)
	w.classify(22)
	if r := w.classify(25); r.Action != engine.ActionBlock || r.Flags&engine.OutAbsorb == 0 {
		t.Fatalf("absorb: %s", r)
	}
	if evs := w.e.NetEvents(0); len(evs) != 1 {
		t.Fatalf("more events than the drop: %+v", evs)
	}
}

func TestNetEventAllow(t *testing.T) {
	w := newEvWorld(t, engine.Options{AllowEvents: true})
	w.classify(443)
	w.classify(22) // no match: the layer's permit is an allow too
	w.classify(80)
	evs := w.e.NetEvents(0)
	if len(evs) != 3 {
		t.Fatalf("events %+v", evs)
	}
	if e := evs[0]; e.Type != engine.EventClassifyAllow || e.Filter != w.permit || e.Reason != engine.ReasonFilterPermit || e.Seq != 1 {
		t.Fatalf("allow by filter: %+v", e)
	}
	if e := evs[1]; e.Type != engine.EventClassifyAllow || e.Filter != 0 || e.Reason != engine.ReasonNoMatch || e.Remote.Port() != 22 {
		t.Fatalf("allow by no match: %+v", e)
	}
	if e := evs[2]; e.Type != engine.EventClassifyDrop || e.Filter != w.block || !e.Time.After(evs[1].Time) {
		t.Fatalf("drop: %+v", e)
	}
}

// The ring keeps the newest Capacity events; NetEvents(since) reads from a
// sequence number on.
func TestNetEventRingBounded(t *testing.T) {
	w := newEvWorld(t, engine.Options{EventCapacity: 4})
	for range 10 {
		w.classify(80)
	}
	seqs := func(evs []engine.NetEvent) []uint64 {
		var s []uint64
		for _, e := range evs {
			s = append(s, e.Seq)
		}
		return s
	}
	for _, tt := range []struct {
		since uint64
		want  []uint64
	}{
		{0, []uint64{7, 8, 9, 10}},
		{1, []uint64{7, 8, 9, 10}},
		{8, []uint64{8, 9, 10}},
		{10, []uint64{10}},
		{11, nil},
		{1 << 63, nil},
	} {
		got := seqs(w.e.NetEvents(tt.since))
		if len(got) != len(tt.want) {
			t.Fatalf("NetEvents(%d) = %v, want %v", tt.since, got, tt.want)
		}
		for i := range got {
			if got[i] != tt.want[i] {
				t.Fatalf("NetEvents(%d) = %v, want %v", tt.since, got, tt.want)
			}
		}
	}
	// The events kept are whole: each one's time matches its place.
	for _, e := range w.e.NetEvents(0) {
		if e.Filter != w.block || e.Time != evEpoch.Add(time.Duration(e.Seq)*time.Second) {
			t.Fatalf("event %+v", e)
		}
	}
}

func TestNetEventDefaultCapacity(t *testing.T) {
	w := newEvWorld(t, engine.Options{})
	for range 4096 + 10 {
		w.classify(80)
	}
	evs := w.e.NetEvents(0)
	if len(evs) != 4096 || evs[0].Seq != 11 || evs[len(evs)-1].Seq != 4106 {
		t.Fatalf("%d events, %d..%d", len(evs), evs[0].Seq, evs[len(evs)-1].Seq)
	}
}

func TestNetEventSubscription(t *testing.T) {
	w := newEvWorld(t, engine.Options{EventCapacity: 2})
	sub := w.e.SubscribeNetEvents(8)
	small := w.e.SubscribeNetEvents(1)
	zero := w.e.SubscribeNetEvents(0) // buffer of at least one
	for range 3 {
		w.classify(80)
	}
	for i := uint64(1); i <= 3; i++ {
		e := <-sub.C
		if e.Seq != i || e.Filter != w.block || e.Type != engine.EventClassifyDrop {
			t.Fatalf("event %d: %+v", i, e)
		}
	}
	if sub.Lost() != 0 {
		t.Fatalf("lost %d with room", sub.Lost())
	}
	// The full subscriber kept the first and lost the rest; it never
	// slowed classification down.
	if small.Lost() != 2 || zero.Lost() != 2 {
		t.Fatalf("lost %d and %d, want 2 each", small.Lost(), zero.Lost())
	}
	if e := <-small.C; e.Seq != 1 {
		t.Fatalf("kept %+v, want the first", e)
	}

	// Close ends the channel; later events go nowhere; Close twice is fine.
	small.Close()
	small.Close()
	w.classify(80)
	if e, ok := <-small.C; ok {
		t.Fatalf("closed subscription delivered %+v", e)
	}
	if small.Lost() != 2 {
		t.Fatalf("closed subscription still counts: %d", small.Lost())
	}
	if e := <-sub.C; e.Seq != 4 {
		t.Fatalf("open subscription: %+v", e)
	}
	sub.Close()
	zero.Close()
	for range sub.C {
		// Drain: a closed channel ends the loop.
	}
}

// Subscribers and readers race with classification without losing an
// event that fits.
func TestNetEventConcurrent(t *testing.T) {
	w := newEvWorld(t, engine.Options{EventCapacity: 64})
	const n = 200
	sub := w.e.SubscribeNetEvents(n)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range n / 4 {
				w.classify(80)
				w.e.NetEvents(0)
			}
		})
	}
	wg.Wait()
	sub.Close()
	seen := map[uint64]bool{}
	for e := range sub.C {
		seen[e.Seq] = true
	}
	if len(seen) != n || sub.Lost() != 0 {
		t.Fatalf("received %d distinct events, lost %d; want %d, 0", len(seen), sub.Lost(), n)
	}
}

// TestNetEventGroupAndCgroup: the gid and cgroup id of the classified
// values reach the event (TestNetEventDrop covers their absence: zero).
func TestNetEventGroupAndCgroup(t *testing.T) {
	w := newEvWorld(t, engine.Options{})
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("192.0.2.7:41000"), netip.MustParseAddrPort("198.51.100.1:80"))
	vs.Set(engine.FieldALEUserID, u32(1000)).Set(engine.FieldALEGroupID, u32(1001)).Set(engine.FieldCgroupID, engine.Uint64(1<<40+7))
	if r := w.e.Classify(v4, &vs, nil); r.Action != engine.ActionBlock {
		t.Fatalf("classify: %s", r)
	}
	evs := w.e.NetEvents(0)
	if len(evs) != 1 || evs[0].UserID != 1000 || evs[0].GroupID != 1001 || evs[0].CgroupID != 1<<40+7 {
		t.Fatalf("events %+v; want uid 1000, gid 1001, cgroup id %d", evs, uint64(1<<40+7))
	}
}
