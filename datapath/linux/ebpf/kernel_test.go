//go:build linux

package ebpf

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"fwp/engine"
	"fwp/internal/testutil"
	"fwp/internal/unix"
	"fwp/proxy"
)

func TestMain(m *testing.M) {
	testutil.RegisterHelper("probe", probeHelper)
	testutil.RegisterHelper("redirect", redirectHelper)
	testutil.RegisterHelper("udpredirect", udpRedirectHelper)
	testutil.RegisterHelper("connectpair", connectPairHelper)
	testutil.RegisterHelper("app", appHelper)
	testutil.RegisterHelper("dialexec", dialExecHelper)
	testutil.RegisterHelper("holdconns", holdConnsHelper)
	testutil.HelperMain()
	code := m.Run()
	if shared.d != nil {
		shared.d.Close()
	}
	os.Exit(code)
}

var shared struct {
	once sync.Once
	d    *Datapath
	err  error
}

// kernelSetup attaches the package's datapath (loaded once per test
// binary) to a fresh child cgroup, detached when the test
// ends. Tests apply whole policies, so they do not see each other's.
func kernelSetup(t testing.TB) (*Datapath, *testutil.Cgroup) {
	t.Helper()
	testutil.RequireRoot(t)
	cg := testutil.NewCgroup(t)
	shared.once.Do(func() { shared.d, shared.err = Load(Options{}) })
	if shared.err != nil {
		testutil.Unavailable(t, shared.err)
	}
	d := shared.d
	if err := d.Attach(cg.Path); err != nil {
		testutil.Unavailable(t, err)
	}
	t.Cleanup(func() {
		if err := d.Detach(cg.Path); err != nil {
			t.Error(err)
		}
	})
	return d, cg
}

func apply(t testing.TB, d *Datapath, e *engine.Engine) {
	t.Helper()
	p, err := Compile(e.View())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Apply(p); err != nil {
		t.Fatal(err)
	}
}

// probeOp is one connect the probe helper makes inside the test cgroup.
type probeOp struct {
	Net    string `json:"net"` // tcp4, udp6...
	Local  string `json:"local,omitempty"`
	Remote string `json:"remote"`
}

// probeHelper runs in the test cgroup and namespace: for each line of ops
// on stdin it makes each connect (or, without a remote, a listen) and
// answers a line of "ok", "eperm", "refused" or the error.
func probeHelper([]string) error {
	// Addresses that are not loopback on lo (the namespace is the
	// helper's): connects to them are local but not IS_LOOPBACK.
	for _, a := range [][]string{{"addr", "add", nonLoopback4 + "/32", "dev", "lo"}, {"-6", "addr", "add", nonLoopback6 + "/128", "dev", "lo"}} {
		if out, err := exec.Command("ip", a...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %v: %v: %s", a, err, out)
		}
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(nil, 1<<20)
	for in.Scan() {
		var ops []probeOp
		if err := json.Unmarshal(in.Bytes(), &ops); err != nil {
			return err
		}
		if err := json.NewEncoder(os.Stdout).Encode(probeOps(ops)); err != nil {
			return err
		}
	}
	return in.Err()
}

func probeOps(ops []probeOp) []string {
	out := make([]string, len(ops))
	for i, op := range ops {
		if op.Remote == "" { // a bind: listen on Local
			l, err := net.Listen(op.Net, op.Local)
			switch {
			case err == nil:
				out[i] = "ok"
				if got := l.Addr().String(); got != op.Local {
					out[i] = "bound:" + got // a bind redirect moved it
				}
				l.Close()
			case errors.Is(err, unix.EPERM):
				out[i] = "eperm"
			default:
				out[i] = err.Error()
			}
			continue
		}
		d := net.Dialer{Timeout: 2 * time.Second}
		if op.Local != "" {
			ap := netip.MustParseAddrPort(op.Local)
			if op.Net[:3] == "udp" {
				d.LocalAddr = net.UDPAddrFromAddrPort(ap)
			} else {
				d.LocalAddr = net.TCPAddrFromAddrPort(ap)
			}
		}
		c, err := d.Dial(op.Net, op.Remote)
		switch {
		case err == nil:
			out[i] = "ok"
			c.Close()
		case errors.Is(err, unix.EPERM):
			out[i] = "eperm"
		case errors.Is(err, unix.ECONNREFUSED):
			out[i] = "refused"
		default:
			out[i] = err.Error()
		}
	}
	return out
}

func probe(t testing.TB, h *testutil.Helper, ops []probeOp) []string {
	t.Helper()
	in, _ := json.Marshal(ops)
	ans, err := h.Call(in)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	if err := json.Unmarshal(ans, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func blockFilter(l engine.LayerID, conds ...engine.Condition) engine.Filter {
	return engine.Filter{Layer: l, Action: engine.Action{Type: engine.ActionBlock}, Conditions: conds}
}

func TestKernelBlockAndPermit(t *testing.T) {
	d, cg := kernelSetup(t)
	e := buildEngine(t, func(tx *engine.Txn) error {
		for _, f := range []engine.Filter{
			blockFilter(engine.LayerALEAuthConnectV4, engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(netip.MustParseAddr("127.0.0.9"))}),
			blockFilter(engine.LayerALEAuthConnectV4, engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(7000), engine.Uint16(7010))}),
			blockFilter(engine.LayerALEAuthConnectV6, engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(6666)}),
			// A hard permit in a heavier sublayer wins over the block below.
			{Layer: engine.LayerALEAuthConnectV4, Sublayer: 0, Weight: engine.WeightIndex(15), Flags: engine.FilterClearActionRight,
				Action:     engine.Action{Type: engine.ActionPermit},
				Conditions: []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(7005)}}},
		} {
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
	apply(t, d, e)
	h := testutil.StartHelper(t, cg, "probe")
	got := probe(t, h, []probeOp{
		{Net: "tcp4", Remote: "127.0.0.9:80"},
		{Net: "tcp4", Remote: "127.0.0.8:80"},
		{Net: "udp4", Remote: "127.0.0.1:7003"},
		{Net: "tcp4", Remote: "127.0.0.1:7005"},
		{Net: "tcp6", Remote: "[::1]:6666"},
		{Net: "tcp6", Remote: "[::1]:6667"},
	})
	want := []string{"eperm", "refused", "eperm", "refused", "eperm", "refused"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	// RESOURCE_ASSIGNMENT: a bind to a blocked local port fails with EPERM.
	if err := e.Update(func(tx *engine.Txn) error {
		_, err := tx.AddFilter(blockFilter(engine.LayerALEResourceAssignmentV4,
			engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(9999)}))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	apply(t, d, e)
	got = probe(t, h, []probeOp{
		{Net: "tcp4", Local: "127.0.0.1:9999"},
		{Net: "tcp4", Local: "127.0.0.1:9998"},
		{Net: "tcp4", Remote: "127.0.0.9:80"},
	})
	want = []string{"eperm", "ok", "eperm"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	// An empty policy permits again: Apply replaced the whole generation.
	apply(t, d, engine.New(engine.Options{}))
	if got := probe(t, h, []probeOp{{Net: "tcp4", Remote: "127.0.0.9:80"}}); got[0] != "refused" {
		t.Fatalf("after clearing: %v", got)
	}
}

// TestKernelMatchesEngine is the differential test: random filter sets,
// random tuples, real connects in the cgroup; the kernel's decision must be
// the engine's.
func TestKernelMatchesEngine(t *testing.T) {
	d, cg := kernelSetup(t)
	policies := 60
	if testing.Short() {
		policies = 10
	}
	apps := genApps(t) // the probe helper is the first: the test binary
	kernelDifferential(t, d, cg, policies, func(seed uint64) *gen {
		return &gen{r: rand.New(rand.NewPCG(seed, 99)), cgroup: cg.ID, v6: seed%4 == 3, apps: apps, gids: true,
			flags: seed%3 != 0, nonLoopback: seed%3 != 2}
	})
}

// TestKernelMatchesEngineHostRuns: the same with host tables and collapsed
// runs of host filters (the hooks' binary search and decider lookup).
func TestKernelMatchesEngineHostRuns(t *testing.T) {
	d, cg := kernelSetup(t)
	smallRuns(t)
	policies := 40
	if testing.Short() {
		policies = 10
	}
	kernelDifferential(t, d, cg, policies, func(seed uint64) *gen {
		return &gen{r: rand.New(rand.NewPCG(seed, 98)), cgroup: cg.ID, hostRuns: true}
	})
}

// kernelDifferential applies random policies and checks each probe's
// verdict in the kernel against the engine's.
func kernelDifferential(t *testing.T, d *Datapath, cg *testutil.Cgroup, policies int, newGen func(seed uint64) *gen) {
	h := testutil.StartHelper(t, cg, "probe")
	blocked, permitted := 0, 0
	defer func() {
		t.Logf("%d connects blocked, %d permitted", blocked, permitted)
		if !t.Failed() && (blocked == 0 || permitted == 0) {
			t.Errorf("the random policies never blocked or never permitted: the test proves nothing")
		}
	}()
	for seed := range uint64(policies) {
		g := newGen(seed)
		e := g.policy(t, 1+g.r.IntN(30))
		apply(t, d, e)
		var ops []probeOp
		var tuples []tuple
		for range 40 {
			tp := g.tuple()
			net := "tcp"
			if tp.proto == 17 {
				net = "udp"
			}
			op := probeOp{Net: net + "4", Remote: tp.remote.String()}
			if tp.v6 {
				op.Net = net + "6"
			}
			if tp.local.IsValid() {
				op.Local = tp.local.String()
			}
			ops = append(ops, op)
			tuples = append(tuples, tp)
		}
		got := probe(t, h, ops)
		for i, tp := range tuples {
			if got[i] == "eperm" {
				blocked++
			} else {
				permitted++
			}
			want := engineBlocks(e, tp)
			switch got[i] {
			case "eperm", "ok", "refused":
			default:
				t.Fatalf("seed %d op %+v: %s", seed, ops[i], got[i])
			}
			if (got[i] == "eperm") != want {
				var trace string
				for _, k := range []engine.LayerKind{engine.KindConnectRedirect, engine.KindAuthConnect} {
					tr, _ := e.Explain(engine.LayerFor(k, tp.v6), tp.values(), nil)
					trace += tr.String()
				}
				t.Fatalf("seed %d op %+v: kernel %s, engine blocks=%v\n%s", seed, ops[i], got[i], want, trace)
			}
		}
	}
}

// redirectResult is what the redirect helper saw.
type redirectResult struct {
	Peer           string `json:"peer"`            // the client's getpeername
	OriginalDst    string `json:"original_dst"`    // SO_ORIGINAL_DST on the accepted socket
	AcceptedLocal  string `json:"accepted_local"`  // the proxy's side of the accepted connection
	AcceptedRemote string `json:"accepted_remote"` // the client's address as the proxy sees it
	Response       string `json:"response"`
	ProxyAccepts   int    `json:"proxy_accepts"`
	// The 4-tuple record, read while the accepted connection was open
	// (with the tuple map as fd 4).
	State    *RedirectState `json:"state,omitempty"`
	StateErr string         `json:"state_err,omitempty"`
}

// redirectHelper runs origin server, proxy and client in the test cgroup.
// args: origin address, proxy address, redirect handle. The proxy finds the
// original destination with SO_ORIGINAL_DST, marks its outbound socket with
// the redirect's records (map fd 3) and relays the origin's answer.
func redirectHelper(args []string) error {
	origin, proxyAddr := args[0], args[1]
	var handle uint32
	if _, err := fmt.Sscan(args[2], &handle); err != nil {
		return fmt.Errorf("handle %q: %w", args[2], err)
	}
	records, err := ebpf.NewMapFromFD(3)
	if err != nil {
		return err
	}
	tuples, _ := ebpf.NewMapFromFD(4) // optional
	ol, err := net.Listen("tcp", origin)
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := ol.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "origin\n")
			c.Close()
		}
	}()
	pl, err := net.Listen("tcp", proxyAddr)
	if err != nil {
		return err
	}
	var res redirectResult
	done := make(chan error, 1)
	go func() {
		c, err := pl.Accept()
		if err != nil {
			done <- err
			return
		}
		res.ProxyAccepts++
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		res.AcceptedLocal, res.AcceptedRemote = c.LocalAddr().String(), c.RemoteAddr().String()
		raw, _ := c.(*net.TCPConn).SyscallConn()
		var odst netip.AddrPort
		var oerr error
		raw.Control(func(fd uintptr) {
			v6 := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Is6() && !c.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Is4In6()
			odst, oerr = unix.OriginalDst(int(fd), v6)
		})
		if oerr != nil {
			done <- oerr
			return
		}
		res.OriginalDst = odst.String()
		if tuples != nil {
			st, err := (&Redirects{tuple: tuples}).QueryRedirect(c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort())
			if err != nil {
				res.StateErr = err.Error()
			} else {
				res.State = &st
			}
		}
		dialer := net.Dialer{Control: func(network, address string, rc syscall.RawConn) error {
			var cerr error
			rc.Control(func(fd uintptr) {
				cookie, err := unix.SocketCookie(int(fd))
				if err != nil {
					cerr = err
					return
				}
				cerr = records.Put(cookie, fwpRecords{N: 1, Handles: [8]uint32{handle}})
			})
			return cerr
		}}
		up, err := dialer.Dial("tcp", odst.String())
		if err != nil {
			done <- err
			return
		}
		up.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(up).ReadString('\n')
		up.Close()
		if err != nil {
			done <- err
			return
		}
		fmt.Fprintf(c, "proxy:%s", line)
		done <- nil
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", origin)
	if err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	raw, _ := c.(*net.TCPConn).SyscallConn()
	raw.Control(func(fd uintptr) {
		sa, err := syscall.Getpeername(int(fd))
		switch sa := sa.(type) {
		case *syscall.SockaddrInet4:
			res.Peer = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)).String()
		case *syscall.SockaddrInet6:
			res.Peer = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)).String()
		default:
			res.Peer = fmt.Sprint("getpeername: ", err)
		}
	})
	line, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil {
		return fmt.Errorf("client read: %w", err)
	}
	res.Response = line
	if err := <-done; err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	pl.Close()
	ol.Close()
	return json.NewEncoder(os.Stdout).Encode(res)
}

// redirectPolicy is an engine with one built-in connect redirect filter
// sending connects to origin's port to the proxy.
func redirectPolicy(t testing.TB, v6 bool, originPort uint16, proxy netip.AddrPort, ctxBytes []byte) (*engine.Engine, engine.CalloutID) {
	var co engine.CalloutID
	e := buildEngine(t, func(tx *engine.Txn) error {
		var err error
		co, err = addRedirect(tx, v6, originPort, proxy, ctxBytes)
		return err
	})
	return e, co
}

// addRedirect adds a built-in connect redirect filter sending connects to
// originPort to the proxy.
func addRedirect(tx *engine.Txn, v6 bool, originPort uint16, proxy netip.AddrPort, ctxBytes []byte) (engine.CalloutID, error) {
	layer := engine.LayerFor(engine.KindConnectRedirect, v6)
	co, err := tx.AddCallout(engine.Callout{Key: BuiltinConnectRedirectKey + "/test", Layer: layer})
	if err != nil {
		return 0, err
	}
	data, err := RedirectConfig{Proxy: proxy, TargetPID: 77, Context: ctxBytes}.Marshal()
	if err != nil {
		return 0, err
	}
	pc, err := tx.AddProviderContext(engine.ProviderContext{Data: data})
	if err != nil {
		return 0, err
	}
	_, err = tx.AddFilter(engine.Filter{Layer: layer, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}, ProviderContext: pc,
		Conditions: []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(originPort)}}})
	return co, err
}

// A policy without connect redirects attaches the classifying hooks only;
// the first that redirects attaches the redirect hooks before it takes
// effect, to every cgroup, and they stay (and join cgroups attached later).
func TestRedirectHooksAttachWithFirstRedirect(t *testing.T) {
	testutil.RequireRoot(t)
	d, err := Load(Options{})
	if err != nil {
		testutil.Unavailable(t, err)
	}
	t.Cleanup(func() { d.Close() })
	ids := programIDs(t, d)
	attached := func(cg *testutil.Cgroup) (int, int) { return attachedHooks(t, d, cg, ids) }
	cg := testutil.NewCgroup(t)
	if err := d.Attach(cg.Path); err != nil {
		testutil.Unavailable(t, err)
	}
	apply(t, d, tenThousand(t))
	// Its outbound filters bring the ingress hook alone (udpreply.go).
	if c, r := attached(cg); c != 6 || r != 1 {
		t.Fatalf("policy without redirects: %d classifying and %d redirect hooks attached, want 6 and 1 (ingress)", c, r)
	}
	e, _ := redirectPolicy(t, false, 1, netip.MustParseAddrPort("127.0.0.1:3128"), nil)
	apply(t, d, e)
	if c, r := attached(cg); c != 6 || r != numRedirectHooks(d) {
		t.Fatalf("policy with a redirect: %d and %d hooks attached, want 6 and %d", c, r, numRedirectHooks(d))
	}
	apply(t, d, tenThousand(t))
	later := testutil.NewCgroup(t)
	if err := d.Attach(later.Path); err != nil {
		t.Fatal(err)
	}
	for _, g := range []*testutil.Cgroup{cg, later} {
		if c, r := attached(g); c != 6 || r != numRedirectHooks(d) {
			t.Fatalf("after the redirect went: %d and %d hooks attached, want 6 and %d", c, r, numRedirectHooks(d))
		}
	}
	for _, g := range []*testutil.Cgroup{cg, later} {
		if err := d.Detach(g.Path); err != nil {
			t.Fatal(err)
		}
		if c, r := attached(g); c != 0 || r != 0 {
			t.Fatalf("after Detach: %d and %d hooks attached", c, r)
		}
	}
}

type redirectCase struct {
	name          string
	origin, proxy netip.AddrPort
}

// redirectCases are a v4 and a v6 origin, each sent to a proxy on the
// loopback address of its family.
func redirectCases(origin4, origin6 string, proxyPort uint16) []redirectCase {
	return []redirectCase{
		{"v4", netip.MustParseAddrPort(origin4), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), proxyPort)},
		{"v6", netip.MustParseAddrPort(origin6), netip.AddrPortFrom(netip.IPv6Loopback(), proxyPort)},
	}
}

func TestKernelRedirect(t *testing.T) {
	d, cg := kernelSetup(t)
	for _, c := range redirectCases("127.0.0.1:18080", "[::1]:18080", 18081) {
		t.Run(c.name, func(t *testing.T) {
			e, co := redirectPolicy(t, c.name == "v6", c.origin.Port(), c.proxy, []byte("secret"))
			apply(t, d, e)
			files := []*os.File{mapFile(t, d.objs.FwpSockRecords), mapFile(t, d.objs.FwpTupleRedirect)}
			out, err := testutil.RunHelperFiles(cg, "redirect", nil, files, c.origin.String(), c.proxy.String(), fmt.Sprint(uint32(co)))
			if err != nil {
				t.Fatal(err)
			}
			var res redirectResult
			if err := json.Unmarshal(out, &res); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			if res.Response != "proxy:origin\n" {
				t.Errorf("response %q, want it relayed by the proxy from the origin", res.Response)
			}
			if res.Peer != c.origin.String() {
				t.Errorf("client's getpeername %s, want the original destination %s", res.Peer, c.origin)
			}
			if res.OriginalDst != c.origin.String() {
				t.Errorf("SO_ORIGINAL_DST %s, want %s", res.OriginalDst, c.origin)
			}
			if res.ProxyAccepts != 1 {
				t.Errorf("proxy accepted %d connections, want 1 (no loop)", res.ProxyAccepts)
			}
			if res.State == nil {
				t.Fatalf("QueryRedirect while the proxy held the connection: %s", res.StateErr)
			}
			st := *res.State
			if st.Original != c.origin || st.Proxy != c.proxy || st.Handle != uint32(co) || st.TargetPID != 77 ||
				string(st.Context) != "secret" || st.Protocol != 6 || st.CgroupID != cg.ID || st.PID == 0 {
				t.Errorf("QueryRedirect: %+v", st)
			}
			// The proxy's accepted socket is closed: its record went with it.
			if _, err := d.QueryRedirect(netip.MustParseAddrPort(res.AcceptedLocal), netip.MustParseAddrPort(res.AcceptedRemote)); !errors.Is(err, ErrNoRedirect) {
				t.Errorf("QueryRedirect after the proxy closed the connection: %v (want the record removed at socket release)", err)
			}
			if _, err := d.QueryRedirect(c.proxy, netip.AddrPortFrom(c.origin.Addr(), 1)); !errors.Is(err, ErrNoRedirect) {
				t.Errorf("QueryRedirect of an unknown tuple: %v", err)
			}
		})
	}
}

// mapFile hands a map to a helper process as an inherited file.
func mapFile(t testing.TB, m *ebpf.Map) *os.File {
	t.Helper()
	// A plain dup that only the file owns: a cloned *ebpf.Map would close
	// its fd from a finalizer once unreachable, under the file's feet.
	fd, err := syscall.Dup(m.FD())
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "map")
	t.Cleanup(func() { f.Close() })
	return f
}

// udpResult is what the UDP redirect helper saw.
type udpResult struct {
	UnconnectedFrom  string `json:"unconnected_from"` // source of the reply to a sendto
	UnconnectedReply string `json:"unconnected_reply"`
	ConnectedPeer    string `json:"connected_peer"`
	ConnectedReply   string `json:"connected_reply"`
	// The client sources the proxy saw, for QueryRedirect by 4-tuple.
	UnconnectedSource string `json:"unconnected_source"`
	ConnectedSource   string `json:"connected_source"`
	// What the proxy's datagram queries on its unconnected socket found
	// for each (see datagramQuery).
	UnconnectedQuery string `json:"unconnected_query"`
	ConnectedQuery   string `json:"connected_query"`
}

// datagramQuery asks the kernel ProxyBackend, through the proxy package,
// about a datagram pc received from from: the context (through the backend:
// the proxy package gives it only to the redirect target, which this
// helper is not), the last redirect handle of the records, and whether the
// proxy package refused the context.
func datagramQuery(b ProxyBackend, pc *net.UDPConn, from net.Addr) string {
	recs, err := proxy.QueryDatagramRedirectRecords(pc, from)
	if err != nil {
		return "records: " + err.Error()
	}
	hs, err := DecodeRecords(recs)
	if err != nil || len(hs) == 0 {
		return fmt.Sprintf("records %v: %v", hs, err)
	}
	r, err := b.QueryDatagram(pc, from.(*net.UDPAddr).AddrPort())
	if err != nil {
		return "backend: " + err.Error()
	}
	_, err = proxy.QueryDatagramRedirectContext(pc, from)
	return fmt.Sprintf("context=%s last=%d denied=%v", r.Context, hs[len(hs)-1], errors.Is(err, proxy.ErrAccessDenied))
}

// udpRedirectHelper sends datagrams to origin (args[0]); the policy sends
// them to a proxy (args[1]) that answers "proxy:<data>". With args[2]
// "wildcard" the proxy binds the wildcard address on the proxy's port.
// The redirect maps come as files 3 (records) and 4 (tuples), for the
// proxy's datagram queries.
func udpRedirectHelper(args []string) error {
	origin, proxyAddr := netip.MustParseAddrPort(args[0]), netip.MustParseAddrPort(args[1])
	records, err := ebpf.NewMapFromFD(3)
	if err != nil {
		return err
	}
	tuples, err := ebpf.NewMapFromFD(4)
	if err != nil {
		return err
	}
	backend := ProxyBackend{R: &Redirects{tuple: tuples, records: records}}
	defer proxy.Register(backend)()
	bind := net.UDPAddrFromAddrPort(proxyAddr)
	if len(args) > 2 && args[2] == "wildcard" {
		bind = &net.UDPAddr{Port: int(proxyAddr.Port())} // dual-stack [::]
	}
	pc, err := net.ListenUDP("udp", bind)
	if err != nil {
		return err
	}
	defer pc.Close()
	var res udpResult
	sources, queries := make(chan string, 2), make(chan string, 2)
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			ap := from.(*net.UDPAddr).AddrPort()
			sources <- netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
			queries <- datagramQuery(backend, pc, from)
			pc.WriteTo(append([]byte("proxy:"), buf[:n]...), from)
		}
	}()
	network := "udp4"
	if origin.Addr().Is6() {
		network = "udp6"
	}
	c, err := net.ListenUDP(network, nil)
	if err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.WriteToUDPAddrPort([]byte("a"), origin); err != nil {
		return fmt.Errorf("sendto: %w", err)
	}
	buf := make([]byte, 512)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		return fmt.Errorf("recvfrom: %w", err)
	}
	c.Close()
	res.UnconnectedFrom, res.UnconnectedReply = netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String(), string(buf[:n])
	cc, err := net.Dial(network, origin.String())
	if err != nil {
		return err
	}
	defer cc.Close()
	cc.SetDeadline(time.Now().Add(5 * time.Second))
	res.ConnectedPeer = cc.RemoteAddr().String()
	if _, err := cc.Write([]byte("b")); err != nil {
		return err
	}
	n, err = cc.Read(buf)
	if err != nil {
		return fmt.Errorf("connected read: %w", err)
	}
	res.ConnectedReply = string(buf[:n])
	res.UnconnectedSource, res.ConnectedSource = <-sources, <-sources
	res.UnconnectedQuery, res.ConnectedQuery = <-queries, <-queries
	return json.NewEncoder(os.Stdout).Encode(res)
}

func TestKernelRedirectUDP(t *testing.T) {
	d, cg := kernelSetup(t)
	for _, c := range redirectCases("127.0.0.53:53", "[::1]:53", 15353) {
		t.Run(c.name, func(t *testing.T) {
			e, co := redirectPolicy(t, c.name == "v6", c.origin.Port(), c.proxy, []byte("udp-ctx"))
			apply(t, d, e)
			files := []*os.File{mapFile(t, d.objs.FwpSockRecords), mapFile(t, d.objs.FwpTupleRedirect)}
			// The proxy's datagram queries on its unconnected socket, bound
			// to the redirect's address and to the wildcard address.
			query := fmt.Sprintf("context=udp-ctx last=%d denied=true", uint32(co))
			var res udpResult
			for _, bind := range []string{"specific", "wildcard"} {
				out, err := testutil.RunHelperFiles(cg, "udpredirect", nil, files, c.origin.String(), c.proxy.String(), bind)
				if err != nil {
					t.Fatal(err)
				}
				res = udpResult{}
				if err := json.Unmarshal(out, &res); err != nil {
					t.Fatalf("%v: %s", err, out)
				}
				want := udpResult{UnconnectedFrom: c.origin.String(), UnconnectedReply: "proxy:a", ConnectedPeer: c.origin.String(), ConnectedReply: "proxy:b",
					UnconnectedSource: res.UnconnectedSource, ConnectedSource: res.ConnectedSource, UnconnectedQuery: query, ConnectedQuery: query}
				if res != want {
					t.Fatalf("proxy bound %s: got %+v, want %+v", bind, res, want)
				}
			}
			// The proxy's view of each flow (its own address, the
			// datagram's source) finds the redirect: an unconnected
			// socket on a wildcard address and a connected one the
			// kernel bound after the connect hook.
			for _, src := range []string{res.UnconnectedSource, res.ConnectedSource} {
				r, orig, err := d.QueryProxyRedirect(c.proxy, netip.MustParseAddrPort(src))
				if err != nil {
					t.Fatalf("QueryProxyRedirect(%s, %s): %v", c.proxy, src, err)
				}
				hs, err := DecodeRecords(r.Records)
				if err != nil {
					t.Fatal(err)
				}
				if orig != c.origin || string(r.Context) != "udp-ctx" || r.TargetPID != 77 || len(hs) == 0 || hs[len(hs)-1] != uint32(co) {
					t.Fatalf("UDP redirect of %s: original %s, context %q, target %d, records %v; want %s, %q, 77, [... %d]",
						src, orig, r.Context, r.TargetPID, hs, c.origin, "udp-ctx", co)
				}
			}
			// A UDP socket the proxy connected to the client.
			conn := addrConn{local: net.UDPAddrFromAddrPort(c.proxy), remote: net.UDPAddrFromAddrPort(netip.MustParseAddrPort(res.ConnectedSource))}
			if r, err := (ProxyBackend{R: d.redirects()}).QueryAccepted(conn); err != nil || string(r.Context) != "udp-ctx" {
				t.Fatalf("QueryAccepted of a connected UDP socket: %q, %v", r.Context, err)
			}
			if _, _, err := d.QueryProxyRedirect(c.proxy, netip.AddrPortFrom(c.proxy.Addr(), 1)); !errors.Is(err, proxy.ErrNotFound) {
				t.Fatalf("QueryProxyRedirect of an unknown source: %v, want ErrNotFound", err)
			}
			// The helper's sockets are closed: their records were found
			// above within the grace period; past it they are gone, from
			// the index too.
			grace := ReleasedGrace
			ReleasedGrace = 0
			defer func() { ReleasedGrace = grace }()
			for _, local := range []netip.AddrPort{c.proxy, netip.AddrPortFrom(netip.IPv4Unspecified(), c.proxy.Port())} {
				if c.name == "v6" && local.Addr().Is4() {
					local = netip.AddrPortFrom(netip.IPv6Unspecified(), c.proxy.Port())
				}
				for _, src := range []string{res.UnconnectedSource, res.ConnectedSource} {
					if _, _, err := d.QueryProxyRedirect(local, netip.MustParseAddrPort(src)); !errors.Is(err, proxy.ErrNotFound) {
						t.Fatalf("QueryProxyRedirect(%s, %s) of a closed socket past the grace: %v, want ErrNotFound", local, src, err)
					}
				}
			}
			if _, err := d.SweepReleased(); err != nil {
				t.Fatal(err)
			}
			var k fwpTupleKey
			var st fwpRedirectState
			for it := d.objs.FwpTupleRedirect.Iterate(); it.Next(&k, &st); {
				if st.Proto == syscall.IPPROTO_UDP && st.Released != 0 {
					t.Fatalf("a closed UDP socket's record is still indexed after a sweep: %+v", k)
				}
			}
		})
	}
}

// addrConn is a net.Conn with only its addresses, for QueryAccepted on the
// addresses a socket in another namespace had.
type addrConn struct {
	net.Conn
	local, remote net.Addr
}

func (c addrConn) LocalAddr() net.Addr  { return c.local }
func (c addrConn) RemoteAddr() net.Addr { return c.remote }

// connectpair's rounds of connects per side, alternated.
const pairRounds, pairPerRound = 20, 1000

// connectPairHelper measures TCP connect+close on loopback from two
// cgroups, args[0] (no hooks) and args[1] (hooks), moving itself between
// them: a socket belongs to the cgroup its creator was in (an accepted one
// to its listener's), so one process in one namespace measures both sides,
// interleaved in short rounds that share whatever else the machine does.
// It prints the ns per connect of each side.
func connectPairHelper(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: connectpair BARE-CGROUP HOOKED-CGROUP")
	}
	type side struct {
		dir  string
		addr string
		ns   int64
	}
	sides := []*side{{dir: args[0]}, {dir: args[1]}}
	move := func(s *side) error {
		// "0" moves the writing process, all its threads.
		return os.WriteFile(filepath.Join(s.dir, "cgroup.procs"), []byte("0"), 0)
	}
	for _, s := range sides {
		if err := move(s); err != nil {
			return err
		}
		l, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			return err
		}
		defer l.Close()
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		s.addr = l.Addr().String()
	}
	const rounds, perRound = pairRounds, pairPerRound
	for r := range rounds {
		for i := range sides {
			s := sides[(r+i)%2] // each side goes first in half the rounds
			if err := move(s); err != nil {
				return err
			}
			start := time.Now()
			for range perRound {
				c, err := net.Dial("tcp4", s.addr)
				if err != nil {
					return err
				}
				c.(*net.TCPConn).SetLinger(0) // no TIME_WAIT pile-up
				c.Close()
			}
			s.ns += time.Since(start).Nanoseconds()
		}
	}
	return json.NewEncoder(os.Stdout).Encode([2]int64{sides[0].ns / (rounds * perRound), sides[1].ns / (rounds * perRound)})
}

func BenchmarkApply10k(b *testing.B) {
	d, _ := kernelSetup(b)
	p, err := Compile(tenThousand(b).View())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := d.Apply(p); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkKernelConnect measures TCP connect+close on loopback in a cgroup
// without hooks and in one with the hooks (and no filters, or 10,000),
// alternately in one run, and the hooks' own run time from bpf_stats.
func BenchmarkKernelConnect(b *testing.B) {
	for _, c := range []struct {
		name   string
		policy func(testing.TB) *engine.Engine
	}{
		{"filters=0", func(testing.TB) *engine.Engine { return engine.New(engine.Options{}) }},
		{"filters=0+reauth", func(testing.TB) *engine.Engine { return engine.New(engine.Options{}) }},
		{"filters=10k", tenThousand},
		// A connect redirect too (to a port the benchmark never dials):
		// the redirect hooks are attached.
		{"filters=10k+redirect", func(t testing.TB) *engine.Engine {
			e := tenThousand(t)
			if err := e.Update(func(tx *engine.Txn) error {
				_, err := addRedirect(tx, false, 1, netip.MustParseAddrPort("127.0.0.1:3128"), nil)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			return e
		}},
		// Issue 15's real policy: a 1M-address blocklist (one filter with
		// a list) and 1,000 per-application rules (1,000 files, each its
		// own application, blocked from a port of its own).
		{"blocklist=1M+apps=1k", appsBlocklistPolicy},
		// The same policy with the programs fwpd attaches by default:
		// reauthorization on (the connect hook's notes, reauth.c's
		// sockops and sock_release programs).
		{"blocklist=1M+apps=1k+reauth", appsBlocklistPolicy},
		// The same million addresses as a million separate host filters
		// (one collapsed run: a host table and the decider's id table).
		{"hostfilters=1M", func(t testing.TB) *engine.Engine {
			return buildEngine(t, func(tx *engine.Txn) error {
				for i := range 1_000_000 {
					if _, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
						engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(listAddr(i))})); err != nil {
						return err
					}
				}
				return nil
			})
		}},
	} {
		b.Run(c.name, func(b *testing.B) { benchConnect(b, c.policy(b), strings.HasSuffix(c.name, "+reauth")) })
	}
}

// benchConnect: live turns reauthorization on as fwpd does by default.
func benchConnect(b *testing.B, e *engine.Engine, live bool) {
	testutil.RequireRoot(b)
	bareCg, cg := testutil.NewCgroup(b), testutil.NewCgroup(b)
	// A datapath of its own: the redirect hooks another test's policy
	// attached to a shared one would be measured too.
	d, err := Load(Options{})
	if err != nil {
		testutil.Unavailable(b, err)
	}
	b.Cleanup(func() { d.Close() })
	if err := d.Attach(cg.Path); err != nil {
		testutil.Unavailable(b, err)
	}
	if live {
		if err := d.EnableReauthorization(); err != nil {
			testutil.Unavailable(b, err)
		}
	}
	apply(b, d, e)
	var nsBare, nsHooked int64
	runs := 0
	measure := func() (bare, hooked int64) {
		var ns [2]int64
		if err := json.Unmarshal(testutil.RunHelper(b, bareCg, "connectpair", nil, bareCg.Path, cg.Path), &ns); err != nil {
			b.Fatal(err)
		}
		return ns[0], ns[1]
	}
	for b.Loop() {
		nb, nh := measure()
		nsBare += nb
		nsHooked += nh
		runs++
	}
	b.ReportMetric(float64(nsBare)/float64(runs), "ns/connect-nohooks")
	b.ReportMetric(float64(nsHooked)/float64(runs), "ns/connect-hooked")
	b.ReportMetric(float64(nsHooked)/float64(nsBare), "ratio")

	// The hooks' own run time, in a separate pass: bpf_stats adds two
	// clock reads to every program run, which would inflate the latency
	// measured above.
	b.StopTimer()
	stats, err := EnableStats()
	if err != nil {
		b.Fatal(err)
	}
	defer stats.Close()
	before, err := d.Stats()
	if err != nil {
		b.Fatal(err)
	}
	measure()
	after, err := d.Stats()
	if err != nil {
		b.Fatal(err)
	}
	// Per program: its mean run, and what its runs cost each hooked
	// connect+close in all (a sockops program runs several times per
	// connection, at both ends here); then the sum over all programs.
	var total time.Duration
	for h := range after {
		n := after[h].Runs - before[h].Runs
		if n == 0 {
			continue
		}
		t := after[h].RunTime - before[h].RunTime
		total += t
		b.ReportMetric(float64(t)/float64(n), "ns/"+h+"-run")
		b.ReportMetric(float64(t)/float64(pairRounds*pairPerRound), "ns/"+h+"-per-connect")
	}
	b.ReportMetric(float64(total)/float64(pairRounds*pairPerRound), "ns/hooks-per-connect")
}

// TestKernelApplyMapFull fills the class map: Apply fails with ErrCapacity
// and the policy in force stays the old one, wholly.
func TestKernelApplyMapFull(t *testing.T) {
	testutil.RequireRoot(t)
	cg := testutil.NewCgroup(t)
	d, err := Load(Options{MaxClasses: 16})
	if err != nil {
		testutil.Unavailable(t, err)
	}
	defer d.Close()
	if err := d.Attach(cg.Path); err != nil {
		testutil.Unavailable(t, err)
	}
	blockPorts := func(ports ...uint16) *engine.Engine {
		return buildEngine(t, func(tx *engine.Txn) error {
			for _, p := range ports {
				if _, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
					engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(p)})); err != nil {
					return err
				}
			}
			return nil
		})
	}
	apply(t, d, blockPorts(1001))
	var many []uint16
	for p := range uint16(40) {
		many = append(many, 2000+p)
	}
	p, err := Compile(blockPorts(many...).View())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Apply(p); !errors.Is(err, ErrCapacity) {
		t.Fatalf("Apply of a policy too big for the maps: %v, want ErrCapacity", err)
	}
	h := testutil.StartHelper(t, cg, "probe")
	got := probe(t, h, []probeOp{{Net: "udp4", Remote: "127.0.0.1:1001"}, {Net: "udp4", Remote: "127.0.0.1:2000"}})
	if fmt.Sprint(got) != "[eperm ok]" {
		t.Fatalf("after a failed Apply: %v, want the old policy [eperm ok]", got)
	}
	// The next Apply that fits still works.
	apply(t, d, blockPorts(2000))
	if got := probe(t, h, []probeOp{{Net: "udp4", Remote: "127.0.0.1:1001"}, {Net: "udp4", Remote: "127.0.0.1:2000"}}); fmt.Sprint(got) != "[ok eperm]" {
		t.Fatalf("after a good Apply: %v, want [ok eperm]", got)
	}
}

// TestKernelBindRedirect moves listeners with the built-in bind redirect;
// RESOURCE_ASSIGNMENT then classifies the new address.
func TestKernelBindRedirect(t *testing.T) {
	d, cg := kernelSetup(t)
	e := buildEngine(t, func(tx *engine.Txn) error {
		for _, r := range []struct {
			layer engine.LayerID
			port  uint16
			to    string
		}{
			{engine.LayerALEBindRedirectV4, 9999, "0.0.0.0:19999"},
			{engine.LayerALEBindRedirectV4, 9998, "0.0.0.0:19997"},
			{engine.LayerALEBindRedirectV6, 9999, "[::1]:19998"},
		} {
			co, err := tx.AddCallout(engine.Callout{Key: fmt.Sprintf("%s/%s-%d", BuiltinBindRedirectKey, r.layer, r.port), Layer: r.layer})
			if err != nil {
				return err
			}
			data, err := BindRedirectConfig{Local: netip.MustParseAddrPort(r.to)}.Marshal()
			if err != nil {
				return err
			}
			pc, err := tx.AddProviderContext(engine.ProviderContext{Data: data})
			if err != nil {
				return err
			}
			if _, err := tx.AddFilter(engine.Filter{Layer: r.layer, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}, ProviderContext: pc,
				Conditions: []engine.Condition{{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(r.port)}}}); err != nil {
				return err
			}
		}
		_, err := tx.AddFilter(blockFilter(engine.LayerALEResourceAssignmentV4,
			engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(19997)}))
		return err
	})
	apply(t, d, e)
	h := testutil.StartHelper(t, cg, "probe")
	got := probe(t, h, []probeOp{
		{Net: "tcp4", Local: "127.0.0.1:9999"},
		{Net: "tcp4", Local: "127.0.0.1:9998"},
		{Net: "tcp6", Local: "[::]:9999"},
		{Net: "tcp4", Local: "127.0.0.1:9000"},
	})
	want := []string{"bound:127.0.0.1:19999", "eperm", "bound:[::1]:19998", "ok"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// programIDs are the kernel's IDs of d's hook programs, by hook name.
func programIDs(t *testing.T, d *Datapath) map[string]ebpf.ProgramID {
	t.Helper()
	ids := map[string]ebpf.ProgramID{}
	for _, h := range d.hooks() {
		info, err := h.prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		ids[h.name], _ = info.ID()
	}
	return ids
}

// attachedHooks counts the classifying and the redirect hooks attached to
// cg (the programs the kernel lists per attach type), failing the test if
// a type has more than one, or one not in ids (programIDs of the datapath
// expected).
func attachedHooks(t *testing.T, d *Datapath, cg *testutil.Cgroup, ids map[string]ebpf.ProgramID) (classify, redirect int) {
	t.Helper()
	dir, err := os.Open(cg.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	for _, h := range d.hooks() {
		r, err := link.QueryPrograms(link.QueryOptions{Target: int(dir.Fd()), Attach: h.at})
		if err != nil {
			t.Fatal(err)
		}
		switch n := len(r.Programs); {
		case n > 1:
			t.Fatalf("%s: %d programs attached", h.name, n)
		case n == 1 && r.Programs[0].ID != ids[h.name]:
			t.Fatalf("%s: program %d attached, want %d", h.name, r.Programs[0].ID, ids[h.name])
		case n == 1 && h.redirect:
			redirect++
		case n == 1:
			classify++
		}
	}
	return classify, redirect
}

// Redirect hooks kept on exit (KeepHooks) are adopted by the next datapath
// at Attach, with the classifying ones, not attached a second time; a
// datapath without KeepHooks on the same pins removes them all.
func TestKeptRedirectHooksAdopted(t *testing.T) {
	testutil.RequireRoot(t)
	root := t.TempDir()
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(root, "bpf")) })
	pins := filepath.Join(root, "bpf", "fwp")
	cg := testutil.NewCgroup(t)
	load := func(keep bool) *Datapath {
		t.Helper()
		d, err := Load(Options{PinDir: pins, KeepHooks: keep})
		if err != nil {
			testutil.Unavailable(t, err)
		}
		return d
	}
	d1 := load(true)
	if err := d1.Attach(cg.Path); err != nil {
		t.Fatal(err)
	}
	e, _ := redirectPolicy(t, false, 1, netip.MustParseAddrPort("127.0.0.1:3128"), nil)
	apply(t, d1, e)
	ids1 := programIDs(t, d1)
	if err := d1.Close(); err != nil {
		t.Fatal(err)
	}
	if c, r := attachedHooks(t, d1, cg, ids1); c != 6 || r != numRedirectHooks(d1) {
		t.Fatalf("after the first datapath closed with KeepHooks: %d and %d hooks attached, want 6 and %d", c, r, numRedirectHooks(d1))
	}
	d2 := load(true)
	ids2 := programIDs(t, d2)
	if err := d2.Attach(cg.Path); err != nil {
		t.Fatal(err)
	}
	if c, r := attachedHooks(t, d2, cg, ids2); c != 6 || r != numRedirectHooks(d2) {
		t.Fatalf("after adoption: %d and %d hooks attached, want 6 and %d", c, r, numRedirectHooks(d2))
	}
	if !d2.redirectHooks {
		t.Fatal("adopted redirect hooks not known as attached")
	}
	if err := d2.Close(); err != nil {
		t.Fatal(err)
	}
	d3 := load(false)
	if err := d3.Close(); err != nil {
		t.Fatal(err)
	}
	if c, r := attachedHooks(t, d2, cg, ids2); c != 0 || r != 0 {
		t.Fatalf("after a datapath without KeepHooks: %d and %d hooks still attached", c, r)
	}
}

// A bpffs Load mounted for its pins (none was there) is unmounted by
// Close, unless the hooks stay (KeepHooks: their pins must outlive the
// process); one that was there already is left alone.
func TestBPFFSUnmountedOnClose(t *testing.T) {
	testutil.RequireRoot(t)
	root := t.TempDir()
	fs := filepath.Join(root, "bpf")
	t.Cleanup(func() { _ = unix.Unmount(fs) })
	isBPFFS := func() bool {
		t.Helper()
		ok, err := unix.IsBPFFS(fs)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	load := func(keep bool) *Datapath {
		t.Helper()
		d, err := Load(Options{PinDir: filepath.Join(fs, "fwp"), KeepHooks: keep})
		if err != nil {
			testutil.Unavailable(t, err)
		}
		if !isBPFFS() {
			t.Fatal("no bpffs under the pins after Load")
		}
		return d
	}
	if err := load(false).Close(); err != nil {
		t.Fatal(err)
	}
	if isBPFFS() {
		t.Fatal("the bpffs Load mounted is still mounted after Close")
	}
	if err := load(true).Close(); err != nil {
		t.Fatal(err)
	}
	if !isBPFFS() {
		t.Fatal("with KeepHooks the bpffs holding the pins was unmounted")
	}
	// Mounted before (by the datapath above): not this one's to unmount.
	if err := load(false).Close(); err != nil {
		t.Fatal(err)
	}
	if !isBPFFS() {
		t.Fatal("a bpffs that was there before Load was unmounted")
	}
}

// Attach to a directory that is not of the cgroup v2 hierarchy says so
// (the kernel's own answer is "bad file descriptor"), for a cgroup v1
// hierarchy when the machine has one, and for any other directory.
func TestAttachRefusesNonCgroup2(t *testing.T) {
	testutil.RequireRoot(t)
	d, err := Load(Options{})
	if err != nil {
		testutil.Unavailable(t, err)
	}
	defer d.Close()
	dirs := map[string]string{t.TempDir(): "not on a cgroup file system"}
	if b, err := os.ReadFile("/proc/mounts"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 3 && f[2] == "cgroup" {
				dirs[f[1]] = "cgroup v1"
				break
			}
		}
	}
	for dir, why := range dirs {
		err := d.Attach(dir)
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), dir+" is not a cgroup v2 directory") || !strings.Contains(err.Error(), why) {
			t.Errorf("Attach(%s): %v, want it named as not a cgroup v2 directory (%s)", dir, err, why)
		}
	}
	if len(d.links) != 0 {
		t.Fatalf("hooks attached: %v", d.links)
	}
}

// numRedirectHooks is how many hooks join with the first redirect (or
// inbound) policy.
func numRedirectHooks(d *Datapath) int {
	n := 0
	for _, h := range d.hooks() {
		if h.redirect {
			n++
		}
	}
	return n
}

// An fwpd of an older version pinned fewer maps (those of the features
// added since are missing): a newer one adopts the maps there, with the
// hooks, the policy's generation and the records in them, and pins the
// others. A pinned map whose layout changed is refused by name.
func TestKeptPinsFromOlderDatapath(t *testing.T) {
	testutil.RequireRoot(t)
	root := t.TempDir()
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(root, "bpf")) })
	pins := filepath.Join(root, "bpf", "fwp")
	cg := testutil.NewCgroup(t)
	load := func(keep bool) (*Datapath, error) { return Load(Options{PinDir: pins, KeepHooks: keep}) }
	d1, err := load(true)
	if err != nil {
		testutil.Unavailable(t, err)
	}
	if err := d1.Attach(cg.Path); err != nil {
		t.Fatal(err)
	}
	e, _ := redirectPolicy(t, false, 1, netip.MustParseAddrPort("127.0.0.1:3128"), nil)
	apply(t, d1, e)
	gen := d1.gen
	const cookie = uint64(1<<62 + 7)
	if err := d1.objs.FwpSockRedirect.Put(cookie, &fwpRedirectState{Proto: 6, Cookie: cookie}); err != nil {
		t.Fatal(err)
	}
	if err := d1.Close(); err != nil {
		t.Fatal(err)
	}
	// The maps of the last features added, as an older fwpd had none.
	newer := []string{"fwp_in_listeners", "fwp_in_listen_idx", "fwp_sk_owner", "fwp_in_flows"}
	for _, name := range newer {
		if err := os.Remove(filepath.Join(pins, name)); err != nil {
			t.Fatal(err)
		}
	}
	d2, err := load(true)
	if err != nil {
		t.Fatalf("pins of an older datapath: %v", err)
	}
	if d2.gen != gen {
		t.Errorf("adopted generation %d, want %d", d2.gen, gen)
	}
	var st fwpRedirectState
	if err := d2.objs.FwpSockRedirect.Lookup(cookie, &st); err != nil || st.Cookie != cookie {
		t.Errorf("a record in an adopted map is gone: %v", err)
	}
	for _, name := range newer {
		if _, err := os.Stat(filepath.Join(pins, name)); err != nil {
			t.Errorf("map %s, new to this datapath, not pinned: %v", name, err)
		}
	}
	if err := d2.Attach(cg.Path); err != nil {
		t.Fatal(err)
	}
	ids2 := programIDs(t, d2)
	if c, r := attachedHooks(t, d2, cg, ids2); c != 6 || r != numRedirectHooks(d2) {
		t.Fatalf("after adopting an older datapath's pins: %d and %d hooks attached, want 6 and %d", c, r, numRedirectHooks(d2))
	}
	if err := d2.Close(); err != nil {
		t.Fatal(err)
	}
	// A map of another layout under a pinned name.
	epoch := filepath.Join(pins, "fwp_in_epoch")
	if err := os.Remove(epoch); err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 16, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	err = m.Pin(epoch)
	m.Close()
	if err != nil {
		t.Fatal(err)
	}
	if d, err := load(true); err == nil {
		d.Close()
		t.Fatal("a pinned map of another layout was adopted")
	} else if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "fwp_in_epoch") {
		t.Fatalf("a pinned map of another layout: %v, want ErrUnavailable naming fwp_in_epoch", err)
	}
	// Without KeepHooks the pins (and the hooks they hold) go.
	d3, err := load(false)
	if err != nil {
		t.Fatal(err)
	}
	if err := d3.Close(); err != nil {
		t.Fatal(err)
	}
	if c, r := attachedHooks(t, d2, cg, ids2); c != 0 || r != 0 {
		t.Fatalf("after a datapath without KeepHooks: %d and %d hooks still attached", c, r)
	}
}

// MaxRedirectRecords sizes the redirect record maps; the kernel memory
// each record costs is logged for docs/benchmarks.md.
func TestMaxRedirectRecords(t *testing.T) {
	testutil.RequireRoot(t)
	memlock := func(m *ebpf.Map) int {
		b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", m.FD()))
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "memlock:"); ok {
				n, _ := strconv.Atoi(strings.TrimSpace(v))
				return n
			}
		}
		return 0
	}
	var bytes [2]int
	for i, n := range []uint32{8192, 65536} {
		d, err := Load(Options{MaxRedirectRecords: n})
		if err != nil {
			testutil.Unavailable(t, err)
		}
		byName := d.mapsByName()
		for _, name := range redirectRecordMaps {
			if got := byName[name].MaxEntries(); got != n {
				t.Errorf("%s: %d entries, want %d", name, got, n)
			}
			bytes[i] += memlock(byName[name])
		}
		d.Close()
	}
	t.Logf("redirect record maps: %d bytes of kernel memory a record (memlock)", (bytes[1]-bytes[0])/(65536-8192))
}

// appsBlocklistPolicy is issue 15's real policy: a 1M-address blocklist
// (one filter with a list) and 1,000 per-application rules (1,000 files,
// each its own application, blocked from a port of its own).
func appsBlocklistPolicy(t testing.TB) *engine.Engine {
	e := blocklistPolicy(t, 0, 1_000_000)
	dir, err := os.MkdirTemp("/var/tmp", "fwp-bench-apps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin, err := os.ReadFile("/usr/bin/true")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Update(func(tx *engine.Txn) error {
		for i := range 1000 {
			app := filepath.Join(dir, fmt.Sprintf("app%d", i))
			if err := os.WriteFile(app, bin, 0o755); err != nil {
				return err
			}
			if _, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
				engine.Condition{Field: engine.FieldALEAppID, Match: engine.MatchEqual, Value: engine.String(app)},
				engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(20000 + i))})); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return e
}
