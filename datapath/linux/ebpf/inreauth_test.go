//go:build linux

package ebpf

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
)

func init() { testutil.RegisterHelper("inhold", inHoldHelper) }

// inHoldHelper is a server in the test cgroup that keeps the connections
// it accepts: "listen NET ADDR" listens (answers "ok"); each accepted
// connection echoes until it fails, then is closed.
func inHoldHelper([]string) error {
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) != 3 || f[0] != "listen" {
			continue
		}
		ln, err := net.Listen(f[1], f[2])
		if err != nil {
			fmt.Println(err)
			continue
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { io.Copy(c, c); c.Close() }()
			}
		}()
		fmt.Println("ok")
	}
	return in.Err()
}

// inEcho reports whether the connection still echoes.
func inEcho(c net.Conn) error {
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("x")); err != nil {
		return err
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil {
		return err
	}
	return nil
}

// TestReauthorizeAcceptedFlows: a server in the hooked cgroup, clients
// outside it (two v4 peers, one v6). Their accepted connections are live
// flows at ALE_AUTH_RECV_ACCEPT with the listener's owner; a pass under an
// unchanged policy resets nothing; a policy that blocks one client's
// address at AUTH_RECV_ACCEPT resets that established connection (the
// client sees it reset) and leaves the others; the flow layers see the
// accepted connections' establishment and closure with direction
// inbound.
func TestReauthorizeAcceptedFlows(t *testing.T) {
	d, cg := reauthSetup(t)
	if err := d.EnableFlowEvents(); err != nil {
		testutil.Unavailable(t, err)
	}
	const port4, port6, portDual = 7311, 7312, 7313
	// Flow layer callouts record the direction of the server's flows.
	e := engine.New(engine.Options{})
	var mu sync.Mutex
	dirs := map[string][]engine.Direction{} // "est"/"clo" + remote
	if err := e.Update(func(tx *engine.Txn) error {
		p, err := tx.AddProvider(engine.Provider{Key: "inflows"})
		if err != nil {
			return err
		}
		for i, l := range []engine.LayerID{engine.LayerALEFlowEstablishedV4, engine.LayerALEEndpointClosureV4,
			engine.LayerALEFlowEstablishedV6, engine.LayerALEEndpointClosureV6} {
			key := fmt.Sprintf("inflows.%d", i)
			what := []string{"est", "clo"}[i%2]
			if err := e.RegisterCallout(key, engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
				out.Action = engine.ActionContinue
				mu.Lock()
				k := what + " " + req.Values.Get(engine.FieldIPRemoteAddress).Addr().String()
				dirs[k] = append(dirs[k], req.Meta.Direction)
				if d := engine.Direction(req.Values.Uint(engine.FieldDirection)); d != req.Meta.Direction {
					dirs[k] = append(dirs[k], 99)
				}
				mu.Unlock()
			}}); err != nil {
				return err
			}
			co, err := tx.AddCallout(engine.Callout{Key: key, Provider: p, Layer: l})
			if err != nil {
				return err
			}
			lp := uint16(port4)
			if l.V6() {
				lp = port6
			}
			if _, err := tx.AddFilter(engine.Filter{Layer: l, Action: engine.Action{Type: engine.ActionCalloutInspection, Callout: co},
				Conditions: []engine.Condition{{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(lp)}}}); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	apply(t, d, e)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	fl := &FlowLayers{Engine: e}
	go func() { done <- d.ReadFlowEvents(ctx, func(ev FlowEvent) { fl.Handle(ev) }) }()
	defer func() { cancel(); <-done }()

	h := testutil.StartHelper(t, cg, "inhold")
	for _, l := range []string{fmt.Sprintf("listen tcp4 0.0.0.0:%d", port4), fmt.Sprintf("listen tcp6 [::1]:%d", port6), fmt.Sprintf("listen tcp [::]:%d", portDual)} {
		if ans, err := h.Call([]byte(l)); err != nil || string(ans) != "ok\n" {
			t.Fatalf("%s: %q %v", l, ans, err)
		}
	}
	// The clients: in the server's namespace, outside the hooked cgroup.
	dial := func(netw, from, to string) net.Conn {
		var c net.Conn
		err := inNetnsPid(h.Pid(), func() error {
			d := net.Dialer{Timeout: time.Second, LocalAddr: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(from))}
			var err error
			c, err = d.Dial(netw, to)
			return err
		})
		if err != nil {
			t.Fatalf("dial %s from %s: %v", to, from, err)
		}
		t.Cleanup(func() { c.Close() })
		if err := inEcho(c); err != nil {
			t.Fatalf("%s from %s: %v", to, from, err)
		}
		return c
	}
	blocked := dial("tcp4", "127.0.0.9:0", fmt.Sprintf("127.0.0.1:%d", port4))
	kept := dial("tcp4", "127.0.0.8:0", fmt.Sprintf("127.0.0.1:%d", port4))
	kept6 := dial("tcp6", "[::1]:0", fmt.Sprintf("[::1]:%d", port6))
	// A v4 client of a dual-stack listener: a v4 flow (v4-mapped socket).
	dual := dial("tcp4", "127.0.0.7:0", fmt.Sprintf("127.0.0.1:%d", portDual))

	pass, err := d.Reauthorize(e, nil)
	if err != nil {
		t.Fatal(err)
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", h.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	flows, err := d.LiveFlows(ns)
	ns.Close()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]LiveFlow{}
	for _, f := range flows {
		got[f.Remote.Addr().String()] = f
	}
	for _, c := range []struct {
		remote string
		layer  engine.LayerID
		local  string
	}{{"127.0.0.9", engine.LayerALEAuthRecvAcceptV4, "127.0.0.1"}, {"127.0.0.8", engine.LayerALEAuthRecvAcceptV4, "127.0.0.1"}, {"::1", engine.LayerALEAuthRecvAcceptV6, "::1"},
		{"127.0.0.7", engine.LayerALEAuthRecvAcceptV4, "127.0.0.1"}} {
		f, ok := got[c.remote]
		if !ok {
			t.Logf("live flows: %+v", flows)
		}
		if !ok || !f.Inbound || f.Layer != c.layer || f.Local.Addr().String() != c.local || f.PID != uint32(h.Pid()) || f.UID != 0 || f.App == (AppIdentity{}) || f.Protocol != 6 {
			t.Fatalf("accepted flow from %s: %+v (found %v), want inbound at %v from the server (pid %d)", c.remote, f, ok, c.layer, h.Pid())
		}
	}
	if len(flows) != 4 || pass.Flows != 4 || pass.Inbound != 4 || len(pass.Resets) != 0 {
		t.Fatalf("unchanged policy: pass %+v, live flows %+v; want the 4 accepted connections and no reset", pass, flows)
	}

	// Block the first client's address at AUTH_RECV_ACCEPT.
	if err := e.Update(func(tx *engine.Txn) error {
		_, err := tx.AddFilter(blockFilter(engine.LayerALEAuthRecvAcceptV4,
			engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(netip.MustParseAddr("127.0.0.9"))}))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	p, err := Compile(e.View())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Apply(p); err != nil {
		t.Fatal(err)
	}
	pass, err = d.Reauthorize(e, p)
	if err != nil {
		t.Fatal(err)
	}
	if pass.Flows != 4 || len(pass.Resets) != 1 || pass.Resets[0].Flow.Remote.Addr().String() != "127.0.0.9" ||
		pass.Resets[0].Result.Permitted() || pass.Resets[0].Flow.Layer != engine.LayerALEAuthRecvAcceptV4 {
		t.Fatalf("after blocking 127.0.0.9: %+v, want its connection reset", pass)
	}
	if err := inEcho(blocked); err == nil {
		t.Fatal("the blocked client's connection still echoes")
	} else {
		t.Logf("blocked client: %v", err)
	}
	for _, c := range []net.Conn{kept, kept6, dual} {
		if err := inEcho(c); err != nil {
			t.Fatalf("a permitted client's connection: %v", err)
		}
	}
	// Unchanged policy again: nothing more.
	pass, err = d.Reauthorize(e, p)
	if err != nil || pass.Flows != 3 || len(pass.Resets) != 0 {
		t.Fatalf("second pass: %+v %v, want 3 flows, no reset", pass, err)
	}
	// Closing the clients ends the server's sockets: closure reports.
	kept.Close()
	kept6.Close()
	want := map[string]int{"est 127.0.0.9": 1, "est 127.0.0.8": 1, "est ::1": 1, "clo 127.0.0.9": 1, "clo 127.0.0.8": 1, "clo ::1": 1}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		n := 0
		for k := range want {
			n += len(dirs[k])
		}
		mu.Unlock()
		if n >= len(want) || time.Now().After(deadline) {
			break
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for k := range want {
		if ds := dirs[k]; len(ds) != 1 || ds[0] != engine.DirectionInbound {
			t.Errorf("%s: directions %v, want inbound once (all %v)", k, ds, dirs)
		}
	}
}
