package main_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"fwp/client"
	"fwp/mgmt"
)

// The end-to-end tests build the real fwpd and fwpctl and drive them.

var bins struct{ fwpd, fwpctl, redirectproxy, soakclient string }

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "fwpbin")
	if err != nil {
		panic(err)
	}
	bins.fwpd, bins.fwpctl, bins.redirectproxy = filepath.Join(dir, "fwpd"), filepath.Join(dir, "fwpctl"), filepath.Join(dir, "redirectproxy")
	bins.soakclient = filepath.Join(dir, "soakclient")
	for _, b := range []struct{ out, pkg string }{{bins.fwpd, "fwp/cmd/fwpd"}, {bins.fwpctl, "fwp/cmd/fwpctl"}, {bins.redirectproxy, "fwp/examples/redirectproxy"},
		{bins.soakclient, "fwp/cmd/fwpd/internal/soakclient"}} {
		if out, err := exec.Command("go", "build", "-o", b.out, b.pkg).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", b.pkg, err, out)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type daemon struct {
	t           *testing.T
	sock, state string
	cmd         *exec.Cmd
	log         *syncBuffer
}

// syncBuffer is the daemon's stderr, read while exec's goroutine writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func shortDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "fwpe2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func startDaemon(t *testing.T, dir string, args ...string) *daemon {
	t.Helper()
	d := &daemon{t: t, sock: filepath.Join(dir, "fwpd.sock"), state: filepath.Join(dir, "state"), log: &syncBuffer{}}
	d.cmd = exec.Command(bins.fwpd, append([]string{"--socket", d.sock, "--state-dir", d.state, "--txn-timeout", "2s", "--datapath", "none"}, args...)...)
	d.cmd.Stderr = d.log
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.cmd.Process.Kill(); d.cmd.Wait() })
	// Loading the kernel datapath verifies ~930k instructions: seconds on a
	// busy 2-vCPU machine.
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := os.Stat(d.sock); err == nil && strings.Contains(d.log.String(), "fwpd listening") {
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("fwpd did not start:\n%s", d.log)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (d *daemon) stop(sig syscall.Signal) {
	d.cmd.Process.Signal(sig)
	d.cmd.Wait()
}

// ctl runs fwpctl and returns its stdout, stderr and exit code.
func (d *daemon) ctl(args ...string) (string, string, int) {
	var out, errb bytes.Buffer
	cmd := exec.Command(bins.fwpctl, args...)
	cmd.Env = append(os.Environ(), "FWPD_SOCKET="+d.sock)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out.String(), errb.String(), ee.ExitCode()
	}
	if err != nil {
		d.t.Fatal(err)
	}
	return out.String(), errb.String(), 0
}

func (d *daemon) mustCtl(args ...string) string {
	d.t.Helper()
	out, errs, code := d.ctl(args...)
	if code != 0 {
		d.t.Fatalf("fwpctl %v: exit %d: %s", args, code, errs)
	}
	return out
}

func (d *daemon) filterKeys() []string {
	d.t.Helper()
	var fs []mgmt.Filter
	if err := json.Unmarshal([]byte(d.mustCtl("filter", "list", "-o", "json")), &fs); err != nil {
		d.t.Fatal(err)
	}
	var keys []string
	for _, f := range fs {
		keys = append(keys, f.Key)
	}
	return keys
}

const policyYAML = `lifetime: persistent
providers:
  - {key: acme, name: ACME}
sublayers:
  - {key: acme-sub, provider: acme, weight: 100}
filters:
  - key: block-telnet
    layer: ALE_AUTH_CONNECT_V4
    sublayer: acme-sub
    conditions:
      - {field: ip_remote_port, value: 23}
    action: block
  - key: permit-web
    layer: ALE_AUTH_CONNECT_V4
    sublayer: acme-sub
    weight: index:3
    conditions:
      - {field: ip_remote_port, match: range, value: 80-443}
      - {field: ip_remote_address, value: 10.0.0.0/8}
    action: permit
  - key: temp
    lifetime: static
    layer: ALE_AUTH_CONNECT_V4
    action: block
    conditions:
      - {field: ip_remote_port, value: 9}
`

func write(t *testing.T, dir, name, s string) string {
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestE2EApplyListExplainRestart(t *testing.T) {
	dir := shortDir(t)
	d := startDaemon(t, dir)
	d.mustCtl("apply", "-f", write(t, dir, "policy.yaml", policyYAML))
	if got := strings.Join(d.filterKeys(), ","); got != "permit-web,block-telnet,temp" {
		t.Fatalf("filters (evaluation order): %s", got)
	}
	var x client.Explanation
	out := d.mustCtl("explain", "--layer", "ALE_AUTH_CONNECT_V4", "--remote", "10.1.2.3:23", "--local", "10.0.0.1:40000", "--proto", "tcp", "--app", "/usr/bin/telnet", "--uid", "1000", "-o", "json")
	if err := json.Unmarshal([]byte(out), &x); err != nil || x.FilterKey != "block-telnet" || x.Action != "block" || len(x.Steps) == 0 {
		t.Fatalf("explain: %+v %v\n%s", x, err, out)
	}
	if out := d.mustCtl("explain", "--layer", "ALE_AUTH_CONNECT_V4", "--remote", "10.1.2.3:443"); !strings.Contains(out, "by filter permit-web") {
		t.Fatalf("explain table:\n%s", out)
	}

	// Bad input: each a typed, positioned error; nothing half-applied.
	before := strings.Join(d.filterKeys(), ",")
	bad := map[string]string{
		"syntax.yaml":   "filters:\n  - key: [\n",
		"type.yaml":     "filters:\n  - {key: a, layer: ALE_AUTH_CONNECT_V4, action: block}\n  - key: b\n    layer: ALE_AUTH_CONNECT_V4\n    action: block\n    conditions: [{field: ip_remote_port, value: not-a-port}]\n",
		"layer.yaml":    "filters:\n  - {key: a, layer: ALE_AUTH_CONNECT_V4, action: block}\n  - {key: b, layer: ALE_NOPE, action: block}\n",
		"ref.yaml":      "filters:\n  - {key: a, layer: ALE_AUTH_CONNECT_V4, action: block}\n  - {key: b, layer: ALE_AUTH_CONNECT_V4, action: block, sublayer: nope}\n",
		"lifetime.yaml": "sublayers: [{key: s2, lifetime: static}]\nfilters:\n  - {key: a, layer: ALE_AUTH_CONNECT_V4, action: block, sublayer: s2, lifetime: persistent}\n",
		"dup.yaml":      "filters:\n  - {key: a, layer: ALE_AUTH_CONNECT_V4, action: block}\n  - {key: block-telnet, layer: ALE_AUTH_CONNECT_V4, action: block}\n",
	}
	wantLine := map[string]string{"syntax.yaml": ":2:", "type.yaml": ":6:", "layer.yaml": ":3:", "ref.yaml": ":3:", "lifetime.yaml": ":3:", "dup.yaml": ":3:"}
	for name, src := range bad {
		_, errs, code := d.ctl("apply", "-f", write(t, dir, name, src))
		if code != 1 || !strings.Contains(errs, name+wantLine[name]) {
			t.Errorf("%s: exit %d, stderr %q", name, code, errs)
		}
	}
	if after := strings.Join(d.filterKeys(), ","); after != before {
		t.Fatalf("bad policy changed state: %s → %s", before, after)
	}
	if _, errs, code := d.ctl("filter", "add", "--key", "x", "--layer", "ALE_AUTH_CONNECT_V4", "--action", "block", "--cond", "ip_remote_port=http"); code != 1 || !strings.Contains(errs, "invalid value") {
		t.Fatalf("bad cond: %d %s", code, errs)
	}
	if _, _, code := d.ctl("filter", "add", "--action", "block"); code != 2 {
		t.Fatalf("usage error exit %d", code)
	}
	if _, errs, code := d.ctl("sublayer", "delete", "acme-sub"); code != 1 || !strings.Contains(errs, "in use") {
		t.Fatalf("delete referenced: %d %s", code, errs)
	}

	// A dynamic session's filter, held by this test process.
	ctx := context.Background()
	c, err := client.Dial(ctx, d.sock, client.Options{Name: "e2e", Dynamic: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Add(ctx, mgmt.Object{Filter: &mgmt.Filter{Key: "dyn", Layer: "ALE_AUTH_CONNECT_V4", Action: "block"}}); err != nil {
		t.Fatal(err)
	}
	var ss []mgmt.SessionInfo
	json.Unmarshal([]byte(d.mustCtl("sessions", "-o", "json")), &ss)
	if len(ss) != 2 || ss[0].Name != "e2e" || !ss[0].Dynamic {
		t.Fatalf("sessions: %+v", ss)
	}
	// Restart: persistent filters come back; static and dynamic do not.
	start := time.Now()
	d.stop(syscall.SIGTERM)
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("graceful shutdown with a session open took %v", took)
	}
	c.Close()
	if !strings.Contains(d.log.String(), "shutting down") {
		t.Fatalf("no graceful shutdown:\n%s", d.log)
	}
	d = startDaemon(t, dir)
	if got := strings.Join(d.filterKeys(), ","); got != "permit-web,block-telnet" {
		t.Fatalf("after restart: %s", got)
	}
	var prov mgmt.Provider
	if err := json.Unmarshal([]byte(d.mustCtl("provider", "show", "acme", "-o", "json")), &prov); err != nil || prov.Lifetime != mgmt.LifetimePersistent {
		t.Fatalf("provider after restart: %+v %v", prov, err)
	}
}

// TestE2EKillDuringCommit kills fwpd with SIGKILL while it commits 10,000
// persistent filters, restarts it, and checks the state is all or none.
func TestE2EKillDuringCommit(t *testing.T) {
	dir := shortDir(t)
	const n = 10000
	var ops []mgmt.Op
	for i := range n {
		ops = append(ops, mgmt.Op{Add: &mgmt.Object{Filter: &mgmt.Filter{Key: fmt.Sprint("big-", i), Layer: "ALE_AUTH_CONNECT_V4",
			Action: "block", Lifetime: mgmt.LifetimePersistent,
			Conditions: []mgmt.Condition{{Field: "ip_remote_port", Match: "equal", Value: fmt.Sprint(i%60000 + 1)}}}}})
	}
	seenBefore, seenAfter := 0, 0
	var full time.Duration // how long the whole apply takes, from round 0
	for round, frac := range []float64{-2, -1, 0, 0.25, 0.5, 0.75, 0.9, 1} {
		d := startDaemon(t, dir)
		existing := len(d.filterKeys())
		c, err := client.Dial(context.Background(), d.sock, client.Options{Name: "big"})
		if err != nil {
			t.Fatal(err)
		}
		if existing == n {
			// The previous round committed: start again from nothing.
			var del []mgmt.Op
			for i := range n {
				del = append(del, mgmt.Op{Delete: &mgmt.Ref{Kind: mgmt.KindFilter, Key: fmt.Sprint("big-", i)}})
			}
			if _, err := c.Apply(context.Background(), del); err != nil {
				t.Fatal(err)
			}
		}
		// The store's journal before this commit: it grows when the commit
		// is appended (or a compaction's temporary snapshot appears).
		journal := filepath.Join(d.state, "policy.journal")
		var before int64
		if fi, err := os.Stat(journal); err == nil {
			before = fi.Size()
		}
		done := make(chan error, 1)
		start := time.Now()
		go func() { _, err := c.Apply(context.Background(), ops); done <- err }()
		var applyErr error
		switch {
		case frac == -2:
			// Let it finish: the kill comes after the commit.
			applyErr = <-done
			full = time.Since(start)
			done <- applyErr
		case frac == -1:
			// Kill the moment the store's write shows: in the middle of
			// the commit's append (or its compaction).
			tmp := filepath.Join(d.state, "policy.json.tmp")
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Microsecond) {
				if fi, err := os.Stat(journal); err == nil && fi.Size() != before {
					break
				}
				if _, err := os.Stat(tmp); err == nil {
					break
				}
			}
		default:
			time.Sleep(time.Duration(frac * float64(full)))
		}
		d.stop(syscall.SIGKILL)
		applyErr = <-done
		c.Drop()
		d = startDaemon(t, dir)
		got := len(d.filterKeys())
		switch got {
		case 0:
			seenBefore++
		case n:
			seenAfter++
		default:
			t.Fatalf("round %d: %d of %d filters after kill -9: half a commit", round, got, n)
		}
		if frac == -2 && (applyErr != nil || got != n) {
			t.Fatalf("a completed commit did not survive kill -9: %v, %d filters", applyErr, got)
		}
		if applyErr == nil && got != n {
			t.Fatalf("round %d: the client was told the commit succeeded, but it is gone", round)
		}
		d.stop(syscall.SIGTERM)
	}
	t.Logf("apply of %d filters took %v; state after kill: before the commit %d times, after it %d times", n, full, seenBefore, seenAfter)
}

func TestE2EPermissionDenied(t *testing.T) {
	dir := shortDir(t)
	// Root is not an administrator here and the admin group is one the
	// test does not belong to: fwpd must refuse writes on SO_PEERCRED.
	// The test's group is a reader group: reads pass.
	d := startDaemon(t, dir, "--no-root-admin", "--admin-group", fmt.Sprint(os.Getgid()+4242), "--reader-group", fmt.Sprint(os.Getgid()))
	_, errs, code := d.ctl("provider", "add", "--key", "p")
	if code != 3 || !strings.Contains(errs, "access denied") {
		t.Fatalf("write: exit %d %s", code, errs)
	}
	if _, errs, code := d.ctl("apply", "-f", write(t, dir, "p.yaml", policyYAML)); code != 3 {
		t.Fatalf("apply: exit %d %s", code, errs)
	}
	d.mustCtl("provider", "list")
	if keys := d.filterKeys(); len(keys) != 0 {
		t.Fatalf("refused writes changed state: %v", keys)
	}
}

func TestE2EOversizedAndUnavailable(t *testing.T) {
	dir := shortDir(t)
	d := startDaemon(t, dir, "--max-msg-bytes", "65536")
	big := "filters:\n" + strings.Repeat("  - {key: k, layer: ALE_AUTH_CONNECT_V4, action: block}\n", 3000)
	if _, errs, code := d.ctl("apply", "-f", write(t, dir, "big.yaml", big)); code != 1 || !strings.Contains(errs, "larger than max") {
		t.Fatalf("oversized: exit %d %s", code, errs)
	}
	d.mustCtl("filter", "list") // still serving
	d.stop(syscall.SIGTERM)
	if _, _, code := d.ctl("filter", "list"); code != 4 {
		t.Fatalf("no daemon: exit %d", code)
	}
}

func TestE2EMetrics(t *testing.T) {
	dir := shortDir(t)
	d := startDaemon(t, dir, "--metrics-addr", "127.0.0.1:0")
	d.mustCtl("filter", "add", "--key", "f", "--layer", "ALE_AUTH_CONNECT_V4", "--action", "block")
	const mark = `msg="metrics listening" addr=`
	log := d.log.String()
	i := strings.Index(log, mark)
	if i < 0 {
		t.Fatalf("no metrics address in the log:\n%s", log)
	}
	addr := strings.Fields(log[i+len(mark):])[0]
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{`fwp_filters{layer="ALE_AUTH_CONNECT_V4"} 1`, "fwp_commit_duration_seconds_count", "fwp_pends_outstanding 0"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// TestE2EMetricsToken: with --metrics-token-file, /metrics answers only
// the bearer of the file's token; fwpd refuses to start on a token file
// others can read, naming it.
func TestE2EMetricsToken(t *testing.T) {
	dir := shortDir(t)
	tokFile := filepath.Join(dir, "metrics.token")
	if err := os.WriteFile(tokFile, []byte("e2e-token-0123456789abcdef\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bins.fwpd, "--socket", filepath.Join(dir, "s"), "--state-dir", filepath.Join(dir, "st"), "--datapath", "none",
		"--metrics-addr", "127.0.0.1:0", "--metrics-token-file", tokFile).CombinedOutput()
	if err == nil || !strings.Contains(string(out), tokFile) || !strings.Contains(string(out), "readable by others") {
		t.Fatalf("fwpd with a world-readable token file: %v\n%s", err, out)
	}
	if err := os.Chmod(tokFile, 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, dir, "--metrics-addr", "127.0.0.1:0", "--metrics-token-file", tokFile)
	const mark = `msg="metrics listening" addr=`
	log := d.log.String()
	i := strings.Index(log, mark)
	if i < 0 {
		t.Fatalf("no metrics address in the log:\n%s", log)
	}
	addr := strings.Fields(log[i+len(mark):])[0]
	for auth, want := range map[string]int{"": 401, "Bearer nope": 401, "Bearer e2e-token-0123456789abcdef": 200} {
		req, _ := http.NewRequest("GET", "http://"+addr+"/metrics", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("/metrics with %q: %d, want %d", auth, resp.StatusCode, want)
		}
	}
}

func TestE2EHelp(t *testing.T) {
	d := &daemon{t: t, sock: "/nonexistent"}
	for _, args := range [][]string{{"help", "apply"}, {"layers", "--help"}, {"apply", "--help"}, {"explain", "--help"}, {"events", "--help"},
		{"sessions", "--help"}, {"watch", "--help"}, {"filter", "--help"}, {"filter", "add", "--help"}, {"provider", "list", "--help"},
		{"sublayer", "show", "--help"}, {"callout", "delete", "--help"}, {"context", "add", "--help"}} {
		out, errs, code := d.ctl(args...)
		if code != 0 || !strings.Contains(out, "usage: fwpctl") {
			t.Errorf("%v: exit %d %q %q", args, code, out, errs)
		}
	}
	if _, _, code := d.ctl("bogus"); code != 2 {
		t.Errorf("unknown command: exit %d", code)
	}
	out := d.mustCtl("layers")
	if !strings.HasPrefix(out, "ID  LAYER") || !strings.Contains(out, "ALE_AUTH_CONNECT_V4") {
		t.Errorf("layers:\n%s", out)
	}
	if out, err := exec.Command(bins.fwpd, "--help").CombinedOutput(); err != nil || !strings.Contains(string(out), "state-dir") {
		t.Errorf("fwpd --help: %v\n%s", err, out)
	}
}
