package mgmt

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"fwp/engine"
)

// DefaultTxnTimeout is how long a write waits for another session's
// transaction before failing with ErrTimeout.
const DefaultTxnTimeout = 15 * time.Second

// Options configure a Manager.
type Options struct {
	// StateDir holds the persistent store; "" keeps persistent and
	// boot-time objects in memory only.
	StateDir string
	// TxnTimeout bounds the wait for the transaction lock (default 15 s).
	TxnTimeout time.Duration
	Logger     *slog.Logger
	// OnCommit, when set, is told each commit's duration (for metrics).
	OnCommit func(time.Duration)
	// BeforeCommit, when set, sees the state a transaction is about to
	// commit and may refuse it (the kernel datapath installs the policy
	// here, so a policy it cannot enforce is never committed). On error
	// the transaction aborts; if the store write then fails, it is called
	// again with the state still in force.
	BeforeCommit func(engine.View) error
}

// SessionInfo describes a session. PID, UID and GID are the client's as
// the kernel reported them (SO_PEERCRED), not as the client claimed.
type SessionInfo struct {
	ID            uint64    `json:"id"`
	PID           uint32    `json:"pid"`
	UID           uint32    `json:"uid"`
	GID           uint32    `json:"gid"`
	Name          string    `json:"name"`
	Dynamic       bool      `json:"dynamic"`
	OpenedAt      time.Time `json:"opened_at"`
	Admin         bool      `json:"admin"`
	InTransaction bool      `json:"in_transaction"`
}

type session struct {
	info SessionInfo
	// mu serializes the session's calls; a session has at most one txn.
	mu     sync.Mutex
	txn    *txn
	closed bool
	// inTxn mirrors txn != nil for describe, which must not wait for mu:
	// a call of the session may hold mu for the whole lock wait.
	inTxn atomic.Bool
}

// setTxn sets the session's explicit transaction (nil: none); s.mu held.
func (s *session) setTxn(t *txn) {
	s.txn = t
	s.inTxn.Store(t != nil)
}

type objKey struct {
	kind Kind
	key  string
}

type objMeta struct {
	session  uint64
	lifetime Lifetime
}

// Manager is the management plane over one engine. Methods are safe for
// concurrent use.
type Manager struct {
	eng   *engine.Engine
	opts  Options
	log   *slog.Logger
	store *store

	nextSession atomic.Uint64
	// holder is the session whose transaction holds the engine's lock,
	// named in lock-wait timeouts so that a person knows whom to wait for.
	holder atomic.Pointer[session]

	// mu guards the maps below. meta and stored change only at commit,
	// by the holder of the engine's transaction lock.
	mu       sync.Mutex
	sessions map[uint64]*session
	meta     map[objKey]objMeta // owner and lifetime of every managed object
	stored   map[objKey]Object  // persistent and boot-time objects, as stored
	subs     map[*Subscription]struct{}
}

// New returns a manager over eng. With a state directory it loads the
// store: boot-time objects first, then, in one more commit, the persistent
// policy in their place.
func New(eng *engine.Engine, opts Options) (*Manager, error) {
	if opts.TxnTimeout <= 0 {
		opts.TxnTimeout = DefaultTxnTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	m := &Manager{
		eng: eng, opts: opts, log: opts.Logger,
		sessions: map[uint64]*session{},
		meta:     map[objKey]objMeta{},
		stored:   map[objKey]Object{},
		subs:     map[*Subscription]struct{}{},
	}
	if opts.StateDir != "" {
		st, objs, err := openStore(opts.StateDir)
		if err != nil {
			return nil, err
		}
		m.store = st
		m.stored = objs
		if err := m.load(); err != nil {
			st.close()
			return nil, err
		}
	}
	return m, nil
}

// Engine returns the managed engine.
func (m *Manager) Engine() *engine.Engine { return m.eng }

// daemon is the session that loads the store; it owns nothing dynamic.
var daemon = &session{info: SessionInfo{Name: "fwpd"}}

// load applies the stored boot-time objects, then replaces them with the
// persistent ones in a second atomic commit, so that no moment is without
// policy.
func (m *Manager) load() error {
	var boot, pers []Object
	for _, k := range sortedKeys(m.stored) {
		o := m.stored[k]
		if o.lifetime() == LifetimeBootTime {
			boot = append(boot, o)
		} else {
			pers = append(pers, o)
		}
	}
	t, err := m.begin(context.Background(), daemon)
	if err != nil {
		return err
	}
	t.loading = true
	var loaded []Ref
	for _, o := range boot {
		if r, err := t.add(o); err != nil {
			m.log.Error("boot-time object not loaded", "kind", o.Kind(), "key", o.Key(), "err", err)
		} else {
			loaded = append(loaded, r)
		}
	}
	if err := t.commit(); err != nil {
		return err
	}
	if t, err = m.begin(context.Background(), daemon); err != nil {
		return err
	}
	t.loading = true
	for _, r := range slices.Backward(loaded) {
		if _, err := t.delete(r); err != nil {
			m.log.Error("boot-time object not unloaded", "ref", r, "err", err)
		}
	}
	n := 0
	for _, o := range pers {
		if _, err := t.add(o); err != nil {
			m.log.Error("persistent object not loaded", "kind", o.Kind(), "key", o.Key(), "err", err)
		} else {
			n++
		}
	}
	if err := t.commit(); err != nil {
		return err
	}
	m.log.Info("store loaded", "dir", m.opts.StateDir, "boot_time", len(boot), "persistent", n)
	return nil
}

// sortedKeys orders objects so that referenced kinds come first, then by
// key. Keys are sorted per kind as strings (a million filters: a sort
// without a comparison function).
func sortedKeys[V any](objs map[objKey]V) []objKey {
	var byKind [numKinds][]string
	for k := range objs {
		if k.kind >= numKinds {
			return sortedKeysFunc(objs)
		}
		byKind[k.kind] = append(byKind[k.kind], k.key)
	}
	out := make([]objKey, 0, len(objs))
	for kind, keys := range byKind {
		slices.Sort(keys)
		for _, key := range keys {
			out = append(out, objKey{Kind(kind), key})
		}
	}
	return out
}

func sortedKeysFunc[V any](objs map[objKey]V) []objKey {
	keys := slices.Collect(maps.Keys(objs))
	slices.SortFunc(keys, func(a, b objKey) int {
		if a.kind != b.kind {
			return int(a.kind) - int(b.kind)
		}
		return strings.Compare(a.key, b.key)
	})
	return keys
}

// OpenSession opens a session and returns it with its ID.
func (m *Manager) OpenSession(info SessionInfo) SessionInfo {
	info.ID = m.nextSession.Add(1)
	info.OpenedAt = time.Now()
	info.InTransaction = false
	m.mu.Lock()
	m.sessions[info.ID] = &session{info: info}
	m.mu.Unlock()
	m.log.Info("session opened", "session", info.ID, "name", info.Name, "pid", info.PID, "uid", info.UID, "dynamic", info.Dynamic)
	return info
}

func (m *Manager) session(id uint64) (*session, error) {
	m.mu.Lock()
	s := m.sessions[id]
	m.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("%w: #%d", ErrSessionNotFound, id)
	}
	return s, nil
}

// lock returns the session, locked and open.
func (m *Manager) lock(id uint64) (*session, error) {
	s, err := m.session(id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: #%d is closed", ErrSessionNotFound, id)
	}
	return s, nil
}

// Session returns a session's description.
func (m *Manager) Session(id uint64) (SessionInfo, error) {
	s, err := m.session(id)
	if err != nil {
		return SessionInfo{}, err
	}
	return s.describe(), nil
}

func (s *session) describe() SessionInfo {
	i := s.info
	i.InTransaction = s.inTxn.Load()
	return i
}

// Sessions lists the open sessions by ID.
func (m *Manager) Sessions() []SessionInfo {
	m.mu.Lock()
	ss := slices.Collect(maps.Values(m.sessions))
	m.mu.Unlock()
	out := make([]SessionInfo, 0, len(ss))
	for _, s := range ss {
		out = append(out, s.describe())
	}
	slices.SortFunc(out, func(a, b SessionInfo) int { return int(a.ID) - int(b.ID) })
	return out
}

// CloseSession aborts the session's transaction, deletes its dynamic
// objects and ends its subscriptions. Closing a closed session is a no-op.
func (m *Manager) CloseSession(id uint64) error {
	s, err := m.session(id)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.txn != nil {
		s.txn.abort()
		s.setTxn(nil)
	}
	n := m.deleteDynamic(s)
	m.mu.Lock()
	delete(m.sessions, id)
	for sub := range m.subs {
		if sub.session == id {
			sub.closeLocked()
		}
	}
	m.mu.Unlock()
	m.log.Info("session closed", "session", id, "dynamic_deleted", n)
	return nil
}

// deleteDynamic deletes the session's dynamic objects, referencing kinds
// first, waiting for the transaction lock as long as it takes.
func (m *Manager) deleteDynamic(s *session) int {
	m.mu.Lock()
	var mine []objKey
	for k, v := range m.meta {
		if v.session == s.info.ID && v.lifetime == LifetimeDynamic {
			mine = append(mine, k)
		}
	}
	m.mu.Unlock()
	if len(mine) == 0 {
		return 0
	}
	var t *txn
	for {
		var err error
		if t, err = m.begin(context.Background(), s); err == nil {
			break
		}
		m.log.Warn("session cleanup waits for the transaction lock", "session", s.info.ID, "err", err)
	}
	slices.SortFunc(mine, func(a, b objKey) int { return int(b.kind) - int(a.kind) })
	n := 0
	for _, k := range mine {
		if _, err := t.delete(Ref{Kind: k.kind, Key: k.key}); err != nil {
			m.log.Error("dynamic object not deleted", "session", s.info.ID, "kind", k.kind, "key", k.key, "err", err)
			continue
		}
		n++
	}
	if err := t.commit(); err != nil {
		m.log.Error("session cleanup commit failed", "session", s.info.ID, "err", err)
	}
	return n
}

// Close aborts every open transaction and releases the store; the daemon
// calls it on exit. Static and dynamic objects die with the process; the
// store is always consistent, so there is nothing to flush.
func (m *Manager) Close() {
	defer m.store.close()
	m.mu.Lock()
	ss := slices.Collect(maps.Values(m.sessions))
	m.mu.Unlock()
	for _, s := range ss {
		s.mu.Lock()
		if s.txn != nil {
			s.txn.abort()
			s.setTxn(nil)
		}
		s.mu.Unlock()
	}
}

// begin opens an engine transaction for s, waiting for the lock at most
// the configured timeout.
func (m *Manager) begin(ctx context.Context, s *session) (*txn, error) {
	wctx, cancel := context.WithTimeout(ctx, m.opts.TxnTimeout)
	defer cancel()
	tx, err := m.eng.Begin(wctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w: %w", err, ctx.Err())
		}
		by := ""
		if h := m.holder.Load(); h != nil {
			by = fmt.Sprintf(" (held by session #%d %q, pid %d; see fwpctl sessions)", h.info.ID, h.info.Name, h.info.PID)
		}
		return nil, fmt.Errorf("%w after %s%s: %w", ErrTimeout, m.opts.TxnTimeout, by, err)
	}
	m.holder.Store(s)
	return &txn{m: m, s: s, tx: tx}, nil
}

// Begin opens the session's explicit transaction.
func (m *Manager) Begin(ctx context.Context, sid uint64) error {
	s, err := m.lock(sid)
	if err != nil {
		return err
	}
	defer s.mu.Unlock()
	if s.txn != nil {
		return fmt.Errorf("%w: session #%d already has one", engine.ErrTxnInProgress, sid)
	}
	t, err := m.begin(ctx, s)
	if err != nil {
		return err
	}
	s.setTxn(t)
	return nil
}

// Commit commits the session's transaction: one store write, then one
// atomic engine swap.
func (m *Manager) Commit(sid uint64) error { return m.endTxn(sid, (*txn).commit) }

// Abort discards the session's transaction.
func (m *Manager) Abort(sid uint64) error {
	return m.endTxn(sid, func(t *txn) error { t.abort(); return nil })
}

// endTxn ends the session's explicit transaction with end.
func (m *Manager) endTxn(sid uint64, end func(*txn) error) error {
	s, err := m.lock(sid)
	if err != nil {
		return err
	}
	defer s.mu.Unlock()
	if s.txn == nil {
		return fmt.Errorf("%w: session #%d has no open transaction (begin one first)", engine.ErrNoTxnInProgress, sid)
	}
	t := s.txn
	s.setTxn(nil)
	return end(t)
}

// ApplyResult lists what Apply added and deleted.
type ApplyResult struct {
	Added   []Ref `json:"added"`
	Deleted []Ref `json:"deleted"`
	// Warnings: what was applied but is likely a mistake (see Warnings).
	Warnings []string `json:"warnings,omitempty"`
}

// Apply runs ops in order as one unit: in the session's transaction when
// it has one (a failure undoes the ops and leaves the transaction usable),
// otherwise in an implicit transaction committed at the end.
func (m *Manager) Apply(ctx context.Context, sid uint64, ops []Op) (ApplyResult, error) {
	s, err := m.lock(sid)
	if err != nil {
		return ApplyResult{}, err
	}
	defer s.mu.Unlock()
	if s.txn != nil {
		res, err := s.txn.apply(ops, len(ops) > 1)
		if err == nil {
			res.Warnings = Warnings(ops)
		}
		return res, err
	}
	t, err := m.begin(ctx, s)
	if err != nil {
		return ApplyResult{}, err
	}
	res, err := t.apply(ops, false)
	if err != nil {
		t.abort()
		return ApplyResult{}, err
	}
	if err := t.commit(); err != nil {
		return ApplyResult{}, err
	}
	res.Warnings = Warnings(ops)
	return res, nil
}

// Add adds one object and returns its reference (with the engine's ID).
func (m *Manager) Add(ctx context.Context, sid uint64, o Object) (Ref, error) {
	res, err := m.Apply(ctx, sid, []Op{{Add: &o}})
	if err != nil {
		return Ref{}, err
	}
	return res.Added[0], nil
}

// Delete deletes one object.
func (m *Manager) Delete(ctx context.Context, sid uint64, r Ref) error {
	_, err := m.Apply(ctx, sid, []Op{{Delete: &r}})
	return err
}
