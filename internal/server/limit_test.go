package server

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"fwp/api"
	"fwp/internal/peercred"
	"fwp/internal/testutil"
)

// lockedBuffer is a log sink read while the listener writes it.
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

// With room for two, the third connection is closed at once while the
// first two work; closing one frees its slot for the next.
func TestLimitListener(t *testing.T) {
	raw, path := testutil.UnixListener(t)
	var logs lockedBuffer
	l := LimitListener(raw, Limits{Max: 2}, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	accepted := make(chan net.Conn)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	echo := func(client, server net.Conn) error {
		if _, err := server.Write([]byte("x")); err != nil {
			return err
		}
		_, err := io.ReadFull(client, make([]byte, 1))
		return err
	}
	c1, c2 := testutil.DialUnix(t, path), testutil.DialUnix(t, path)
	s1, s2 := <-accepted, <-accepted
	c3, c4 := testutil.DialUnix(t, path), testutil.DialUnix(t, path)
	for i, c := range []net.Conn{c3, c4} {
		if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
			t.Fatalf("connection %d beyond the limit: read %d, %v; want EOF", i+3, n, err)
		}
	}
	if err := echo(c1, s1); err != nil {
		t.Fatal(err)
	}
	if err := echo(c2, s2); err != nil {
		t.Fatal(err)
	}
	// peercred sees through the wrapper.
	if cr, err := peercred.FromConn(s1); err != nil || cr.PID != uint32(os.Getpid()) {
		t.Fatalf("peercred through the wrapper: %+v %v", cr, err)
	}
	s1.Close()
	s1.Close() // a second close frees nothing more
	c5 := testutil.DialUnix(t, path)
	s5 := <-accepted
	if err := echo(c5, s5); err != nil {
		t.Fatal(err)
	}
	c6 := testutil.DialUnix(t, path)
	if n, err := c6.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("full again: read %d, %v; want EOF", n, err)
	}
	log := logs.String()
	if n := strings.Count(log, "connection refused: too many connections"); n != 3 {
		t.Errorf("%d debug lines for 3 refusals:\n%s", n, log)
	}
	// One warning per minute at most, however many are refused.
	if n := strings.Count(log, "level=WARN"); n != 1 || !strings.Contains(log, "max_connections=2") || !strings.Contains(log, "refused=1") {
		t.Errorf("want one warning:\n%s", log)
	}
	raw.Close()
	if _, ok := <-accepted; ok {
		t.Fatal("accept after close")
	}
}

// The gRPC server holds its bound: with MaxConnections 2, two clients are
// served, a third is refused with Unavailable, and once a client goes away
// a new one is served again.
func TestMaxConnections(t *testing.T) {
	f := start(t, Config{MaxConnections: 2})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c1, cc1 := f.conn(t)
	c2, _ := f.conn(t)
	for i, c := range []api.ManagementClient{c1, c2} {
		if _, err := c.Sessions(ctx, &api.Empty{}); err != nil {
			t.Fatalf("client %d: %v", i+1, err)
		}
	}
	c3, cc3 := f.conn(t)
	if _, err := c3.Sessions(ctx, &api.Empty{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("third client: want Unavailable, got %v", err)
	}
	cc3.Close()
	cc1.Close()
	// The server notices the close when it reads EOF: retry until it has,
	// failing only if the slot never frees.
	for {
		c4, cc4 := f.conn(t)
		_, err := c4.Sessions(ctx, &api.Empty{})
		if err == nil {
			break
		}
		cc4.Close()
		if ctx.Err() != nil {
			t.Fatalf("no slot freed after a client closed: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := c2.Sessions(ctx, &api.Empty{}); err != nil {
		t.Fatalf("a served client lost its connection: %v", err)
	}
}

// Supplementary groups are taken from the connection's credentials, not
// from /proc: a peer whose process is gone (pid 0 has no /proc entry) is
// still an administrator by a group it had at connect time.
func TestAdminBySupplementaryGroup(t *testing.T) {
	s := New(Config{NoRootAdmin: true, AdminGIDs: []uint32{4242}, AdminUIDs: []uint32{1001}})
	for _, tc := range []struct {
		c    peercred.Cred
		want bool
	}{
		{peercred.Cred{UID: 1000, GID: 1000, Groups: []uint32{10, 4242}}, true},
		{peercred.Cred{UID: 1000, GID: 4242}, true},
		{peercred.Cred{UID: 1001, GID: 1001}, true},
		{peercred.Cred{UID: 1000, GID: 1000, Groups: []uint32{10, 4243}}, false},
		{peercred.Cred{UID: 0, GID: 0}, false},
		{peercred.Cred{PID: uint32(os.Getpid()), UID: 1000, GID: 1000}, false},
	} {
		if got := s.isAdmin(tc.c); got != tc.want {
			t.Errorf("%+v: admin %v, want %v", tc.c, got, tc.want)
		}
	}
}

// One user cannot take every slot, and the last sixteenth is root's: with
// room for 32 (2 kept for root) and 3 per user, a user's fourth connection
// is refused, other users fill up to 30, and root still gets the last two.
func TestLimitsPerUserAndRootReserve(t *testing.T) {
	l := LimitListener(nil, Limits{Max: 32, PerUser: 3}, nil).(*limitListener)
	for i := range 3 {
		if why := l.admit(1000, false); why != "" {
			t.Fatalf("uid 1000 connection %d: %s", i+1, why)
		}
	}
	if why := l.admit(1000, false); why != "too many connections of this user" {
		t.Fatalf("uid 1000's 4th connection: %q", why)
	}
	for uid := uint32(1001); l.open < 30; uid++ {
		for range 3 {
			if l.open < 30 {
				if why := l.admit(uid, false); why != "" {
					t.Fatalf("uid %d with %d open: %s", uid, l.open, why)
				}
			}
		}
	}
	if why := l.admit(2000, false); why != "too many connections" {
		t.Fatalf("a new user with 30 open: %q", why)
	}
	if why := l.admit(unknownUser, false); why != "too many connections" {
		t.Fatalf("an unknown peer with 30 open: %q", why)
	}
	for i := range 2 {
		if why := l.admit(0, true); why != "" {
			t.Fatalf("root's reserved slot %d: %s", i+1, why)
		}
	}
	if why := l.admit(0, true); why != "too many connections" {
		t.Fatalf("root beyond the bound: %q", why)
	}
	// A slot freed while root holds the reserve is still past the others'
	// bound; once root's go, it is anyone's.
	l.release(1000)
	if why := l.admit(1000, false); why != "too many connections" {
		t.Fatalf("uid 1000 with 31 open, 2 of them root's: %q", why)
	}
	l.release(0)
	l.release(0)
	if why := l.admit(1000, false); why != "" {
		t.Fatalf("uid 1000 after root's connections closed: %s", why)
	}
	if l.byUser[1000] != 3 || l.open != 30 || l.byUser[0] != 0 {
		t.Fatalf("counts: uid 1000 %d, open %d", l.byUser[1000], l.open)
	}
	for range 3 {
		l.release(1000)
	}
	if _, ok := l.byUser[1000]; ok {
		t.Fatal("a user with no connection left is still counted")
	}
}

// The reserved sixteenth goes to the peers Privileged names, asked with
// the peer's credentials at accept: with room for 16 (1 reserved), 15
// unprivileged connections fill the rest, a 16th is refused, and the same
// peer once privileged gets the reserved slot.
func TestPrivilegedPeersTakeTheReserve(t *testing.T) {
	raw, path := testutil.UnixListener(t)
	var privileged atomic.Bool
	creds := make(chan peercred.Cred, 32)
	l := LimitListener(raw, Limits{Max: 16, PerUser: -1, Privileged: func(c peercred.Cred) bool {
		creds <- c
		return privileged.Load()
	}}, nil)
	accepted := make(chan net.Conn, 32)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	served := func() bool {
		c := testutil.DialUnix(t, path)
		select {
		case s := <-accepted:
			t.Cleanup(func() { s.Close() })
			return true
		case <-time.After(5 * time.Second):
			t.Fatal("connection neither served nor refused")
		case <-readEOF(c):
		}
		return false
	}
	for i := range 15 {
		if !served() {
			t.Fatalf("unprivileged connection %d refused", i+1)
		}
	}
	if served() {
		t.Fatal("an unprivileged peer got the reserved slot")
	}
	privileged.Store(true)
	if !served() {
		t.Fatal("a privileged peer was refused the reserved slot")
	}
	if c := <-creds; c.UID != uint32(os.Getuid()) || c.PID != uint32(os.Getpid()) {
		t.Fatalf("Privileged asked with %+v, want this process's credentials", c)
	}
}

// readEOF is closed when c's peer closes it.
func readEOF(c net.Conn) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, c)
		close(done)
	}()
	return done
}

// A client that connects and never speaks gRPC is closed after the
// handshake timeout, and its slot serves the next client.
func TestSilentClientClosedAfterHandshakeTimeout(t *testing.T) {
	f := start(t, Config{MaxConnections: 1, HandshakeTimeout: 200 * time.Millisecond})
	silent, err := net.Dial("unix", f.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	start := time.Now()
	select {
	case <-readEOF(silent):
	case <-time.After(10 * time.Second):
		t.Fatal("a silent client still holds its connection after 10 s")
	}
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Fatalf("closed after %v, before the handshake timeout", d)
	}
	c, _ := f.conn(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Sessions(ctx, &api.Empty{}); err != nil {
		t.Fatalf("the slot was not freed: %v", err)
	}
}
