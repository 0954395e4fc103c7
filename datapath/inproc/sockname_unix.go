//go:build unix

package inproc

import (
	"net/netip"
	"syscall"
)

// sockname is the local address of a socket, unmapped. known is false only
// when it cannot be read on this platform; a closed socket is known and
// matches nothing (its dial failed, it is nobody's peer).
func sockname(c syscall.RawConn) (ap netip.AddrPort, known bool) {
	var sa syscall.Sockaddr
	var err error
	if cerr := c.Control(func(fd uintptr) { sa, err = syscall.Getsockname(int(fd)) }); cerr != nil || err != nil {
		return netip.AddrPort{}, true
	}
	switch sa := sa.(type) {
	case *syscall.SockaddrInet4:
		ap = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *syscall.SockaddrInet6:
		ap = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	default:
		return netip.AddrPort{}, true
	}
	return unmap(ap), true
}
