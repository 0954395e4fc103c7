package inproc_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
	"fwp/proxy"
)

// Issue 12, item 1: a connection whose AUTH_RECV_ACCEPT an asynchronous
// callout pended and then permitted is authorized again by the whole
// layer: a lower sublayer's block still drops it, as it does when the
// callout permits inline.
func TestAcceptPendThenLowerBlock(t *testing.T) {
	for _, async := range []bool{false, true} {
		a, decide, asked := asyncAuth()
		reg := a.Registration()
		if !async {
			reg = engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) { out.Action = engine.ActionPermit }}
		}
		e, _ := newEngine(t, engine.Options{PendTimeout: time.Hour},
			callout{key: "acc", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 20, reg: reg},
			callout{key: "low", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 10, action: engine.ActionBlock})
		dp := inproc.New(e, inproc.Options{})
		ln := listen(t, &inproc.ListenConfig{Datapath: dp})
		accepted := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				c.Close()
			}
			accepted <- err
		}()
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if async {
			<-asked
			decide <- engine.ActionPermit
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, context.DeadlineExceeded) || isTimeoutErr(err) {
			t.Fatalf("async=%v: the connection a lower sublayer blocks is open: %v", async, err)
		}
		c.Close()
		ln.Close()
		if err := <-accepted; !errors.Is(err, net.ErrClosed) {
			t.Fatalf("async=%v: Accept returned %v, want only ErrClosed", async, err)
		}
		noLeaks(t, e)
	}
}

// The same for a UDP socket's first datagram from a remote.
func TestDatagramPendThenLowerBlock(t *testing.T) {
	a, decide, asked := asyncAuth()
	e, _ := newEngine(t, engine.Options{PendTimeout: time.Hour},
		callout{key: "in", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 20, reg: a.Registration()},
		callout{key: "low", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 10, action: engine.ActionBlock})
	pc, err := (&inproc.ListenConfig{Datapath: inproc.New(e, inproc.Options{})}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	src := mustPacket(t)
	if _, err := src.WriteTo([]byte("hello"), pc.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	read := make(chan error, 1)
	go func() {
		pc.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, _, err := pc.ReadFrom(make([]byte, 64))
		read <- err
	}()
	<-asked
	decide <- engine.ActionPermit
	if err := <-read; !isTimeout(err) {
		t.Fatalf("the datagram a lower sublayer blocks was read (err %v)", err)
	}
	pc.Close()
	noLeaks(t, e)
}

func isTimeoutErr(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Issue 12, item 8: records per connection. One Dialer shared by a
// proxy's dials, each dial's context carrying its own records: every
// connection carries its own, whatever the order the dials run in.
func TestPerConnectionRecords(t *testing.T) {
	srv := startEcho(t, mustListen(t))
	var mu sync.Mutex
	seen := map[engine.RedirectHandle]int{}
	e, _ := newEngine(t, engine.Options{}, callout{key: "obs", layer: engine.LayerALEAuthConnectV4, sublayer: 1, action: engine.ActionCalloutInspection,
		reg: engine.InlineInspection(func(req *engine.ClassifyRequest) {
			if r, ok := req.Meta.RedirectRecords.Last(); ok && req.Meta.Has(engine.MetaRedirectRecords) {
				mu.Lock()
				seen[r.Handle]++
				mu.Unlock()
			}
		})})
	dp := inproc.New(e, inproc.Options{})
	d := &inproc.Dialer{Datapath: dp}
	const n = 8
	blobs := make([][]byte, n)
	for i := range blobs {
		blobs[i] = e.MarshalRedirectRecords(engine.NewRedirectRecords(engine.RedirectRecord{Handle: engine.RedirectHandle(100 + i),
			Original: netip.MustParseAddrPort("192.0.2.1:80"), Redirected: srv.addr()}))
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := d.DialContext(proxy.WithRedirectRecords(context.Background(), blobs[i]), "tcp4", srv.addr().String())
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if r, ok := c.(*inproc.Conn).RedirectRecords().Last(); !ok || r.Handle != engine.RedirectHandle(100+i) {
				errs <- fmt.Errorf("dial %d carries records of handle %d", i, r.Handle)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	mu.Lock()
	for i := range n {
		if seen[engine.RedirectHandle(100+i)] != 1 {
			t.Errorf("AUTH_CONNECT saw the records of dial %d %d times", i, seen[engine.RedirectHandle(100+i)])
		}
	}
	mu.Unlock()
	// Records another engine issued are refused, nothing dialed.
	other := engine.New(engine.Options{})
	foreign := other.MarshalRedirectRecords(engine.NewRedirectRecords(engine.RedirectRecord{Handle: 1}))
	before := srv.settled(t, n) // the n dials above
	if c, err := d.DialContext(proxy.WithRedirectRecords(context.Background(), foreign), "tcp4", srv.addr().String()); !errors.Is(err, proxy.ErrInvalidArgument) {
		if c != nil {
			c.Close() // else the echo server's cleanup waits for it
		}
		t.Fatalf("foreign records: %v", err)
	}
	if srv.accepted.Load() != before {
		t.Fatal("a dial with refused records connected")
	}
	// A plain pipe is not a socket: the datapath's backend says so.
	defer proxy.Register(dp)()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, err := proxy.QueryRedirectRecords(a); !errors.Is(err, proxy.ErrNotSocket) {
		t.Fatalf("pipe: %v, want ErrNotSocket", err)
	}
	if _, err := dp.QueryAccepted(a); !errors.Is(err, proxy.ErrNotSocket) {
		t.Fatalf("the datapath's backend on a pipe: %v, want ErrNotSocket", err)
	}
	noLeaks(t, e)
}

// A Dialer bound to a local address runs BIND_REDIRECT and
// RESOURCE_ASSIGNMENT before the connect layers: a bind redirect moves
// the socket, a block refuses the dial, and Close releases the resource.
func TestDialerLocalAddressBindLayers(t *testing.T) {
	srv := startEcho(t, mustListen(t))
	to := reservePort(t)
	var mu sync.Mutex
	count := map[engine.LayerID]int{}
	var assigned []netip.AddrPort
	record := engine.InlineInspection(func(req *engine.ClassifyRequest) {
		mu.Lock()
		count[req.Layer]++
		if req.Layer == engine.LayerALEResourceAssignmentV4 {
			assigned = append(assigned, netip.AddrPortFrom(req.Values.Get(engine.FieldIPLocalAddress).Addr(), uint16(req.Values.Uint(engine.FieldIPLocalPort))))
			if req.Meta.Has(engine.MetaFlowHandle) || req.Meta.Has(engine.MetaPacketDirection) {
				t.Errorf("a socket's resource assignment carries a flow: %+v", *req.Meta)
			}
		}
		mu.Unlock()
	})
	br := &engine.BindRedirect{Target: func(req *engine.ClassifyRequest) (netip.AddrPort, bool) { return to, true }}
	e, _ := newEngine(t, engine.Options{},
		callout{key: "bind", layer: engine.LayerALEBindRedirectV4, sublayer: 2, reg: br.Registration()},
		callout{key: "obs-b", layer: engine.LayerALEBindRedirectV4, sublayer: 1, action: engine.ActionCalloutInspection, reg: record},
		callout{key: "obs-r", layer: engine.LayerALEResourceAssignmentV4, sublayer: 1, action: engine.ActionCalloutInspection, reg: record},
		callout{key: "obs-x", layer: engine.LayerALEResourceReleaseV4, sublayer: 1, action: engine.ActionCalloutInspection, reg: record})
	dp := inproc.New(e, inproc.Options{})
	d := &inproc.Dialer{Datapath: dp, Net: net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}}
	c, err := d.Dial("tcp4", srv.addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := apOf(c.LocalAddr()); got != to {
		t.Fatalf("bound to %v; the bind redirect moved it to %v", got, to)
	}
	c.Close()
	mu.Lock()
	if count[engine.LayerALEBindRedirectV4] != 1 || count[engine.LayerALEResourceAssignmentV4] != 1 || count[engine.LayerALEResourceReleaseV4] != 1 ||
		len(assigned) != 1 || assigned[0] != to {
		t.Fatalf("classified %v, assigned %v", count, assigned)
	}
	mu.Unlock()
	// A dialer without a local address binds nothing of its own.
	c, err = (&inproc.Dialer{Datapath: dp}).Dial("tcp4", srv.addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	mu.Lock()
	if count[engine.LayerALEBindRedirectV4] != 1 || count[engine.LayerALEResourceAssignmentV4] != 1 {
		t.Fatalf("a dialer without a local address ran the bind layers: %v", count)
	}
	mu.Unlock()

	// A block at RESOURCE_ASSIGNMENT refuses the dial before it connects.
	e2, _ := newEngine(t, engine.Options{}, callout{key: "no", layer: engine.LayerALEResourceAssignmentV4, sublayer: 1, action: engine.ActionBlock})
	before := srv.settled(t, 2) // the two dials above
	d2 := &inproc.Dialer{Datapath: inproc.New(e2, inproc.Options{}), Net: net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}}
	if c, err := d2.Dial("tcp4", srv.addr().String()); !isBlocked(err) {
		if c != nil {
			c.Close()
		}
		t.Fatalf("resource assignment blocked: %v", err)
	}
	time.Sleep(20 * time.Millisecond)
	if srv.accepted.Load() != before {
		t.Fatal("the blocked dial connected")
	}
	noLeaks(t, e)
	noLeaks(t, e2)
}

// IS_WILDCARD_BIND is set at the bind layers (BIND_REDIRECT and
// RESOURCE_ASSIGNMENT) for an unspecified local address, and nowhere else —
// not at AUTH_LISTEN for a wildcard listener, not at AUTH_CONNECT for a
// dialer bound to 0.0.0.0 — as the kernel hooks set it, so a policy on the
// flag matches alike on both datapaths.
func TestWildcardBindFlagOnlyAtBindLayers(t *testing.T) {
	var mu sync.Mutex
	seen := map[engine.LayerID][]bool{}
	record := engine.InlineInspection(func(req *engine.ClassifyRequest) {
		mu.Lock()
		seen[req.Layer] = append(seen[req.Layer], req.Values.Uint(engine.FieldFlags)&uint64(engine.FlagIsWildcardBind) != 0)
		mu.Unlock()
	})
	var cs []callout
	for i, l := range []engine.LayerID{engine.LayerALEBindRedirectV4, engine.LayerALEResourceAssignmentV4, engine.LayerALEAuthListenV4, engine.LayerALEAuthConnectV4} {
		cs = append(cs, callout{key: fmt.Sprintf("obs-%d", i), layer: l, sublayer: 1, action: engine.ActionCalloutInspection, reg: record})
	}
	e, _ := newEngine(t, engine.Options{}, cs...)
	dp := inproc.New(e, inproc.Options{})
	take := func() map[engine.LayerID][]bool {
		mu.Lock()
		defer mu.Unlock()
		out := seen
		seen = map[engine.LayerID][]bool{}
		return out
	}
	check := func(what string, want map[engine.LayerID][]bool) {
		t.Helper()
		if got := take(); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("%s: IS_WILDCARD_BIND by layer %v, want %v", what, got, want)
		}
	}
	for _, c := range []struct {
		addr string
		wild bool
	}{{"0.0.0.0:0", true}, {"127.0.0.1:0", false}} {
		ln, err := (&inproc.ListenConfig{Datapath: dp}).Listen(context.Background(), "tcp4", c.addr)
		if err != nil {
			t.Fatal(err)
		}
		port := apOf(ln.Addr()).Port()
		check("listen on "+c.addr, map[engine.LayerID][]bool{
			engine.LayerALEBindRedirectV4: {c.wild}, engine.LayerALEResourceAssignmentV4: {c.wild}, engine.LayerALEAuthListenV4: {false}})
		srv := startEcho(t, ln)
		d := &inproc.Dialer{Datapath: dp, Net: net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4zero}}}
		conn, err := d.Dial("tcp4", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String())
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
		check("dial from 0.0.0.0", map[engine.LayerID][]bool{
			engine.LayerALEBindRedirectV4: {true}, engine.LayerALEResourceAssignmentV4: {true}, engine.LayerALEAuthConnectV4: {false}})
		ln.Close()
		srv.wg.Wait()
	}
}
