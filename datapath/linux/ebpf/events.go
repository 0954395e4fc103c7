//go:build linux

package ebpf

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"fwp/engine"
)

// EventType is what a kernel event reports.
type EventType uint8

// Kernel event types (bpf/fwp.c's EV_*).
const (
	EventDrop     EventType = 1 // a block decided in a hook
	EventRedirect EventType = 2 // a connection redirected to a proxy
)

// Event is one drop or redirect the hooks reported, with the process
// metadata captured in the hook.
type Event struct {
	Type     EventType
	Layer    engine.LayerID
	Filter   engine.FilterID // the deciding filter (the redirect's, for EventRedirect)
	Protocol uint8
	Local    netip.AddrPort // invalid when the socket had no local address yet
	Remote   netip.AddrPort // the destination the process asked for (EventRedirect: the original)
	Proxy    netip.AddrPort // EventRedirect: where it was sent
	PID      uint32         // tgid
	UID, GID uint32
	CgroupID uint64
	Comm     string
}

// Explain gives the engine's reason for what the hooks did, and the
// callout involved, from the deciding filter in the policy v (the one in
// force when the event is read; a filter deleted since is taken for a
// block filter).
func (e Event) Explain(v engine.View) (engine.Reason, engine.CalloutID) {
	f, err := v.Filter(e.Filter)
	switch {
	case e.Type == EventRedirect:
		if err == nil {
			return engine.ReasonCalloutPermit, f.Action.Callout
		}
		return engine.ReasonCalloutPermit, 0
	case err == nil && f.Action.Callout != 0:
		// A built-in redirect that could not record its state refuses
		// the connection rather than let it through unproxied.
		return engine.ReasonCalloutBlock, f.Action.Callout
	default:
		return engine.ReasonFilterBlock, 0
	}
}

// rawEvent is bpf/fwp.c's struct event, little-endian and without padding.
type rawEvent struct {
	FilterID  uint64
	CgroupID  uint64
	PID       uint32
	UID       uint32
	GID       uint32
	RPort     uint16
	LPort     uint16
	RAddr     [16]byte
	LAddr     [16]byte
	ProxyAddr [16]byte
	ProxyPort uint16
	Type      uint8
	Slot      uint8
	Proto     uint8
	V6        uint8
	HasLAddr  uint8
	ProxyV6   uint8
	Comm      [16]byte
}

// rawEventSize is sizeof(struct event).
const rawEventSize = 104

// ErrBadEvent: a ring buffer record is not a kernel event.
var ErrBadEvent = errors.New("fwp/ebpf: malformed kernel event")

// DecodeEvent decodes one ring buffer record.
func DecodeEvent(b []byte) (Event, error) {
	var r rawEvent
	if len(b) < rawEventSize {
		return Event{}, fmt.Errorf("%w: %d bytes, want %d", ErrBadEvent, len(b), rawEventSize)
	}
	if err := binary.Read(bytes.NewReader(b[:rawEventSize]), binary.LittleEndian, &r); err != nil {
		return Event{}, fmt.Errorf("%w: %v", ErrBadEvent, err)
	}
	if r.Type != uint8(EventDrop) && r.Type != uint8(EventRedirect) {
		return Event{}, fmt.Errorf("%w: type %d", ErrBadEvent, r.Type)
	}
	if int(r.Slot) >= numSlots {
		return Event{}, fmt.Errorf("%w: layer slot %d", ErrBadEvent, r.Slot)
	}
	e := Event{
		Type: EventType(r.Type), Layer: engine.LayerFor(kernelKinds[r.Slot/2], r.Slot%2 == 1), Filter: engine.FilterID(r.FilterID),
		Protocol: r.Proto, Remote: netip.AddrPortFrom(addrOf(r.RAddr, r.V6), r.RPort),
		PID: r.PID, UID: r.UID, GID: r.GID, CgroupID: r.CgroupID, Comm: string(r.Comm[:]),
	}
	if i := bytes.IndexByte(r.Comm[:], 0); i >= 0 {
		e.Comm = string(r.Comm[:i])
	}
	if r.HasLAddr != 0 {
		e.Local = netip.AddrPortFrom(addrOf(r.LAddr, r.V6), r.LPort)
	}
	if e.Type == EventRedirect {
		e.Proxy = netip.AddrPortFrom(addrOf(r.ProxyAddr, r.ProxyV6), r.ProxyPort)
	}
	return e, nil
}

// ReadEvents calls fn with every event the hooks report until ctx ends
// or the datapath closes. Events the reader could not keep up with are
// lost in the kernel (the hooks never wait).
func (d *Datapath) ReadEvents(ctx context.Context, fn func(Event)) error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return ErrClosed
	}
	rd, err := ringbuf.NewReader(d.objs.FwpEvents)
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%w: event ring buffer: %v", ErrUnavailable, err)
	}
	// The reader is closed when ctx ends (that interrupts a waiting
	// Read); AvailableBytes reads the ring without the reader's lock, so
	// it and that Close exclude each other here, and it is not called
	// once ctx has ended (a closed reader has no ring: a nil dereference).
	var closeMu sync.Mutex
	stop := context.AfterFunc(ctx, func() {
		closeMu.Lock()
		defer closeMu.Unlock()
		rd.Close()
	})
	defer stop()
	defer rd.Close()
	caughtUp := func() (yes, done bool) {
		closeMu.Lock()
		defer closeMu.Unlock()
		if ctx.Err() != nil {
			return false, true
		}
		return rd.AvailableBytes() == 0, false
	}
	for {
		rec, err := rd.Read()
		if err != nil {
			if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, os.ErrClosed) {
				return nil
			}
			return fmt.Errorf("read events: %w", err)
		}
		ev, err := DecodeEvent(rec.RawSample)
		if err != nil {
			continue // cannot happen with our programs; never stop reading
		}
		fn(ev)
		yes, done := caughtUp()
		if done {
			return nil
		}
		if yes {
			// Caught up: let events gather before waiting again. A hook
			// wakes the reader only for the first record after it caught
			// up, so a reader back in epoll at once is woken (a futex
			// and two context switches) for every redirected connection:
			// on a busy proxy host that was ~75 µs of CPU per connection.
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(EventBatchDelay):
			}
		}
	}
}

// EventBatchDelay is how long ReadEvents lets kernel events gather after
// it has read them all: events reach fn up to this much later, and a host
// redirecting thousands of connections a second costs the reader tens of
// wakeups a second, not thousands.
var EventBatchDelay = 20 * time.Millisecond

// FilterHits returns how many classifications each filter decided in the
// kernel (summed over CPUs) since it was installed.
func (d *Datapath) FilterHits() (map[engine.FilterID]uint64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrClosed
	}
	out := map[engine.FilterID]uint64{}
	var id uint64
	var perCPU []uint64
	it := d.objs.FwpHits.Iterate()
	for it.Next(&id, &perCPU) {
		var n uint64
		for _, c := range perCPU {
			n += c
		}
		out[engine.FilterID(id)] = n
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read filter counters: %w", err)
	}
	return out, nil
}

// ClassifyCounts returns the hooks' classifications by layer and outcome
// (summed over CPUs) since the datapath was loaded, or since the pinned
// datapath it adopted was: fwpd adds them to the engine's own counts.
func (d *Datapath) ClassifyCounts() ([]engine.ClassifyCount, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrClosed
	}
	out := make([]engine.ClassifyCount, 0, len(kernelKinds)*2)
	var perCPU []uint64
	sum := func(k uint32) (uint64, error) {
		if err := d.objs.FwpCounts.Lookup(k, &perCPU); err != nil {
			return 0, fmt.Errorf("read classification counters: %w", err)
		}
		var n uint64
		for _, c := range perCPU {
			n += c
		}
		return n, nil
	}
	for slot := range uint32(len(kernelKinds) * 2) {
		permit, err := sum(slot * 2)
		if err != nil {
			return nil, err
		}
		block, err := sum(slot*2 + 1)
		if err != nil {
			return nil, err
		}
		out = append(out, engine.ClassifyCount{Layer: engine.LayerFor(kernelKinds[slot/2], slot%2 == 1), Permit: permit, Block: block})
	}
	return out, nil
}

// pruneHits drops the counters of filters no longer installed; d.mu held.
func (d *Datapath) pruneHits(p *Policy) {
	// The counters (few) are checked against the policy's filters (up
	// to millions, in collapsed runs): a set of the counters, not of
	// the filters.
	var id uint64
	var perCPU []uint64
	counted := map[uint64]bool{}
	it := d.objs.FwpHits.Iterate()
	for it.Next(&id, &perCPU) {
		counted[id] = false
	}
	if len(counted) == 0 {
		return
	}
	for _, lp := range p.layers {
		if lp != nil {
			for _, id := range lp.live {
				if _, ok := counted[id]; ok {
					counted[id] = true
				}
			}
		}
	}
	for id, live := range counted {
		if !live {
			_ = d.objs.FwpHits.Delete(id)
		}
	}
}

// ProcessPaths resolves a process's executable path once per process and
// caches it: events carry the pid and comm captured in the hook, and
// /proc is read only for a pid not seen before.
type ProcessPaths struct {
	mu    sync.Mutex
	paths map[procKey]string
}

type procKey struct {
	pid  uint32
	comm string // a reused pid most likely runs another program
}

// maxProcPaths bounds the cache; it is emptied when full.
const maxProcPaths = 4096

// Path returns the executable of the process, or its comm in brackets
// when it is gone or cannot be read.
func (c *ProcessPaths) Path(pid uint32, comm string) string {
	k := procKey{pid, comm}
	c.mu.Lock()
	defer c.mu.Unlock()
	if p, ok := c.paths[k]; ok {
		return p
	}
	p, err := os.Readlink("/proc/" + strconv.FormatUint(uint64(pid), 10) + "/exe")
	if err != nil {
		p = "[" + comm + "]"
	}
	if c.paths == nil || len(c.paths) >= maxProcPaths {
		c.paths = map[procKey]string{}
	}
	c.paths[k] = p
	return p
}
