//go:build linux

package ebpf

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
	"fwp/internal/unix"
	xunix "golang.org/x/sys/unix"
)

func init() { testutil.RegisterHelper("inserver", inServerHelper) }

// inListen is one server socket the inserver helper opens.
type inListen struct {
	Net  string `json:"net"` // tcp4, udp6...
	Addr string `json:"addr"`
	Sink bool   `json:"sink,omitempty"` // UDP: never answer (its sends would authorize the peer)
	// Cgroup: the helper moves itself there first (a socket belongs to
	// its creator's cgroup), so one namespace has sockets of two cgroups.
	Cgroup string `json:"cgroup,omitempty"`
	// UID, GID: the helper becomes this user first (for good).
	UID, GID uint32 `json:",omitempty"`
	// SendTo: a UDP socket bound by the kernel, not bind(): it sends a
	// datagram there first (Addr is ignored), and answers with its port.
	SendTo string `json:",omitempty"`
}

// inServerHelper is a server in the test cgroup: for each line of stdin
// (a JSON list of inListen) it closes the sockets of the previous line,
// opens these and answers "ok" (or the error). A TCP listener writes "hi"
// to each connection it accepts and closes it; a UDP socket echoes.
func inServerHelper([]string) error {
	in := bufio.NewScanner(os.Stdin)
	var closers []io.Closer
	for in.Scan() {
		for _, c := range closers {
			c.Close()
		}
		closers = nil
		var ls []inListen
		if err := json.Unmarshal(in.Bytes(), &ls); err != nil {
			return err
		}
		answer := "ok"
		for _, l := range ls {
			if l.Cgroup != "" {
				if err := os.WriteFile(l.Cgroup+"/cgroup.procs", []byte(fmt.Sprint(os.Getpid())), 0o644); err != nil {
					answer = err.Error()
					break
				}
			}
			if l.UID != 0 {
				if err := dropTo(l.UID, l.GID); err != nil {
					answer = err.Error()
					break
				}
			}
			if l.SendTo != "" {
				pc, err := autoboundUDP(l.SendTo)
				if err != nil {
					answer = err.Error()
					break
				}
				closers = append(closers, pc)
				answer = fmt.Sprint(pc.LocalAddr().(*net.UDPAddr).Port)
				go echoDatagrams(pc, false)
				continue
			}
			if l.Net[:3] == "tcp" {
				ln, err := net.Listen(l.Net, l.Addr)
				if err != nil {
					answer = err.Error()
					break
				}
				closers = append(closers, ln)
				go func() {
					for {
						c, err := ln.Accept()
						if err != nil {
							return
						}
						c.Write([]byte("hi"))
						c.Close()
					}
				}()
				continue
			}
			pc, err := net.ListenPacket(l.Net, l.Addr)
			if err != nil {
				answer = err.Error()
				break
			}
			closers = append(closers, pc)
			go echoDatagrams(pc, l.Sink)
		}
		if _, err := fmt.Println(answer); err != nil {
			return err
		}
	}
	return in.Err()
}

// echoDatagrams answers each datagram with itself (a sink does not).
func echoDatagrams(pc net.PacketConn, sink bool) {
	buf := make([]byte, 64)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		if !sink {
			pc.WriteTo(buf[:n], from)
		}
	}
}

func dropTo(uid, gid uint32) error {
	if err := syscall.Setgroups(nil); err != nil {
		return err
	}
	if err := syscall.Setgid(int(gid)); err != nil {
		return err
	}
	return syscall.Setuid(int(uid))
}

// autoboundUDP is an unconnected UDP socket the kernel bound when it
// first sent (to), as a program that never calls bind has.
func autoboundUDP(to string) (net.PacketConn, error) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	ap := netip.MustParseAddrPort(to)
	if err := syscall.Sendto(fd, []byte("x"), 0, &syscall.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "udp")
	defer f.Close()
	return net.FilePacketConn(f)
}

func inServe(t testing.TB, h *testutil.Helper, ls ...inListen) {
	t.Helper()
	b, _ := json.Marshal(ls)
	ans, err := h.Call(b)
	if err != nil {
		t.Fatal(err)
	}
	if string(ans) != "ok\n" {
		t.Fatalf("server: %s", ans)
	}
}

// inNetnsPid runs fn on a thread in the network namespace of pid (the test
// helper's): sockets fn creates are there, outside the test cgroup.
func inNetnsPid(pid int, fn func() error) error {
	runtime.LockOSThread()
	self, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", xunix.Gettid()))
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer self.Close()
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer ns.Close()
	if err := xunix.Setns(int(ns.Fd()), xunix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := fn()
	if xunix.Setns(int(self.Fd()), xunix.CLONE_NEWNET) == nil {
		runtime.UnlockOSThread() // else the thread ends with the goroutine
	}
	return ferr
}

// inOp is one inbound probe: a client at From (outside the cgroup)
// connects or sends to the server at To.
type inOp struct {
	Net      string // tcp4, udp6...
	From, To netip.AddrPort
}

// inTimeout is how long a probe waits for an answer: a dropped SYN or
// datagram gets none.
const inTimeout = 300 * time.Millisecond

func reuseAddr(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
	})
	return errors.Join(err, serr)
}

// inProbe runs one probe and answers "ok" (the server answered),
// "timeout" (no answer: dropped) or the error.
func inProbe(op inOp) string { return inProbeTimeout(op, inTimeout) }

// inProbeWait runs one probe alone with a longer wait.
func inProbeWait(h *testutil.Helper, op inOp, wait time.Duration) string {
	var out string
	if err := inNetnsPid(h.Pid(), func() error { out = inProbeTimeout(op, wait); return nil }); err != nil {
		return err.Error()
	}
	return out
}

func inProbeTimeout(op inOp, inTimeout time.Duration) string {
	if op.Net[:3] == "tcp" {
		d := net.Dialer{Timeout: inTimeout, LocalAddr: net.TCPAddrFromAddrPort(op.From), Control: reuseAddr}
		c, err := d.Dial(op.Net, op.To.String())
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return "timeout"
			}
			return err.Error()
		}
		defer func() {
			c.(*net.TCPConn).SetLinger(0) // no TIME_WAIT on the client's fixed port
			c.Close()
		}()
		c.SetReadDeadline(time.Now().Add(time.Second))
		buf := make([]byte, 2)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hi" {
			return fmt.Sprintf("accepted, read %q: %v", buf, err)
		}
		return "ok"
	}
	// Unconnected: a server on a wildcard address answers from the
	// address the kernel picks for the client (127.0.0.1 for any 127/8
	// peer), not always the one the datagram was sent to.
	lc := net.ListenConfig{Control: reuseAddr}
	pc, err := lc.ListenPacket(context.Background(), op.Net, op.From.String())
	if err != nil {
		return err.Error()
	}
	defer pc.Close()
	if _, err := pc.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(op.To)); err != nil {
		return err.Error()
	}
	pc.SetReadDeadline(time.Now().Add(inTimeout))
	buf := make([]byte, 8)
	if _, _, err := pc.ReadFrom(buf); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return "timeout"
		}
		return err.Error()
	}
	return "ok"
}

// inProbes runs the probes at once, each from the helper's namespace.
func inProbes(t testing.TB, h *testutil.Helper, ops []inOp) []string {
	t.Helper()
	out := make([]string, len(ops))
	var wg sync.WaitGroup
	for i, op := range ops {
		wg.Go(func() {
			if err := inNetnsPid(h.Pid(), func() error { out[i] = inProbe(op); return nil }); err != nil {
				out[i] = err.Error()
			}
		})
	}
	wg.Wait()
	return out
}

func recvAccept(v6 bool) engine.LayerID { return engine.LayerFor(engine.KindAuthRecvAccept, v6) }

// TestKernelRecvAccept: a server in the cgroup, clients outside it; a
// block at AUTH_RECV_ACCEPT drops the SYN (the client gets no answer) and
// the first datagram of a UDP flow; a permit lets them in.
func TestKernelRecvAccept(t *testing.T) {
	d, cg := kernelSetup(t)
	h := testutil.StartHelper(t, cg, "inserver")
	inServe(t, h, inListen{Net: "tcp4", Addr: "0.0.0.0:7001"}, inListen{Net: "udp4", Addr: "0.0.0.0:7001"}, inListen{Net: "tcp6", Addr: "[::]:7002"}, inListen{Net: "udp6", Addr: "[::]:7002"})
	peer := func(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
	e := buildEngine(t, func(tx *engine.Txn) error {
		for _, f := range []engine.Filter{
			blockFilter(recvAccept(false), engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(netip.MustParseAddr("127.0.0.9"))}),
			blockFilter(recvAccept(true), engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(4444)}),
			// A hard permit in a heavier sublayer wins over the block below.
			{Layer: recvAccept(false), Weight: engine.WeightIndex(15), Flags: engine.FilterClearActionRight,
				Action: engine.Action{Type: engine.ActionPermit},
				Conditions: []engine.Condition{
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(5555)},
					{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(7001)}}},
		} {
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
	apply(t, d, e)
	ops := []inOp{
		{"tcp4", peer("127.0.0.9:4000"), peer("127.0.0.1:7001")},
		{"tcp4", peer("127.0.0.8:4000"), peer("127.0.0.1:7001")},
		{"tcp4", peer("127.0.0.9:5555"), peer("127.0.0.1:7001")},
		{"udp4", peer("127.0.0.9:4001"), peer("127.0.0.1:7001")},
		{"udp4", peer("127.0.0.8:4001"), peer("127.0.0.1:7001")},
		{"tcp6", peer("[::1]:4444"), peer("[::1]:7002")},
		{"tcp6", peer("[::1]:4445"), peer("[::1]:7002")},
		{"udp6", peer("[::1]:4444"), peer("[::1]:7002")},
		{"udp6", peer("[::1]:4445"), peer("[::1]:7002")},
	}
	want := []string{"timeout", "ok", "ok", "timeout", "ok", "timeout", "ok", "timeout", "ok"}
	if got := inProbes(t, h, ops); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("got  %v\nwant %v", got, want)
	}
	// Counted per layer, and reported as drops with the server's metadata.
	counts, err := d.ClassifyCounts()
	if err != nil {
		t.Fatal(err)
	}
	var blocks uint64
	for _, c := range counts {
		if c.Layer.Kind() == engine.KindAuthRecvAccept {
			blocks += c.Block
		}
	}
	if blocks < 4 {
		t.Errorf("AUTH_RECV_ACCEPT blocks counted: %d, want at least 4 (%+v)", blocks, counts)
	}
	// An empty policy lets everything in again (new epoch, new generation).
	apply(t, d, engine.New(engine.Options{}))
	for i := range want {
		want[i] = "ok"
	}
	if got := inProbes(t, h, ops); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after clearing: got %v", got)
	}
}

// inTuple is a random inbound probe and the engine's view of it.
func (g *gen) inTuple(serverPorts, clientPorts []uint16) (inOp, tuple) {
	tp := tuple{proto: []uint8{6, 17}[g.r.IntN(2)], cgroup: g.cgroup, v6: g.v6}
	if len(g.apps) > 0 {
		tp.app = g.apps[0]
	}
	tp.remote = netip.AddrPortFrom(g.addr(), clientPorts[g.r.IntN(len(clientPorts))])
	tp.local = netip.AddrPortFrom(g.addr(), serverPorts[g.r.IntN(len(serverPorts))])
	n := "tcp"
	if tp.proto == 17 {
		n = "udp"
	}
	if g.v6 {
		n += "6"
	} else {
		n += "4"
	}
	return inOp{Net: n, From: tp.remote, To: tp.local}, tp
}

// engineRecvBlocks is the engine's decision for an inbound request.
func engineRecvBlocks(e *engine.Engine, t tuple) bool {
	return !e.Classify(recvAccept(t.v6), t.values(), &engine.Metadata{}).Permitted()
}

// TestKernelRecvAcceptMatchesEngine is the differential test of the
// inbound layer: random AUTH_RECV_ACCEPT policies, real inbound TCP
// connects and UDP first datagrams from outside the cgroup to a server in
// it; the kernel's outcome must be engine.Classify's.
func TestKernelRecvAcceptMatchesEngine(t *testing.T) {
	d, cg := kernelSetup(t)
	h := testutil.StartHelper(t, cg, "inserver")
	serverPorts := []uint16{80, 1000, 1005}
	clientPorts := []uint16{53, 443, 8080, 1001, 40000}
	var ls []inListen
	for _, p := range serverPorts {
		for _, n := range []string{"tcp4", "udp4"} {
			ls = append(ls, inListen{Net: n, Addr: fmt.Sprintf("0.0.0.0:%d", p)})
		}
		for _, n := range []string{"tcp6", "udp6"} {
			ls = append(ls, inListen{Net: n, Addr: fmt.Sprintf("[::]:%d", p)})
		}
	}
	inServe(t, h, ls...)
	policies := 40
	if testing.Short() {
		policies = 8
	}
	apps := genApps(t) // the server helper is the test binary
	blocked, permitted := 0, 0
	defer func() {
		t.Logf("%d inbound requests blocked, %d permitted", blocked, permitted)
		if !t.Failed() && (blocked == 0 || permitted == 0) {
			t.Errorf("the random policies never blocked or never permitted: the test proves nothing")
		}
	}()
	for seed := range uint64(policies) {
		g := &gen{r: rand.New(rand.NewPCG(seed, 17)), cgroup: cg.ID, v6: seed%4 == 3, apps: apps, gids: true,
			kinds: []engine.LayerKind{engine.KindAuthRecvAccept}, flags: seed%3 != 0}
		e := g.policy(t, 1+g.r.IntN(30))
		apply(t, d, e)
		var ops []inOp
		var tuples []tuple
		seen := map[inOp]bool{}
		for range 30 {
			op, tp := g.inTuple(serverPorts, clientPorts)
			// One client socket per source at once: the same 4-tuple
			// twice would fail to bind, and two unconnected UDP sockets
			// on one address would take each other's answers.
			from := inOp{Net: op.Net, From: op.From}
			if seen[op] || op.Net[:3] == "udp" && seen[from] {
				continue
			}
			seen[op], seen[from] = true, true
			ops = append(ops, op)
			tuples = append(tuples, tp)
		}
		got := inProbes(t, h, ops)
		for i, tp := range tuples {
			want := engineRecvBlocks(e, tp)
			switch got[i] {
			case "ok":
				permitted++
			case "timeout":
				blocked++
			default:
				t.Fatalf("seed %d op %+v: %s", seed, ops[i], got[i])
			}
			if got[i] == "timeout" && !want {
				// A stall of the machine, or a drop? A dropped SYN or
				// datagram stays dropped (the SYN's retransmission too).
				if again := inProbeWait(h, ops[i], 2*time.Second); again == "ok" {
					got[i] = again
					blocked--
					permitted++
				}
			}
			if (got[i] == "timeout") != want {
				tr, _ := e.Explain(recvAccept(tp.v6), tp.values(), nil)
				var fs string
				for _, f := range e.View().Filters(engine.FilterTemplate{}) {
					fs += fmt.Sprintf("%d %s sub%d w%v %s flags%v %v\n", f.ID, f.Layer, f.Sublayer, f.EffectiveWeight, f.Action.Type, f.Flags, f.Conditions)
				}
				t.Fatalf("seed %d op %+v: kernel %s, engine blocks=%v\n%s\n%s", seed, ops[i], got[i], want, tr, fs)
			}
		}
	}
}

// recvCounts sums the classifications counted at a layer kind.
func recvCounts(t testing.TB, d *Datapath, k engine.LayerKind) (permit, block uint64) {
	t.Helper()
	counts, err := d.ClassifyCounts()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range counts {
		if c.Layer.Kind() == k {
			permit += c.Permit
			block += c.Block
		}
	}
	return permit, block
}

// TestKernelRecvAcceptUDPFirstDatagram: only a UDP flow's first datagram
// is classified; later ones of a permitted flow pass without a walk, and a
// new policy classifies the flow again.
func TestKernelRecvAcceptUDPFirstDatagram(t *testing.T) {
	d, cg := kernelSetup(t)
	h := testutil.StartHelper(t, cg, "inserver")
	inServe(t, h, inListen{Net: "udp4", Addr: "127.0.0.1:7003"})
	e := buildEngine(t, func(tx *engine.Txn) error {
		_, err := tx.AddFilter(blockFilter(recvAccept(false), engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(4999)}))
		return err
	})
	apply(t, d, e)
	p0, b0 := recvCounts(t, d, engine.KindAuthRecvAccept)
	var answers int
	err := inNetnsPid(h.Pid(), func() error {
		c, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:5000")), net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:7003")))
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 8)
		for range 20 {
			if _, err := c.Write([]byte("x")); err != nil {
				return err
			}
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := c.Read(buf); err != nil {
				return err
			}
			answers++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	p1, b1 := recvCounts(t, d, engine.KindAuthRecvAccept)
	if answers != 20 || p1-p0 != 1 || b1 != b0 {
		t.Fatalf("20 datagrams of one flow: %d answered, %d classified (permit), %d blocked; want 20, 1, 0", answers, p1-p0, b1-b0)
	}
	// To a server that never answers (so the flow is not one its socket
	// started): still one classification for the flow's datagrams.
	inServe(t, h, inListen{Net: "udp4", Addr: "127.0.0.1:7003"}, inListen{Net: "udp4", Addr: "127.0.0.1:7004", Sink: true})
	err = inNetnsPid(h.Pid(), func() error {
		c, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:5001")), net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:7004")))
		if err != nil {
			return err
		}
		defer c.Close()
		for range 20 {
			if _, err := c.Write([]byte("x")); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var p2 uint64
	for range 100 { // the datagrams reach the hook after Write returns
		if p2, _ = recvCounts(t, d, engine.KindAuthRecvAccept); p2-p1 >= 1 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	if p2, _ = recvCounts(t, d, engine.KindAuthRecvAccept); p2-p1 != 1 {
		t.Fatalf("20 datagrams to a silent server: %d classifications, want 1", p2-p1)
	}
	p1 = p2
	// A blocked flow: each datagram is classified and dropped (no flow).
	if got := inProbes(t, h, []inOp{{"udp4", netip.MustParseAddrPort("127.0.0.1:4999"), netip.MustParseAddrPort("127.0.0.1:7003")}}); got[0] != "timeout" {
		t.Fatalf("blocked flow: %s", got[0])
	}
	if _, b2 := recvCounts(t, d, engine.KindAuthRecvAccept); b2-b1 != 1 {
		t.Fatalf("blocked datagram counted %d times, want 1", b2-b1)
	}
	if n, err := d.InboundFlows(); err != nil || n == 0 || n > InboundFlowsMax {
		t.Fatalf("inbound flows: %d, %v", n, err)
	}
}

// TestKernelAuthListen: a listen blocked at AUTH_LISTEN succeeds (a
// sockops hook cannot refuse it) but every SYN to it is dropped; other
// listeners are not affected, and a new policy frees it.
func TestKernelAuthListen(t *testing.T) {
	d, cg := kernelSetup(t)
	h := testutil.StartHelper(t, cg, "inserver")
	listen := func(v6 bool) engine.LayerID { return engine.LayerFor(engine.KindAuthListen, v6) }
	e := buildEngine(t, func(tx *engine.Txn) error {
		for _, f := range []engine.Filter{
			blockFilter(listen(false), engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(7010)}),
			blockFilter(listen(true), engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(7011)}),
			blockFilter(listen(false), engine.Condition{Field: engine.FieldALEUserID, Match: engine.MatchEqual, Value: engine.Uint32(4242)}),
		} {
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
	apply(t, d, e)
	events := make(chan Event, 64)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.ReadEvents(ctx, func(ev Event) {
		if ev.Layer.Kind() == engine.KindAuthListen {
			select {
			case events <- ev:
			default:
			}
		}
	})
	time.Sleep(50 * time.Millisecond) // the reader is up
	// The listens themselves succeed.
	inServe(t, h, inListen{Net: "tcp4", Addr: "127.0.0.1:7010"}, inListen{Net: "tcp4", Addr: "127.0.0.1:7012"}, inListen{Net: "tcp6", Addr: "[::1]:7011"})
	peer := netip.MustParseAddrPort
	ops := []inOp{
		{"tcp4", peer("127.0.0.1:4100"), peer("127.0.0.1:7010")},
		{"tcp4", peer("127.0.0.1:4101"), peer("127.0.0.1:7012")},
		{"tcp6", peer("[::1]:4102"), peer("[::1]:7011")},
	}
	if got, want := inProbes(t, h, ops), []string{"timeout", "ok", "timeout"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	// Reported at listen() with the listening process's metadata.
	select {
	case ev := <-events:
		if ev.Type != EventDrop || ev.PID != uint32(h.Pid()) || ev.Local.Port() != 7010 && ev.Local.Port() != 7011 || ev.CgroupID != cg.ID {
			t.Fatalf("listen event: %+v (helper pid %d, cgroup %d)", ev, h.Pid(), cg.ID)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("no AUTH_LISTEN drop event")
	}
	// A new policy without the block frees the listener at its next SYN.
	apply(t, d, engine.New(engine.Options{}))
	if got, want := inProbes(t, h, ops), []string{"ok", "ok", "ok"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after clearing: got %v, want %v", got, want)
	}
	// And a policy blocking a listener already open drops its SYNs from then on.
	apply(t, d, e)
	if got, want := inProbes(t, h, ops), []string{"timeout", "ok", "timeout"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("blocked again: got %v, want %v", got, want)
	}
}

// TestKernelRecvAcceptEvent: a dropped inbound request is a net event
// with the server's (the socket owner's) process metadata.
func TestKernelRecvAcceptEvent(t *testing.T) {
	d, cg := kernelSetup(t)
	h := testutil.StartHelper(t, cg, "inserver")
	inServe(t, h, inListen{Net: "tcp4", Addr: "127.0.0.1:7020"})
	var id engine.FilterID
	e := buildEngine(t, func(tx *engine.Txn) error {
		var err error
		id, err = tx.AddFilter(blockFilter(recvAccept(false), engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(7020)}))
		return err
	})
	apply(t, d, e)
	events := make(chan Event, 64)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.ReadEvents(ctx, func(ev Event) {
		// The datapath is shared: earlier tests' events may still be in
		// the ring, with the same filter id; this test's are its cgroup's.
		if ev.Filter == id && ev.CgroupID == cg.ID {
			select {
			case events <- ev:
			default:
			}
		}
	})
	time.Sleep(50 * time.Millisecond)
	if got := inProbes(t, h, []inOp{{"tcp4", netip.MustParseAddrPort("127.0.0.3:4200"), netip.MustParseAddrPort("127.0.0.1:7020")}}); got[0] != "timeout" {
		t.Fatalf("blocked connect: %s", got[0])
	}
	select {
	case ev := <-events:
		want := Event{Type: EventDrop, Layer: recvAccept(false), Filter: id, Protocol: 6,
			Local: netip.MustParseAddrPort("127.0.0.1:7020"), Remote: netip.MustParseAddrPort("127.0.0.3:4200"),
			PID: uint32(h.Pid()), CgroupID: cg.ID, Comm: ev.Comm}
		if ev != want || ev.Comm == "" {
			t.Fatalf("event %+v\nwant  %+v", ev, want)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("no AUTH_RECV_ACCEPT drop event")
	}
}

// TestCompileInbound: permit and block filters at AUTH_RECV_ACCEPT and
// AUTH_LISTEN compile (and mark the policy inbound); a Go callout there
// is refused by name with ErrNotSupported, as an unsupported field is.
func TestCompileInbound(t *testing.T) {
	e := buildEngine(t, func(tx *engine.Txn) error {
		_, err := tx.AddFilter(blockFilter(recvAccept(true), engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(22)}))
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(blockFilter(engine.LayerALEAuthListenV4, engine.Condition{Field: engine.FieldALEUserID, Match: engine.MatchNotEqual, Value: engine.Uint32(0)}))
		return err
	})
	p, err := Compile(e.View())
	if err != nil || !p.Inbound() || p.Filters() != 2 {
		t.Fatalf("Compile: %v (inbound %v)", err, p != nil && p.Inbound())
	}
	for name, f := range map[string]engine.Filter{
		"go callout": {Key: "in-callout", Layer: engine.LayerALEAuthRecvAcceptV4, Action: engine.Action{Type: engine.ActionCalloutTerminating}},
		"interface":  blockFilter(engine.LayerALEAuthRecvAcceptV4, engine.Condition{Field: engine.FieldIPLocalInterface, Match: engine.MatchEqual, Value: engine.Uint32(1)}),
	} {
		e := buildEngine(t, func(tx *engine.Txn) error {
			if f.Action.Type == engine.ActionCalloutTerminating {
				co, err := tx.AddCallout(engine.Callout{Key: "my-callout", Layer: f.Layer})
				if err != nil {
					return err
				}
				f.Action.Callout = co
			}
			_, err := tx.AddFilter(f)
			return err
		})
		_, err := Compile(e.View())
		if !errors.Is(err, ErrNotSupported) {
			t.Errorf("%s: %v, want ErrNotSupported", name, err)
		} else if name == "go callout" && !strings.Contains(err.Error(), "in-callout") {
			t.Errorf("%s: %v does not name the filter", name, err)
		}
	}
}

// inServeAnswer is inServe returning the helper's answer.
func inServeAnswer(t testing.TB, h *testutil.Helper, ls ...inListen) string {
	t.Helper()
	b, _ := json.Marshal(ls)
	ans, err := h.Call(b)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ans))
}

// TestKernelRecvAcceptOwner: the inbound layers match the socket's owner
// — the process that bound it, or the one whose send bound it — not
// whoever the packet's softirq interrupted: a server of an unprivileged
// user (setuid, real uid and gid) is matched by its uid and gid, the same
// server as root is not; a UDP socket that never called bind() is matched
// by its application.
func TestKernelRecvAcceptOwner(t *testing.T) {
	d, cg := kernelSetup(t)
	u := testutil.NewUser(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	h := testutil.StartHelper(t, cg, "inserver")
	e := buildEngine(t, func(tx *engine.Txn) error {
		for _, f := range []engine.Filter{
			blockFilter(recvAccept(false),
				engine.Condition{Field: engine.FieldALEUserID, Match: engine.MatchEqual, Value: engine.Uint32(u.UID)},
				engine.Condition{Field: engine.FieldALEGroupID, Match: engine.MatchEqual, Value: engine.Uint32(u.GID)}),
			blockFilter(recvAccept(false),
				engine.Condition{Field: engine.FieldALEAppID, Match: engine.MatchEqual, Value: engine.String(self)},
				engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(4300)}),
		} {
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
	apply(t, d, e)
	peer := netip.MustParseAddrPort
	// Root's autobound UDP socket: its owner was recorded by its send.
	port := inServeAnswer(t, h, inListen{Net: "udp4", SendTo: "127.0.0.1:9"}, inListen{Net: "tcp4", Addr: "127.0.0.1:7030"})
	to := peer("127.0.0.1:" + strings.Split(port, "\n")[0])
	ops := []inOp{{"udp4", peer("127.0.0.1:4300"), to}, {"udp4", peer("127.0.0.1:4301"), to}, {"tcp4", peer("127.0.0.1:4302"), peer("127.0.0.1:7030")}}
	if got, want := inProbes(t, h, ops), []string{"timeout", "ok", "ok"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("root's server: got %v, want %v (udp port %s)", got, want, port)
	}
	// The same server as the unprivileged user.
	inServe(t, h, inListen{Net: "tcp4", Addr: "127.0.0.1:7030", UID: u.UID, GID: u.GID}, inListen{Net: "udp4", Addr: "127.0.0.1:7031"})
	ops = []inOp{{"tcp4", peer("127.0.0.1:4303"), peer("127.0.0.1:7030")}, {"udp4", peer("127.0.0.1:4304"), peer("127.0.0.1:7031")}}
	if got, want := inProbes(t, h, ops), []string{"timeout", "timeout"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s's server: got %v, want %v", u.Name, got, want)
	}
}

// TestKernelRecvAcceptIPv6ExtensionHeaders: a SYN carrying IPv6
// extension headers (hop-by-hop and destination options) is classified
// like any other — a block is not skipped by them, and a permit is not
// lost to a parse failure (which would drop it).
func TestKernelRecvAcceptIPv6ExtensionHeaders(t *testing.T) {
	d, cg := kernelSetup(t)
	h := testutil.StartHelper(t, cg, "inserver")
	inServe(t, h, inListen{Net: "tcp6", Addr: "[::1]:7040"}, inListen{Net: "udp6", Addr: "[::1]:7040"})
	e := buildEngine(t, func(tx *engine.Txn) error {
		_, err := tx.AddFilter(blockFilter(recvAccept(true), engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(4444)}))
		return err
	})
	apply(t, d, e)
	// An 8-byte options header with one PadN option (the kernel fills
	// in the next-header byte).
	opts := []byte{0, 0, 1, 4, 0, 0, 0, 0}
	withOpts := func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = errors.Join(
				syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1),
				syscall.SetsockoptString(int(fd), syscall.IPPROTO_IPV6, 54 /* IPV6_HOPOPTS */, string(opts)),
				syscall.SetsockoptString(int(fd), syscall.IPPROTO_IPV6, 59 /* IPV6_DSTOPTS */, string(opts)))
		})
		return errors.Join(err, serr)
	}
	probe := func(n string, from uint16) string {
		var out string
		err := inNetnsPid(h.Pid(), func() error {
			local := netip.AddrPortFrom(netip.IPv6Loopback(), from)
			if n == "tcp6" {
				dl := net.Dialer{Timeout: inTimeout, LocalAddr: net.TCPAddrFromAddrPort(local), Control: withOpts}
				c, err := dl.Dial(n, "[::1]:7040")
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						out = "timeout"
						return nil
					}
					return err
				}
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
				out = "ok"
				return nil
			}
			lc := net.ListenConfig{Control: withOpts}
			pc, err := lc.ListenPacket(context.Background(), n, local.String())
			if err != nil {
				return err
			}
			defer pc.Close()
			if _, err := pc.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(netip.MustParseAddrPort("[::1]:7040"))); err != nil {
				return err
			}
			pc.SetReadDeadline(time.Now().Add(inTimeout))
			if _, _, err := pc.ReadFrom(make([]byte, 8)); err != nil {
				out = "timeout"
				return nil
			}
			out = "ok"
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	_, b0 := recvCounts(t, d, engine.KindAuthRecvAccept)
	got := []string{probe("tcp6", 4444), probe("tcp6", 4445), probe("udp6", 4444), probe("udp6", 4445)}
	if want := []string{"timeout", "ok", "timeout", "ok"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("with extension headers: got %v, want %v", got, want)
	}
	// Dropped by the filter (classified), not as unparsable.
	if _, b1 := recvCounts(t, d, engine.KindAuthRecvAccept); b1-b0 < 2 {
		t.Fatalf("%d blocks counted, want at least 2", b1-b0)
	}
}

// TestKeptInboundAdopted: with KeepHooks, a listener opened under the
// first datapath keeps its recorded owner through the next one, so an
// application rule still matches it; the new datapath's policy (a new
// epoch) decides its SYNs.
func TestKeptInboundAdopted(t *testing.T) {
	testutil.RequireRoot(t)
	root := t.TempDir()
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(root, "bpf")) })
	pins := filepath.Join(root, "bpf", "fwp")
	cg := testutil.NewCgroup(t)
	load := func() *Datapath {
		t.Helper()
		d, err := Load(Options{PinDir: pins, KeepHooks: true})
		if err != nil {
			testutil.Unavailable(t, err)
		}
		return d
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	policy := func(port uint16) *engine.Engine {
		return buildEngine(t, func(tx *engine.Txn) error {
			_, err := tx.AddFilter(blockFilter(recvAccept(false),
				engine.Condition{Field: engine.FieldALEAppID, Match: engine.MatchEqual, Value: engine.String(self)},
				engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(port)}))
			return err
		})
	}
	d1 := load()
	if err := d1.Attach(cg.Path); err != nil {
		t.Fatal(err)
	}
	apply(t, d1, policy(4400))
	h := testutil.StartHelper(t, cg, "inserver")
	inServe(t, h, inListen{Net: "tcp4", Addr: "127.0.0.1:7050"})
	peer := netip.MustParseAddrPort
	ops := []inOp{{"tcp4", peer("127.0.0.1:4400"), peer("127.0.0.1:7050")}, {"tcp4", peer("127.0.0.1:4401"), peer("127.0.0.1:7050")}}
	if got, want := inProbes(t, h, ops), []string{"timeout", "ok"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("first datapath: got %v, want %v", got, want)
	}
	if err := d1.Close(); err != nil {
		t.Fatal(err)
	}
	d2 := load()
	t.Cleanup(func() {
		d2.opts.KeepHooks = false // nothing stays after the test
		d2.Detach(cg.Path)
		d2.Close()
	})
	if err := d2.Attach(cg.Path); err != nil {
		t.Fatal(err)
	}
	apply(t, d2, policy(4401))
	if got, want := inProbes(t, h, ops), []string{"ok", "timeout"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("adopted: got %v, want %v (the listener's owner lost?)", got, want)
	}
}
