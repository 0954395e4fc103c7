package main

import (
	"bytes"
	"errors"
	"fmt"
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

func (f fakeFinder) findDatagram(_, _ netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	return f.r, f.orig, f.err
}

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

// udpUpper answers each datagram upper-cased.
func udpUpper(t *testing.T) *net.UDPConn {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(bytes.ToUpper(buf[:n]), from)
		}
	}()
	return pc
}

func startUDP(t *testing.T, f finder, idle time.Duration, max int) *net.UDPConn {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	s := &server{find: f, dialTimeout: 5 * time.Second, udpIdle: idle, udpMax: max, log: slog.New(slog.DiscardHandler)}
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.serveUDP(pc) }()
	t.Cleanup(func() { pc.Close(); s.wg.Wait() })
	return pc
}

// UDP: each client gets its relay, replies come back to it, the records
// are set on the outbound socket, and an idle relay ends (the next
// datagram starts a new one).
func TestUDPRelay(t *testing.T) {
	up := udpUpper(t)
	b := &recordingBackend{}
	defer proxy.Register(b)()
	orig := up.LocalAddr().(*net.UDPAddr).AddrPort()
	p := startUDP(t, fakeFinder{r: proxy.Redirect{Records: []byte("REC")}, orig: orig}, 200*time.Millisecond, 16)
	ask := func(c *net.UDPConn, msg string) string {
		t.Helper()
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("%s: %v", msg, err)
		}
		return string(buf[:n])
	}
	var clients []*net.UDPConn
	for range 2 {
		c, err := net.DialUDP("udp4", nil, p.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
	}
	for i, c := range clients {
		for j := range 3 {
			msg := fmt.Sprintf("client %d datagram %d", i, j)
			if got := ask(c, msg); got != strings.ToUpper(msg) {
				t.Fatalf("got %q for %q", got, msg)
			}
		}
	}
	setRecords := func() int {
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, r := range b.set {
			if r != "udp4 "+orig.String()+" REC" {
				t.Fatalf("records set: %q", b.set)
			}
		}
		return len(b.set)
	}
	if n := setRecords(); n != 2 {
		t.Fatalf("%d outbound sockets for two clients", n)
	}
	time.Sleep(500 * time.Millisecond) // past the idle time
	if got := ask(clients[0], "again"); got != "AGAIN" {
		t.Fatalf("after idle: %q", got)
	}
	if n := setRecords(); n != 3 {
		t.Fatalf("%d outbound sockets after an idle relay ended, want 3", n)
	}
}

// Beyond -udp-max relays a new client's datagrams are dropped; the relayed
// client goes on.
func TestUDPRelayMax(t *testing.T) {
	up := udpUpper(t)
	p := startUDP(t, fixedFinder{up.LocalAddr().(*net.UDPAddr).AddrPort()}, time.Minute, 1)
	var cs []*net.UDPConn
	for range 2 {
		c, err := net.DialUDP("udp4", nil, p.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cs = append(cs, c)
	}
	buf := make([]byte, 64)
	cs[0].Write([]byte("first"))
	cs[0].SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := cs[0].Read(buf); err != nil || string(buf[:n]) != "FIRST" {
		t.Fatalf("the first client: %q, %v", buf[:n], err)
	}
	cs[1].Write([]byte("second"))
	cs[1].SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := cs[1].Read(buf); err == nil {
		t.Fatalf("a client beyond -udp-max was relayed: %q", buf[:n])
	}
	cs[0].Write([]byte("again"))
	cs[0].SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := cs[0].Read(buf); err != nil || string(buf[:n]) != "AGAIN" {
		t.Fatalf("the first client after the refusal: %q, %v", buf[:n], err)
	}
}
