package inproc

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"fwp/engine"
	"fwp/proxy"
)

// ListenConfig listens through the datapath's ALE layers: BIND_REDIRECT
// (a bind redirect moves the socket to the new address), the real bind,
// RESOURCE_ASSIGNMENT with the address really bound, and for TCP
// AUTH_LISTEN.
type ListenConfig struct {
	Datapath *Datapath
	// Net makes the real socket (its Control and KeepAlive apply).
	Net net.ListenConfig
	// Identity is the listening process as callouts and proxy queries see
	// it; nil means the datapath's. Tests use it to play another process.
	Identity *Identity
}

func (lc *ListenConfig) identity() Identity {
	if lc.Identity != nil {
		return *lc.Identity
	}
	return lc.Datapath.id
}

// bind runs BIND_REDIRECT, binds with listen, and runs RESOURCE_ASSIGNMENT
// (and AUTH_LISTEN for TCP). It returns the socket's classifier and the
// classified local address.
func (lc *ListenConfig) bind(ctx context.Context, network, address string, wantProto uint8,
	listen func(addr string) (net.Addr, func() error, error)) (*classifier, netip.AddrPort, error) {
	dp := lc.Datapath
	if dp == nil {
		return nil, netip.AddrPort{}, fmt.Errorf("%w: listen config has no datapath", proxy.ErrInvalidArgument)
	}
	nw, err := parseNetwork(network)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	if nw.proto != wantProto {
		return nil, netip.AddrPort{}, net.UnknownNetworkError(network)
	}
	local, err := nw.resolve(ctx, address, true)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	c := dp.newClassifier(nw.proto, local.Addr().Is6(), engine.DirectionInbound, lc.identity(), false)
	var vs engine.Values
	var m engine.Metadata
	c.values(&vs, local, netip.AddrPort{})
	wildcardBind(&vs, local)
	c.meta(&m)
	res, err := c.classify(ctx, engine.KindBindRedirect, &vs, &m, nil)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	bindAddr := address
	if rd := res.Redirect; rd.Redirected() && rd.Bind != nil {
		local = unmap(rd.Bind.LocalAddressAndPort)
		bindAddr = local.String()
	}
	addr, closeFn, err := listen(bindAddr)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	if got, ok := addrPortOf(addr); ok {
		if local.Addr().IsUnspecified() {
			// A dual-stack wildcard socket reports "[::]"; keep the family
			// it was classified with.
			got = netip.AddrPortFrom(local.Addr(), got.Port())
		}
		local = got
	}
	kinds := []engine.LayerKind{engine.KindResourceAssignment}
	if nw.proto == 6 {
		kinds = append(kinds, engine.KindAuthListen)
	}
	for _, k := range kinds {
		vs.Reset()
		c.values(&vs, local, netip.AddrPort{})
		if k == engine.KindResourceAssignment {
			wildcardBind(&vs, local)
		}
		c.meta(&m)
		if _, err := c.classify(ctx, k, &vs, &m, nil); err != nil {
			_ = closeFn()
			lc.release(c, local)
			return nil, netip.AddrPort{}, err
		}
	}
	return c, local, nil
}

// release is RESOURCE_RELEASE then ENDPOINT_CLOSURE of a closed socket.
func (lc *ListenConfig) release(c *classifier, local netip.AddrPort) {
	var vs engine.Values
	var m engine.Metadata
	c.values(&vs, local, netip.AddrPort{})
	c.meta(&m)
	_, _ = c.classify(context.Background(), engine.KindResourceRelease, &vs, &m, nil)
	c.endpointClosure(local, netip.AddrPort{})
}

// Listen listens on a TCP address through the ALE layers.
func (lc *ListenConfig) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	var ln net.Listener
	c, local, err := lc.bind(ctx, network, address, 6, func(addr string) (net.Addr, func() error, error) {
		var err error
		ln, err = lc.Net.Listen(ctx, network, addr)
		if err != nil {
			return nil, nil, err
		}
		return ln.Addr(), ln.Close, nil
	})
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	return newListener(lc, ln, c, local), nil
}

// admitLimit bounds the connections a listener has taken from the kernel
// and not yet handed to Accept (being classified, pended, or waiting for
// Accept). Beyond it the kernel's backlog queues them, as it does for a
// plain listener nobody accepts on; without it a peer could make the
// listener hold any number of sockets and goroutines.
var admitLimit = 128

func newListener(lc *ListenConfig, ln net.Listener, c *classifier, local netip.AddrPort) *Listener {
	l := &Listener{ln: ln, lc: lc, c: c, local: local, ready: make(chan *Conn), errc: make(chan error),
		done: make(chan struct{}), slots: make(chan struct{}, admitLimit)}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	l.wg.Add(1)
	go l.loop()
	return l
}

// Listener accepts through AUTH_RECV_ACCEPT and FLOW_ESTABLISHED. A blocked
// connection is closed and never returned; a pended one is returned once
// its callout completes, without holding up the others.
type Listener struct {
	ln     net.Listener
	lc     *ListenConfig
	c      *classifier
	local  netip.AddrPort
	ctx    context.Context // canceled by Close: pends of held connections end
	cancel context.CancelFunc

	ready     chan *Conn
	errc      chan error    // the real Accept's errors, one per Accept call
	done      chan struct{} // closed by Close
	slots     chan struct{} // a token per connection taken and not yet returned or dropped
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// Addr is the address the listener is bound to.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Accept returns the next connection the ALE layers admit.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ready:
		<-l.slots
		return c, nil
	case err := <-l.errc:
		return nil, err
	case <-l.done:
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.ln.Addr(), Err: net.ErrClosed}
	}
}

// loop accepts real connections and admits each on its own goroutine, so
// one pended connection does not stall the others; at most admitLimit at
// a time, so that beyond it the kernel's backlog is the queue. An error of
// the real Accept (EMFILE, say) goes to one Accept call and the loop goes
// on, as a plain listener would let its caller retry.
func (l *Listener) loop() {
	defer l.wg.Done()
	for {
		select {
		case l.slots <- struct{}{}:
		case <-l.done:
			return
		}
		raw, err := l.ln.Accept()
		if err != nil {
			<-l.slots
			select {
			case l.errc <- err:
				continue
			case <-l.done:
				return
			}
		}
		l.wg.Add(1)
		go l.admit(raw)
	}
}

func (l *Listener) admit(raw net.Conn) {
	defer l.wg.Done()
	dp := l.lc.Datapath
	local, _ := addrPortOf(raw.LocalAddr())
	remote, _ := addrPortOf(raw.RemoteAddr())
	c := dp.newClassifier(6, remote.Addr().Is6(), engine.DirectionInbound, l.c.id, true)
	c.parent = l.c.ep // seed 004: the listening socket's endpoint
	if ra, ok := raw.RemoteAddr().(*net.TCPAddr); ok {
		c.scope = zoneIndex(ra.Zone)
	}
	c.connected(raw, local)
	var vs engine.Values
	var m engine.Metadata
	c.values(&vs, local, remote)
	c.meta(&m)
	if _, err := c.classify(l.ctx, engine.KindAuthRecvAccept, &vs, &m, raw); err != nil {
		dp.log.Debug("accept refused", "remote", remote, "err", err)
		raw.Close()
		dp.e.FlowDeleted(c.flow)
		<-l.slots
		return
	}
	vs.Reset()
	c.values(&vs, local, remote)
	c.meta(&m)
	if _, err := c.classify(l.ctx, engine.KindFlowEstablished, &vs, &m, nil); err != nil {
		raw.Close()
		dp.e.FlowDeleted(c.flow)
		<-l.slots
		return
	}
	conn := &Conn{Conn: raw, c: c, local: local, remote: remote, accepted: dp.lookupAccepted(l.ctx, 6, local, remote)}
	select {
	case l.ready <- conn:
	case <-l.done:
		conn.Close()
		<-l.slots
	}
}

// Close stops accepting, drops connections not yet returned, and runs
// RESOURCE_RELEASE and ENDPOINT_CLOSURE for the listening socket.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() {
		l.cancel()
		close(l.done)
		l.closeErr = l.ln.Close()
		l.wg.Wait()
		l.lc.release(l.c, l.local)
	})
	return l.closeErr
}
