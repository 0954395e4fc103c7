package mgmt

import (
	"fmt"
	"sync/atomic"

	"fwp/engine"
)

// ChangeType says what happened to an object.
type ChangeType uint8

const (
	ChangeAdd ChangeType = iota + 1
	ChangeDelete
)

func (c ChangeType) String() string {
	if c == ChangeAdd {
		return "add"
	}
	return "delete"
}

// MarshalText renders the change type by name.
func (c ChangeType) MarshalText() ([]byte, error) { return []byte(c.String()), nil }

// Change is one committed change (WFP's FWPM_*_CHANGE0).
type Change struct {
	Kind    Kind       `json:"kind"`
	Type    ChangeType `json:"type"`
	Key     string     `json:"key"`
	ID      uint64     `json:"id"`
	Session uint64     `json:"session"` // the session that made it
}

// Subscription receives the committed changes of some kinds made by other
// sessions. A subscriber that falls behind loses changes (Lost counts
// them) rather than slowing commits.
type Subscription struct {
	C       <-chan Change
	c       chan Change
	session uint64
	kinds   uint32
	lost    atomic.Uint64
	closed  bool
	m       *Manager
}

// Lost reports how many changes did not fit the channel.
func (s *Subscription) Lost() uint64 { return s.lost.Load() }

// Close ends the subscription and closes C.
func (s *Subscription) Close() {
	s.m.mu.Lock()
	defer s.m.mu.Unlock()
	s.closeLocked()
}

func (s *Subscription) closeLocked() {
	if !s.closed {
		s.closed = true
		delete(s.m.subs, s)
		close(s.c)
	}
}

// Subscription limits: a session's subscriptions each hold a channel, so
// that a client cannot grow the daemon without bound.
const (
	MaxSubscriptions      = 64      // per session
	MaxSubscriptionBuffer = 1 << 16 // changes held per subscription
)

// Subscribe subscribes session sid to changes of the given kinds (all when
// none), not counting its own. It ends when the session closes. A session
// has at most MaxSubscriptions (ErrTooLarge); buffer is capped at
// MaxSubscriptionBuffer.
func (m *Manager) Subscribe(sid uint64, kinds []Kind, buffer int) (*Subscription, error) {
	var mask uint32
	for _, k := range kinds {
		if k == 0 || k >= numKinds {
			return nil, fmt.Errorf("%w: unknown object kind %d", engine.ErrInvalidArgument, k)
		}
		mask |= 1 << k
	}
	if mask == 0 {
		mask = ^uint32(0)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	// Checked under m.mu, which CloseSession holds while it ends the
	// session's subscriptions: none is added after that, to leak.
	if m.sessions[sid] == nil {
		return nil, fmt.Errorf("%w: #%d", ErrSessionNotFound, sid)
	}
	n := 0
	for s := range m.subs {
		if s.session == sid {
			n++
		}
	}
	if n >= MaxSubscriptions {
		return nil, fmt.Errorf("%w: session #%d already has %d subscriptions", ErrTooLarge, sid, n)
	}
	c := make(chan Change, min(max(buffer, 1), MaxSubscriptionBuffer))
	s := &Subscription{C: c, c: c, session: sid, kinds: mask, m: m}
	m.subs[s] = struct{}{}
	return s, nil
}

// publishLocked sends a commit's changes, made by session sid, to the
// subscribers: one per overlay entry, in order.
func (m *Manager) publishLocked(sid uint64, ov *overlay) {
	if ov.len() == 0 || len(m.subs) == 0 {
		return
	}
	for s := range m.subs {
		if s.session == sid {
			continue // a session is not told of its own changes
		}
		for e := range ov.entries() {
			if s.kinds&(1<<e.k.kind) == 0 {
				continue
			}
			c := Change{Kind: e.k.kind, Key: e.k.key, ID: e.id, Session: sid, Type: ChangeDelete}
			if e.hasMeta {
				c.Type = ChangeAdd
			}
			select {
			case s.c <- c:
			default:
				s.lost.Add(1)
			}
		}
	}
}
