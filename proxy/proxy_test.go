package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"

	"fwp/proxy"
)

// fakeAccepted is a connection whose datapath knows its redirect.
type fakeAccepted struct {
	net.Conn
	r   proxy.Redirect
	pid uint32
	err error
}

func (f *fakeAccepted) ProxyRedirect() (proxy.Redirect, uint32, error) { return f.r, f.pid, f.err }

// wrapped is a layered connection (like tls.Conn) over another.
type wrapped struct{ net.Conn }

func (w wrapped) NetConn() net.Conn { return w.Conn }

func TestQueries(t *testing.T) {
	recs := []byte("opaque-records")
	ok := &fakeAccepted{r: proxy.Redirect{Records: recs, Context: []byte("ctx"), TargetPID: 42}, pid: 42}
	got, err := proxy.QueryRedirectRecords(ok)
	if err != nil || !bytes.Equal(got, recs) {
		t.Fatalf("records %q %v", got, err)
	}
	got[0] = 'X' // the caller's copy
	if ok.r.Records[0] != 'o' {
		t.Fatal("QueryRedirectRecords returned the datapath's own slice")
	}
	if c, err := proxy.QueryRedirectContext(wrapped{ok}); err != nil || string(c) != "ctx" {
		t.Fatalf("context through NetConn: %q %v", c, err)
	}
	cases := []struct {
		name string
		conn net.Conn
		fn   func(net.Conn) ([]byte, error)
		want error
	}{
		{"nil", nil, proxy.QueryRedirectRecords, proxy.ErrInvalidArgument},
		{"other pid", &fakeAccepted{r: ok.r, pid: 7}, proxy.QueryRedirectContext, proxy.ErrAccessDenied},
		{"no target pid", &fakeAccepted{r: proxy.Redirect{Records: recs, Context: []byte("c")}, pid: 7}, proxy.QueryRedirectContext, proxy.ErrAccessDenied},
		{"no context", &fakeAccepted{r: proxy.Redirect{Records: recs, TargetPID: 7}, pid: 7}, proxy.QueryRedirectContext, proxy.ErrNotFound},
		{"no records", &fakeAccepted{r: proxy.Redirect{TargetPID: 7}, pid: 7}, proxy.QueryRedirectRecords, proxy.ErrNotFound},
		{"not redirected", &fakeAccepted{err: proxy.ErrNotFound}, proxy.QueryRedirectRecords, proxy.ErrNotFound},
		{"plain conn, no backend", tcpConn(t), proxy.QueryRedirectRecords, proxy.ErrNotSupported},
		{"not a socket", pipeConn(t), proxy.QueryRedirectRecords, proxy.ErrNotSocket},
		{"not a socket, layered", wrapped{pipeConn(t)}, proxy.QueryRedirectContext, proxy.ErrNotSocket},
	}
	for _, c := range cases {
		if _, err := c.fn(c.conn); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
}

// tcpConn is one end of a loopback TCP connection: a socket.
func tcpConn(t *testing.T) net.Conn {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); a.Close() })
	return c
}

func pipeConn(t *testing.T) net.Conn {
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	return a
}

type setter struct{ got []byte }

func (s *setter) SetRedirectRecords(b []byte) error { s.got = b; return nil }

// backend records what the Control hook handed it.
type backend struct {
	mu      sync.Mutex
	records []byte
	known   net.Conn
}

func (b *backend) QueryAccepted(c net.Conn) (proxy.Redirect, error) {
	if c == b.known {
		return proxy.Redirect{Records: []byte("k")}, nil
	}
	return proxy.Redirect{}, proxy.ErrNotFound
}

func (b *backend) SetRecords(network, address string, c syscall.RawConn, records []byte) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.records = append([]byte(nil), records...)
	return nil
}

func TestSetRedirectRecords(t *testing.T) {
	s := &setter{}
	if err := proxy.SetRedirectRecords(s, []byte("r")); err != nil || string(s.got) != "r" {
		t.Fatalf("setter: %q %v", s.got, err)
	}
	for name, c := range map[string]struct {
		d    any
		recs []byte
		want error
	}{
		"empty":          {s, nil, proxy.ErrInvalidArgument},
		"too long":       {s, make([]byte, 1<<16), proxy.ErrInvalidArgument},
		"nil dialer":     {nil, []byte("r"), proxy.ErrInvalidArgument},
		"nil net.Dialer": {(*net.Dialer)(nil), []byte("r"), proxy.ErrInvalidArgument},
		"unknown type":   {42, []byte("r"), proxy.ErrNotSupported},
		"no backend":     {&net.Dialer{}, []byte("r"), proxy.ErrNotSupported},
	} {
		if err := proxy.SetRedirectRecords(c.d, c.recs); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", name, err, c.want)
		}
	}

	// With a kernel backend, a net.Dialer's Control hook hands it the
	// records before connecting, after the dialer's own hook.
	b := &backend{}
	unregister := proxy.Register(b)
	defer unregister()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ownHook := false
	d := &net.Dialer{Control: func(string, string, syscall.RawConn) error { ownHook = true; return nil }}
	if err := proxy.SetRedirectRecords(d, []byte("recs")); err != nil {
		t.Fatal(err)
	}
	c, err := d.DialContext(context.Background(), "tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	b.mu.Lock()
	got := string(b.records)
	b.mu.Unlock()
	if got != "recs" || !ownHook {
		t.Fatalf("backend got %q, own hook called %v", got, ownHook)
	}
	// The backend answers for plain connections it knows.
	known := tcpConn(t)
	b.known = known
	if r, err := proxy.QueryRedirectRecords(known); err != nil || string(r) != "k" {
		t.Fatalf("backend query: %q %v", r, err)
	}
	if _, err := proxy.QueryRedirectRecords(tcpConn(t)); !errors.Is(err, proxy.ErrNotFound) {
		t.Fatalf("unknown plain conn: %v", err)
	}
	// Something that is not a socket is told so (WSAENOTSOCK), not
	// "not redirected".
	if _, err := proxy.QueryRedirectRecords(pipeConn(t)); !errors.Is(err, proxy.ErrNotSocket) || errors.Is(err, proxy.ErrNotFound) {
		t.Fatalf("not a socket: %v", err)
	}
	unregister()
	if err := proxy.SetRedirectRecords(&net.Dialer{}, []byte("r")); !errors.Is(err, proxy.ErrNotSupported) {
		t.Fatalf("after unregister: %v", err)
	}
}

func TestSplice(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// server echoes; the "proxy" splices a client-facing socket pair to it.
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	front, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer front.Close()
	type result struct{ up, down int64 }
	done := make(chan result, 1)
	go func() {
		a, err := front.Accept()
		if err != nil {
			done <- result{-1, -1}
			return
		}
		defer a.Close()
		b, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			done <- result{-1, -1}
			return
		}
		defer b.Close()
		up, down, _ := proxy.Splice(a, b)
		done <- result{up, down}
	}()
	c, err := net.Dial("tcp4", front.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := bytes.Repeat([]byte("0123456789"), 100000)
	go func() { c.Write(msg); c.(*net.TCPConn).CloseWrite() }()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("spliced echo: %d bytes, %v", len(got), err)
	}
	if r := <-done; r.up != int64(len(msg)) || r.down != int64(len(msg)) {
		t.Fatalf("spliced %d up, %d down; want %d", r.up, r.down, len(msg))
	}
}

// fakeDatagrams is an unconnected socket whose datapath knows the
// redirects of the datagrams it receives.
type fakeDatagrams struct {
	net.PacketConn
	known netip.AddrPort
	r     proxy.Redirect
	pid   uint32
}

func (f *fakeDatagrams) ProxyDatagramRedirect(from netip.AddrPort) (proxy.Redirect, uint32, error) {
	if from != f.known {
		return proxy.Redirect{}, 0, proxy.ErrNotFound
	}
	return f.r, f.pid, nil
}

// datagramBackend is a registered backend that also answers for the
// datagrams of plain sockets.
type datagramBackend struct {
	backend
	known netip.AddrPort
	r     proxy.Redirect
}

func (b *datagramBackend) QueryDatagram(pc net.PacketConn, from netip.AddrPort) (proxy.Redirect, error) {
	if from != b.known {
		return proxy.Redirect{}, proxy.ErrNotFound
	}
	return b.r, nil
}

func TestDatagramQueries(t *testing.T) {
	client := netip.MustParseAddrPort("127.0.0.1:4000")
	src := net.UDPAddrFromAddrPort(client)
	mapped := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1).To16(), Port: 4000} // a dual-stack socket's view
	recs := []byte("opaque-records")
	ok := &fakeDatagrams{known: client, r: proxy.Redirect{Records: recs, Context: []byte("ctx"), TargetPID: 42}, pid: 42}
	got, err := proxy.QueryDatagramRedirectRecords(ok, mapped)
	if err != nil || !bytes.Equal(got, recs) {
		t.Fatalf("records: %q %v", got, err)
	}
	got[0] = 'X'
	if ok.r.Records[0] != 'o' {
		t.Fatal("QueryDatagramRedirectRecords returned the datapath's own slice")
	}
	if c, err := proxy.QueryDatagramRedirectContext(ok, src); err != nil || string(c) != "ctx" {
		t.Fatalf("context: %q %v", c, err)
	}
	other := net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:4001"))
	cases := []struct {
		name string
		pc   net.PacketConn
		from net.Addr
		fn   func(net.PacketConn, net.Addr) ([]byte, error)
		want error
	}{
		{"nil socket", nil, src, proxy.QueryDatagramRedirectRecords, proxy.ErrInvalidArgument},
		{"nil source", ok, nil, proxy.QueryDatagramRedirectRecords, proxy.ErrInvalidArgument},
		{"typed nil source", ok, (*net.UDPAddr)(nil), proxy.QueryDatagramRedirectContext, proxy.ErrInvalidArgument},
		{"TCP source", ok, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 4000}, proxy.QueryDatagramRedirectRecords, proxy.ErrInvalidArgument},
		{"no port", ok, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, proxy.QueryDatagramRedirectRecords, proxy.ErrInvalidArgument},
		{"other sender", ok, other, proxy.QueryDatagramRedirectRecords, proxy.ErrNotFound},
		{"other pid", &fakeDatagrams{known: client, r: ok.r, pid: 7}, src, proxy.QueryDatagramRedirectContext, proxy.ErrAccessDenied},
		{"no target pid", &fakeDatagrams{known: client, r: proxy.Redirect{Records: recs, Context: []byte("c")}, pid: 7}, src, proxy.QueryDatagramRedirectContext, proxy.ErrAccessDenied},
		{"no context", &fakeDatagrams{known: client, r: proxy.Redirect{Records: recs, TargetPID: 7}, pid: 7}, src, proxy.QueryDatagramRedirectContext, proxy.ErrNotFound},
		{"no records", &fakeDatagrams{known: client, r: proxy.Redirect{TargetPID: 7}, pid: 7}, src, proxy.QueryDatagramRedirectRecords, proxy.ErrNotFound},
		{"plain socket, no backend", plainPacketConn(t), src, proxy.QueryDatagramRedirectRecords, proxy.ErrNotSupported},
		{"not a socket", notSocketPC{plainPacketConn(t)}, src, proxy.QueryDatagramRedirectRecords, proxy.ErrNotSocket},
	}
	for _, c := range cases {
		if _, err := c.fn(c.pc, c.from); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}

	// A backend without datagram support leaves plain sockets unsupported;
	// one with it answers as this process.
	unregister := proxy.Register(&backend{})
	defer unregister()
	plain := plainPacketConn(t)
	if _, err := proxy.QueryDatagramRedirectRecords(plain, src); !errors.Is(err, proxy.ErrNotSupported) {
		t.Fatalf("connection-only backend: %v, want ErrNotSupported", err)
	}
	db := &datagramBackend{known: client, r: proxy.Redirect{Records: recs, Context: []byte("dctx"), TargetPID: uint32(os.Getpid())}}
	unregisterDB := proxy.Register(db)
	defer unregisterDB()
	if c, err := proxy.QueryDatagramRedirectContext(plain, mapped); err != nil || string(c) != "dctx" {
		t.Fatalf("datagram backend: %q %v", c, err)
	}
	if _, err := proxy.QueryDatagramRedirectRecords(plain, other); !errors.Is(err, proxy.ErrNotFound) {
		t.Fatalf("datagram backend, unknown sender: %v", err)
	}
	db.r.TargetPID = uint32(os.Getpid()) + 1
	if _, err := proxy.QueryDatagramRedirectContext(plain, src); !errors.Is(err, proxy.ErrAccessDenied) {
		t.Fatalf("datagram backend, other target: %v", err)
	}
}

func plainPacketConn(t *testing.T) net.PacketConn {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// notSocketPC is a packet connection that is not an IP socket.
type notSocketPC struct{ net.PacketConn }

func (notSocketPC) LocalAddr() net.Addr { return &net.UnixAddr{Name: "@x", Net: "unixgram"} }

// Per-connection records: one net.Dialer shared by a proxy's connections,
// each dial's context carrying its own records, which reach the backend
// for that dial's socket only.
func TestPerConnectionRecords(t *testing.T) {
	d := &net.Dialer{ControlContext: proxy.ControlRedirectRecords}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	dial := func(ctx context.Context) error {
		c, err := d.DialContext(ctx, "tcp4", ln.Addr().String())
		if err == nil {
			c.Close()
		}
		return err
	}
	withRecs := proxy.WithRedirectRecords(context.Background(), []byte("conn-1"))
	if err := dial(withRecs); !errors.Is(err, proxy.ErrNotSupported) {
		t.Fatalf("records and no backend: %v", err)
	}
	b := &backend{}
	defer proxy.Register(b)()
	for _, recs := range []string{"conn-1", "conn-2"} {
		if err := dial(proxy.WithRedirectRecords(context.Background(), []byte(recs))); err != nil {
			t.Fatal(err)
		}
		b.mu.Lock()
		got := string(b.records)
		b.records = nil
		b.mu.Unlock()
		if got != recs {
			t.Fatalf("dial with %q: the backend got %q", recs, got)
		}
	}
	if err := dial(context.Background()); err != nil {
		t.Fatal(err)
	}
	if b.records != nil {
		t.Fatalf("a dial without records handed %q", b.records)
	}
	if err := dial(proxy.WithRedirectRecords(context.Background(), nil)); !errors.Is(err, proxy.ErrInvalidArgument) {
		t.Fatalf("empty records: %v", err)
	}
}
