package mgmt

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"testing"

	"fwp/engine"
)

// typed reports whether err wraps one of the typed errors a caller can test.
func typed(err error) bool {
	for _, s := range []error{engine.ErrNotFound, engine.ErrAlreadyExists, engine.ErrInvalidLayer, engine.ErrInvalidField,
		engine.ErrInvalidCondition, engine.ErrInvalidMatchType, engine.ErrTypeMismatch, engine.ErrInvalidValue,
		engine.ErrInvalidWeight, engine.ErrInvalidAction, engine.ErrInvalidFlags, engine.ErrCalloutNotFound,
		engine.ErrIncompatibleLayer, engine.ErrInvalidArgument, ErrLifetime, ErrDynamicSession} {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// FuzzAddFilter feeds arbitrary strings, as a client could send them,
// through a filter add: it must succeed or fail with a typed error, and a
// failure must change nothing.
func FuzzAddFilter(f *testing.F) {
	f.Add("ALE_AUTH_CONNECT_V4", "auto", "ip_remote_port", "equal", "22", "block", "", "")
	f.Add("ALE_AUTH_CONNECT_V6", "index:3", "ip_remote_address", "prefix", "fe80::/10", "permit", "clear_action_right", "")
	f.Add("ALE_CONNECT_REDIRECT_V4", "99", "ale_app_id", "equal_case_insensitive", "/usr/bin/curl", "callout_terminating", "permit_if_callout_unregistered", "co")
	f.Add("ALE_AUTH_CONNECT_V4", "index:16", "ip_remote_port", "range", "9-1", "block", "disabled", "s")
	f.Add("ale_bind_redirect_v4", "0x10", "ip_local_address", "range", "10.0.0.1-10.0.0.9", "callout_inspection", "indexed", "")
	f.Fuzz(func(t *testing.T, layer, weight, field, match, value, action, flags, ref string) {
		m, err := New(engine.New(engine.Options{}), Options{})
		if err != nil {
			t.Fatal(err)
		}
		s := open(m, "fuzz", false)
		ctx := context.Background()
		if _, err := m.Add(ctx, s, Object{Callout: &Callout{Key: "co", Layer: "ALE_CONNECT_REDIRECT_V4"}}); err != nil {
			t.Fatal(err)
		}
		if _, err := m.Add(ctx, s, Object{Sublayer: &Sublayer{Key: "s"}}); err != nil {
			t.Fatal(err)
		}
		fl := &Filter{Key: "k", Layer: layer, Weight: weight, Action: action, Flags: []string{flags}, Sublayer: ref, Callout: ref,
			Conditions: []Condition{{Field: field, Match: match, Value: value}}}
		if flags == "" {
			fl.Flags = nil
		}
		if _, err := m.Add(ctx, s, Object{Filter: fl}); err != nil {
			if !typed(err) {
				t.Fatalf("untyped error: %v", err)
			}
			if n := m.Engine().View().FilterCount(0); n != 0 {
				t.Fatalf("failed add left %d filters", n)
			}
			return
		}
		got, err := m.Get(0, Ref{Kind: KindFilter, Key: "k"})
		if err != nil {
			t.Fatal(err)
		}
		// What was accepted reads back in a form that is accepted again.
		again := *got.Filter
		again.Key = "k2"
		if _, err := m.Add(ctx, s, Object{Filter: &again}); err != nil {
			t.Fatalf("read-back filter %+v refused: %v", again, err)
		}
	})
}

// FuzzLoadStore loads arbitrary bytes as the store file: the manager must
// start or refuse with ErrStore, never panic.
func FuzzLoadStore(f *testing.F) {
	f.Add([]byte(`{"version":1,"objects":[{"provider":{"key":"p","lifetime":"persistent"}},{"filter":{"key":"f","layer":"ALE_AUTH_CONNECT_V4","action":"block","provider":"p","lifetime":"persistent"}}]}`))
	f.Add([]byte(`{"version":1,"objects":[{"filter":{"key":"b","layer":"ALE_AUTH_CONNECT_V4","action":"block","lifetime":"boottime"}},{"filter":{"key":"x","layer":"nope","action":"block","lifetime":"persistent"}}]}`))
	f.Add([]byte(`{"version":2}`))
	f.Add([]byte(`{"version":1,"objects":[{}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		if m := loadFiles(t, map[string][]byte{"policy.json": b}); m != nil {
			m.Close()
		}
	})
}

// loadFiles writes files into a new state directory and starts a manager
// on it: nil when it refused (with ErrStore, or the test fails).
func loadFiles(t *testing.T, files map[string][]byte) *Manager {
	t.Helper()
	dir := t.TempDir()
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	m, err := New(engine.New(engine.Options{}), Options{StateDir: dir})
	if err != nil {
		if !errors.Is(err, ErrStore) {
			t.Fatalf("untyped error: %v", err)
		}
		return nil
	}
	return m
}

// FuzzLoadJournal loads arbitrary bytes as the journal beside a valid
// snapshot: the manager starts or refuses with ErrStore, never panics; a
// journal it accepted (a torn tail dropped) loads again to the same
// objects, and takes a commit.
func FuzzLoadJournal(f *testing.F) {
	put := `{"put":[{"filter":{"key":"j","layer":"ALE_AUTH_CONNECT_V4","action":"block","lifetime":"persistent"}}]}`
	f.Add([]byte(`{"journal":1,"gen":2}` + "\n" + put + "\n"))
	f.Add([]byte(`{"journal":1,"gen":2}` + "\n" + put + "\n" + `{"del":[{"kind":"filter","key":"j"}]}` + "\n"))
	f.Add([]byte(`{"journal":1,"gen":2}` + "\n" + put[:40]))
	f.Add([]byte(`{"journal":1,"gen":1}` + "\n" + `{"del":[{"kind":"filter","key":"s"}]}` + "\n"))
	f.Add([]byte(`{"journal":1,"gen":3}` + "\n"))
	f.Add([]byte(`{"journal":1,"gen":2}` + "\n" + `{"del":[{"kind":"provider","key":"p"}]}` + "\n"))
	f.Add([]byte(`{"journal":1,"gen":2}` + "\n" + `{"put":[{"filter":{"key":"x","layer":"nope","action":"block","lifetime":"boottime"}}]}` + "\n"))
	f.Add([]byte("\n\n"))
	snapshot := []byte(`{"version":1,"gen":2,"objects":[{"provider":{"key":"p","lifetime":"persistent"}},{"filter":{"key":"s","layer":"ALE_AUTH_CONNECT_V4","action":"block","provider":"p","lifetime":"persistent"}}]}`)
	f.Fuzz(func(t *testing.T, b []byte) {
		m := loadFiles(t, map[string][]byte{"policy.json": snapshot, "policy.journal": b})
		if m == nil {
			return
		}
		first := maps.Clone(m.stored)
		m.Close()
		m, err := New(engine.New(engine.Options{}), Options{StateDir: m.opts.StateDir})
		if err != nil {
			t.Fatalf("a journal accepted once is refused on reopening: %v", err)
		}
		defer m.Close()
		if len(m.stored) != len(first) {
			t.Fatalf("reopened with %d objects, first %d", len(m.stored), len(first))
		}
		for k := range first {
			if _, ok := m.stored[k]; !ok {
				t.Fatalf("%v lost on reopening", k)
			}
		}
		s := m.OpenSession(SessionInfo{Name: "fuzz", PID: 1}).ID
		if _, err := m.Add(context.Background(), s, blockPort("after-fuzz", 4242, LifetimePersistent)); err != nil {
			t.Fatalf("commit after loading: %v", err)
		}
	})
}
