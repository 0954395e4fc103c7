//go:build linux

package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"unsafe"

	xunix "golang.org/x/sys/unix"
)

// QueryKernelRedirect asks the kernel datapath about an accepted
// connection (TCP, or UDP connected to its client) with its socket
// options: the records, the context (the original destination as text
// when the redirect set none, as the kernel backend gives it) and the
// original destination, three getsockopt calls and no daemon. Errors wrap
// ErrNotFound, ErrAccessDenied, ErrInvalidArgument, or ErrNotSupported
// when no kernel hook answers for the socket.
func QueryKernelRedirect(conn net.Conn) (Redirect, netip.AddrPort, error) {
	sc, ok := socketOf(conn)
	if !ok {
		return Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: %T is not a socket", ErrNotSupported, conn)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: %v", ErrInvalidArgument, err)
	}
	var r Redirect
	var orig netip.AddrPort
	var qerr error
	if err := rc.Control(func(fd uintptr) { r, orig, qerr = queryFD(int(fd)) }); err != nil {
		return Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: %v", ErrInvalidArgument, err)
	}
	if qerr != nil {
		if errors.Is(qerr, errNoHook) {
			return Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: %w", ErrNotSupported, qerr)
		}
		return Redirect{}, netip.AddrPort{}, qerr
	}
	return r, orig, nil
}

// socketOf unwraps layered connections to one with a file descriptor.
func socketOf(conn net.Conn) (syscall.Conn, bool) {
	for conn != nil {
		if sc, ok := conn.(syscall.Conn); ok {
			return sc, true
		}
		u, ok := conn.(interface{ NetConn() net.Conn })
		if !ok || u.NetConn() == conn {
			return nil, false
		}
		conn = u.NetConn()
	}
	return nil, false
}

// queryFD asks FWP_SO_REDIRECT_QUERY: one system call for the original
// destination, the records and the context.
func queryFD(fd int) (Redirect, netip.AddrPort, error) {
	var buf [KernelQuerySize]byte
	l := uint32(len(buf))
	_, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, uintptr(fd), SolFWP, SoFWPRedirectQuery, uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return Redirect{}, netip.AddrPort{}, sockoptErr("getsockopt", SoFWPRedirectQuery, e)
	}
	if l != KernelQuerySize {
		return Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: getsockopt(SOL_FWP, FWP_SO_REDIRECT_QUERY): %d bytes, want %d", ErrInvalidArgument, l, KernelQuerySize)
	}
	orig, err := parseSockaddr(buf[:28])
	if err != nil {
		return Redirect{}, netip.AddrPort{}, err
	}
	rn, cn := int(binary.NativeEndian.Uint16(buf[28:])), int(binary.NativeEndian.Uint16(buf[30:]))
	if rn > KernelRecordsMax || cn > KernelContextMax {
		return Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: getsockopt(SOL_FWP, FWP_SO_REDIRECT_QUERY): %d bytes of records, %d of context", ErrInvalidArgument, rn, cn)
	}
	recs := buf[32 : 32+rn]
	ctx := buf[32+KernelRecordsMax : 32+KernelRecordsMax+cn]
	// One allocation for both.
	out := make([]byte, 0, rn+max(cn, len("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535")))
	out = append(out, recs...)
	r := Redirect{Records: out[:rn:rn], TargetPID: uint32(os.Getpid())}
	if cn == 0 {
		// The redirect set no context; the original destination stands
		// for it, as the kernel backend gives it.
		r.Context = orig.AppendTo(out[rn:rn])
	} else {
		r.Context = append(out[rn:rn], ctx...)
	}
	return r, orig, nil
}

func sockoptErr(call string, opt int, e syscall.Errno) error {
	switch e {
	case xunix.ENODATA:
		return fmt.Errorf("%w: %s(SOL_FWP, %d): %v", errNoContext, call, opt, e)
	case xunix.ENOENT:
		return fmt.Errorf("%w: %s(SOL_FWP, %d): %v", ErrNotFound, call, opt, e)
	case xunix.EACCES, xunix.EPERM:
		return fmt.Errorf("%w: %s(SOL_FWP, %d): %v", ErrAccessDenied, call, opt, e)
	case xunix.EINVAL:
		return fmt.Errorf("%w: %s(SOL_FWP, %d): %v", ErrInvalidArgument, call, opt, e)
	}
	return fmt.Errorf("%w: %s(SOL_FWP, %d): %v", errNoHook, call, opt, e)
}

func parseSockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) >= 8 && binary.NativeEndian.Uint16(b) == xunix.AF_INET {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4])), nil
	}
	if len(b) >= 24 && binary.NativeEndian.Uint16(b) == xunix.AF_INET6 {
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])).Unmap(), binary.BigEndian.Uint16(b[2:4])), nil
	}
	return netip.AddrPort{}, fmt.Errorf("%w: getsockopt(SOL_FWP, FWP_SO_ORIGINAL_DST): %d bytes of no known address family", ErrInvalidArgument, len(b))
}

// setKernelRecords puts kernel records on a socket about to connect
// (setsockopt(SOL_FWP, FWP_SO_REDIRECT_RECORDS)).
func setKernelRecords(c syscall.RawConn, records []byte) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		_, _, e := syscall.Syscall6(syscall.SYS_SETSOCKOPT, fd, SolFWP, SoFWPRedirectRecords, uintptr(unsafe.Pointer(&records[0])), uintptr(len(records)), 0)
		if e != 0 {
			serr = sockoptErr("setsockopt", SoFWPRedirectRecords, e)
		}
	}); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidArgument, err)
	}
	return serr
}
