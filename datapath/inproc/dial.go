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

	nd := &d.Net
	var dl *dialing
	if ent != nil {
		dl = dp.beginRedirect(nw.proto, target)
		nd = d.netWithSocketHook(dp, dl)
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
	return conn, nil
}

// netWithSocketHook is the dialer's net.Dialer with a Control hook that
// hands the new socket to the in-flight dial's record (after the caller's
// own hook), so that an accept can tell whether the dial is its peer.
func (d *Dialer) netWithSocketHook(dp *Datapath, dl *dialing) *net.Dialer {
	nd := d.Net
	ctl, ctlCtx := d.Net.Control, d.Net.ControlContext
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
