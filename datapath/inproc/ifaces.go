package inproc

import (
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// The interface a connected socket uses is the one that holds its local
// address (or, for loopback addresses, the loopback interface). The table
// is read from the system at most once per ifaceTTL, and again on a miss
// at most once a second, so a dial costs a map lookup.
var ifaces struct {
	mu       sync.Mutex
	at       time.Time
	byAddr   map[netip.Addr]uint32
	loopback uint32
	reads    int // table reads, for the tests
}

const ifaceTTL = 5 * time.Second

// ifindexOf returns the index of the interface holding a, 0 when unknown.
func ifindexOf(a netip.Addr) uint32 {
	a = a.Unmap().WithZone("")
	if !a.IsValid() || a.IsUnspecified() {
		return 0
	}
	ifaces.mu.Lock()
	defer ifaces.mu.Unlock()
	age := time.Since(ifaces.at)
	if ifaces.byAddr == nil || age >= ifaceTTL || age >= time.Second && !knownAddr(a) {
		refreshIfaces()
	}
	if a.IsLoopback() && ifaces.loopback != 0 {
		return ifaces.loopback
	}
	return ifaces.byAddr[a]
}

func knownAddr(a netip.Addr) bool {
	_, ok := ifaces.byAddr[a]
	return ok || a.IsLoopback() && ifaces.loopback != 0
}

// refreshIfaces rereads the table; ifaces.mu is held.
func refreshIfaces() {
	ifaces.at = time.Now()
	ifaces.reads++
	ifaces.byAddr = map[netip.Addr]uint32{}
	ifaces.loopback = 0
	list, err := net.Interfaces()
	if err != nil {
		return
	}
	for _, ifi := range list {
		if ifi.Flags&net.FlagLoopback != 0 && ifaces.loopback == 0 {
			ifaces.loopback = uint32(ifi.Index)
		}
		addrs, err := ifi.Addrs()
		if err != nil {
			continue
		}
		for _, ad := range addrs {
			if ipn, ok := ad.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
					ifaces.byAddr[ip.Unmap()] = uint32(ifi.Index)
				}
			}
		}
	}
}

// zoneIndex is the interface index an IPv6 zone names (a number or an
// interface name), 0 when none.
func zoneIndex(zone string) uint32 {
	if zone == "" {
		return 0
	}
	if ifi, err := net.InterfaceByName(zone); err == nil {
		return uint32(ifi.Index)
	}
	n := uint32(0)
	for _, c := range zone {
		if c < '0' || c > '9' || n > 1<<28 {
			return 0
		}
		n = n*10 + uint32(c-'0')
	}
	return n
}

// zoneOf is the zone of a dial address ("[fe80::1%eth0]:80"), "" if none.
func zoneOf(address string) string {
	if ap, err := netip.ParseAddrPort(address); err == nil {
		return ap.Addr().Zone()
	}
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return ""
	}
	if i := strings.IndexByte(host, '%'); i >= 0 {
		return host[i+1:]
	}
	return ""
}
