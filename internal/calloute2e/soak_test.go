package calloute2e

import (
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"context"

	"fwp/engine"
)

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	return len(ents)
}

// The soak: 100,000 classifications through one remote callout in one
// lifetime (one in ten pended and completed by the program), then
// nothing the service or the engine keeps has grown: pends, handles,
// goroutines, descriptors, heap.
func TestSoakRemoteCallout(t *testing.T) {
	h := startHost(t, connV4, "co-half")
	p := h.startProg(t, "co-half=half")
	defer p.kill()
	run := func(n int) {
		var wg sync.WaitGroup
		var bad atomic.Int64
		var next atomic.Int64
		for range 64 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var vs engine.Values
				for {
					i := next.Add(1)
					if i > int64(n) {
						return
					}
					port := uint16(2*(i%40000) + 2)
					if i%10 == 0 {
						port++ // odd: pended
					}
					vs.Reset() // ClassifyWait set the reauthorization flag
					vs.SetTuple(6, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(1024+i%60000)), netip.AddrPortFrom(netip.MustParseAddr("10.1.1.1"), port))
					r, err := h.e.ClassifyWait(context.Background(), connV4, &vs, &engine.Metadata{}, nil)
					if err != nil || r.Action != engine.ActionPermit {
						if bad.Add(1) == 1 {
							t.Errorf("%d: %s %v", i, r, err)
						}
					}
				}
			}()
		}
		wg.Wait()
		if bad.Load() != 0 {
			t.Fatalf("%d of %d not permitted", bad.Load(), n)
		}
	}
	measure := func() (int, int, uint64) {
		for range 50 { // goroutines that resolved pends end a moment later
			runtime.GC()
			time.Sleep(10 * time.Millisecond)
			if runtime.NumGoroutine() < 64 {
				break
			}
		}
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return runtime.NumGoroutine(), openFDs(t), ms.HeapInuse
	}
	run(10000) // warm: pools, buffers
	g0, f0, m0 := measure()
	start := time.Now()
	run(100000)
	el := time.Since(start)
	g1, f1, m1 := measure()
	t.Logf("100k in %v; goroutines %d→%d, fds %d→%d, heap %d→%d KiB", el, g0, g1, f0, f1, m0>>10, m1>>10)
	if o := h.e.Outstanding(); o != (engine.Outstanding{}) {
		t.Fatalf("the engine holds %+v", o)
	}
	if g1 > g0+2 || f1 > f0 {
		t.Fatalf("grew: goroutines %d→%d, fds %d→%d", g0, g1, f0, f1)
	}
	if m1 > 2*m0+8<<20 {
		t.Fatalf("heap grew from %d to %d KiB", m0>>10, m1>>10)
	}
	p.send("outstanding")
	if l := p.expect("outstanding"); l != "outstanding co-half 0 0 0" {
		t.Fatalf("the program holds: %s", l)
	}
}
