//go:build linux

package nfqueue

import (
	"slices"
	"strconv"
	"testing"
	"time"
)

// BenchmarkInboundUDPFirstDatagram measures the first datagram of a new
// inbound UDP flow and its echo (socket, send, receive, close) from a
// client outside the hooked cgroup to a server in it, each flow from its
// own local port (a new conntrack entry, a new flow for the hook); the
// arms alternate in each round of 200:
//
//	kernel   a plain permit filter at AUTH_RECV_ACCEPT decides in the ingress hook (its port is not queued)
//	callout  a Go callout embedded in this process permits at once (the datagram goes through the queue)
//
// It reports each arm's median in µs and callout-kernel in µs. Run:
//
//	go test -run XXX -bench InboundUDPFirstDatagram -benchtime 20x ./datapath/linux/nfqueue
func BenchmarkInboundUDPFirstDatagram(b *testing.B) {
	fx := newInUDPFixture(b, pendTimeout)
	const n = 200
	ds := make([]time.Duration, n)
	from := 30000
	lat := func(port int) time.Duration {
		var err error
		if nerr := inNetns(fx.netns, func() {
			for i := range ds {
				from++
				start := time.Now()
				var got int
				if got, _, err = udpExchange("udp4", "127.0.0.1:"+strconv.Itoa(port), from, 1, 5*time.Second); err != nil || got != 1 {
					return
				}
				ds[i] = time.Since(start)
			}
		}); nerr != nil {
			b.Fatal(nerr)
		}
		if err != nil {
			b.Fatalf("port %d: %v", port, err)
		}
		if from > 60000 {
			from = 30000 // the conntrack entries of a round ago have not expired: a reused port is a known flow
		}
		slices.Sort(ds)
		return ds[n/2]
	}
	var kernel, callout []time.Duration
	st0 := fx.path.Stats()
	for b.Loop() {
		callout = append(callout, lat(udpInPermit))
		kernel = append(kernel, lat(udpInKernel))
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
	if st := fx.path.Stats(); st.Inline > st0.Inline {
		b.ReportMetric(float64(st.InlineTime-st0.InlineTime)/float64(st.Inline-st0.Inline)/1e3, "decide-µs")
	}
}
