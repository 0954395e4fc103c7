package inproc

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"fwp/engine"
	"fwp/proxy"
)

// Dialer dials through the datapath's ALE layers: CONNECT_REDIRECT,
// AUTH_CONNECT, the real connect (to the redirected address when a callout
// redirected the flow), FLOW_ESTABLISHED. It takes tcp, tcp4, tcp6, udp,
// udp4 and udp6. The zero value with Datapath set is usable.
type Dialer struct {
	Datapath *Datapath
	// Net makes the real socket: its Timeout, Deadline, LocalAddr,
	// KeepAlive and Control apply. Timeout and Deadline also bound pends.
	Net net.Dialer

	records []byte
	recs    *engine.RedirectRecords
}

// SetRedirectRecords makes the dialer's connections carry redirect
// records a proxy queried on its accepted connection (implements
// proxy.RecordsSetter). The records must come from this datapath's engine.
// They go with every later dial of the dialer: a proxy that shares one
// dialer among connections passes each dial its own records instead, in
// its context (proxy.WithRedirectRecords), which take precedence.
func (d *Dialer) SetRedirectRecords(records []byte) error {
	if d == nil || d.Datapath == nil { // a typed nil comes through proxy.SetRedirectRecords
		return fmt.Errorf("%w: dialer has no datapath", proxy.ErrInvalidArgument)
	}
	r, err := d.Datapath.e.UnmarshalRedirectRecords(records)
	if err != nil {
		return fmt.Errorf("%w: %w", proxy.ErrInvalidArgument, err)
	}
	d.records, d.recs = append([]byte(nil), records...), r
	return nil
}

// Dial is DialContext with a background context.
func (d *Dialer) Dial(network, address string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, address)
}

// DialContext connects to address through the ALE layers. A block returns
// an error wrapping *BlockedError; a pend waits until the callout completes
// it, its deadline, the dialer's timeout or ctx's end.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	dp := d.Datapath
	if dp == nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: fmt.Errorf("%w: dialer has no datapath", proxy.ErrInvalidArgument)}
	}
	nw, err := parseNetwork(network)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: err}
	}
	if dl := d.deadline(); !dl.IsZero() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl)
		defer cancel()
	}
	remote, err := nw.resolve(ctx, address, false)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: err}
	}
	c := dp.newClassifier(nw.proto, remote.Addr().Is6(), engine.DirectionOutbound, dp.id, true)
	c.recs = d.recs
	if b, ok, err := proxy.RedirectRecordsFrom(ctx); ok { // this dial's own records
		if err == nil {
			c.recs, err = dp.e.UnmarshalRedirectRecords(b)
		}
		if err != nil {
			dp.e.FlowDeleted(c.flow)
			return nil, &net.OpError{Op: "dial", Net: network, Err: fmt.Errorf("%w: %w", proxy.ErrInvalidArgument, err)}
		}
	}
	zone := zoneOf(address)
	c.scope = zoneIndex(zone)
	conn, err := d.dial(ctx, c, nw, network, remote, zone)
	if err != nil {
		dp.e.FlowDeleted(c.flow)
		return nil, &net.OpError{Op: "dial", Net: network, Addr: nw.addr(remote), Err: err}
	}
	return conn, nil
}

func (d *Dialer) deadline() time.Time {
	dl := d.Net.Deadline
	if d.Net.Timeout > 0 {
		if t := time.Now().Add(d.Net.Timeout); dl.IsZero() || t.Before(dl) {
			dl = t
		}
	}
	return dl
}

func (d *Dialer) dial(ctx context.Context, c *classifier, nw network, network string, remote netip.AddrPort, zone string) (*Conn, error) {
	dp := c.dp
	var local netip.AddrPort // known before connect only when the dialer binds
	if la, ok := addrPortOf(d.Net.LocalAddr); ok {
		local = la
	}
	var vs engine.Values
	var m engine.Metadata
	nd := &d.Net
	if local.IsValid() {
		// The dialer binds: BIND_REDIRECT (which may move the local
		// address) and RESOURCE_ASSIGNMENT run before the connect layers,
		// as bind() comes before connect().
		var err error
		if local, err = d.bindLocal(ctx, c, local); err != nil {
			return nil, err
		}
		c.bound = local
		nd = d.netBoundTo(nd, local)
	}
	ok := false
	defer func() {
		if !ok && c.bound.IsValid() {
			c.resourceRelease(c.bound)
		}
	}()
	c.values(&vs, local, remote)
	c.meta(&m)
	res, err := c.classify(ctx, engine.KindConnectRedirect, &vs, &m, nil)
	if err != nil {
		return nil, err
	}
	rd := res.Redirect
	target := remote
	var ent *redirectEntry
	if rd.Redirected() && rd.Connect != nil {
		target = unmap(rd.Remote())
		c.via = target
		ent = dp.newRedirectEntry(remote, rd)
	}

	vs.Reset()
	c.values(&vs, local, remote)
	c.meta(&m)
	rd.ApplyTo(&vs, &m)
	if _, err := c.classify(ctx, engine.KindAuthConnect, &vs, &m, nil); err != nil {
		return nil, err
	}

	var dl *dialing
	if ent != nil {
		dl = dp.beginRedirect(nw.proto, target)
		nd = netWithSocketHook(nd, dp, dl)
	}
	dialTo := target
	if ent == nil && zone != "" { // not redirected: the zone goes with the address
		dialTo = netip.AddrPortFrom(target.Addr().WithZone(zone), target.Port())
	}
	raw, err := nd.DialContext(ctx, network, dialTo.String())
	if err != nil {
		if dl != nil {
			dp.endRedirect(dl, connKey{}, nil)
		}
		return nil, err
	}
	conn := &Conn{Conn: raw, c: c, remote: target}
	conn.local, _ = addrPortOf(raw.LocalAddr())
	c.connected(raw, conn.local)
	if dl != nil {
		conn.redirect, conn.original = ent, remote
		conn.key = connKey{nw.proto, conn.local, target}
		dp.endRedirect(dl, conn.key, ent)
	}

	vs.Reset()
	c.values(&vs, conn.local, remote)
	c.meta(&m)
	rd.ApplyTo(&vs, &m)
	if _, err := c.classify(ctx, engine.KindFlowEstablished, &vs, &m, nil); err != nil {
		conn.abort()
		return nil, err
	}
	ok = true
	return conn, nil
}

// bindLocal runs BIND_REDIRECT and RESOURCE_ASSIGNMENT for a dialer bound
// to local, and returns the address to bind (a bind redirect's). These are
// the socket's classifications, before any flow: no flow handle, no
// direction. RESOURCE_ASSIGNMENT sees the address asked for: a port 0 is
// only chosen by the kernel at connect.
func (d *Dialer) bindLocal(ctx context.Context, c *classifier, local netip.AddrPort) (netip.AddrPort, error) {
	var vs engine.Values
	var m engine.Metadata
	c.socketValues(&vs, &m, local, true)
	res, err := c.classify(ctx, engine.KindBindRedirect, &vs, &m, nil)
	if err != nil {
		return local, err
	}
	if rd := res.Redirect; rd.Redirected() && rd.Bind != nil {
		local = unmap(rd.Bind.LocalAddressAndPort)
	}
	c.socketValues(&vs, &m, local, true)
	if _, err := c.classify(ctx, engine.KindResourceAssignment, &vs, &m, nil); err != nil {
		return local, err
	}
	return local, nil
}

// netBoundTo is nd binding to local (a bind redirect's address).
func (d *Dialer) netBoundTo(nd *net.Dialer, local netip.AddrPort) *net.Dialer {
	if a, ok := addrPortOf(nd.LocalAddr); ok && a == local {
		return nd
	}
	n := *nd
	if _, isUDP := nd.LocalAddr.(*net.UDPAddr); isUDP {
		n.LocalAddr = net.UDPAddrFromAddrPort(local)
	} else {
		n.LocalAddr = net.TCPAddrFromAddrPort(local)
	}
	return &n
}

// netWithSocketHook is base with a Control hook that hands the new socket
// to the in-flight dial's record (after the caller's own hook), so that an
// accept can tell whether the dial is its peer.
func netWithSocketHook(base *net.Dialer, dp *Datapath, dl *dialing) *net.Dialer {
	nd := *base
	ctl, ctlCtx := base.Control, base.ControlContext
	nd.Control = nil
	nd.ControlContext = func(ctx context.Context, network, address string, c syscall.RawConn) error {
		var err error
		switch {
		case ctlCtx != nil:
			err = ctlCtx(ctx, network, address, c)
		case ctl != nil:
			err = ctl(network, address, c)
		}
		if err == nil {
			dp.dialSocket(dl, c)
		}
		return err
	}
	return &nd
}
