//go:build linux

package nfqueue

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
	"fwp/internal/testutil"
)

// Ports of the inbound UDP helper's echo servers; the callout decides by
// local port.
const (
	udpInPermit     = 8201 // permits at once
	udpInPend       = 8202 // pends 300 ms, then permits
	udpInBlock      = 8203 // blocks
	udpInFailOpen   = 8204 // pends past the deadline; the filter fails open
	udpInFailClosed = 8205 // pends past the deadline; the filter fails closed
	udpInHeld       = 8206 // pends until the test completes it
	udpInKernel     = 8207 // a plain permit filter: the kernel decides
)

var udpInPorts = []int{udpInPermit, udpInPend, udpInBlock, udpInFailOpen, udpInFailClosed, udpInHeld, udpInKernel}

func init() { testutil.RegisterHelper("inudp", inUDPHelper) }

// inUDPHelper runs in the test's cgroup and its own network namespace:
// unconnected UDP echo servers on the ports of 127.0.0.1 and ::1, each
// counting the datagrams it received; "count ADDR PORT" answers a count.
func inUDPHelper([]string) error {
	counts := map[string]*atomic.Int64{}
	ports := slices.Clone(udpInPorts)
	for p := diffFirst; p <= diffLast; p++ {
		ports = append(ports, p) // the differential test's
	}
	for _, p := range ports {
		for _, addr := range []string{"127.0.0.1", "[::1]"} {
			a := addr + ":" + strconv.Itoa(p)
			pc, err := net.ListenPacket("udp", a)
			if err != nil {
				return err
			}
			n := new(atomic.Int64)
			counts[a] = n
			go func() {
				buf := make([]byte, 2048)
				for {
					k, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					n.Add(1)
					pc.WriteTo(buf[:k], from)
				}
			}()
		}
	}
	fmt.Println("ready")
	var bound []net.PacketConn
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) == 2 && f[0] == "bind" {
			// bind N: N more UDP sockets bound (explicitly, to a port the
			// kernel picks), kept open
			n, _ := strconv.Atoi(f[1])
			var err error
			for range n {
				var pc net.PacketConn
				if pc, err = net.ListenPacket("udp4", "127.0.0.1:0"); err != nil {
					break
				}
				bound = append(bound, pc)
			}
			fmt.Println(len(bound), err)
			continue
		}
		if len(f) == 1 && f[0] == "unbind" {
			for _, pc := range bound {
				pc.Close()
			}
			bound = nil
			fmt.Println("ok")
			continue
		}
		if len(f) == 3 && f[0] == "count" {
			if n, ok := counts[f[1]+":"+f[2]]; ok {
				fmt.Println(n.Load())
				continue
			}
		}
		fmt.Println("unknown command")
	}
	return in.Err()
}

// udpSeen is what the inbound UDP callout was given.
type udpSeen struct {
	proto         uint8
	remote, local string
	uid, pid      uint32
	cgroup        uint64
	dir           engine.Direction
	path          string
	handle        uint64
}

type inUDPFixture struct {
	eng    *engine.Engine
	dp     *ebpf.Datapath
	h      *testutil.Helper
	path   *Path
	netns  *os.File
	cg     *testutil.Cgroup
	calls  atomic.Int64
	last   atomic.Pointer[udpSeen]
	heldIn chan func(reinject bool) error
}

// newInUDPFixture: Go callouts at AUTH_RECV_ACCEPT (v4, v6) decide the
// inbound UDP helper's ports by local port.
func newInUDPFixture(t testing.TB, pendTimeout time.Duration) *inUDPFixture {
	d := loadDatapath(t)
	fx := &inUDPFixture{dp: d, heldIn: make(chan func(bool) error, 64)}
	fx.eng = engine.New(engine.Options{PendTimeout: pendTimeout})
	fx.cg = testutil.NewCgroup(t)
	for _, key := range []string{"test.inudp", "test.inudp6"} {
		if err := fx.eng.RegisterCallout(key, engine.CalloutRegistration{Classify: fx.classify}); err != nil {
			t.Fatal(err)
		}
	}
	if err := fx.eng.Update(inUDPPolicy); err != nil {
		t.Fatal(err)
	}
	pol, err := ebpf.Compile(fx.eng.View())
	if err != nil {
		t.Fatal(err)
	}
	if !pol.InboundCallouts() || !pol.InboundUDPCallouts() {
		t.Fatal("the policy has inbound UDP callout filters, Compile says none")
	}
	if err := d.Apply(pol); err != nil {
		t.Fatal(err)
	}
	if err := d.Attach(fx.cg.Path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Detach(fx.cg.Path)
		empty, _ := ebpf.Compile(engine.New(engine.Options{}).View())
		d.Apply(empty)
	})
	// The helper binds after the hooks are attached: its sockets' owners
	// are recorded.
	fx.h = testutil.StartHelper(t, fx.cg, "inudp")
	if line, err := fx.h.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		t.Fatalf("helper: %q %v", line, err)
	}
	fx.netns, err = os.Open(fmt.Sprintf("/proc/%d/ns/net", fx.h.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	fx.path, err = Start(fx.eng, d, Options{NetNS: int(fx.netns.Fd())})
	if err != nil {
		testutil.Unavailable(t, err)
	}
	t.Cleanup(func() {
		if fx.path != nil {
			fx.path.Close()
		}
		fx.netns.Close()
	})
	ports, all := pol.InboundCalloutPorts()
	if all {
		ports = nil
	}
	if err := fx.path.EnableInbound(ports, fx.cg.Path); err != nil {
		testutil.Unavailable(t, err)
	}
	if err := fx.path.EnableInboundUDP(); err != nil {
		testutil.Unavailable(t, err)
	}
	return fx
}

func inUDPPolicy(tx *engine.Txn) error {
	p, err := tx.AddProvider(engine.Provider{Key: "test"})
	if err != nil {
		return err
	}
	sl, err := tx.AddSublayer(engine.Sublayer{Key: "test", Provider: p, Weight: 10})
	if err != nil {
		return err
	}
	co, err := tx.AddCallout(engine.Callout{Key: "test.inudp", Provider: p, Layer: engine.LayerALEAuthRecvAcceptV4})
	if err != nil {
		return err
	}
	co6, err := tx.AddCallout(engine.Callout{Key: "test.inudp6", Provider: p, Layer: engine.LayerALEAuthRecvAcceptV6})
	if err != nil {
		return err
	}
	local := func(port int) engine.Condition {
		return engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(port))}
	}
	udp := engine.Condition{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)}
	for _, port := range []int{udpInPermit, udpInPend, udpInBlock, udpInFailOpen, udpInFailClosed, udpInHeld} {
		var flags engine.FilterFlags
		if port == udpInFailOpen {
			flags = engine.FilterPermitIfCalloutUnregistered
		}
		if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthRecvAcceptV4, Sublayer: sl, Provider: p, Flags: flags,
			Conditions: []engine.Condition{udp, local(port)}, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co}}); err != nil {
			return err
		}
	}
	if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthRecvAcceptV4, Sublayer: sl, Provider: p,
		Conditions: []engine.Condition{udp, local(udpInKernel)}, Action: engine.Action{Type: engine.ActionPermit}}); err != nil {
		return err
	}
	for _, port := range []int{udpInPermit, udpInBlock} {
		if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthRecvAcceptV6, Sublayer: sl, Provider: p,
			Conditions: []engine.Condition{udp, local(port)}, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co6}}); err != nil {
			return err
		}
	}
	return nil
}

func (fx *inUDPFixture) classify(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
	fx.calls.Add(1)
	m := req.Meta
	fx.last.Store(&udpSeen{proto: uint8(req.Values.Uint(engine.FieldIPProtocol)), remote: req.Values.Get(engine.FieldIPRemoteAddress).String(),
		local: req.Values.Get(engine.FieldIPLocalAddress).String() + ":" + strconv.Itoa(int(req.Values.Uint(engine.FieldIPLocalPort))),
		uid:   m.UserID, pid: m.ProcessID, cgroup: m.CgroupID, dir: m.Direction, path: m.ProcessPath, handle: m.TransportEndpointHandle})
	reauth := uint32(req.Values.Uint(engine.FieldFlags))&engine.FlagIsReauthorize != 0
	pend := func() *engine.Pend {
		p, err := req.PendOperation()
		if err != nil {
			out.Action = engine.ActionBlock
			return nil
		}
		out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
		return p
	}
	switch int(req.Values.Uint(engine.FieldIPLocalPort)) {
	case udpInPermit:
		out.Action = engine.ActionPermit
	case udpInPend:
		if reauth {
			out.Action = engine.ActionPermit
			return
		}
		data := req.LayerData
		if _, ok := data.(*InboundRequest); !ok {
			out.Action = engine.ActionBlock
			return
		}
		if p := pend(); p != nil {
			time.AfterFunc(pendDelay, func() { fx.eng.CompleteOperation(p, data) })
		}
	case udpInFailOpen, udpInFailClosed:
		pend()
	case udpInHeld:
		if reauth {
			out.Action = engine.ActionPermit
			return
		}
		data := req.LayerData
		if p := pend(); p != nil {
			fx.heldIn <- func(reinject bool) error {
				if !reinject {
					return fx.eng.CompleteOperation(p, nil)
				}
				return fx.eng.CompleteOperation(p, data)
			}
		}
	default:
		out.Action = engine.ActionBlock
	}
}

// exchange sends n datagrams from a new socket outside the cgroup (in the
// helper's namespace; bound to local port from, 0: any) to addr, one
// after another, each waiting for its echo up to timeout: the echoes
// received and the time to the first.
func (fx *inUDPFixture) exchange(t testing.TB, network, addr string, from, n int, timeout time.Duration) (got int, first time.Duration, err error) {
	t.Helper()
	if nerr := inNetns(fx.netns, func() { got, first, err = udpExchange(network, addr, from, n, timeout) }); nerr != nil {
		t.Fatal(nerr)
	}
	return
}

func udpExchange(network, addr string, from, n int, timeout time.Duration) (got int, first time.Duration, err error) {
	ra, err := net.ResolveUDPAddr(network, addr)
	if err != nil {
		return 0, 0, err
	}
	var la *net.UDPAddr
	if from != 0 {
		la = &net.UDPAddr{IP: ra.IP, Port: from}
	}
	start := time.Now()
	c, err := net.DialUDP(network, la, ra)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	buf := make([]byte, 64)
	for i := range n {
		msg := []byte("datagram " + strconv.Itoa(i))
		if _, err := c.Write(msg); err != nil {
			return got, first, err
		}
		c.SetReadDeadline(time.Now().Add(timeout))
		k, err := c.Read(buf)
		if err != nil {
			return got, first, err
		}
		if string(buf[:k]) != string(msg) {
			return got, first, fmt.Errorf("echo %q, want %q", buf[:k], msg)
		}
		if got == 0 {
			first = time.Since(start)
		}
		got++
	}
	return got, first, nil
}

// count is how many datagrams the helper's server on addr:port received.
func (fx *inUDPFixture) count(t testing.TB, addr string, port int) int {
	t.Helper()
	line, err := fx.h.Call(fmt.Appendf(nil, "count %s %d", addr, port))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(line)))
	if err != nil {
		t.Fatalf("count: %q", line)
	}
	return n
}

// clean: nothing held or pended.
func (fx *inUDPFixture) clean(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		o := fx.eng.Outstanding()
		st := fx.path.Stats()
		n := 0
		fx.path.inu.held.Range(func(any, any) bool { n++; return true })
		fx.path.udpHeld.Range(func(any, any) bool { n++; return true })
		if o == (engine.Outstanding{}) && st.Held == 0 && n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind: engine %+v, held %d, held UDP flows %d", o, st.Held, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestInboundUDPCallout: UDP echo servers in the hooked cgroup, a client
// outside it; Go callouts at AUTH_RECV_ACCEPT permit (the datagram reaches
// the server and the echo comes back; later datagrams of the flow pass
// without another upcall), block (never delivered), pend 300 ms then
// permit (delivered after), and pend past the deadline under fail-open
// (delivered) and fail-closed (never delivered) filters; IPv6 at
// AUTH_RECV_ACCEPT_V6.
func TestInboundUDPCallout(t *testing.T) {
	fx := newInUDPFixture(t, pendTimeout)
	addr := func(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }
	st0 := fx.path.Stats()
	if got, _, err := fx.exchange(t, "udp4", addr(udpInPermit), 0, 1, 5*time.Second); err != nil || got != 1 {
		t.Fatalf("permit: %d echoes, %v", got, err)
	}
	seen := fx.last.Load()
	if seen == nil || seen.proto != unix.IPPROTO_UDP || seen.remote != "127.0.0.1" || seen.local != addr(udpInPermit) || seen.uid != 0 ||
		seen.pid != uint32(fx.h.Pid()) || seen.cgroup != fx.cg.ID || seen.dir != engine.DirectionInbound || seen.handle == 0 {
		t.Fatalf("the callout saw %+v; want UDP from 127.0.0.1 to %s, the socket's owner (uid 0, pid %d, cgroup %d), inbound, the socket as handle", seen, addr(udpInPermit), fx.h.Pid(), fx.cg.ID)
	}
	if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", fx.h.Pid())); seen.path != exe {
		t.Errorf("the callout saw process path %q, want %q", seen.path, exe)
	}
	// One flow, 50 datagrams: one upcall, one callout call.
	calls, q0 := fx.calls.Load(), fx.path.Stats().Queued
	if got, _, err := fx.exchange(t, "udp4", addr(udpInPermit), 0, 50, 5*time.Second); err != nil || got != 50 {
		t.Fatalf("permit, 50 datagrams on one flow: %d echoes, %v", got, err)
	}
	if c, q := fx.calls.Load()-calls, fx.path.Stats().Queued-q0; c != 1 || q != 1 {
		t.Fatalf("50 datagrams of one permitted flow: %d callout calls, %d queued; want 1 and 1", c, q)
	}
	if got, _, err := fx.exchange(t, "udp4", addr(udpInBlock), 0, 1, time.Second); !isTimeout(err) || got != 0 {
		t.Fatalf("block: %d echoes, %v; want a timeout", got, err)
	}
	if n := fx.count(t, "127.0.0.1", udpInBlock); n != 0 {
		t.Fatalf("block: the server received %d datagrams, want 0", n)
	}
	if got, took, err := fx.exchange(t, "udp4", addr(udpInPend), 0, 1, 5*time.Second); err != nil || got != 1 || took < pendDelay {
		t.Fatalf("pend %v then permit: %d echoes, %v after %v; want the echo after the pend", pendDelay, got, err, took)
	}
	if got, took, err := fx.exchange(t, "udp4", addr(udpInFailOpen), 0, 1, 5*time.Second); err != nil || got != 1 || took < pendTimeout {
		t.Fatalf("pend past the deadline, fail-open: %d echoes, %v after %v; want the echo after %v", got, err, took, pendTimeout)
	}
	if got, _, err := fx.exchange(t, "udp4", addr(udpInFailClosed), 0, 1, 2*time.Second); !isTimeout(err) || got != 0 {
		t.Fatalf("pend past the deadline, fail-closed: %d echoes, %v; want a timeout", got, err)
	}
	if n := fx.count(t, "127.0.0.1", udpInFailClosed); n != 0 {
		t.Fatalf("fail-closed: the server received %d datagrams, want 0", n)
	}
	// A plain permit filter: the kernel decides, nothing is queued.
	q0 = fx.path.Stats().Queued
	if got, _, err := fx.exchange(t, "udp4", addr(udpInKernel), 0, 3, 5*time.Second); err != nil || got != 3 {
		t.Fatalf("kernel permit: %d echoes, %v", got, err)
	}
	if q := fx.path.Stats().Queued - q0; q != 0 {
		t.Fatalf("%d datagrams to a port no callout filter matches were queued, want 0", q)
	}
	// IPv6: AUTH_RECV_ACCEPT_V6.
	if got, _, err := fx.exchange(t, "udp6", "[::1]:"+strconv.Itoa(udpInPermit), 0, 3, 5*time.Second); err != nil || got != 3 {
		t.Fatalf("v6 permit: %d echoes, %v", got, err)
	}
	if seen := fx.last.Load(); seen.local != "::1:"+strconv.Itoa(udpInPermit) || seen.pid != uint32(fx.h.Pid()) {
		t.Fatalf("v6: the callout saw %+v", seen)
	}
	if got, _, err := fx.exchange(t, "udp6", "[::1]:"+strconv.Itoa(udpInBlock), 0, 1, time.Second); !isTimeout(err) || got != 0 {
		t.Fatalf("v6 block: %d echoes, %v; want a timeout", got, err)
	}
	if n := fx.count(t, "[::1]", udpInBlock); n != 0 {
		t.Fatalf("v6 block: the server received %d datagrams, want 0", n)
	}
	st := fx.path.Stats()
	t.Logf("path stats: %+v", st)
	if st.Pended-st0.Pended < 3 || st.Blocked-st0.Blocked < 3 || st.Permitted-st0.Permitted < 5 || st.NoFlow != st0.NoFlow || st.Errors != 0 {
		t.Fatalf("stats %+v: want ≥ 3 pended, ≥ 3 blocked, ≥ 5 permitted, none without an owner", st)
	}
	fx.clean(t)
}

// TestInboundUDPFollowers: datagrams of a flow sent while its first is
// held wait behind it without a classification of their own, and get its
// verdict: all are delivered once the pend is completed.
func TestInboundUDPFollowers(t *testing.T) {
	fx := newInUDPFixture(t, 10*time.Second)
	const k = 5
	done := make(chan error, 1)
	var got atomic.Int64
	go func() {
		done <- inNetns(fx.netns, func() {
			c, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: udpInHeld})
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			for i := range k {
				c.Write([]byte("q" + strconv.Itoa(i)))
			}
			buf := make([]byte, 64)
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			for range k {
				if _, err := c.Read(buf); err != nil {
					return
				}
				got.Add(1)
			}
		})
	}()
	var complete func(bool) error
	select {
	case complete = <-fx.heldIn:
	case <-time.After(10 * time.Second):
		t.Fatal("the held flow's first datagram never reached the callout")
	}
	// The followers reach the queue after the first: wait until they are held.
	deadline := time.Now().Add(5 * time.Second)
	for fx.path.Stats().Queued < k && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := fx.count(t, "127.0.0.1", udpInHeld); n != 0 {
		t.Fatalf("%d datagrams delivered while the flow's first is held, want 0", n)
	}
	if c := fx.calls.Load(); c != 1 {
		t.Fatalf("%d callout calls for one held flow of %d datagrams, want 1", c, k)
	}
	if err := complete(true); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// The completion reauthorizes the flow (one call more, seed 002).
	if got.Load() != k || fx.calls.Load() != 2 {
		t.Fatalf("%d of %d echoes, %d callout calls; want all, the pend and its reauthorization", got.Load(), k, fx.calls.Load())
	}
	if st := fx.path.Stats(); st.Resent != k-1 {
		t.Fatalf("stats %+v: want %d datagrams answered behind the first", st, k-1)
	}
	fx.clean(t)
}

// TestInboundUDPNoReader: with the tables in place and no one reading
// (fwpd killed: the queue rule bypasses) the ingress hook applies each
// callout filter's flag: fail-open delivers, fail-closed drops — also a
// datagram forging the permit bit (SO_MARK from a local root process):
// the input chain clears it.
func TestInboundUDPNoReader(t *testing.T) {
	fx := newInUDPFixture(t, pendTimeout)
	fx.path.closeQueues()
	calls := fx.calls.Load()
	if got, took, err := fx.exchange(t, "udp4", "127.0.0.1:"+strconv.Itoa(udpInFailOpen), 0, 3, 5*time.Second); err != nil || got != 3 || took > time.Second {
		t.Fatalf("fail-open filter, no reader: %d echoes, %v after %v; want them at once", got, err, took)
	}
	for _, port := range []int{udpInPermit, udpInFailClosed} {
		if got, _, err := fx.exchange(t, "udp4", "127.0.0.1:"+strconv.Itoa(port), 0, 1, time.Second); !isTimeout(err) || got != 0 {
			t.Fatalf("fail-closed filter (port %d), no reader: %d echoes, %v; want a timeout", port, got, err)
		}
	}
	var err error
	if nerr := inNetns(fx.netns, func() {
		var c net.Conn
		d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, ebpf.MarkPermit) }); err != nil {
				return err
			}
			return serr
		}}
		if c, err = d.Dial("udp4", "127.0.0.1:"+strconv.Itoa(udpInFailClosed)); err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte("forged"))
		c.SetReadDeadline(time.Now().Add(time.Second))
		_, err = c.Read(make([]byte, 64))
	}); nerr != nil {
		t.Fatal(nerr)
	}
	if !isTimeout(err) {
		t.Fatalf("a datagram with a forged permit bit to a fail-closed callout filter, no reader: %v, want a timeout", err)
	}
	if n := fx.count(t, "127.0.0.1", udpInFailClosed); n != 0 {
		t.Fatalf("the fail-closed server received %d datagrams, want 0", n)
	}
	if fx.calls.Load() != calls {
		t.Fatal("the callout was called without a reader")
	}
}

// TestInboundUDPSoak: soakOps datagrams over flows of 20 (each from its
// own local port: no 4-tuple reused) decided by a Go callout that permits
// at once, in one path lifetime: one upcall per flow, every echo back;
// afterwards nothing is held and goroutines, file descriptors, heap and
// the socket owner records are back to their level.
func TestInboundUDPSoak(t *testing.T) {
	fx := newInUDPFixture(t, pendTimeout)
	const perFlow, workers = 20, 4
	run := func(flows, fromPort int) (ok int, first error) {
		var mu sync.Mutex
		var next atomic.Int64
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				err := inNetns(fx.netns, func() {
					for {
						i := next.Add(1) - 1
						if i >= int64(flows) {
							return
						}
						got, _, err := udpExchange("udp4", "127.0.0.1:"+strconv.Itoa(udpInPermit), fromPort+int(i), perFlow, 5*time.Second)
						mu.Lock()
						ok += got
						if err != nil && first == nil {
							first = fmt.Errorf("flow %d: %w", i, err)
						}
						mu.Unlock()
						if err != nil {
							return
						}
					}
				})
				if err != nil {
					mu.Lock()
					first = errors.Join(first, err)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		return
	}
	run(50, 10000) // warm up
	runtime.GC()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	g0, fd0 := runtime.NumGoroutine(), fdCount(t)
	o0, err := fx.dp.UDPOwnerCount()
	if err != nil {
		t.Fatal(err)
	}
	st0, calls0 := fx.path.Stats(), fx.calls.Load()
	n := soakOps
	if raceEnabled && os.Getenv("FWP_SOAK_OPS") == "" {
		n /= 4 // under the race detector (CI's run), as the other soaks
	}
	flows := (n + perFlow - 1) / perFlow
	start := time.Now()
	ok, first := run(flows, 20000)
	took := time.Since(start)
	if ok != flows*perFlow || first != nil {
		t.Fatalf("%d of %d datagrams echoed: %v", ok, flows*perFlow, first)
	}
	st := fx.path.Stats()
	if q, p, c := st.Queued-st0.Queued, st.Permitted-st0.Permitted, fx.calls.Load()-calls0; q != uint64(flows) || p != uint64(flows) || c != int64(flows) || st.NoFlow != st0.NoFlow || st.Errors != 0 {
		t.Fatalf("stats %+v (before %+v), callout calls %d: want %d queued, permitted and called (one per flow)", st, st0, c, flows)
	}
	t.Logf("%d datagrams in %d inbound UDP flows decided by a Go callout in %v (%v a datagram)", ok, flows, took, took/time.Duration(ok))
	fx.clean(t)
	runtime.GC()
	var ms1 runtime.MemStats
	runtime.ReadMemStats(&ms1)
	g1, fd1 := runtime.NumGoroutine(), fdCount(t)
	o1, err := fx.dp.UDPOwnerCount()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("goroutines %d -> %d, fds %d -> %d, heap %d -> %d KiB, UDP owner records %d -> %d", g0, g1, fd0, fd1, ms0.HeapAlloc>>10, ms1.HeapAlloc>>10, o0, o1)
	if g1 > g0+2 || fd1 > fd0 || ms1.HeapAlloc > ms0.HeapAlloc+8<<20 || o1 != o0 {
		t.Fatalf("grew: goroutines %d -> %d, fds %d -> %d, heap %d -> %d, UDP owner records %d -> %d", g0, g1, fd0, fd1, ms0.HeapAlloc, ms1.HeapAlloc, o0, o1)
	}
}

// TestInboundUDPOwnerRecords: the hooks record each UDP socket the hooked
// cgroup binds by cookie, and forget it when the socket closes: 10,000
// sockets in rounds of 500 leave none behind.
func TestInboundUDPOwnerRecords(t *testing.T) {
	fx := newInUDPFixture(t, pendTimeout)
	o0, err := fx.dp.UDPOwnerCount()
	if err != nil {
		t.Fatal(err)
	}
	const round, rounds = 500, 20
	for r := range rounds {
		if line, err := fx.h.Call([]byte(fmt.Sprint("bind ", round))); err != nil || strings.TrimSpace(string(line)) != fmt.Sprint(round, " <nil>") {
			t.Fatalf("round %d: bind: %q %v", r, line, err)
		}
		if o, err := fx.dp.UDPOwnerCount(); err != nil || o != o0+round {
			t.Fatalf("round %d: %d UDP owner records with %d more sockets bound (%v), want %d", r, o, round, err, o0+round)
		}
		if _, err := fx.h.Call([]byte("unbind")); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			o, err := fx.dp.UDPOwnerCount()
			if err != nil {
				t.Fatal(err)
			}
			if o == o0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: %d UDP owner records after the sockets closed, want %d", r, o, o0)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// TestInboundUDPCalloutMatchesEngine: random policies mixing
// kernel-decided filters and Go callouts (matching UDP) at
// AUTH_RECV_ACCEPT; for every port the first datagram's fate (echoed or
// not, in the kernel alone or through the callout path) is
// engine.Classify's with the socket's owner.
func TestInboundUDPCalloutMatchesEngine(t *testing.T) {
	fx := newInUDPFixture(t, pendTimeout)
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 1717))
	rounds := 5
	if os.Getenv("FWP_DIFF_ROUNDS") != "" {
		fmt.Sscan(os.Getenv("FWP_DIFF_ROUNDS"), &rounds)
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", fx.h.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	queued := uint64(0)
	from := 20000
	for round := range rounds {
		eng := engine.New(engine.Options{PendTimeout: pendTimeout})
		if err := eng.RegisterCallout("diff.registered", engine.CalloutRegistration{Classify: inDiffCallout}); err != nil {
			t.Fatal(err)
		}
		if err := eng.Update(func(tx *engine.Txn) error { return randomInboundPolicyProto(r, tx, 17) }); err != nil {
			t.Fatal(err)
		}
		pol, err := ebpf.Compile(eng.View())
		if err != nil {
			t.Fatal(err)
		}
		queued += fx.path.Stats().Queued
		fx.path.Close()
		if fx.path, err = Start(eng, fx.dp, Options{NetNS: int(fx.netns.Fd())}); err != nil {
			t.Fatal(err)
		}
		ports, all := pol.InboundCalloutPorts()
		if all {
			ports = nil
		}
		if err := fx.path.EnableInbound(ports, fx.cg.Path); err != nil {
			t.Fatal(err)
		}
		if pol.InboundUDPCallouts() {
			if err := fx.path.EnableInboundUDP(); err != nil {
				t.Fatal(err)
			}
		}
		if err := fx.dp.Apply(pol); err != nil {
			t.Fatal(err)
		}
		var want strings.Builder
		for port := diffFirst; port <= diffLast; port++ {
			var vs engine.Values
			vs.SetTuple(17, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port)), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 40000))
			vs.Set(engine.FieldALEUserID, engine.Uint32(0))
			vs.Set(engine.FieldALEGroupID, engine.Uint32(0))
			vs.Set(engine.FieldCgroupID, engine.Uint64(fx.cg.ID))
			vs.Set(engine.FieldALEAppID, engine.String(exe))
			vs.Set(engine.FieldFlags, engine.Uint32(engine.FlagIsLoopback))
			if eng.Classify(engine.LayerALEAuthRecvAcceptV4, &vs, &engine.Metadata{}).Permitted() {
				want.WriteByte('o')
			} else {
				want.WriteByte('x')
			}
		}
		got := make([]byte, diffLast-diffFirst+1)
		var wg sync.WaitGroup
		for i := range got {
			local := from + i // a new flow each round (no conntrack entry of an earlier one)
			wg.Go(func() {
				var n int
				var err error
				if nerr := inNetns(fx.netns, func() {
					n, _, err = udpExchange("udp4", "127.0.0.1:"+strconv.Itoa(diffFirst+i), local, 1, 800*time.Millisecond)
				}); nerr != nil {
					err = nerr
				}
				switch {
				case err == nil && n == 1:
					got[i] = 'o'
				case isTimeout(err):
					got[i] = 'x'
				default:
					got[i] = '?'
				}
			})
		}
		wg.Wait()
		from += len(got)
		if string(got) != want.String() {
			var fs strings.Builder
			for _, f := range eng.View().Filters(engine.FilterTemplate{}) {
				fmt.Fprintf(&fs, "\n  %s sublayer %s weight %v flags %v %v %v", f.ID, f.Sublayer, f.Weight, f.Flags, f.Action, f.Conditions)
			}
			t.Fatalf("round %d (seed %d): ports %d..%d\nkernel %s\nengine %s\npolicy:%s", round, seed, diffFirst, diffLast, got, want.String(), fs.String())
		}
		t.Logf("round %d: %s", round, got)
	}
	if queued += fx.path.Stats().Queued; queued == 0 {
		t.Fatal("no datagram was queued: the callout path was never used")
	}
}
