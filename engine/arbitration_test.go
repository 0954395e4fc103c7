package engine_test

import (
	"net/netip"
	"slices"
	"sync"
	"testing"

	"fwp/engine"
)

// The arbitration tables build real filter sets through the public API and
// check the Result against design.md section 2, one rule per row or more.

const arbLayer = engine.LayerALEAuthConnectV4

type arbSub struct {
	key    string
	weight uint16
}

// arbCallout is a scripted callout: it records that it was called and the
// rights it saw, then writes ret (whatever the rights say, so that the
// engine's own enforcement is what the rows test).
type arbCallout struct {
	key    string
	ret    engine.ActionType // 0: leave the action as the engine set it (continue)
	clear  bool              // clear ACTION_WRITE
	absorb bool
	unreg  bool // callout object only, functions never registered
	flags  engine.CalloutFlags
}

type arbFilter struct {
	key     string
	sub     string // sublayer key; "" is the universal sublayer
	weight  engine.Weight
	action  engine.ActionType
	callout string
	flags   engine.FilterFlags
	conds   []engine.Condition
}

type arbWant struct {
	action engine.ActionType
	hard   bool
	filter string // deciding filter's key; "" for none
	reason engine.Reason
	veto   bool
	absorb bool
	calls  []string                 // callouts called, in order; nil: not checked
	rights map[string]engine.Rights // rights a callout saw; nil: not checked
}

type arbWorld struct {
	e        *engine.Engine
	subs     map[string]engine.SublayerID
	callouts map[string]engine.CalloutID
	filters  map[string]engine.FilterID
	specs    map[string]arbFilter

	mu     sync.Mutex
	calls  []string
	rights map[string]engine.Rights
}

func arbBuild(t *testing.T, opts engine.Options, subs []arbSub, cos []arbCallout, fs []arbFilter) *arbWorld {
	t.Helper()
	w := &arbWorld{
		e:        engine.New(opts),
		subs:     map[string]engine.SublayerID{"": engine.UniversalSublayer},
		callouts: map[string]engine.CalloutID{},
		filters:  map[string]engine.FilterID{},
		specs:    map[string]arbFilter{},
		rights:   map[string]engine.Rights{},
	}
	err := w.e.Update(func(tx *engine.Txn) error {
		for _, s := range subs {
			id, err := tx.AddSublayer(engine.Sublayer{Key: s.key, Weight: s.weight})
			if err != nil {
				return err
			}
			w.subs[s.key] = id
		}
		for _, c := range cos {
			id, err := tx.AddCallout(engine.Callout{Key: c.key, Layer: arbLayer})
			if err != nil {
				return err
			}
			w.callouts[c.key] = id
		}
		for _, f := range fs {
			sl, ok := w.subs[f.sub]
			if !ok {
				t.Fatalf("filter %s: no sublayer %q in the row", f.key, f.sub)
			}
			id, err := tx.AddFilter(engine.Filter{
				Key: f.key, Layer: arbLayer, Sublayer: sl, Weight: f.weight, Conditions: f.conds,
				Action: engine.Action{Type: f.action, Callout: w.callouts[f.callout]}, Flags: f.flags,
			})
			if err != nil {
				return err
			}
			w.filters[f.key] = id
			w.specs[f.key] = f
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cos {
		if c.unreg {
			continue
		}
		if err := w.e.RegisterCallout(c.key, w.registration(c)); err != nil {
			t.Fatal(err)
		}
	}
	return w
}

func (w *arbWorld) registration(c arbCallout) engine.CalloutRegistration {
	return engine.CalloutRegistration{Flags: c.flags, Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		w.mu.Lock()
		w.calls = append(w.calls, c.key)
		w.rights[c.key] = out.Rights
		w.mu.Unlock()
		if c.ret != 0 {
			out.Action = c.ret
		}
		if c.clear {
			out.Rights &^= engine.RightActionWrite
		}
		if c.absorb {
			out.Flags |= engine.OutAbsorb
		}
	}}
}

// arbTuple is the connection every row classifies: 10.0.0.5:40000 → 10.0.0.1:80/tcp.
func arbTuple() *engine.Values {
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.5:40000"), netip.MustParseAddrPort("10.0.0.1:80"))
	vs.Set(engine.FieldALEAppID, engine.String("/usr/bin/curl"))
	return &vs
}

// check classifies arbTuple and compares the result with want, including
// the deciding filter's sublayer and callout and the net event recorded.
func (w *arbWorld) check(t *testing.T, want arbWant) engine.Result {
	t.Helper()
	w.mu.Lock()
	w.calls, w.rights = nil, map[string]engine.Rights{}
	w.mu.Unlock()
	before := len(w.e.NetEvents(0))
	res := w.e.Classify(arbLayer, arbTuple(), nil)
	if res.Action != want.action {
		t.Errorf("action = %s, want %s (%s)", res.Action, want.action, res)
	}
	if res.Hard() != want.hard {
		t.Errorf("hard = %v, want %v (%s)", res.Hard(), want.hard, res)
	}
	if want.filter == "" {
		if res.Filter != 0 || res.Sublayer != 0 || res.Callout != 0 {
			t.Errorf("decided by %s/%s/%s, want no filter", res.Filter, res.Sublayer, res.Callout)
		}
	} else {
		spec := w.specs[want.filter]
		if res.Filter != w.filters[want.filter] {
			t.Errorf("filter = %s, want %s (%s) — %s", res.Filter, w.filters[want.filter], want.filter, res)
		}
		if res.Sublayer != w.subs[spec.sub] {
			t.Errorf("sublayer = %s, want %s", res.Sublayer, w.subs[spec.sub])
		}
		if wc := w.callouts[spec.callout]; res.Callout != wc {
			t.Errorf("callout = %s, want %s", res.Callout, wc)
		}
	}
	if res.Reason != want.reason {
		t.Errorf("reason = %q, want %q", res.Reason, want.reason)
	}
	if res.Veto != want.veto {
		t.Errorf("veto = %v, want %v", res.Veto, want.veto)
	}
	if got := res.Flags&engine.OutAbsorb != 0; got != want.absorb {
		t.Errorf("absorb = %v, want %v", got, want.absorb)
	}
	w.mu.Lock()
	calls, rights := slices.Clone(w.calls), w.rights
	w.mu.Unlock()
	if want.calls != nil && !slices.Equal(calls, want.calls) {
		t.Errorf("callouts called %q, want %q", calls, want.calls)
	}
	for k, r := range want.rights {
		if got, ok := rights[k]; !ok || got != r {
			t.Errorf("callout %s saw rights %v (called %v), want %v", k, got, ok, r)
		}
	}
	// Net events (default options): a veto is recorded as such, a block
	// unless absorbed, a permit not at all.
	var wantEv engine.NetEventType
	switch {
	case want.veto:
		wantEv = engine.EventClassifyVeto
	case want.action == engine.ActionBlock && !want.absorb:
		wantEv = engine.EventClassifyDrop
	}
	evs := w.e.NetEvents(0)[before:]
	switch {
	case wantEv == 0 && len(evs) != 0:
		t.Errorf("net events %+v, want none", evs)
	case wantEv != 0 && (len(evs) != 1 || evs[0].Type != wantEv || evs[0].Filter != res.Filter || evs[0].Layer != arbLayer):
		t.Errorf("net events %+v, want one %s by %s", evs, wantEv, res.Filter)
	}
	return res
}

var (
	wAuto           = engine.WeightAuto()
	condPort80      = engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(80)}
	condTCP         = engine.Condition{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)}
	condRemoteHost  = engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(netip.MustParseAddr("10.0.0.1"))}
	condRemoteNet8  = engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Prefix(netip.MustParsePrefix("10.0.0.0/8"))}
	condPortsNarrow = engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(80), engine.Uint16(81))}
	condPortsWide   = engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(1), engine.Uint16(60000))}
	condPort443     = engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(443)}
	condAppCurl     = engine.Condition{Field: engine.FieldALEAppID, Match: engine.MatchEqual, Value: engine.String("/usr/bin/curl")}
	write           = engine.RightActionWrite
	none            engine.Rights
	actPermit       = engine.ActionPermit
	actBlock        = engine.ActionBlock
	actTerm         = engine.ActionCalloutTerminating
	actInsp         = engine.ActionCalloutInspection
	actUnknown      = engine.ActionCalloutUnknown
	flagClear       = engine.FilterClearActionRight
	flagPermitUnreg = engine.FilterPermitIfCalloutUnregistered
	twoSubs         = []arbSub{{"hi", 20}, {"lo", 10}}
	threeSubs       = []arbSub{{"hi", 30}, {"mid", 20}, {"lo", 10}}
	noCalls         = []string{}
	exact           = engine.WeightExact
	index           = engine.WeightIndex
	permitHardHi    = arbFilter{key: "P", sub: "hi", action: actPermit, flags: flagClear}
	blockLo         = arbFilter{key: "B", sub: "lo", action: actBlock}
	permitLo        = arbFilter{key: "P", sub: "lo", action: actPermit}
	calloutFilter   = func(key, sub string, act engine.ActionType) arbFilter {
		return arbFilter{key: key, sub: sub, action: act, callout: key}
	}
	weightedFilter = func(key string, w engine.Weight, act engine.ActionType, conds ...engine.Condition) arbFilter {
		return arbFilter{key: key, weight: w, action: act, conds: conds}
	}
	universalOnly    []arbSub
	noCallouts       []arbCallout
	terminatingBlock = arbCallout{key: "C", ret: actBlock}
)

func TestArbitration(t *testing.T) {
	tests := []struct {
		name     string
		subs     []arbSub
		callouts []arbCallout
		filters  []arbFilter
		want     arbWant
	}{
		// No decision.
		{"no filters: the layer permits", universalOnly, noCallouts, nil,
			arbWant{action: actPermit, reason: engine.ReasonNoMatch}},
		{"no filter matches: the layer permits", universalOnly, noCallouts,
			[]arbFilter{{key: "B", action: actBlock, conds: []engine.Condition{condPort443}}},
			arbWant{action: actPermit, reason: engine.ReasonNoMatch}},
		{"disabled filter is ignored", universalOnly, noCallouts,
			[]arbFilter{{key: "B", action: actBlock, flags: engine.FilterDisabled}},
			arbWant{action: actPermit, reason: engine.ReasonNoMatch}},

		// Defaults of filter actions.
		{"filter block is hard by default", universalOnly, noCallouts,
			[]arbFilter{{key: "B", action: actBlock}},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"filter permit is soft by default", universalOnly, noCallouts,
			[]arbFilter{{key: "P", action: actPermit}},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},
		{"CLEAR_ACTION_RIGHT makes a filter permit hard", universalOnly, noCallouts,
			[]arbFilter{{key: "P", action: actPermit, flags: flagClear}},
			arbWant{action: actPermit, hard: true, filter: "P", reason: engine.ReasonFilterPermit}},

		// Sublayers by weight.
		{"higher sublayer first: its hard permit stands", []arbSub{{"lo", 10}, {"hi", 20}}, noCallouts,
			[]arbFilter{blockLo, permitHardHi},
			arbWant{action: actPermit, hard: true, filter: "P", reason: engine.ReasonFilterPermit}},
		{"higher sublayer first: its block is final", []arbSub{{"lo", 10}, {"hi", 20}}, noCallouts,
			[]arbFilter{{key: "P", sub: "lo", action: actPermit, flags: flagClear}, {key: "B", sub: "hi", action: actBlock}},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"every sublayer is evaluated, highest weight first", []arbSub{{"a", 5}, {"b", 30}, {"c", 10}},
			[]arbCallout{{key: "ia"}, {key: "ib"}, {key: "ic"}},
			[]arbFilter{calloutFilter("ia", "a", actInsp), calloutFilter("ib", "b", actInsp), calloutFilter("ic", "c", actInsp)},
			arbWant{action: actPermit, reason: engine.ReasonNoMatch, calls: []string{"ib", "ic", "ia"}}},
		{"equal sublayer weights: lower sublayer ID first", []arbSub{{"a", 10}, {"b", 10}}, noCallouts,
			[]arbFilter{{key: "P", sub: "a", action: actPermit, flags: flagClear}, {key: "B", sub: "b", action: actBlock}},
			arbWant{action: actPermit, hard: true, filter: "P", reason: engine.ReasonFilterPermit}},
		{"equal sublayer weights: lower sublayer ID first (block)", []arbSub{{"a", 10}, {"b", 10}}, noCallouts,
			[]arbFilter{{key: "P", sub: "b", action: actPermit, flags: flagClear}, {key: "B", sub: "a", action: actBlock}},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"equal sublayer weights: call order by sublayer ID", []arbSub{{"a", 7}, {"b", 7}, {"c", 7}},
			[]arbCallout{{key: "ia"}, {key: "ib"}, {key: "ic"}},
			[]arbFilter{calloutFilter("ic", "c", actInsp), calloutFilter("ia", "a", actInsp), calloutFilter("ib", "b", actInsp)},
			arbWant{action: actPermit, reason: engine.ReasonNoMatch, calls: []string{"ia", "ib", "ic"}}},

		// Filters by weight within a sublayer.
		{"heavier filter decides its sublayer (block)", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", exact(10), actPermit), weightedFilter("B", exact(20), actBlock)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"heavier filter decides its sublayer (permit)", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", exact(20), actPermit), weightedFilter("B", exact(10), actBlock)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},
		{"a decided sublayer evaluates no further filter", universalOnly, []arbCallout{{key: "i"}},
			[]arbFilter{weightedFilter("P", exact(20), actPermit), {key: "i", weight: exact(10), action: actInsp, callout: "i"}},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit, calls: noCalls}},
		{"equal filter weights: lower filter ID first (permit)", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", exact(5), actPermit), weightedFilter("B", exact(5), actBlock)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},
		{"equal filter weights: lower filter ID first (block)", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("B", exact(5), actBlock), weightedFilter("P", exact(5), actPermit)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"equal auto weights: lower filter ID first", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("B", wAuto, actBlock, condPort80), weightedFilter("P", wAuto, actPermit, condPort80)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},

		// Weights: range index, explicit, automatic.
		{"range index 1 beats auto with many conditions", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", wAuto, actPermit, condRemoteHost, condPort80, condTCP, condAppCurl), weightedFilter("B", index(1), actBlock)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"higher range index first", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", index(3), actPermit, condRemoteHost), weightedFilter("B", index(7), actBlock)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"range index 15 is the top band", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", index(14), actPermit, condRemoteHost, condPort80), weightedFilter("B", index(15), actBlock)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"within one range index, more specific first", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", index(4), actPermit, condTCP), weightedFilter("B", index(4), actBlock, condRemoteHost)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"explicit weight in a higher band beats an index", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("B", index(7), actBlock, condRemoteHost), weightedFilter("P", exact(8<<60), actPermit)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},
		{"explicit weight at the bottom of a band loses to the index's auto bits", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", exact(7<<60), actPermit), weightedFilter("B", index(7), actBlock, condTCP)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"explicit weight 0 is evaluated after auto with a condition", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", exact(0), actPermit), weightedFilter("B", wAuto, actBlock, condTCP)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"auto without conditions weighs 0: ties with explicit 0 by filter ID", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", exact(0), actPermit), weightedFilter("B", wAuto, actBlock)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},
		{"auto: an address beats a protocol", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("P", wAuto, actPermit, condTCP), weightedFilter("B", wAuto, actBlock, condRemoteHost)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"auto: a host beats a /8", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("B", wAuto, actBlock, condRemoteNet8), weightedFilter("P", wAuto, actPermit, condRemoteHost)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},
		{"auto: a narrow port range beats a wide one", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("B", wAuto, actBlock, condPortsWide), weightedFilter("P", wAuto, actPermit, condPortsNarrow)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},
		{"auto: more conditions beat fewer", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("B", wAuto, actBlock, condPort80), weightedFilter("P", wAuto, actPermit, condPort80, condTCP)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},
		{"auto: a condition beats none", universalOnly, noCallouts,
			[]arbFilter{weightedFilter("B", wAuto, actBlock), weightedFilter("P", wAuto, actPermit, condTCP)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},

		// CONTINUE.
		{"unknown callout returning continue passes on", universalOnly, []arbCallout{{key: "u"}},
			[]arbFilter{{key: "u", weight: exact(20), action: actUnknown, callout: "u"}, weightedFilter("B", exact(10), actBlock)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock, calls: []string{"u"}}},
		{"unknown callout may decide", universalOnly, []arbCallout{{key: "u", ret: actBlock}},
			[]arbFilter{calloutFilter("u", "", actUnknown)},
			arbWant{action: actBlock, filter: "u", reason: engine.ReasonCalloutBlock, calls: []string{"u"}}},

		// Across sublayers: block beats soft permit, soft block falls to a later permit.
		{"block beats a soft permit across sublayers", twoSubs, noCallouts,
			[]arbFilter{{key: "P", sub: "hi", action: actPermit}, blockLo},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"soft block is overridden by a later permit", twoSubs, []arbCallout{terminatingBlock},
			[]arbFilter{calloutFilter("C", "hi", actTerm), permitLo},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit, calls: []string{"C"}}},
		{"soft permit is replaced by a later soft permit", twoSubs, noCallouts,
			[]arbFilter{{key: "P1", sub: "hi", action: actPermit}, {key: "P2", sub: "lo", action: actPermit}},
			arbWant{action: actPermit, filter: "P2", reason: engine.ReasonFilterPermit}},
		{"hard permit survives a later block filter", twoSubs, noCallouts,
			[]arbFilter{permitHardHi, blockLo},
			arbWant{action: actPermit, hard: true, filter: "P", reason: engine.ReasonFilterPermit}},
		{"hard permit survives a later block filter in a layer with callouts", threeSubs, []arbCallout{{key: "I"}},
			[]arbFilter{permitHardHi, {key: "B", sub: "mid", action: actBlock}, calloutFilter("I", "lo", actInsp)},
			arbWant{action: actPermit, hard: true, filter: "P", reason: engine.ReasonFilterPermit, calls: []string{"I"}, rights: map[string]engine.Rights{"I": none}}},
		{"hard block is final", twoSubs, []arbCallout{{key: "C", ret: actPermit, clear: true}},
			[]arbFilter{{key: "B", sub: "hi", action: actBlock}, calloutFilter("C", "lo", actTerm)},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock, calls: []string{"C"}, rights: map[string]engine.Rights{"C": none}}},

		// Veto.
		{"callout veto of a hard permit", twoSubs, []arbCallout{terminatingBlock},
			[]arbFilter{permitHardHi, calloutFilter("C", "lo", actTerm)},
			arbWant{action: actBlock, hard: true, filter: "C", reason: engine.ReasonCalloutVeto, veto: true, calls: []string{"C"}, rights: map[string]engine.Rights{"C": none}}},
		{"veto by an unknown callout", twoSubs, []arbCallout{{key: "U", ret: actBlock}},
			[]arbFilter{permitHardHi, calloutFilter("U", "lo", actUnknown)},
			arbWant{action: actBlock, hard: true, filter: "U", reason: engine.ReasonCalloutVeto, veto: true}},
		{"veto of a callout's hard permit", twoSubs, []arbCallout{{key: "A", ret: actPermit, clear: true}, {key: "V", ret: actBlock}},
			[]arbFilter{calloutFilter("A", "hi", actTerm), calloutFilter("V", "lo", actTerm)},
			arbWant{action: actBlock, hard: true, filter: "V", reason: engine.ReasonCalloutVeto, veto: true, calls: []string{"A", "V"}}},
		{"veto is final", []arbSub{{"s1", 40}, {"s2", 30}, {"s3", 20}, {"s4", 10}},
			[]arbCallout{{key: "V", ret: actBlock}, {key: "L", ret: actPermit, clear: true}},
			[]arbFilter{{key: "P", sub: "s1", action: actPermit, flags: flagClear}, calloutFilter("V", "s2", actTerm),
				{key: "P2", sub: "s3", action: actPermit, flags: flagClear}, calloutFilter("L", "s4", actTerm)},
			arbWant{action: actBlock, hard: true, filter: "V", reason: engine.ReasonCalloutVeto, veto: true, calls: []string{"V", "L"}, rights: map[string]engine.Rights{"L": none}}},
		{"a veto with ABSORB is still recorded as a veto", twoSubs, []arbCallout{{key: "C", ret: actBlock, absorb: true}},
			[]arbFilter{permitHardHi, calloutFilter("C", "lo", actTerm)},
			arbWant{action: actBlock, hard: true, filter: "C", reason: engine.ReasonCalloutVeto, veto: true, absorb: true}},
		{"callout permit with the right cleared changes nothing", twoSubs, []arbCallout{{key: "C", ret: actPermit}},
			[]arbFilter{permitHardHi, calloutFilter("C", "lo", actTerm)},
			arbWant{action: actPermit, hard: true, filter: "P", reason: engine.ReasonFilterPermit, calls: []string{"C"}, rights: map[string]engine.Rights{"C": none}}},

		// Callout actions: soft by default, hard when the callout clears the right.
		{"callout permit is soft: a later block wins", twoSubs, []arbCallout{{key: "C", ret: actPermit}},
			[]arbFilter{calloutFilter("C", "hi", actTerm), blockLo},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock, calls: []string{"C"}}},
		{"callout permit alone is soft", universalOnly, []arbCallout{{key: "C", ret: actPermit}},
			[]arbFilter{calloutFilter("C", "", actTerm)},
			arbWant{action: actPermit, filter: "C", reason: engine.ReasonCalloutPermit}},
		{"callout block alone is soft", universalOnly, []arbCallout{terminatingBlock},
			[]arbFilter{calloutFilter("C", "", actTerm)},
			arbWant{action: actBlock, filter: "C", reason: engine.ReasonCalloutBlock}},
		{"callout permit ends its sublayer", universalOnly, []arbCallout{{key: "C", ret: actPermit}},
			[]arbFilter{{key: "C", weight: exact(20), action: actTerm, callout: "C"}, weightedFilter("B", exact(10), actBlock)},
			arbWant{action: actPermit, filter: "C", reason: engine.ReasonCalloutPermit}},
		{"callout clearing the right makes its permit hard", twoSubs, []arbCallout{{key: "C", ret: actPermit, clear: true}},
			[]arbFilter{calloutFilter("C", "hi", actTerm), blockLo},
			arbWant{action: actPermit, hard: true, filter: "C", reason: engine.ReasonCalloutPermit}},
		{"callout clearing the right makes its block hard", twoSubs, []arbCallout{{key: "C", ret: actBlock, clear: true}},
			[]arbFilter{calloutFilter("C", "hi", actTerm), {key: "P", sub: "lo", action: actPermit, flags: flagClear}},
			arbWant{action: actBlock, hard: true, filter: "C", reason: engine.ReasonCalloutBlock}},
		{"CLEAR_ACTION_RIGHT on a callout filter makes the callout's permit hard", twoSubs, []arbCallout{{key: "C", ret: actPermit}},
			[]arbFilter{{key: "C", sub: "hi", action: actTerm, callout: "C", flags: flagClear}, blockLo},
			arbWant{action: actPermit, hard: true, filter: "C", reason: engine.ReasonCalloutPermit}},

		// Terminating / inspection.
		{"terminating callout returning continue counts as block", universalOnly, []arbCallout{{key: "C"}},
			[]arbFilter{{key: "C", weight: exact(20), action: actTerm, callout: "C"}, weightedFilter("P", exact(10), actPermit)},
			arbWant{action: actBlock, filter: "C", reason: engine.ReasonCalloutContinueAsBlock, calls: []string{"C"}}},
		{"inspection callout's block is ignored", universalOnly, []arbCallout{{key: "I", ret: actBlock, clear: true, absorb: true}},
			[]arbFilter{{key: "I", weight: exact(20), action: actInsp, callout: "I"}, weightedFilter("P", exact(10), actPermit)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit, calls: []string{"I"}}},
		{"inspection callout's permit is ignored", twoSubs, []arbCallout{{key: "I", ret: actPermit, clear: true}},
			[]arbFilter{calloutFilter("I", "hi", actInsp), blockLo},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock, calls: []string{"I"}}},
		{"inspection callout cannot veto", twoSubs, []arbCallout{{key: "I", ret: actBlock}},
			[]arbFilter{permitHardHi, calloutFilter("I", "lo", actInsp)},
			arbWant{action: actPermit, hard: true, filter: "P", reason: engine.ReasonFilterPermit, calls: []string{"I"}}},
		{"inspection callout alone: no match", universalOnly, []arbCallout{{key: "I", ret: actBlock}},
			[]arbFilter{calloutFilter("I", "", actInsp)},
			arbWant{action: actPermit, reason: engine.ReasonNoMatch, calls: []string{"I"}}},

		// Unregistered callouts.
		{"unregistered terminating callout blocks", universalOnly, []arbCallout{{key: "C", unreg: true}},
			[]arbFilter{calloutFilter("C", "", actTerm)},
			arbWant{action: actBlock, hard: true, filter: "C", reason: engine.ReasonCalloutUnregisteredBlock}},
		{"unregistered terminating with PERMIT_IF_CALLOUT_UNREGISTERED permits", universalOnly, []arbCallout{{key: "C", unreg: true}},
			[]arbFilter{{key: "C", action: actTerm, callout: "C", flags: flagPermitUnreg}},
			arbWant{action: actPermit, filter: "C", reason: engine.ReasonCalloutUnregisteredPermit}},
		{"fail-open permit is soft", twoSubs, []arbCallout{{key: "C", unreg: true}},
			[]arbFilter{{key: "C", sub: "hi", action: actTerm, callout: "C", flags: flagPermitUnreg}, blockLo},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"unregistered unknown callout blocks", universalOnly, []arbCallout{{key: "U", unreg: true}},
			[]arbFilter{calloutFilter("U", "", actUnknown)},
			arbWant{action: actBlock, hard: true, filter: "U", reason: engine.ReasonCalloutUnregisteredBlock}},
		{"unregistered unknown with PERMIT_IF_CALLOUT_UNREGISTERED permits", universalOnly, []arbCallout{{key: "U", unreg: true}},
			[]arbFilter{{key: "U", action: actUnknown, callout: "U", flags: flagPermitUnreg}},
			arbWant{action: actPermit, filter: "U", reason: engine.ReasonCalloutUnregisteredPermit}},
		{"unregistered inspection callout is skipped", universalOnly, []arbCallout{{key: "I", unreg: true}},
			[]arbFilter{{key: "I", weight: exact(20), action: actInsp, callout: "I"}, weightedFilter("P", exact(10), actPermit)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},

		// ABSORB.
		{"ABSORB on the deciding block", universalOnly, []arbCallout{{key: "C", ret: actBlock, absorb: true}},
			[]arbFilter{calloutFilter("C", "", actTerm)},
			arbWant{action: actBlock, filter: "C", reason: engine.ReasonCalloutBlock, absorb: true}},
		{"ABSORB of an overridden block is dropped", twoSubs, []arbCallout{{key: "C", ret: actBlock, absorb: true}},
			[]arbFilter{calloutFilter("C", "hi", actTerm), permitLo},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit}},
		{"ABSORB of a block replaced by a later block is dropped", twoSubs, []arbCallout{{key: "C", ret: actBlock, absorb: true}},
			[]arbFilter{calloutFilter("C", "hi", actTerm), blockLo},
			arbWant{action: actBlock, hard: true, filter: "B", reason: engine.ReasonFilterBlock}},
		{"ABSORB on a permit is dropped", universalOnly, []arbCallout{{key: "C", ret: actPermit, absorb: true}},
			[]arbFilter{calloutFilter("C", "", actTerm)},
			arbWant{action: actPermit, filter: "C", reason: engine.ReasonCalloutPermit}},
		{"a later callout block does not take over a hard block (its ABSORB stays)", twoSubs, []arbCallout{{key: "C", ret: actBlock, absorb: true, clear: true}, {key: "L", ret: actBlock}},
			[]arbFilter{calloutFilter("C", "hi", actTerm), calloutFilter("L", "lo", actTerm)},
			arbWant{action: actBlock, hard: true, filter: "C", reason: engine.ReasonCalloutBlock, absorb: true}},

		// Rights seen by callouts.
		{"callout sees ACTION_WRITE before any decision", universalOnly, []arbCallout{{key: "I"}},
			[]arbFilter{calloutFilter("I", "", actInsp)},
			arbWant{action: actPermit, reason: engine.ReasonNoMatch, rights: map[string]engine.Rights{"I": write}}},
		{"callout sees ACTION_WRITE after a soft permit", twoSubs, []arbCallout{{key: "I"}},
			[]arbFilter{{key: "P", sub: "hi", action: actPermit}, calloutFilter("I", "lo", actInsp)},
			arbWant{action: actPermit, filter: "P", reason: engine.ReasonFilterPermit, rights: map[string]engine.Rights{"I": write}}},
		{"callout sees no ACTION_WRITE after a hard permit", twoSubs, []arbCallout{{key: "I"}},
			[]arbFilter{permitHardHi, calloutFilter("I", "lo", actInsp)},
			arbWant{action: actPermit, hard: true, filter: "P", reason: engine.ReasonFilterPermit, rights: map[string]engine.Rights{"I": none}}},
		{"callout sees no ACTION_WRITE after a callout cleared it", threeSubs, []arbCallout{{key: "A", ret: actPermit, clear: true}, {key: "I"}},
			[]arbFilter{calloutFilter("A", "hi", actTerm), calloutFilter("I", "mid", actInsp)},
			arbWant{action: actPermit, hard: true, filter: "A", reason: engine.ReasonCalloutPermit, rights: map[string]engine.Rights{"A": write, "I": none}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := arbBuild(t, engine.Options{}, tt.subs, tt.callouts, tt.filters)
			w.check(t, tt.want)
		})
	}
}

// A veto is a net event of its own with the vetoing filter and the tuple.
func TestArbitrationVetoEvent(t *testing.T) {
	w := arbBuild(t, engine.Options{}, twoSubs, []arbCallout{terminatingBlock},
		[]arbFilter{permitHardHi, calloutFilter("C", "lo", actTerm)})
	sub := w.e.SubscribeNetEvents(4)
	defer sub.Close()
	res := w.e.Classify(arbLayer, arbTuple(), nil)
	if !res.Veto || res.Reason != engine.ReasonCalloutVeto {
		t.Fatalf("want a veto, got %s", res)
	}
	ev := <-sub.C
	if ev.Type != engine.EventClassifyVeto || ev.Filter != w.filters["C"] || ev.Callout != w.callouts["C"] ||
		ev.Reason != engine.ReasonCalloutVeto || ev.Remote != netip.MustParseAddrPort("10.0.0.1:80") {
		t.Fatalf("event %+v", ev)
	}
}

// Each layer decides on its own: a filter on one layer never affects another.
func TestArbitrationNoCrossLayer(t *testing.T) {
	e := engine.New(engine.Options{})
	err := e.Update(func(tx *engine.Txn) error {
		_, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthRecvAcceptV4, Action: engine.Action{Type: actBlock}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if res := e.Classify(arbLayer, arbTuple(), nil); res.Action != actPermit || res.Reason != engine.ReasonNoMatch {
		t.Fatalf("auth-connect: %s", res)
	}
	if res := e.Classify(engine.LayerALEAuthRecvAcceptV4, arbTuple(), nil); res.Action != actBlock {
		t.Fatalf("recv-accept: %s", res)
	}
}

// A callout conditional on flow is called only for a flow that has a
// context of it; the others get the context when there is one.
func TestArbitrationConditionalOnFlow(t *testing.T) {
	w := arbBuild(t, engine.Options{}, twoSubs,
		[]arbCallout{{key: "cond", ret: actBlock, unreg: true}, {key: "plain", unreg: true}},
		[]arbFilter{calloutFilter("cond", "hi", actTerm), calloutFilter("plain", "lo", actInsp)})
	var mu sync.Mutex
	seen := map[string][]any{}
	record := func(key string, ret engine.ActionType, flags engine.CalloutFlags) {
		err := w.e.RegisterCallout(key, engine.CalloutRegistration{Flags: flags, Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			mu.Lock()
			seen[key] = append(seen[key], req.FlowContext)
			mu.Unlock()
			if ret != 0 {
				out.Action = ret
			}
		}})
		if err != nil {
			t.Fatal(err)
		}
	}
	record("cond", actBlock, engine.CalloutConditionalOnFlow)
	record("plain", 0, 0)

	classify := func(meta *engine.Metadata) engine.Result {
		mu.Lock()
		clear(seen)
		mu.Unlock()
		return w.e.Classify(arbLayer, arbTuple(), meta)
	}
	flow := w.e.NewFlowHandle()
	other := w.e.NewFlowHandle()

	// No metadata at all, then a flow without a context: not called, and
	// its terminating filter passes on instead of blocking.
	for _, meta := range []*engine.Metadata{nil, {Present: engine.MetaFlowHandle, FlowHandle: flow}} {
		res := classify(meta)
		if res.Action != actPermit || res.Reason != engine.ReasonNoMatch || len(seen["cond"]) != 0 {
			t.Fatalf("without a context: %s, called %v", res, seen["cond"])
		}
		if len(seen["plain"]) != 1 || seen["plain"][0] != nil {
			t.Fatalf("plain callout saw %v, want one nil context", seen["plain"])
		}
	}
	if err := w.e.FlowAssociateContext(flow, arbLayer, w.callouts["cond"], "ctx-cond"); err != nil {
		t.Fatal(err)
	}
	if err := w.e.FlowAssociateContext(flow, arbLayer, w.callouts["plain"], "ctx-plain"); err != nil {
		t.Fatal(err)
	}
	res := classify(&engine.Metadata{Present: engine.MetaFlowHandle, FlowHandle: flow})
	if res.Action != actBlock || res.Filter != w.filters["cond"] || !slices.Equal(seen["cond"], []any{"ctx-cond"}) || !slices.Equal(seen["plain"], []any{"ctx-plain"}) {
		t.Fatalf("with a context: %s, seen %v", res, seen)
	}
	// The flow handle without the presence bit is not a flow.
	res = classify(&engine.Metadata{FlowHandle: flow})
	if res.Action != actPermit || len(seen["cond"]) != 0 {
		t.Fatalf("flow handle not present: %s, seen %v", res, seen)
	}
	res = classify(&engine.Metadata{Present: engine.MetaFlowHandle, FlowHandle: other})
	if res.Action != actPermit || len(seen["cond"]) != 0 {
		t.Fatalf("other flow: %s, seen %v", res, seen)
	}
}

type notifyRec struct {
	t  engine.NotifyType
	id engine.FilterID
}

// notify is called for a filter's callout when the filter is added and
// deleted, at Commit (never for an aborted transaction), and on
// RegisterCallout for the filters that already use the callout.
func TestArbitrationNotify(t *testing.T) {
	e := engine.New(engine.Options{})
	var mu sync.Mutex
	var got []notifyRec
	reg := func(key string) {
		err := e.RegisterCallout(key, engine.CalloutRegistration{
			Classify: func(*engine.ClassifyRequest, *engine.ClassifyOut) {},
			Notify: func(nt engine.NotifyType, f *engine.Filter) {
				mu.Lock()
				got = append(got, notifyRec{nt, f.ID})
				mu.Unlock()
				f.Conditions = nil // a copy: the engine must not care
			},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	take := func() []notifyRec {
		mu.Lock()
		defer mu.Unlock()
		r := got
		got = nil
		return r
	}
	reg("n")
	var co, late engine.CalloutID
	if err := e.Update(func(tx *engine.Txn) (err error) {
		if co, err = tx.AddCallout(engine.Callout{Key: "n", Layer: arbLayer}); err != nil {
			return err
		}
		late, err = tx.AddCallout(engine.Callout{Key: "late", Layer: arbLayer})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	calloutF := engine.Filter{Layer: arbLayer, Action: engine.Action{Type: actTerm, Callout: co}, Conditions: []engine.Condition{condPort80}}

	begin := func() *engine.Txn {
		tx, err := e.Begin(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		return tx
	}
	tx := begin()
	id, err := tx.AddFilter(calloutF)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.AddFilter(engine.Filter{Layer: arbLayer, Action: engine.Action{Type: actBlock}}); err != nil {
		t.Fatal(err)
	}
	if n := take(); len(n) != 0 {
		t.Fatalf("notified before Commit: %v", n)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if n := take(); !slices.Equal(n, []notifyRec{{engine.NotifyAddFilter, id}}) {
		t.Fatalf("after add: %v", n)
	}
	if f, err := e.View().Filter(id); err != nil || len(f.Conditions) != 1 {
		t.Fatalf("notify's copy leaked into the engine: %+v %v", f, err)
	}

	// Aborted: nothing.
	tx = begin()
	if _, err := tx.AddFilter(calloutF); err != nil {
		t.Fatal(err)
	}
	if err := tx.DeleteFilter(id); err != nil {
		t.Fatal(err)
	}
	tx.Abort()
	if n := take(); len(n) != 0 {
		t.Fatalf("notified for an aborted txn: %v", n)
	}

	// Delete, at Commit.
	tx = begin()
	if err := tx.DeleteFilter(id); err != nil {
		t.Fatal(err)
	}
	if n := take(); len(n) != 0 {
		t.Fatalf("notified before Commit: %v", n)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if n := take(); !slices.Equal(n, []notifyRec{{engine.NotifyDeleteFilter, id}}) {
		t.Fatalf("after delete: %v", n)
	}

	// Registration after the filters: one add notification per filter.
	var l1, l2 engine.FilterID
	if err := e.Update(func(tx *engine.Txn) (err error) {
		lf := engine.Filter{Layer: arbLayer, Action: engine.Action{Type: actInsp, Callout: late}}
		if l1, err = tx.AddFilter(lf); err != nil {
			return err
		}
		l2, err = tx.AddFilter(lf)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if n := take(); len(n) != 0 {
		t.Fatalf("unregistered callout notified: %v", n)
	}
	reg("late")
	n := take()
	slices.SortFunc(n, func(a, b notifyRec) int { return int(a.id) - int(b.id) })
	if !slices.Equal(n, []notifyRec{{engine.NotifyAddFilter, l1}, {engine.NotifyAddFilter, l2}}) {
		t.Fatalf("on registration: %v", n)
	}
}

// The callout receives the matched filter, its provider context's data and
// the incoming values.
func TestArbitrationCalloutRequest(t *testing.T) {
	e := engine.New(engine.Options{})
	var fid engine.FilterID
	if err := e.Update(func(tx *engine.Txn) error {
		pc, err := tx.AddProviderContext(engine.ProviderContext{Key: "pc", Data: []byte("proxy:3128")})
		if err != nil {
			return err
		}
		co, err := tx.AddCallout(engine.Callout{Key: "c", Layer: arbLayer})
		if err != nil {
			return err
		}
		fid, err = tx.AddFilter(engine.Filter{Layer: arbLayer, ProviderContext: pc, Action: engine.Action{Type: actInsp, Callout: co}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var got struct {
		layer  engine.LayerID
		filter engine.FilterID
		pctx   string
		port   uint64
		eng    *engine.Engine
	}
	if err := e.RegisterCallout("c", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		got.layer, got.filter, got.pctx = req.Layer, req.Filter.ID, string(req.ProviderContext)
		got.port, got.eng = req.Values.Uint(engine.FieldIPRemotePort), req.Engine()
	}}); err != nil {
		t.Fatal(err)
	}
	e.Classify(arbLayer, arbTuple(), nil)
	if got.layer != arbLayer || got.filter != fid || got.pctx != "proxy:3128" || got.port != 80 || got.eng != e {
		t.Fatalf("request %+v", got)
	}
}
