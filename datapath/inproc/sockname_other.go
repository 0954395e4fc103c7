//go:build !unix

package inproc

import (
	"net/netip"
	"syscall"
)

// sockname cannot read a socket's address here: every in-flight dial to
// the accepted connection's address may be its peer, and the accept waits
// for each.
func sockname(syscall.RawConn) (netip.AddrPort, bool) { return netip.AddrPort{}, false }
