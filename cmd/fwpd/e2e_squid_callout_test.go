//go:build linux

// (Named to sort before kernel_e2e_test.go, whose init runs the helpers.)

package main_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"fwp/client"
	"fwp/engine"
	"fwp/internal/testutil"
)

func init() {
	testutil.RegisterHelper("squidredir", squidRedirHelper)
}

// squidCalloutPolicy hands TCP port 80 to a Go callout at
// CONNECT_REDIRECT_V4; the callout (a callout program: the test) chooses
// squid's intercept port at run time.
const squidCalloutPolicy = `lifetime: persistent
providers:
  - {key: acme, name: ACME}
callouts:
  - {key: squid-go-redirect, provider: acme, layer: ALE_CONNECT_REDIRECT_V4}
filters:
  - key: http4-to-squid-by-go
    layer: ALE_CONNECT_REDIRECT_V4
    conditions: [{field: ip_remote_port, match: equal, value: 80}, {field: ip_protocol, match: equal, value: 6}]
    action: callout_unknown
    callout: squid-go-redirect
`

// squidRedirHelper runs in squid's cgroup and a new network namespace:
// the origin on 127.0.0.1:80 and squid (args[1], files in args[2]) in
// intercept mode; then, one line at a time, "curl" runs curl in the
// clients' cgroup (args[0]) with a forged, unresolvable Host header, and
// "log" waits (bounded) for squid's access-log line.
func squidRedirHelper(args []string) error {
	clientCg, squid, dir := args[0], args[1], args[2]
	ln, err := net.Listen("tcp", "127.0.0.1:80")
	if err != nil {
		return err
	}
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "origin 127.0.0.1:80 host=%s\n", r.Host)
	}))
	sq, err := spawn(spawnRequest{Argv: []string{squid, "-N", "-f", filepath.Join(dir, "squid.conf")}, Ready: "127.0.0.1:3141"})
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "cache.log"))
		return fmt.Errorf("%v\n%s", err, log)
	}
	defer sq.Process.Kill()
	cgdir, err := os.Open(clientCg)
	if err != nil {
		return err
	}
	defer cgdir.Close()
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch strings.TrimSpace(in.Text()) {
		case "":
		case "curl":
			cmd := exec.Command("curl", "-sS", "-i", "--max-time", "15", "-H", "Host: forged.invalid", "http://127.0.0.1:80/v4")
			cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgdir.Fd()), Pdeathsig: syscall.SIGKILL}
			out, err := cmd.CombinedOutput()
			if err != nil {
				out = append(out, "curl: "+err.Error()...)
			}
			fmt.Println(strconv.Quote(string(out)))
		case "log":
			var log []byte
			for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
				log, _ = os.ReadFile(filepath.Join(dir, "access.log"))
				if strings.Contains(string(log), "ORIGINAL_DST/") || time.Now().After(deadline) {
					break
				}
			}
			fmt.Println(strconv.Quote(string(log)))
		default:
			fmt.Println(`"unknown command"`)
		}
	}
	return in.Err()
}

// TestE2EKernelSquidThroughGoCallout: Debian's squid in intercept mode,
// unmodified, behind a redirect a Go callout chooses at run time (a
// callout program registered with fwpd over its callout socket): curl in
// the clients' cgroup connects to 127.0.0.1:80, the callout sends the flow
// to squid's intercept port, and squid, asking SO_ORIGINAL_DST, relays a
// request whose forged Host header resolves to nothing to the original
// destination. fwpd counts the redirect in /metrics.
func TestE2EKernelSquidThroughGoCallout(t *testing.T) {
	testutil.RequireRoot(t)
	squid, err := exec.LookPath("squid")
	if err != nil {
		if squid, err = exec.LookPath("/usr/sbin/squid"); err != nil {
			testutil.Unavailable(t, fmt.Errorf("squid is not installed (apt-get install squid): %w", err))
		}
	}
	requireTool(t, "curl")
	pu, err := user.Lookup("proxy")
	if err != nil {
		testutil.Unavailable(t, fmt.Errorf("squid's user: %w", err))
	}
	uid, _ := strconv.Atoi(pu.Uid)
	gid, _ := strconv.Atoi(pu.Gid)
	clients, squidCg := testutil.NewCgroup(t), testutil.NewCgroup(t)
	sqdir, err := os.MkdirTemp("", "fwpsquidgo")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sqdir) })
	if err := os.WriteFile(filepath.Join(sqdir, "squid.conf"), []byte(squidConf(sqdir)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sqdir, uid, gid); err != nil {
		t.Fatal(err)
	}
	dir := kernelDir(t)
	link := filepath.Join(dir, "netns")
	d := startKernelDaemon(t, clients, dir, "--proxy-cgroup", squidCg.Path, "--callout-netns", link, "--metrics-addr", "127.0.0.1:0")
	h := testutil.StartHelper(t, squidCg, "squidredir", clients.Path, squid, sqdir)
	if line, err := h.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		log, _ := os.ReadFile(filepath.Join(sqdir, "cache.log"))
		t.Fatalf("helper: %q %v\n%s\nsquid's cache.log:\n%s", line, err, h.Stderr(), log)
	}
	if err := os.Symlink(fmt.Sprintf("/proc/%d/ns/net", h.Pid()), link); err != nil {
		t.Fatal(err)
	}
	// The callout program: seed 001's connect-redirect recipe, inline,
	// choosing squid's intercept port for whatever the client asked.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var calls atomic.Int64
	cr := &engine.ConnectRedirect{Target: func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
		calls.Add(1)
		return engine.RedirectTarget{To: netip.MustParseAddrPort("127.0.0.1:3140")}, true
	}}
	rc, err := client.RegisterCallout(ctx, "squid-go-redirect", cr.Registration(), client.CalloutOptions{Socket: d.sock})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if cr.Handle, err = rc.RedirectHandleCreate(ctx); err != nil {
		t.Fatal(err)
	}
	if errs, code := d.apply(t, squidCalloutPolicy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	line, err := h.Call([]byte("curl"))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := strconv.Unquote(strings.TrimSpace(string(line)))
	if !strings.Contains(got, "origin 127.0.0.1:80 host=forged.invalid") || !strings.Contains(strings.ToLower(got), "via: 1.1") {
		t.Fatalf("curl got\n%s\nwant the origin's answer relayed by squid", got)
	}
	line, err = h.Call([]byte("log"))
	if err != nil {
		t.Fatal(err)
	}
	log, _ := strconv.Unquote(strings.TrimSpace(string(line)))
	if !strings.Contains(log, "ORIGINAL_DST/127.0.0.1") {
		t.Errorf("squid's access log does not show the request sent to its original destination:\n%s", log)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("the Go callout chose a proxy %d times, want once (squid's own connection is not in the clients' cgroup)", n)
	}
	if m := d.metrics(t); !strings.Contains(m, `fwp_callout_path_flows_total{outcome="redirected"} 1`) {
		t.Errorf("/metrics:\n%s\nwant one run-time redirect counted", grepLines(m, "fwp_callout_path"))
	}
}
