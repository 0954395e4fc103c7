//go:build linux

package ebpf

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestKernelDev(t *testing.T) {
	// stat's st_dev (glibc's encoding, unix.Mkdev) to the kernel's
	// major<<20 | minor, which the hooks read from the super block.
	for _, d := range [][2]uint32{{254, 0}, {8, 3}, {259, 0xfffff}, {4095, 12345}} {
		if got, want := kernelDev(unix.Mkdev(d[0], d[1])), d[0]<<20|d[1]; got != want {
			t.Errorf("kernelDev(%d:%d) = %#x, want %#x", d[0], d[1], got, want)
		}
	}
	// The file this test runs from: ResolveApp agrees with itself through a symlink.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	a, err := ResolveApp(self)
	if err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(self, link); err != nil {
		t.Fatal(err)
	}
	if b, err := ResolveApp(link); err != nil || b != a {
		t.Fatalf("through a symlink: %v %v, want %v", b, err, a)
	}
	if _, err := ResolveApp(filepath.Join(t.TempDir(), "none")); !os.IsNotExist(err) {
		t.Fatalf("a missing file: %v", err)
	}
}

func waitChanged(t *testing.T, w *AppWatcher, what string) {
	t.Helper()
	select {
	case <-w.Changed():
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no change reported", what)
	}
}

func noChange(t *testing.T, w *AppWatcher, what string) {
	t.Helper()
	select {
	case <-w.Changed():
		t.Fatalf("%s: a change reported", what)
	case <-time.After(100 * time.Millisecond):
	}
}

// TestWatchApps: renames over the path, removals and creations are
// reported; other names in the directory are not; a path whose directory
// does not exist yet is watched from its nearest ancestor.
func TestWatchApps(t *testing.T) {
	dir := t.TempDir()
	app := filepath.Join(dir, "app")
	later := filepath.Join(dir, "sub", "deeper", "app")
	if err := os.WriteFile(app, []byte("v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	w, err := WatchApps([]string{app, later})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := os.WriteFile(filepath.Join(dir, "other"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	noChange(t, w, "another file in the directory")
	if err := os.WriteFile(app+".new", []byte("v2"), 0o755); err != nil {
		t.Fatal(err)
	}
	noChange(t, w, "the new file written beside")
	if err := os.Rename(app+".new", app); err != nil {
		t.Fatal(err)
	}
	waitChanged(t, w, "renamed over")
	if err := os.Remove(app); err != nil {
		t.Fatal(err)
	}
	waitChanged(t, w, "removed")
	if err := os.MkdirAll(filepath.Dir(later), 0o755); err != nil {
		t.Fatal(err)
	}
	waitChanged(t, w, "the missing directory created")
}
