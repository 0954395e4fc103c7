package inproc

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"fwp/engine"
	"fwp/proxy"
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
	p := &PacketConn{PacketConn: pc, udp: pc.(*net.UDPConn), lc: lc, c: c, local: local, epoch: time.Now(),
		peers: map[netip.AddrPort]*peer{}, replies: map[netip.AddrPort]netip.AddrPort{}}
	enablePktinfo(p.udp) // a new remote's AUTH_RECV_ACCEPT reports the arrival interface
	switch idle := lc.Datapath.opts.UDPIdleTimeout; {
	case idle == 0:
		p.idle = DefaultUDPIdleTimeout
	case idle > 0:
		p.idle = idle
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	return p, nil
}

// PacketConn is an unconnected UDP socket whose associations with remotes
// are flows: the first datagram sent to a remote runs CONNECT_REDIRECT and
// AUTH_CONNECT (a redirect sends it and the rest to the new address, and
// replies from there are reported as coming from the original remote, as
// Linux's recvmsg hook does); the first datagram from a new remote runs
// AUTH_RECV_ACCEPT (a blocked remote's datagrams are dropped). An
// association idle for Options.UDPIdleTimeout ends: its flow is deleted
// and the remote's next datagram is classified again. Close runs
// ENDPOINT_CLOSURE for the socket and deletes every association's flow.
//
// A pended AUTH_RECV_ACCEPT holds the datagram (and the remote's next
// ones, in order) while ReadFrom goes on returning other remotes'
// datagrams; once the callout permits, the held ones are returned first (a
// ReadFrom waiting on the socket is woken for them); Close ends the pend.
// A pended AUTH_CONNECT holds WriteTo (and the remote's other first
// datagrams) until it resolves, the write deadline (a timeout, the
// datagram not sent; the classification goes on, and a later WriteTo sends
// per its verdict) or Close.
// When two remotes are redirected to one address (or one is redirected to
// an address the application also sends to), a reply from it is reported
// as from the remote the application sent to last, so exchanges must take
// turns.
type PacketConn struct {
	net.PacketConn
	udp    *net.UDPConn
	lc     *ListenConfig
	c      *classifier // the socket; associations get their own flows
	local  netip.AddrPort
	ctx    context.Context // canceled by Close: pended classifications end
	cancel context.CancelFunc
	idle   time.Duration // associations expire after it; 0: never
	epoch  time.Time     // peer.last counts from it (monotonic)
	rdl    pendDeadline  // bounds ReadFrom's wait on a pended classification
	wdl    pendDeadline  // bounds WriteTo's

	mu         sync.Mutex
	peers      map[netip.AddrPort]*peer          // by the remote the application sees
	replies    map[netip.AddrPort]netip.AddrPort // redirect target -> remote its replies are reported from
	held       []*heldDatagram                   // read while their remote was classified, in order
	closed     bool
	sweep      *time.Timer // expires idle associations
	sweepArmed bool
	sweeps     sync.WaitGroup // expiries deleting flows, for Close to wait on

	nreplies atomic.Int32 // len(replies), read without the lock

	// ReadFroms in progress, and whether a classification that ended set
	// the socket's read deadline in the past to wake them (wakeReaders).
	readers atomic.Int32
	woken   atomic.Bool
	nheld   atomic.Int32 // len(held), read without the lock on ReadFrom's path

	closeOnce sync.Once
	closeErr  error
}

// peer is one association: its flow and verdict.
type peer struct {
	c      *classifier
	remote netip.AddrPort
	to     netip.AddrPort // where its datagrams go; set under PacketConn.mu
	err    error          // blocked
	done   chan struct{}  // closed once classified
	last   atomic.Int64   // time.Duration since PacketConn.epoch of its last datagram

	// pended is closed when a callout pends its AUTH_RECV_ACCEPT: ReadFrom
	// then holds the datagram and reads on.
	pended   chan struct{}
	pendOnce sync.Once
	nheld    int // its datagrams in PacketConn.held; under PacketConn.mu

	// A redirected association's registration for the proxy's datagram
	// queries, removed when the association ends.
	key   connKey
	redir *redirectEntry
}

// heldDatagram is a datagram read while its remote's classification was
// pended, kept until it ends.
type heldDatagram struct {
	p    *peer
	src  netip.AddrPort
	data []byte
}

// maxHeld bounds the held datagrams: with that many, ReadFrom waits on the
// oldest before reading more.
const maxHeld = 128

// pendDeadline is a read or write deadline as the wait on a pended
// classification sees it.
type pendDeadline struct {
	mu      sync.Mutex
	t       time.Time
	changed chan struct{} // closed when t changes
}

func (d *pendDeadline) set(t time.Time) {
	d.mu.Lock()
	d.t = t
	if d.changed != nil {
		close(d.changed)
		d.changed = nil
	}
	d.mu.Unlock()
}

func (d *pendDeadline) get() (time.Time, <-chan struct{}) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.changed == nil {
		d.changed = make(chan struct{})
	}
	return d.t, d.changed
}

// passed reports whether the deadline is set and past.
func (d *pendDeadline) passed() bool {
	t, _ := d.get()
	return !t.IsZero() && !time.Now().Before(t)
}

// SetReadDeadline sets the socket's read deadline, which also bounds
// ReadFrom's wait for a pended datagram.
func (pc *PacketConn) SetReadDeadline(t time.Time) error {
	err := pc.PacketConn.SetReadDeadline(t)
	pc.rdl.set(t)
	return err
}

// SetWriteDeadline sets the socket's write deadline, which also bounds
// WriteTo's wait for a remote's pended classification.
func (pc *PacketConn) SetWriteDeadline(t time.Time) error {
	err := pc.PacketConn.SetWriteDeadline(t)
	pc.wdl.set(t)
	return err
}

// SetDeadline sets the read and write deadlines (see SetReadDeadline and
// SetWriteDeadline).
func (pc *PacketConn) SetDeadline(t time.Time) error {
	err := pc.PacketConn.SetDeadline(t)
	pc.rdl.set(t)
	pc.wdl.set(t)
	return err
}

// touch notes a datagram of the association, for its idle expiry.
func (pc *PacketConn) touch(p *peer) {
	if pc.idle > 0 {
		p.last.Store(int64(time.Since(pc.epoch)))
	}
}

// WriteTo sends to addr through the association's verdict and redirect.
func (pc *PacketConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ua, ok := addr.(*net.UDPAddr) // as net.UDPConn.WriteTo: nil or another kind is an invalid argument
	dst := ua.AddrPort()
	if !ok || !dst.IsValid() {
		return 0, &net.OpError{Op: "write", Net: "udp", Source: pc.LocalAddr(), Addr: addr, Err: syscall.EINVAL}
	}
	zone := dst.Addr().Zone()
	dst = unmap(dst)
	// A write past its deadline fails before anything happens, as the
	// socket's own would: no classification started for a datagram that
	// is not sent.
	if pc.wdl.passed() {
		return 0, pc.opErr("write", addr, os.ErrDeadlineExceeded)
	}
	p := pc.outbound(dst, zone)
	if p == nil {
		return 0, pc.opErr("write", addr, net.ErrClosed)
	}
	if err := pc.waitClassified(p, nil, &pc.wdl, "write", addr); err != nil {
		return 0, err // a timeout sends nothing; the classification goes on
	}
	if p.err != nil {
		if pc.ctx.Err() != nil { // ended by Close rather than a verdict
			return 0, pc.opErr("write", addr, net.ErrClosed)
		}
		return 0, pc.opErr("write", addr, p.err)
	}
	pc.touch(p)
	if pc.nreplies.Load() > 0 {
		pc.noteSent(p.to, dst)
	}
	to := p.to
	if zone != "" && to == dst { // not redirected: the zone goes with the address
		to = netip.AddrPortFrom(to.Addr().WithZone(zone), to.Port())
	}
	return pc.udp.WriteToUDPAddrPort(b, to)
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
// source the application expects (the original remote of a redirect). A
// datagram whose remote's AUTH_RECV_ACCEPT a callout pends is held and the
// socket read on, so datagrams of other remotes do not wait behind it (the
// remote's own stay in order behind it); it is returned once the callout
// permits, dropped if it blocks.
func (pc *PacketConn) ReadFrom(b []byte) (int, net.Addr, error) {
	pc.readers.Add(1)
	defer pc.readers.Add(-1)
	var oob [oobSize]byte // the arrival interface (IP_PKTINFO)
	for {
		// A classification that ended may have set the socket's deadline
		// in the past to wake a read (wakeReaders): put the caller's back
		// before looking at the held datagrams, so that a wake-up after
		// the look still interrupts the read below.
		if pc.woken.Swap(false) {
			dl, _ := pc.rdl.get()
			_ = pc.PacketConn.SetReadDeadline(dl)
		}
		if pc.nheld.Load() > 0 {
			if h := pc.takeHeld(); h != nil {
				pc.touch(h.p)
				return copy(b, h.data), net.UDPAddrFromAddrPort(h.src), nil
			}
			if h := pc.heldHeadIfFull(); h != nil {
				// As many held as allowed: wait on the oldest, read no more.
				if err := pc.waitClassified(h.p, nil, &pc.rdl, "read", nil); err != nil {
					return 0, nil, err
				}
				continue
			}
		}
		n, oobn, src, err := readMsg(pc.udp, b, oob[:])
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && !pc.rdl.passed() {
				continue // woken: a held datagram's classification ended
			}
			return n, nil, err
		}
		zone := src.Addr().Zone()
		src = unmap(src)
		pc.mu.Lock()
		orig, isReply := pc.replies[src]
		if isReply {
			if p := pc.peers[orig]; p != nil {
				pc.touch(p)
			}
		}
		pc.mu.Unlock()
		if isReply {
			return n, net.UDPAddrFromAddrPort(orig), nil
		}
		p := pc.inbound(src, b[:n], oob[:oobn], zone)
		if p == nil {
			return 0, nil, pc.opErr("read", nil, net.ErrClosed)
		}
		if pc.nheld.Load() > 0 && pc.hold(p, src, b[:n], true) {
			continue // behind the remote's held datagrams
		}
		if err := pc.waitClassified(p, p.pended, &pc.rdl, "read", nil); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				pc.hold(p, src, b[:n], false)
			}
			return 0, nil, err
		}
		select {
		case <-p.done:
		default: // pended: delivered when it ends
			pc.hold(p, src, b[:n], false)
			continue
		}
		if p.err != nil {
			continue // blocked: dropped, as the kernel would
		}
		pc.touch(p)
		return n, net.UDPAddrFromAddrPort(src), nil
	}
}

// wakeReaders interrupts the ReadFroms blocked on the socket when p, whose
// classification just ended, has held datagrams for them.
func (pc *PacketConn) wakeReaders(p *peer) {
	if pc.readers.Load() == 0 {
		return
	}
	pc.mu.Lock()
	held := p.nheld > 0
	pc.mu.Unlock()
	if held {
		// The deadline first, then the flag: a reader that sees the flag
		// restores the deadline after this set it.
		_ = pc.PacketConn.SetReadDeadline(time.Unix(1, 0))
		pc.woken.Store(true)
	}
}

// opErr is err as the socket's read or write (to addr) returns it.
func (pc *PacketConn) opErr(op string, addr net.Addr, err error) error {
	return &net.OpError{Op: op, Net: "udp", Source: pc.udp.LocalAddr(), Addr: addr, Err: err}
}

// waitClassified waits until p is classified (or, when pended is not nil,
// until it is closed), the deadline pd passes (an error wrapping
// os.ErrDeadlineExceeded) or the socket is closed; op and addr describe the
// read or write waiting, for the error.
func (pc *PacketConn) waitClassified(p *peer, pended <-chan struct{}, pd *pendDeadline, op string, addr net.Addr) error {
	for {
		select {
		case <-p.done:
			return nil
		case <-pended:
			return nil
		default:
		}
		dl, changed := pd.get()
		var expired <-chan time.Time
		var timer *time.Timer
		if !dl.IsZero() {
			d := time.Until(dl)
			if d <= 0 {
				return pc.opErr(op, addr, os.ErrDeadlineExceeded)
			}
			timer = time.NewTimer(d)
			expired = timer.C
		}
		var err error
		select {
		case <-p.done:
		case <-pended:
		case <-expired:
			err = pc.opErr(op, addr, os.ErrDeadlineExceeded)
		case <-pc.ctx.Done():
			err = pc.opErr(op, addr, net.ErrClosed)
		case <-changed:
			err = errDeadlineChanged
		}
		if timer != nil {
			timer.Stop()
		}
		if err != errDeadlineChanged {
			return err
		}
	}
}

var errDeadlineChanged = errors.New("deadline changed")

// takeHeld removes and returns the oldest held datagram whose
// classification permitted it, dropping those of blocked remotes; nil when
// none is ready. A remote's datagrams leave in order: they all become
// ready at once.
func (pc *PacketConn) takeHeld() *heldDatagram {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	for i := 0; i < len(pc.held); {
		h := pc.held[i]
		select {
		case <-h.p.done:
		default:
			i++
			continue
		}
		pc.held = append(pc.held[:i], pc.held[i+1:]...)
		pc.nheld.Add(-1)
		h.p.nheld--
		if h.p.err == nil {
			return h
		}
	}
	return nil
}

// heldHeadIfFull returns the oldest held datagram when no more may be held.
func (pc *PacketConn) heldHeadIfFull() *heldDatagram {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if len(pc.held) < maxHeld {
		return nil
	}
	return pc.held[0]
}

// hold keeps a datagram of p until its classification ends (dropped beyond
// maxHeld, as a full socket buffer would drop it). With onlyBehind, it is
// held only if p already has datagrams held (it must not pass them); it
// reports whether it was held.
func (pc *PacketConn) hold(p *peer, src netip.AddrPort, data []byte, onlyBehind bool) bool {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if onlyBehind && p.nheld == 0 {
		return false
	}
	if !pc.closed && len(pc.held) < maxHeld {
		pc.held = append(pc.held, &heldDatagram{p: p, src: src, data: append([]byte(nil), data...)})
		pc.nheld.Add(1)
		p.nheld++
	}
	return true
}

// newPeer makes the association with remote; pc.mu is held.
func (pc *PacketConn) newPeer(remote netip.AddrPort, dir engine.Direction) *peer {
	p := &peer{c: pc.lc.Datapath.newClassifier(17, remote.Addr().Is6(), dir, pc.c.id, true), remote: remote, to: remote,
		done: make(chan struct{}), pended: make(chan struct{})}
	pc.touch(p)
	pc.peers[remote] = p
	if pc.idle > 0 && !pc.sweepArmed {
		pc.sweepArmed = true
		if pc.sweep == nil {
			pc.sweep = time.AfterFunc(pc.idle, func() { pc.expireIdle(time.Now()) })
		} else {
			pc.sweep.Reset(pc.idle)
		}
	}
	return p
}

// outbound returns the association with remote for sending, starting its
// classification (CONNECT_REDIRECT, AUTH_CONNECT) when new, so that WriteTo
// can give up at its deadline and a later WriteTo send per the verdict.
// nil: the socket is closed.
func (pc *PacketConn) outbound(remote netip.AddrPort, zone string) *peer {
	return pc.association(remote, engine.DirectionOutbound, func() func(*peer) error {
		return func(p *peer) error {
			p.c.scope = zoneIndex(zone)
			return pc.connect(pc.ctx, p, remote)
		}
	})
}

// inbound returns the association with a datagram's source, starting its
// classification (AUTH_RECV_ACCEPT) when new, so that ReadFrom can give up
// at its deadline and a later ReadFrom deliver the datagram. nil: the
// socket is closed.
func (pc *PacketConn) inbound(remote netip.AddrPort, datagram, oob []byte, zone string) *peer {
	return pc.association(remote, engine.DirectionInbound, func() func(*peer) error {
		data := append([]byte(nil), datagram...) // the caller's buffer is reused
		ifx := pktinfoIfindex(oob)               // parsed for a new remote only
		return func(p *peer) error {
			p.c.ifIn, p.c.scope = ifx, zoneIndex(zone)
			return pc.admit(pc.ctx, p, remote, data)
		}
	})
}

// association returns the association with remote, or makes it and runs
// the classification start gives on its own goroutine; concurrent first
// datagrams wait for that one classification (peer.done). start is called
// only for a new association, so a datagram to a known remote allocates
// nothing here.
func (pc *PacketConn) association(remote netip.AddrPort, dir engine.Direction, start func() func(*peer) error) *peer {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.closed {
		return nil
	}
	if p := pc.peers[remote]; p != nil {
		return p
	}
	p := pc.newPeer(remote, dir)
	classify := start()
	go func() {
		p.err = classify(p)
		close(p.done)
		pc.wakeReaders(p)
	}()
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
		dp := pc.lc.Datapath
		to := unmap(rd.Remote())
		// Registered before the first datagram leaves, so the proxy finds
		// it when that datagram arrives.
		p.key, p.redir = connKey{17, pc.local, to}, dp.newRedirectEntry(remote, rd)
		dp.registerDatagrams(p.key, p.redir)
		pc.mu.Lock()
		p.to = to
		pc.replies[to] = remote
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
	pended := func() { p.pendOnce.Do(func() { close(p.pended) }) }
	if _, err := c.classifyNotify(ctx, engine.KindAuthRecvAccept, &vs, &m, datagram, pended); err != nil {
		return err
	}
	vs.Reset()
	c.values(&vs, pc.local, remote)
	c.meta(&m)
	_, err := c.classifyNotify(ctx, engine.KindFlowEstablished, &vs, &m, nil, pended)
	return err
}

// ProxyDatagramRedirect implements proxy.AcceptedDatagrams: the redirect
// of the datagrams from a sender (an in-process UDP client whose
// association a callout redirected to this socket's address). On a socket
// bound to a wildcard address it is found by port (see lookupDatagrams).
func (pc *PacketConn) ProxyDatagramRedirect(from netip.AddrPort) (proxy.Redirect, uint32, error) {
	if pc == nil { // a typed nil comes through the proxy queries
		return proxy.Redirect{}, 0, fmt.Errorf("%w: nil packet connection", proxy.ErrInvalidArgument)
	}
	ent := pc.lc.Datapath.lookupDatagrams(pc.local, unmap(from))
	if ent == nil {
		return proxy.Redirect{}, 0, fmt.Errorf("%w: datagrams %s -> %s", proxy.ErrNotFound, from, pc.local)
	}
	return ent.proxyRedirect(), pc.c.id.PID, nil
}

// expireIdle ends the associations idle since before now-idle, as if their
// flows closed, and schedules the next expiry. It returns how many ended.
func (pc *PacketConn) expireIdle(now time.Time) int {
	pc.mu.Lock()
	if pc.closed || pc.idle <= 0 {
		pc.mu.Unlock()
		return 0
	}
	at := now.Sub(pc.epoch)
	next := time.Duration(-1)
	var gone []*peer
	for remote, p := range pc.peers {
		left := pc.idle // one still being classified is not idle
		select {
		case <-p.done:
			left = pc.idle - (at - time.Duration(p.last.Load()))
		default:
		}
		if left <= 0 {
			delete(pc.peers, remote)
			gone = append(gone, p)
		} else if next < 0 || left < next {
			next = left
		}
	}
	for _, p := range gone {
		pc.unreply(p)
	}
	if next >= 0 {
		pc.sweep.Reset(next)
	} else {
		pc.sweepArmed = false
	}
	pc.sweeps.Add(1)
	pc.mu.Unlock()
	defer pc.sweeps.Done()
	for _, p := range gone {
		pc.lc.Datapath.log.Debug("UDP association expired", "local", pc.local, "remote", p.remote)
		pc.endAssociation(p)
	}
	return len(gone)
}

// unreply updates the reply sources for an association that ended, whose
// datagrams went to where it was redirected (or which addressed a redirect
// target directly): replies from there are reported as from another live
// association going there, or go through classification again when none
// is redirected there any more. pc.mu is held.
func (pc *PacketConn) unreply(gone *peer) {
	where := gone.to
	cur, ok := pc.replies[where]
	if !ok {
		return
	}
	var redirected, keep bool
	var alt netip.AddrPort
	for _, q := range pc.peers {
		if q.to != where {
			continue
		}
		redirected = redirected || q.remote != where
		keep = keep || q.remote == cur
		alt = q.remote
	}
	switch {
	case !redirected:
		delete(pc.replies, where)
	case !keep:
		pc.replies[where] = alt
	}
	pc.nreplies.Store(int32(len(pc.replies)))
}

// endAssociation deletes an ended association's flow (once: it left
// pc.peers under the lock) and its registration.
func (pc *PacketConn) endAssociation(p *peer) {
	pc.lc.Datapath.e.FlowDeleted(p.c.flow)
	if p.redir != nil {
		pc.lc.Datapath.forgetEntry(p.key, p.redir)
	}
}

// Close closes the socket, runs RESOURCE_RELEASE and ENDPOINT_CLOSURE and
// deletes every association's flow contexts.
func (pc *PacketConn) Close() error {
	pc.closeOnce.Do(func() {
		pc.cancel()
		pc.closeErr = pc.PacketConn.Close()
		pc.mu.Lock()
		peers := pc.peers
		pc.peers, pc.held, pc.closed = nil, nil, true
		if pc.sweep != nil {
			pc.sweep.Stop()
		}
		pc.mu.Unlock()
		pc.sweeps.Wait()
		for _, p := range peers {
			<-p.done
			pc.endAssociation(p)
		}
		pc.lc.release(pc.c, pc.local)
	})
	return pc.closeErr
}
