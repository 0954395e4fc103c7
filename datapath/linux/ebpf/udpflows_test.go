//go:build linux

package ebpf

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
)

func init() { testutil.RegisterHelper("udpclose", udpCloseHelper) }

// udpCloseHelper runs in the test cgroup. "udp N W PORT FAM": N UDP
// sockets connected to loopback:PORT (FAM 4 or 6) and closed, from W
// workers at once; it answers [connected, the last socket's local port].
func udpCloseHelper([]string) error {
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) != 5 || f[0] != "udp" {
			fmt.Println("[]")
			continue
		}
		n, _ := strconv.Atoi(f[1])
		w, _ := strconv.Atoi(f[2])
		addr := "127.0.0.1:" + f[3]
		if f[4] == "6" {
			addr = "[::1]:" + f[3]
		}
		var ok, last atomic.Int64
		var wg sync.WaitGroup
		for i := range w {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range n/w + b2i(i < n%w) {
					c, err := net.Dial("udp"+f[4], addr)
					if err != nil {
						continue
					}
					ok.Add(1)
					last.Store(int64(c.LocalAddr().(*net.UDPAddr).Port))
					c.Close()
				}
			}()
		}
		wg.Wait()
		b, _ := json.Marshal([]int64{ok.Load(), last.Load()})
		fmt.Println(string(b))
	}
	return in.Err()
}

// udpClosures runs the flow events of d through an engine whose
// ALE_ENDPOINT_CLOSURE callouts (v4, v6) record each UDP flow to port
// and whose ALE_FLOW_ESTABLISHED callouts count establishment reports for
// it; a flow context is associated with each closing flow's handle before
// its report is handled (as the callout path's AUTH_CONNECT callout
// does), and its flowDeleteFn counted.
type udpClosures struct {
	e    *engine.Engine
	port uint16

	mu      sync.Mutex
	closed  map[uint64]int    // cookie: closure reports
	tuple   map[uint64]string // cookie: local and remote at the closure
	est     int
	deletes int
	bad     atomic.Value
}

func newUDPClosures(t *testing.T, d *Datapath, port uint16) *udpClosures {
	u := &udpClosures{e: engine.New(engine.Options{}), port: port, closed: map[uint64]int{}, tuple: map[uint64]string{}}
	ids := map[engine.LayerID]engine.CalloutID{}
	if err := u.e.Update(func(tx *engine.Txn) error {
		p, err := tx.AddProvider(engine.Provider{Key: "udpflows"})
		if err != nil {
			return err
		}
		for i, l := range []engine.LayerID{engine.LayerALEEndpointClosureV4, engine.LayerALEEndpointClosureV6,
			engine.LayerALEFlowEstablishedV4, engine.LayerALEFlowEstablishedV6} {
			co, err := tx.AddCallout(engine.Callout{Key: fmt.Sprintf("udpflows.%d", i), Provider: p, Layer: l})
			if err != nil {
				return err
			}
			ids[l] = co
			if _, err := tx.AddFilter(engine.Filter{Layer: l, Action: engine.Action{Type: engine.ActionCalloutInspection, Callout: co},
				Conditions: []engine.Condition{{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(port)}}}); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for i, l := range []engine.LayerID{engine.LayerALEEndpointClosureV4, engine.LayerALEEndpointClosureV6} {
		if err := u.e.RegisterCallout(fmt.Sprintf("udpflows.%d", i), engine.CalloutRegistration{
			Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
				out.Action = engine.ActionContinue
				c := uint64(req.Meta.FlowHandle)
				u.mu.Lock()
				u.closed[c]++
				u.tuple[c] = fmt.Sprintf("%v:%d %v:%d", req.Values.Get(engine.FieldIPLocalAddress).Addr(), req.Values.Uint(engine.FieldIPLocalPort),
					req.Values.Get(engine.FieldIPRemoteAddress).Addr(), req.Values.Uint(engine.FieldIPRemotePort))
				u.mu.Unlock()
				if req.FlowContext != c {
					u.bad.Store(fmt.Sprintf("flow %d: context %v at the closure", c, req.FlowContext))
				}
			},
			FlowDelete: func(engine.LayerID, engine.CalloutID, any) {
				u.mu.Lock()
				u.deletes++
				u.mu.Unlock()
			},
		}); err != nil {
			t.Fatal(err)
		}
		_ = l
	}
	for i := 2; i < 4; i++ {
		if err := u.e.RegisterCallout(fmt.Sprintf("udpflows.%d", i), engine.CalloutRegistration{
			Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
				out.Action = engine.ActionContinue
				u.mu.Lock()
				u.est++
				u.mu.Unlock()
			},
		}); err != nil {
			t.Fatal(err)
		}
	}
	apply(t, d, u.e)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	fl := &FlowLayers{Engine: u.e}
	go func() {
		done <- d.ReadFlowEvents(ctx, func(ev FlowEvent) {
			f := &ev.Flow
			if f.Protocol != 17 || f.Remote.Port() != port {
				return // another test's flow in the shared datapath
			}
			if ev.Type == FlowClosed {
				l := engine.LayerALEEndpointClosureV4
				if f.SocketRemote.Addr().Is6() {
					l = engine.LayerALEEndpointClosureV6
				}
				if err := u.e.FlowAssociateContext(engine.FlowHandle(f.Cookie), l, ids[l], f.Cookie); err != nil {
					u.bad.Store(err.Error())
				}
			}
			fl.Handle(ev)
		})
	}()
	t.Cleanup(func() { cancel(); <-done })
	return u
}

// wait waits until n flows were reported closed and their contexts
// deleted (or 20 s passed).
func (u *udpClosures) wait(n int) {
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		u.mu.Lock()
		c, d := len(u.closed), u.deletes
		u.mu.Unlock()
		if c >= n && d >= n {
			return
		}
	}
}

// TestFlowEventsUDPClosure: a connected UDP socket of the hooked cgroup
// that its program closes is reported at ALE_ENDPOINT_CLOSURE once, with
// the connect's peer and the socket's local port, and its flow context
// ends (flowDeleteFn); there is no establishment report for UDP. v4 and
// v6.
func TestFlowEventsUDPClosure(t *testing.T) {
	d, cg := reauthSetup(t)
	if err := d.EnableFlowEvents(); err != nil {
		testutil.Unavailable(t, err)
	}
	const port = 9741
	u := newUDPClosures(t, d, port)
	h := testutil.StartHelper(t, cg, "udpclose")
	if line, err := h.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		t.Fatalf("helper: %q %v", line, err)
	}
	for i, c := range []struct{ fam, remote string }{{"4", "127.0.0.1"}, {"6", "::1"}} {
		var r []int64
		callJSON(t, h, fmt.Sprintf("udp 1 1 %d %s", port, c.fam), &r)
		if len(r) != 2 || r[0] != 1 {
			t.Fatalf("v%s: %v", c.fam, r)
		}
		u.wait(i + 1)
		u.mu.Lock()
		// Connected to loopback: the local address is loopback too.
		want := fmt.Sprintf("%s:%d %s:%d", c.remote, r[1], c.remote, port)
		found := false
		for _, tu := range u.tuple {
			found = found || tu == want
		}
		u.mu.Unlock()
		if !found {
			t.Fatalf("v%s: closures %v, want %q", c.fam, u.tuple, want)
		}
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	t.Logf("closures: %v", u.tuple)
	if len(u.closed) != 2 || u.deletes != 2 || u.est != 0 {
		t.Fatalf("closed %v, %d flowDeleteFn, %d establishment reports; want 2 flows closed once, 2 deletes, none", u.closed, u.deletes, u.est)
	}
	if v := u.bad.Load(); v != nil {
		t.Fatal(v)
	}
	if o := u.e.Outstanding(); o.FlowContexts != 0 {
		t.Fatalf("flow contexts left: %+v", o)
	}
}

// TestFlowEventsUDPSoak: soakOps connected UDP sockets in one lifetime,
// each reported closed once and its flow context deleted; no report lost,
// nothing left in the engine, goroutines, descriptors and heap at their
// level.
func TestFlowEventsUDPSoak(t *testing.T) {
	d, cg := reauthSetup(t)
	if err := d.EnableFlowEvents(); err != nil {
		testutil.Unavailable(t, err)
	}
	const port = 9742
	u := newUDPClosures(t, d, port)
	h := testutil.StartHelper(t, cg, "udpclose")
	if line, err := h.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		t.Fatalf("helper: %q %v", line, err)
	}
	lost0, err := d.FlowEventsLost()
	if err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	g0, fd0 := runtime.NumGoroutine(), fdCount(t)
	start := time.Now()
	n := soakOps
	// In batches: each batch's reports fit the ring buffer however slow
	// the reader (1 MiB, ~5,700 reports).
	for done := 0; done < n; {
		m := min(n-done, 2000)
		var r []int64
		callJSON(t, h, fmt.Sprintf("udp %d 8 %d 4", m, port), &r)
		if len(r) != 2 || r[0] != int64(m) {
			t.Fatalf("%v of %d connects", r, m)
		}
		done += m
		u.wait(done)
	}
	t.Logf("%d UDP sockets closed and reported in %v", n, time.Since(start))
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	if g := runtime.NumGoroutine(); g > g0+2 {
		t.Errorf("goroutines %d -> %d", g0, g)
	}
	if fd := fdCount(t); fd > fd0+2 {
		t.Errorf("file descriptors %d -> %d", fd0, fd)
	}
	// The test's own maps of n flows are most of the heap.
	if ms.HeapAlloc > ms0.HeapAlloc+uint64(n)*300+16<<20 {
		t.Errorf("heap %d -> %d", ms0.HeapAlloc, ms.HeapAlloc)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.closed) != n || u.deletes != n || u.est != 0 {
		t.Errorf("%d flows closed, %d flowDeleteFn, %d establishment reports; want %d, %d, 0", len(u.closed), u.deletes, u.est, n, n)
	}
	for c, k := range u.closed {
		if k != 1 {
			t.Errorf("flow %d: %d closure reports", c, k)
		}
	}
	if v := u.bad.Load(); v != nil {
		t.Error(v)
	}
	if o := u.e.Outstanding(); o.FlowContexts != 0 {
		t.Errorf("flow contexts left: %+v", o)
	}
	if lost, err := d.FlowEventsLost(); err != nil || lost != lost0 {
		t.Errorf("flow events lost: %d (%v)", lost-lost0, err)
	}
}
