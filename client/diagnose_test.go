package client

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"fwp/api"
)

// A failed Dial says why: no socket, nobody listening on it, or a daemon
// that closes each new connection at once (fwpd at --max-connections),
// which is ErrConnectionLimit and still ErrUnavailable.
func TestDialSaysWhy(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()

	_, err := Dial(ctx, filepath.Join(dir, "none.sock"), Options{})
	if !errors.Is(err, api.ErrUnavailable) || !strings.Contains(err.Error(), "no socket there") || errors.Is(err, ErrConnectionLimit) {
		t.Errorf("no socket: %v", err)
	}

	// A socket file nobody listens on (bound, never listened).
	dead := filepath.Join(dir, "dead.sock")
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: dead}); err != nil {
		t.Fatal(err)
	}
	_, err = Dial(ctx, dead, Options{})
	if !errors.Is(err, api.ErrUnavailable) || !strings.Contains(err.Error(), "nothing listens on it") {
		t.Errorf("nobody listening: %v", err)
	}

	// Accepted and closed at once, as fwpd's limit listener does.
	full := filepath.Join(dir, "full.sock")
	l, err := net.Listen("unix", full)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, err = Dial(ctx, full, Options{})
	if !errors.Is(err, ErrConnectionLimit) || !errors.Is(err, api.ErrUnavailable) || !strings.Contains(err.Error(), "--max-connections") || strings.Contains(err.Error(), "is fwpd running") {
		t.Errorf("at the limit: %v", err)
	}
}
