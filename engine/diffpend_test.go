package engine_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"fwp/engine"
)

// The differential test of pend against inline (issue 12): random policies
// with callouts at the layers where callouts pend — AUTH_RECV_ACCEPT and
// AUTH_CONNECT (PendOperation, then the reauthorization), CONNECT_REDIRECT
// and BIND_REDIRECT (PendClassify, then the resume) — run twice: once with
// every callout answering inline, once with callouts that pend and complete
// from another goroutine with the same answer. The final decisions must be
// the same for every policy and tuple.

var pendDiffLayers = []engine.LayerID{
	engine.LayerALEAuthRecvAcceptV4, engine.LayerALEAuthRecvAcceptV6,
	engine.LayerALEConnectRedirectV4, engine.LayerALEConnectRedirectV6,
	engine.LayerALEBindRedirectV4, engine.LayerALEAuthConnectV4,
}

// pendAnswer is diffCalloutFunc's answer, blind to FLAG_IS_REAUTHORIZE:
// the one input a reauthorization changes.
func pendAnswer(salt uint64, style int, req *engine.ClassifyRequest, rights engine.Rights) engine.ClassifyOut {
	vs := *req.Values
	vs.Set(engine.FieldFlags, engine.Uint32(uint32(vs.Uint(engine.FieldFlags))&^engine.FlagIsReauthorize))
	out := engine.ClassifyOut{Action: engine.ActionContinue, Rights: rights}
	diffCalloutFunc(salt, style)(&engine.ClassifyRequest{Layer: req.Layer, Values: &vs, Filter: req.Filter}, &out)
	return out
}

// pendRecorder notes the filters whose callouts pended in one
// classification (callouts run on the classifying goroutine, one tuple at
// a time).
type pendRecorder struct{ pended []engine.FilterID }

// pendingFunc answers like pendAnswer, but first pends when it may: the
// operation at an auth layer (completed with the held data; the
// reauthorization then gets the answer), the classify at a redirect layer
// (completed with the answer). Refused a pend (no write right, a
// reauthorization), it answers inline.
func pendingFunc(salt uint64, style int, rec *pendRecorder) engine.ClassifyFunc {
	return func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		ans := pendAnswer(salt, style, req, out.Rights)
		l := engine.LayerByID(req.Layer)
		e := req.Engine()
		switch {
		case l.CanPendOperation:
			p, err := req.PendOperation()
			if err != nil {
				*out = ans
				return
			}
			rec.pended = append(rec.pended, req.Filter.ID)
			held := req.LayerData
			go func() { _ = e.CompleteOperation(p, held) }()
			out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
		case l.CanPendClassify:
			h, err := req.AcquireClassifyHandle()
			if err != nil {
				*out = ans
				return
			}
			if _, err := e.PendClassify(h, out); err != nil {
				e.ReleaseClassifyHandle(h)
				*out = ans
				return
			}
			rec.pended = append(rec.pended, req.Filter.ID)
			go func() {
				_ = e.CompleteClassify(h, ans)
				e.ReleaseClassifyHandle(h)
			}()
		default:
			*out = ans
		}
	}
}

// buildPendCase builds one random policy on layer from seed; pending
// selects the callouts that pend. The same seed gives the same filters,
// in the same order, with the same IDs.
func buildPendCase(t testing.TB, seed uint64, layer engine.LayerID, pending bool, rec *pendRecorder) (*engine.Engine, *diffPools) {
	t.Helper()
	g := newDgen(nil, seed)
	l := engine.LayerByID(layer)
	dc := &diffCase{e: engine.New(engine.Options{}), layer: l, pools: newDiffPools(g, l.V6, 1)}
	type reg struct {
		key          string
		salt         uint64
		style        int
		pends        bool
		unregistered bool
	}
	var regs []reg
	err := dc.e.Update(func(tx *engine.Txn) error {
		subs := []engine.SublayerID{0}
		for range g.intn(5) {
			id, err := tx.AddSublayer(engine.Sublayer{Weight: uint16(g.intn(4)) * 0x4000})
			if err != nil {
				return err
			}
			subs = append(subs, id)
		}
		var callouts []engine.CalloutID
		for i := range 1 + g.intn(5) {
			key := fmt.Sprintf("pend-callout-%d", i)
			id, err := tx.AddCallout(engine.Callout{Key: key, Layer: layer})
			if err != nil {
				return err
			}
			callouts = append(callouts, id)
			regs = append(regs, reg{key: key, salt: uint64(g.intn(1 << 30)), style: g.intn(3), pends: g.chance(70), unregistered: g.chance(10)})
		}
		for range 1 + g.intn(40) {
			f := dc.randomFilter(g, l, subs, callouts)
			// A reauthorization sees FLAG_IS_REAUTHORIZE: a filter on the
			// flags could tell the two runs apart.
			f.Conditions = slices.DeleteFunc(f.Conditions, func(c engine.Condition) bool { return c.Field == engine.FieldFlags })
			if g.chance(50) && len(callouts) > 0 { // callouts are what this test is about
				f.Action = engine.Action{Type: pick(g, []engine.ActionType{engine.ActionCalloutTerminating, engine.ActionCalloutUnknown, engine.ActionCalloutUnknown, engine.ActionCalloutInspection}),
					Callout: pick(g, callouts)}
				f.Flags &^= engine.FilterPermitIfCalloutUnregistered
			}
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range regs {
		if r.unregistered {
			continue
		}
		fn := engine.ClassifyFunc(func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			*out = pendAnswer(r.salt, r.style, req, out.Rights)
		})
		if pending && r.pends {
			fn = pendingFunc(r.salt, r.style, rec)
		}
		if err := dc.e.RegisterCallout(r.key, engine.CalloutRegistration{Classify: fn}); err != nil {
			t.Fatal(err)
		}
	}
	return dc.e, dc.pools
}

func TestDifferentialPendMatchesInline(t *testing.T) {
	cases, tuples := 240, 25
	if testing.Short() {
		cases = 60
	}
	stats := diffStats{}
	for i := range cases {
		layer := pendDiffLayers[i%len(pendDiffLayers)]
		kind := engine.LayerByID(layer).Name
		inline, pools := buildPendCase(t, uint64(5000+i), layer, false, nil)
		rec := &pendRecorder{}
		pend, _ := buildPendCase(t, uint64(5000+i), layer, true, rec)
		g := newDgen(nil, uint64(9000+i))
		l := engine.LayerByID(layer)
		held := &struct{ data string }{"held"}
		for range tuples {
			vs := pools.tuple(g, l)
			vs.Set(engine.FieldFlags, engine.Uint32(uint32(vs.Uint(engine.FieldFlags))&^engine.FlagIsReauthorize)) // present, as a datapath sets it
			want := inline.ClassifyLayerData(layer, vs, &engine.Metadata{}, held)
			vs2 := *vs
			rec.pended = rec.pended[:0]
			got, err := pend.ClassifyWait(context.Background(), layer, &vs2, &engine.Metadata{}, held)
			if err != nil {
				t.Fatal(err)
			}
			if refOutcomeOf(got) != refOutcomeOf(want) || got.Permitted() != want.Permitted() {
				var b strings.Builder
				fmt.Fprintf(&b, "case %d, %s, tuple %s: pended at %v\n", i, kind, vs, rec.pended)
				fmt.Fprintf(&b, "inline:           %s (%s)\npend, completed: %s (%s)\n", refOutcomeOf(want), want, refOutcomeOf(got), got)
				tr, _ := inline.Explain(layer, vs, nil)
				b.WriteString("filters (explain, callouts not called):\n" + tr.String())
				t.Fatal(b.String())
			}
			if len(rec.pended) == 0 {
				stats["not pended"]++
				continue
			}
			stats["pended at "+strings.TrimSuffix(strings.TrimSuffix(kind, "_V4"), "_V6")]++
			switch {
			case !slices.Contains(rec.pended, got.Filter):
				stats["pended, decided by another filter"]++
			case got.Permitted():
				stats["pended, permitted by it"]++
			default:
				stats["pended, blocked by it"]++
			}
			if got.Permitted() {
				stats["pended, permit"]++
			} else {
				stats["pended, block"]++
			}
			if got.Veto {
				stats["pended, veto"]++
			}
		}
		if o := pend.Outstanding(); o.Pends != 0 {
			// Completions run on their own goroutines: wait for the last.
			waitOutstanding(t, pend)
		}
	}
	stats.require(t, "pended at ALE_AUTH_RECV_ACCEPT", "pended at ALE_CONNECT_REDIRECT", "pended at ALE_BIND_REDIRECT", "pended at ALE_AUTH_CONNECT",
		"pended, decided by another filter", "pended, permitted by it", "pended, blocked by it", "pended, permit", "pended, block", "pended, veto")
}

func waitOutstanding(t *testing.T, e *engine.Engine) {
	t.Helper()
	for range 2000 {
		o := e.Outstanding()
		if o.Pends == 0 && o.ClassifyHandles == 0 {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("engine still holds %+v", e.Outstanding())
}
