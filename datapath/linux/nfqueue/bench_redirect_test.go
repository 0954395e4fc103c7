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

// BenchmarkRunTimeRedirect measures connect+close of a flow a Go callout
// redirects at run time (TestRunTimeRedirectChain's chain: provider A's
// inline redirect, B's pended deferral) against a connect straight to the
// proxy (no filter: the kernel fast path), medians of rounds of 100,
// alternated. The proxies' onward connections run meanwhile. Run:
//
//	go test -run XXX -bench RunTimeRedirect -benchtime 10x ./datapath/linux/nfqueue
func BenchmarkRunTimeRedirect(b *testing.B) {
	fx, _ := redirectFixture(b, Options{})
	if err := fx.path.EnableRedirects(); err != nil {
		b.Fatal(err)
	}
	const n = 100
	var redir, direct []time.Duration
	for b.Loop() {
		redir = append(redir, latOf(b, fx, portOrigin, n))
		direct = append(direct, latOf(b, fx, portProxyA, n))
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(median(redir), "redirected-µs")
	b.ReportMetric(median(direct), "direct-µs")
	b.ReportMetric(median(redir)-median(direct), "redirect-extra-µs")
}
