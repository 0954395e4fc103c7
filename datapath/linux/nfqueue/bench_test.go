//go:build linux

package nfqueue

import (
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
)

// BenchmarkNewFlowLatency measures connect+close from a program in the
// hooked cgroup (medians of rounds of 200, arms alternated in each round):
//
//	kernel         a plain permit filter decides in the kernel
//	callout        a Go callout embedded in this process permits at once (the SYN goes through the queue)
//	nocallout      a port no filter matches, callout filters present for other ports
//	nocallout-base the same port, the same policy without its callout filters (the kernel fast path)
//	peer           the kernel arm's decision, and the SYN queued by a rule of its own to an NFQUEUE
//	               peer (internal/nfqpeer: florianl/go-nfqueue/v2, a process of its own) that accepts it
//	peer-inproc    the same peer loop in this process
//	peer-raw       this package's own queue loops (pinned, raw netlink) accepting without a decision
//
// It reports each arm's median in µs, callout-kernel and peer-kernel in µs
// and nocallout/nocallout-base as a ratio. Run:
//
//	go test -run XXX -bench NewFlowLatency -benchtime 20x ./datapath/linux/nfqueue
func BenchmarkNewFlowLatency(b *testing.B) {
	fx := newFixture(b, pendTimeout)
	if prio, _ := strconv.Atoi(os.Getenv("FWP_BENCH_PRIO")); prio > 0 {
		fx.path.Close()
		var err error
		if fx.path, err = Start(fx.eng, fx.dp, Options{NetNS: int(fx.netns.Fd()), Priority: prio}); err != nil {
			b.Fatal(err)
		}
	}
	with, err := ebpf.Compile(fx.eng.View())
	if err != nil {
		b.Fatal(err)
	}
	bare := engine.New(engine.Options{})
	if err := bare.Update(func(tx *engine.Txn) error { return testPolicy(tx, false) }); err != nil {
		b.Fatal(err)
	}
	without, err := ebpf.Compile(bare.View())
	if err != nil {
		b.Fatal(err)
	}
	startPeers(b, fx)
	const n = 200
	lat := func(port int) time.Duration {
		f := fx.call(b, "lat "+strconv.Itoa(port)+" "+strconv.Itoa(n))
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			b.Fatalf("lat %d: %v", port, f)
		}
		return time.Duration(ns)
	}
	var kernel, callout, noCallout, base, peer, peerIn, peerRaw []time.Duration
	for b.Loop() {
		kernel = append(kernel, lat(portKernelPermit))
		callout = append(callout, lat(portPermit))
		peer = append(peer, lat(portPeer))
		peerIn = append(peerIn, lat(portPeerInproc))
		peerRaw = append(peerRaw, lat(portPeerRaw))
		noCallout = append(noCallout, lat(portKernel))
		if err := fx.dp.Apply(without); err != nil {
			b.Fatal(err)
		}
		base = append(base, lat(portKernel))
		if err := fx.dp.Apply(with); err != nil {
			b.Fatal(err)
		}
	}
	med := func(ds []time.Duration) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[len(s)/2]) / float64(time.Microsecond)
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(med(kernel), "kernel-µs")
	b.ReportMetric(med(callout), "callout-µs")
	b.ReportMetric(med(callout)-med(kernel), "callout-extra-µs")
	b.ReportMetric(med(peer)-med(kernel), "peer-extra-µs")
	b.ReportMetric(med(peerIn)-med(kernel), "peer-inproc-extra-µs")
	b.ReportMetric(med(peerRaw)-med(kernel), "peer-raw-extra-µs")
	b.ReportMetric(med(callout)-med(peer), "callout-over-peer-µs")
	b.ReportMetric(med(callout)-med(peerRaw), "callout-over-raw-µs")
	b.ReportMetric(med(noCallout), "nocallout-µs")
	b.ReportMetric(med(base), "nocallout-base-µs")
	b.ReportMetric(med(noCallout)/med(base), "nocallout/base")
	if st := fx.path.Stats(); st.Inline > 0 {
		b.ReportMetric(float64(st.InlineTime)/float64(st.Inline)/1e3, "decide-µs")
	}
}
