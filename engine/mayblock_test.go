package engine

import (
	"math/rand/v2"
	"testing"
)

func TestLayerMayBlock(t *testing.T) {
	permit := func(*ClassifyRequest, *ClassifyOut) {}
	e, _ := rtEngine(t, Options{},
		rtCallout{key: "remote", layer: LayerALEAuthConnectV4, reg: CalloutRegistration{Classify: permit}},
		rtCallout{key: "embedded", layer: LayerALEAuthRecvAcceptV4, reg: CalloutRegistration{Classify: permit}},
	)
	if e.LayerMayBlock(LayerALEAuthConnectV4) {
		t.Fatal("no CalloutMayBlock registration: may block")
	}
	if err := e.UnregisterCallout("remote"); err != nil {
		t.Fatal(err)
	}
	if err := e.RegisterCallout("remote", CalloutRegistration{Classify: permit, Flags: CalloutMayBlock}); err != nil {
		t.Fatal(err)
	}
	if !e.LayerMayBlock(LayerALEAuthConnectV4) {
		t.Error("a layer calling a CalloutMayBlock registration: not reported")
	}
	if e.LayerMayBlock(LayerALEAuthRecvAcceptV4) || e.LayerMayBlock(LayerALEAuthConnectV6) {
		t.Error("layers calling only embedded callouts, or none: reported")
	}
	if err := e.UnregisterCallout("remote"); err != nil {
		t.Fatal(err)
	}
	if e.LayerMayBlock(LayerALEAuthConnectV4) || e.mayBlock.Load() != 0 {
		t.Errorf("unregistered: still reported (count %d)", e.mayBlock.Load())
	}
	if err := e.RegisterCallout("remote", CalloutRegistration{Classify: permit}); err != nil {
		t.Fatal(err)
	}
	if e.LayerMayBlock(LayerALEAuthConnectV4) {
		t.Error("registered again without the flag: reported")
	}
}

// TestFlowMayBlock: for tuples across random policies of a may-block
// callout's filters, an embedded callout's and plain filters, FlowMayBlock
// is never false for a classification that calls the may-block callout,
// and it is false for a tuple no may-block filter matches.
func TestFlowMayBlock(t *testing.T) {
	rng := rand.New(rand.NewPCG(17, 13))
	for round := range 40 {
		e := New(Options{})
		var remoteCalls int
		remote := func(_ *ClassifyRequest, out *ClassifyOut) { remoteCalls++; out.Action = ActionPermit }
		embedded := func(_ *ClassifyRequest, out *ClassifyOut) { out.Action = ActionPermit }
		if err := e.RegisterCallout("remote", CalloutRegistration{Classify: remote, Flags: CalloutMayBlock}); err != nil {
			t.Fatal(err)
		}
		if err := e.RegisterCallout("embedded", CalloutRegistration{Classify: embedded}); err != nil {
			t.Fatal(err)
		}
		// remotePorts: the ports a may-block filter's conditions can match.
		remotePorts := map[uint16]bool{}
		wildRemote := false
		err := e.Update(func(tx *Txn) error {
			var cos [2]CalloutID
			for i, key := range []string{"remote", "embedded"} {
				co, err := tx.AddCallout(Callout{Key: key, Layer: LayerALEAuthConnectV4})
				if err != nil {
					return err
				}
				cos[i] = co
			}
			for range 1 + rng.IntN(12) {
				f := Filter{Layer: LayerALEAuthConnectV4, Weight: WeightIndex(uint8(rng.IntN(16)))}
				port := uint16(1 + rng.IntN(40))
				if rng.IntN(5) > 0 {
					f.Conditions = []Condition{{Field: FieldIPRemotePort, Match: MatchEqual, Value: Uint16(port)}}
				}
				switch k := rng.IntN(3); k {
				case 0, 1:
					f.Action = Action{Type: ActionCalloutTerminating, Callout: cos[k]}
					if rng.IntN(2) == 0 {
						f.Action.Type = ActionCalloutInspection
					}
					if k == 0 {
						if f.Conditions == nil {
							wildRemote = true
						}
						remotePorts[port] = true
					}
				default:
					f.Action = Action{Type: []ActionType{ActionPermit, ActionBlock}[rng.IntN(2)]}
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
		for port := uint16(1); port <= 42; port++ {
			var vs Values
			vs.Set(FieldIPProtocol, Uint8(6))
			vs.Set(FieldIPRemotePort, Uint16(port))
			may := e.FlowMayBlock(LayerALEAuthConnectV4, &vs)
			before := remoteCalls
			e.Classify(LayerALEAuthConnectV4, &vs, &Metadata{})
			if remoteCalls > before && !may {
				t.Fatalf("round %d port %d: the may-block callout was called, FlowMayBlock said no", round, port)
			}
			if !wildRemote && !remotePorts[port] && may {
				t.Fatalf("round %d port %d: no may-block filter matches, FlowMayBlock said yes", round, port)
			}
		}
	}
	// Without a may-block registration: false at once.
	e := New(Options{})
	var vs Values
	if e.FlowMayBlock(LayerALEAuthConnectV4, &vs) || e.FlowMayBlock(LayerID(0), &vs) {
		t.Fatal("no registration: may block")
	}
}
