package main

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"fwp/internal/testutil"
	"fwp/internal/trust"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestLockPinsWaits: a fwpd started while the previous one is still
// exiting (killed, its maps being torn down) waits for the pin lock,
// saying so, rather than failing at once; it gives up after the bound.
func TestLockPinsWaits(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pins")
	var logs lockedBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	held, err := lockPins(dir, 0, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(held.Name()) })
	if _, err := lockPins(dir, 0, log); err == nil || !strings.Contains(err.Error(), "another fwpd uses --bpffs-dir") {
		t.Fatalf("second lock without waiting: %v", err)
	}
	if _, err := lockPins(dir, 200*time.Millisecond, log); err == nil || !strings.Contains(err.Error(), "still after 200ms") {
		t.Fatalf("second lock past the bound: %v", err)
	}
	// The holder exits while the next one waits.
	time.AfterFunc(300*time.Millisecond, func() { held.Close() })
	f, err := lockPins(dir, 10*time.Second, log)
	if err != nil {
		t.Fatalf("lock after the holder let go: %v\n%s", err, logs.String())
	}
	f.Close()
	if !strings.Contains(logs.String(), "waiting for it to exit") || !strings.Contains(logs.String(), "let go of --bpffs-dir") {
		t.Errorf("the wait was not logged:\n%s", logs.String())
	}
}

// TestLockPinsRefusesForeignLockFile: a lock file another user made
// first (and could hold for ever) is refused with its owner and mode
// named, not silently used.
func TestLockPinsRefusesForeignLockFile(t *testing.T) {
	testutil.RequireRoot(t)
	u := testutil.NewUser(t)
	dir := filepath.Join(t.TempDir(), "pins")
	f, err := lockPins(dir, 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	name := f.Name()
	f.Close()
	t.Cleanup(func() { os.Remove(name) })
	os.Chown(name, int(u.UID), int(u.GID))
	_, err = lockPins(dir, 0, slog.New(slog.DiscardHandler))
	var pe *trust.PathError
	if !errorsAs(err, &pe) || pe.Path != name || pe.UID != u.UID {
		t.Fatalf("lock file owned by %s: %v", u.Name, err)
	}
}

func errorsAs(err error, target any) bool { return err != nil && errors.As(err, target) }

// TestLockPinsOutOfUsersReach: as root the lock files live in root's own
// /run/fwp/locks, where a local user cannot make one first (in the shared /tmp
// any user could, at its predictable name, and hold it for ever: fwpd
// would never start).
func TestLockPinsOutOfUsersReach(t *testing.T) {
	testutil.RequireRoot(t)
	u := testutil.NewUser(t)
	f, err := lockPins(filepath.Join(t.TempDir(), "pins"), 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	name := f.Name()
	f.Close()
	t.Cleanup(func() { os.Remove(name) })
	if filepath.Dir(name) != "/run/fwp/locks" {
		t.Fatalf("lock file %s, want it in /run/fwp/locks", name)
	}
	// The user tries to make the next lock file first.
	out, err := u.Command("sh", "-c", "touch "+name+".x; ls /run/fwp/locks").CombinedOutput()
	if _, serr := os.Stat(name + ".x"); serr == nil {
		os.Remove(name + ".x")
		t.Fatalf("an unprivileged user made a file in /run/fwp/locks: %s", out)
	}
	if err == nil {
		t.Fatalf("the user's touch and ls in /run/fwp/locks succeeded: %s", out)
	}
}
