package inproc

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"

	"fwp/engine"
)

// ListenPacket opens a UDP socket through BIND_REDIRECT and
// RESOURCE_ASSIGNMENT. The returned PacketConn classifies the first
// datagram to and from each new remote.
func (lc *ListenConfig) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	c, local, err := lc.bind(ctx, network, address, 17, func(addr string) (net.Addr, func() error, error) {
		var err error
		pc, err = lc.Net.ListenPacket(ctx, network, addr)
		if err != nil {
			return nil, nil, err
		}
		return pc.LocalAddr(), pc.Close, nil
	})
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	p := &PacketConn{PacketConn: pc, udp: pc.(*net.UDPConn), lc: lc, c: c, local: local,
		peers: map[netip.AddrPort]*peer{}, replies: map[netip.AddrPort]netip.AddrPort{}}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	return p, nil
}

// PacketConn is an unconnected UDP socket whose associations with remotes
// are flows: the first datagram sent to a remote runs CONNECT_REDIRECT and
// AUTH_CONNECT (a redirect sends it and the rest to the new address, and
// replies from there are reported as coming from the original remote, as
// Linux's recvmsg hook does); the first datagram from a new remote runs
// AUTH_RECV_ACCEPT (a blocked remote's datagrams are dropped). Close runs
// ENDPOINT_CLOSURE and deletes every association's flow.
//
// Limits: associations live until Close; a pended inbound classification
// holds ReadFrom until it resolves (Close ends it); when two remotes are
// redirected to one address (or one is redirected to an address the
// application also sends to), a reply from it is reported as from the
// remote the application sent to last, so exchanges must take turns.
type PacketConn struct {
	net.PacketConn
	udp    *net.UDPConn
	lc     *ListenConfig
	c      *classifier // the socket; associations get their own flows
	local  netip.AddrPort
	ctx    context.Context // canceled by Close: pended classifications end
	cancel context.CancelFunc

	mu      sync.Mutex
	peers   map[netip.AddrPort]*peer          // by the remote the application sees
	replies map[netip.AddrPort]netip.AddrPort // redirect target -> remote its replies are reported from
	closed  bool

	nreplies atomic.Int32 // len(replies), read without the lock

	closeOnce sync.Once
	closeErr  error
}

// peer is one association: its flow and verdict.
type peer struct {
	c    *classifier
	to   netip.AddrPort // where its datagrams go
	err  error          // blocked
	done chan struct{}  // closed once classified
}

// WriteTo sends to addr through the association's verdict and redirect.
func (pc *PacketConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ua, ok := addr.(*net.UDPAddr) // as net.UDPConn.WriteTo: nil or another kind is an invalid argument
	dst := ua.AddrPort()
	if !ok || !dst.IsValid() {
		return 0, &net.OpError{Op: "write", Net: "udp", Source: pc.LocalAddr(), Addr: addr, Err: syscall.EINVAL}
	}
	dst = unmap(dst)
	p := pc.peer(dst, engine.DirectionOutbound, nil)
	if p.err != nil {
		return 0, &net.OpError{Op: "write", Net: "udp", Source: pc.LocalAddr(), Addr: addr, Err: p.err}
	}
	if pc.nreplies.Load() > 0 {
		pc.noteSent(p.to, dst)
	}
	return pc.udp.WriteToUDPAddrPort(b, p.to)
}

// noteSent records that the application last addressed to when sending to
// where: replies from where are reported as from to. Two remotes
// redirected to one address, or one redirected and one addressed directly,
// are told apart by which was sent to last: exact for request/response
// exchanges taken in turn.
func (pc *PacketConn) noteSent(where, to netip.AddrPort) {
	pc.mu.Lock()
	if cur, ok := pc.replies[where]; ok && cur != to {
		pc.replies[where] = to
	}
	pc.mu.Unlock()
}

// ReadFrom returns the next datagram the ALE layers admit, with the
// source the application expects (the original remote of a redirect).
func (pc *PacketConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, src, err := pc.udp.ReadFromUDPAddrPort(b)
		if err != nil {
			return n, nil, err
		}
		src = unmap(src)
		pc.mu.Lock()
		orig, isReply := pc.replies[src]
		pc.mu.Unlock()
		if isReply {
			return n, net.UDPAddrFromAddrPort(orig), nil
		}
		if p := pc.peer(src, engine.DirectionInbound, b[:n]); p.err != nil {
			continue // blocked: dropped, as the kernel would
		}
		return n, net.UDPAddrFromAddrPort(src), nil
	}
}

// peer returns the association with remote, classifying it first when new.
// Concurrent first datagrams wait for one classification.
func (pc *PacketConn) peer(remote netip.AddrPort, dir engine.Direction, datagram []byte) *peer {
	pc.mu.Lock()
	if pc.closed {
		pc.mu.Unlock()
		return &peer{err: net.ErrClosed}
	}
	p := pc.peers[remote]
	if p != nil {
		pc.mu.Unlock()
		<-p.done
		return p
	}
	p = &peer{c: pc.lc.Datapath.newClassifier(17, remote.Addr().Is6(), dir, pc.c.id, true), to: remote, done: make(chan struct{})}
	pc.peers[remote] = p
	pc.mu.Unlock()
	defer close(p.done)
	ctx := pc.ctx
	if dir == engine.DirectionInbound {
		p.err = pc.admit(ctx, p, remote, append([]byte(nil), datagram...))
	} else {
		p.err = pc.connect(ctx, p, remote)
	}
	return p
}

func (pc *PacketConn) connect(ctx context.Context, p *peer, remote netip.AddrPort) error {
	c := p.c
	var vs engine.Values
	var m engine.Metadata
	c.values(&vs, pc.local, remote)
	c.meta(&m)
	res, err := c.classify(ctx, engine.KindConnectRedirect, &vs, &m, nil)
	if err != nil {
		return err
	}
	rd := res.Redirect
	if rd.Redirected() && rd.Connect != nil {
		c.via = unmap(rd.Remote())
	}
	for _, k := range []engine.LayerKind{engine.KindAuthConnect, engine.KindFlowEstablished} {
		vs.Reset()
		c.values(&vs, pc.local, remote)
		c.meta(&m)
		rd.ApplyTo(&vs, &m)
		if _, err := c.classify(ctx, k, &vs, &m, nil); err != nil {
			return err
		}
	}
	if rd.Redirected() && rd.Connect != nil {
		p.to = unmap(rd.Remote())
		pc.mu.Lock()
		pc.replies[p.to] = remote
		pc.nreplies.Store(int32(len(pc.replies)))
		pc.mu.Unlock()
	}
	return nil
}

func (pc *PacketConn) admit(ctx context.Context, p *peer, remote netip.AddrPort, datagram []byte) error {
	c := p.c
	var vs engine.Values
	var m engine.Metadata
	c.values(&vs, pc.local, remote)
	c.meta(&m)
	if _, err := c.classify(ctx, engine.KindAuthRecvAccept, &vs, &m, datagram); err != nil {
		return err
	}
	vs.Reset()
	c.values(&vs, pc.local, remote)
	c.meta(&m)
	_, err := c.classify(ctx, engine.KindFlowEstablished, &vs, &m, nil)
	return err
}

// Close closes the socket, runs RESOURCE_RELEASE and ENDPOINT_CLOSURE and
// deletes every association's flow contexts.
func (pc *PacketConn) Close() error {
	pc.closeOnce.Do(func() {
		pc.cancel()
		pc.closeErr = pc.PacketConn.Close()
		pc.mu.Lock()
		peers := pc.peers
		pc.peers, pc.closed = nil, true
		pc.mu.Unlock()
		for _, p := range peers {
			<-p.done
			pc.lc.Datapath.e.FlowDeleted(p.c.flow)
		}
		pc.lc.release(pc.c, pc.local)
	})
	return pc.closeErr
}
