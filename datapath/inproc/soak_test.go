package inproc_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	"fwp/datapath/inproc"
	"fwp/engine"
)

// soakOps is how many dials the soak makes through one engine and one
// datapath (the project's floor for a datapath's soak is 100,000).
var soakOps = func() int {
	if n, err := strconv.Atoi(os.Getenv("FWP_SOAK_OPS")); err == nil && n > 0 {
		return n
	}
	return 100_000
}()

// answerOnce reads one 4-byte message per connection, answers it and
// closes first, so that TIME_WAIT stays on the server's side.
func answerOnce(t *testing.T, ln net.Listener) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				buf := make([]byte, 4)
				if _, err := io.ReadFull(c, buf); err == nil {
					c.Write(buf)
				}
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
}

func fdCount() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	return len(ents)
}

// TestSoak runs soakOps dials through one engine's in-process datapath, a
// quarter of each kind: pended at AUTH_CONNECT and at AUTH_RECV_ACCEPT (an
// asynchronous authorizer permits both), blocked, redirected to a proxy
// that dials the original destination with the records set, and plain.
// Every one must end as it should, and the engine, the goroutines and the
// file descriptors must come back to their level.
func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("the soak runs without -short")
	}
	checkGoroutines := goroutines(t)
	fds := fdCount()
	auth := &engine.AsyncAuthorizer{Decide: func(context.Context, engine.LayerID, engine.Values, engine.Metadata) engine.ActionType {
		return engine.ActionPermit
	}}
	pendedPort, blockedPort, origin := reservePort(t), reservePort(t), reservePort(t)
	local := func(p uint16) engine.Condition {
		return engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(p)}
	}
	e, _ := newEngine(t, engine.Options{},
		callout{key: "auth-connect", layer: engine.LayerALEAuthConnectV4, sublayer: 1, action: engine.ActionCalloutTerminating,
			conds: []engine.Condition{port(pendedPort.Port())}, reg: auth.Registration()},
		callout{key: "auth-accept", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 1, action: engine.ActionCalloutTerminating,
			conds: []engine.Condition{local(pendedPort.Port())}, reg: auth.Registration()},
		callout{key: "block", layer: engine.LayerALEAuthConnectV4, sublayer: 2, action: engine.ActionBlock,
			conds: []engine.Condition{port(blockedPort.Port())}},
		callout{key: "r", layer: engine.LayerALEConnectRedirectV4, sublayer: 3, conds: []engine.Condition{port(origin.Port())}},
	)
	dp := inproc.New(e, inproc.Options{})
	lc := &inproc.ListenConfig{Datapath: dp}
	pl, err := lc.Listen(context.Background(), "tcp4", pendedPort.String())
	if err != nil {
		t.Fatal(err)
	}
	answerOnce(t, pl)
	ol, err := net.Listen("tcp4", origin.String())
	if err != nil {
		t.Fatal(err)
	}
	answerOnce(t, ol)
	px := startProxy(t, dp, listen(t, lc))
	handle := e.RedirectHandleCreate("r")
	cr := &engine.ConnectRedirect{Handle: handle, Target: redirectTo(px.addr(), dp.Identity().PID)}
	if err := e.RegisterCallout("r", cr.Registration()); err != nil {
		t.Fatal(err)
	}
	plainLn := listen(t, lc)
	answerOnce(t, plainLn)

	var ok [4]atomic.Int64
	var firstErr atomic.Value
	fail := func(err error) { firstErr.CompareAndSwap(nil, err) }
	exchange := func(c net.Conn, i int) error {
		msg := []byte(fmt.Sprintf("%04d", i%10000))
		if _, err := c.Write(msg); err != nil {
			return err
		}
		got, err := io.ReadAll(c)
		if err != nil || string(got) != string(msg) {
			return fmt.Errorf("answer %q to %q: %v", got, msg, err)
		}
		return nil
	}
	targets := [4]string{pendedPort.String(), blockedPort.String(), origin.String(), plainLn.Addr().String()}
	var wg sync.WaitGroup
	const workers = 4
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := &inproc.Dialer{Datapath: dp}
			for i := w; i < soakOps; i += workers {
				kind := i % 4
				c, err := d.DialContext(context.Background(), "tcp4", targets[kind])
				if kind == 1 {
					if !isBlocked(err) {
						fail(fmt.Errorf("dial %s (blocked): %v", targets[kind], err))
						if err == nil {
							c.Close()
						}
						continue
					}
					ok[kind].Add(1)
					continue
				}
				if err != nil {
					fail(fmt.Errorf("dial %s: %w", targets[kind], err))
					continue
				}
				err = exchange(c, i)
				c.Close()
				if err != nil {
					fail(fmt.Errorf("kind %d: %w", kind, err))
					continue
				}
				ok[kind].Add(1)
			}
		}()
	}
	wg.Wait()
	for kind, name := range []string{"pended", "blocked", "redirected", "plain"} {
		want := soakOps / 4
		if kind < soakOps%4 {
			want++
		}
		if n := ok[kind].Load(); n != int64(want) {
			t.Errorf("%s: %d of %d dials ended as they should; first error: %v", name, n, want, firstErr.Load())
		}
	}
	if errs := px.errors(); len(errs) > 0 {
		t.Errorf("the proxy failed %d times; first: %v", len(errs), errs[0])
	}
	if n := px.accepted.Load(); n != int64(soakOps/4+min(1, soakOps%4/3)) {
		t.Errorf("the proxy accepted %d connections (a loop, or a redirect missed?)", n)
	}
	// Everything the engine holds goes with the connections.
	if err := e.RedirectHandleDestroy(handle); err != nil {
		t.Fatal(err)
	}
	noLeaks(t, e)
	px.stop()
	pl.Close()
	ol.Close()
	plainLn.Close()
	runtime.GC()
	checkGoroutines()
	if n := fdCount(); n > fds+2 {
		t.Errorf("fds: %d before, %d after", fds, n)
	}
}
