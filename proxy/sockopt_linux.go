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

func queryFD(fd int) (Redirect, netip.AddrPort, error) {
	var buf [KernelContextMax]byte
	n, err := getsockoptBytes(fd, SoFWPRedirectRecords, buf[:KernelRecordsMax])
	if err != nil {
		return Redirect{}, netip.AddrPort{}, err
	}
	r := Redirect{Records: append([]byte(nil), buf[:n]...), TargetPID: uint32(os.Getpid())}
	if n, err = getsockoptBytes(fd, SoFWPOriginalDst, buf[:28]); err != nil {
		return Redirect{}, netip.AddrPort{}, err
	}
	orig, err := parseSockaddr(buf[:n])
	if err != nil {
		return Redirect{}, netip.AddrPort{}, err
	}
	// ENODATA: the redirect set no context; the original destination
	// stands for it, as the kernel backend gives it.
	n, err = getsockoptBytes(fd, SoFWPRedirectContext, buf[:])
	switch {
	case errors.Is(err, errNoContext):
		r.Context = []byte(orig.String())
	case err != nil:
		return Redirect{}, netip.AddrPort{}, err
	default:
		r.Context = append([]byte(nil), buf[:n]...)
	}
	return r, orig, nil
}

// getsockoptBytes reads one SOL_FWP option; the errno becomes the proxy
// package's error.
func getsockoptBytes(fd, opt int, b []byte) (int, error) {
	l := uint32(len(b))
	_, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, uintptr(fd), SolFWP, uintptr(opt), uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return 0, sockoptErr("getsockopt", opt, e)
	}
	return int(min(l, uint32(len(b)))), nil
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
