package inproc

import (
	"net/netip"
	"testing"
	"time"
)

// 100,000 interface lookups, most for addresses no interface holds (what
// connections from anywhere make a listener look up): the table is read
// from the system at most once a second plus once per TTL, and holds only
// the system's addresses.
func TestSoakIfindexLookups(t *testing.T) {
	ifaces.mu.Lock()
	ifaces.byAddr, ifaces.reads = nil, 0
	ifaces.mu.Unlock()
	start := time.Now()
	lo := ifindexOf(netip.MustParseAddr("127.0.0.1"))
	if lo == 0 {
		t.Fatal("no interface for 127.0.0.1")
	}
	for i := range 100_000 {
		a := netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
		if ifindexOf(a) != 0 {
			t.Fatalf("%v has an interface", a)
		}
		if i%1000 == 0 && ifindexOf(netip.MustParseAddr("127.0.0.2")) != lo {
			t.Fatal("127.0.0.2 is not on the loopback interface")
		}
	}
	elapsed := time.Since(start)
	ifaces.mu.Lock()
	reads, size := ifaces.reads, len(ifaces.byAddr)
	ifaces.mu.Unlock()
	if limit := 2 + int(elapsed/time.Second); reads > limit {
		t.Fatalf("%d table reads in %v (limit %d)", reads, elapsed, limit)
	}
	if size > 1024 {
		t.Fatalf("the table holds %d addresses", size)
	}
	t.Logf("100000 lookups in %v: %d table reads, %d addresses", elapsed, reads, size)
}
