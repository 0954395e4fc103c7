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
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
	xunix "golang.org/x/sys/unix"
)

func init() { testutil.RegisterHelper("inserver", inServerHelper) }

// inListen is one server socket the inserver helper opens.
type inListen struct {
	Net  string `json:"net"` // tcp4, udp6...
	Addr string `json:"addr"`
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
			go func() {
				buf := make([]byte, 64)
				for {
					n, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					pc.WriteTo(buf[:n], from)
				}
			}()
		}
		if _, err := fmt.Println(answer); err != nil {
			return err
		}
	}
	return in.Err()
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

// inNetns runs fn on a thread in the network namespace of pid (the test
// helper's): sockets fn creates are there, outside the test cgroup.
func inNetns(pid int, fn func() error) error {
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
	if err := inNetns(h.Pid(), func() error { out = inProbeTimeout(op, wait); return nil }); err != nil {
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
			if err := inNetns(h.Pid(), func() error { out[i] = inProbe(op); return nil }); err != nil {
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
	inServe(t, h, inListen{"tcp4", "0.0.0.0:7001"}, inListen{"udp4", "0.0.0.0:7001"}, inListen{"tcp6", "[::]:7002"}, inListen{"udp6", "[::]:7002"})
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
			ls = append(ls, inListen{n, fmt.Sprintf("0.0.0.0:%d", p)})
		}
		for _, n := range []string{"tcp6", "udp6"} {
			ls = append(ls, inListen{n, fmt.Sprintf("[::]:%d", p)})
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
			kinds: []engine.LayerKind{engine.KindAuthRecvAccept}}
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
