//go:build linux

package ebpf

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
)

// holdConnsHelper runs in the test cgroup and namespace. "open N" starts
// two TCP echo servers (ports A and B) and a UDP echo server (C) on
// loopback, and connects N TCP flows to each server and one connected UDP
// socket to C; it answers {"a":A,"b":B,"c":C}. "check" sends a byte on
// every flow and answers each one's fate in order (A's, B's, then UDP):
// "ok", "aborted" (ECONNABORTED: destroyed here), or the error. "close"
// closes them all.
func holdConnsHelper([]string) error {
	in := bufio.NewScanner(os.Stdin)
	var conns []net.Conn
	var lns []io.Closer
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "open":
			// "open N" on 127.0.0.1, "open N 6" on ::1.
			n, _ := strconv.Atoi(f[1])
			tcp, udp, lo := "tcp4", "udp4", "127.0.0.1:0"
			if len(f) > 2 && f[2] == "6" {
				tcp, udp, lo = "tcp6", "udp6", "[::1]:0"
			}
			ports := map[string]int{}
			for _, name := range []string{"a", "b"} {
				l, err := net.Listen(tcp, lo)
				if err != nil {
					return err
				}
				lns = append(lns, l)
				go func() {
					for {
						c, err := l.Accept()
						if err != nil {
							return
						}
						go func() { io.Copy(c, c); c.Close() }()
					}
				}()
				ports[name] = l.Addr().(*net.TCPAddr).Port
				for range n {
					c, err := net.Dial(tcp, l.Addr().String())
					if err != nil {
						var lim syscall.Rlimit
						syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
						return fmt.Errorf("%d flows open (descriptor limit %d): %w", len(conns), lim.Cur, err)
					}
					conns = append(conns, c)
				}
			}
			pc, err := net.ListenPacket(udp, lo)
			if err != nil {
				return err
			}
			lns = append(lns, pc)
			go func() {
				b := make([]byte, 64)
				for {
					n, from, err := pc.ReadFrom(b)
					if err != nil {
						return
					}
					pc.WriteTo(b[:n], from)
				}
			}()
			ports["c"] = pc.LocalAddr().(*net.UDPAddr).Port
			u, err := net.Dial(udp, pc.LocalAddr().String())
			if err != nil {
				return err
			}
			conns = append(conns, u)
			if err := json.NewEncoder(os.Stdout).Encode(ports); err != nil {
				return err
			}
		case "reopen":
			// Close every flow (with a reset: no TIME_WAIT to exhaust the
			// ports) and open N again to each server.
			n, _ := strconv.Atoi(f[1])
			addrs := make([]string, 0, 3)
			for _, c := range conns {
				if len(addrs) == 0 || addrs[len(addrs)-1] != c.RemoteAddr().String() {
					addrs = append(addrs, c.RemoteAddr().String())
				}
				if tc, ok := c.(*net.TCPConn); ok {
					tc.SetLinger(0)
				}
				c.Close()
			}
			conns = conns[:0]
			opened := 0
			for i, a := range addrs {
				network, m := "tcp4", n
				if i == len(addrs)-1 {
					network, m = "udp4", 1
				}
				for range m {
					c, err := net.Dial(network, a)
					if err != nil {
						return err
					}
					conns = append(conns, c)
					opened++
				}
			}
			fmt.Println(opened)
		case "churn":
			// N connect+close to server A from W workers at once.
			n, _ := strconv.Atoi(f[1])
			w, _ := strconv.Atoi(f[2])
			addr := fmt.Sprintf("127.0.0.1:%d", lnPort(lns[0]))
			var ok atomic.Int64
			var wg sync.WaitGroup
			for i := range w {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range n/w + b2i(i < n%w) {
						c, err := net.Dial("tcp4", addr)
						if err == nil {
							ok.Add(1)
							c.Close()
						}
					}
				}()
			}
			wg.Wait()
			fmt.Println(ok.Load())
		case "asuser":
			// Become an unprivileged user (every thread): later flows are
			// that user's.
			uid, _ := strconv.Atoi(f[1])
			gid, _ := strconv.Atoi(f[2])
			if err := syscall.Setgroups(nil); err != nil {
				return err
			}
			if err := syscall.Setgid(gid); err != nil {
				return err
			}
			if err := syscall.Setuid(uid); err != nil {
				return err
			}
			fmt.Println(`"ok"`)
		case "check":
			out := make([]string, len(conns))
			for i, c := range conns {
				out[i] = echo(c)
			}
			if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
				return err
			}
		case "close":
			for _, c := range conns {
				c.Close()
			}
			conns = nil
			for _, l := range lns {
				l.Close()
			}
			lns = nil
			fmt.Println(`"closed"`)
		}
	}
	return in.Err()
}

func lnPort(l io.Closer) int { return l.(net.Listener).Addr().(*net.TCPAddr).Port }

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// echo sends one byte and waits for it back.
func echo(c net.Conn) string {
	c.SetDeadline(time.Now().Add(2 * time.Second))
	b := []byte{'x'}
	_, err := c.Write(b)
	if err == nil {
		_, err = io.ReadFull(c, b)
	}
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, syscall.ECONNABORTED):
		return "aborted"
	default:
		return err.Error()
	}
}

func callJSON(t testing.TB, h *testutil.Helper, req string, v any) {
	t.Helper()
	ans, err := h.Call([]byte(req))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(ans, v); err != nil {
		t.Fatalf("%s: %v (%q)", req, err, ans)
	}
}

func reauthSetup(t testing.TB) (*Datapath, *testutil.Cgroup) {
	t.Helper()
	d, cg := kernelSetup(t)
	if err := d.EnableReauthorization(); err != nil {
		testutil.Unavailable(t, err)
	}
	return d, cg
}

func portFilter(l engine.LayerID, proto uint8, port int) engine.Filter {
	return blockFilter(l, engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(port))},
		engine.Condition{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(proto)})
}

// TestReauthorizeResetsBlockedFlows: established flows that a new policy
// blocks are destroyed by a reauthorization pass, those it still permits
// survive, and a pass under an unchanged policy touches nothing.
func TestReauthorizeResetsBlockedFlows(t *testing.T) {
	d, cg := reauthSetup(t)
	e := engine.New(engine.Options{})
	apply(t, d, e)
	h := testutil.StartHelper(t, cg, "holdconns")
	const n = 3
	var ports map[string]int
	callJSON(t, h, fmt.Sprintf("open %d", n), &ports)

	pass, err := d.Reauthorize(e, nil)
	if err != nil {
		t.Fatal(err)
	}
	if pass.Flows-pass.Inbound != 2*n+1 || len(pass.Resets) != 0 {
		t.Fatalf("unchanged policy: %+v, want %d flows and no reset", pass, 2*n+1)
	}
	// The accepted sockets of the servers were not connected through the
	// hook: not live flows of the hooked cgroup.
	var fate []string
	callJSON(t, h, "check", &fate)
	for i, f := range fate {
		if f != "ok" {
			t.Fatalf("flow %d before the change: %s", i, f)
		}
	}

	if err := e.Update(func(tx *engine.Txn) error {
		for _, f := range []engine.Filter{portFilter(engine.LayerALEAuthConnectV4, 6, ports["a"]), portFilter(engine.LayerALEAuthConnectV4, 17, ports["c"])} {
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
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
	if pass.Blocked != n+1 || len(pass.Resets) != n+1 {
		t.Fatalf("after blocking A and C: %+v, want %d resets", pass, n+1)
	}
	for _, r := range pass.Resets {
		port := r.Flow.Remote.Port()
		if (port != uint16(ports["a"]) && port != uint16(ports["c"])) || r.Result.Permitted() || r.Result.Filter == 0 {
			t.Errorf("reset %+v", r)
		}
		if r.Flow.UID != 0 || r.Flow.PID != uint32(h.Pid()) || r.Flow.Comm == "" || r.Flow.App == (AppIdentity{}) {
			t.Errorf("reset's metadata %+v (helper pid %d)", r.Flow, h.Pid())
		}
	}
	callJSON(t, h, "check", &fate)
	for i, f := range fate {
		want := "ok"
		if i < n || i == 2*n {
			want = "aborted" // A's flows, then UDP
		}
		if (want == "ok") != (f == "ok") || (i < n && f != want) {
			t.Errorf("flow %d after the change: %s, want %s", i, f, want)
		}
	}
	// The destroyed flows are gone; the next pass finds B's only.
	pass, err = d.Reauthorize(e, p)
	if err != nil {
		t.Fatal(err)
	}
	if pass.Flows-pass.Inbound != n || len(pass.Resets) != 0 {
		t.Fatalf("second pass: %+v, want %d flows", pass, n)
	}
	if kill, _, err := d.ReauthCounts(); err != nil || kill != 0 {
		t.Fatalf("kill map holds %d (%v)", kill, err)
	}
}

// TestReauthorizeOnlyHookedCgroups: a socket noted by the hooks of a
// cgroup they were detached from since is not a live flow of the hooked
// cgroups: the iterator checks the socket's cgroup.
func TestReauthorizeOnlyHookedCgroups(t *testing.T) {
	d, cg := reauthSetup(t)
	e := engine.New(engine.Options{})
	apply(t, d, e)
	h := testutil.StartHelper(t, cg, "holdconns")
	var ports map[string]int
	callJSON(t, h, "open 2", &ports)
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", h.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	flows, err := outboundFlows(d.LiveFlows(ns))
	if err != nil {
		t.Fatal(err)
	}
	if len(flows) != 5 {
		t.Fatalf("%d live flows, want 5: %+v", len(flows), flows)
	}
	var cookies []uint64
	for _, f := range flows {
		cookies = append(cookies, f.Cookie)
		if f.SocketRemote.Port() != f.Remote.Port() || !f.SocketLocal.Addr().IsLoopback() || f.SocketLocal.Port() == 0 {
			t.Errorf("flow %+v", f)
		}
	}
	if err := d.Detach(cg.Path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Attach(cg.Path) }) // kernelSetup's cleanup detaches it
	flows, err = outboundFlows(d.LiveFlows(ns))
	if err != nil {
		t.Fatal(err)
	}
	if len(flows) != 0 {
		t.Fatalf("after detaching the cgroup: %d live flows: %+v", len(flows), flows)
	}
	if done, err := d.DestroyFlows(ns, cookies); err != nil || len(done) != 0 {
		t.Fatalf("destroyed %v (%v) of a cgroup no longer hooked", done, err)
	}
	var fate []string
	callJSON(t, h, "check", &fate)
	for i, f := range fate {
		if f != "ok" {
			t.Errorf("flow %d of a cgroup no longer hooked: %s", i, f)
		}
	}
}

// TestReauthorizeSoak: soakOps flows of the hooked cgroup go through
// reauthorization passes in one datapath lifetime (rounds of 1,001 live
// flows, half of them blocked and destroyed); afterwards no flow is left,
// the kill map is empty, and goroutines, file descriptors and heap are
// back to their level.
func TestReauthorizeSoak(t *testing.T) {
	d, cg := reauthSetup(t)
	p0, err := Compile(engine.New(engine.Options{}).View())
	if err != nil {
		t.Fatal(err)
	}
	e := engine.New(engine.Options{})
	h := testutil.StartHelper(t, cg, "holdconns")
	const per = 500
	var ports map[string]int
	if err := d.Apply(p0); err != nil {
		t.Fatal(err)
	}
	callJSON(t, h, fmt.Sprintf("open %d", per), &ports)
	if err := e.Update(func(tx *engine.Txn) error {
		_, err := tx.AddFilter(portFilter(engine.LayerALEAuthConnectV4, 6, ports["a"]))
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
	// Each round: the permitting policy, the flows opened, the blocking
	// policy, a pass.
	reopen := func() {
		t.Helper()
		if err := d.Apply(p0); err != nil {
			t.Fatal(err)
		}
		var opened int
		callJSON(t, h, fmt.Sprintf("reopen %d", per), &opened)
		if opened != 2*per+1 {
			t.Fatalf("reopened %d flows", opened)
		}
		if err := d.Apply(p); err != nil {
			t.Fatal(err)
		}
	}
	pass := func() {
		t.Helper()
		r, err := d.Reauthorize(e, p)
		if err != nil {
			t.Fatal(err)
		}
		if r.Flows-r.Inbound != 2*per+1 || len(r.Resets) != per {
			t.Fatalf("pass: %d flows (%d accepted), %d resets; want %d outbound, %d", r.Flows, r.Inbound, len(r.Resets), 2*per+1, per)
		}
	}
	pass() // warm up
	runtime.GC()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	g0, fd0 := runtime.NumGoroutine(), fdCount(t)
	rounds := (soakOps + 2*per) / (2*per + 1) // at least soakOps flows
	var inPass time.Duration
	start := time.Now()
	for range rounds {
		reopen()
		t0 := time.Now()
		pass()
		inPass += time.Since(t0)
	}
	t.Logf("%d rounds, %d flows reauthorized (%d reset) in %v; the passes took %v (%v per flow)", rounds, rounds*(2*per+1), rounds*per,
		time.Since(start), inPass, inPass/time.Duration(rounds*(2*per+1)))
	var closed string
	callJSON(t, h, "close", &closed)
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", h.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	flows, err := outboundFlows(d.LiveFlows(ns))
	ns.Close()
	if err != nil || len(flows) != 0 {
		t.Fatalf("after closing: %d live flows (%v)", len(flows), err)
	}
	if kill, cgs, err := d.ReauthCounts(); err != nil || kill != 0 || cgs > 8 {
		t.Fatalf("kill map %d, cgroups %d (%v)", kill, cgs, err)
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	if g := runtime.NumGoroutine(); g > g0+2 {
		t.Errorf("goroutines %d -> %d", g0, g)
	}
	if fd := fdCount(t); fd > fd0+2 {
		t.Errorf("file descriptors %d -> %d", fd0, fd)
	}
	if ms.HeapAlloc > ms0.HeapAlloc+8<<20 {
		t.Errorf("heap %d -> %d", ms0.HeapAlloc, ms.HeapAlloc)
	}
}

// BenchmarkReauthorizePass: one reauthorization pass over 10,005 live
// flows of the hooked cgroup in three network namespaces (a process here
// gets about 10,000 descriptors, two a flow), under a policy that blocks
// none of them: the cost of a commit that resets nothing. "list" is the
// socket iterator's part for one namespace (3,335 flows).
func BenchmarkReauthorizePass(b *testing.B) {
	d, cg := reauthSetup(b)
	e := engine.New(engine.Options{})
	// A policy of a few filters that match none of the flows.
	if err := e.Update(func(tx *engine.Txn) error {
		for port := range 16 {
			if _, err := tx.AddFilter(portFilter(engine.LayerALEAuthConnectV4, 6, 1+port)); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	p, err := Compile(e.View())
	if err != nil {
		b.Fatal(err)
	}
	if err := d.Apply(p); err != nil {
		b.Fatal(err)
	}
	var h *testutil.Helper
	for range 3 {
		h = testutil.StartHelper(b, cg, "holdconns")
		var ports map[string]int
		callJSON(b, h, "open 1667", &ports)
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", h.Pid()))
	if err != nil {
		b.Fatal(err)
	}
	defer ns.Close()
	b.Run("pass", func(b *testing.B) {
		for b.Loop() {
			r, err := d.Reauthorize(e, p)
			if err != nil || r.Flows != 10005 || len(r.Resets) != 0 {
				b.Fatalf("%+v %v", r.Flows, err)
			}
		}
	})
	b.Run("list", func(b *testing.B) {
		for b.Loop() {
			n := 0
			if err := d.liveFlows(ns, func(*LiveFlow) { n++ }); err != nil || n != 3335 {
				b.Fatal(n, err)
			}
		}
	})
}

// BenchmarkReauthNoteConnect: TCP connect+close in the hooked cgroup with
// the connect hook's per-socket note off and on (reauthorization enabled),
// alternately in one run, and the connect4 program's own run time each
// way from bpf_stats.
func BenchmarkReauthNoteConnect(b *testing.B) {
	testutil.RequireRoot(b)
	bareCg, cg := testutil.NewCgroup(b), testutil.NewCgroup(b)
	d, err := Load(Options{})
	if err != nil {
		testutil.Unavailable(b, err)
	}
	b.Cleanup(func() { d.Close() })
	if err := d.Attach(cg.Path); err != nil {
		testutil.Unavailable(b, err)
	}
	apply(b, d, tenThousand(b))
	if err := d.EnableReauthorization(); err != nil {
		testutil.Unavailable(b, err)
	}
	note := func(on bool) {
		v := uint32(0)
		if on {
			v = 1
		}
		if err := d.objs.FwpNoteCfg.Put(uint32(0), v); err != nil {
			b.Fatal(err)
		}
	}
	measure := func() int64 {
		var ns [2]int64
		if err := json.Unmarshal(testutil.RunHelper(b, bareCg, "connectpair", nil, bareCg.Path, cg.Path), &ns); err != nil {
			b.Fatal(err)
		}
		return ns[1]
	}
	var off, on int64
	runs := 0
	for b.Loop() {
		note(false)
		off += measure()
		note(true)
		on += measure()
		runs++
	}
	b.ReportMetric(float64(off)/float64(runs), "ns/connect-notes-off")
	b.ReportMetric(float64(on)/float64(runs), "ns/connect-notes-on")
	b.ReportMetric(float64(on)/float64(off), "ratio")
	b.StopTimer()
	stats, err := EnableStats()
	if err != nil {
		b.Fatal(err)
	}
	defer stats.Close()
	for _, v := range []bool{false, true} {
		note(v)
		before, err := d.Stats()
		if err != nil {
			b.Fatal(err)
		}
		measure()
		after, err := d.Stats()
		if err != nil {
			b.Fatal(err)
		}
		if n := after["connect4"].Runs - before["connect4"].Runs; n > 0 {
			b.ReportMetric(float64(after["connect4"].RunTime-before["connect4"].RunTime)/float64(n), fmt.Sprintf("ns/connect4-run-notes-%v", v))
		}
	}
}

// TestFlowLayersOncePerFlow: under load (connect+close from 16 workers at
// once), every outbound TCP flow of the hooked cgroup reaches the
// ALE_FLOW_ESTABLISHED callout once with its metadata, the
// ALE_ENDPOINT_CLOSURE callout once with the context the first associated
// for it, and that context's flowDeleteFn once; nothing is left in the
// engine and no report is lost.
func TestFlowLayersOncePerFlow(t *testing.T) {
	n := 4000
	if testing.Short() {
		n = 500
	}
	flowLayersOnce(t, n, false)
}

// TestFlowEventsSoak: soakOps flows through the flow layers in one
// lifetime, each reported once; afterwards no flow context, no lost
// report, and goroutines, descriptors and heap at their level.
func TestFlowEventsSoak(t *testing.T) {
	flowLayersOnce(t, soakOps, true)
}

func flowLayersOnce(t *testing.T, n int, soak bool) {
	d, cg := reauthSetup(t)
	if err := d.EnableFlowEvents(); err != nil {
		testutil.Unavailable(t, err)
	}
	e := engine.New(engine.Options{})
	type counts struct{ est, clo, del, ctxSeen int }
	var mu sync.Mutex
	seen := map[uint64]*counts{}
	get := func(c uint64) *counts {
		if seen[c] == nil {
			seen[c] = &counts{}
		}
		return seen[c]
	}
	var cloID engine.CalloutID
	var bad atomic.Value
	if err := e.Update(func(tx *engine.Txn) error {
		p, err := tx.AddProvider(engine.Provider{Key: "flows"})
		if err != nil {
			return err
		}
		est, err := tx.AddCallout(engine.Callout{Key: "flows.est", Provider: p, Layer: engine.LayerALEFlowEstablishedV4})
		if err != nil {
			return err
		}
		cloID, err = tx.AddCallout(engine.Callout{Key: "flows.clo", Provider: p, Layer: engine.LayerALEEndpointClosureV4})
		if err != nil {
			return err
		}
		// Outbound TCP only: UDP sockets (of other tests' helpers too)
		// and the servers' accepted connections have reports of their
		// own.
		tcp := []engine.Condition{{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)}}
		for _, f := range []engine.Filter{
			{Layer: engine.LayerALEFlowEstablishedV4, Conditions: tcp, Action: engine.Action{Type: engine.ActionCalloutInspection, Callout: est}},
			{Layer: engine.LayerALEEndpointClosureV4, Conditions: tcp, Action: engine.Action{Type: engine.ActionCalloutInspection, Callout: cloID}},
		} {
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := e.RegisterCallout("flows.est", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		out.Action = engine.ActionContinue
		fh := req.Meta.FlowHandle
		if req.Meta.ProcessPath == "" || req.Values.Uint(engine.FieldIPLocalPort) == 0 || req.Values.Uint(engine.FieldIPRemotePort) == 0 {
			bad.Store(fmt.Sprintf("established without metadata: %v", req.Meta))
		}
		mu.Lock()
		get(uint64(fh)).est++
		mu.Unlock()
		// The closure callout gets this context, and deletes it.
		if err := req.Engine().FlowAssociateContext(fh, engine.LayerALEEndpointClosureV4, cloID, uint64(fh)); err != nil {
			bad.Store(err.Error())
		}
	}}); err != nil {
		t.Fatal(err)
	}
	if err := e.RegisterCallout("flows.clo", engine.CalloutRegistration{
		Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			out.Action = engine.ActionContinue
			mu.Lock()
			c := get(uint64(req.Meta.FlowHandle))
			c.clo++
			if req.FlowContext == uint64(req.Meta.FlowHandle) {
				c.ctxSeen++
			}
			mu.Unlock()
		},
		FlowDelete: func(_ engine.LayerID, _ engine.CalloutID, ctx any) {
			mu.Lock()
			get(ctx.(uint64)).del++
			mu.Unlock()
		},
	}); err != nil {
		t.Fatal(err)
	}
	apply(t, d, e) // the flow layers' filters are left to FlowLayers
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	fl := &FlowLayers{Engine: e}
	go func() {
		done <- d.ReadFlowEvents(ctx, func(ev FlowEvent) {
			// This test's clients only: not the servers' accepted
			// connections (inreauth_test.go), nor other tests' flows
			// (the datapath is shared, its ring buffer too).
			if !ev.Flow.Inbound && ev.Flow.CgroupID == cg.ID {
				fl.Handle(ev)
			}
		})
	}()
	defer func() { cancel(); <-done }()
	lost0, err := d.FlowEventsLost()
	if err != nil {
		t.Fatal(err)
	}
	h := testutil.StartHelper(t, cg, "holdconns")
	var ports map[string]int
	callJSON(t, h, "open 0", &ports)
	runtime.GC()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	g0, fd0 := runtime.NumGoroutine(), fdCount(t)
	start := time.Now()
	var ok int
	// In batches: each batch's reports fit the ring buffer however slow
	// the reader (1 MiB, ~5,700 reports; four a flow: the client's
	// establishment and closure, and the server's accepted connection's).
	for left := n; left > 0; left -= 1000 {
		m := min(left, 1000)
		callJSON(t, h, fmt.Sprintf("churn %d 16", m), &ok)
		if ok != m {
			t.Fatalf("%d of %d connects", ok, m)
		}
		for deadline := time.Now().Add(10 * time.Second); ; {
			mu.Lock()
			closed := 0
			for _, c := range seen {
				closed += c.clo
			}
			mu.Unlock()
			if closed >= n-left+m || time.Now().After(deadline) {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	t.Logf("%d flows through the flow layers in %v", n, time.Since(start))
	if soak {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		if g := runtime.NumGoroutine(); g > g0+2 {
			t.Errorf("goroutines %d -> %d", g0, g)
		}
		if fd := fdCount(t); fd > fd0+2 {
			t.Errorf("file descriptors %d -> %d", fd0, fd)
		}
		// The test's own map of n flows' counts is most of the heap.
		if ms.HeapAlloc > ms0.HeapAlloc+uint64(n)*200+16<<20 {
			t.Errorf("heap %d -> %d", ms0.HeapAlloc, ms.HeapAlloc)
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		closed := 0
		for _, c := range seen {
			closed += c.clo
		}
		mu.Unlock()
		if closed >= n || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != n {
		t.Errorf("%d flows seen, want %d", len(seen), n)
	}
	for c, k := range seen {
		if *k != (counts{1, 1, 1, 1}) {
			t.Errorf("flow %d: %+v, want each once", c, *k)
		}
	}
	if v := bad.Load(); v != nil {
		t.Error(v)
	}
	if o := e.Outstanding(); o.FlowContexts != 0 {
		t.Errorf("flow contexts left: %+v", o)
	}
	if lost, err := d.FlowEventsLost(); err != nil || lost != lost0 {
		t.Errorf("flow events lost: %d (%v)", lost-lost0, err)
	}
}

// TestReauthorizeByUser: the flows of an unprivileged user (a real one,
// created for the test) and of root in the same hooked cgroup; a policy
// that blocks the user's connections resets the user's established flows
// only: the note carries the user the connect hook saw.
func TestReauthorizeByUser(t *testing.T) {
	d, cg := reauthSetup(t)
	e := engine.New(engine.Options{})
	apply(t, d, e)
	u := testutil.NewUser(t)
	hu := testutil.StartHelper(t, cg, "holdconns")
	var ok string
	callJSON(t, hu, fmt.Sprintf("asuser %d %d", u.UID, u.GID), &ok)
	hr := testutil.StartHelper(t, cg, "holdconns")
	var ports map[string]int
	callJSON(t, hu, "open 2", &ports)
	callJSON(t, hr, "open 2", &ports)
	if err := e.Update(func(tx *engine.Txn) error {
		_, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
			engine.Condition{Field: engine.FieldALEUserID, Match: engine.MatchEqual, Value: engine.Uint32(u.UID)}))
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
	pass, err := d.Reauthorize(e, p)
	if err != nil {
		t.Fatal(err)
	}
	if pass.Flows-pass.Inbound != 10 || len(pass.Resets) != 5 {
		t.Fatalf("pass %+v: want 10 flows, the user's 5 reset", pass)
	}
	for _, r := range pass.Resets {
		if r.Flow.UID != u.UID || r.Flow.PID != uint32(hu.Pid()) {
			t.Errorf("reset %+v, want the user's (uid %d, pid %d)", r.Flow, u.UID, hu.Pid())
		}
	}
	var fate []string
	callJSON(t, hr, "check", &fate)
	for i, f := range fate {
		if f != "ok" {
			t.Errorf("root's flow %d: %s", i, f)
		}
	}
	callJSON(t, hu, "check", &fate)
	for i, f := range fate {
		if f == "ok" {
			t.Errorf("the user's flow %d survived", i)
		}
	}
}

// BenchmarkFlowEventHooks: the flow event programs' own run time per
// run (bpf_stats) over 2,000 connect+close of the hooked cgroup, and what
// the connect+close costs with them attached.
func BenchmarkFlowEventHooks(b *testing.B) {
	d, cg := reauthSetup(b)
	if err := d.EnableFlowEvents(); err != nil {
		testutil.Unavailable(b, err)
	}
	apply(b, d, engine.New(engine.Options{}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	fl := &FlowLayers{Engine: engine.New(engine.Options{})}
	go func() { done <- d.ReadFlowEvents(ctx, func(ev FlowEvent) { fl.Handle(ev) }) }()
	defer func() { cancel(); <-done }()
	h := testutil.StartHelper(b, cg, "holdconns")
	var ports map[string]int
	callJSON(b, h, "open 0", &ports)
	stats, err := EnableStats()
	if err != nil {
		b.Fatal(err)
	}
	defer stats.Close()
	s0, _ := d.reauth.objs.FwpFlowSockops.Stats()
	r0, _ := d.reauth.objs.FwpFlowRelease.Stats()
	flows := 0
	for b.Loop() {
		var ok int
		callJSON(b, h, "churn 2000 1", &ok)
		flows += ok
	}
	s1, _ := d.reauth.objs.FwpFlowSockops.Stats()
	r1, _ := d.reauth.objs.FwpFlowRelease.Stats()
	b.ReportMetric(float64(b.Elapsed())/float64(flows), "ns/connect+close")
	if n := s1.RunCount - s0.RunCount; n > 0 {
		b.ReportMetric(float64(s1.Runtime-s0.Runtime)/float64(n), "ns/sockops-run")
		b.ReportMetric(float64(n)/float64(flows), "sockops-runs/flow")
	}
	if n := r1.RunCount - r0.RunCount; n > 0 {
		b.ReportMetric(float64(r1.Runtime-r0.Runtime)/float64(n), "ns/release-run")
	}
}

// BenchmarkFlowLayersHandle: fwpd's side of one flow event, established
// then closed, with an inspection callout at each layer associating and
// deleting a context.
func BenchmarkFlowLayersHandle(b *testing.B) {
	e := engine.New(engine.Options{})
	var clo engine.CalloutID
	if err := e.Update(func(tx *engine.Txn) error {
		est, err := tx.AddCallout(engine.Callout{Key: "b.est", Layer: engine.LayerALEFlowEstablishedV4})
		if err != nil {
			return err
		}
		if clo, err = tx.AddCallout(engine.Callout{Key: "b.clo", Layer: engine.LayerALEEndpointClosureV4}); err != nil {
			return err
		}
		for _, f := range []engine.Filter{
			{Layer: engine.LayerALEFlowEstablishedV4, Action: engine.Action{Type: engine.ActionCalloutInspection, Callout: est}},
			{Layer: engine.LayerALEEndpointClosureV4, Action: engine.Action{Type: engine.ActionCalloutInspection, Callout: clo}},
		} {
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	e.RegisterCallout("b.est", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		out.Action = engine.ActionContinue
		req.Engine().FlowAssociateContext(req.Meta.FlowHandle, engine.LayerALEEndpointClosureV4, clo, 1)
	}})
	e.RegisterCallout("b.clo", engine.CalloutRegistration{Classify: func(_ *engine.ClassifyRequest, out *engine.ClassifyOut) {
		out.Action = engine.ActionContinue
	}, FlowDelete: func(engine.LayerID, engine.CalloutID, any) {}})
	fl := &FlowLayers{Engine: e}
	ev := FlowEvent{Type: FlowEstablished, Flow: LiveFlow{Protocol: 6, PID: uint32(os.Getpid()), Comm: "bench", App: AppIdentity{Dev: 1, Ino: 2},
		Layer: engine.LayerALEAuthConnectV4}}
	ev.Flow.SocketLocal = netipMust("127.0.0.1:40000")
	ev.Flow.SocketRemote = netipMust("127.0.0.1:80")
	cookie := uint64(1)
	for b.Loop() {
		cookie++
		ev.Flow.Cookie = cookie
		ev.Type = FlowEstablished
		fl.Handle(ev)
		ev.Type = FlowClosed
		fl.Handle(ev)
	}
	if o := e.Outstanding(); o.FlowContexts != 0 {
		b.Fatalf("%+v", o)
	}
}

func netipMust(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// TestReauthorizeV6: the same over IPv6 (the v6 layer, the socket's v6
// addresses in the iterator).
func TestReauthorizeV6(t *testing.T) {
	d, cg := reauthSetup(t)
	e := engine.New(engine.Options{})
	apply(t, d, e)
	h := testutil.StartHelper(t, cg, "holdconns")
	var ports map[string]int
	callJSON(t, h, "open 2 6", &ports)
	if err := e.Update(func(tx *engine.Txn) error {
		_, err := tx.AddFilter(portFilter(engine.LayerALEAuthConnectV6, 6, ports["a"]))
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
	pass, err := d.Reauthorize(e, p)
	if err != nil {
		t.Fatal(err)
	}
	if pass.Flows-pass.Inbound != 5 || len(pass.Resets) != 2 {
		t.Fatalf("pass %+v: want 5 flows, 2 reset", pass)
	}
	for _, r := range pass.Resets {
		f := r.Flow
		if f.Layer != engine.LayerALEAuthConnectV6 || f.Remote.String() != fmt.Sprintf("[::1]:%d", ports["a"]) ||
			f.SocketRemote != f.Remote || f.SocketLocal.Addr().String() != "::1" {
			t.Errorf("reset %+v", f)
		}
	}
	var fate []string
	callJSON(t, h, "check", &fate)
	want := []string{"aborted", "aborted", "ok", "ok", "ok"}
	if fmt.Sprint(fate) != fmt.Sprint(want) {
		t.Fatalf("fates %v, want %v", fate, want)
	}
}

// outboundFlows leaves out the accepted connections of the tests' servers
// (live flows of their own: inreauth_test.go).
func outboundFlows(flows []LiveFlow, err error) ([]LiveFlow, error) {
	out := flows[:0:0]
	for _, f := range flows {
		if !f.Inbound {
			out = append(out, f)
		}
	}
	return out, err
}
