package inproc

import (
	"context"
	"fmt"
	"net"
	"net/netip"
)

// network is a parsed network name.
type network struct {
	proto uint8  // 6 tcp, 17 udp
	fam   byte   // 0 either, 4, 6
	ip    string // the matching "ip", "ip4" or "ip6" for lookups
}

func parseNetwork(n string) (network, error) {
	switch n {
	case "tcp":
		return network{6, 0, "ip"}, nil
	case "tcp4":
		return network{6, 4, "ip4"}, nil
	case "tcp6":
		return network{6, 6, "ip6"}, nil
	case "udp":
		return network{17, 0, "ip"}, nil
	case "udp4":
		return network{17, 4, "ip4"}, nil
	case "udp6":
		return network{17, 6, "ip6"}, nil
	}
	return network{}, net.UnknownNetworkError(n)
}

func (nw network) fits(a netip.Addr) bool {
	return nw.fam == 0 || nw.fam == 4 && a.Is4() || nw.fam == 6 && a.Is6()
}

func (nw network) addr(ap netip.AddrPort) net.Addr {
	if nw.proto == 17 {
		return net.UDPAddrFromAddrPort(ap)
	}
	return net.TCPAddrFromAddrPort(ap)
}

// resolve turns a dial address into one IP and port. The engine classifies
// addresses, so names are resolved here, before the ALE layers run; the
// first address of the right family is used (no fallback racing).
func (nw network) resolve(ctx context.Context, address string, listen bool) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(address); err == nil {
		ap = unmap(ap)
		if !nw.fits(ap.Addr()) {
			return netip.AddrPort{}, &net.AddrError{Err: "address of the wrong family", Addr: address}
		}
		return ap, nil
	}
	host, portStr, err := net.SplitHostPort(address)
	if err != nil {
		return netip.AddrPort{}, err
	}
	port, err := net.DefaultResolver.LookupPort(ctx, nw.netName(), portStr)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if host == "" {
		// Listening on ":port" means every address; dialing it means this host.
		a := netip.IPv4Unspecified()
		if !listen {
			a = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		}
		if nw.fam == 6 {
			a = netip.IPv6Unspecified()
			if !listen {
				a = netip.IPv6Loopback()
			}
		}
		return netip.AddrPortFrom(a, uint16(port)), nil
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, nw.ip, host)
	if err != nil {
		return netip.AddrPort{}, err
	}
	for _, ip := range ips {
		if ip = ip.Unmap().WithZone(""); nw.fits(ip) {
			return netip.AddrPortFrom(ip, uint16(port)), nil
		}
	}
	return netip.AddrPort{}, &net.AddrError{Err: fmt.Sprintf("no %s address", nw.ip), Addr: host}
}

func (nw network) netName() string {
	if nw.proto == 17 {
		return "udp"
	}
	return "tcp"
}
