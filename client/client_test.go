package client_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"fwp/api"
	"fwp/client"
	"fwp/engine"
	"fwp/internal/server"
	"fwp/mgmt"
)

// shortDir returns a temporary directory with a path short enough for a
// unix socket (t.TempDir's can exceed the 108-byte limit).
func shortDir(t testing.TB) string {
	d, err := os.MkdirTemp("", "fwp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func startServer(t testing.TB, cfg server.Config) (string, *mgmt.Manager) {
	t.Helper()
	dir := shortDir(t)
	m, err := mgmt.New(engine.New(engine.Options{}), mgmt.Options{StateDir: filepath.Join(dir, "state"), TxnTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Manager = m
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := server.New(cfg)
	go srv.Serve(l)
	t.Cleanup(func() { srv.Stop(); m.Close() })
	return sock, m
}

func dial(t testing.TB, sock string, dynamic bool) *client.Client {
	t.Helper()
	c, err := client.Dial(context.Background(), sock, client.Options{Name: t.Name(), Dynamic: dynamic})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func block(key string, port int) mgmt.Object {
	return mgmt.Object{Filter: &mgmt.Filter{Key: key, Layer: "ALE_AUTH_CONNECT_V4", Action: "block",
		Conditions: []mgmt.Condition{{Field: "ip_remote_port", Match: "equal", Value: fmt.Sprint(port)}}}}
}

func TestClientEndToEnd(t *testing.T) {
	sock, m := startServer(t, server.Config{})
	ctx := context.Background()
	a, b := dial(t, sock, false), dial(t, sock, false)
	if a.Session().PID != uint32(os.Getpid()) || !a.Session().Admin {
		t.Fatalf("session: %+v", a.Session())
	}
	changes, err := b.Subscribe(ctx, mgmt.KindFilter)
	if err != nil {
		t.Fatal(err)
	}
	res, err := a.ApplyPolicy(ctx, "p.yaml", []byte(`sublayers: [{key: s, weight: 5}]
filters:
  - {key: f1, layer: ALE_AUTH_CONNECT_V4, sublayer: s, action: block, conditions: [{field: ip_remote_port, value: 23}]}
`))
	if err != nil || len(res.Added) != 2 {
		t.Fatalf("apply: %+v %v", res, err)
	}
	// A bad file changes nothing and says where.
	_, err = a.ApplyPolicy(ctx, "bad.yaml", []byte("filters:\n  - {key: f2, layer: ALE_AUTH_CONNECT_V4, action: block}\n  - {key: f3, layer: ALE_AUTH_CONNECT_V4, action: block, sublayer: missing}\n"))
	if !errors.Is(err, engine.ErrNotFound) || !strings.Contains(err.Error(), "bad.yaml:3") {
		t.Fatalf("bad policy: %v", err)
	}
	_, err = a.ApplyPolicy(ctx, "bad.yaml", []byte("filters:\n  - {key: f2, layer: NOPE, action: block}\n"))
	if !errors.Is(err, mgmt.ErrInvalidPolicy) || !errors.Is(err, engine.ErrInvalidLayer) || !strings.Contains(err.Error(), "bad.yaml:2") {
		t.Fatalf("bad layer: %v", err)
	}
	// A fleet document's nodes section has no meaning here: refused.
	_, err = a.ApplyPolicy(ctx, "fleet.yaml", []byte("nodes: {hosts: [h]}\nfilters:\n  - {key: f4, layer: ALE_AUTH_CONNECT_V4, action: block}\n"))
	if !errors.Is(err, mgmt.ErrInvalidPolicy) || !strings.Contains(err.Error(), "fwpctl fleet apply") {
		t.Fatalf("a nodes section applied locally: %v", err)
	}
	fs, err := b.Filters(ctx, mgmt.Template{Sublayer: "s"})
	if err != nil || len(fs) != 1 || fs[0].Key != "f1" || fs[0].Lifetime != mgmt.LifetimeStatic {
		t.Fatalf("filters: %+v %v", fs, err)
	}
	x, err := b.Explain(ctx, "ALE_AUTH_CONNECT_V4", map[string]string{"ip_remote_port": "23", "ip_remote_address": "127.0.0.1"})
	if err != nil || x.FilterKey != "f1" || x.Action != "block" || len(x.Steps) != 1 {
		t.Fatalf("explain: %+v %v", x, err)
	}
	if _, err := b.Explain(ctx, "ALE_AUTH_CONNECT_V4", map[string]string{"ip_remote_port": "x"}); !errors.Is(err, engine.ErrInvalidValue) {
		t.Fatalf("explain bad value: %v", err)
	}
	// Transactions over the wire.
	if err := a.Begin(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Add(ctx, block("t1", 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Get(ctx, mgmt.Ref{Kind: mgmt.KindFilter, Key: "t1"}); !errors.Is(err, engine.ErrNotFound) {
		t.Fatalf("uncommitted visible to another session: %v", err)
	}
	if _, err := b.Add(ctx, block("t2", 2)); !errors.Is(err, mgmt.ErrTimeout) {
		t.Fatalf("lock wait: %v", err)
	}
	if err := a.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Get(ctx, mgmt.Ref{Kind: mgmt.KindFilter, Key: "t1"}); err != nil {
		t.Fatal(err)
	}
	// b sees a's filter changes, and not its own.
	if err := b.Delete(ctx, mgmt.Ref{Kind: mgmt.KindFilter, Key: "t1"}); err != nil {
		t.Fatal(err)
	}
	var got []string
	for len(got) < 2 {
		select {
		case c := <-changes:
			got = append(got, c.Type.String()+" "+c.Key)
		case <-time.After(5 * time.Second):
			t.Fatalf("changes so far: %v", got)
		}
	}
	if strings.Join(got, ",") != "add f1,add t1" {
		t.Fatalf("changes: %v", got)
	}
	select {
	case c := <-changes:
		t.Fatalf("own change delivered: %+v", c)
	case <-time.After(50 * time.Millisecond):
	}
	// Net events: enumerate and follow.
	vs := &engine.Values{}
	vs.SetTuple(6, netip.AddrPort{}, netip.MustParseAddrPort("127.0.0.1:23"))
	m.Engine().Classify(engine.LayerALEAuthConnectV4, vs, nil)
	evs, err := b.NetEvents(ctx, 0)
	if err != nil || len(evs) != 1 || evs[0].Type != "classify_drop" || evs[0].Remote != "127.0.0.1:23" {
		t.Fatalf("events: %+v %v", evs, err)
	}
	fctx, cancel := context.WithCancel(ctx)
	seen := make(chan client.NetEvent, 4)
	done := make(chan error, 1)
	go func() {
		done <- b.FollowNetEvents(fctx, 0, func(e client.NetEvent) error { seen <- e; return nil })
	}()
	if e := <-seen; e.Seq != 1 {
		t.Fatalf("first followed event %+v", e)
	}
	m.Engine().Classify(engine.LayerALEAuthConnectV4, vs, nil)
	select {
	case e := <-seen:
		if e.Seq != 2 {
			t.Fatalf("followed %+v", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no followed event")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	ss, err := b.Sessions(ctx)
	if err != nil || len(ss) != 2 {
		t.Fatalf("sessions: %+v %v", ss, err)
	}
}

func TestPermissionFromPeerCred(t *testing.T) {
	// The test's own uid and gid are not administrators here (root too,
	// with NoRootAdmin) but its gid is a reader group: the daemon must
	// refuse writes and allow reads, deciding from the kernel's
	// SO_PEERCRED of the real connection.
	other := uint32(os.Getgid()) + 4242
	sock, _ := startServer(t, server.Config{NoRootAdmin: true, AdminGIDs: []uint32{other}, ReaderGIDs: []uint32{uint32(os.Getgid())}})
	ctx := context.Background()
	c := dial(t, sock, false)
	if c.Session().Admin {
		t.Fatal("session marked admin")
	}
	_, err := c.Add(ctx, block("f", 1))
	if !errors.Is(err, mgmt.ErrAccessDenied) {
		t.Fatalf("write: want ErrAccessDenied, got %v", err)
	}
	if err := c.Begin(ctx); !errors.Is(err, mgmt.ErrAccessDenied) {
		t.Fatalf("begin: %v", err)
	}
	if _, err := c.List(ctx, mgmt.KindFilter, mgmt.Template{}); err != nil {
		t.Fatalf("read: %v", err)
	}
	// Without the reader role, not even that.
	sock0, _ := startServer(t, server.Config{NoRootAdmin: true, AdminGIDs: []uint32{other}})
	if _, err := dial(t, sock0, false).List(ctx, mgmt.KindFilter, mgmt.Template{}); !errors.Is(err, mgmt.ErrAccessDenied) {
		t.Fatalf("read without a role: want ErrAccessDenied, got %v", err)
	}
	// Membership of the configured group is what grants the right.
	sock2, _ := startServer(t, server.Config{NoRootAdmin: true, AdminGIDs: []uint32{uint32(os.Getgid())}})
	c2 := dial(t, sock2, false)
	if _, err := c2.Add(ctx, block("f", 1)); err != nil {
		t.Fatalf("admin group member: %v", err)
	}
}

func TestOversizedRequest(t *testing.T) {
	sock, _ := startServer(t, server.Config{MaxMsgBytes: 64 << 10})
	ctx := context.Background()
	c := dial(t, sock, false)
	big := "filters:\n" + strings.Repeat("  - {key: k, layer: ALE_AUTH_CONNECT_V4, action: block}\n", 4000)
	if _, err := c.ApplyPolicy(ctx, "big.yaml", []byte(big)); !errors.Is(err, mgmt.ErrTooLarge) {
		t.Fatalf("want ErrTooLarge, got %v", err)
	}
	// The daemon keeps serving, on the same connection.
	if _, err := c.Add(ctx, block("after", 1)); err != nil {
		t.Fatal(err)
	}
}

func TestDisconnectMidTransaction(t *testing.T) {
	sock, _ := startServer(t, server.Config{})
	ctx := context.Background()
	a, err := client.Dial(ctx, sock, client.Options{Name: "a"})
	if err != nil {
		t.Fatal(err)
	}
	b := dial(t, sock, false)
	if err := a.Begin(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Add(ctx, block("half", 1)); err != nil {
		t.Fatal(err)
	}
	a.Drop() // the connection goes away without closing the session
	// The daemon notices, aborts a's transaction and frees the lock.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := b.Add(ctx, block("b", 2))
		if err == nil {
			break
		}
		if !errors.Is(err, mgmt.ErrTimeout) || time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	if _, err := b.Get(ctx, mgmt.Ref{Kind: mgmt.KindFilter, Key: "half"}); !errors.Is(err, engine.ErrNotFound) {
		t.Fatalf("half-applied: %v", err)
	}
}

// TestDynamicSessionClientKilled runs a child process (this test binary)
// that opens a dynamic session and adds objects, kills it with SIGKILL and
// checks that the daemon deletes them.
func TestDynamicSessionClientKilled(t *testing.T) {
	if sock := os.Getenv("FWP_TEST_CHILD_SOCKET"); sock != "" {
		childMain(sock)
		return
	}
	sock, m := startServer(t, server.Config{})
	cmd := exec.Command(os.Args[0], "-test.run=^TestDynamicSessionClientKilled$")
	cmd.Env = append(os.Environ(), "FWP_TEST_CHILD_SOCKET="+sock)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ready" {
		t.Fatalf("child: %q %v", line, err)
	}
	count := func() int {
		objs, _ := m.List(0, mgmt.KindFilter, mgmt.Template{})
		sl, _ := m.List(0, mgmt.KindSublayer, mgmt.Template{})
		return len(objs) + len(sl)
	}
	if n := count(); n != 4 { // 2 filters, the child's sublayer, the universal one
		t.Fatalf("before kill: %d objects", n)
	}
	ss := m.Sessions()
	if len(ss) != 1 || ss[0].PID != uint32(cmd.Process.Pid) || !ss[0].Dynamic {
		t.Fatalf("sessions: %+v", ss)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	deadline := time.Now().Add(10 * time.Second)
	// The session's objects go first, then the session: wait for both.
	for count() != 1 || len(m.Sessions()) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after the client died: %d objects (want 1), sessions %+v (want none)", count(), m.Sessions())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func childMain(sock string) {
	ctx := context.Background()
	c, err := client.Dial(ctx, sock, client.Options{Name: "child", Dynamic: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_, err = c.Apply(ctx, []mgmt.Op{
		{Add: &mgmt.Object{Sublayer: &mgmt.Sublayer{Key: "child-sub", Weight: 3}}},
		{Add: ptr(block("c1", 1))},
		{Add: ptr(block("c2", 2))},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("ready")
	time.Sleep(time.Minute)
	os.Exit(0)
}

func ptr[T any](v T) *T { return &v }

// Without a daemon, Dial says so in a way a person can act on, typed.
func TestDialNoDaemon(t *testing.T) {
	sock := filepath.Join(shortDir(t), "none.sock")
	_, err := client.Dial(context.Background(), sock, client.Options{})
	if !errors.Is(err, api.ErrUnavailable) || !strings.Contains(err.Error(), "is fwpd running") || !strings.Contains(err.Error(), sock) {
		t.Fatalf("dial without a daemon: %v", err)
	}
}

// A subscriber that stops reading and closes its client leaves no
// goroutine behind, even with a context that never ends.
func TestSubscribeUnreadThenClose(t *testing.T) {
	sock, _ := startServer(t, server.Config{})
	ctx := context.Background()
	writer := dial(t, sock, false)
	base := runtime.NumGoroutine()
	c, err := client.Dial(ctx, sock, client.Options{Name: "reader"})
	if err != nil {
		t.Fatal(err)
	}
	ch, err := c.Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ops []mgmt.Op
	for i := range 400 { // more than the client's buffer
		ops = append(ops, mgmt.Op{Add: ptr(block(fmt.Sprint("u", i), i+1))})
	}
	if _, err := writer.Apply(ctx, ops); err != nil {
		t.Fatal(err)
	}
	for len(ch) < cap(ch) { // the client's goroutine now blocks on a full channel
		time.Sleep(time.Millisecond)
	}
	c.Close()
	for deadline := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > base; {
		if time.Now().After(deadline) {
			t.Fatalf("goroutines after Close: %d > %d", runtime.NumGoroutine(), base)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
