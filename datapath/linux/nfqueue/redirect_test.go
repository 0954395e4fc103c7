//go:build linux

package nfqueue

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
	"fwp/internal/testutil"
	"fwp/internal/unix"
	"fwp/proxy"
)

// Ports of the redirect scenario, on 127.0.0.1 in the helper's namespace.
const (
	portOrigin = 8200 // the origin web server the client asks for
	portProxyA = 8201 // provider A's proxy (an inline redirect)
	portProxyB = 8202 // provider B's proxy (a pended redirect)
)

func init() { testutil.RegisterHelper("redirect", redirectHelper) }

// redirectHelper runs in the test's cgroup and namespace: the origin
// (echoing the proxies' headers), two proxies that read the redirect
// through the proxy API (SOL_FWP records, context and original
// destination, SO_ORIGINAL_DST, the client's getpeername as the origin
// sees it) and connect on with the records, and a client answering one
// command line at a time.
func redirectHelper([]string) error {
	ln, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(portOrigin))
	if err != nil {
		return err
	}
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "origin via=%s\n", strings.Join(r.Header.Values("X-Fwp-Proxy"), ","))
	}))
	for _, p := range []struct {
		name string
		port int
	}{{"A", portProxyA}, {"B", portProxyB}} {
		ln, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(p.port))
		if err != nil {
			return err
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					if err := redirectProxy(p.name, c); err != nil {
						fmt.Fprintf(c, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: %d\r\n\r\n%s", len(err.Error()), err)
					}
				}()
			}
		}()
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "get":
			// get PORT: an HTTP GET from a Go client; the socket's peer
			// as getpeername says, and the body
			fmt.Println(redirectGet(f[1]))
		case "curl":
			out, err := exec.Command("curl", "-sS", "--max-time", "10", "http://127.0.0.1:"+f[1]+"/").CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			fmt.Printf("%d %q\n", code, out)
		default:
			fmt.Println(helperCommand(f))
		}
	}
	return in.Err()
}

func redirectGet(port string) string {
	c, err := net.DialTimeout("tcp4", "127.0.0.1:"+port, 10*time.Second)
	if err != nil {
		return fmt.Sprintf("error %q", err)
	}
	defer c.Close()
	peer := c.RemoteAddr().String()
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return fmt.Sprintf("error %q", err)
	}
	body, _ := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d %s %q", resp.StatusCode, peer, strings.TrimSpace(string(body)))
}

// redirectProxy reads the redirect of an accepted connection through the
// proxy API, checks SO_ORIGINAL_DST agrees, and relays one request to the
// original destination with the records set, naming itself in a header.
func redirectProxy(name string, c net.Conn) error {
	rd, orig, err := proxy.QueryKernelRedirect(c)
	if err != nil {
		return fmt.Errorf("proxy %s: %w", name, err)
	}
	sc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return err
	}
	var od netip.AddrPort
	var oerr error
	sc.Control(func(fd uintptr) { od, oerr = unix.OriginalDst(int(fd), false) })
	if oerr != nil || od != orig {
		return fmt.Errorf("proxy %s: SO_ORIGINAL_DST %v (%v), SOL_FWP says %v", name, od, oerr, orig)
	}
	d := &net.Dialer{Timeout: 10 * time.Second}
	if err := proxy.SetRedirectRecords(d, rd.Records); err != nil {
		return err
	}
	out, err := d.Dial("tcp4", orig.String())
	if err != nil {
		return fmt.Errorf("proxy %s: on to %s: %w", name, orig, err)
	}
	defer out.Close()
	req, err := http.ReadRequest(bufio.NewReader(c))
	if err != nil {
		return err
	}
	req.Header.Add("X-Fwp-Proxy", fmt.Sprintf("%s:orig=%s:records=%d:context=%s", name, orig, (len(rd.Records)-4)/4, rd.Context))
	req.Header.Set("Connection", "close")
	if err := req.Write(out); err != nil {
		return err
	}
	_, err = io.Copy(c, out)
	return err
}

// redirectFixture: the datapath on a fresh cgroup, the redirect helper in
// it, and an engine with two providers' redirecting callouts at
// CONNECT_REDIRECT_V4 on the origin's port: A's inline (to proxy A), B's
// pended (to proxy B, completed from another goroutine). Each lets its
// own proxy's connection through (RedirectState); B defers to A's local
// redirect (seed 001), so the chain is client → A → B → origin.
func redirectFixture(t testing.TB, opts Options) (*fixture, []engine.RedirectHandle) {
	var hs []engine.RedirectHandle
	fx := customFixture(t, "redirect", opts, 5*time.Second, func(fx *fixture, tx *engine.Txn) error {
		pid := uint32(fx.h.Pid())
		target := func(port int) func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
			return func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
				fx.calls.Add(1)
				orig := netip.AddrPortFrom(req.Values.Get(engine.FieldIPRemoteAddress).Addr(), uint16(req.Values.Uint(engine.FieldIPRemotePort)))
				return engine.RedirectTarget{To: netip.MustParseAddrPort("127.0.0.1:" + strconv.Itoa(port)), TargetPID: pid, Context: []byte(orig.String())}, true
			}
		}
		ha, hb := fx.eng.RedirectHandleCreate("a"), fx.eng.RedirectHandleCreate("b")
		hs = []engine.RedirectHandle{ha, hb}
		ra := &engine.ConnectRedirect{Handle: ha, Target: target(portProxyA)}
		rb := &engine.ConnectRedirect{Handle: hb, Target: target(portProxyB), Async: true}
		for key, reg := range map[string]engine.CalloutRegistration{"a.redirect": ra.Registration(), "b.redirect": rb.Registration()} {
			if err := fx.eng.RegisterCallout(key, reg); err != nil {
				return err
			}
		}
		for _, p := range []struct {
			key    string
			weight uint16
		}{{"a", 20}, {"b", 10}} {
			pv, err := tx.AddProvider(engine.Provider{Key: p.key})
			if err != nil {
				return err
			}
			sl, err := tx.AddSublayer(engine.Sublayer{Key: p.key, Provider: pv, Weight: p.weight})
			if err != nil {
				return err
			}
			co, err := tx.AddCallout(engine.Callout{Key: p.key + ".redirect", Provider: pv, Layer: engine.LayerALEConnectRedirectV4})
			if err != nil {
				return err
			}
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEConnectRedirectV4, Sublayer: sl, Provider: pv,
				Conditions: []engine.Condition{
					{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(portOrigin)},
				},
				Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}}); err != nil {
				return err
			}
		}
		return nil
	})
	return fx, hs
}

// customFixture is newFixture with another helper, path options and
// policy: policy runs in the engine's first transaction, after the helper
// started (its pid is known), and registers its callouts itself.
func customFixture(t testing.TB, helper string, opts Options, pendTimeout time.Duration, policy func(fx *fixture, tx *engine.Txn) error) *fixture {
	d := loadDatapath(t)
	fx := &fixture{dp: d, held: make(chan *engine.Pend, 4096)}
	fx.eng = engine.New(engine.Options{PendTimeout: pendTimeout})
	fx.cg = testutil.NewCgroup(t)
	fx.h = testutil.StartHelper(t, fx.cg, helper)
	if line, err := fx.h.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		t.Fatalf("helper: %q %v", line, err)
	}
	if err := fx.eng.Update(func(tx *engine.Txn) error { return policy(fx, tx) }); err != nil {
		t.Fatal(err)
	}
	pol, err := ebpf.Compile(fx.eng.View())
	if err != nil {
		t.Fatal(err)
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
	fx.netns, err = os.Open(fmt.Sprintf("/proc/%d/ns/net", fx.h.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	opts.NetNS = int(fx.netns.Fd())
	fx.path, err = Start(fx.eng, d, opts)
	if err != nil {
		testutil.Unavailable(t, err)
	}
	t.Cleanup(func() {
		fx.path.Close()
		fx.netns.Close()
	})
	return fx
}

// TestRunTimeRedirectChain: a Go callout's redirect at CONNECT_REDIRECT,
// inline (A) and pended (B), carried out on real sockets: the client's
// connection reaches proxy A, whose onward connection (with its records)
// reaches proxy B, whose onward connection reaches the origin — never a
// loop. Each proxy reads records, context and original destination
// through the proxy API, and SO_ORIGINAL_DST; the client's getpeername is
// the origin. Before EnableRedirects the redirect is refused.
func TestRunTimeRedirectChain(t *testing.T) {
	fx, handles := redirectFixture(t, Options{})
	pol, err := ebpf.Compile(fx.eng.View())
	if err != nil || !pol.CalloutRedirects() {
		t.Fatalf("Compile: the policy's Go callouts at CONNECT_REDIRECT not reported (%v)", err)
	}
	f := fx.call(t, "get "+strconv.Itoa(portOrigin))
	if f[0] != "error" || fx.path.Stats().Redirects == 0 {
		t.Fatalf("redirects not enabled: got %v (stats %+v), want the connection refused and counted", f, fx.path.Stats())
	}
	if err := fx.path.EnableRedirects(); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		line, err := fx.h.Call([]byte("get " + strconv.Itoa(portOrigin)))
		if err != nil {
			t.Fatal(err)
		}
		got := strings.TrimSpace(string(line))
		want := fmt.Sprintf(`200 127.0.0.1:%d "origin via=A:orig=127.0.0.1:%[1]d:records=1:context=127.0.0.1:%[1]d,B:orig=127.0.0.1:%[1]d:records=2:context=127.0.0.1:%[1]d"`, portOrigin)
		if got != want {
			t.Fatalf("run %d: client got\n%s\nwant\n%s", i, got, want)
		}
	}
	// curl, an unmodified client, through the same chain.
	if line, err := fx.h.Call([]byte("curl " + strconv.Itoa(portOrigin))); err != nil ||
		!strings.HasPrefix(string(line), "0 ") || !strings.Contains(string(line), "via=A:orig=127.0.0.1:8200:records=1") || !strings.Contains(string(line), ",B:orig=127.0.0.1:8200:records=2") {
		t.Fatalf("curl: %q %v", line, err)
	}
	st := fx.path.Stats()
	t.Logf("stats %+v", st)
	// Per request: the client's flow (to A), A's (to B), B's (through).
	if st.Redirected != 8 || st.Pended < 4 {
		t.Fatalf("stats %+v: want 8 redirects carried out (2 per request), 4 pended (B's)", st)
	}
	for _, h := range handles {
		fx.eng.RedirectHandleDestroy(h)
	}
	fx.checkClean(t)
}

// An unprivileged program in the hooked cgroup cannot claim a Go callout's
// redirect records on its own socket (setsockopt(SOL_FWP) naming the
// callout's handle: only the redirect's target process or root may), so
// it cannot pass itself off as the callout's proxy to escape the redirect;
// root can.
func TestRunTimeRedirectRecordsNeedTarget(t *testing.T) {
	if _, err := exec.LookPath("socat"); err != nil {
		testutil.Unavailable(t, err)
	}
	fx, handles := redirectFixture(t, Options{Redirects: true})
	uid, gid := newUser(t)
	h := ebpf.KernelRedirectHandle(handles[0])
	data := fmt.Sprintf("x6677706b%02x%02x%02x%02x", byte(h), byte(h>>8), byte(h>>16), byte(h>>24))
	arg := fmt.Sprintf("TCP4:127.0.0.1:%d,setsockopt-bin=%d:1:%s", portOrigin, 0x667770, data)
	line := must(fx.h.Call([]byte("as " + uid + " " + gid + " socat -u OPEN:/dev/null " + arg)))
	if !strings.Contains(string(line), "Permission denied") {
		t.Fatalf("unprivileged setsockopt(SOL_FWP) naming a Go callout's redirect: %s; want EACCES", line)
	}
	line = must(fx.h.Call([]byte("as 0 0 socat -u OPEN:/dev/null " + arg)))
	if !strings.HasPrefix(string(line), "0 ") {
		t.Fatalf("root's setsockopt(SOL_FWP) naming a Go callout's redirect: %s; want it accepted", line)
	}
	for _, hd := range handles {
		fx.eng.RedirectHandleDestroy(hd)
	}
	fx.checkClean(t)
}

// TestRunTimeRedirectV6: the same through CONNECT_REDIRECT_V6 and the ip6
// table: curl to [::1]:portRedirectSoak (nothing listens) reaches the
// helper's server on [::1]:portKernel only if the Go callout's redirect is
// carried out.
func TestRunTimeRedirectV6(t *testing.T) {
	var h engine.RedirectHandle
	fx := customFixture(t, "client", Options{Redirects: true}, 5*time.Second, func(fx *fixture, tx *engine.Txn) error {
		h = fx.eng.RedirectHandleCreate("v6")
		cr := &engine.ConnectRedirect{Handle: h, Target: func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
			return engine.RedirectTarget{To: netip.MustParseAddrPort("[::1]:" + strconv.Itoa(portKernel))}, true
		}}
		if err := fx.eng.RegisterCallout("v6.redirect", cr.Registration()); err != nil {
			return err
		}
		co, err := tx.AddCallout(engine.Callout{Key: "v6.redirect", Layer: engine.LayerALEConnectRedirectV6})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEConnectRedirectV6,
			Conditions: []engine.Condition{
				{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
				{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(portRedirectSoak)},
			},
			Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}})
		return err
	})
	start := time.Now()
	r := fx.curl(t, portRedirectSoak, "[::1]")
	t.Logf("curl %+v in %v", r, time.Since(start))
	if r.exit != 0 || r.code != 200 {
		t.Fatalf("v6 curl through a run-time redirect: %+v, want 200", r)
	}
	if st := fx.path.Stats(); st.Redirected != 1 {
		t.Fatalf("stats %+v: want one redirect", st)
	}
	fx.eng.RedirectHandleDestroy(h)
	fx.checkClean(t)
}
