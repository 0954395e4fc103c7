package main

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"fwp/internal/server"
	"fwp/internal/testutil"
	"fwp/proxy"
)

// serveRecords runs a records server with a connection bound of n and
// the given request timeout on a fresh socket, until the test ends.
func serveRecords(t *testing.T, n int, timeout time.Duration) string {
	t.Helper()
	l, path := testutil.UnixListener(t)
	log := slog.New(slog.DiscardHandler)
	go recordsServer{log: log, timeout: timeout}.serve(server.LimitListener(l, server.Limits{Max: n}, log))
	return path
}

// answer connects, sends req (nothing when nil, keeping the connection
// open), and returns all the server said before closing: a served
// connection always gets a reply line, a refused one nothing.
func answer(t *testing.T, path string, req []byte) string {
	t.Helper()
	c := testutil.DialUnix(t, path)
	if req != nil {
		if _, err := c.Write(req); err != nil {
			t.Fatal(err)
		}
	}
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("no answer: %v", err) // the safety deadline of hold
	}
	return string(b)
}

// A peer that connects and sends nothing is dropped after the request
// timeout, told why, and its slot serves the next peer: with a bound of
// one, an idle peer would otherwise lock the channel.
func TestRecordsIdlePeerDropped(t *testing.T) {
	path := serveRecords(t, 1, 20*time.Millisecond)
	for range 3 {
		if got := answer(t, path, nil); !strings.HasPrefix(got, "invalid_argument ") || !strings.Contains(got, "timeout") {
			t.Fatalf("idle peer: %q, want an invalid_argument timeout reply", got)
		}
	}
	// A request without a socket is answered, not refused: the slot is free.
	if got := answer(t, path, []byte{0, 1, 'x'}); !strings.HasPrefix(got, "invalid_argument ") || !strings.Contains(got, "no socket passed") {
		t.Fatalf("after idle peers: %q", got)
	}
}

// Beyond --max-connections the records socket closes connections at once
// (no reply), and a slot frees when a held connection ends.
func TestRecordsConnectionLimit(t *testing.T) {
	path := serveRecords(t, 2, time.Minute)
	c1, c2 := testutil.DialUnix(t, path), testutil.DialUnix(t, path)
	// Both are accepted (in order) before the third is: each gets its reply
	// once its peer half-closes, which proves it was served.
	if got := answer(t, path, nil); got != "" {
		t.Fatalf("third connection: %q, want it closed without a reply", got)
	}
	c1.(*net.UnixConn).CloseWrite()
	if b, _ := io.ReadAll(c1); !strings.HasPrefix(string(b), "invalid_argument ") {
		t.Fatalf("first connection: %q, want a reply", b)
	}
	if got := answer(t, path, []byte{0, 1, 'x'}); !strings.Contains(got, "no socket passed") {
		t.Fatalf("after a slot freed: %q", got)
	}
	c2.(*net.UnixConn).CloseWrite()
	if b, _ := io.ReadAll(c2); !strings.HasPrefix(string(b), "invalid_argument ") {
		t.Fatalf("second connection: %q, want a reply", b)
	}
}

// Regression: a read that fails on its deadline reports n = -1, which the
// request reader used as a length and panicked, taking fwpd down for any
// peer that stayed idle on the records socket.
func TestReadRecordsRequestDeadline(t *testing.T) {
	a, b := socketPair(t)
	defer a.Close()
	defer b.Close()
	_ = b.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
	if _, fd, err := readRecordsRequest(b); fd >= 0 || !errors.Is(err, proxy.ErrInvalidArgument) || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("fd %d, err %v: want ErrInvalidArgument for the deadline", fd, err)
	}
}
