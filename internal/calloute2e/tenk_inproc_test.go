package calloute2e

import (
	"context"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"fwp/client"
	"fwp/engine"
)

// The callout completes most pends before its Classify returns (its
// completer goroutine is that quick): a completion must never overtake the
// answer that took the pend, on either side. In one process, so that the
// race detector sees both sides.
func TestCompletionOvertakesAnswer(t *testing.T) {
	h := startHost(t, connV4, "co-half")
	rc, err := client.RegisterCallout(context.Background(), "co-half", halfCallout(), client.CalloutOptions{Socket: h.sock, Deadline: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	const n = 4000
	var wg sync.WaitGroup
	var bad atomic.Int64
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var vs engine.Values
			vs.SetTuple(6, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(1000+i/2)), netip.AddrPortFrom(netip.MustParseAddr("10.1.1.1"), uint16(2000+i)))
			r, err := h.e.ClassifyWait(context.Background(), connV4, &vs, &engine.Metadata{}, nil)
			if err != nil || r.Action != engine.ActionPermit {
				if bad.Add(1) == 1 {
					t.Errorf("%d: %s %v", i, r, err)
				}
			}
		}()
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d of %d not permitted", bad.Load(), n)
	}
	if o := h.e.Outstanding(); o != (engine.Outstanding{}) {
		t.Fatalf("fwpd's engine holds %+v", o)
	}
	if o := rc.Engine().Outstanding(); o != (engine.Outstanding{}) {
		t.Fatalf("the program's engine holds %+v", o)
	}
}
