//go:build linux

package nfqueue

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// soakOps connects in one path lifetime (FWP_SOAK_OPS overrides).
var soakOps = func() int {
	if n, err := strconv.Atoi(os.Getenv("FWP_SOAK_OPS")); err == nil && n > 0 {
		return n
	}
	return 100_000
}()

func fdCount(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestSoak: soakOps connects decided by a Go callout (a tenth refused by
// it) through one path; every one gets its answer, and afterwards nothing
// is held, no hook record is left, and goroutines, file descriptors and
// heap are back to their level.
func TestSoak(t *testing.T) {
	fx := newFixture(t, pendTimeout)
	fx.call(t, "dial 8001 100 4") // warm up: first allocations, threads
	runtime.GC()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	g0, fd0 := runtime.NumGoroutine(), fdCount(t)
	st0 := fx.path.Stats()
	start := time.Now()
	blocked := soakOps / 10
	permitted := soakOps - blocked
	f := fx.call(t, fmt.Sprintf("dial %d %d 16", portPermit, permitted))
	if f[0] != strconv.Itoa(permitted) || f[1] != "0" {
		t.Fatalf("permitted connects: %v", f)
	}
	f = fx.call(t, fmt.Sprintf("dial %d %d 16", portBlock, blocked))
	if f[0] != "0" || f[1] != strconv.Itoa(blocked) || !strings.Contains(strings.Join(f, " "), "connection refused") {
		t.Fatalf("blocked connects: %v", f)
	}
	took := time.Since(start)
	st := fx.path.Stats()
	if q := st.Queued - st0.Queued; q != uint64(soakOps) || st.Permitted-st0.Permitted != uint64(permitted) || st.NoFlow != 0 || st.Errors != 0 {
		t.Fatalf("stats %+v (before %+v): want %d queued, %d permitted", st, st0, soakOps, permitted)
	}
	t.Logf("%d callout-decided connects in %v (%v each)", soakOps, took, took/time.Duration(soakOps))
	fx.checkClean(t)
	runtime.GC()
	var ms1 runtime.MemStats
	runtime.ReadMemStats(&ms1)
	g1, fd1 := runtime.NumGoroutine(), fdCount(t)
	t.Logf("goroutines %d -> %d, fds %d -> %d, heap %d -> %d KiB", g0, g1, fd0, fd1, ms0.HeapAlloc>>10, ms1.HeapAlloc>>10)
	if g1 > g0+2 || fd1 > fd0 || ms1.HeapAlloc > ms0.HeapAlloc+8<<20 {
		t.Fatalf("grew: goroutines %d -> %d, fds %d -> %d, heap %d -> %d", g0, g1, fd0, fd1, ms0.HeapAlloc, ms1.HeapAlloc)
	}
}
