package inproc_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
)

// A remote's first datagram whose AUTH_CONNECT is pended: WriteTo returns
// at its write deadline (SetWriteDeadline or SetDeadline, set before or
// during the wait) with a timeout and sends nothing; the classification
// goes on, and a later WriteTo sends per its verdict: permit, block or the
// CONNECT_REDIRECT's redirect.
func TestUDPWriteDeadlineDuringPend(t *testing.T) {
	leak := goroutines(t)
	redirected, proxy := mustPacket(t), mustPacket(t)
	w := pendedConnect(t, redirected, proxy)
	pc, decide, asked := w.pc, w.decide, w.asked

	write := func(msg string, to net.Addr) (int, error) { return writeWithin(t, pc, msg, to) }
	// timedOut writes to a remote whose classification is pended until
	// the callout has been asked: every write ends at its deadline.
	timedOut := func(what string, to net.Addr) {
		t.Helper()
		pc.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
		if n, err := write(what, to); n != 0 || !isTimeout(err) {
			t.Fatalf("%s: WriteTo during a pend: %d, %v; want a timeout", what, n, err)
		}
		within(t, asked, what+": the callout asked")
	}
	// first is the first datagram s receives.
	first := func(s net.PacketConn) string {
		t.Helper()
		s.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 64)
		n, _, err := s.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		return string(buf[:n])
	}

	// Permit. The deadline also ends a wait that began without one, and
	// SetDeadline sets it as well.
	permitted := mustPacket(t)
	timedOut("permit: first", permitted.LocalAddr())
	pc.SetWriteDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() { _, err := pc.WriteTo([]byte("permit: waiting"), permitted.LocalAddr()); errc <- err }()
	time.Sleep(20 * time.Millisecond) // let it wait (either way the test holds)
	pc.SetWriteDeadline(time.Now())
	if err := within(t, errc, "WriteTo after a new deadline"); !isTimeout(err) {
		t.Fatalf("WriteTo after SetWriteDeadline(now): %v, want a timeout", err)
	}
	pc.SetDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := write("permit: SetDeadline", permitted.LocalAddr()); !isTimeout(err) {
		t.Fatalf("WriteTo after SetDeadline: %v, want a timeout", err)
	}
	decide <- engine.ActionPermit
	pc.SetDeadline(time.Time{})
	if n, err := write("permit: sent", permitted.LocalAddr()); n != len("permit: sent") || err != nil {
		t.Fatalf("WriteTo after permit: %d, %v", n, err)
	}
	if got := first(permitted); got != "permit: sent" {
		t.Fatalf("permitted remote's first datagram %q, want the one sent after the verdict", got)
	}

	// Block.
	blocked := mustPacket(t)
	timedOut("block: first", blocked.LocalAddr())
	decide <- engine.ActionBlock
	pc.SetWriteDeadline(time.Time{})
	if _, err := write("block: again", blocked.LocalAddr()); !isBlocked(err) {
		t.Fatalf("WriteTo after block: %v, want a BlockedError", err)
	}

	// Redirect: the datagram after the verdict goes to the proxy alone.
	timedOut("redirect: first", redirected.LocalAddr())
	decide <- engine.ActionPermit
	pc.SetWriteDeadline(time.Time{})
	if _, err := write("redirect: sent", redirected.LocalAddr()); err != nil {
		t.Fatalf("WriteTo after redirect: %v", err)
	}
	if got := first(proxy); got != "redirect: sent" {
		t.Fatalf("proxy's first datagram %q, want the one sent after the verdict", got)
	}

	w.end(t, leak)
}

// A WriteTo past its write deadline to a new remote fails with a timeout
// without classifying it (no callout asked); the next one, within its
// deadline, classifies and sends.
func TestUDPWriteExpiredDeadlineClassifiesNothing(t *testing.T) {
	leak := goroutines(t)
	w := pendedConnect(t, mustPacket(t), mustPacket(t))
	pc, remote := w.pc, mustPacket(t)
	pc.SetWriteDeadline(time.Now().Add(-time.Second))
	if n, err := pc.WriteTo([]byte("late"), remote.LocalAddr()); n != 0 || !isTimeout(err) {
		t.Fatalf("WriteTo past its deadline: %d, %v; want a timeout", n, err)
	}
	select {
	case <-w.asked:
		t.Fatal("a WriteTo past its deadline started a classification")
	case <-time.After(50 * time.Millisecond):
	}
	pc.SetWriteDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() { _, err := pc.WriteTo([]byte("on time"), remote.LocalAddr()); errc <- err }()
	within(t, w.asked, "the callout asked")
	w.decide <- engine.ActionPermit
	if err := within(t, errc, "WriteTo"); err != nil {
		t.Fatal(err)
	}
	remote.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64)
	if n, _, err := remote.ReadFrom(buf); err != nil || string(buf[:n]) != "on time" {
		t.Fatalf("remote got %q, %v", buf[:n], err)
	}
	w.end(t, leak)
}

// Concurrent first datagrams to one remote wait for one classification
// and are all sent once it permits.
func TestUDPConcurrentWritesOnePend(t *testing.T) {
	leak := goroutines(t)
	w := pendedConnect(t, mustPacket(t), mustPacket(t))
	pc, remote := w.pc, mustPacket(t)
	const writers = 4
	errc := make(chan error, writers)
	for range writers {
		go func() { _, err := pc.WriteTo([]byte("x"), remote.LocalAddr()); errc <- err }()
	}
	within(t, w.asked, "the callout asked")
	time.Sleep(20 * time.Millisecond) // let the others reach the wait (either way the test holds)
	w.decide <- engine.ActionPermit
	for range writers {
		if err := within(t, errc, "WriteTo"); err != nil {
			t.Fatal(err)
		}
	}
	remote.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64)
	for i := range writers {
		if _, _, err := remote.ReadFrom(buf); err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
	}
	w.end(t, leak)
}

// Close while WriteTo waits on a pended AUTH_CONNECT: WriteTo returns
// net.ErrClosed, as does a WriteTo that had timed out and comes back.
func TestUDPCloseEndsWritePend(t *testing.T) {
	leak := goroutines(t)
	w := pendedConnect(t, mustPacket(t), mustPacket(t))
	pc, asked := w.pc, w.asked
	waiting, timedOut := mustPacket(t), mustPacket(t)
	pc.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := writeWithin(t, pc, "x", timedOut.LocalAddr()); !isTimeout(err) {
		t.Fatalf("WriteTo during a pend: %v, want a timeout", err)
	}
	within(t, asked, "the callout asked")
	pc.SetWriteDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() { _, err := pc.WriteTo([]byte("x"), waiting.LocalAddr()); errc <- err }()
	within(t, asked, "the callout asked")
	closed := make(chan error, 1)
	go func() { closed <- pc.Close() }()
	if err := within(t, closed, "Close with pended writes"); err != nil {
		t.Fatal(err)
	}
	if err := within(t, errc, "WriteTo after Close"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("WriteTo after Close: %v, want net.ErrClosed", err)
	}
	if _, err := pc.WriteTo([]byte("x"), timedOut.LocalAddr()); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("WriteTo after Close: %v, want net.ErrClosed", err)
	}
	w.end(t, leak)
}

// writeWithin is pc.WriteTo bounded: a WriteTo stuck on a pend fails the
// test.
func writeWithin(t *testing.T, pc net.PacketConn, msg string, to net.Addr) (int, error) {
	t.Helper()
	type result struct {
		n   int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		n, err := pc.WriteTo([]byte(msg), to)
		ch <- result{n, err}
	}()
	r := within(t, ch, "WriteTo")
	return r.n, r.err
}

// writePend is a UDP socket whose AUTH_CONNECT an asynchronous authorizer
// pends (decide answers it once asked), and whose CONNECT_REDIRECT sends
// datagrams for one remote to a proxy.
type writePend struct {
	e      *engine.Engine
	pc     net.PacketConn
	decide chan engine.ActionType
	asked  chan struct{}
	cr     *engine.ConnectRedirect
}

// end checks that no remote was classified twice (the callout asked with
// no decision due), closes the socket and checks that nothing is left.
func (w *writePend) end(t *testing.T, leak func()) {
	t.Helper()
	select {
	case <-w.asked:
		t.Fatal("a remote was classified twice")
	default:
	}
	if err := w.pc.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		t.Fatal(err)
	}
	w.e.RedirectHandleDestroy(w.cr.Handle)
	noLeaks(t, w.e)
	leak()
}

// pendedConnect is a writePend redirecting redirected's datagrams to proxy
// (the engine's pend timeout out of reach).
func pendedConnect(t *testing.T, redirected, proxy net.PacketConn) *writePend {
	t.Helper()
	a, decide, asked := asyncAuth()
	e, _ := newEngine(t, engine.Options{PendTimeout: time.Hour},
		callout{key: "r", layer: engine.LayerALEConnectRedirectV4, sublayer: 1, conds: []engine.Condition{port(apOf(redirected.LocalAddr()).Port())}},
		callout{key: "out", layer: engine.LayerALEAuthConnectV4, sublayer: 1, action: engine.ActionCalloutTerminating, reg: a.Registration()})
	dp := inproc.New(e, inproc.Options{})
	cr := &engine.ConnectRedirect{Handle: e.RedirectHandleCreate("r"), Target: redirectTo(apOf(proxy.LocalAddr()), dp.Identity().PID)}
	if err := e.RegisterCallout("r", cr.Registration()); err != nil {
		t.Fatal(err)
	}
	pc, err := (&inproc.ListenConfig{Datapath: dp}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return &writePend{e, pc, decide, asked, cr}
}
