package mgmt

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"fwp/engine"
)

// BenchmarkApplyHostFilters: FWP_BENCH_N (default 100,000) separate
// persistent host filters applied in one transaction, in ops of 10,000 as
// a client sends them: the objects' parsing, the overlays, the store's
// journal write and the engine's transaction.
//
//	FWP_BENCH_N=1000000 go test -run XXX -bench BenchmarkApplyHostFilters -benchtime 2x -benchmem ./mgmt
func BenchmarkApplyHostFilters(b *testing.B) {
	n := 100_000
	if v, err := strconv.Atoi(os.Getenv("FWP_BENCH_N")); err == nil && v > 0 {
		n = v
	}
	ops := make([]Op, n)
	for i := range n {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		ops[i] = Op{Add: &Object{Filter: &Filter{Key: fmt.Sprintf("h%d", i), Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Weight: "10", Lifetime: LifetimePersistent,
			Conditions: []Condition{{Field: "ip_remote_address", Match: "equal", Value: a.String()}}}}}
	}
	ctx := context.Background()
	var ru0, ru1 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	for b.Loop() {
		m, err := New(engine.New(engine.Options{}), Options{StateDir: b.TempDir(), TxnTimeout: time.Minute})
		if err != nil {
			b.Fatal(err)
		}
		s := open(m, "bench", false)
		if err := m.Begin(ctx, s); err != nil {
			b.Fatal(err)
		}
		for i := 0; i < n; i += 10_000 {
			if _, err := m.Apply(ctx, s, ops[i:min(n, i+10_000)]); err != nil {
				b.Fatal(err)
			}
		}
		if err := m.Commit(s); err != nil {
			b.Fatal(err)
		}
		m.Close()
	}
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
	b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/op")
	b.ReportMetric(float64(n), "filters")
}

// BenchmarkLoadHostFilters: a manager started on a store whose journal
// holds FWP_BENCH_N (default 100,000) persistent host filters committed in
// one transaction, as fwpd restarts after BenchmarkApplyHostFilters's
// commit: the journal's decoding and the load's engine transaction.
//
//	FWP_BENCH_N=1000000 go test -run XXX -bench BenchmarkLoadHostFilters -benchtime 2x -benchmem ./mgmt
func BenchmarkLoadHostFilters(b *testing.B) {
	n := 100_000
	if v, err := strconv.Atoi(os.Getenv("FWP_BENCH_N")); err == nil && v > 0 {
		n = v
	}
	dir := b.TempDir()
	m, err := New(engine.New(engine.Options{}), Options{StateDir: dir, TxnTimeout: time.Minute})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	s := open(m, "bench", false)
	if err := m.Begin(ctx, s); err != nil {
		b.Fatal(err)
	}
	for i := range n {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		o := Object{Filter: &Filter{Key: fmt.Sprintf("h%d", i), Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Weight: "10", Lifetime: LifetimePersistent,
			Conditions: []Condition{{Field: "ip_remote_address", Match: "equal", Value: a.String()}}}}
		if _, err := m.Apply(ctx, s, []Op{{Add: &o}}); err != nil {
			b.Fatal(err)
		}
	}
	if err := m.Commit(s); err != nil {
		b.Fatal(err)
	}
	m.Close()
	var ru0, ru1 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	for b.Loop() {
		m, err := New(engine.New(engine.Options{}), Options{StateDir: dir, TxnTimeout: time.Minute})
		if err != nil {
			b.Fatal(err)
		}
		if len(m.stored) != n {
			b.Fatalf("loaded %d filters, want %d", len(m.stored), n)
		}
		m.Close()
	}
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
	b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/op")
	b.ReportMetric(float64(n), "filters")
}
