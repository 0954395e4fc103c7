package client

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"fwp/api"
	"fwp/proxy"
)

// QueryRedirect returns the redirect of a TCP connection a proxy accepted
// (local: its local address, remote: the client's) and the destination the
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
// proxy.QueryRedirectContext work on its accepted TCP connections.
type ProxyBackend struct {
	C *Client
	// Timeout bounds each query; 0 means 5 seconds.
	Timeout time.Duration
}

// QueryAccepted implements proxy.Backend.
func (b ProxyBackend) QueryAccepted(conn net.Conn) (proxy.Redirect, error) {
	la, ok1 := conn.LocalAddr().(*net.TCPAddr)
	ra, ok2 := conn.RemoteAddr().(*net.TCPAddr)
	if !ok1 || !ok2 {
		return proxy.Redirect{}, fmt.Errorf("%w: not a TCP connection", proxy.ErrNotFound)
	}
	d := b.Timeout
	if d <= 0 {
		d = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	r, _, err := b.C.QueryRedirect(ctx, la.AddrPort(), ra.AddrPort())
	return r, err
}

// SetRecords implements proxy.Backend: writing the kernel's maps through
// fwpd is not offered, so records on a net.Dialer need another backend.
func (ProxyBackend) SetRecords(string, string, syscall.RawConn, []byte) error {
	return fmt.Errorf("%w: fwpd does not set redirect records for other processes", proxy.ErrNotSupported)
}
