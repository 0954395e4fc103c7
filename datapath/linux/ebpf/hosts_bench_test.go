package ebpf

import (
	"os"
	"strconv"
	"testing"

	"fwp/engine"
)

// benchSize is the entries of the compile benchmarks: FWP_BENCH_N or a
// million.
func benchSize() int {
	if n, err := strconv.Atoi(os.Getenv("FWP_BENCH_N")); err == nil && n > 0 {
		return n
	}
	return 1_000_000
}

// BenchmarkCompileHostFilters: Compile of a layer of n separate host
// filters of one action (one collapsed run).
func BenchmarkCompileHostFilters(b *testing.B) {
	n := benchSize()
	e := buildEngine(b, func(tx *engine.Txn) error {
		for i := range n {
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Weight: engine.WeightExact(10), Action: engine.Action{Type: engine.ActionBlock},
				Conditions: []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(listAddr(i))}}}); err != nil {
				return err
			}
		}
		return nil
	})
	v := e.View()
	for b.Loop() {
		p, err := Compile(v)
		if err != nil || len(p.layers[2].runs) != 1 {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n), "filters")
}

// BenchmarkCompileList: Compile of one filter whose list holds n hosts.
func BenchmarkCompileList(b *testing.B) {
	n := benchSize()
	e := blocklistPolicy(b, 0, n)
	v := e.View()
	for b.Loop() {
		p, err := Compile(v)
		if err != nil || len(p.layers[2].hosts[0].hosts) != n {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n), "hosts")
}
