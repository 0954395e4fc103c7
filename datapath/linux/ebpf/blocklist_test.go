//go:build linux

package ebpf

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"fwp/engine"
	"fwp/internal/testutil"
	"fwp/internal/unix"
)

func init() { testutil.RegisterHelper("listprobe", listProbeHelper) }

// blocklistSize is the list of TestKernelMillionBlocklist: FWP_BLOCKLIST,
// or 200,000 (cmd/fwpd's TestE2EKernelBlocklistFile applies a million
// through fwpd; FWP_BLOCKLIST=1000000 runs this one at that size too).
var blocklistSize = envInt("FWP_BLOCKLIST", 200_000)

// listAddr is the i-th even address from 127.1.0.0 (loopback: routed in
// the test namespace): lists are runs of
// them, odd addresses are on no list.
func listAddr(i int) netip.Addr {
	v := uint32(127<<24|1<<16) + 2*uint32(i)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// blocklistPolicy: one AUTH_CONNECT filter blocking n addresses from the
// from-th, one list condition (engine.List: what WFP holds as one
// condition per address, ORed).
func blocklistPolicy(t testing.TB, from, n int) *engine.Engine {
	b := engine.NewListBuilder(engine.TypeAddr, n)
	for i := range n {
		if err := b.Add(engine.Addr(listAddr(from + i))); err != nil {
			t.Fatal(err)
		}
	}
	conds := []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.ListValue(b.List())}}
	return buildEngine(t, func(tx *engine.Txn) error {
		_, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionBlock}, Conditions: conds})
		return err
	})
}

// listProbeHelper connects to each address of args (port 9, nothing
// listens) round after round until stdin closes, and writes each
// address's run of outcomes: "B" blocked (EPERM), "P" permitted
// (refused), each run once ("BBBPP" is written "BP").
func listProbeHelper(args []string) error {
	// Requests, one a line: "round" is answered once a whole round that
	// began after it is done (the test knows the probing saw a policy);
	// "stop" is answered with the runs.
	reqs := make(chan string)
	go func() {
		in := bufio.NewScanner(os.Stdin)
		for in.Scan() {
			reqs <- strings.TrimSpace(in.Text())
		}
		close(reqs)
	}()
	runs := make([]string, len(args))
	rounds := 0
	waiting := false
	for {
		select {
		case r, ok := <-reqs:
			if !ok || r == "stop" {
				return json.NewEncoder(os.Stdout).Encode(map[string]any{"runs": runs, "rounds": rounds})
			}
			if waiting {
				fmt.Println("ok") // the round under way began after the first request
			}
			waiting = true
		default:
		}
		for i, a := range args {
			c, err := net.Dial("tcp4", a+":9")
			o := "?"
			switch {
			case err == nil:
				c.Close()
				o = "P"
			case errors.Is(err, unix.EPERM):
				o = "B"
			case errors.Is(err, unix.ECONNREFUSED):
				o = "P"
			}
			if !strings.HasSuffix(runs[i], o) {
				runs[i] += o
			}
		}
		rounds++
		if waiting {
			fmt.Println("ok")
			waiting = false
		}
	}
}

// TestKernelMillionBlocklist: a filter with a million addresses is
// enforced (listed refused, unlisted not), and replaced by another
// million-address list in one switch: while the new list is written, the
// old one stays in force, and each address changes verdict at most once.
func TestKernelMillionBlocklist(t *testing.T) {
	d, cg := kernelSetup(t)
	n := blocklistSize
	if testing.Short() {
		n = 50_000
	}
	start := time.Now()
	e1 := blocklistPolicy(t, 0, n)
	t.Logf("engine: %v", time.Since(start))
	start = time.Now()
	p1, err := Compile(e1.View())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("compile: %v", time.Since(start))
	start = time.Now()
	if err := d.Apply(p1); err != nil {
		t.Fatal(err)
	}
	t.Logf("apply %d addresses: %v", n, time.Since(start))
	for name, m := range map[string]interface {
		Info() (*ebpf.MapInfo, error)
	}{"fwp_hosts": d.objs.FwpHosts, "fwp_host_ids": d.objs.FwpHostIds, "fwp_addrs": d.objs.FwpAddrs} {
		if info, err := m.Info(); err == nil {
			ml, _ := info.Memlock()
			t.Logf("kernel memory: %s %d bytes (memlock)", name, ml)
		}
	}
	if l := e1.View().Filters(engine.FilterTemplate{})[0].Conditions[0].Value.List(); l != nil {
		t.Logf("engine list: %d bytes, %.1f per address", l.Bytes(), float64(l.Bytes())/float64(n))
	}
	first, last, mid, unlisted := listAddr(0), listAddr(n-1), listAddr(n/2), listAddr(7).Next()
	h := testutil.StartHelper(t, cg, "probe")
	ops := func(as ...netip.Addr) []probeOp {
		var out []probeOp
		for _, a := range as {
			out = append(out, probeOp{Net: "tcp4", Remote: netip.AddrPortFrom(a, 9).String()})
		}
		return out
	}
	if got := probe(t, h, ops(first, mid, last, unlisted, listAddr(n))); fmt.Sprint(got) != "[eperm eperm eperm refused refused]" {
		t.Fatalf("first, middle, last listed, unlisted, past the list: %v", got)
	}

	// The second list: the upper half of the first and as many after it.
	e2 := blocklistPolicy(t, n/2, n)
	p2, err := Compile(e2.View())
	if err != nil {
		t.Fatal(err)
	}
	onlyOld, both, onlyNew := listAddr(1), listAddr(n-2), listAddr(n+n/4)
	lp := testutil.StartHelper(t, cg, "listprobe", onlyOld.String(), both.String(), onlyNew.String(), unlisted.String())
	round := func() {
		t.Helper()
		if out, err := lp.Call([]byte("round")); err != nil || strings.TrimSpace(string(out)) != "ok" {
			t.Fatalf("probe round: %q %v", out, err)
		}
	}
	round() // the old list seen (a fixed sleep was too short under load)
	start = time.Now()
	if err := d.Apply(p2); err != nil {
		t.Fatal(err)
	}
	t.Logf("replace by another %d-address list: %v", n, time.Since(start))
	round() // the new list seen
	line, err := lp.Call([]byte("stop"))
	if err != nil {
		t.Fatal(err)
	}
	var res struct {
		Runs   []string
		Rounds int
	}
	if err := json.Unmarshal(line, &res); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d probe rounds during the replacement: %v", res.Rounds, res.Runs)
	if want := []string{"BP", "B", "PB", "P"}; fmt.Sprint(res.Runs) != fmt.Sprint(want) {
		t.Fatalf("verdicts of (old only, both, new only, none) during the replacement: %v, want %v", res.Runs, want)
	}
	if got := probe(t, h, ops(first, mid, last, listAddr(n+n/2-1), unlisted)); fmt.Sprint(got) != "[refused eperm eperm eperm refused]" {
		t.Fatalf("after the replacement: %v", got)
	}
}

// filtersSize is the filters of TestKernelMillionFilters: FWP_FILTERS, or
// 200,000 (100,000 with -short), which keeps the test's memory (~0.8 GB at
// a million) out of CI's way beside the other packages' tests;
// FWP_FILTERS=1000000 runs the full size (~2-3 s, docs/benchmarks.md).
var filtersSize = envInt("FWP_FILTERS", 200_000)

// TestKernelMillionFilters: a million separate host filters of one action
// in one sublayer (a blocklist written as WFP writes it: one filter per
// address) compile into one collapsed run, a host table searched by the
// hooks; a listed connect is refused, an unlisted one passes, a permit
// above the run for one listed host still wins (arbitration against the
// other filters is exact), and the counter names the filter of the host.
func TestKernelMillionFilters(t *testing.T) {
	d, cg := kernelSetup(t)
	n := filtersSize
	if testing.Short() {
		n = min(n, 100_000)
	}
	var ids []engine.FilterID
	var permitID engine.FilterID
	start, cpu := time.Now(), cpuTime()
	e := buildEngine(t, func(tx *engine.Txn) error {
		ids = make([]engine.FilterID, n)
		for i := range n {
			id, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Weight: engine.WeightExact(10), Action: engine.Action{Type: engine.ActionBlock},
				Conditions: []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(listAddr(i))}}})
			if err != nil {
				return err
			}
			ids[i] = id
		}
		var err error
		permitID, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Weight: engine.WeightExact(20), Action: engine.Action{Type: engine.ActionPermit},
			Conditions: []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(listAddr(5))}}})
		return err
	})
	t.Logf("engine, %d filters: %v (CPU %v)", n+1, time.Since(start), cpuTime()-cpu)
	start, cpu = time.Now(), cpuTime()
	p, err := Compile(e.View())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("compile: %v (CPU %v)", time.Since(start), cpuTime()-cpu)
	lp := p.layers[2]
	if len(lp.filters) != 2 || len(lp.runs) != 1 || p.Filters() != n+1 {
		t.Fatalf("compiled to %d ranks, %d runs, %d filters; want 2 ranks (the permit, the run), 1 run, %d filters", len(lp.filters), len(lp.runs), p.Filters(), n+1)
	}
	start, cpu = time.Now(), cpuTime()
	if err := d.Apply(p); err != nil {
		t.Fatal(err)
	}
	t.Logf("apply: %v (CPU %v)", time.Since(start), cpuTime()-cpu)
	h := testutil.StartHelper(t, cg, "probe")
	// The datapath is shared: other tests' filters had these ids too.
	before, err := d.FilterHits()
	if err != nil {
		t.Fatal(err)
	}
	var ops []probeOp
	for _, a := range []netip.Addr{listAddr(0), listAddr(n / 3), listAddr(n - 1), listAddr(5), listAddr(7).Next(), listAddr(n)} {
		ops = append(ops, probeOp{Net: "tcp4", Remote: netip.AddrPortFrom(a, 9).String()})
	}
	if got := probe(t, h, ops); fmt.Sprint(got) != "[eperm eperm eperm refused refused refused]" {
		t.Fatalf("first, a third, last listed; listed but permitted above; unlisted; past the list: %v", got)
	}
	hits, err := d.FilterHits()
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []engine.FilterID{ids[0], ids[n/3], ids[n-1], permitID} {
		if hits[id]-before[id] != 1 {
			t.Errorf("filter %d decided %d connects, want 1 (hits %v, before %v)", id, hits[id]-before[id], hits, before)
		}
	}
	var m fwpHostRun
	if err := d.objs.FwpIdRuns.Lookup(uint32((int(d.gen)*numSlots+2)*maxRuns), &m); err != nil || int(m.Len+m.Pad) != n {
		t.Fatalf("run slice %+v %v", m, err)
	}
	// Counters of filters no longer installed are dropped; the run's
	// slices of the old generation are cleared by the next Apply.
	p2, err := Compile(blocklistPolicy(t, 0, 10).View())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Apply(p2); err != nil {
		t.Fatal(err)
	}
	var c struct {
		id  uint64
		per []uint64
	}
	it := d.objs.FwpHits.Iterate()
	for it.Next(&c.id, &c.per) {
		if !slices.Contains(p2.layers[2].live, c.id) { // a new engine: its ids start at 1 again
			t.Errorf("a counter of filter %d outlived its policy", c.id)
		}
	}
	if err := d.Apply(p2); err != nil {
		t.Fatal(err)
	}
	if err := d.objs.FwpIdRuns.Lookup(uint32((int(1-d.gen)*numSlots+2)*maxRuns), &m); err != nil || m != (fwpHostRun{}) {
		t.Fatalf("the old generation's run slice stayed: %+v %v", m, err)
	}
}

// cpuTime is the process's user and system time (the garbage collector's
// threads too): on a machine shared with other work, wall times measure
// the load as much as the code (docs/benchmarks.md).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Round(time.Millisecond)
}
