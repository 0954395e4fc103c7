package testutil

import (
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// UnixListener listens on a fresh unix socket, in a short temporary
// directory (t.TempDir can exceed a socket path's 108 bytes); both go when
// the test ends.
func UnixListener(t testing.TB) (net.Listener, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "fwpsock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, path
}

// DialUnix connects to a unix socket and bounds every later read and write
// by 30 s, so a wrong answer fails the test instead of hanging it; the
// connection is closed when the test ends.
func DialUnix(t testing.TB, path string) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c
}
