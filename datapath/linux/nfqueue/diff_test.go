//go:build linux

package nfqueue

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"strings"
	"testing"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
)

// The differential test's ports: the helper accepts on each.
const (
	diffFirst = 9000
	diffLast  = 9023
)

// diffCallout decides by port: permit, block or continue, so the same
// callout gives several answers within one policy.
func diffCallout(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
	switch req.Values.Uint(engine.FieldIPRemotePort) % 3 {
	case 0:
		out.Action = engine.ActionPermit
	case 1:
		out.Action = engine.ActionBlock
	}
}

// randomCalloutPolicy: filters at AUTH_CONNECT_V4 in three sublayers with
// random weights, remote-port conditions (equal or range), permit, block
// and callouts of each kind (one registered, one not), with random
// CLEAR_ACTION_RIGHT and PERMIT_IF_CALLOUT_UNREGISTERED.
func randomCalloutPolicy(r *rand.Rand, tx *engine.Txn) error {
	p, err := tx.AddProvider(engine.Provider{Key: "diff"})
	if err != nil {
		return err
	}
	var subs []engine.SublayerID
	for i := range 3 {
		sl, err := tx.AddSublayer(engine.Sublayer{Key: fmt.Sprint("diff", i), Provider: p, Weight: uint16(10 * (i + 1))})
		if err != nil {
			return err
		}
		subs = append(subs, sl)
	}
	var cos []engine.CalloutID
	for _, key := range []string{"diff.registered", "diff.missing"} {
		co, err := tx.AddCallout(engine.Callout{Key: key, Provider: p, Layer: engine.LayerALEAuthConnectV4})
		if err != nil {
			return err
		}
		cos = append(cos, co)
	}
	tcp := engine.Condition{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)}
	for range 4 + r.IntN(10) {
		f := engine.Filter{Layer: engine.LayerALEAuthConnectV4, Sublayer: subs[r.IntN(3)], Provider: p, Weight: engine.WeightExact(r.Uint64N(1000))}
		lo := uint16(diffFirst + r.IntN(diffLast-diffFirst+1))
		if r.IntN(2) == 0 {
			f.Conditions = append(f.Conditions, engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(lo)})
		} else {
			hi := min(lo+uint16(r.IntN(8)), diffLast)
			f.Conditions = append(f.Conditions, engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(lo), engine.Uint16(hi))})
		}
		if r.IntN(4) == 0 {
			f.Flags |= engine.FilterClearActionRight
		}
		switch r.IntN(5) {
		case 0:
			f.Action = engine.Action{Type: engine.ActionPermit}
		case 1:
			f.Action = engine.Action{Type: engine.ActionBlock}
		default:
			f.Conditions = append(f.Conditions, tcp)
			types := []engine.ActionType{engine.ActionCalloutTerminating, engine.ActionCalloutUnknown, engine.ActionCalloutInspection}
			f.Action = engine.Action{Type: types[r.IntN(3)], Callout: cos[r.IntN(2)]}
			if f.Action.Type != engine.ActionCalloutInspection && r.IntN(2) == 0 {
				f.Flags |= engine.FilterPermitIfCalloutUnregistered
			}
		}
		if _, err := tx.AddFilter(f); err != nil {
			return err
		}
	}
	return nil
}

// TestKernelCalloutMatchesEngine: random policies mixing kernel-decided
// filters and Go callouts; for every port the real connect's outcome (in
// the kernel alone or through the callout path) is engine.Classify's.
func TestKernelCalloutMatchesEngine(t *testing.T) {
	fx := newFixture(t, pendTimeout)
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 17))
	rounds := 6
	if os.Getenv("FWP_DIFF_ROUNDS") != "" {
		fmt.Sscan(os.Getenv("FWP_DIFF_ROUNDS"), &rounds)
	}
	for round := range rounds {
		eng := engine.New(engine.Options{PendTimeout: pendTimeout})
		if err := eng.RegisterCallout("diff.registered", engine.CalloutRegistration{Classify: diffCallout}); err != nil {
			t.Fatal(err)
		}
		if err := eng.Update(func(tx *engine.Txn) error { return randomCalloutPolicy(r, tx) }); err != nil {
			t.Fatal(err)
		}
		pol, err := ebpf.Compile(eng.View())
		if err != nil {
			t.Fatal(err)
		}
		fx.path.Close()
		if fx.path, err = Start(eng, fx.dp, Options{NetNS: int(fx.netns.Fd())}); err != nil {
			t.Fatal(err)
		}
		if err := fx.dp.Apply(pol); err != nil {
			t.Fatal(err)
		}
		var want strings.Builder
		for port := diffFirst; port <= diffLast; port++ {
			var vs engine.Values
			vs.SetTuple(6, netip.AddrPort{}, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port)))
			vs.Set(engine.FieldALEUserID, engine.Uint32(0))
			vs.Set(engine.FieldCgroupID, engine.Uint64(fx.cg.ID))
			if eng.Classify(engine.LayerALEAuthConnectV4, &vs, &engine.Metadata{}).Permitted() {
				want.WriteByte('o')
			} else {
				want.WriteByte('x')
			}
		}
		got := strings.Join(fx.call(t, fmt.Sprintf("probe %d %d", diffFirst, diffLast)), "")
		if got != want.String() {
			var fs strings.Builder
			for _, f := range eng.View().Filters(engine.FilterTemplate{}) {
				fmt.Fprintf(&fs, "\n  %s sublayer %s weight %v flags %v %v %v", f.ID, f.Sublayer, f.Weight, f.Flags, f.Action, f.Conditions)
			}
			t.Fatalf("round %d (seed %d): ports %d..%d\nkernel %s\nengine %s\npolicy:%s", round, seed, diffFirst, diffLast, got, want.String(), fs.String())
		}
	}
	fx.checkClean(t)
}
