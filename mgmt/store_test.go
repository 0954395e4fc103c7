package mgmt

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"fwp/engine"
)

func journalLines(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "policy.journal"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func appendFile(t *testing.T, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
}

// commit adds (port > 0) or deletes (port 0) one persistent filter in its
// own transaction.
func commitOne(t *testing.T, m *Manager, s uint64, key string, port int) {
	t.Helper()
	ctx := context.Background()
	var err error
	if port > 0 {
		_, err = m.Add(ctx, s, blockPort(key, port, LifetimePersistent))
	} else {
		err = m.Delete(ctx, s, Ref{Kind: KindFilter, Key: key})
	}
	if err != nil {
		t.Fatal(err)
	}
}

// Small commits are appended to the journal, one line each, and a restart
// replays them over the snapshot: adds, a replacement, deletes.
func TestStoreJournalReplays(t *testing.T) {
	dir := t.TempDir()
	m := newManager(t, dir)
	s := open(m, "a", false)
	for i := range 5 {
		commitOne(t, m, s, fmt.Sprintf("f%d", i), 100+i)
	}
	commitOne(t, m, s, "f1", 0)
	commitOne(t, m, s, "f3", 0)
	commitOne(t, m, s, "f3", 333) // the same key again
	if _, err := os.Stat(filepath.Join(dir, "policy.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a small commit wrote the snapshot: %v", err)
	}
	if n := len(journalLines(t, dir)); n != 1+8 {
		t.Fatalf("journal has %d lines, want a header and 8 commits", n)
	}
	m.Close()
	m2 := newManager(t, dir)
	for key, port := range map[string]int{"f0": 100, "f2": 102, "f3": 333, "f4": 104} {
		if decides(t, m2, port) != key {
			t.Errorf("after restart port %d is not decided by %s", port, key)
		}
	}
	if has(m2, KindFilter, "f1") {
		t.Error("a deleted filter came back")
	}
}

// A crash during an append leaves a line without its newline: it was never
// acknowledged, so a restart drops it and the next commit starts a clean
// line.
func TestStoreJournalTornTail(t *testing.T) {
	dir := t.TempDir()
	m := newManager(t, dir)
	commitOne(t, m, open(m, "a", false), "kept", 7)
	m.Close()
	jpath := filepath.Join(dir, "policy.journal")
	for _, torn := range []string{`{"put":[{"filter":{"key":"torn","layer":"ALE_AUTH_CONNECT_V4","act`, "\x00\x00\x00\x00"} {
		before, err := os.ReadFile(jpath)
		if err != nil {
			t.Fatal(err)
		}
		appendFile(t, jpath, torn)
		m2 := newManager(t, dir)
		if after, _ := os.ReadFile(jpath); !bytes.Equal(after, before) {
			t.Fatalf("the torn line was kept at load: %q", after[len(before):])
		}
		if decides(t, m2, 7) != "kept" || has(m2, KindFilter, "torn") {
			t.Fatal("state after a torn append")
		}
		commitOne(t, m2, open(m2, "b", false), "after-"+fmt.Sprint(len(torn)), 8+len(torn)%7)
		m2.Close()
		m3 := newManager(t, dir)
		if !has(m3, KindFilter, "after-"+fmt.Sprint(len(torn))) || !has(m3, KindFilter, "kept") {
			t.Fatal("the commit after a torn append was lost")
		}
		m3.Close()
	}
}

// A whole line that does not parse, a journal of a later generation than
// its snapshot, or a missing header: refused, never emptied.
func TestStoreJournalCorrupt(t *testing.T) {
	for name, mangle := range map[string]func(j string) string{
		"garbage line":        func(j string) string { return j + "{garbage}\n" },
		"garbage before good": func(j string) string { return strings.Replace(j, "\n", "\nnot json\n", 1) },
		"two values":          func(j string) string { return j + "{}{}\n" },
		"unknown field":       func(j string) string { return j + `{"putt":[]}` + "\n" },
		"not durable": func(j string) string {
			return j + `{"put":[{"filter":{"key":"x","layer":"ALE_AUTH_CONNECT_V4","action":"block"}}]}` + "\n"
		},
		"deleted key empty": func(j string) string { return j + `{"del":[{"kind":"filter","key":""}]}` + "\n" },
		"ahead":             func(j string) string { return strings.Replace(j, `"gen":0`, `"gen":5`, 1) },
		"no header":         func(j string) string { return j[strings.Index(j, "\n")+1:] },
		"empty":             func(string) string { return "" },
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			m := newManager(t, dir)
			commitOne(t, m, open(m, "a", false), "f", 7)
			m.Close()
			path := filepath.Join(dir, "policy.journal")
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte(mangle(string(b))), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := New(engine.New(engine.Options{}), Options{StateDir: dir}); !errors.Is(err, ErrStore) {
				t.Fatalf("corrupt journal: %v, want ErrStore", err)
			}
			// Nothing was thrown away: the bytes are still there.
			if got, _ := os.ReadFile(path); string(got) != mangle(string(b)) {
				t.Fatal("the refused journal was changed")
			}
		})
	}
}

// Once the journal outgrows the snapshot the next commit compacts: a new
// snapshot generation and an empty journal of it; restarts load the same
// state throughout. A journal left from before the compaction (a crash
// between the snapshot and the new journal) is ignored.
func TestStoreCompaction(t *testing.T) {
	orig := minCompact
	minCompact = 512
	t.Cleanup(func() { minCompact = orig })
	dir := t.TempDir()
	m := newManager(t, dir)
	s := open(m, "a", false)
	want := map[string]int{}
	gen := func() (g uint64) {
		b, err := os.ReadFile(filepath.Join(dir, "policy.json"))
		if err == nil {
			var f storeFile
			if err := json.Unmarshal(b, &f); err != nil {
				t.Fatal(err)
			}
			g = f.Gen
		}
		return g
	}
	// Commit until just after the third compaction or later (the journal
	// holds its header alone).
	for i := 0; gen() < 3 || len(journalLines(t, dir)) > 1; i++ {
		if i > 1000 {
			t.Fatal("never compacted three times")
		}
		key := fmt.Sprintf("f%d", i)
		commitOne(t, m, s, key, 1000+i)
		want[key] = 1000 + i
		if i%3 == 0 {
			commitOne(t, m, s, key, 0)
			delete(want, key)
		}
	}
	g := gen()
	m.Close()
	check := func(m *Manager) {
		t.Helper()
		for key, port := range want {
			if decides(t, m, port) != key {
				t.Fatalf("port %d not decided by %s", port, key)
			}
		}
		if n := len(m.stored); n != len(want) {
			t.Fatalf("%d stored objects, want %d", n, len(want))
		}
	}
	m2 := newManager(t, dir)
	check(m2)
	m2.Close()
	// A crash between a compaction's snapshot and its new journal leaves
	// the journal of the generation before, whose commits are all in the
	// snapshot: it is ignored (here, its deleting a filter in force).
	stale := fmt.Sprintf(`{"journal":1,"gen":%d}`+"\n"+`{"del":[{"kind":"filter","key":"f1"}]}`+"\n", g-1)
	if err := os.WriteFile(filepath.Join(dir, "policy.journal"), []byte(stale), 0o600); err != nil {
		t.Fatal(err)
	}
	m3 := newManager(t, dir)
	check(m3)
	if lines := journalLines(t, dir); len(lines) != 1 || !strings.Contains(lines[0], fmt.Sprintf(`"gen":%d}`, g)) {
		t.Fatalf("the stale journal was not replaced: %q", lines)
	}
}

// An append that fails (here its fsync) aborts the commit and takes its
// line back: a restart does not replay it, and the next commit works.
func TestStoreFailedAppendTakenBack(t *testing.T) {
	dir := t.TempDir()
	m := newManager(t, dir)
	s := open(m, "a", false)
	commitOne(t, m, s, "before", 7)
	orig := fdatasync
	fdatasync = func(*os.File) error { return errors.New("injected EIO") }
	_, err := m.Add(context.Background(), s, blockPort("failed", 8, LifetimePersistent))
	fdatasync = orig
	if !errors.Is(err, ErrStore) || !errors.Is(err, engine.ErrTxnAborted) {
		t.Fatalf("commit with a failing fsync: %v", err)
	}
	if has(m, KindFilter, "failed") {
		t.Fatal("a failed commit is in force")
	}
	if n := len(journalLines(t, dir)); n != 2 {
		t.Fatalf("journal has %d lines after a failed append, want 2", n)
	}
	commitOne(t, m, s, "after", 9)
	m.Close()
	m2 := newManager(t, dir)
	if !has(m2, KindFilter, "before") || !has(m2, KindFilter, "after") || has(m2, KindFilter, "failed") {
		t.Fatal("wrong state after restart")
	}
}
