package inproc

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"

	"fwp/engine"
	"fwp/proxy"
)

// Conn is a connection made by a Dialer or accepted by a Listener. Close
// runs ENDPOINT_CLOSURE and the flow-delete of the flow's contexts, once.
type Conn struct {
	net.Conn
	c             *classifier
	local, remote netip.AddrPort // the real socket's addresses
	original      netip.AddrPort // destination before a connect redirect

	redirect *redirectEntry // outbound, redirected: what it carries to its proxy
	key      connKey        // its registration, when redirect != nil
	accepted *redirectEntry // inbound: the redirect its proxy may query

	closeOnce sync.Once
	closeErr  error
}

// Flow is the connection's flow handle, as callouts see it in metadata.
func (c *Conn) Flow() engine.FlowHandle { return c.c.flow }

// OriginalDestination is the destination the application dialed, when a
// callout redirected the connection.
func (c *Conn) OriginalDestination() (netip.AddrPort, bool) {
	return c.original, c.original.IsValid()
}

// RedirectedRemote is the address the socket is really connected to.
func (c *Conn) RedirectedRemote() netip.AddrPort { return c.remote }

// RedirectRecords are the records the connection carries: those a proxy
// set on its dialer, or those of its own redirect.
func (c *Conn) RedirectRecords() *engine.RedirectRecords {
	if c.redirect != nil && c.redirect.records != nil {
		r, err := c.c.dp.e.UnmarshalRedirectRecords(c.redirect.records)
		if err == nil {
			return r
		}
	}
	return c.c.recs
}

// RemoteAddr is the original destination of a redirected connection, as
// Linux's getpeername hook reports it: the application sees the server it
// dialed, not the proxy.
func (c *Conn) RemoteAddr() net.Addr {
	if c.original.IsValid() {
		return network{proto: c.c.proto}.addr(c.original)
	}
	return c.Conn.RemoteAddr()
}

// ProxyRedirect implements proxy.Accepted.
func (c *Conn) ProxyRedirect() (proxy.Redirect, uint32, error) {
	if c == nil { // a typed nil comes through the proxy queries
		return proxy.Redirect{}, 0, fmt.Errorf("%w: nil connection", proxy.ErrInvalidArgument)
	}
	if c.accepted == nil {
		return proxy.Redirect{}, 0, fmt.Errorf("%w: %s -> %s", proxy.ErrNotFound, c.remote, c.local)
	}
	return c.accepted.proxyRedirect(), c.c.id.PID, nil
}

// Close closes the socket, then runs ENDPOINT_CLOSURE and deletes the
// flow's contexts. Later calls return the first call's error.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		c.closeErr = c.Conn.Close()
		if c.redirect != nil {
			c.c.dp.forget(c.key)
		}
		if c.c.bound.IsValid() {
			c.c.resourceRelease(c.c.bound)
		}
		c.c.endpointClosure(c.local, c.closureRemote())
	})
	return c.closeErr
}

// abort closes a connection that never reached the application; the flow
// is deleted by the caller.
func (c *Conn) abort() {
	c.closeOnce.Do(func() {
		c.closeErr = c.Conn.Close()
		if c.redirect != nil {
			c.c.dp.forget(c.key)
		}
	})
}

func (c *Conn) closureRemote() netip.AddrPort {
	if c.original.IsValid() {
		return c.original
	}
	return c.remote
}

// endpointClosure is ENDPOINT_CLOSURE (its decision changes nothing: the
// socket is gone) and the flow-delete of the flow's contexts.
func (c *classifier) endpointClosure(local, remote netip.AddrPort) {
	var vs engine.Values
	var m engine.Metadata
	c.values(&vs, local, remote)
	c.meta(&m)
	_, _ = c.classify(context.Background(), engine.KindEndpointClosure, &vs, &m, nil)
	if c.flow != 0 {
		c.dp.e.FlowDeleted(c.flow)
	}
}

// CloseWrite shuts down the sending side (TCP half-close), for proxies.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return &net.OpError{Op: "close", Net: c.c.netName(), Err: net.ErrClosed}
}

// CloseRead shuts down the receiving side.
func (c *Conn) CloseRead() error {
	if cr, ok := c.Conn.(interface{ CloseRead() error }); ok {
		return cr.CloseRead()
	}
	return &net.OpError{Op: "close", Net: c.c.netName(), Err: net.ErrClosed}
}

// ReadFrom lets io.Copy reach the socket's own ReadFrom, so that a copy
// between two sockets uses splice on Linux.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(unwrapReader(r))
	}
	return io.Copy(writerOnly{c.Conn}, r)
}

// WriteTo is ReadFrom's counterpart. io.Copy prefers the source's
// WriteTo, so it hands the raw socket to the destination's ReadFrom: that
// is where the kernel splices between two TCP sockets.
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	w = unwrapWriter(w)
	if rf, ok := w.(io.ReaderFrom); ok {
		return rf.ReadFrom(c.Conn)
	}
	return io.Copy(w, readerOnly{c.Conn})
}

func unwrapReader(r io.Reader) io.Reader {
	if c, ok := r.(*Conn); ok {
		return c.Conn
	}
	return r
}

func unwrapWriter(w io.Writer) io.Writer {
	if c, ok := w.(*Conn); ok {
		return c.Conn
	}
	return w
}

type writerOnly struct{ io.Writer }
type readerOnly struct{ io.Reader }

func (c *classifier) netName() string { return network{proto: c.proto}.netName() }
