//go:build linux

package ebpf

import (
	"context"
	"errors"
	"fmt"
	"os"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"fwp/engine"
)

// FlowEventType is what a flow event reports.
type FlowEventType uint8

// Flow event types (bpf/reauth.c FLOW_EV_*).
const (
	FlowEstablished FlowEventType = 1 // an outbound TCP connection of the hooked cgroups is established, or one is accepted
	FlowClosed      FlowEventType = 2 // the program closed its socket (the endpoint): such a TCP connection, or a connected UDP socket
)

// FlowEvent is one flow's establishment or end, with what the connect
// hook noted for it (Flow.SocketLocal and SocketRemote are the socket's
// addresses at the event).
type FlowEvent struct {
	Type FlowEventType
	Flow LiveFlow
}

const flowEventSize = 184

var _ [flowEventSize - unsafe.Sizeof(fwpreauthFlowEvent{})]byte
var _ [unsafe.Sizeof(fwpreauthFlowEvent{}) - flowEventSize]byte

// ErrBadFlowEvent: a ring buffer record is not a flow event.
var ErrBadFlowEvent = errors.New("fwp/ebpf: malformed flow event")

// DecodeFlowEvent decodes one record of the flow event ring buffer.
func DecodeFlowEvent(b []byte) (FlowEvent, error) {
	if len(b) < flowEventSize {
		return FlowEvent{}, fmt.Errorf("%w: %d bytes, want %d", ErrBadFlowEvent, len(b), flowEventSize)
	}
	var raw fwpreauthFlowEvent
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&raw)), flowEventSize), b)
	t := FlowEventType(raw.Type)
	if t != FlowEstablished && t != FlowClosed {
		return FlowEvent{}, fmt.Errorf("%w: type %d", ErrBadFlowEvent, raw.Type)
	}
	if raw.Family != unix.AF_INET && raw.Family != unix.AF_INET6 {
		return FlowEvent{}, fmt.Errorf("%w: family %d", ErrBadFlowEvent, raw.Family)
	}
	rf := fwpreauthReauthFlow{Note: raw.Note, Cookie: raw.Cookie, Src: raw.Src, Dst: raw.Dst, Sport: raw.Sport, Dport: raw.Dport,
		State: 1, Family: raw.Family, Proto: raw.Note.Proto}
	return FlowEvent{Type: t, Flow: rf.export()}, nil
}

// EnableFlowEvents loads the flow event programs and attaches them, with
// the hooks, to every cgroup the datapath is attached to now and later;
// ReadFlowEvents then reports each outbound TCP flow's and accepted TCP
// connection's establishment and end, and each connected UDP socket's end (a UDP flow has no
// establishment report: docs/semantics.md). It turns the connect hook's notes on (as EnableReauthorization
// does). Calling it again does nothing.
func (d *Datapath) EnableFlowEvents() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if err := d.loadLive(); err != nil { // attaches the sockops program
		return err
	}
	r := d.reauth
	if r.flowEvents {
		return nil
	}
	// The sock_release program reports ends only: it joins the hooked
	// cgroups now (before, each socket's close would have run it for
	// nothing: issue 15's connect cost).
	added := map[string][]link.Link{}
	undo := func() {
		for _, ls := range added {
			for _, l := range ls {
				l.Close()
			}
		}
	}
	for path := range d.links {
		ls, err := r.attachFlowHooks(path, flowRelease)
		if err != nil {
			undo()
			return err
		}
		added[path] = ls
	}
	if err := r.objs.FwpFlowCfg.Put(uint32(0), uint32(1)); err != nil {
		undo()
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	for path, ls := range added {
		d.links[path] = append(d.links[path], ls...)
	}
	r.flowEvents = true
	return nil
}

// Which of reauth.c's flow programs attachFlowHooks attaches.
const (
	flowSockops = 1 << iota // notes listeners and accepted sockets; reports establishment
	flowRelease             // reports ends: only while flow events are on
)

// liveProgs are the flow programs a hooked cgroup carries now.
func (r *reauthObjs) liveProgs() int {
	if r.flowEvents {
		return flowSockops | flowRelease
	}
	return flowSockops
}

// attachFlowHooks attaches the flow programs which picks to one cgroup
// (all or none); d.mu is held. They are not pinned: they serve fwpd's
// reauthorization and reader.
func (r *reauthObjs) attachFlowHooks(cgroupPath string, which int) ([]link.Link, error) {
	var out []link.Link
	for _, h := range []struct {
		bit int
		p   *ebpf.Program
		at  ebpf.AttachType
	}{{flowSockops, r.objs.FwpFlowSockops, ebpf.AttachCGroupSockOps}, {flowRelease, r.objs.FwpFlowRelease, ebpf.AttachCgroupInetSockRelease}} {
		if which&h.bit == 0 {
			continue
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: h.at, Program: h.p})
		if err != nil {
			for _, l := range out {
				l.Close()
			}
			return nil, fmt.Errorf("%w: attach %s to %s: %v", ErrUnavailable, h.at, cgroupPath, err)
		}
		out = append(out, l)
	}
	return out, nil
}

// attachLive attaches the flow programs to a cgroup Attach just hooked,
// once reauthorization or flow events are on; d.mu is held.
func (d *Datapath) attachLive(cgroupPath string) ([]link.Link, error) {
	if d.reauth == nil {
		return nil, nil
	}
	return d.reauth.attachFlowHooks(cgroupPath, d.reauth.liveProgs())
}

// ReadFlowEvents calls fn with every flow event until ctx ends or the
// datapath closes. Reports the reader could not keep up with are lost in
// the kernel (FlowEventsLost counts them).
func (d *Datapath) ReadFlowEvents(ctx context.Context, fn func(FlowEvent)) error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return ErrClosed
	}
	if d.reauth == nil || !d.reauth.flowEvents {
		d.mu.Unlock()
		return fmt.Errorf("%w: flow events are not enabled", ErrUnavailable)
	}
	rd, err := ringbuf.NewReader(d.reauth.objs.FwpFlowEvents)
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%w: flow event ring buffer: %v", ErrUnavailable, err)
	}
	stop := context.AfterFunc(ctx, func() { rd.Close() })
	defer stop()
	defer rd.Close()
	for {
		rec, err := rd.Read()
		if err != nil {
			if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, os.ErrClosed) {
				return nil
			}
			return fmt.Errorf("read flow events: %w", err)
		}
		ev, err := DecodeFlowEvent(rec.RawSample)
		if err != nil {
			continue // cannot happen with our programs; never stop reading
		}
		fn(ev)
	}
}

// FlowEventsLost returns how many flow events the ring buffer had no room
// for since the programs were loaded.
func (d *Datapath) FlowEventsLost() (uint64, error) {
	d.mu.Lock()
	r := d.reauth
	d.mu.Unlock()
	if r == nil {
		return 0, nil
	}
	var perCPU []uint64
	if err := r.objs.FwpFlowLost.Lookup(uint32(0), &perCPU); err != nil {
		return 0, err
	}
	var n uint64
	for _, c := range perCPU {
		n += c
	}
	return n, nil
}

// FlowLayers runs ALE_FLOW_ESTABLISHED and ALE_ENDPOINT_CLOSURE for the
// kernel's flows in the engine: the layers' callouts (inspection) see each
// flow's values and metadata — the socket's addresses, the process the
// connect hook noted, the socket cookie as flow handle — and the flow's
// contexts (FlowAssociateContext, from a callout at any layer with that
// handle, the callout path's AUTH_CONNECT included). When a flow ends,
// ENDPOINT_CLOSURE is classified and the engine's FlowDeleted calls each
// of the flow's contexts' flowDeleteFn, once.
type FlowLayers struct {
	Engine *engine.Engine
	// Policy returns the kernel policy in force, for application ids
	// (appPath); nil is allowed.
	Policy func() *Policy

	vs   engine.Values
	meta engine.Metadata
	// apps caches appPath per process and executable (a stat and a
	// readlink each), emptied when it reaches maxFlowApps.
	apps map[flowAppKey]string
}

type flowAppKey struct {
	pid uint32
	id  AppIdentity
	p   *Policy
}

const maxFlowApps = 4096

// Handle runs the layer of one flow event (ReadFlowEvents calls it from
// one goroutine).
func (fl *FlowLayers) Handle(ev FlowEvent) engine.Result {
	f := &ev.Flow
	var p *Policy
	if fl.Policy != nil {
		p = fl.Policy()
	}
	k := flowAppKey{f.PID, f.App, p}
	app, ok := fl.apps[k]
	if !ok {
		app = appPath(p, f)
		if fl.apps == nil || len(fl.apps) >= maxFlowApps {
			fl.apps = map[flowAppKey]string{}
		}
		fl.apps[k] = app
	}
	kind := engine.KindFlowEstablished
	if ev.Type == FlowClosed {
		kind = engine.KindEndpointClosure
	}
	v6 := f.SocketRemote.Addr().Is6()
	flowValues(f, app, &fl.vs, &fl.meta)
	res := fl.Engine.Classify(engine.LayerFor(kind, v6), &fl.vs, &fl.meta)
	if res.Pend != nil {
		res.Pend.Cancel() // an inspection layer decides nothing: never held
	}
	if ev.Type == FlowClosed {
		fl.Engine.FlowDeleted(engine.FlowHandle(f.Cookie))
	}
	return res
}

// flowValues sets the engine's inputs at the flow layers: the socket's
// addresses (the flow as it is), the process the connect hook noted.
func flowValues(f *LiveFlow, app string, vs *engine.Values, meta *engine.Metadata) {
	vs.Reset()
	vs.Set(engine.FieldIPProtocol, engine.Uint8(f.Protocol))
	vs.Set(engine.FieldIPLocalAddress, engine.Addr(f.SocketLocal.Addr()))
	vs.Set(engine.FieldIPLocalPort, engine.Uint16(f.SocketLocal.Port()))
	vs.Set(engine.FieldIPRemoteAddress, engine.Addr(f.SocketRemote.Addr()))
	vs.Set(engine.FieldIPRemotePort, engine.Uint16(f.SocketRemote.Port()))
	vs.Set(engine.FieldALEUserID, engine.Uint32(f.UID))
	vs.Set(engine.FieldALEGroupID, engine.Uint32(f.GID))
	vs.Set(engine.FieldCgroupID, engine.Uint64(f.CgroupID))
	if app != "" {
		vs.Set(engine.FieldALEAppID, engine.String(app))
	}
	var flags uint32
	if f.SocketRemote.Addr().IsLoopback() {
		flags |= engine.FlagIsLoopback
	}
	if f.Redirected {
		flags |= engine.FlagIsConnectionRedirected
	}
	vs.Set(engine.FieldFlags, engine.Uint32(flags))
	vs.Set(engine.FieldDirection, engine.Uint32(uint32(f.direction())))
	*meta = engine.Metadata{}
	meta.Present = engine.MetaProcessID | engine.MetaUserID | engine.MetaFlowHandle | engine.MetaPacketDirection |
		engine.MetaTransportEndpointHandle | engine.MetaCgroupID
	meta.ProcessID = f.PID
	meta.UserID, meta.GroupID = f.UID, f.GID
	meta.FlowHandle = engine.FlowHandle(f.Cookie)
	meta.Direction = f.direction()
	meta.TransportEndpointHandle = f.Cookie
	meta.CgroupID = f.CgroupID
	if app != "" && app[0] != '[' {
		meta.Present |= engine.MetaProcessPath
		meta.ProcessPath = app
	}
}

// FlowLayer reports whether filters at the layer are run for the kernel's
// flows from flow events (ALE_FLOW_ESTABLISHED, ALE_ENDPOINT_CLOSURE):
// Compile leaves them to FlowLayers.
func FlowLayer(l engine.LayerID) bool {
	k := l.Kind()
	return k == engine.KindFlowEstablished || k == engine.KindEndpointClosure
}

// HasFlowLayerFilters reports whether the policy has filters at the flow
// layers: their callouts need EnableFlowEvents and a FlowLayers reader.
func HasFlowLayerFilters(v engine.View) bool {
	for _, k := range []engine.LayerKind{engine.KindFlowEstablished, engine.KindEndpointClosure} {
		for _, v6 := range []bool{false, true} {
			if v.FilterCount(engine.LayerFor(k, v6)) > 0 {
				return true
			}
		}
	}
	return false
}
