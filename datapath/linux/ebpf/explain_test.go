//go:build linux

package ebpf

import (
	"math/rand/v2"
	"testing"

	"fwp/engine"
	"fwp/internal/testutil"
)

// explainBlocks is what fwpctl explain says of a connect: CONNECT_REDIRECT
// explained; when a built-in redirect's callout permitted there (the first
// to run picks the proxy), AUTH_CONNECT explained for the proxy's address.
func explainBlocks(t *testing.T, e *engine.Engine, tp tuple) (bool, string) {
	t.Helper()
	tr, err := e.Explain(engine.LayerFor(engine.KindConnectRedirect, tp.v6), tp.values(), nil)
	if err != nil {
		t.Fatal(err)
	}
	trace := tr.String()
	if !tr.Result.Permitted() {
		return true, trace
	}
	v := e.View()
	for _, s := range tr.Steps {
		if c, err := v.Callout(s.Callout); err == nil && IsBuiltinConnectRedirect(c.Key) && s.Returned == engine.ActionPermit {
			tp.remote = genProxy[tp.v6]
			tp.redirected = true
			break
		}
	}
	tr, err = e.Explain(engine.LayerFor(engine.KindAuthConnect, tp.v6), tp.values(), nil)
	if err != nil {
		t.Fatal(err)
	}
	return !tr.Result.Permitted(), trace + tr.String()
}

// TestKernelMatchesExplain: random policies with built-in redirects among
// the filters; explain (the engine with the built-in callouts registered,
// as fwpd does) must give the decision the kernel gives real connects.
func TestKernelMatchesExplain(t *testing.T) {
	d, cg := kernelSetup(t)
	h := testutil.StartHelper(t, cg, "probe")
	redirected := 0
	for seed := range uint64(40) {
		g := &gen{r: rand.New(rand.NewPCG(seed, 1234)), cgroup: cg.ID, v6: seed%4 == 3, redirects: true, flags: seed%3 != 0}
		e := g.policy(t, 1+g.r.IntN(20))
		if err := RegisterBuiltinCallouts(e, e.View()); err != nil {
			t.Fatal(err)
		}
		apply(t, d, e)
		var ops []probeOp
		var tuples []tuple
		for range 30 {
			tp := g.tuple()
			if tp.local.Port() == tp.remote.Port() {
				continue // a self-connect's TIME_WAIT would hold the port
			}
			net := map[uint8]string{6: "tcp", 17: "udp"}[tp.proto] + map[bool]string{false: "4", true: "6"}[tp.v6]
			op := probeOp{Net: net, Remote: tp.remote.String()}
			if tp.local.IsValid() {
				op.Local = tp.local.String()
			}
			ops, tuples = append(ops, op), append(tuples, tp)
		}
		got := probe(t, h, ops)
		for i, tp := range tuples {
			switch got[i] {
			case "eperm", "ok", "refused":
			default:
				t.Fatalf("seed %d op %+v: %s", seed, ops[i], got[i])
			}
			want, trace := explainBlocks(t, e, tp)
			if (got[i] == "eperm") != want {
				t.Fatalf("seed %d op %+v: kernel %s, explain blocks=%v\n%s", seed, ops[i], got[i], want, trace)
			}
			if !want && tp.proto == 6 && got[i] == "refused" {
				redirected++ // or a closed origin port: both are permits
			}
		}
	}
	if redirected == 0 {
		t.Errorf("no connect was permitted to a closed port: the policies never redirected")
	}
}
