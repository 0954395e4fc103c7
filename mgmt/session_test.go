package mgmt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"fwp/engine"
)

// waitHolding waits until session sid is inside a call (holds its mutex).
func waitHolding(t *testing.T, m *Manager, sid uint64) {
	t.Helper()
	s, err := m.session(sid)
	if err != nil {
		t.Fatal(err)
	}
	for s.mu.TryLock() {
		s.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
}

// Listing sessions must not wait for a session that waits for the
// transaction lock: that is when a person runs `fwpctl sessions` to see
// who holds it.
func TestSessionsNotBlockedByLockWait(t *testing.T) {
	m, err := New(engine.New(engine.Options{}), Options{TxnTimeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ctx := context.Background()
	a := m.OpenSession(SessionInfo{Name: "holder", PID: 77}).ID
	b := open(m, "waiter", false)
	if err := m.Begin(ctx, a); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { _, err := m.Add(ctx, b, blockPort("fb", 1, 0)); waited <- err }()
	waitHolding(t, m, b)
	listed := make(chan []SessionInfo, 1)
	go func() { listed <- m.Sessions() }()
	select {
	case ss := <-listed:
		if len(ss) != 2 || !ss[0].InTransaction || ss[1].InTransaction {
			t.Fatalf("sessions: %+v", ss)
		}
	case <-time.After(10 * time.Second): // a hang detector, not a latency bound
		t.Fatal("Sessions blocked behind a session waiting for the transaction lock")
	}
	if info, err := m.Session(b); err != nil || info.Name != "waiter" {
		t.Fatalf("Session: %+v %v", info, err)
	}
	if err := m.Commit(a); err != nil {
		t.Fatal(err)
	}
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
}

// A lock-wait timeout says which session holds the lock.
func TestLockTimeoutNamesHolder(t *testing.T) {
	m := newManager(t, "")
	ctx := context.Background()
	a := m.OpenSession(SessionInfo{Name: "slow-vpn", PID: 4242}).ID
	b := open(m, "b", false)
	if err := m.Begin(ctx, a); err != nil {
		t.Fatal(err)
	}
	_, err := m.Add(ctx, b, blockPort("fb", 1, 0))
	want := fmt.Sprintf(`session #%d "slow-vpn", pid 4242`, a)
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), want) {
		t.Fatalf("want ErrTimeout naming %s, got %v", want, err)
	}
	// After the holder aborts, nobody is named.
	if err := m.Abort(a); err != nil {
		t.Fatal(err)
	}
	if h := m.holder.Load(); h != nil {
		t.Fatalf("holder after abort: %+v", h.info)
	}
	if _, err := m.Add(ctx, b, blockPort("fb", 1, 0)); err != nil {
		t.Fatal(err)
	}
	if h := m.holder.Load(); h != nil {
		t.Fatalf("holder after commit: %+v", h.info)
	}
}

func TestSubscribeLimits(t *testing.T) {
	m := newManager(t, "")
	a := open(m, "a", false)
	if _, err := m.Subscribe(a, []Kind{Kind(0)}, 1); !errors.Is(err, engine.ErrInvalidArgument) {
		t.Fatalf("kind 0: %v", err)
	}
	if _, err := m.Subscribe(a, []Kind{numKinds}, 1); !errors.Is(err, engine.ErrInvalidArgument) {
		t.Fatalf("unknown kind: %v", err)
	}
	// A huge buffer request is capped, not allocated.
	big, err := m.Subscribe(a, nil, 1<<40)
	if err != nil || cap(big.C) != MaxSubscriptionBuffer {
		t.Fatalf("buffer: %v %d", err, cap(big.C))
	}
	for range MaxSubscriptions - 1 {
		if _, err := m.Subscribe(a, nil, 1); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.Subscribe(a, nil, 1); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("subscription %d: %v", MaxSubscriptions+1, err)
	}
	// Closing one makes room.
	big.Close()
	if _, err := m.Subscribe(a, nil, 1); err != nil {
		t.Fatal(err)
	}
	m.CloseSession(a)
	if _, err := m.Subscribe(a, nil, 1); !errors.Is(err, ErrSessionNotFound) {
		t.Fatalf("closed session: %v", err)
	}
	if len(m.subs) != 0 {
		t.Fatalf("%d subscriptions left after the session closed", len(m.subs))
	}
}

// A subscription made while its session closes is either refused or
// ended with the session, never left open.
func TestSubscribeRacingClose(t *testing.T) {
	m := newManager(t, "")
	for range 500 {
		sid := open(m, "s", false)
		var wg sync.WaitGroup
		start := make(chan struct{})
		subs := make(chan *Subscription, 8)
		for range 8 {
			wg.Go(func() {
				<-start
				if s, err := m.Subscribe(sid, nil, 1); err == nil {
					subs <- s
				} else if !errors.Is(err, ErrSessionNotFound) {
					t.Error(err)
				}
			})
		}
		close(start)
		m.CloseSession(sid)
		wg.Wait()
		close(subs)
		for s := range subs {
			if _, open := <-s.C; open {
				t.Fatal("subscription delivered after close")
			}
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.subs) != 0 {
		t.Fatalf("%d subscriptions leaked", len(m.subs))
	}
}

// Every object kind's adds and deletes reach other sessions' subscribers,
// not the session that made them.
func TestSubscriptionsEveryKind(t *testing.T) {
	m := newManager(t, "")
	ctx := context.Background()
	a, b := open(m, "a", false), open(m, "b", false)
	subA, err := m.Subscribe(a, nil, 64)
	if err != nil {
		t.Fatal(err)
	}
	subB, err := m.Subscribe(b, nil, 64)
	if err != nil {
		t.Fatal(err)
	}
	objs := []Object{
		{Provider: &Provider{Key: "p"}},
		{ProviderContext: &ProviderContext{Key: "pc", Provider: "p", Data: []byte("x")}},
		{Sublayer: &Sublayer{Key: "sl", Provider: "p", Weight: 3}},
		{Callout: &Callout{Key: "co", Provider: "p", Layer: "ALE_AUTH_CONNECT_V4"}},
		{Filter: &Filter{Key: "f", Layer: "ALE_AUTH_CONNECT_V4", Sublayer: "sl", Action: "callout_terminating", Callout: "co", ProviderContext: "pc"}},
	}
	var ops []Op
	for i := range objs {
		ops = append(ops, Op{Add: &objs[i]})
	}
	for i := len(objs) - 1; i >= 0; i-- {
		ops = append(ops, Op{Delete: &Ref{Kind: objs[i].Kind(), Key: objs[i].Key()}})
	}
	if _, err := m.Apply(ctx, a, ops); err != nil {
		t.Fatal(err)
	}
	m.CloseSession(a)
	m.CloseSession(b)
	if c, ok := <-subA.C; ok {
		t.Fatalf("own change delivered: %+v", c)
	}
	var got []string
	for c := range subB.C {
		if c.Session != a {
			t.Fatalf("change of session %d", c.Session)
		}
		got = append(got, c.Type.String()+" "+c.Kind.String())
	}
	want := "add provider,add provider_context,add sublayer,add callout,add filter," +
		"delete filter,delete callout,delete sublayer,delete provider_context,delete provider"
	if strings.Join(got, ",") != want {
		t.Fatalf("changes:\n got %s\nwant %s", strings.Join(got, ","), want)
	}
}

// The store syncs the directories whose entries a commit depends on: the
// parents of a state directory it creates, and the state directory after
// each rename (the new journal at open); a commit is an append, synced
// itself, with no directory entry to sync.
func TestStoreSyncsDirectories(t *testing.T) {
	var synced []string
	orig := syncDir
	syncDir = func(d string) error { synced = append(synced, d); return orig(d) }
	t.Cleanup(func() { syncDir = orig })
	appends := 0
	origSync := fdatasync
	fdatasync = func(f *os.File) error { appends++; return origSync(f) }
	t.Cleanup(func() { fdatasync = origSync })
	root := t.TempDir()
	dir := filepath.Join(root, "a", "b")
	m := newManager(t, dir)
	if want := []string{filepath.Join(root, "a"), root, dir}; !slices.Equal(synced, want) {
		t.Fatalf("at open: synced %q, want %q", synced, want)
	}
	synced = nil
	s := open(m, "s", false)
	if _, err := m.Add(context.Background(), s, blockPort("p", 1, LifetimePersistent)); err != nil {
		t.Fatal(err)
	}
	if len(synced) != 0 || appends != 1 {
		t.Fatalf("at commit: synced %q, %d appends synced", synced, appends)
	}
	// An existing store is not synced again at open.
	m.Close()
	synced = nil
	newManager(t, dir)
	if len(synced) != 0 {
		t.Fatalf("reopen synced %q", synced)
	}
}

// After a restart, boot-time objects live only in the store, where the
// engine cannot see their references: deleting a referenced one must
// still fail, or the next boot would load a filter without its sublayer.
func TestDeleteReferencedStoredBootTime(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	m := newManager(t, dir)
	s := open(m, "a", false)
	f := blockPort("bf", 1, LifetimeBootTime)
	f.Filter.Sublayer = "bs"
	for _, o := range []Object{{Provider: &Provider{Key: "bp", Lifetime: LifetimeBootTime}},
		{Sublayer: &Sublayer{Key: "bs", Provider: "bp", Weight: 1, Lifetime: LifetimeBootTime}}, f} {
		if _, err := m.Add(ctx, s, o); err != nil {
			t.Fatal(err)
		}
	}
	m.Close()
	m = newManager(t, dir)
	s = open(m, "a", false)
	if err := m.Delete(ctx, s, Ref{Kind: KindSublayer, Key: "bs"}); !errors.Is(err, engine.ErrInUse) || !strings.Contains(err.Error(), `filter "bf"`) {
		t.Fatalf("delete a referenced stored boot-time sublayer: %v", err)
	}
	if err := m.Delete(ctx, s, Ref{Kind: KindProvider, Key: "bp"}); !errors.Is(err, engine.ErrInUse) {
		t.Fatalf("delete a referenced stored boot-time provider: %v", err)
	}
	// Referrers first, in one batch, is fine.
	if _, err := m.Apply(ctx, s, []Op{{Delete: &Ref{Kind: KindFilter, Key: "bf"}}, {Delete: &Ref{Kind: KindSublayer, Key: "bs"}},
		{Delete: &Ref{Kind: KindProvider, Key: "bp"}}}); err != nil {
		t.Fatal(err)
	}
	m.Close()
	if m = newManager(t, dir); len(m.stored) != 0 {
		t.Fatalf("left in the store: %v", m.stored)
	}
}
