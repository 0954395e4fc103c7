package inproc

import (
	"errors"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"

	"fwp/engine"
)

// flakyListener fails its first Accept, as a listener out of file
// descriptors does, then accepts normally.
type flakyListener struct {
	net.Listener
	fail chan error
}

func (f *flakyListener) Accept() (net.Conn, error) {
	select {
	case err := <-f.fail:
		return nil, err
	default:
	}
	return f.Listener.Accept()
}

func testListener(t *testing.T, wrap func(net.Listener) net.Listener) (*Listener, *engine.Engine) {
	t.Helper()
	e := engine.New(engine.Options{})
	dp := New(e, Options{})
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	local, _ := addrPortOf(ln.Addr())
	lc := &ListenConfig{Datapath: dp}
	l := newListener(lc, wrap(ln), dp.newClassifier(6, false, engine.DirectionInbound, dp.id, false), local)
	t.Cleanup(func() { l.Close() })
	return l, e
}

// An error of the real Accept goes to one Accept call; the listener keeps
// accepting afterwards, as a plain one lets its caller retry.
func TestListenerAcceptErrorIsNotFatal(t *testing.T) {
	emfile := &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	fl := &flakyListener{fail: make(chan error, 1)}
	fl.fail <- emfile
	l, _ := testListener(t, func(ln net.Listener) net.Listener { fl.Listener = ln; return fl })
	if _, err := l.Accept(); !errors.Is(err, syscall.EMFILE) {
		t.Fatalf("first accept: %v", err)
	}
	c, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a, err := l.Accept()
	if err != nil {
		t.Fatalf("accept after a transient error: %v", err)
	}
	a.Close()
	l.Close()
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("accept after close: %v", err)
	}
}

// Connections nobody accepts stay in the kernel's backlog beyond
// admitLimit: the listener does not take every one of them, each with a
// goroutine and a socket.
func TestListenerAdmitLimit(t *testing.T) {
	defer func(n int) { admitLimit = n }(admitLimit)
	admitLimit = 4
	l, e := testListener(t, func(ln net.Listener) net.Listener { return ln })
	base := runtime.NumGoroutine()
	const n = 16
	var clients []net.Conn
	for range n {
		c, err := net.Dial("tcp4", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
	}
	// Wait for the listener to fill its slots, then give it the chance to
	// take more.
	deadline := time.Now().Add(10 * time.Second)
	for len(l.slots) < admitLimit && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	if g := runtime.NumGoroutine() - base; g > admitLimit {
		t.Fatalf("%d goroutines for %d connections nobody accepted, limit %d", g, n, admitLimit)
	}
	// All of them still come through Accept, the rest from the backlog.
	seen := map[string]bool{}
	for range n {
		a, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		seen[a.RemoteAddr().String()] = true
		a.Close()
	}
	for _, c := range clients {
		if !seen[c.LocalAddr().String()] {
			t.Fatalf("client %v never accepted", c.LocalAddr())
		}
	}
	l.Close()
	if o := e.Outstanding(); o != (engine.Outstanding{}) {
		t.Fatalf("engine holds %+v", o)
	}
}
