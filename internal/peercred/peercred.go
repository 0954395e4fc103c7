package peercred

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Cred is a peer's process, user and group at connect time.
type Cred struct {
	PID, UID, GID uint32
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

// FromConn reads SO_PEERCRED from a unix connection.
func FromConn(c net.Conn) (Cred, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Cred{}, fmt.Errorf("%w: %T is not a unix connection", ErrNoCred, c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Cred{}, err
	}
	var uc2 *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		uc2, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Cred{}, err
	}
	if serr != nil {
		return Cred{}, fmt.Errorf("%w: %w", ErrNoCred, serr)
	}
	return Cred{PID: uint32(uc2.Pid), UID: uc2.Uid, GID: uc2.Gid}, nil
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

// Groups returns the supplementary groups of a process, from
// /proc/PID/status. SO_PEERCRED gives only the primary group.
func Groups(pid uint32) ([]uint32, error) {
	f, err := os.Open("/proc/" + strconv.FormatUint(uint64(pid), 10) + "/status")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "Groups:")
		if !ok {
			continue
		}
		var out []uint32
		for _, g := range strings.Fields(rest) {
			n, err := strconv.ParseUint(g, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("peercred: bad group %q in /proc/%d/status", g, pid)
			}
			out = append(out, uint32(n))
		}
		return out, nil
	}
	return nil, sc.Err()
}
