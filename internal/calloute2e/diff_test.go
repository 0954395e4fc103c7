package calloute2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"fwp/engine"
	"fwp/mgmt"
)

// The differential test: random policies whose callouts are all remote
// (in a callout program) classify exactly as the same policies with the
// same callouts embedded — action, hard or soft, deciding filter, reason
// (veto included) and absorb.
func TestRemoteDifferential(t *testing.T) {
	d := startDaemon(t)
	type co struct {
		key  string
		salt uint64
		st   int
		reg  bool
	}
	cos := []co{{"dc-0", 11, 0, true}, {"dc-1", 22, 1, true}, {"dc-2", 33, 2, true}, {"dc-3", 44, 0, false}}
	// The reference: the same objects in a manager of this process, the
	// same callouts registered embedded.
	ref, err := mgmt.New(engine.New(engine.Options{}), mgmt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	sid := ref.OpenSession(mgmt.SessionInfo{Admin: true, Name: "ref"}).ID
	apply := func(ops []mgmt.Op) {
		t.Helper()
		if _, err := d.c.Apply(context.Background(), ops); err != nil {
			t.Fatal(err)
		}
		if _, err := ref.Apply(context.Background(), sid, ops); err != nil {
			t.Fatal(err)
		}
	}
	var ops []mgmt.Op
	var regs []string
	for _, c := range cos {
		o := calloutObj(c.key, connV4)
		ops = append(ops, mgmt.Op{Add: &o})
		if c.reg {
			regs = append(regs, fmt.Sprintf("%s=diff:%d:%d", c.key, c.salt, c.st))
			if err := ref.Engine().RegisterCallout(c.key, engine.CalloutRegistration{Classify: diffCallout(c.salt, c.st)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i, w := range []uint16{0x4000, 0x8000} {
		o := mgmt.Object{Sublayer: &mgmt.Sublayer{Key: fmt.Sprintf("ds-%d", i), Weight: w}}
		ops = append(ops, mgmt.Op{Add: &o})
	}
	apply(ops)
	startProg(t, d, "0s", regs...)

	rng := rand.New(rand.NewPCG(1, 2))
	ports := []uint16{80, 81, 443}
	addrs := []string{"10.1.1.1", "10.1.1.2"}
	kinds := map[string]int{}
	var prev []string
	for round := range 40 {
		ops = nil
		for _, k := range prev {
			ops = append(ops, mgmt.Op{Delete: &mgmt.Ref{Kind: mgmt.KindFilter, Key: k}})
		}
		prev = nil
		for i := range 3 + rng.IntN(8) {
			key := fmt.Sprintf("r%d-%d", round, i)
			f := &mgmt.Filter{Key: key, Layer: connV4.String(), Weight: fmt.Sprint(rng.IntN(4))}
			if s := rng.IntN(3); s > 0 {
				f.Sublayer = fmt.Sprintf("ds-%d", s-1)
			}
			if rng.IntN(2) == 0 {
				f.Conditions = append(f.Conditions, portIs(ports[rng.IntN(len(ports))]))
			}
			if rng.IntN(3) == 0 {
				f.Conditions = append(f.Conditions, mgmt.Condition{Field: "ip_remote_address", Match: "equal", Value: addrs[rng.IntN(len(addrs))]})
			}
			switch rng.IntN(5) {
			case 0:
				f.Action = "block"
			case 1:
				f.Action = "permit"
			default:
				f.Action = []string{"callout_terminating", "callout_inspection", "callout_unknown"}[rng.IntN(3)]
				f.Callout = cos[rng.IntN(len(cos))].key
				if f.Action != "callout_inspection" && rng.IntN(3) == 0 {
					f.Flags = append(f.Flags, "permit_if_callout_unregistered")
				}
			}
			if rng.IntN(4) == 0 {
				f.Flags = append(f.Flags, "clear_action_right")
			}
			ops = append(ops, mgmt.Op{Add: &mgmt.Object{Filter: f}})
			prev = append(prev, key)
		}
		apply(ops)
		remoteKeys := map[engine.FilterID]string{}
		fs, err := d.c.Filters(context.Background(), mgmt.Template{})
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fs {
			remoteKeys[engine.FilterID(f.ID)] = f.Key
		}
		for _, a := range addrs {
			for _, p := range ports {
				remote := netip.AddrPortFrom(netip.MustParseAddr(a), p)
				got := d.classify(connV4, remote.String(), nil)
				var vs engine.Values
				vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), remote)
				want := ref.Engine().Classify(connV4, &vs, nil)
				wantKey := ""
				if f, err := ref.Engine().View().Filter(want.Filter); err == nil {
					wantKey = f.Key
				}
				if got.ClassifyOut != want.ClassifyOut || got.Reason != want.Reason || remoteKeys[got.Filter] != wantKey {
					t.Fatalf("round %d, %s: remote %+v by %q (%s), embedded %+v by %q (%s)\npolicy %+v", round, remote,
						got.ClassifyOut, remoteKeys[got.Filter], got.Reason, want.ClassifyOut, wantKey, want.Reason, ops)
				}
				kinds[want.Reason.String()]++
				if want.Flags&engine.OutAbsorb != 0 {
					kinds["absorb"]++
				}
			}
		}
	}
	t.Logf("outcomes: %v", kinds)
	for _, r := range []engine.Reason{engine.ReasonCalloutPermit, engine.ReasonCalloutBlock, engine.ReasonCalloutVeto, engine.ReasonCalloutUnregisteredBlock} {
		if kinds[r.String()] == 0 {
			t.Errorf("no classification ended in %q: the test is too weak", r)
		}
	}
	if kinds["absorb"] == 0 {
		t.Error("no classification was absorbed: the test is too weak")
	}
}
