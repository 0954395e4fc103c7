//go:build linux

package nfqueue

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
	"fwp/internal/testutil"
)

func TestMain(m *testing.M) {
	testutil.HelperMain()
	os.Exit(m.Run())
}

// Ports of the helper's servers; the test callout decides by port.
const (
	portPermit       = 8001 // permits at once
	portPend         = 8002 // pends 300 ms, then permits
	portBlock        = 8003 // blocks
	portFailOpen     = 8004 // pends past the deadline; the filter fails open
	portFailClosed   = 8005 // pends past the deadline; the filter fails closed
	portHeld         = 8006 // pends until the test completes it
	portKernel       = 8007 // no callout filter: the kernel alone permits
	portHardPermit   = 8008 // a hard permit in a higher sublayer; the callout below vetoes
	portHardBlock    = 8009 // a hard block in a higher sublayer; the callout below cannot change it
	portKernelPermit = 8010 // a plain permit filter: the kernel decides
	pendDelay        = 300 * time.Millisecond
	pendTimeout      = 700 * time.Millisecond
)

var helperPorts = []int{portPermit, portPend, portBlock, portFailOpen, portFailClosed, portHeld, portKernel, portHardPermit, portHardBlock, portKernelPermit}

func init() { testutil.RegisterHelper("client", clientHelper) }

// clientHelper runs in the test's cgroup and its own network namespace:
// HTTP servers on the helper ports of 127.0.0.1, and a client answering
// one command line at a time.
func clientHelper(args []string) error {
	for p := diffFirst; p <= diffLast; p++ {
		ln, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			return err
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
	}
	for _, p := range helperPorts {
		for _, addr := range []string{"127.0.0.1", "[::1]"} {
			ln, err := net.Listen("tcp", addr+":"+strconv.Itoa(p))
			if err != nil {
				return err
			}
			go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") }))
		}
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		fmt.Println(helperCommand(f))
	}
	return in.Err()
}

func helperCommand(f []string) string {
	arg := func(i int) int { n, _ := strconv.Atoi(f[i]); return n }
	switch f[0] {
	case "curl":
		// exit code, HTTP code, curl's own time (seconds), wall time (ms)
		start := time.Now()
		host := "127.0.0.1"
		if len(f) > 2 {
			host = f[2]
		}
		out, err := exec.Command("curl", "-g", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "--max-time", "20",
			"http://"+host+":"+f[1]+"/").Output()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			return "error " + err.Error()
		}
		return fmt.Sprintf("%d %s %d", code, out, time.Since(start).Milliseconds())
	case "dialmark":
		// dialmark PORT MARK: one connect from a socket with SO_MARK set
		d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, arg(2)) })
			return errors.Join(err, serr)
		}}
		c, err := d.Dial("tcp4", "127.0.0.1:"+f[1])
		if err != nil {
			return "error " + err.Error()
		}
		c.Close()
		return "ok"
	case "dial":
		// n connects (conc at a time) to port; answers ok, failed, first error
		ok, failed, first := dialMany(arg(1), arg(2), arg(3))
		return fmt.Sprintf("%d %d %q", ok, failed, first)
	case "as":
		// as UID GID PROG ARGS...: run a program as an unprivileged user
		// (no supplementary groups); exit code and its stderr's last line
		cmd := exec.Command("setpriv", append([]string{"--reuid=" + f[1], "--regid=" + f[2], "--clear-groups", "--"}, f[3:]...)...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			return "error " + err.Error()
		}
		lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
		return fmt.Sprintf("%d %q", code, lines[len(lines)-1])
	case "probe":
		// probe FROM TO: connect to each port, one letter each: o connected, x refused
		var b strings.Builder
		for port := arg(1); port <= arg(2); port++ {
			if dialOne(port) == nil {
				b.WriteByte('o')
			} else {
				b.WriteByte('x')
			}
		}
		return b.String()
	case "lat":
		// n connect+close to port one after another: the median and the
		// 90th percentile in nanoseconds
		n := arg(2)
		ds := make([]time.Duration, 0, n)
		for range n {
			start := time.Now()
			if err := dialOne(arg(1)); err != nil {
				return "error " + err.Error()
			}
			ds = append(ds, time.Since(start))
		}
		slices.Sort(ds)
		return fmt.Sprintf("%d %d", ds[len(ds)/2], ds[len(ds)*9/10])
	case "hol":
		// one connect to a held port in the background, then n connects
		// to a permit-at-once port: are they all done while it is held?
		held := make(chan error, 1)
		go func() { held <- dialOne(arg(1)) }()
		time.Sleep(100 * time.Millisecond)
		ok, failed, first := dialMany(arg(2), arg(3), 1)
		stillHeld := len(held) == 0
		err := <-held
		return fmt.Sprintf("%d %d %v %v %q", ok, failed, stillHeld, err == nil, first)
	}
	return "unknown command"
}

// dialOne connects and closes with a reset (no TIME_WAIT: a soak reuses
// the ports).
func dialOne(port int) error {
	c, err := net.DialTimeout("tcp4", "127.0.0.1:"+strconv.Itoa(port), 20*time.Second)
	if err != nil {
		return err
	}
	c.(*net.TCPConn).SetLinger(0)
	return c.Close()
}

func dialMany(port, n, conc int) (ok, failed int, first string) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	var next atomic.Int64
	for range max(conc, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				err := dialOne(port)
				mu.Lock()
				if err == nil {
					ok++
				} else {
					failed++
					if first == "" {
						first = err.Error()
					}
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return
}

var (
	dpOnce sync.Once
	dp     *ebpf.Datapath
	dpErr  error
)

func loadDatapath(t testing.TB) *ebpf.Datapath {
	t.Helper()
	testutil.RequireRoot(t)
	dpOnce.Do(func() { dp, dpErr = ebpf.Load(ebpf.Options{}) })
	if dpErr != nil {
		testutil.Unavailable(t, dpErr)
	}
	return dp
}

// fixture is one datapath attached to a fresh cgroup, an engine whose
// callout decides by port, a helper in that cgroup and a network
// namespace of its own, and the callout path serving that namespace.
type fixture struct {
	eng   *engine.Engine
	dp    *ebpf.Datapath
	h     *testutil.Helper
	path  *Path
	netns *os.File
	cg    *testutil.Cgroup
	held  chan *engine.Pend // pends of portHeld
	calls atomic.Int64
	uid   atomic.Int64 // the user of the last flow the callout saw
}

func newFixture(t testing.TB, pendTimeout time.Duration) *fixture {
	d := loadDatapath(t)
	fx := &fixture{dp: d, held: make(chan *engine.Pend, 4096)}
	fx.eng = engine.New(engine.Options{PendTimeout: pendTimeout})
	cg := testutil.NewCgroup(t)
	fx.cg = cg
	for _, key := range []string{"test.decide", "test.decide6"} {
		if err := fx.eng.RegisterCallout(key, engine.CalloutRegistration{Classify: fx.classify}); err != nil {
			t.Fatal(err)
		}
	}
	if err := fx.eng.Update(func(tx *engine.Txn) error { return testPolicy(tx, true) }); err != nil {
		t.Fatal(err)
	}
	pol, err := ebpf.Compile(fx.eng.View())
	if err != nil {
		t.Fatal(err)
	}
	if !pol.Callouts() {
		t.Fatal("the policy has callout filters, Compile says none")
	}
	if err := d.Apply(pol); err != nil {
		t.Fatal(err)
	}
	if err := d.Attach(cg.Path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Detach(cg.Path)
		empty, _ := ebpf.Compile(engine.New(engine.Options{}).View())
		d.Apply(empty)
	})
	fx.h = testutil.StartHelper(t, cg, "client")
	if line, err := fx.h.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		t.Fatalf("helper: %q %v", line, err) // the first line is the helper's "ready" (an empty request is sent)
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
	return fx
}

// testPolicy is the tests' policy; without callouts, its callout filters
// are left out (the benchmark's kernel-only arm).
func testPolicy(tx *engine.Txn, callouts bool) error {
	{
		p, err := tx.AddProvider(engine.Provider{Key: "test"})
		if err != nil {
			return err
		}
		sl, err := tx.AddSublayer(engine.Sublayer{Key: "test", Provider: p, Weight: 10})
		if err != nil {
			return err
		}
		co, err := tx.AddCallout(engine.Callout{Key: "test.decide", Provider: p, Layer: engine.LayerALEAuthConnectV4})
		if err != nil {
			return err
		}
		hi, err := tx.AddSublayer(engine.Sublayer{Key: "test.hi", Provider: p, Weight: 20})
		if err != nil {
			return err
		}
		for port, act := range map[int]engine.ActionType{portHardPermit: engine.ActionPermit, portHardBlock: engine.ActionBlock} {
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Sublayer: hi, Provider: p,
				Flags:      engine.FilterClearActionRight,
				Conditions: []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(port))}},
				Action:     engine.Action{Type: act}}); err != nil {
				return err
			}
		}
		if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Sublayer: sl, Provider: p,
			Conditions: []engine.Condition{
				{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
				{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(portKernelPermit)},
			},
			Action: engine.Action{Type: engine.ActionPermit}}); err != nil {
			return err
		}
		co6, err := tx.AddCallout(engine.Callout{Key: "test.decide6", Provider: p, Layer: engine.LayerALEAuthConnectV6})
		if err != nil {
			return err
		}
		for _, port := range []int{portPermit, portBlock} {
			if !callouts {
				break
			}
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV6, Sublayer: sl, Provider: p,
				Conditions: []engine.Condition{
					{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(port))},
				},
				Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co6}}); err != nil {
				return err
			}
		}
		for _, port := range []int{portPermit, portPend, portBlock, portFailOpen, portFailClosed, portHeld, portHardPermit, portHardBlock} {
			if !callouts {
				break
			}
			var flags engine.FilterFlags
			if port == portFailOpen {
				flags = engine.FilterPermitIfCalloutUnregistered
			}
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Sublayer: sl, Provider: p, Flags: flags,
				Conditions: []engine.Condition{
					{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(port))},
				},
				Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co}}); err != nil {
				return err
			}
		}
		return nil
	}
}

// classify is the test's Go callout: its decision depends on the port.
func (fx *fixture) classify(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
	fx.calls.Add(1)
	if req.Meta.Has(engine.MetaUserID) {
		fx.uid.Store(int64(req.Meta.UserID))
	}
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
	switch int(req.Values.Uint(engine.FieldIPRemotePort)) {
	case portPermit:
		out.Action = engine.ActionPermit
	case portBlock, portHardPermit, portHardBlock:
		out.Action = engine.ActionBlock
	case portPend:
		if reauth {
			out.Action = engine.ActionPermit
			return
		}
		if p := pend(); p != nil {
			time.AfterFunc(pendDelay, func() { fx.eng.CompleteOperation(p, nil) })
		}
	case portFailOpen, portFailClosed:
		pend() // never completed: the deadline decides
	case portHeld:
		if reauth {
			out.Action = engine.ActionPermit
			return
		}
		if p := pend(); p != nil {
			fx.held <- p
		}
	}
}

func (fx *fixture) call(t testing.TB, cmd string) []string {
	t.Helper()
	line, err := fx.h.Call([]byte(cmd))
	if err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	return strings.Fields(string(line))
}

type curlResult struct {
	exit, code int
	took       time.Duration // curl's time_total
}

func (fx *fixture) curl(t *testing.T, port int, host ...string) curlResult {
	f := fx.call(t, strings.Join(append([]string{"curl", strconv.Itoa(port)}, host...), " "))
	if len(f) != 4 {
		t.Fatalf("curl %d: %q", port, f)
	}
	var r curlResult
	r.exit, _ = strconv.Atoi(f[0])
	r.code, _ = strconv.Atoi(f[1])
	secs, _ := strconv.ParseFloat(f[2], 64)
	r.took = time.Duration(secs * float64(time.Second))
	return r
}

// checkClean: nothing held, pended or left in the maps.
func (fx *fixture) checkClean(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		o := fx.eng.Outstanding()
		st := fx.path.Stats()
		flows, tuples, err := fx.dp.CalloutFlowCounts()
		if err != nil {
			t.Fatal(err)
		}
		if o == (engine.Outstanding{}) && st.Held == 0 && flows == 0 && tuples == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind: engine %+v, held %d, callout flows %d, tuples %d", o, st.Held, flows, tuples)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCurlThroughCallout(t *testing.T) {
	fx := newFixture(t, pendTimeout)
	if r := fx.curl(t, portPermit); r.exit != 0 || r.code != 200 {
		t.Fatalf("permit at once: curl %+v, want 200", r)
	}
	if r := fx.curl(t, portKernel); r.exit != 0 || r.code != 200 {
		t.Fatalf("no callout filter: curl %+v, want 200", r)
	}
	if r := fx.curl(t, portPend); r.exit != 0 || r.code != 200 || r.took < pendDelay {
		t.Fatalf("pend %v then permit: curl %+v, want 200 after at least the pend", pendDelay, r)
	}
	// Refused at once by a reset: curl exit 7 (couldn't connect). The
	// best of three, as other processes share the CPUs.
	best := time.Hour
	for range 3 {
		r := fx.curl(t, portBlock)
		if r.exit != 7 {
			t.Fatalf("block: curl %+v, want exit 7", r)
		}
		best = min(best, r.took)
	}
	t.Logf("blocked connect refused in %v (best of 3)", best)
	if best >= 100*time.Millisecond {
		t.Fatalf("blocked connect took %v, want a reset in under 100 ms (not the SYN timer)", best)
	}
	if r := fx.curl(t, portFailOpen); r.exit != 0 || r.code != 200 || r.took < pendTimeout {
		t.Fatalf("pend past the deadline, fail-open filter: curl %+v, want 200 after %v", r, pendTimeout)
	}
	if r := fx.curl(t, portFailClosed); r.exit != 7 || r.took < pendTimeout {
		t.Fatalf("pend past the deadline, fail-closed filter: curl %+v, want exit 7 after %v", r, pendTimeout)
	}
	// IPv6: the same through AUTH_CONNECT_V6.
	if r := fx.curl(t, portPermit, "[::1]"); r.exit != 0 || r.code != 200 {
		t.Fatalf("v6, permit at once: curl %+v, want 200", r)
	}
	if r := fx.curl(t, portBlock, "[::1]"); r.exit != 7 {
		t.Fatalf("v6, block: curl %+v, want exit 7", r)
	}
	st := fx.path.Stats()
	t.Logf("path stats: %+v", st)
	// Only the callout flows were queued: one SYN each (the kernel-only
	// port and the later packets never came up).
	if st.Queued != 9 || st.Permitted != 4 || st.Blocked != 5 || st.NoFlow != 0 {
		t.Fatalf("stats %+v: want 9 queued (4 permitted, 5 blocked), none without metadata", st)
	}
	fx.checkClean(t)
}

// The kernel's walk hands a flow over only while a callout can change the
// decision: below a hard permit a callout may still veto (the flow comes
// up and the veto refuses it); below a hard block nothing can, and the
// kernel refuses the connect alone, never calling the callout. The engine
// agrees on both.
func TestCalloutBelowHardDecisions(t *testing.T) {
	fx := newFixture(t, pendTimeout)
	for _, c := range []struct {
		port   int
		queued uint64
	}{{portHardPermit, 1}, {portHardBlock, 0}} {
		before, calls := fx.path.Stats().Queued, fx.calls.Load()
		r := fx.curl(t, c.port)
		if r.exit != 7 {
			t.Fatalf("port %d: curl %+v, want exit 7", c.port, r)
		}
		if q := fx.path.Stats().Queued - before; q != c.queued || uint64(fx.calls.Load()-calls) != c.queued {
			t.Fatalf("port %d: %d SYNs queued, callout called %d times; want %d", c.port, q, fx.calls.Load()-calls, c.queued)
		}
		var vs engine.Values
		vs.SetTuple(6, netip.AddrPort{}, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(c.port)))
		if res := fx.eng.Classify(engine.LayerALEAuthConnectV4, &vs, &engine.Metadata{}); res.Permitted() {
			t.Fatalf("port %d: the engine permits (%v), the kernel refused", c.port, res)
		}
	}
	fx.checkClean(t)
}

// 1,000 concurrent connects held by a pending callout and completed from
// another goroutine: all connect, nothing is left held or in the maps.
func TestThousandPendedConnects(t *testing.T) {
	fx := newFixture(t, pendTimeout)
	const n = 1000
	var completed atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case p := <-fx.held:
				if err := fx.eng.CompleteOperation(p, nil); err == nil {
					completed.Add(1)
				}
			case <-stop:
				return
			}
		}
	}()
	f := fx.call(t, fmt.Sprintf("dial %d %d %d", portHeld, n, n))
	close(stop)
	<-done
	if f[0] != strconv.Itoa(n) || f[1] != "0" {
		t.Fatalf("%d concurrent connects through a pending callout: %v (completed %d)", n, f, completed.Load())
	}
	if completed.Load() != n {
		t.Fatalf("completed %d pends, want %d", completed.Load(), n)
	}
	fx.checkClean(t)
}

// A flow held 5 s by a pending callout holds up no other: connects decided
// by the callout at once all finish while it waits, and it connects after.
func TestPendedFlowDelaysNoOther(t *testing.T) {
	fx := newFixture(t, 10*time.Second)
	go func() {
		// The held flow is completed after 5 s, well after the others.
		p := <-fx.held
		time.Sleep(5 * time.Second)
		fx.eng.CompleteOperation(p, nil)
	}()
	f := fx.call(t, fmt.Sprintf("hol %d %d %d", portHeld, portPermit, 200))
	// ok failed stillHeld heldOK firstErr
	if f[0] != "200" || f[1] != "0" || f[2] != "true" || f[3] != "true" {
		t.Fatalf("200 connects beside a held one: %v (want all 200 done while it was still held, then it connected too)", f)
	}
	fx.checkClean(t)
}

// TestBlockingCalloutDelaysNoOther: a callout that may block (a callout
// program's: engine.CalloutMayBlock) takes 3 s to answer one flow inline,
// without pending; 200 connects decided at once by the same callout,
// meanwhile, are all done before it answers — its flow is classified off
// the queue's read loop.
func TestBlockingCalloutDelaysNoOther(t *testing.T) {
	for _, queues := range []int{0, 1} {
		t.Run(fmt.Sprintf("queues=%d", queues), func(t *testing.T) { testBlockingCalloutDelaysNoOther(t, queues) })
	}
}

// testBlockingCalloutDelaysNoOther runs it with the given number of queues
// (0: one per CPU); with one, every SYN meets the queue whose SYN waits
// for the slow callout, so the queue's read loop must not be what waits.
func testBlockingCalloutDelaysNoOther(t *testing.T, queues int) {
	fx := newFixture(t, 10*time.Second)
	if queues > 0 {
		fx.path.Close()
		var err error
		if fx.path, err = Start(fx.eng, fx.dp, Options{NetNS: int(fx.netns.Fd()), Queues: queues}); err != nil {
			t.Fatal(err)
		}
	}
	if err := fx.eng.UnregisterCallout("test.decide"); err != nil {
		t.Fatal(err)
	}
	slow := func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		if int(req.Values.Uint(engine.FieldIPRemotePort)) == portHeld {
			time.Sleep(3 * time.Second) // a round trip to a slow program
			out.Action = engine.ActionPermit
			return
		}
		fx.classify(req, out)
	}
	if err := fx.eng.RegisterCallout("test.decide", engine.CalloutRegistration{Classify: slow, Flags: engine.CalloutMayBlock}); err != nil {
		t.Fatal(err)
	}
	f := fx.call(t, fmt.Sprintf("hol %d %d %d", portHeld, portPermit, 200))
	// ok failed stillHeld heldOK firstErr
	if f[0] != "200" || f[1] != "0" || f[2] != "true" || f[3] != "true" {
		t.Fatalf("200 connects beside one a blocking callout takes 3 s to decide: %v (want all 200 done while it was still undecided, then it connected too)", f)
	}
	if st := fx.path.Stats(); st.Async < 201 {
		t.Errorf("%d flows classified off the read loop, want all 201", st.Async)
	}
	fx.checkClean(t)
}
