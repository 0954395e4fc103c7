package calloute2e

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"fwp/engine"
)

func TestQuickLatency(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-permit", connV4), filterObj("f", connV4, "callout_terminating", "co-permit", "10", nil))
	startProg(t, d, "0s", "co-permit=permit")
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.1.1:80"))
	var ds []time.Duration
	for range 2000 {
		s := time.Now()
		if _, err := d.cl.Classify(context.Background(), connV4, &vs, nil); err != nil {
			t.Fatal(err)
		}
		ds = append(ds, time.Since(s))
	}
	slices.Sort(ds)
	t.Logf("sequential: p50 %v p99 %v", ds[len(ds)/2], ds[len(ds)*99/100])
	start := time.Now()
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 500 {
				d.cl.Classify(context.Background(), connV4, &vs, nil)
			}
		}()
	}
	wg.Wait()
	t.Logf("64 concurrent: %.0f/s", 64*500/time.Since(start).Seconds())
}
