//go:build linux

package ebpf

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
)

// BenchmarkKernelInboundAccept measures what the inbound hooks cost a
// server: connect from outside the cgroup, accept, "hi", close, to a
// listener of a hooked cgroup (ingress, sockops and sock_release attached,
// an AUTH_RECV_ACCEPT policy in force) and, alternating op by op in the
// same run, to a listener of a cgroup without hooks, in one namespace.
func BenchmarkKernelInboundAccept(b *testing.B) {
	for _, n := range []int{1, 1000} {
		b.Run(fmt.Sprintf("filters=%d", n), func(b *testing.B) { benchInbound(b, n) })
	}
}

func benchInbound(b *testing.B, nfilters int) {
	testutil.RequireRoot(b)
	bareCg, cg := testutil.NewCgroup(b), testutil.NewCgroup(b)
	// A datapath of its own, so that only this policy's hooks run.
	d, err := Load(Options{})
	if err != nil {
		testutil.Unavailable(b, err)
	}
	b.Cleanup(func() { d.Close() })
	if err := d.Attach(cg.Path); err != nil {
		testutil.Unavailable(b, err)
	}
	// nfilters permits that do not match the benchmark's flows (other
	// remote ports) above one that does: the walk meets them all.
	apply(b, d, buildEngine(b, func(tx *engine.Txn) error {
		for i := range nfilters - 1 {
			if _, err := tx.AddFilter(blockFilter(recvAccept(false), engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(1 + i))})); err != nil {
				return err
			}
		}
		_, err := tx.AddFilter(engine.Filter{Layer: recvAccept(false), Action: engine.Action{Type: engine.ActionPermit},
			Conditions: []engine.Condition{{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(7201)}}})
		return err
	}))
	h := testutil.StartHelper(b, bareCg, "inserver")
	inServe(b, h, inListen{Net: "tcp4", Addr: "127.0.0.1:7200"}, inListen{Net: "tcp4", Addr: "127.0.0.1:7201", Cgroup: cg.Path})
	bare := inOp{"tcp4", netip.MustParseAddrPort("127.0.0.2:0"), netip.MustParseAddrPort("127.0.0.1:7200")}
	hooked := inOp{"tcp4", netip.MustParseAddrPort("127.0.0.2:0"), netip.MustParseAddrPort("127.0.0.1:7201")}
	var ns [2]time.Duration
	var runs [2]int
	err = inNetnsPid(h.Pid(), func() error {
		i := 0
		for b.Loop() {
			op := bare
			if i&1 == 1 {
				op = hooked
			}
			start := time.Now()
			if got := inProbeTimeout(op, time.Second); got != "ok" {
				return fmt.Errorf("%v: %s", op, got)
			}
			ns[i&1] += time.Since(start)
			runs[i&1]++
			i++
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	if runs[0] == 0 || runs[1] == 0 {
		return
	}
	nb, nh := float64(ns[0])/float64(runs[0]), float64(ns[1])/float64(runs[1])
	b.ReportMetric(nb, "ns/accept-nohooks")
	b.ReportMetric(nh, "ns/accept-hooked")
	b.ReportMetric(nh/nb, "ratio")

	// The hooks' own run time, in a separate pass (bpf_stats adds clock
	// reads to every run).
	b.StopTimer()
	stats, err := EnableStats()
	if err != nil {
		b.Fatal(err)
	}
	defer stats.Close()
	before, err := d.Stats()
	if err != nil {
		b.Fatal(err)
	}
	const passes = 200
	if err := inNetnsPid(h.Pid(), func() error {
		for range passes {
			if got := inProbeTimeout(hooked, time.Second); got != "ok" {
				return fmt.Errorf("%s", got)
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	after, err := d.Stats()
	if err != nil {
		b.Fatal(err)
	}
	for _, name := range []string{"ingress", "sockops", "sock_release"} {
		if n := after[name].Runs - before[name].Runs; n > 0 {
			b.ReportMetric(float64(after[name].RunTime-before[name].RunTime)/float64(n), "ns/"+name+"-run")
			b.ReportMetric(float64(n)/passes, name+"-runs/accept")
		}
	}
}
