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
}

// ProcessIdentity returns this process's identity.
func ProcessIdentity() Identity {
	id := Identity{PID: uint32(os.Getpid()), UID: os.Getuid(), GID: os.Getgid()}
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
	// Logger receives debug records of decisions (nil: discard).
	Logger *slog.Logger
}

// Datapath runs a process's sockets through an engine. It is safe for
// concurrent use.
type Datapath struct {
	e    *engine.Engine
	id   Identity
	opts Options
	log  *slog.Logger

	nextEndpoint atomic.Uint64

	// Redirected outbound connections, by (protocol, client local, remote it
	// really connected to), for the proxy queries of the accepting side.
	mu      sync.Mutex
	redirs  map[connKey]*redirectEntry
	pending map[netip.AddrPort]int // redirected dials in flight, by target
	changed chan struct{}          // closed and replaced on every change
	nredirs atomic.Int64           // len(redirs)+in-flight, read without the lock
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
	return &Datapath{e: e, id: id, opts: opts, log: log,
		redirs: map[connKey]*redirectEntry{}, pending: map[netip.AddrPort]int{}, changed: make(chan struct{})}
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
	flow  engine.FlowHandle // 0 for a listening socket
	ep    uint64            // transport endpoint handle
	dir   engine.Direction
	recs  *engine.RedirectRecords // records the socket carries (a proxy's outbound)
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
	if remote.IsValid() && remote.Addr().IsLoopback() || !remote.IsValid() && local.IsValid() && local.Addr().IsLoopback() {
		flags |= engine.FlagIsLoopback
	}
	if local.IsValid() && local.Addr().IsUnspecified() {
		flags |= engine.FlagIsWildcardBind
	}
	vs.Set(engine.FieldFlags, engine.Uint32(flags))
	vs.Set(engine.FieldDirection, engine.Uint32(uint32(c.dir)))
}

// meta fills what the process knows about the classification.
func (c *classifier) meta(m *engine.Metadata) {
	m.Present = engine.MetaProcessID | engine.MetaPacketDirection | engine.MetaTransportEndpointHandle
	m.ProcessID = c.id.PID
	m.Direction = c.dir
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
		m.Present |= engine.MetaFlowHandle
		m.FlowHandle = c.flow
	}
	if c.recs != nil {
		m.Present |= engine.MetaRedirectRecords
		m.RedirectRecords = c.recs
	}
}

func (c *classifier) layer(k engine.LayerKind) engine.LayerID { return engine.LayerFor(k, c.v6) }

// classify runs one layer, waiting for a pend within the datapath's
// bound, and turns a block into a *BlockedError.
func (c *classifier) classify(ctx context.Context, k engine.LayerKind, vs *engine.Values, m *engine.Metadata, data any) (engine.Result, error) {
	layer := c.layer(k)
	if c.dp.opts.PendTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.dp.opts.PendTimeout)
		defer cancel()
	}
	res, err := c.dp.e.ClassifyWait(ctx, layer, vs, m, data)
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
func (dp *Datapath) beginRedirect(target netip.AddrPort) {
	dp.mu.Lock()
	dp.pending[target]++
	dp.nredirs.Add(1)
	dp.notifyLocked()
	dp.mu.Unlock()
}

// endRedirect ends an in-flight redirected dial, registering the
// connection when it was made.
func (dp *Datapath) endRedirect(target netip.AddrPort, k connKey, ent *redirectEntry) {
	dp.mu.Lock()
	if dp.pending[target]--; dp.pending[target] <= 0 {
		delete(dp.pending, target)
	}
	if ent != nil {
		dp.redirs[k] = ent
	} else {
		dp.nredirs.Add(-1)
	}
	dp.notifyLocked()
	dp.mu.Unlock()
}

func (dp *Datapath) forget(k connKey) {
	dp.mu.Lock()
	if _, ok := dp.redirs[k]; ok {
		delete(dp.redirs, k)
		dp.nredirs.Add(-1)
	}
	dp.mu.Unlock()
}

func (dp *Datapath) notifyLocked() {
	close(dp.changed)
	dp.changed = make(chan struct{})
}

// acceptWait bounds how long an accept waits for a racing dial to register.
// The wait is normally microseconds (the dialer's goroutine returning from
// connect); the bound only matters when a scheduler is starved.
const acceptWait = 30 * time.Second

// lookupAccepted finds the redirect of a connection accepted with this
// local and remote address: the dialing side's (remote, local). The kernel
// completes the handshake before the dialer learns its local port, so an
// accept may come first: while a redirected dial to this address is in
// flight, it waits for that dial to register or fail.
func (dp *Datapath) lookupAccepted(ctx context.Context, proto uint8, local, remote netip.AddrPort) *redirectEntry {
	if dp.nredirs.Load() == 0 {
		return nil
	}
	k := connKey{proto, remote, local}
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		dp.mu.Lock()
		ent, waiting, ch := dp.redirs[k], dp.pending[local] > 0, dp.changed
		dp.mu.Unlock()
		if ent != nil || !waiting {
			return ent
		}
		// The dial connected but has not registered yet.
		if timer == nil {
			timer = time.NewTimer(acceptWait)
		}
		select {
		case <-ch:
		case <-timer.C:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
}

// QueryAccepted implements proxy.Backend for connections accepted outside
// this package (a plain net.Listener): it finds them by 4-tuple.
func (dp *Datapath) QueryAccepted(conn net.Conn) (proxy.Redirect, error) {
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

// SetRecords implements proxy.Backend: a plain socket does not go through
// this datapath, so records on it would mean nothing.
func (dp *Datapath) SetRecords(network, address string, _ syscall.RawConn, _ []byte) error {
	return fmt.Errorf("%w: the in-process datapath carries records on its own Dialer only", proxy.ErrNotSupported)
}

func (ent *redirectEntry) proxyRedirect() proxy.Redirect {
	return proxy.Redirect{Records: ent.records, Context: ent.context, TargetPID: ent.targetPID}
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
