//go:build linux

package ebpf

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"fwp/engine"
	"fwp/internal/testutil"
)

// TestFlowReleaseOnlyWithFlowEvents: with reauthorization alone the
// sock_release program is not attached (it only reports ends); from
// EnableFlowEvents it is, on a cgroup hooked before as well as on one
// hooked after, and each reports its outbound flows' ends.
func TestFlowReleaseOnlyWithFlowEvents(t *testing.T) {
	testutil.RequireRoot(t)
	d, err := Load(Options{}) // its own: the shared one's flow events may be on
	if err != nil {
		testutil.Unavailable(t, err)
	}
	defer d.Close()
	before, after := testutil.NewCgroup(t), testutil.NewCgroup(t)
	if err := d.Attach(before.Path); err != nil {
		testutil.Unavailable(t, err)
	}
	if err := d.EnableReauthorization(); err != nil {
		testutil.Unavailable(t, err)
	}
	apply(t, d, engine.New(engine.Options{}))
	stats, err := EnableStats()
	if err != nil {
		t.Fatal(err)
	}
	defer stats.Close()
	churn := func(cg *testutil.Cgroup, n int) {
		h := testutil.StartHelper(t, cg, "holdconns")
		var ports map[string]int
		callJSON(t, h, "open 0", &ports)
		var ok int
		callJSON(t, h, fmt.Sprintf("churn %d 1", n), &ok)
		if ok != n {
			t.Fatalf("%d of %d connects", ok, n)
		}
	}
	r0, _ := d.reauth.objs.FwpFlowRelease.Stats()
	churn(before, 20)
	r1, _ := d.reauth.objs.FwpFlowRelease.Stats()
	if r1.RunCount != r0.RunCount {
		t.Errorf("sock_release ran %d times with flow events off: attached for nothing", r1.RunCount-r0.RunCount)
	}

	if err := d.EnableFlowEvents(); err != nil {
		testutil.Unavailable(t, err)
	}
	if err := d.Attach(after.Path); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	closed := make(chan uint64, 1024)
	done := make(chan error, 1)
	go func() {
		done <- d.ReadFlowEvents(ctx, func(ev FlowEvent) {
			if ev.Type == FlowClosed && !ev.Flow.Inbound {
				select {
				case closed <- ev.Flow.CgroupID:
				default:
				}
			}
		})
	}()
	defer func() { cancel(); <-done }()
	churn(before, 5)
	churn(after, 5)
	got := map[uint64]int{}
	for deadline := time.After(10 * time.Second); got[before.ID] < 5 || got[after.ID] < 5; {
		select {
		case id := <-closed:
			got[id]++
		case <-deadline:
			t.Fatalf("closure reports: %d from the cgroup hooked before EnableFlowEvents, %d from the one hooked after; want 5 each",
				got[before.ID], got[after.ID])
		}
	}
}

// BenchmarkHookVariant compares two builds of bpf/fwp.c side by side: the
// embedded object (arm A) and the object file named by FWP_VARIANT_O (arm
// B), each its own datapath on its own cgroup with issue 15's policy (1M
// list + 1,000 app rules; FWP_VARIANT_POLICY=empty for none), connect+close
// alternated in one run; with FWP_VARIANT_REAUTH=1 both as fwpd attaches
// them by default. The ratio is B / A; the hooks' run times are each
// arm's. Skipped without FWP_VARIANT_O (a tool for changing the hooks).
func BenchmarkHookVariant(b *testing.B) {
	obj := os.Getenv("FWP_VARIANT_O")
	if obj == "" {
		b.Skip("FWP_VARIANT_O names the other build's fwp_bpfel.o")
	}
	testutil.RequireRoot(b)
	var e *engine.Engine
	if os.Getenv("FWP_VARIANT_POLICY") == "empty" {
		e = engine.New(engine.Options{})
	} else {
		e = appsBlocklistPolicy(b)
	}
	cgA, cgB := testutil.NewCgroup(b), testutil.NewCgroup(b)
	load := func(cg *testutil.Cgroup) *Datapath {
		d, err := Load(Options{})
		if err != nil {
			testutil.Unavailable(b, err)
		}
		b.Cleanup(func() { d.Close() })
		if err := d.Attach(cg.Path); err != nil {
			testutil.Unavailable(b, err)
		}
		if os.Getenv("FWP_VARIANT_REAUTH") != "" {
			if err := d.EnableReauthorization(); err != nil {
				testutil.Unavailable(b, err)
			}
		}
		apply(b, d, e)
		return d
	}
	dA := load(cgA)
	saved := loadSpec
	loadSpec = func() (*ebpf.CollectionSpec, error) { return ebpf.LoadCollectionSpec(obj) }
	dB := load(cgB)
	loadSpec = saved
	measure := func() (a, bb int64) {
		var ns [2]int64
		if err := json.Unmarshal(testutil.RunHelper(b, cgA, "connectpair", nil, cgA.Path, cgB.Path), &ns); err != nil {
			b.Fatal(err)
		}
		return ns[0], ns[1]
	}
	var nsA, nsB int64
	for b.Loop() {
		x, y := measure()
		nsA += x
		nsB += y
	}
	b.ReportMetric(float64(nsB)/float64(nsA), "ratio")
	b.StopTimer()
	stats, err := EnableStats()
	if err != nil {
		b.Fatal(err)
	}
	defer stats.Close()
	sA0, _ := dA.Stats()
	sB0, _ := dB.Stats()
	for range 2 {
		measure()
	}
	sA1, _ := dA.Stats()
	sB1, _ := dB.Stats()
	for _, arm := range []struct {
		name   string
		s0, s1 map[string]HookStats
	}{{"A", sA0, sA1}, {"B", sB0, sB1}} {
		var total time.Duration
		for h := range arm.s1 {
			if n := arm.s1[h].Runs - arm.s0[h].Runs; n > 0 {
				t := arm.s1[h].RunTime - arm.s0[h].RunTime
				total += t
				if h == "connect4" {
					b.ReportMetric(float64(t)/float64(n), "ns/connect4-run-"+arm.name)
				}
			}
		}
		b.ReportMetric(float64(total)/float64(2*pairRounds*pairPerRound), "ns/hooks-per-connect-"+arm.name)
	}
}

// TestKernelTrieSkipNeeded: a generation whose remote addresses are all
// in the host table skips the LPM trie after a host table miss; the next
// generation, adding a prefix filter beside the same list, looks the trie
// up again (the skip is per generation), and a connect to the prefix is
// blocked.
func TestKernelTrieSkipNeeded(t *testing.T) {
	d, cg := kernelSetup(t)
	listed := netip.AddrPortFrom(listAddr(7), 9).String()
	prefixed := "127.0.0.1:9" // in 127.0.0.0/24, not listed (listAddr starts at 127.1.0.0)
	e := blocklistPolicy(t, 0, 2*hostTableMin)
	p, err := Compile(e.View())
	if err != nil {
		t.Fatal(err)
	}
	slot, _ := slotOf(engine.LayerALEAuthConnectV4)
	if a := p.layers[slot].activeWord(); a&activeNoTrie == 0 {
		t.Fatalf("a list wholly in the host table: active %#x lacks the no-trie bit", a)
	}
	if err := d.Apply(p); err != nil {
		t.Fatal(err)
	}
	h := testutil.StartHelper(t, cg, "probe")
	ops := []probeOp{{Net: "udp4", Remote: listed}, {Net: "udp4", Remote: prefixed}}
	if got := fmt.Sprint(probe(t, h, ops)); got != "[eperm ok]" {
		t.Fatalf("list alone: %v, want [eperm ok]", got)
	}
	if err := e.Update(func(tx *engine.Txn) error {
		_, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
			engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Prefix(netip.MustParsePrefix("127.0.0.0/24"))}))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	apply(t, d, e)
	if got := fmt.Sprint(probe(t, h, ops)); got != "[eperm eperm]" {
		t.Fatalf("list and a prefix: %v, want [eperm eperm] (the trie looked up again)", got)
	}
}
