package engine

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// NetEventType is the kind of a net event (WFP's FWPM_NET_EVENT_TYPE).
type NetEventType uint8

const (
	EventClassifyDrop     NetEventType = iota + 1 // a block decided
	EventClassifyAllow                            // a permit decided (Options.AllowEvents)
	EventClassifyVeto                             // a callout vetoed a hard permit
	EventClassifyRedirect                         // a connection redirected (reported by the kernel datapath)
	EventCalloutFailure                           // a remote callout died, broke its connection or missed its answer deadline (fwpd)
	EventFlowReset                                // a live flow the policy blocks after a change was reset (reauthorization, kernel datapath)
)

func (t NetEventType) String() string {
	switch t {
	case EventClassifyDrop:
		return "classify_drop"
	case EventClassifyAllow:
		return "classify_allow"
	case EventClassifyVeto:
		return "classify_veto"
	case EventClassifyRedirect:
		return "classify_redirect"
	case EventCalloutFailure:
		return "callout_failure"
	case EventFlowReset:
		return "flow_reset"
	}
	return "unknown"
}

// NetEvent is one recorded classification outcome.
type NetEvent struct {
	Seq       uint64 // increases by one per event
	Time      time.Time
	Type      NetEventType
	Layer     LayerID
	Filter    FilterID
	Callout   CalloutID
	Reason    Reason
	Protocol  uint8
	Local     netip.AddrPort
	Remote    netip.AddrPort
	AppID     string
	UserID    uint32
	GroupID   uint32
	CgroupID  uint64 // cgroup v2 id; 0 when unknown
	ProcessID uint32 // 0 when unknown
}

// eventRing is a bounded ring of net events with subscribers. Subscribers
// never slow classification: a full subscriber channel loses the event and
// its Lost counter says so.
type eventRing struct {
	mu   sync.Mutex
	now  func() time.Time
	buf  []NetEvent
	next uint64 // Seq of the next event
	subs map[*Subscription]struct{}
}

func newEventRing(n int, now func() time.Time) *eventRing {
	return &eventRing{buf: make([]NetEvent, n), now: now, next: 1, subs: map[*Subscription]struct{}{}}
}

// Subscription receives net events as they happen.
type Subscription struct {
	C    <-chan NetEvent
	c    chan NetEvent
	lost atomic.Uint64
	r    *eventRing
}

// Lost reports how many events did not fit the subscriber's channel.
func (s *Subscription) Lost() uint64 { return s.lost.Load() }

// Close ends the subscription and closes C.
func (s *Subscription) Close() {
	s.r.mu.Lock()
	defer s.r.mu.Unlock()
	if _, ok := s.r.subs[s]; ok {
		delete(s.r.subs, s)
		close(s.c)
	}
}

func (r *eventRing) add(ev *NetEvent) {
	r.mu.Lock()
	ev.Seq = r.next
	ev.Time = r.now()
	r.buf[(r.next-1)%uint64(len(r.buf))] = *ev
	r.next++
	for s := range r.subs {
		select {
		case s.c <- *ev:
		default:
			s.lost.Add(1)
		}
	}
	r.mu.Unlock()
}

// SubscribeNetEvents returns a subscription with a channel of the given
// buffer size (at least 1).
func (e *Engine) SubscribeNetEvents(buffer int) *Subscription {
	c := make(chan NetEvent, max(buffer, 1))
	s := &Subscription{C: c, c: c, r: e.events}
	e.events.mu.Lock()
	e.events.subs[s] = struct{}{}
	e.events.mu.Unlock()
	return s
}

// NetEvents returns the recorded events with Seq ≥ since, oldest first.
func (e *Engine) NetEvents(since uint64) []NetEvent {
	r := e.events
	r.mu.Lock()
	defer r.mu.Unlock()
	first := uint64(1)
	if r.next > uint64(len(r.buf)) {
		first = r.next - uint64(len(r.buf))
	}
	first = max(first, since)
	out := make([]NetEvent, 0, r.next-min(first, r.next))
	for seq := first; seq < r.next; seq++ {
		out = append(out, r.buf[(seq-1)%uint64(len(r.buf))])
	}
	return out
}

// RecordNetEvent records an event a datapath decided without Classify
// (the kernel datapath's drops and redirects); Seq and Time are set here.
func (e *Engine) RecordNetEvent(ev NetEvent) { e.events.add(&ev) }

func (e *Engine) recordEvent(cs *classifyState, res *Result) {
	var t NetEventType
	switch {
	case res.Veto:
		t = EventClassifyVeto
	case res.Action == ActionBlock && res.Flags&OutAbsorb == 0 && res.Pend == nil:
		t = EventClassifyDrop
	case res.Action == ActionPermit && e.opts.AllowEvents:
		t = EventClassifyAllow
	default:
		return
	}
	vs := cs.vs
	ev := NetEvent{
		Type: t, Layer: cs.layer, Filter: res.Filter, Callout: res.Callout, Reason: res.Reason,
		Protocol: uint8(vs.v[FieldIPProtocol].n),
		AppID:    vs.v[FieldALEAppID].s,
		UserID:   uint32(vs.v[FieldALEUserID].n),
	}
	if a := vs.v[FieldIPLocalAddress]; a.t == TypeAddr {
		ev.Local = netip.AddrPortFrom(a.ip, uint16(vs.v[FieldIPLocalPort].n))
	}
	if a := vs.v[FieldIPRemoteAddress]; a.t == TypeAddr {
		ev.Remote = netip.AddrPortFrom(a.ip, uint16(vs.v[FieldIPRemotePort].n))
	}
	if g := vs.v[FieldALEGroupID]; g.t == TypeUint32 {
		ev.GroupID = uint32(g.n)
	}
	if c := vs.v[FieldCgroupID]; c.t == TypeUint64 {
		ev.CgroupID = c.n
	}
	if cs.meta.Has(MetaProcessID) {
		ev.ProcessID = cs.meta.ProcessID
	}
	e.events.add(&ev)
}
