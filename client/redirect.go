package client

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"time"

	"fwp/api"
	"fwp/engine"
	"fwp/proxy"
)

// QueryRedirect returns the redirect of a TCP connection a proxy accepted
// or of a UDP client's datagrams (local: the proxy's address, remote: the
// client's) and the destination the
// client asked for, as fwpd's kernel datapath recorded them. fwpd answers
// only the redirect's target process or root (errors.Is
// proxy.ErrAccessDenied otherwise); an unknown connection gives
// proxy.ErrNotFound, a daemon without a kernel datapath
// proxy.ErrNotSupported.
func (c *Client) QueryRedirect(ctx context.Context, local, remote netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	r, err := c.rpc.QueryRedirect(c.ctx(ctx), &api.QueryRedirectRequest{Local: local.String(), Remote: remote.String()})
	if err != nil {
		return proxy.Redirect{}, netip.AddrPort{}, api.FromStatus(err)
	}
	orig, err := netip.ParseAddrPort(r.GetOriginal())
	if err != nil {
		return proxy.Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: fwpd sent original destination %q", proxy.ErrInvalidArgument, r.GetOriginal())
	}
	return proxy.Redirect{Records: r.GetRecords(), Context: r.GetContext(), TargetPID: r.GetTargetPid()}, orig, nil
}

// ProxyBackend is a proxy.Backend that asks fwpd, for a proxy that cannot
// open the kernel datapath's maps itself (no root): after
// proxy.Register(client.ProxyBackend{C: c}), proxy.QueryRedirectRecords and
// proxy.QueryRedirectContext work on its accepted TCP connections (and on
// UDP sockets it connected to a client), proxy.QueryDatagramRedirectRecords
// and proxy.QueryDatagramRedirectContext on its unconnected UDP socket and a
// datagram's source, and proxy.SetRedirectRecords on a *net.Dialer through
// fwpd's RecordsSocket.
type ProxyBackend struct {
	C *Client
	// Timeout bounds each query; 0 means 5 seconds.
	Timeout time.Duration
}

// QueryAccepted implements proxy.Backend.
func (b ProxyBackend) QueryAccepted(conn net.Conn) (proxy.Redirect, error) {
	local, remote, ok := proxy.ConnTuple(conn)
	if !ok {
		return proxy.Redirect{}, fmt.Errorf("%w: not a TCP or UDP connection", proxy.ErrNotFound)
	}
	return b.query(local, remote)
}

// QueryDatagram implements proxy.DatagramBackend: fwpd looks the flow up
// by the socket's local address and the datagram's source. A socket bound
// to a wildcard address is sent as such; fwpd's kernel datapath then finds
// the flow by port (see ebpf.Redirects.QueryRedirect).
func (b ProxyBackend) QueryDatagram(pc net.PacketConn, from netip.AddrPort) (proxy.Redirect, error) {
	local, ok := pc.LocalAddr().(*net.UDPAddr)
	if !ok || local == nil {
		return proxy.Redirect{}, fmt.Errorf("%w: %T is not a UDP socket", proxy.ErrNotFound, pc)
	}
	return b.query(local.AddrPort(), from)
}

func (b ProxyBackend) query(local, remote netip.AddrPort) (proxy.Redirect, error) {
	d := b.Timeout
	if d <= 0 {
		d = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	r, _, err := b.C.QueryRedirect(ctx, local, remote)
	return r, err
}

// MaxRecordsRequest bounds the records of one request on RecordsSocket.
const MaxRecordsRequest = engine.MaxRedirectRecordsSize

// RecordsSocket is the unix socket, next to fwpd's main socket, on which
// fwpd takes a socket passed with SCM_RIGHTS and the redirect records to put
// on it (gRPC cannot carry a file descriptor).
func RecordsSocket(socket string) string { return socket + ".fd" }

// SetRecords implements proxy.Backend: it passes the socket about to
// connect to fwpd, which puts the records on it by its SO_COOKIE when the
// caller is the target of the redirect the records end with (or root).
// Errors: proxy.ErrAccessDenied, proxy.ErrInvalidArgument, and
// proxy.ErrNotSupported from a daemon without a kernel datapath.
func (b ProxyBackend) SetRecords(network, address string, c syscall.RawConn, records []byte) error {
	if len(records) == 0 || len(records) > MaxRecordsRequest {
		return fmt.Errorf("%w: %d bytes of redirect records", proxy.ErrInvalidArgument, len(records))
	}
	d := b.Timeout
	if d <= 0 {
		d = 5 * time.Second
	}
	conn, err := net.DialTimeout("unix", RecordsSocket(b.C.socket), d)
	if err != nil {
		return fmt.Errorf("%w: fwpd's redirect records socket: %v", proxy.ErrNotSupported, err)
	}
	defer conn.Close()
	uc := conn.(*net.UnixConn)
	_ = uc.SetDeadline(time.Now().Add(d))
	req := binary.BigEndian.AppendUint16(nil, uint16(len(records)))
	req = append(req, records...)
	var werr error
	if err := c.Control(func(fd uintptr) { _, _, werr = uc.WriteMsgUnix(req, syscall.UnixRights(int(fd)), nil) }); err != nil {
		return err
	}
	if werr != nil {
		return fmt.Errorf("fwp: passing the socket to fwpd: %w", werr)
	}
	line, err := bufio.NewReader(io.LimitReader(uc, 4096)).ReadString('\n')
	if err != nil {
		return fmt.Errorf("fwp: reading fwpd's answer: %w", err)
	}
	code, msg, _ := strings.Cut(strings.TrimSuffix(line, "\n"), " ")
	switch code {
	case "ok":
		return nil
	case "access_denied":
		return fmt.Errorf("%w: %s", proxy.ErrAccessDenied, msg)
	case "invalid_argument":
		return fmt.Errorf("%w: %s", proxy.ErrInvalidArgument, msg)
	case "not_supported":
		return fmt.Errorf("%w: %s", proxy.ErrNotSupported, msg)
	}
	return fmt.Errorf("fwp: fwpd could not set the redirect records: %s", msg)
}
