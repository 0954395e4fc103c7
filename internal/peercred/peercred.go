package peercred

import (
	"context"
	"errors"
	"fmt"
	"net"
	"unsafe"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Cred is a peer's process, user, group and supplementary groups at
// connect time.
type Cred struct {
	PID, UID, GID uint32
	// Groups are the supplementary groups (SO_PEERGROUPS), fixed by the
	// kernel at connect() like the rest: reading them later from
	// /proc/PID/status would race with the peer changing them or exiting
	// and its pid being reused.
	Groups []uint32
}

// AuthInfo carries the peer's Cred through gRPC.
type AuthInfo struct {
	credentials.CommonAuthInfo
	Cred Cred
}

// AuthType implements credentials.AuthInfo.
func (AuthInfo) AuthType() string { return "peercred" }

// ErrNoCred means a connection carried no peer credentials.
var ErrNoCred = errors.New("peercred: no peer credentials")

// FromConn reads SO_PEERCRED and SO_PEERGROUPS (Linux 4.13 or later) from
// a unix connection or a wrapper of one (see UnixConn).
func FromConn(c net.Conn) (Cred, error) {
	uc, err := UnixConn(c)
	if err != nil {
		return Cred{}, err
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Cred{}, err
	}
	var cr Cred
	var serr error
	if err := raw.Control(func(fd uintptr) { cr, serr = fromFD(int(fd)) }); err != nil {
		return Cred{}, err
	}
	return cr, serr
}

// UnixConn returns the unix connection c is, or the one it wraps: a
// wrapper (such as a connection-limiting listener's) exposes it with a
// NetConn method, as tls.Conn does.
func UnixConn(c net.Conn) (*net.UnixConn, error) {
	// Bounded, so a wrapper that returns itself cannot loop forever.
	for range 8 {
		switch v := c.(type) {
		case *net.UnixConn:
			return v, nil
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return nil, fmt.Errorf("%w: %T is not a unix connection", ErrNoCred, c)
		}
	}
	return nil, fmt.Errorf("%w: %T wraps too deeply", ErrNoCred, c)
}

func fromFD(fd int) (Cred, error) {
	uc, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return Cred{}, fmt.Errorf("%w: SO_PEERCRED: %w", ErrNoCred, err)
	}
	gs, err := peerGroups(fd, initialGroups)
	if err != nil {
		return Cred{}, fmt.Errorf("%w: SO_PEERGROUPS: %w", ErrNoCred, err)
	}
	return Cred{PID: uint32(uc.Pid), UID: uc.Uid, GID: uc.Gid, Groups: gs}, nil
}

// initialGroups is the first buffer's size, in groups: most peers have
// fewer, and more cost one retry.
const initialGroups = 32

// maxGroups is the kernel's NGROUPS_MAX: it never reports more.
const maxGroups = 65536

// peerGroups reads SO_PEERGROUPS with room for n groups first. A buffer
// too small fails with ERANGE and the kernel reports the size it needs;
// the peer's credentials are fixed, so one retry suffices, but the loop
// stays bounded whatever the kernel says.
func peerGroups(fd, n int) ([]uint32, error) {
	for {
		buf := make([]uint32, n)
		l := uint32(4 * n)
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(unsafe.SliceData(buf))), uintptr(unsafe.Pointer(&l)), 0)
		switch {
		case e == 0 && int(l) <= 4*n:
			return buf[:l/4], nil
		case e == unix.ERANGE && int(l) > 4*n && l/4 <= maxGroups:
			n = int(l / 4)
		case e != 0:
			return nil, e
		default:
			return nil, fmt.Errorf("kernel answered %d bytes for a %d-byte buffer", l, 4*n)
		}
	}
}

// FromContext returns the credentials of the peer of a gRPC call.
func FromContext(ctx context.Context) (Cred, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Cred{}, ErrNoCred
	}
	ai, ok := p.AuthInfo.(AuthInfo)
	if !ok {
		return Cred{}, ErrNoCred
	}
	return ai.Cred, nil
}

// Credentials returns transport credentials that record each server-side
// connection's peer credentials and change nothing on the wire.
func Credentials() credentials.TransportCredentials { return creds{} }

type creds struct{}

func (creds) ClientHandshake(_ context.Context, _ string, c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, AuthInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
}

func (creds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	cr, err := FromConn(c)
	if err != nil {
		return nil, nil, err
	}
	// The kernel vouches for the peer: the local socket is as safe as its
	// file permissions, hence PrivacyAndIntegrity for gRPC's checks.
	return c, AuthInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}, Cred: cr}, nil
}

func (creds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}

func (c creds) Clone() credentials.TransportCredentials { return c }

func (creds) OverrideServerName(string) error { return nil }
