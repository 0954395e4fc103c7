package client_test

import (
	"context"
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/server"
	"fwp/mgmt"
)

func filterOps(prefix string, n int, l mgmt.Lifetime) (add, del []mgmt.Op) {
	for i := range n {
		key := fmt.Sprint(prefix, i)
		add = append(add, mgmt.Op{Add: &mgmt.Object{Filter: &mgmt.Filter{Key: key, Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Lifetime: l,
			Conditions: []mgmt.Condition{
				{Field: "ip_remote_port", Match: "equal", Value: fmt.Sprint(i%60000 + 1)},
				{Field: "ip_remote_address", Match: "equal", Value: fmt.Sprintf("10.%d.%d.0/24", i/256%256, i%256)},
			}}}})
		del = append(del, mgmt.Op{Delete: &mgmt.Ref{Kind: mgmt.KindFilter, Key: key}})
	}
	return add, del
}

// BenchmarkCommit10kFilters commits 10,000 filters in one transaction
// through the API (client → gRPC over the unix socket → manager → engine
// swap); persistent also writes and fsyncs the store.
func BenchmarkCommit10kFilters(b *testing.B) {
	for _, l := range []mgmt.Lifetime{mgmt.LifetimeStatic, mgmt.LifetimePersistent} {
		b.Run(l.String(), func(b *testing.B) {
			sock, _ := startServer(b, server.Config{MaxMsgBytes: 64 << 20})
			c := dial(b, sock, false)
			ctx := context.Background()
			add, del := filterOps("f", 10000, l)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.Apply(ctx, add); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if _, err := c.Apply(ctx, del); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

var idleNsPerOp float64

// BenchmarkClassifyWhileCommitting measures classification with 1,000
// filters installed, idle and while another goroutine commits 1,000-filter
// transactions through the API in a loop; the second reports the ratio.
func BenchmarkClassifyWhileCommitting(b *testing.B) {
	sock, m := startServer(b, server.Config{MaxMsgBytes: 64 << 20})
	c := dial(b, sock, false)
	ctx := context.Background()
	base, _ := filterOps("base", 1000, mgmt.LifetimeStatic)
	if _, err := c.Apply(ctx, base); err != nil {
		b.Fatal(err)
	}
	eng := m.Engine()
	vs := &engine.Values{}
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.3.7.9:999"))
	classify := func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			eng.Classify(engine.LayerALEAuthConnectV4, vs, nil)
		}
	}
	b.Run("idle", func(b *testing.B) {
		classify(b)
		idleNsPerOp = float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	})
	// Each load runs beside classification on the same machine (2 vCPUs
	// here): "spin" is a control that only burns the other CPU; "mgmt"
	// commits through the manager directly, "api" through gRPC; "paced"
	// commits 20 times a second (busy policy churn), "flat-out" as fast as
	// it can.
	sid := m.OpenSession(mgmt.SessionInfo{Name: "bench"}).ID
	loads := []struct {
		name  string
		pace  time.Duration
		apply func([]mgmt.Op) error
	}{
		{"spin", 0, nil},
		{"mgmt-paced", 50 * time.Millisecond, func(ops []mgmt.Op) error { _, err := m.Apply(ctx, sid, ops); return err }},
		{"api-paced", 50 * time.Millisecond, func(ops []mgmt.Op) error { _, err := c.Apply(ctx, ops); return err }},
		{"api-flat-out", 0, func(ops []mgmt.Op) error { _, err := c.Apply(ctx, ops); return err }},
	}
	runs := 0
	for _, load := range loads {
		b.Run(load.name, func(b *testing.B) {
			// A fresh prefix per run: a run may stop between add and delete.
			runs++
			add, del := filterOps(fmt.Sprint("churn", runs, "-"), 1000, mgmt.LifetimeStatic)
			stop := make(chan struct{})
			var commits atomic.Int64
			done := make(chan struct{})
			go func() {
				defer close(done)
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					if load.apply == nil {
						commits.Store(1) // spin: no commits
						continue
					}
					time.Sleep(load.pace)
					ops := add
					if i%2 == 1 {
						ops = del
					}
					if err := load.apply(ops); err != nil {
						panic(err)
					}
					commits.Add(1)
				}
			}()
			for commits.Load() == 0 {
				time.Sleep(time.Millisecond)
			}
			classify(b)
			close(stop)
			<-done
			ns := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
			if load.apply != nil {
				b.ReportMetric(float64(commits.Load())/b.Elapsed().Seconds(), "commits/s")
			}
			if idleNsPerOp > 0 {
				b.ReportMetric(ns/idleNsPerOp, "x-idle")
			}
		})
	}
}
