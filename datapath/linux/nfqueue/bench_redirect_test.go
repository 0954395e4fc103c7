//go:build linux

package nfqueue

import (
	"slices"
	"strconv"
	"testing"
	"time"
)

func median(ds []time.Duration) float64 {
	s := slices.Clone(ds)
	slices.Sort(s)
	return float64(s[len(s)/2]) / float64(time.Microsecond)
}

func latOf(b *testing.B, fx *fixture, port, n int) time.Duration {
	f := fx.call(b, "lat "+strconv.Itoa(port)+" "+strconv.Itoa(n))
	ns, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		b.Fatalf("lat %d: %v", port, f)
	}
	return time.Duration(ns)
}

// BenchmarkConntrackCost measures what the run-time redirect and UDP
// rules (which bring conntrack into the served namespace) cost flows that
// need no callout and flows a Go callout permits at once: connect+close
// medians of rounds of 200, the path restarted without and with them in
// each round (alternated). Run:
//
//	go test -run XXX -bench ConntrackCost -benchtime 10x ./datapath/linux/nfqueue
func BenchmarkConntrackCost(b *testing.B) {
	fx := newFixture(b, pendTimeout)
	restart := func(opts Options) {
		fx.path.Close()
		opts.NetNS = int(fx.netns.Fd())
		var err error
		if fx.path, err = Start(fx.eng, fx.dp, opts); err != nil {
			b.Fatal(err)
		}
	}
	const n = 200
	var plainK, ctK, plainC, ctC []time.Duration
	for b.Loop() {
		restart(Options{})
		plainK = append(plainK, latOf(b, fx, portKernel, n))
		plainC = append(plainC, latOf(b, fx, portPermit, n))
		restart(Options{Redirects: true, UDP: true})
		ctK = append(ctK, latOf(b, fx, portKernel, n))
		ctC = append(ctC, latOf(b, fx, portPermit, n))
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(median(plainK), "kernel-µs")
	b.ReportMetric(median(ctK), "kernel-conntrack-µs")
	b.ReportMetric(median(ctK)/median(plainK), "kernel-conntrack/plain")
	b.ReportMetric(median(plainC), "callout-µs")
	b.ReportMetric(median(ctC), "callout-conntrack-µs")
	b.ReportMetric(median(ctC)/median(plainC), "callout-conntrack/plain")
}

// BenchmarkRunTimeRedirect measures connect+close of a flow an inline Go
// callout redirects at run time (to a plain server) against a connect
// straight to that server (no filter: the kernel fast path), medians of
// rounds of 100, alternated; and the time the read loop takes to decide a
// redirected flow (the engine, the maps and the DNAT map's netlink
// transaction). Run:
//
//	go test -run XXX -bench RunTimeRedirect -benchtime 10x ./datapath/linux/nfqueue
func BenchmarkRunTimeRedirect(b *testing.B) {
	in, _ := inlineRedirectFixture(b)
	const n = 100
	var inl, indirect []time.Duration
	for b.Loop() {
		inl = append(inl, latOf(b, in, portRedirectSoak, n))
		indirect = append(indirect, latOf(b, in, portKernel, n))
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(median(inl), "inline-redirected-µs")
	b.ReportMetric(median(indirect), "inline-direct-µs")
	b.ReportMetric(median(inl)-median(indirect), "inline-redirect-extra-µs")
	if st := in.path.Stats(); st.Inline > 0 {
		b.ReportMetric(float64(st.InlineTime)/float64(st.Inline)/1e3, "inline-decide-µs")
	}
}
