//go:build linux

package nfqueue

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
)

const portRedirectSoak = 8099 // nothing listens: a connect succeeds only if redirected

// TestSoakRunTimeRedirect: soakOps (100,000; a tenth under -race)
// connects redirected at run time by an
// inline Go callout (to the client helper's plain server on portKernel)
// in one lifetime: all connect, and nothing grows — the redirect maps by
// cookie and 4-tuple empty again as the sockets close, the DNAT map holds
// its one proxy, no callout flow, pend or goroutine is left.
func TestSoakRunTimeRedirect(t *testing.T) {
	fx, h := inlineRedirectFixture(t)
	fx.call(t, fmt.Sprintf("dial %d 100 4", portRedirectSoak)) // warm up
	runtime.GC()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	goroutines, fd0 := runtime.NumGoroutine(), fdCount(t)
	// The full count under the race detector too: a redirect costs no
	// netlink transaction since the DNAT map holds proxies, not flows.
	n := soakOps
	start := time.Now()
	f := fx.call(t, fmt.Sprintf("dial %d %d %d", portRedirectSoak, n, 32))
	took := time.Since(start)
	st := fx.path.Stats()
	els, err := fx.path.redirectElements()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d redirected connects in %v: %v; proxies in the DNAT map: %d; stats %+v", n, took, f, els, st)
	if f[0] != strconv.Itoa(n) || st.Redirected != uint64(n)+100 {
		t.Fatalf("%s of %d connects succeeded, %d redirected", f[0], n, st.Redirected)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		els, err := fx.path.redirectElements()
		if err != nil {
			t.Fatal(err)
		}
		sock, tuple, err := fx.dp.RedirectCounts()
		if err != nil {
			t.Fatal(err)
		}
		g := runtime.NumGoroutine()
		// A 4-tuple record goes when the server's side of the connection
		// closes (sockops). One whose handshake never completed there (a
		// full listen queue; the client's reset overtaking its ACK, which
		// loopback allows: the two can sit in different CPUs' backlogs)
		// has no server side: fwpd's sweep deletes it once the client has
		// closed and the grace has passed — here at once.
		// The DNAT map holds one element per proxy, not per flow: one.
		if els == 1 && sock == 0 && g <= goroutines+5 {
			if tuple > 0 {
				grace := ebpf.UnacceptedGrace
				ebpf.UnacceptedGrace = 0
				n, err := fx.dp.SweepReleased()
				ebpf.UnacceptedGrace = grace
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("%d 4-tuple records of connections the server never accepted (listen drops %d), %d swept", tuple, listenDrops(t, fx.h.Pid()), n)
				if _, tuple, err = fx.dp.RedirectCounts(); err != nil {
					t.Fatal(err)
				}
			}
			if tuple == 0 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind: %d DNAT map elements (1 proxy), %d redirects by cookie, %d by 4-tuple, goroutines %d (were %d)", els, sock, tuple, g, goroutines)
		}
		time.Sleep(200 * time.Millisecond)
	}
	fx.eng.RedirectHandleDestroy(h)
	fx.checkClean(t)
	runtime.GC()
	var ms1 runtime.MemStats
	runtime.ReadMemStats(&ms1)
	fd1 := fdCount(t)
	t.Logf("fds %d -> %d, heap %d -> %d KiB", fd0, fd1, ms0.HeapAlloc>>10, ms1.HeapAlloc>>10)
	if fd1 > fd0 || ms1.HeapAlloc > ms0.HeapAlloc+8<<20 {
		t.Fatalf("grew: fds %d -> %d, heap %d -> %d", fd0, fd1, ms0.HeapAlloc, ms1.HeapAlloc)
	}
}

// inlineRedirectFixture: the client helper, and an inline Go callout at
// CONNECT_REDIRECT_V4 redirecting TCP to portRedirectSoak to the helper's
// plain server on portKernel; run-time redirects enabled.
func inlineRedirectFixture(t testing.TB) (*fixture, engine.RedirectHandle) {
	var h engine.RedirectHandle
	fx := customFixture(t, "client", Options{Redirects: true}, 5*time.Second, func(fx *fixture, tx *engine.Txn) error {
		h = fx.eng.RedirectHandleCreate("soak")
		cr := &engine.ConnectRedirect{Handle: h, Target: func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
			return engine.RedirectTarget{To: netip.MustParseAddrPort("127.0.0.1:" + strconv.Itoa(portKernel))}, true
		}}
		if err := fx.eng.RegisterCallout("soak.redirect", cr.Registration()); err != nil {
			return err
		}
		co, err := tx.AddCallout(engine.Callout{Key: "soak.redirect", Layer: engine.LayerALEConnectRedirectV4})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEConnectRedirectV4,
			Conditions: []engine.Condition{
				{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
				{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(portRedirectSoak)},
			},
			Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}})
		return err
	})
	return fx, h
}

// listenDrops reads TcpExtListenDrops of the network namespace of pid.
func listenDrops(t testing.TB, pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/netstat", pid))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		for j, n := range names {
			if n == "ListenDrops" && j < len(vals) {
				v, _ := strconv.ParseUint(vals[j], 10, 64)
				return v
			}
		}
	}
	return 0
}

// A redirected SYN carries the proxy's index in its mark from the verdict
// to the DNAT chain, which puts the socket's own mark back: after the
// translation (routing, later hooks) the SYN has the mark the program set
// with SO_MARK, as it would without fwp.
func TestRunTimeRedirectKeepsSocketMark(t *testing.T) {
	fx, _ := inlineRedirectFixture(t)
	nft := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("nsenter", append([]string{"-t", strconv.Itoa(fx.h.Pid()), "-n", "nft"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("nft %v: %v: %s", args, err, out)
		}
		return string(out)
	}
	// The test's own table in the test's namespace: SYNs to the server
	// after fwp's DNAT, counted with and without the program's mark.
	nft("add", "table", "ip", "fwptest")
	nft("add", "chain", "ip", "fwptest", "post", "{ type filter hook postrouting priority 0; }")
	nft("add", "rule", "ip", "fwptest", "post", "tcp", "dport", strconv.Itoa(portKernel), "tcp", "flags", "syn", "meta", "mark", "and", "0xffff", "==", "0x1234", "counter")
	nft("add", "rule", "ip", "fwptest", "post", "tcp", "dport", strconv.Itoa(portKernel), "tcp", "flags", "syn", "counter")
	if f := fx.call(t, fmt.Sprintf("dialmark %d %d", portRedirectSoak, 0x1234)); f[0] != "ok" {
		t.Fatalf("dial: %v", f)
	}
	var counts []int
	for _, l := range strings.Split(nft("list", "chain", "ip", "fwptest", "post"), "\n") {
		if i := strings.Index(l, "counter packets "); i >= 0 {
			n, _ := strconv.Atoi(strings.Fields(l[i+len("counter packets "):])[0])
			counts = append(counts, n)
		}
	}
	if len(counts) != 2 || counts[1] != 1 || counts[0] != 1 {
		t.Fatalf("SYNs reaching the server with the program's mark / in all: %v, want [1 1]", counts)
	}
}

// The proxies map starts afresh when full (maxProxies), numbering on from
// where it was: 30 redirects cycling over three proxies through a map of
// two all reach their proxy, and the map never holds more than two.
func TestRunTimeRedirectProxiesMapFull(t *testing.T) {
	old := maxProxies
	maxProxies = 2
	t.Cleanup(func() { maxProxies = old })
	proxies := []int{portKernel, portKernelPermit, portHeld}
	var n atomic.Int64
	fx := customFixture(t, "client", Options{Redirects: true}, 5*time.Second, func(fx *fixture, tx *engine.Txn) error {
		h := fx.eng.RedirectHandleCreate("cycle")
		cr := &engine.ConnectRedirect{Handle: h, Target: func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
			p := proxies[int(n.Add(1)-1)%len(proxies)]
			return engine.RedirectTarget{To: netip.MustParseAddrPort("127.0.0.1:" + strconv.Itoa(p))}, true
		}}
		if err := fx.eng.RegisterCallout("cycle.redirect", cr.Registration()); err != nil {
			return err
		}
		co, err := tx.AddCallout(engine.Callout{Key: "cycle.redirect", Layer: engine.LayerALEConnectRedirectV4})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEConnectRedirectV4,
			Conditions: []engine.Condition{
				{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
				{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(portRedirectSoak)},
			},
			Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}})
		return err
	})
	for i := range 30 {
		if f := fx.call(t, fmt.Sprintf("dial %d 1 1", portRedirectSoak)); f[0] != "1" {
			t.Fatalf("redirect %d (to port %d): %v", i, proxies[i%len(proxies)], f)
		}
		if els, err := fx.path.redirectElements(); err != nil || els > 2 {
			t.Fatalf("after redirect %d: %d proxies in the map (%v), at most 2", i, els, err)
		}
	}
	if st := fx.path.Stats(); st.Redirected != 30 {
		t.Fatalf("stats %+v: want 30 redirected", st)
	}
}
