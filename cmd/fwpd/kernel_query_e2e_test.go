//go:build linux

package main_test

import (
	"bufio"
	"context"
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
}

// kqproxyHelper: listens on 127.0.0.1:3128, drops to nobody, connects to
// fwpd at args[0] and registers client.ProxyBackend. "query PORT" connects
// to 127.0.0.1:PORT, accepts the connection on 3128 and answers what the
// proxy package returns for it.
func kqproxyHelper(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: kqproxy SOCKET")
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:3128")
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
			c, err := net.DialTimeout("tcp4", "127.0.0.1:"+arg, 5*time.Second)
			if err != nil {
				return err
			}
			a, err := ln.Accept()
			if err != nil {
				return err
			}
			ctxBytes, cerr := proxy.QueryRedirectContext(a)
			recs, rerr := proxy.QueryRedirectRecords(a)
			c.Close()
			a.Close()
			b, _ := json.Marshal(queryResult{UID: os.Getuid(), Context: string(ctxBytes), Records: len(recs), CtxErr: kind(cerr), RecErr: kind(rerr)})
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
