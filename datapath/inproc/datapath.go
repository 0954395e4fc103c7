package inproc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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

// ErrBlocked is wrapped by every error of a connection a filter blocked.
var ErrBlocked = errors.New("fwp: blocked by filter")

// BlockedError says which layer and filter blocked a connection.
type BlockedError struct {
	Layer  engine.LayerID
	Filter engine.FilterID // 0 when the layer blocked without a filter (a canceled pend)
	Reason engine.Reason
}

func (e *BlockedError) Error() string {
	return fmt.Sprintf("fwp: blocked by %s at %s: %s", e.Filter, e.Layer, e.Reason)
}

// Is makes errors.Is(err, ErrBlocked) hold.
func (e *BlockedError) Is(target error) bool { return target == ErrBlocked }

// Identity is the process identity the datapath reports in metadata and
// app-id, uid and gid values. Fields that are unknown stay absent.
type Identity struct {
	PID  uint32
	Path string // executable path (ALE app id); "" when unknown
	UID  int    // -1 when unknown (Windows, plan9)
	GID  int    // -1 when unknown
	// CgroupID is the process's cgroup v2 id; 0 when unknown.
	CgroupID uint64
}

// ProcessIdentity returns this process's identity.
func ProcessIdentity() Identity {
	id := Identity{PID: uint32(os.Getpid()), UID: os.Getuid(), GID: os.Getgid(), CgroupID: processCgroupID()}
	if p, err := os.Executable(); err == nil {
		id.Path = p
	}
	return id
}

// Options configure a Datapath.
type Options struct {
	// Identity overrides the process identity (tests use it to play
	// another process); nil means this process.
	Identity *Identity
	// PendTimeout bounds how long a dial, listen or accept waits for a pended
	// classification, on top of the engine's own pend timeout (0: only the
	// engine's). When it passes first the operation is canceled and blocked.
	PendTimeout time.Duration
	// UDPIdleTimeout ends a PacketConn's association with a remote after
	// this long without a datagram either way, as conntrack does for UDP:
	// its flow is deleted (flow-delete, once) and the next datagram is
	// classified again. 0 means DefaultUDPIdleTimeout; negative, never.
	UDPIdleTimeout time.Duration
	// Logger receives debug records of decisions (nil: discard).
	Logger *slog.Logger
}

// DefaultUDPIdleTimeout is Options.UDPIdleTimeout's default: the idle
// time after which Linux conntrack forgets a UDP flow that saw replies.
const DefaultUDPIdleTimeout = 60 * time.Second

// Datapath runs a process's sockets through an engine. It is safe for
// concurrent use.
type Datapath struct {
	e    *engine.Engine
	id   Identity
	opts Options
	log  *slog.Logger

	nextEndpoint atomic.Uint64
	compartment  uint64 // the network namespace's inode; 0 when unknown

	// Redirected outbound connections, by (protocol, client local, remote it
	// really connected to), for the proxy queries of the accepting side.
	mu      sync.Mutex
	redirs  map[connKey]*redirectEntry
	dialing map[netip.AddrPort]map[*dialing]struct{} // redirected dials in flight, by target
	nredirs atomic.Int64                             // len(redirs)+in-flight, read without the lock
}

// dialing is a redirected dial in flight. Its socket (known from the
// dialer's Control hook) tells an accept whether the dial is its peer.
type dialing struct {
	proto  uint8
	target netip.AddrPort
	sock   syscall.RawConn // nil until the socket exists; guarded by Datapath.mu
	done   chan struct{}   // closed when the dial registers or fails
}

type connKey struct {
	proto         uint8
	local, remote netip.AddrPort
}

// redirectEntry is what a redirected connection carries for its proxy.
type redirectEntry struct {
	records   []byte // marshalled, authenticated by the engine
	context   []byte
	targetPID uint32
	original  netip.AddrPort
}

// New returns a datapath for the engine.
func New(e *engine.Engine, opts Options) *Datapath {
	id := ProcessIdentity()
	if opts.Identity != nil {
		id = *opts.Identity
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Datapath{e: e, id: id, opts: opts, log: log, compartment: netnsInode(),
		redirs: map[connKey]*redirectEntry{}, dialing: map[netip.AddrPort]map[*dialing]struct{}{}}
}

// Engine returns the datapath's engine.
func (dp *Datapath) Engine() *engine.Engine { return dp.e }

// Identity returns the process identity the datapath reports.
func (dp *Datapath) Identity() Identity { return dp.id }

// classifier carries the identity and flow of one socket's classifications.
type classifier struct {
	dp    *Datapath
	id    Identity
	proto uint8
	v6    bool
	flow  engine.FlowHandle       // 0 for a listening socket
	ep    uint64                  // transport endpoint handle
	dir   engine.Direction        // of the flow; a socket without a flow has none
	recs  *engine.RedirectRecords // records the socket carries (a proxy's outbound)
	via   netip.AddrPort          // where a redirected flow really goes

	// What the kernel told about the flow's socket (0: unknown, absent).
	parent uint64         // an accepted connection's listening endpoint
	ifIn   uint32         // the interface its packets arrive on (inbound flows)
	ifOut  uint32         // the interface its packets leave by (outbound flows)
	scope  uint32         // the remote's IPv6 scope (zone)
	mtu    uint32         // the connected socket's path MTU
	bound  netip.AddrPort // a dialer's local address, assigned at RESOURCE_ASSIGNMENT
}

// socketValues fills vs and m for a classification of the socket itself
// (bind, resource) of a dialing flow: the local address, no flow; bind
// says whether the layer is a bind layer (wildcardBind).
func (c *classifier) socketValues(vs *engine.Values, m *engine.Metadata, local netip.AddrPort, bind bool) {
	vs.Reset()
	flow := c.flow
	c.flow = 0
	c.values(vs, local, netip.AddrPort{})
	if bind {
		wildcardBind(vs, local)
	}
	c.meta(m)
	c.flow = flow
}

// wildcardBind sets IS_WILDCARD_BIND when the address being bound is
// unspecified. WFP documents the flag at ALE_RESOURCE_ASSIGNMENT; fwp sets
// it at the two bind layers (BIND_REDIRECT and RESOURCE_ASSIGNMENT) and
// nowhere else, as the kernel hooks do, so that a policy matches alike on
// either datapath (docs/semantics.md, "Fields each kernel hook can match").
func wildcardBind(vs *engine.Values, local netip.AddrPort) {
	if local.IsValid() && local.Addr().IsUnspecified() {
		vs.Set(engine.FieldFlags, engine.Uint32(uint32(vs.Uint(engine.FieldFlags))|engine.FlagIsWildcardBind))
	}
}

// resourceRelease is RESOURCE_RELEASE of a dialing socket's local address.
func (c *classifier) resourceRelease(local netip.AddrPort) {
	var vs engine.Values
	var m engine.Metadata
	c.socketValues(&vs, &m, local, false)
	_, _ = c.classify(context.Background(), engine.KindResourceRelease, &vs, &m, nil)
}

// values fills the tuple, protocol, process and flag fields.
func (c *classifier) values(vs *engine.Values, local, remote netip.AddrPort) {
	vs.SetTuple(c.proto, local, remote)
	if c.id.Path != "" {
		vs.Set(engine.FieldALEAppID, engine.String(c.id.Path))
	}
	if c.id.UID >= 0 {
		vs.Set(engine.FieldALEUserID, engine.Uint32(uint32(c.id.UID)))
	}
	if c.id.GID >= 0 {
		vs.Set(engine.FieldALEGroupID, engine.Uint32(uint32(c.id.GID)))
	}
	var flags uint32
	wire := remote // a redirected flow is loopback by where it really goes
	if c.via.IsValid() {
		wire = c.via
	}
	if loopback(local, wire) {
		flags |= engine.FlagIsLoopback
	}
	vs.Set(engine.FieldFlags, engine.Uint32(flags))
	if c.flow != 0 {
		vs.Set(engine.FieldDirection, engine.Uint32(uint32(c.dir)))
	}
	if c.id.CgroupID != 0 {
		vs.Set(engine.FieldCgroupID, engine.Uint64(c.id.CgroupID))
	}
	if c.dp.compartment != 0 {
		vs.Set(engine.FieldCompartment, engine.Uint64(c.dp.compartment))
	}
	if i := max(c.ifIn, c.ifOut); i != 0 {
		vs.Set(engine.FieldIPLocalInterface, engine.Uint32(i))
	}
}

// loopback reports whether traffic between local and remote (remote
// invalid: a socket not connected) stays on this host.
func loopback(local, remote netip.AddrPort) bool {
	if !remote.IsValid() {
		return local.IsValid() && local.Addr().IsLoopback()
	}
	return remote.Addr().IsLoopback() || local.IsValid() && local.Addr() == remote.Addr()
}

// meta fills what the process knows about the classification.
func (c *classifier) meta(m *engine.Metadata) {
	m.Present = engine.MetaProcessID | engine.MetaTransportEndpointHandle
	m.ProcessID = c.id.PID
	m.TransportEndpointHandle = c.ep
	if c.id.Path != "" {
		m.Present |= engine.MetaProcessPath
		m.ProcessPath = c.id.Path
	}
	if c.id.UID >= 0 {
		m.Present |= engine.MetaUserID
		m.UserID = uint32(c.id.UID)
		if c.id.GID >= 0 {
			m.GroupID = uint32(c.id.GID)
		}
	}
	if c.flow != 0 {
		// Only a flow has a direction: a listening or unconnected UDP
		// socket's own classifications (bind, resource, closure) have none.
		m.Present |= engine.MetaFlowHandle | engine.MetaPacketDirection
		m.FlowHandle = c.flow
		m.Direction = c.dir
	}
	if c.recs != nil {
		m.Present |= engine.MetaRedirectRecords
		m.RedirectRecords = c.recs
	}
	if c.id.CgroupID != 0 {
		m.Present |= engine.MetaCgroupID
		m.CgroupID = c.id.CgroupID
	}
	if c.dp.compartment != 0 {
		m.Present |= engine.MetaCompartmentID
		m.CompartmentID = c.dp.compartment
	}
	if c.parent != 0 {
		m.Present |= engine.MetaParentEndpointHandle
		m.ParentEndpointHandle = c.parent
	}
	if c.ifIn != 0 {
		m.Present |= engine.MetaSourceInterfaceIndex
		m.SourceInterfaceIndex = c.ifIn
	}
	if c.ifOut != 0 {
		m.Present |= engine.MetaDestinationInterfaceIndex
		m.DestinationInterfaceIndex = c.ifOut
	}
	if c.scope != 0 {
		m.Present |= engine.MetaRemoteScopeID
		m.RemoteScopeID = c.scope
	}
	if c.mtu != 0 {
		m.Present |= engine.MetaPathMTU
		m.PathMTU = c.mtu
	}
}

// connected notes what the kernel tells about a connected socket: its path
// MTU and the interface it uses (the one it is bound to, else the one
// holding its local address).
func (c *classifier) connected(conn any, local netip.AddrPort) {
	mtu, ifx := connectedInfo(conn)
	if ifx == 0 {
		ifx = ifindexOf(local.Addr())
	}
	c.mtu = mtu
	if c.dir == engine.DirectionInbound {
		c.ifIn = ifx
	} else {
		c.ifOut = ifx
	}
}

func (c *classifier) layer(k engine.LayerKind) engine.LayerID { return engine.LayerFor(k, c.v6) }

// classify runs one layer, waiting for a pend within the datapath's
// bound, and turns a block into a *BlockedError.
func (c *classifier) classify(ctx context.Context, k engine.LayerKind, vs *engine.Values, m *engine.Metadata, data any) (engine.Result, error) {
	return c.classifyNotify(ctx, k, vs, m, data, nil)
}

// classifyNotify is classify calling pended, if not nil, once a callout
// pends (engine.ClassifyWaitNotify).
func (c *classifier) classifyNotify(ctx context.Context, k engine.LayerKind, vs *engine.Values, m *engine.Metadata, data any, pended func()) (engine.Result, error) {
	layer := c.layer(k)
	if c.dp.opts.PendTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.dp.opts.PendTimeout)
		defer cancel()
	}
	res, err := c.dp.e.ClassifyWaitNotify(ctx, layer, vs, m, data, pended)
	if err != nil {
		return res, err
	}
	if !res.Permitted() {
		c.dp.log.Debug("blocked", "layer", layer, "filter", res.Filter, "reason", res.Reason, "values", vs.String())
		return res, &BlockedError{Layer: layer, Filter: res.Filter, Reason: res.Reason}
	}
	return res, nil
}

func (dp *Datapath) newClassifier(proto uint8, v6 bool, dir engine.Direction, id Identity, flow bool) *classifier {
	c := &classifier{dp: dp, id: id, proto: proto, v6: v6, dir: dir, ep: dp.nextEndpoint.Add(1)}
	if flow {
		c.flow = dp.e.NewFlowHandle()
	}
	return c
}

// beginRedirect notes a redirected dial in flight to target, so that an
// accept racing the dial's registration waits for it.
func (dp *Datapath) beginRedirect(proto uint8, target netip.AddrPort) *dialing {
	dl := &dialing{proto: proto, target: target, done: make(chan struct{})}
	dp.mu.Lock()
	set := dp.dialing[target]
	if set == nil {
		set = map[*dialing]struct{}{}
		dp.dialing[target] = set
	}
	set[dl] = struct{}{}
	dp.nredirs.Add(1)
	dp.mu.Unlock()
	return dl
}

// dialSocket records the socket of an in-flight dial (from its Control hook,
// before connect).
func (dp *Datapath) dialSocket(dl *dialing, c syscall.RawConn) {
	dp.mu.Lock()
	dl.sock = c
	dp.mu.Unlock()
}

// endRedirect ends an in-flight redirected dial, registering the
// connection when it was made, and wakes the accepts waiting for it.
func (dp *Datapath) endRedirect(dl *dialing, k connKey, ent *redirectEntry) {
	dp.mu.Lock()
	if set := dp.dialing[dl.target]; set != nil {
		delete(set, dl)
		if len(set) == 0 {
			delete(dp.dialing, dl.target)
		}
	}
	if ent != nil {
		if _, dup := dp.redirs[k]; dup {
			dp.nredirs.Add(-1) // replaces a stale entry: keep the count exact
		}
		dp.redirs[k] = ent
	} else {
		dp.nredirs.Add(-1)
	}
	dl.sock = nil
	dp.mu.Unlock()
	close(dl.done)
}

func (dp *Datapath) forget(k connKey) {
	dp.mu.Lock()
	if _, ok := dp.redirs[k]; ok {
		delete(dp.redirs, k)
		dp.nredirs.Add(-1)
	}
	dp.mu.Unlock()
}

// newRedirectEntry is what a flow redirected from original carries for
// its proxy.
func (dp *Datapath) newRedirectEntry(original netip.AddrPort, rd *engine.Redirect) *redirectEntry {
	ent := &redirectEntry{original: original, context: rd.Connect.LocalRedirectContext, targetPID: rd.Connect.LocalRedirectTargetPID}
	if rd.Records != nil {
		ent.records = dp.e.MarshalRedirectRecords(rd.Records)
	}
	return ent
}

// registerDatagrams records the redirect of a UDP association (its
// datagrams go from k.local to k.remote), for the proxy's datagram queries.
// Two associations of one socket redirected to one proxy share a key: the
// later one is what the proxy sees, as in the kernel's tuple index.
func (dp *Datapath) registerDatagrams(k connKey, ent *redirectEntry) {
	dp.mu.Lock()
	if _, dup := dp.redirs[k]; !dup {
		dp.nredirs.Add(1)
	}
	dp.redirs[k] = ent
	dp.mu.Unlock()
}

// forgetEntry removes k's registration if it is still ent's.
func (dp *Datapath) forgetEntry(k connKey, ent *redirectEntry) {
	dp.mu.Lock()
	if dp.redirs[k] == ent {
		delete(dp.redirs, k)
		dp.nredirs.Add(-1)
	}
	dp.mu.Unlock()
}

// lookupDatagrams finds the redirect of the UDP datagrams from that a
// socket bound to local receives. A sender bound to a wildcard address is
// registered with it (the kernel picks the source per datagram), so its
// datagrams are also looked up by the wildcard of from's port. A receiver
// bound to a wildcard address does not know which of its addresses the
// datagram came to: every redirect of from to local's port matches, and
// when those disagree (one sender redirected to two addresses of this
// host on one port) the answer is none rather than a guess.
func (dp *Datapath) lookupDatagrams(local, from netip.AddrPort) *redirectEntry {
	if dp.nredirs.Load() == 0 || !local.IsValid() || !from.IsValid() {
		return nil
	}
	senders := [...]netip.AddrPort{from, netip.AddrPortFrom(netip.IPv4Unspecified(), from.Port()), netip.AddrPortFrom(netip.IPv6Unspecified(), from.Port())}
	dp.mu.Lock()
	defer dp.mu.Unlock()
	if !local.Addr().IsUnspecified() {
		for _, s := range senders {
			if ent := dp.redirs[connKey{17, s, local}]; ent != nil {
				return ent
			}
		}
		return nil
	}
	var found [2]*redirectEntry // by the sender's specificity: exact, wildcard
	var ambiguous [2]bool
	for k, ent := range dp.redirs {
		if k.proto != 17 || k.remote.Port() != local.Port() || k.remote.Addr().Is4() != from.Addr().Is4() {
			continue
		}
		for i, s := range senders {
			if k.local != s {
				continue
			}
			j := min(i, 1)
			if found[j] != nil && found[j] != ent {
				ambiguous[j] = true
			}
			found[j] = ent
		}
	}
	for j := range found {
		if found[j] != nil {
			if ambiguous[j] {
				return nil
			}
			return found[j]
		}
	}
	return nil
}

// acceptWait bounds how long an accept waits for its racing dial to
// register. The wait is normally microseconds (the dialer's goroutine
// returning from connect); the bound only matters when a scheduler is
// starved, or where the socket's address cannot be read (see sockname).
const acceptWait = 30 * time.Second

// lookupAccepted finds the redirect of a connection accepted with this
// local and remote address: the dialing side's (remote, local). The kernel
// completes the handshake before the dialer learns its local port, so an
// accept may come first. It then waits, but only for the in-flight dial
// whose socket is bound to the accepted connection's remote address: a
// connection nobody redirected (a client dialing the proxy directly) is
// answered at once, however many redirected dials are in flight.
func (dp *Datapath) lookupAccepted(ctx context.Context, proto uint8, local, remote netip.AddrPort) *redirectEntry {
	if dp.nredirs.Load() == 0 {
		return nil
	}
	k := connKey{proto, remote, local}
	type candidate struct {
		dl   *dialing
		sock syscall.RawConn
	}
	var cands []candidate
	dp.mu.Lock()
	ent := dp.redirs[k]
	if ent == nil {
		for dl := range dp.dialing[local] {
			// A dial with no socket yet has not connected, so it cannot
			// be the peer of a connection already accepted.
			if dl.proto == proto && dl.sock != nil {
				cands = append(cands, candidate{dl, dl.sock})
			}
		}
	}
	dp.mu.Unlock()
	if ent != nil {
		return ent
	}
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for _, cd := range cands {
		if at, known := sockname(cd.sock); known && at != remote {
			continue
		}
		if timer == nil {
			timer = time.NewTimer(acceptWait)
		}
		select {
		case <-cd.dl.done:
		case <-timer.C:
			return nil
		case <-ctx.Done():
			return nil
		}
		dp.mu.Lock()
		ent = dp.redirs[k]
		dp.mu.Unlock()
		if ent != nil {
			return ent
		}
	}
	return nil
}

// QueryAccepted implements proxy.Backend for connections accepted outside
// this package (a plain net.Listener): it finds them by 4-tuple.
func (dp *Datapath) QueryAccepted(conn net.Conn) (proxy.Redirect, error) {
	if !isSocket(conn) {
		return proxy.Redirect{}, fmt.Errorf("%w: %T", proxy.ErrNotSocket, conn)
	}
	local, lok := addrPortOf(conn.LocalAddr())
	remote, rok := addrPortOf(conn.RemoteAddr())
	proto := protoOf(conn.LocalAddr())
	if !lok || !rok || proto == 0 {
		return proxy.Redirect{}, fmt.Errorf("%w: %T", proxy.ErrNotFound, conn)
	}
	ent := dp.lookupAccepted(context.Background(), proto, local, remote)
	if ent == nil {
		return proxy.Redirect{}, fmt.Errorf("%w: %s -> %s", proxy.ErrNotFound, remote, local)
	}
	return ent.proxyRedirect(), nil
}

// QueryDatagram implements proxy.DatagramBackend for a plain
// net.PacketConn: the redirect of the datagrams from that the socket
// receives, by its local address (see PacketConn.ProxyDatagramRedirect).
func (dp *Datapath) QueryDatagram(pc net.PacketConn, from netip.AddrPort) (proxy.Redirect, error) {
	if !isSocket(pc) {
		return proxy.Redirect{}, fmt.Errorf("%w: %T", proxy.ErrNotSocket, pc)
	}
	local, ok := addrPortOf(pc.LocalAddr())
	if !ok || protoOf(pc.LocalAddr()) != 17 {
		return proxy.Redirect{}, fmt.Errorf("%w: %T is not a UDP socket", proxy.ErrNotFound, pc)
	}
	ent := dp.lookupDatagrams(local, unmap(from))
	if ent == nil {
		return proxy.Redirect{}, fmt.Errorf("%w: datagrams %s -> %s", proxy.ErrNotFound, from, local)
	}
	return ent.proxyRedirect(), nil
}

// SetRecords implements proxy.Backend: a plain socket does not go through
// this datapath, so records on it would mean nothing.
func (dp *Datapath) SetRecords(network, address string, _ syscall.RawConn, _ []byte) error {
	return fmt.Errorf("%w: the in-process datapath carries records on its own Dialer only", proxy.ErrNotSupported)
}

func (ent *redirectEntry) proxyRedirect() proxy.Redirect {
	return proxy.Redirect{Records: ent.records, Context: ent.context, TargetPID: ent.targetPID}
}

// isSocket: an operating-system socket, or a wrapper showing its IP
// addresses (proxy.ErrNotSocket otherwise, WSAENOTSOCK).
func isSocket(c interface{ LocalAddr() net.Addr }) bool {
	if _, ok := c.(syscall.Conn); ok {
		return true
	}
	return protoOf(c.LocalAddr()) != 0
}

func addrPortOf(a net.Addr) (netip.AddrPort, bool) {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	default:
		return netip.AddrPort{}, false
	}
	return unmap(ap), ap.IsValid()
}

func protoOf(a net.Addr) uint8 {
	switch a.(type) {
	case *net.TCPAddr:
		return 6
	case *net.UDPAddr:
		return 17
	}
	return 0
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port())
}
