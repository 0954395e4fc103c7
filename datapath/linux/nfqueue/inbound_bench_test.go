//go:build linux

package nfqueue

import (
	"net"
	"slices"
	"strconv"
	"testing"
	"time"
)

// BenchmarkInboundFlowLatency measures connect+close from a client outside
// the hooked cgroup to a server in it (medians of rounds of 200, arms
// alternated in each round):
//
//	kernel         a plain permit filter at AUTH_RECV_ACCEPT decides in the ingress hook; the input chain does not queue its port (no callout filter can match it)
//	kernel-queued  the same with the input chain queueing every port: the SYN goes through the queue, the engine agrees, the hook decides
//	callout        a Go callout embedded in this process permits at once (the SYN goes through the queue)
//
// It reports each arm's median in µs and callout-kernel in µs. Run:
//
//	go test -run XXX -bench InboundFlowLatency -benchtime 20x ./datapath/linux/nfqueue
func BenchmarkInboundFlowLatency(b *testing.B) {
	fx := newInFixture(b, pendTimeout, nil)
	const n = 200
	ds := make([]time.Duration, n)
	lat := func(port int) time.Duration {
		var err error
		if nerr := inNetns(fx.netns, func() {
			for i := range ds {
				start := time.Now()
				var c net.Conn
				if c, err = net.DialTimeout("tcp4", "127.0.0.1:"+strconv.Itoa(port), 5*time.Second); err != nil {
					return
				}
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
				ds[i] = time.Since(start)
			}
		}); nerr != nil {
			b.Fatal(nerr)
		}
		if err != nil {
			b.Fatalf("port %d: %v", port, err)
		}
		slices.Sort(ds)
		return ds[n/2]
	}
	cg, err := cgroupOf(fx.cg.Path)
	if err != nil {
		b.Fatal(err)
	}
	var kernel, queued, callout []time.Duration
	st0 := fx.path.Stats()
	for b.Loop() {
		callout = append(callout, lat(portPermit))
		kernel = append(kernel, lat(portKernelPermit))
		if err := installInput(int(fx.netns.Fd()), fx.path.opts.Marks, fx.path.opts.QueueBase, uint16(fx.path.opts.Queues), []cgroupMatch{cg}, nil, false); err != nil {
			b.Fatal(err) // every port
		}
		queued = append(queued, lat(portKernelPermit))
		if err := installInput(int(fx.netns.Fd()), fx.path.opts.Marks, fx.path.opts.QueueBase, uint16(fx.path.opts.Queues), []cgroupMatch{cg}, fx.path.inPorts, false); err != nil {
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
	b.ReportMetric(med(queued), "kernel-queued-µs")
	b.ReportMetric(med(callout)-med(kernel), "callout-extra-µs")
	if st := fx.path.Stats(); st.Inline > st0.Inline {
		b.ReportMetric(float64(st.InlineTime-st0.InlineTime)/float64(st.Inline-st0.Inline)/1e3, "decide-µs")
	}
}
