package engine_test

import (
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"fwp/engine"
)

// scaleN is the filter count of BenchmarkTxnHostFilters: FWP_BENCH_N, or
// 100,000 so that a plain -bench run stays short.
func scaleN() int {
	if n, err := strconv.Atoi(os.Getenv("FWP_BENCH_N")); err == nil && n > 0 {
		return n
	}
	return 100_000
}

// scaleAddr is the i-th host of the scale benchmark's blocklist.
func scaleAddr(i int) netip.Addr {
	v := uint32(10<<24) + uint32(i)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// addHostFilters adds n host block filters of one weight, each its own
// filter (a blocklist written as WFP writes it), and one permit above the
// third of them, in one transaction.
func addHostFilters(tb testing.TB, e *engine.Engine, n int) {
	tb.Helper()
	err := e.Update(func(tx *engine.Txn) error {
		for i := range n {
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Weight: engine.WeightExact(10), Action: engine.Action{Type: engine.ActionBlock},
				Conditions: []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(scaleAddr(i))}}}); err != nil {
				return err
			}
		}
		_, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Weight: engine.WeightExact(20), Action: engine.Action{Type: engine.ActionPermit},
			Conditions: []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(scaleAddr(n / 3))}}})
		return err
	})
	if err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkTxnHostFilters times one transaction adding FWP_BENCH_N separate
// host filters (and a permit) to a new engine and committing them:
// validation, the tables, the order and the compiled index.
//
//	FWP_BENCH_N=1000000 go test -run XXX -bench BenchmarkTxnHostFilters -benchtime 3x -benchmem ./engine
func BenchmarkTxnHostFilters(b *testing.B) {
	n := scaleN()
	b.ReportAllocs()
	cpu := cpuTime()
	for b.Loop() {
		addHostFilters(b, engine.New(engine.Options{}), n)
	}
	b.ReportMetric(float64(n), "filters")
	b.ReportMetric((cpuTime()-cpu).Seconds()/float64(b.N), "cpu-s/op")
}

// cpuTime is the process's user and system time: on a machine shared
// with other work, wall time per op says more about the load than about
// the code (the garbage collector's threads count too).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkViewFilters times the enumeration of FWP_BENCH_N filters in
// evaluation order, which a datapath's compiler reads.
func BenchmarkViewFilters(b *testing.B) {
	n := scaleN()
	e := engine.New(engine.Options{})
	addHostFilters(b, e, n)
	v := e.View()
	b.ReportAllocs()
	cpu := cpuTime()
	for b.Loop() {
		if fs := v.Filters(engine.FilterTemplate{}); len(fs) != n+1 {
			b.Fatal(len(fs))
		}
	}
	b.ReportMetric((cpuTime()-cpu).Seconds()/float64(b.N), "cpu-s/op")
}
