//go:build linux

package main_test

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"fwp/client"
	"fwp/datapath/linux/ebpf"
	"fwp/internal/testutil"
	"fwp/proxy"
)

// nobody is the uid and gid the query helper drops to: a proxy that cannot
// open the kernel datapath's maps and asks fwpd instead.
const nobody = 65534

// queryPolicy redirects TCP to 127.0.0.1:8080 to the proxy on 3128 with
// the helper as target (context "secret"), and 8081 there too with another
// process (the test) as target.
func queryPolicy(helperPID, otherPID int) string {
	cfg := func(pid int, ctx string) string {
		return strconv.Quote(fmt.Sprintf(`{"proxy":"127.0.0.1:3128","target_pid":%d%s}`, pid, ctx))
	}
	return fmt.Sprintf(`providers:
  - {key: acme, name: ACME}
provider_contexts:
  - {key: to-me, provider: acme, data: %s}
  - {key: to-other, provider: acme, data: %s}
callouts:
  - {key: fwp.builtin.connect_redirect/acme, provider: acme, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
filters:
  - {key: to-me, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect/acme, provider_context: to-me, conditions: [{field: ip_remote_port, match: equal, value: 8080}]}
  - {key: to-other, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect/acme, provider_context: to-other, conditions: [{field: ip_remote_port, match: equal, value: 8081}]}
`, cfg(helperPID, `,"context":"c2VjcmV0"`), cfg(otherPID, ""))
}

// queryResult is the helper's answer to "query PORT".
type queryResult struct {
	UID            int
	Context        string
	Records        int    // bytes of records
	CtxErr, RecErr string // "", "access_denied", "not_found" or the error
}

// TestE2EKernelProxyQueryThroughDaemon: a proxy running as nobody, which
// cannot open the pinned maps, registers client.ProxyBackend and gets its
// connection's context and records from fwpd when it is the redirect
// target; a typed permission error when another process is; not found for
// a connection that was not redirected.
func TestE2EKernelProxyQueryThroughDaemon(t *testing.T) {
	testutil.RequireRoot(t)
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	d := startKernelDaemon(t, cg, dir)
	// nobody must reach the socket (itself 0666) through the test's directory.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	h := testutil.StartHelper(t, cg, "kqproxy", d.sock)
	s := &scenario{t: t, h: h}
	pid, err := strconv.Atoi(strings.TrimSpace(string(s.call("pid"))))
	if err != nil {
		t.Fatal(err)
	}
	if errs, code := d.apply(t, queryPolicy(pid, os.Getpid())); code != 0 {
		t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
	}
	query := func(port int) queryResult {
		var r queryResult
		if err := json.Unmarshal(s.call("query "+strconv.Itoa(port)), &r); err != nil {
			t.Fatal(err)
		}
		if r.UID != nobody {
			t.Fatalf("the helper runs as uid %d, want %d", r.UID, nobody)
		}
		return r
	}
	if r := query(8080); r.CtxErr != "" || r.RecErr != "" || r.Context != "secret" || r.Records == 0 {
		t.Errorf("the redirect target: %+v; want context \"secret\" and records", r)
	}
	if r := query(8081); r.CtxErr != "access_denied" || r.RecErr != "access_denied" || r.Context != "" {
		t.Errorf("another process's redirect: %+v; want access_denied for both", r)
	}
	if r := query(3128); r.CtxErr != "not_found" || r.RecErr != "not_found" {
		t.Errorf("a connection not redirected: %+v; want not_found for both", r)
	}

	// The proxy puts the records on its outbound dialer through fwpd: the
	// connection to the original destination reaches the origin instead of
	// being redirected back to the proxy.
	var rr relayResult
	if err := json.Unmarshal(s.call("relay 8080"), &rr); err != nil {
		t.Fatal(err)
	}
	if rr.Err != "" || !rr.Origin || rr.ProxyAccepts != 1 {
		t.Errorf("relay through a proxy without root: %+v; want the origin reached and exactly 1 proxy accept", rr)
	}
	// Another non-root process, not the redirect's target, may not let its
	// socket escape the redirect with the same records.
	recs := strings.TrimSpace(string(s.call("records 8080")))
	other := &scenario{t: t, h: testutil.StartHelper(t, cg, "kqproxy", d.sock)}
	if got := strings.TrimSpace(string(other.call("set " + recs))); got != "access_denied" {
		t.Errorf("SetRedirectRecords by a process that is not the target: %q; want access_denied", got)
	}
	if got := strings.TrimSpace(string(s.call("set 00"))); got != "invalid_argument" {
		t.Errorf("SetRedirectRecords with bytes that are not records: %q; want invalid_argument", got)
	}
}

// relayResult is the helper's answer to "relay PORT".
type relayResult struct {
	ProxyAccepts int  // connections the proxy accepted (1: no loop)
	Origin       bool // the origin accepted the proxy's outbound connection
	Err          string
}

// TestE2EQueryRedirectWithoutKernel: without a kernel datapath the query
// says so with a typed error.
func TestE2EQueryRedirectWithoutKernel(t *testing.T) {
	d := startDaemon(t, shortDir(t))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := client.Dial(ctx, d.sock, client.Options{Name: "query"})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	local, remote := netipAP(t, "127.0.0.1:3128"), netipAP(t, "127.0.0.1:40000")
	if _, _, err := cl.QueryRedirect(ctx, local, remote); !errors.Is(err, proxy.ErrNotSupported) {
		t.Fatalf("QueryRedirect with --datapath none: %v; want proxy.ErrNotSupported", err)
	}
	dl := &net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
		return client.ProxyBackend{C: cl}.SetRecords(network, address, c, ebpf.EncodeRecords([]uint32{1}))
	}}
	if _, err := dl.DialContext(ctx, "tcp4", "127.0.0.1:1"); !errors.Is(err, proxy.ErrNotSupported) {
		t.Fatalf("SetRecords with --datapath none: %v; want proxy.ErrNotSupported", err)
	}
}

// kqproxyHelper: listens on 127.0.0.1:3128 (the proxy) and 8080 (the
// origin), drops to nobody, connects to fwpd at args[0] and registers
// client.ProxyBackend. "query PORT" connects to 127.0.0.1:PORT, accepts the
// connection on 3128 and answers what the proxy package returns for it;
// "records PORT" answers the records in hex; "relay PORT" proxies such a
// connection to the origin with the records set; "set HEX" dials with those
// records set and answers the error kind.
func kqproxyHelper(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: kqproxy SOCKET")
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:3128")
	if err != nil {
		return err
	}
	origin, err := net.Listen("tcp4", "127.0.0.1:8080")
	if err != nil {
		return err
	}
	// Go applies these to every thread of the process.
	if err := syscall.Setgroups(nil); err != nil {
		return err
	}
	if err := syscall.Setgid(nobody); err != nil {
		return err
	}
	if err := syscall.Setuid(nobody); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	cl, err := client.Dial(ctx, args[0], client.Options{Name: "kqproxy"})
	cancel()
	if err != nil {
		return err
	}
	defer cl.Close()
	defer proxy.Register(client.ProxyBackend{C: cl})()
	kind := func(err error) string {
		switch {
		case err == nil:
			return ""
		case errors.Is(err, proxy.ErrAccessDenied):
			return "access_denied"
		case errors.Is(err, proxy.ErrNotFound):
			return "not_found"
		case errors.Is(err, proxy.ErrInvalidArgument):
			return "invalid_argument"
		}
		return err.Error()
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd, arg, _ := strings.Cut(in.Text(), " ")
		switch cmd {
		case "pid":
			fmt.Println(os.Getpid())
		case "query":
			c, a, err := dialAccept(ln, arg)
			if err != nil {
				return err
			}
			ctxBytes, cerr := proxy.QueryRedirectContext(a)
			recs, rerr := proxy.QueryRedirectRecords(a)
			c.Close()
			a.Close()
			b, _ := json.Marshal(queryResult{UID: os.Getuid(), Context: string(ctxBytes), Records: len(recs), CtxErr: kind(cerr), RecErr: kind(rerr)})
			fmt.Println(string(b))
		case "records":
			c, a, err := dialAccept(ln, arg)
			if err != nil {
				return err
			}
			recs, err := proxy.QueryRedirectRecords(a)
			c.Close()
			a.Close()
			if err != nil {
				return err
			}
			fmt.Println(hex.EncodeToString(recs))
		case "set":
			recs, err := hex.DecodeString(arg)
			if err != nil {
				return err
			}
			dl := &net.Dialer{Timeout: 5 * time.Second}
			err = proxy.SetRedirectRecords(dl, recs)
			if err == nil {
				var c net.Conn
				if c, err = dl.Dial("tcp4", "127.0.0.1:8080"); err == nil {
					c.Close()
				}
			}
			fmt.Println(kind(err))
		case "relay":
			r, err := relay(ln, origin, arg)
			if err != nil {
				r.Err = kind(err)
			}
			b, _ := json.Marshal(r)
			fmt.Println(string(b))
		default:
			return fmt.Errorf("unknown request %q", cmd)
		}
	}
	return nil
}

func netipAP(t *testing.T, s string) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// relay connects to 127.0.0.1:port (redirected to the proxy ln), accepts
// it, and dials the original destination again with the accepted
// connection's records set, as a proxy does; it counts what the proxy and
// the origin accepted.
func relay(ln, origin net.Listener, port string) (relayResult, error) {
	var r relayResult
	c, a, err := dialAccept(ln, port)
	if err != nil {
		return r, err
	}
	defer c.Close()
	defer a.Close()
	r.ProxyAccepts++
	recs, err := proxy.QueryRedirectRecords(a)
	if err != nil {
		return r, err
	}
	dl := &net.Dialer{Timeout: 5 * time.Second}
	if err := proxy.SetRedirectRecords(dl, recs); err != nil {
		return r, err
	}
	out, err := dl.Dial("tcp4", "127.0.0.1:"+port)
	if err != nil {
		return r, err
	}
	defer out.Close()
	// A loop would land on the proxy again: both listeners get a bounded
	// wait, the origin's long enough for a connection already made.
	origin.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	if o, err := origin.Accept(); err == nil {
		r.Origin = o.RemoteAddr().String() == out.LocalAddr().String()
		o.Close()
	}
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(200 * time.Millisecond))
	if x, err := ln.Accept(); err == nil {
		r.ProxyAccepts++
		x.Close()
	}
	ln.(*net.TCPListener).SetDeadline(time.Time{})
	return r, nil
}

// dialAccept connects to 127.0.0.1:port, which the policy redirects to the
// proxy listening on ln, and accepts the connection there.
func dialAccept(ln net.Listener, port string) (c, a net.Conn, err error) {
	if c, err = net.DialTimeout("tcp4", "127.0.0.1:"+port, 5*time.Second); err != nil {
		return nil, nil, err
	}
	if a, err = ln.Accept(); err != nil {
		c.Close()
		return nil, nil, err
	}
	return c, a, nil
}
