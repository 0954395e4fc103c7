//go:build !linux

package proxy

import (
	"fmt"
	"net"
	"net/netip"
	"syscall"
)

// QueryKernelRedirect needs Linux's kernel datapath.
func QueryKernelRedirect(net.Conn) (Redirect, netip.AddrPort, error) {
	return Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: socket options of the kernel datapath need Linux", ErrNotSupported)
}

func setKernelRecords(syscall.RawConn, []byte) error { return errNoHook }
