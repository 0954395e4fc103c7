package mgmt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"fwp/engine"
)

func newManager(t *testing.T, dir string) *Manager {
	t.Helper()
	m, err := New(engine.New(engine.Options{}), Options{StateDir: dir, TxnTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

func open(m *Manager, name string, dynamic bool) uint64 {
	return m.OpenSession(SessionInfo{Name: name, Dynamic: dynamic, PID: 1}).ID
}

func blockPort(key string, port int, l Lifetime) Object {
	return Object{Filter: &Filter{Key: key, Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Lifetime: l,
		Conditions: []Condition{{Field: "ip_remote_port", Match: "equal", Value: fmt.Sprint(port)}}}}
}

func decides(t *testing.T, m *Manager, port int) string {
	t.Helper()
	x, err := m.Explain("ALE_AUTH_CONNECT_V4", map[string]string{"ip_remote_port": fmt.Sprint(port)})
	if err != nil {
		t.Fatal(err)
	}
	return x.FilterKeys[x.Trace.Result.Filter]
}

func has(m *Manager, kind Kind, key string) bool {
	_, err := m.Get(0, Ref{Kind: kind, Key: key})
	return err == nil
}

func TestTxnCommitAbort(t *testing.T) {
	m := newManager(t, "")
	ctx := context.Background()
	s := open(m, "a", false)
	if err := m.Begin(ctx, s); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Add(ctx, s, blockPort("f1", 23, 0)); err != nil {
		t.Fatal(err)
	}
	// A failed call inside the transaction does not doom it.
	if _, err := m.Add(ctx, s, blockPort("f1", 24, 0)); !errors.Is(err, engine.ErrAlreadyExists) {
		t.Fatalf("duplicate key: %v", err)
	}
	// Visible to the session, not to others nor to classification.
	if _, err := m.Get(s, Ref{Kind: KindFilter, Key: "f1"}); err != nil {
		t.Fatalf("own txn read: %v", err)
	}
	if has(m, KindFilter, "f1") || decides(t, m, 23) != "" {
		t.Fatal("uncommitted filter visible")
	}
	if err := m.Commit(s); err != nil {
		t.Fatal(err)
	}
	if decides(t, m, 23) != "f1" {
		t.Fatal("committed filter does not decide")
	}
	if err := m.Begin(ctx, s); err != nil {
		t.Fatal(err)
	}
	if err := m.Delete(ctx, s, Ref{Kind: KindFilter, Key: "f1"}); err != nil {
		t.Fatal(err)
	}
	if err := m.Abort(s); err != nil {
		t.Fatal(err)
	}
	if !has(m, KindFilter, "f1") {
		t.Fatal("aborted delete took effect")
	}
	if err := m.Commit(s); !errors.Is(err, engine.ErrNoTxnInProgress) {
		t.Fatalf("commit without txn: %v", err)
	}
	if err := m.Begin(ctx, s); err != nil {
		t.Fatal(err)
	}
	if err := m.Begin(ctx, s); !errors.Is(err, engine.ErrTxnInProgress) {
		t.Fatalf("second begin: %v", err)
	}
	m.Abort(s)
}

func TestTxnLockTimeout(t *testing.T) {
	m := newManager(t, "")
	ctx := context.Background()
	a, b := open(m, "a", false), open(m, "b", false)
	if err := m.Begin(ctx, a); err != nil {
		t.Fatal(err)
	}
	// b's implicit transaction waits for a's and times out, typed.
	_, err := m.Add(ctx, b, blockPort("fb", 1, 0))
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, engine.ErrTxnInProgress) {
		t.Fatalf("want ErrTimeout, got %v", err)
	}
	if err := m.Begin(ctx, b); !errors.Is(err, ErrTimeout) {
		t.Fatalf("explicit begin: want ErrTimeout, got %v", err)
	}
	// Once a commits, b gets through.
	done := make(chan error, 1)
	go func() { _, err := m.Add(ctx, b, blockPort("fb", 1, 0)); done <- err }()
	if err := m.Commit(a); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("after commit: %v", err)
	}
}

func TestApplyAtomicInOpenTxn(t *testing.T) {
	m := newManager(t, "")
	ctx := context.Background()
	s := open(m, "a", false)
	if err := m.Begin(ctx, s); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Add(ctx, s, blockPort("keep", 1, 0)); err != nil {
		t.Fatal(err)
	}
	// The third op fails: the first two must be undone, "keep" must stay.
	_, err := m.Apply(ctx, s, []Op{
		{Add: &Object{Sublayer: &Sublayer{Key: "sl", Weight: 5}}},
		{Delete: &Ref{Kind: KindFilter, Key: "keep"}},
		{Pos: "p.yaml:9", Add: &Object{Filter: &Filter{Key: "bad", Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Sublayer: "nope"}}},
	})
	if !errors.Is(err, engine.ErrNotFound) || err.Error()[:9] != "p.yaml:9:" {
		t.Fatalf("want a positioned ErrNotFound, got %v", err)
	}
	if _, err := m.Get(s, Ref{Kind: KindSublayer, Key: "sl"}); err == nil {
		t.Fatal("sublayer of the failed batch survived")
	}
	if _, err := m.Get(s, Ref{Kind: KindFilter, Key: "keep"}); err != nil {
		t.Fatal("delete of the failed batch survived")
	}
	if err := m.Commit(s); err != nil {
		t.Fatal(err)
	}
	if !has(m, KindFilter, "keep") || has(m, KindSublayer, "sl") {
		t.Fatal("committed state wrong")
	}
}

func TestImplicitApplyAllOrNothing(t *testing.T) {
	m := newManager(t, "")
	ctx := context.Background()
	s := open(m, "a", false)
	_, err := m.Apply(ctx, s, []Op{
		{Add: ptr(blockPort("x1", 1, 0))},
		{Add: &Object{Filter: &Filter{Key: "x2", Layer: "ALE_AUTH_CONNECT_V4", Action: "block",
			Conditions: []Condition{{Field: "ip_remote_address", Value: "::1"}}}}}, // v6 on a v4 layer
	})
	if !errors.Is(err, engine.ErrInvalidValue) {
		t.Fatalf("want ErrInvalidValue, got %v", err)
	}
	if has(m, KindFilter, "x1") {
		t.Fatal("half applied")
	}
}

func ptr[T any](v T) *T { return &v }

func TestLifetimesAndReferences(t *testing.T) {
	m := newManager(t, t.TempDir())
	ctx := context.Background()
	st := open(m, "static", false)
	dyn := open(m, "dyn", true)
	other := open(m, "other", true)
	if _, err := m.Add(ctx, dyn, Object{Sublayer: &Sublayer{Key: "dsub", Weight: 1}}); err != nil {
		t.Fatal(err)
	}
	// A dynamic session cannot add anything but dynamic objects.
	if _, err := m.Add(ctx, dyn, Object{Provider: &Provider{Key: "p", Lifetime: LifetimePersistent}}); !errors.Is(err, ErrDynamicSession) {
		t.Fatalf("persistent in dynamic session: %v", err)
	}
	// Static and persistent objects may not reference a dynamic one.
	f := blockPort("sf", 1, LifetimePersistent)
	f.Filter.Sublayer = "dsub"
	if _, err := m.Add(ctx, st, f); !errors.Is(err, ErrLifetime) {
		t.Fatalf("persistent → dynamic: %v", err)
	}
	// Nor may another session's dynamic objects.
	f = blockPort("of", 1, 0)
	f.Filter.Sublayer = "dsub"
	if _, err := m.Add(ctx, other, f); !errors.Is(err, ErrLifetime) {
		t.Fatalf("other session's dynamic: %v", err)
	}
	// Static → persistent is fine; persistent → static is not.
	if _, err := m.Add(ctx, st, Object{Provider: &Provider{Key: "pp", Lifetime: LifetimePersistent}}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Add(ctx, st, Object{Sublayer: &Sublayer{Key: "ssub", Provider: "pp"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Add(ctx, st, Object{Filter: &Filter{Key: "pf", Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Sublayer: "ssub", Lifetime: LifetimePersistent}}); !errors.Is(err, ErrLifetime) {
		t.Fatalf("persistent → static: %v", err)
	}
	// Boot-time objects reference only boot-time objects.
	if _, err := m.Add(ctx, st, Object{Sublayer: &Sublayer{Key: "bsub", Provider: "pp", Lifetime: LifetimeBootTime}}); !errors.Is(err, ErrLifetime) {
		t.Fatalf("boot-time → persistent: %v", err)
	}
	// Deleting a referenced object fails.
	if err := m.Delete(ctx, st, Ref{Kind: KindProvider, Key: "pp"}); !errors.Is(err, engine.ErrInUse) {
		t.Fatalf("delete referenced: %v", err)
	}
	// The dynamic session's filter referencing its own sublayer is fine,
	// and closing the session deletes both.
	f = blockPort("df", 7, 0)
	f.Filter.Sublayer = "dsub"
	if _, err := m.Add(ctx, dyn, f); err != nil {
		t.Fatal(err)
	}
	if err := m.CloseSession(dyn); err != nil {
		t.Fatal(err)
	}
	if has(m, KindFilter, "df") || has(m, KindSublayer, "dsub") {
		t.Fatal("dynamic objects survived their session")
	}
	if _, err := m.Add(ctx, dyn, blockPort("late", 1, 0)); !errors.Is(err, ErrSessionNotFound) {
		t.Fatalf("closed session: %v", err)
	}
}

func TestCloseSessionAbortsTxn(t *testing.T) {
	m := newManager(t, "")
	ctx := context.Background()
	a, b := open(m, "a", true), open(m, "b", false)
	if err := m.Begin(ctx, a); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Add(ctx, a, blockPort("pending", 1, 0)); err != nil {
		t.Fatal(err)
	}
	m.CloseSession(a)
	// The lock is free again and nothing of a's transaction was applied.
	if _, err := m.Add(ctx, b, blockPort("b", 2, 0)); err != nil {
		t.Fatal(err)
	}
	if has(m, KindFilter, "pending") {
		t.Fatal("closed session's transaction applied")
	}
}

func TestPersistenceAndBootTime(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	m, err := New(engine.New(engine.Options{}), Options{StateDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	s := open(m, "a", false)
	for _, o := range []Object{
		{Provider: &Provider{Key: "p", Lifetime: LifetimePersistent}},
		{Sublayer: &Sublayer{Key: "sub", Provider: "p", Weight: 9, Lifetime: LifetimePersistent}},
		{ProviderContext: &ProviderContext{Key: "ctx", Provider: "p", Data: []byte{0, 1, 2}, Lifetime: LifetimePersistent}},
		{Callout: &Callout{Key: "co", Layer: "ALE_AUTH_CONNECT_V4", Provider: "p", Flags: []string{"conditional_on_flow"}, Lifetime: LifetimePersistent}},
		blockPort("static", 1, LifetimeStatic),
		blockPort("boot", 2, LifetimeBootTime),
		{Filter: &Filter{Key: "pers", Layer: "ALE_AUTH_CONNECT_V4", Sublayer: "sub", Provider: "p", Weight: "index:7",
			Action: "callout_terminating", Callout: "co", ProviderContext: "ctx", Flags: []string{"permit_if_callout_unregistered"},
			Lifetime: LifetimePersistent, Conditions: []Condition{{Field: "ip_remote_port", Match: "equal", Value: "3"}}}},
	} {
		if _, err := m.Add(ctx, s, o); err != nil {
			t.Fatal(o.Key(), err)
		}
	}
	before, _ := m.Get(0, Ref{Kind: KindFilter, Key: "pers"})
	if decides(t, m, 2) != "boot" {
		t.Fatal("a boot-time filter added at run time takes effect at once")
	}
	m.Close()

	m2 := newManager(t, dir)
	if has(m2, KindFilter, "static") {
		t.Fatal("static filter survived a restart")
	}
	// Boot-time filters give way to the persistent policy once it is loaded.
	if has(m2, KindFilter, "boot") {
		t.Fatal("boot-time filter still in force after the persistent load")
	}
	after, err := m2.Get(0, Ref{Kind: KindFilter, Key: "pers"})
	if err != nil {
		t.Fatal(err)
	}
	b, a := *before.Filter, *after.Filter
	b.ID, a.ID, b.Session, a.Session = 0, 0, 0, 0
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatalf("restored filter differs:\n%+v\n%+v", a, b)
	}
	if decides(t, m2, 3) != "pers" {
		t.Fatal("persistent filter does not decide after restart")
	}
	// The boot-time object is still stored; deleting it removes it there.
	s2 := open(m2, "b", false)
	if err := m2.Delete(ctx, s2, Ref{Kind: KindFilter, Key: "boot"}); err != nil {
		t.Fatalf("delete stored boot-time filter: %v", err)
	}
	m2.Close()
	m3 := newManager(t, dir)
	if _, ok := m3.stored[objKey{KindFilter, "boot"}]; ok {
		t.Fatal("deleted boot-time filter still stored")
	}
}

func TestBootTimeAppliedBeforePersistent(t *testing.T) {
	dir := t.TempDir()
	// A store with a boot-time filter and a persistent one, as a previous
	// daemon left it.
	m := newManager(t, dir)
	s := open(m, "a", false)
	ctx := context.Background()
	if _, err := m.Add(ctx, s, blockPort("boot", 2, LifetimeBootTime)); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Add(ctx, s, blockPort("pers", 3, LifetimePersistent)); err != nil {
		t.Fatal(err)
	}
	m.Close()
	// Watch the engine while the manager loads: the first commit has only
	// the boot-time filter, the second only the persistent one.
	eng := engine.New(engine.Options{})
	var seen []int
	m2, err := New(eng, Options{StateDir: dir, OnCommit: func(time.Duration) {
		seen = append(seen, eng.View().FilterCount(0))
		v := eng.View()
		if _, err := v.FilterByKey("boot"); err == nil {
			if _, err := v.FilterByKey("pers"); err == nil {
				t.Error("boot-time and persistent filters in force together")
			}
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if len(seen) != 2 || seen[0] != 1 || seen[1] != 1 {
		t.Fatalf("filter counts after each load commit: %v", seen)
	}
	if !has(m2, KindFilter, "pers") || has(m2, KindFilter, "boot") {
		t.Fatal("wrong final state")
	}
}

func TestStoreCrashLeftovers(t *testing.T) {
	dir := t.TempDir()
	m := newManager(t, dir)
	s := open(m, "a", false)
	if _, err := m.Add(context.Background(), s, blockPort("p1", 1, LifetimePersistent)); err != nil {
		t.Fatal(err)
	}
	m.Close()
	// A crash during a commit's write leaves a partial temporary file: it
	// is ignored, the last committed state loads.
	if err := os.WriteFile(filepath.Join(dir, "policy.json.tmp"), []byte(`{"version":1,"objects":[{"fil`), 0o600); err != nil {
		t.Fatal(err)
	}
	m2 := newManager(t, dir)
	if !has(m2, KindFilter, "p1") {
		t.Fatal("committed filter lost")
	}
	m2.Close()
	// A corrupt store is refused, not silently emptied.
	if err := os.WriteFile(filepath.Join(dir, "policy.json"), []byte("{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(engine.New(engine.Options{}), Options{StateDir: dir}); !errors.Is(err, ErrStore) {
		t.Fatalf("corrupt store: %v", err)
	}
}

func TestStoreLockedByOneProcess(t *testing.T) {
	dir := t.TempDir()
	newManager(t, dir)
	if _, err := New(engine.New(engine.Options{}), Options{StateDir: dir}); !errors.Is(err, ErrStore) {
		t.Fatalf("second manager on one store: %v", err)
	}
}

func TestSubscriptions(t *testing.T) {
	m := newManager(t, "")
	ctx := context.Background()
	a, b := open(m, "a", false), open(m, "b", false)
	subA, err := m.Subscribe(a, []Kind{KindFilter}, 16)
	if err != nil {
		t.Fatal(err)
	}
	subB, err := m.Subscribe(b, nil, 16)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Add(ctx, a, Object{Provider: &Provider{Key: "p"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Add(ctx, a, blockPort("f", 1, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Add(ctx, b, blockPort("g", 2, 0)); err != nil {
		t.Fatal(err)
	}
	if err := m.Delete(ctx, b, Ref{Kind: KindFilter, Key: "f"}); err != nil {
		t.Fatal(err)
	}
	// Aborted changes are never delivered.
	m.Begin(ctx, b)
	m.Add(ctx, b, blockPort("h", 3, 0))
	m.Abort(b)
	m.CloseSession(a)
	m.CloseSession(b)
	var gotA, gotB []string
	for c := range subA.C {
		gotA = append(gotA, fmt.Sprintf("%s %s %s s%d", c.Type, c.Kind, c.Key, c.Session))
	}
	for c := range subB.C {
		gotB = append(gotB, fmt.Sprintf("%s %s %s s%d", c.Type, c.Kind, c.Key, c.Session))
	}
	wantA := fmt.Sprint([]string{fmt.Sprintf("add filter g s%d", b), fmt.Sprintf("delete filter f s%d", b)})
	wantB := fmt.Sprint([]string{fmt.Sprintf("add provider p s%d", a), fmt.Sprintf("add filter f s%d", a)})
	if fmt.Sprint(gotA) != wantA || fmt.Sprint(gotB) != wantB {
		t.Fatalf("A got %v want %v\nB got %v want %v", gotA, wantA, gotB, wantB)
	}
}

func TestSessionsListed(t *testing.T) {
	m := newManager(t, "")
	a := m.OpenSession(SessionInfo{Name: "x", PID: 42, UID: 7, Dynamic: true})
	ss := m.Sessions()
	if len(ss) != 1 || ss[0].ID != a.ID || ss[0].PID != 42 || ss[0].UID != 7 || !ss[0].Dynamic || ss[0].OpenedAt.IsZero() {
		t.Fatalf("sessions: %+v", ss)
	}
}

func TestListTemplates(t *testing.T) {
	m := newManager(t, "")
	ctx := context.Background()
	s := open(m, "a", false)
	m.Add(ctx, s, Object{Sublayer: &Sublayer{Key: "hi", Weight: 10}})
	for i, sl := range []string{"", "hi", "hi"} {
		f := blockPort(fmt.Sprint("f", i), i+1, 0)
		f.Filter.Sublayer = sl
		if i == 2 {
			f.Filter.Action = "permit"
		}
		if _, err := m.Add(ctx, s, f); err != nil {
			t.Fatal(err)
		}
	}
	got, err := m.List(0, KindFilter, Template{Sublayer: "hi", Action: "block"})
	if err != nil || len(got) != 1 || got[0].Filter.Key != "f1" {
		t.Fatalf("template: %v %v", got, err)
	}
	all, _ := m.List(0, KindFilter, Template{Layer: "ALE_AUTH_CONNECT_V4"})
	// Evaluation order: the higher sublayer first.
	if len(all) != 3 || all[2].Filter.Key != "f0" {
		t.Fatalf("order: %v", all)
	}
	if _, err := m.List(0, KindFilter, Template{Layer: "nope"}); !errors.Is(err, engine.ErrInvalidLayer) {
		t.Fatalf("bad layer: %v", err)
	}
}
