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
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	ciliumebpf "github.com/cilium/ebpf"
	xunix "golang.org/x/sys/unix"

	"fwp/engine"
	"fwp/internal/testutil"
)

func init() {
	testutil.RegisterHelper("udpreply", udpReplyHelper)
	testutil.RegisterHelper("udpreplyproxy", udpReplyProxyHelper)
}

// urCmd is one request to the udpreply helper.
type urCmd struct {
	Op   string `json:"op"` // listen: a new echo socket (the old one closed); send: from it
	Net  string `json:"net,omitempty"`
	Addr string `json:"addr,omitempty"`
	To   string `json:"to,omitempty"`
	// Src: "send" names this source address (IP_PKTINFO, IPv4).
	Src string `json:"src,omitempty"`
	// UID, GID: "listen" becomes this user first (for good).
	UID, GID uint32 `json:",omitempty"`
	// MapID: "mapopen" tries to open this map by id.
	MapID uint32 `json:",omitempty"`
}

// udpReplyHelper is a UDP echo server in the test cgroup: "listen" opens
// an unconnected socket that answers every datagram to its sender;
// "send" sends a datagram from that socket to any address and answers
// "ok", "eperm" or the error.
func udpReplyHelper([]string) error {
	in := bufio.NewScanner(os.Stdin)
	var pc net.PacketConn
	for in.Scan() {
		var c urCmd
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			return err
		}
		answer := "ok"
		switch c.Op {
		case "mapopen":
			if m, err := ciliumebpf.NewMapFromID(ciliumebpf.MapID(c.MapID)); err != nil {
				answer = err.Error()
				if errors.Is(err, syscall.EPERM) {
					answer = "eperm"
				}
			} else {
				m.Close()
				answer = "opened"
			}
		case "listen":
			if c.UID != 0 {
				if err := dropTo(c.UID, c.GID); err != nil {
					answer = err.Error()
					break
				}
			}
			if pc != nil {
				pc.Close()
			}
			var err error
			if pc, err = net.ListenPacket(c.Net, c.Addr); err != nil {
				answer = err.Error()
				break
			}
			go echoDatagrams(pc, false)
		case "send":
			if pc == nil {
				answer = "no socket"
				break
			}
			var oob []byte
			if c.Src != "" {
				info := xunix.Inet4Pktinfo{Spec_dst: netip.MustParseAddr(c.Src).As4()}
				oob = make([]byte, xunix.CmsgSpace(xunix.SizeofInet4Pktinfo))
				h := (*xunix.Cmsghdr)(unsafe.Pointer(&oob[0]))
				h.Level, h.Type = syscall.IPPROTO_IP, syscall.IP_PKTINFO
				h.SetLen(xunix.CmsgLen(xunix.SizeofInet4Pktinfo))
				*(*xunix.Inet4Pktinfo)(unsafe.Pointer(&oob[xunix.CmsgLen(0)])) = info
			}
			if _, _, err := pc.(*net.UDPConn).WriteMsgUDPAddrPort([]byte("s"), oob, netip.MustParseAddrPort(c.To)); errors.Is(err, syscall.EPERM) {
				answer = "eperm"
			} else if err != nil {
				answer = err.Error()
			}
		default:
			answer = "unknown op " + c.Op
		}
		if _, err := fmt.Println(answer); err != nil {
			return err
		}
	}
	return in.Err()
}

func urCall(t testing.TB, h *testutil.Helper, c urCmd) string {
	t.Helper()
	b, _ := json.Marshal(c)
	ans, err := h.Call(b)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ans))
}

// urClient is a UDP socket outside the cgroup, in the helper's namespace.
type urClient struct{ pc net.PacketConn }

func newURClient(t testing.TB, h *testutil.Helper, network, addr string) *urClient {
	t.Helper()
	var c urClient
	err := inNetnsPid(h.Pid(), func() error {
		var err error
		c.pc, err = net.ListenPacket(network, addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.pc.Close() })
	return &c
}

// exchange sends a datagram to the server and reports whether an answer
// came back within wait.
func (c *urClient) exchange(to netip.AddrPort, wait time.Duration) string {
	if _, err := c.pc.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(to)); err != nil {
		return err.Error()
	}
	return c.read(wait)
}

func (c *urClient) read(wait time.Duration) string {
	c.pc.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 64)
	if _, _, err := c.pc.ReadFrom(buf); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return "timeout"
		}
		return err.Error()
	}
	return "ok"
}

func udpProto() engine.Condition {
	return engine.Condition{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)}
}

// blockOutboundUDP blocks UDP at AUTH_CONNECT v4 and v6; with recv, an
// AUTH_RECV_ACCEPT filter that matches none of the tests' flows is there
// too (the ingress hook then classifies each flow's first datagram).
func blockOutboundUDP(t testing.TB, recv bool) *engine.Engine {
	return buildEngine(t, func(tx *engine.Txn) error {
		fs := []engine.Filter{blockFilter(engine.LayerALEAuthConnectV4, udpProto()), blockFilter(engine.LayerALEAuthConnectV6, udpProto())}
		if recv {
			for _, v6 := range []bool{false, true} {
				fs = append(fs, blockFilter(recvAccept(v6), engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(9)}))
			}
		}
		for _, f := range fs {
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
}

func connectCounts(t testing.TB, d *Datapath) (permit, block uint64) {
	t.Helper()
	p1, b1 := recvCounts(t, d, engine.KindAuthConnect)
	p2, b2 := recvCounts(t, d, engine.KindConnectRedirect)
	return p1 + p2, b1 + b2
}

func replyStats(t testing.TB, d *Datapath) UDPReplyStats {
	t.Helper()
	s, err := d.UDPReplyStats()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestKernelUDPReplies: a UDP echo server in the hooked cgroup under a
// policy that blocks outbound UDP answers a client outside the cgroup
// whose datagram it received (the reply is that inbound flow's, as in
// WFP's ALE, and is not classified at CONNECT_REDIRECT/AUTH_CONNECT), but
// still cannot send to a remote that never sent to it (EPERM). After a
// policy change the flow no longer exempts until the client's next
// datagram, classified under the new policy, records it again.
func TestKernelUDPReplies(t *testing.T) {
	d, cg := kernelSetup(t)
	for _, c := range []struct {
		name, net, server, client, other string
	}{
		{"v4", "udp4", "127.0.0.1:7100", "127.0.0.1:5100", "127.0.0.1:5199"},
		{"v6", "udp6", "[::1]:7100", "[::1]:5100", "[::1]:5199"},
		// A dual-stack server: the v4 client's flow is a v4 one.
		{"v4-on-v6", "udp", "[::]:7100", "127.0.0.1:5100", "127.0.0.1:5199"},
	} {
		for _, recv := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/recvfilters=%v", c.name, recv), func(t *testing.T) {
				apply(t, d, blockOutboundUDP(t, recv))
				h := testutil.StartHelper(t, cg, "udpreply")
				if a := urCall(t, h, urCmd{Op: "listen", Net: c.net, Addr: c.server}); a != "ok" {
					t.Fatalf("listen: %s", a)
				}
				server := netip.MustParseAddrPort(c.server)
				if server.Addr().IsUnspecified() {
					server = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), server.Port())
				}
				cnet := "udp4"
				if netip.MustParseAddrPort(c.client).Addr().Is6() {
					cnet = "udp6"
				}
				cl := newURClient(t, h, cnet, c.client)
				s0 := replyStats(t, d)
				p0, b0 := connectCounts(t, d)
				// (a) The client's datagram is answered.
				for i := range 3 {
					if got := cl.exchange(server, 2*time.Second); got != "ok" {
						t.Fatalf("exchange %d with the echo server: %s, want its answer", i, got)
					}
				}
				s1 := replyStats(t, d)
				p1, b1 := connectCounts(t, d)
				if s1.Replies-s0.Replies != 3 || p1 != p0 || b1 != b0 {
					t.Fatalf("3 replies: %d passed as replies, %d permits and %d blocks at the outbound layers; want 3, 0, 0",
						s1.Replies-s0.Replies, p1-p0, b1-b0)
				}
				// A send of the server's own to the client is the flow's too.
				if a := urCall(t, h, urCmd{Op: "send", To: c.client}); a != "ok" {
					t.Fatalf("send to the client: %s", a)
				}
				if got := cl.read(2 * time.Second); got != "ok" {
					t.Fatalf("the client's read: %s", got)
				}
				// (b) A remote that never sent: a first send, blocked.
				if a := urCall(t, h, urCmd{Op: "send", To: c.other}); a != "eperm" {
					t.Fatalf("send to a remote that never sent: %s, want eperm", a)
				}
				if _, b2 := connectCounts(t, d); b2-b1 != 1 {
					t.Fatalf("the first send was counted %d times as blocked, want 1", b2-b1)
				}
				// A new policy (the same filters): the flow was let in under
				// the old one and no longer exempts...
				apply(t, d, blockOutboundUDP(t, recv))
				if a := urCall(t, h, urCmd{Op: "send", To: c.client}); a != "eperm" {
					t.Fatalf("send to the client after a policy change: %s, want eperm (classified as a first send)", a)
				}
				// ...until the client's next datagram, let in under the new one.
				if got := cl.exchange(server, 2*time.Second); got != "ok" {
					t.Fatalf("exchange after the policy change: %s", got)
				}
				if a := urCall(t, h, urCmd{Op: "send", To: c.client}); a != "ok" {
					t.Fatalf("send to the client after its datagram: %s", a)
				}
			})
		}
	}
}

// A datagram AUTH_RECV_ACCEPT blocks makes no flow: the server's send to
// that remote stays a first send (blocked under "block outbound UDP").
func TestKernelUDPReplyBlockedFlow(t *testing.T) {
	d, cg := kernelSetup(t)
	apply(t, d, buildEngine(t, func(tx *engine.Txn) error {
		for _, f := range []engine.Filter{blockFilter(engine.LayerALEAuthConnectV4, udpProto()),
			blockFilter(recvAccept(false), engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(5101)})} {
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	}))
	h := testutil.StartHelper(t, cg, "udpreply")
	if a := urCall(t, h, urCmd{Op: "listen", Net: "udp4", Addr: "127.0.0.1:7101"}); a != "ok" {
		t.Fatal(a)
	}
	cl := newURClient(t, h, "udp4", "127.0.0.1:5101")
	if got := cl.exchange(netip.MustParseAddrPort("127.0.0.1:7101"), 300*time.Millisecond); got != "timeout" {
		t.Fatalf("a blocked datagram: %s, want no answer", got)
	}
	if a := urCall(t, h, urCmd{Op: "send", To: "127.0.0.1:5101"}); a != "eperm" {
		t.Fatalf("send to a remote whose datagram was blocked: %s, want eperm", a)
	}
}

// udpReplyProxyHelper runs a UDP proxy at args[1] (a DNS server: it
// answers each question, anything else with "proxy:"+data) and, in the
// same cgroup, clients of the origin args[0] that the policy redirects to
// it: an unconnected socket, a connected one, and dig. It prints what
// each got, and how many datagrams the proxy answered.
func udpReplyProxyHelper(args []string) error {
	origin, proxyAddr := netip.MustParseAddrPort(args[0]), netip.MustParseAddrPort(args[1])
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(proxyAddr))
	if err != nil {
		return err
	}
	defer pc.Close()
	var answered atomic.Int64
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			a := testutil.DNSAnswer(buf[:n])
			if a == nil {
				a = append([]byte("proxy:"), buf[:n]...)
			}
			answered.Add(1)
			pc.WriteTo(a, from)
		}
	}()
	res := map[string]string{}
	network := "udp4"
	if origin.Addr().Is6() {
		network = "udp6"
	}
	c, err := net.ListenUDP(network, nil)
	if err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 512)
	if _, err := c.WriteToUDPAddrPort([]byte("a"), origin); err != nil {
		res["unconnected"] = err.Error()
	} else if n, from, err := c.ReadFromUDPAddrPort(buf); err != nil {
		res["unconnected"] = err.Error()
	} else {
		res["unconnected"] = fmt.Sprintf("%s from %s", buf[:n], netip.AddrPortFrom(from.Addr().Unmap(), from.Port()))
	}
	c.Close()
	cc, err := net.Dial(network, origin.String())
	if err != nil {
		return err
	}
	cc.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := cc.Write([]byte("b")); err != nil {
		res["connected"] = err.Error()
	} else if n, err := cc.Read(buf); err != nil {
		res["connected"] = err.Error()
	} else {
		res["connected"] = string(buf[:n])
	}
	cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "dig", "@"+origin.Addr().String(), "-p", fmt.Sprint(origin.Port()), "+tries=1", "+time=2", "+short", "fwp.test").CombinedOutput()
	res["dig"] = strings.TrimSpace(string(out))
	if err != nil {
		res["dig"] += " (" + err.Error() + ")"
	}
	time.Sleep(50 * time.Millisecond) // a loop would go on answering
	res["answered"] = fmt.Sprint(answered.Load())
	return json.NewEncoder(os.Stdout).Encode(res)
}

// TestKernelUDPProxyRepliesNotRedirected: a built-in redirect at
// CONNECT_REDIRECT without any condition (so it matches every UDP send of
// the cgroup, the proxy's too) sends a UDP client, a connected one and
// dig to a UDP proxy in the same cgroup; the proxy's replies are the
// inbound flows' and are not redirected (to the proxy itself: a loop).
func TestKernelUDPProxyRepliesNotRedirected(t *testing.T) {
	if _, err := exec.LookPath("dig"); err != nil {
		testutil.Unavailable(t, err)
	}
	d, cg := kernelSetup(t)
	for _, c := range redirectCases("127.0.0.53:53", "[::1]:53", 15360) {
		t.Run(c.name, func(t *testing.T) {
			e := buildEngine(t, func(tx *engine.Txn) error {
				layer := engine.LayerFor(engine.KindConnectRedirect, c.name == "v6")
				co, err := tx.AddCallout(engine.Callout{Key: BuiltinConnectRedirectKey + "/udpreply", Layer: layer})
				if err != nil {
					return err
				}
				data, err := RedirectConfig{Proxy: c.proxy}.Marshal()
				if err != nil {
					return err
				}
				pc, err := tx.AddProviderContext(engine.ProviderContext{Data: data})
				if err != nil {
					return err
				}
				_, err = tx.AddFilter(engine.Filter{Layer: layer, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}, ProviderContext: pc})
				return err
			})
			apply(t, d, e)
			s0 := replyStats(t, d)
			out, err := testutil.RunHelperFiles(cg, "udpreplyproxy", nil, nil, c.origin.String(), c.proxy.String())
			if err != nil {
				t.Fatal(err)
			}
			var res map[string]string
			if err := json.Unmarshal(out, &res); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			want := map[string]string{"unconnected": "proxy:a from " + c.origin.String(), "connected": "proxy:b", "dig": "10.1.2.3", "answered": "3"}
			for k, v := range want {
				if res[k] != v {
					t.Errorf("%s: %q, want %q", k, res[k], v)
				}
			}
			if s1 := replyStats(t, d); s1.Replies-s0.Replies < 3 {
				t.Errorf("%d sends passed as replies, want at least the proxy's 3", s1.Replies-s0.Replies)
			}
		})
	}
}

// TestKernelUDPReplySoak: 100,000 inbound UDP flows (FWP_SOAK_OPS scales
// it), each answered by an echo server under "block outbound UDP", in one
// datapath lifetime: every answer passes, none is classified, and the
// reply and flow tables stay within their bounds.
func TestKernelUDPReplySoak(t *testing.T) {
	d, cg := kernelSetup(t)
	apply(t, d, blockOutboundUDP(t, false))
	h := testutil.StartHelper(t, cg, "udpreply")
	if a := urCall(t, h, urCmd{Op: "listen", Net: "udp4", Addr: "0.0.0.0:7102"}); a != "ok" {
		t.Fatal(a)
	}
	n := soakOps
	const workers = 4
	s0 := replyStats(t, d)
	_, b0 := connectCounts(t, d)
	fdsBefore := helperFDs(t, h)
	start := time.Now()
	var wg sync.WaitGroup
	var failed atomic.Int64
	var firstErr atomic.Value
	for w := range workers {
		wg.Go(func() {
			err := inNetnsPid(h.Pid(), func() error {
				buf := make([]byte, 16)
				for i := w; i < n && failed.Load() < 10; i += workers {
					// A new flow each: a client address of 127/8 and port.
					from := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, byte(1 + i>>16), byte(i >> 8), byte(i)}), uint16(20000+i%1000))
					pc, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(from))
					if err != nil {
						return err
					}
					_, err = pc.WriteToUDPAddrPort([]byte("x"), netip.MustParseAddrPort("127.0.0.1:7102"))
					if err == nil {
						pc.SetReadDeadline(time.Now().Add(2 * time.Second))
						_, _, err = pc.ReadFromUDPAddrPort(buf)
					}
					pc.Close()
					if err != nil {
						if failed.Add(1) == 1 {
							firstErr.Store(fmt.Errorf("flow %d from %s: %w", i, from, err))
						}
					}
				}
				return nil
			})
			if err != nil {
				failed.Add(1)
				firstErr.Store(err)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if f := failed.Load(); f > 0 {
		t.Fatalf("%d of %d flows unanswered; first: %v", f, n, firstErr.Load())
	}
	s1 := replyStats(t, d)
	_, b1 := connectCounts(t, d)
	flows, err := d.UDPReplyFlows()
	if err != nil {
		t.Fatal(err)
	}
	in, err := d.InboundFlows()
	if err != nil {
		t.Fatal(err)
	}
	fdsAfter := helperFDs(t, h)
	t.Logf("%d flows in %v: %d recorded, %d replies passed; reply table %d (bound %d), flow table %d; helper fds %d -> %d",
		n, elapsed.Round(time.Millisecond), s1.Recorded-s0.Recorded, s1.Replies-s0.Replies, flows, UDPReplyFlowsMax, in, fdsBefore, fdsAfter)
	if got := s1.Replies - s0.Replies; got != uint64(n) || b1 != b0 {
		t.Errorf("%d replies passed unclassified and %d blocked, want %d and 0", got, b1-b0, n)
	}
	if got := s1.Recorded - s0.Recorded; got != uint64(n) {
		t.Errorf("%d flows recorded, want %d (one each)", got, n)
	}
	if flows > UDPReplyFlowsMax || in > InboundFlowsMax {
		t.Errorf("tables hold %d reply flows and %d inbound flows, bounds %d and %d", flows, in, UDPReplyFlowsMax, InboundFlowsMax)
	}
	if fdsAfter > fdsBefore {
		t.Errorf("the server's descriptors grew from %d to %d", fdsBefore, fdsAfter)
	}
}

// helperFDs counts the helper's open descriptors.
func helperFDs(t testing.TB, h *testutil.Helper) int {
	t.Helper()
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", h.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// The ingress hook joins alone with the first policy that has outbound
// filters (a policy without any attaches the classifying hooks only), and
// once with the other redirect hooks when a redirect comes: never twice.
func TestIngressHookAttachesForOutboundFilters(t *testing.T) {
	testutil.RequireRoot(t)
	d, err := Load(Options{})
	if err != nil {
		testutil.Unavailable(t, err)
	}
	t.Cleanup(func() { d.Close() })
	ids := programIDs(t, d)
	cg := testutil.NewCgroup(t)
	if err := d.Attach(cg.Path); err != nil {
		testutil.Unavailable(t, err)
	}
	check := func(what string, g *testutil.Cgroup, wantR int) {
		t.Helper()
		if c, r := attachedHooks(t, d, g, ids); c != 6 || r != wantR {
			t.Fatalf("%s: %d classifying and %d redirect hooks attached, want 6 and %d", what, c, r, wantR)
		}
	}
	apply(t, d, buildEngine(t, func(tx *engine.Txn) error {
		_, err := tx.AddFilter(blockFilter(engine.LayerFor(engine.KindBindRedirect, false), engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(9)}))
		return err
	}))
	check("a policy without outbound filters", cg, 0)
	apply(t, d, blockOutboundUDP(t, false))
	check("outbound filters", cg, 1)
	later := testutil.NewCgroup(t)
	if err := d.Attach(later.Path); err != nil {
		t.Fatal(err)
	}
	check("a cgroup attached later", later, 1)
	e, _ := redirectPolicy(t, false, 1, netip.MustParseAddrPort("127.0.0.1:3128"), nil)
	apply(t, d, e)
	for _, g := range []*testutil.Cgroup{cg, later} {
		check("a redirect", g, numRedirectHooks(d))
	}
	for _, g := range []*testutil.Cgroup{cg, later} {
		if err := d.Detach(g.Path); err != nil {
			t.Fatal(err)
		}
		if c, r := attachedHooks(t, d, g, ids); c != 0 || r != 0 {
			t.Fatalf("after Detach: %d and %d hooks attached", c, r)
		}
	}
}

// TestKernelUDPSendsPerRemote: an unconnected socket's sends to a remote
// its first send there authorized are that flow's: classified once per
// remote and policy, not per datagram; a new policy classifies the next
// one again (and blocks it if it must); a redirected send stays
// redirected every time (TestKernelRedirectUDP, TestKernelUDPProxyRepliesNotRedirected).
func TestKernelUDPSendsPerRemote(t *testing.T) {
	d, cg := kernelSetup(t)
	block := func(port uint16) *engine.Engine {
		return buildEngine(t, func(tx *engine.Txn) error {
			_, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4, udpProto(), engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(port)}))
			return err
		})
	}
	apply(t, d, block(9))
	h := testutil.StartHelper(t, cg, "udpreply")
	if a := urCall(t, h, urCmd{Op: "listen", Net: "udp4", Addr: "127.0.0.1:7103"}); a != "ok" {
		t.Fatal(a)
	}
	p0, b0 := recvCounts(t, d, engine.KindAuthConnect)
	s0 := replyStats(t, d)
	for _, to := range []string{"127.0.0.1:5201", "127.0.0.1:5201", "127.0.0.1:5201", "127.0.0.1:5202", "127.0.0.1:5202"} {
		if a := urCall(t, h, urCmd{Op: "send", To: to}); a != "ok" {
			t.Fatalf("send to %s: %s", to, a)
		}
	}
	p1, b1 := recvCounts(t, d, engine.KindAuthConnect)
	s1 := replyStats(t, d)
	if p1-p0 != 2 || b1 != b0 || s1.Replies-s0.Replies != 3 {
		t.Fatalf("5 sends to 2 remotes: %d permits, %d blocks at AUTH_CONNECT, %d passed as the flow's; want 2, 0, 3", p1-p0, b1-b0, s1.Replies-s0.Replies)
	}
	apply(t, d, block(5201))
	if a := urCall(t, h, urCmd{Op: "send", To: "127.0.0.1:5201"}); a != "eperm" {
		t.Fatalf("send to a remote the new policy blocks: %s, want eperm", a)
	}
	if a := urCall(t, h, urCmd{Op: "send", To: "127.0.0.1:5202"}); a != "ok" {
		t.Fatalf("send to a remote the new policy permits: %s", a)
	}
	if p2, b2 := recvCounts(t, d, engine.KindAuthConnect); p2-p1 != 1 || b2-b1 != 1 {
		t.Fatalf("after the policy change: %d permits, %d blocks, want 1 and 1", p2-p1, b2-b1)
	}
}

// A reply naming a source address (IP_PKTINFO) is the flow's only from the
// local address the flow's datagram came to; from another, it is a first
// send (blocked under "block outbound UDP"). The socket is on the wildcard
// address, so without IP_PKTINFO the flow's address is taken.
func TestKernelUDPReplySourceAddress(t *testing.T) {
	d, cg := kernelSetup(t)
	apply(t, d, blockOutboundUDP(t, false))
	h := testutil.StartHelper(t, cg, "udpreply")
	if a := urCall(t, h, urCmd{Op: "listen", Net: "udp4", Addr: "0.0.0.0:7104"}); a != "ok" {
		t.Fatal(a)
	}
	cl := newURClient(t, h, "udp4", "127.0.0.1:5104")
	if got := cl.exchange(netip.MustParseAddrPort("127.0.0.7:7104"), 2*time.Second); got != "ok" {
		t.Fatalf("exchange: %s", got)
	}
	for _, c := range []struct{ src, want string }{{"127.0.0.7", "ok"}, {"", "ok"}, {"127.0.0.8", "eperm"}} {
		if a := urCall(t, h, urCmd{Op: "send", To: "127.0.0.1:5104", Src: c.src}); a != c.want {
			t.Errorf("reply from %q: %s, want %s", c.src, a, c.want)
		}
	}
}

// An unprivileged user's UDP server in the hooked cgroup gets the same
// exemption (a flow is the socket's, whoever owns it) and no more: its
// sends to a remote that never sent are refused, and it cannot open the
// reply table to add or read flows (the maps are root's).
func TestKernelUDPReplyUnprivileged(t *testing.T) {
	d, cg := kernelSetup(t)
	u := testutil.NewUser(t)
	apply(t, d, blockOutboundUDP(t, false))
	h := testutil.StartHelper(t, cg, "udpreply")
	if a := urCall(t, h, urCmd{Op: "listen", Net: "udp4", Addr: "127.0.0.1:7105", UID: u.UID, GID: u.GID}); a != "ok" {
		t.Fatal(a)
	}
	cl := newURClient(t, h, "udp4", "127.0.0.1:5105")
	if got := cl.exchange(netip.MustParseAddrPort("127.0.0.1:7105"), 2*time.Second); got != "ok" {
		t.Fatalf("an unprivileged server's reply: %s", got)
	}
	if a := urCall(t, h, urCmd{Op: "send", To: "127.0.0.1:5106"}); a != "eperm" {
		t.Fatalf("an unprivileged server's send to a remote that never sent: %s, want eperm", a)
	}
	info, err := d.objs.FwpUdpReplies.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	if a := urCall(t, h, urCmd{Op: "mapopen", MapID: uint32(id)}); a != "eperm" {
		t.Fatalf("an unprivileged process opening fwp_udp_replies: %s, want eperm", a)
	}
}

// TestKernelUDPFlowsMatchModel is the differential test of UDP flows on
// the send side: random policies (blocks of UDP to some remote ports at
// AUTH_CONNECT, blocks of some at AUTH_RECV_ACCEPT or none there) and
// random sequences of datagrams received (from a client outside the
// cgroup; the server echoes) and sent (by the server, to a client) on one
// server socket; the kernel's outcome must be WFP's flow model run on
// engine.Classify: a remote with a flow passes both ways; otherwise a
// datagram in is classified at AUTH_RECV_ACCEPT and a send at
// CONNECT_REDIRECT and AUTH_CONNECT, and a permit makes the flow; a new
// policy starts without flows (the epoch).
func TestKernelUDPFlowsMatchModel(t *testing.T) {
	d, cg := kernelSetup(t)
	h := testutil.StartHelper(t, cg, "udpreply")
	server := netip.MustParseAddrPort("127.0.0.1:7110")
	if a := urCall(t, h, urCmd{Op: "listen", Net: "udp4", Addr: server.String()}); a != "ok" {
		t.Fatal(a)
	}
	const nremotes = 6
	remote := func(k int) netip.AddrPort { return netip.AddrPortFrom(server.Addr(), uint16(5300+k)) }
	clients := make([]*urClient, nremotes)
	for k := range clients {
		clients[k] = newURClient(t, h, "udp4", remote(k).String())
	}
	r := rand.New(rand.NewPCG(17, 1))
	port := func(k int) engine.Condition {
		return engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(remote(k).Port())}
	}
	ops := 0
	seen := map[string]int{} // outcomes, and whether a flow decided them
	for round := range 4 {
		recvFilters := round%2 == 1
		e := buildEngine(t, func(tx *engine.Txn) error {
			for k := range nremotes {
				if r.IntN(2) == 0 {
					if _, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4, udpProto(), port(k))); err != nil {
						return err
					}
				}
				if recvFilters && r.IntN(3) == 0 {
					if _, err := tx.AddFilter(blockFilter(recvAccept(false), port(k))); err != nil {
						return err
					}
				}
			}
			// Always something outbound, so the flows are recorded.
			_, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4, udpProto(), engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(9)}))
			return err
		})
		apply(t, d, e)
		flows := map[int]bool{}
		for range 20 {
			k := r.IntN(nremotes)
			tp := tuple{proto: 17, remote: remote(k), local: server, cgroup: cg.ID}
			var want, got string
			had := flows[k]
			if r.IntN(2) == 0 {
				want = "ok"
				if !flows[k] {
					if engineRecvBlocks(e, tp) {
						want = "timeout"
					} else {
						flows[k] = true
					}
				}
				got = clients[k].exchange(server, 200*time.Millisecond)
				if want == "ok" && got == "timeout" {
					got = clients[k].read(2 * time.Second) // a slow echo, not a drop
				}
				want, got = "in "+want, "in "+got
			} else {
				want = "ok"
				if !flows[k] {
					if engineBlocks(e, tp) {
						want = "eperm"
					} else {
						flows[k] = true
					}
				}
				got = urCall(t, h, urCmd{Op: "send", To: remote(k).String()})
				if got == "ok" {
					clients[k].read(2 * time.Second) // drain it
				}
				want, got = "out "+want, "out "+got
			}
			ops++
			seen[fmt.Sprintf("%s flow=%v", want, had)]++
			if got != want {
				t.Fatalf("round %d (AUTH_RECV_ACCEPT filters: %v), op %d with remote %s: %s, want %s (a flow before: %v)", round, recvFilters, ops, remote(k), got, want, had)
			}
		}
	}
	t.Logf("%d ops: %v", ops, seen)
	for _, c := range []string{"in ok flow=true", "in ok flow=false", "in timeout flow=false", "out ok flow=true", "out ok flow=false", "out eperm flow=false"} {
		if seen[c] == 0 {
			t.Errorf("no op of the kind %q: the random sequence misses a case", c)
		}
	}
}
