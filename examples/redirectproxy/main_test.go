package main

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"fwp/proxy"
)

// echoUpper answers each connection with what it read, upper-cased, once
// the client half-closes.
func echoUpper(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(c)
				c.Write(bytes.ToUpper(b))
			}()
		}
	}()
	return ln
}

func startServer(t *testing.T, f finder) (addr string, logs *lockedWriter) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logs = &lockedWriter{}
	s := &server{find: f, dialTimeout: 5 * time.Second, log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	done := make(chan struct{})
	go func() { s.serve(ln); close(done) }()
	t.Cleanup(func() {
		ln.Close()
		<-done
		s.wg.Wait()
	})
	return ln.Addr().String(), logs
}

// lockedWriter is a log buffer the test reads while handlers write.
type lockedWriter struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func exchange(t *testing.T, addr, msg string) (string, error) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return "", err
	}
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	return string(b), err
}

func TestRelayToFixedAddress(t *testing.T) {
	up := echoUpper(t)
	addr, _ := startServer(t, fixedFinder{netip.MustParseAddrPort(up.Addr().String())})
	big := strings.Repeat("bulk-", 1<<20) // 5 MiB: the relay's buffer grows
	got, err := exchange(t, addr, big)
	if err != nil {
		t.Fatal(err)
	}
	if got != strings.ToUpper(big) {
		t.Fatalf("got %d bytes back, want %d", len(got), len(big))
	}
}

// recordingBackend is a proxy.Backend that remembers the records put on
// outbound sockets and where they dialed.
type recordingBackend struct {
	mu  sync.Mutex
	set []string
}

func (b *recordingBackend) QueryAccepted(net.Conn) (proxy.Redirect, error) {
	return proxy.Redirect{}, proxy.ErrNotFound
}

func (b *recordingBackend) SetRecords(network, address string, _ syscall.RawConn, records []byte) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.set = append(b.set, network+" "+address+" "+string(records))
	return nil
}

type fakeFinder struct {
	r    proxy.Redirect
	orig netip.AddrPort
	err  error
}

func (f fakeFinder) find(net.Conn) (proxy.Redirect, netip.AddrPort, error) { return f.r, f.orig, f.err }

func TestRedirectedConnectionDialsOriginalWithRecords(t *testing.T) {
	up := echoUpper(t)
	b := &recordingBackend{}
	defer proxy.Register(b)()
	orig := netip.MustParseAddrPort(up.Addr().String())
	addr, _ := startServer(t, fakeFinder{r: proxy.Redirect{Records: []byte("REC"), Context: []byte("ctx")}, orig: orig})
	got, err := exchange(t, addr, "hello")
	if err != nil || got != "HELLO" {
		t.Fatalf("got %q, %v", got, err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if want := "tcp4 " + orig.String() + " REC"; len(b.set) != 1 || b.set[0] != want {
		t.Fatalf("records set: %q, want [%q]", b.set, want)
	}
}

func TestUnknownConnectionIsClosed(t *testing.T) {
	addr, logs := startServer(t, fakeFinder{err: proxy.ErrNotFound})
	got, err := exchange(t, addr, "hello")
	if got != "" {
		t.Fatalf("got %q from a connection with no redirect", got)
	}
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), "no redirect for connection") {
		if time.Now().After(deadline) {
			t.Fatalf("no log of the refused connection: %s", logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRecordsRefusedNoDial(t *testing.T) {
	up := echoUpper(t)
	defer proxy.Register(refusingBackend{})()
	addr, _ := startServer(t, fakeFinder{r: proxy.Redirect{Records: []byte("REC")}, orig: netip.MustParseAddrPort(up.Addr().String())})
	// Records that cannot be set must not turn into an unmarked dial,
	// which the redirect would send back to this proxy.
	if got, _ := exchange(t, addr, "hello"); got != "" {
		t.Fatalf("relayed %q without records", got)
	}
}

type refusingBackend struct{}

func (refusingBackend) QueryAccepted(net.Conn) (proxy.Redirect, error) {
	return proxy.Redirect{}, proxy.ErrNotFound
}

func (refusingBackend) SetRecords(string, string, syscall.RawConn, []byte) error {
	return proxy.ErrAccessDenied
}

func TestBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-to", "not-an-address"},
		{"-socket", "/nonexistent/fwpd.sock", "-listen", "127.0.0.1:0"},
		{"-nosuchflag"},
	} {
		var out bytes.Buffer
		if err := run(args, &out); err == nil {
			t.Errorf("run(%q) succeeded", args)
		}
	}
}
