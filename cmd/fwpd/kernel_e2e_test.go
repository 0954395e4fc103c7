//go:build linux

package main_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"fwp/datapath/linux/ebpf"
	"fwp/internal/testutil"
	"fwp/internal/unix"
	"fwp/proxy"
)

// The kernel end-to-end tests run the real fwpd with the eBPF datapath on
// a child cgroup, apply policies with the real fwpctl, and drive real
// clients (curl, dig) from a helper process in that cgroup and a new
// network namespace, where fixed loopback ports are free:
//
//	:8080, :9090        HTTP origin servers (v4 and v6)
//	:3128               proxy on the proxy package (records + context)
//	:3129               proxy that only uses SO_ORIGINAL_DST
//	:3130               second proxy (chained after :3128)
//	127.0.0.1:53        DNS responder (the original server)
//	127.0.0.1:5354      UDP proxy forwarding to it with records set

func init() {
	testutil.RegisterHelper("kscenario", kscenarioHelper)
	testutil.RegisterHelper("kqproxy", kqproxyHelper)
	testutil.RegisterHelper("bulksink", bulkSinkHelper)
	testutil.HelperMain()
}

type kdaemon struct {
	*daemon
	pins string
}

// startKernelDaemon starts fwpd with the kernel datapath on cg, its pins
// in a bpffs it mounts under a fresh directory.
func startKernelDaemon(t *testing.T, cg *testutil.Cgroup, dir string, args ...string) *kdaemon {
	t.Helper()
	pins := filepath.Join(dir, "bpf", "fwp")
	base := []string{"--datapath", "kernel", "--cgroup", cg.Path, "--bpffs-dir", pins}
	if !slices.Contains(args, "--proxy-cgroup") {
		// The test runs on the cgroup2 root: "auto" would hook every
		// socket of the machine.
		base = append(base, "--proxy-cgroup", "none")
	}
	d := startDaemon(t, dir, append(base, args...)...)
	// A killed fwpd leaves its pin lock file (see lockPins).
	sum := sha256.Sum256([]byte(pins))
	t.Cleanup(func() {
		os.Remove(filepath.Join(pinsLockDir(), "fwpd-pins-"+hex.EncodeToString(sum[:8])+".lock"))
	})
	return &kdaemon{daemon: d, pins: pins}
}

func kernelDir(t *testing.T) string {
	dir := shortDir(t)
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(dir, "bpf")) })
	return dir
}

// redirectPolicy sends TCP to port 8080 (v4 and v6) to the proxy at
// proxyPort, UDP to port 53 to the UDP proxy, and blocks 127.0.0.3 and
// v6 port 9090.
func redirectPolicy(pid, proxyPort int, blockV6 bool) string {
	cfg := func(proxy string) string {
		return strconv.Quote(fmt.Sprintf(`{"proxy":%q,"target_pid":%d}`, proxy, pid))
	}
	return fmt.Sprintf(`lifetime: persistent
providers:
  - {key: acme, name: ACME}
provider_contexts:
  - {key: to-proxy4, provider: acme, data: %s}
  - {key: to-proxy6, provider: acme, data: %s}
  - {key: to-dns, provider: acme, data: %s}
callouts:
  - {key: fwp.builtin.connect_redirect/acme4, provider: acme, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
  - {key: fwp.builtin.connect_redirect/acme6, provider: acme, layer: ALE_CONNECT_REDIRECT_V6, flags: [uses_provider_context]}
filters:
  - key: redirect-http4
    layer: ALE_CONNECT_REDIRECT_V4
    conditions: [{field: ip_remote_port, match: equal, value: 8080}, {field: ip_protocol, match: equal, value: 6}]
    action: callout_unknown
    callout: fwp.builtin.connect_redirect/acme4
    provider_context: to-proxy4
  - key: redirect-http6
    layer: ALE_CONNECT_REDIRECT_V6
    conditions: [{field: ip_remote_port, match: equal, value: 8080}]
    action: callout_unknown
    callout: fwp.builtin.connect_redirect/acme6
    provider_context: to-proxy6
  - key: redirect-dns
    layer: ALE_CONNECT_REDIRECT_V4
    conditions: [{field: ip_remote_port, match: equal, value: 53}, {field: ip_protocol, match: equal, value: 17}]
    action: callout_unknown
    callout: fwp.builtin.connect_redirect/acme4
    provider_context: to-dns
  - key: block-host3
    layer: ALE_AUTH_CONNECT_V4
    conditions: [{field: ip_remote_address, match: equal, value: 127.0.0.3}]
    action: block
%s`, cfg(fmt.Sprintf("127.0.0.1:%d", proxyPort)), cfg(fmt.Sprintf("[::1]:%d", proxyPort)), cfg("127.0.0.1:5354"), blockV6Filter(blockV6))
}

// deleteRedirectPolicy removes what redirectPolicy adds.
const deleteRedirectPolicy = `delete:
  - {kind: filter, key: redirect-http4}
  - {kind: filter, key: redirect-http6}
  - {kind: filter, key: redirect-dns}
  - {kind: filter, key: block-host3}
  - {kind: filter, key: block-v6-9090}
  - {kind: provider_context, key: to-proxy4}
  - {kind: provider_context, key: to-proxy6}
  - {kind: provider_context, key: to-dns}
  - {kind: callout, key: fwp.builtin.connect_redirect/acme4}
  - {kind: callout, key: fwp.builtin.connect_redirect/acme6}
  - {kind: provider, key: acme}
`

// chainPolicy: acme (higher sublayer) sends port 8080 to the proxy on
// 3128, beta to the one on 3130.
func chainPolicy(pid int) string {
	return fmt.Sprintf(`providers:
  - {key: acme, name: ACME}
  - {key: beta, name: Beta}
sublayers:
  - {key: acme-sub, provider: acme, weight: 200}
  - {key: beta-sub, provider: beta, weight: 100}
provider_contexts:
  - {key: to-acme, provider: acme, data: %q}
  - {key: to-beta, provider: beta, data: %q}
callouts:
  - {key: fwp.builtin.connect_redirect/acme, provider: acme, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
  - {key: fwp.builtin.connect_redirect/beta, provider: beta, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
filters:
  - {key: acme-redirect, layer: ALE_CONNECT_REDIRECT_V4, sublayer: acme-sub, action: callout_unknown, callout: fwp.builtin.connect_redirect/acme, provider_context: to-acme, conditions: [{field: ip_remote_port, match: equal, value: 8080}]}
  - {key: beta-redirect, layer: ALE_CONNECT_REDIRECT_V4, sublayer: beta-sub, action: callout_unknown, callout: fwp.builtin.connect_redirect/beta, provider_context: to-beta, conditions: [{field: ip_remote_port, match: equal, value: 8080}]}
`, fmt.Sprintf(`{"proxy":"127.0.0.1:3128","target_pid":%d}`, pid), fmt.Sprintf(`{"proxy":"127.0.0.1:3130","target_pid":%d}`, pid))
}

func blockV6Filter(on bool) string {
	if !on {
		return ""
	}
	return `  - key: block-v6-9090
    layer: ALE_AUTH_CONNECT_V6
    conditions: [{field: ip_remote_port, match: equal, value: 9090}]
    action: block
`
}

func (d *kdaemon) apply(t *testing.T, yaml string) (string, int) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(f, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	_, errs, code := d.ctl("apply", "-f", f)
	return errs, code
}

type scenario struct {
	t *testing.T
	h *testutil.Helper
}

type runResult struct {
	Out, Err string
	Code     int
	Took     time.Duration
}

func startScenario(t *testing.T, cg *testutil.Cgroup, pins string) (*scenario, int) {
	h := testutil.StartHelper(t, cg, "kscenario", pins)
	s := &scenario{t: t, h: h}
	pid, err := strconv.Atoi(strings.TrimSpace(string(s.call("pid"))))
	if err != nil {
		t.Fatal(err)
	}
	return s, pid
}

func (s *scenario) call(req string) []byte {
	s.t.Helper()
	out, err := s.h.Call([]byte(req))
	if err != nil {
		s.t.Fatal(err)
	}
	return out
}

func (s *scenario) run(args ...string) runResult {
	s.t.Helper()
	b, _ := json.Marshal(args)
	var r runResult
	if err := json.Unmarshal(s.call("run "+string(b)), &r); err != nil {
		s.t.Fatal(err)
	}
	return r
}

func (s *scenario) accepted(port int) int {
	n, _ := strconv.Atoi(strings.TrimSpace(string(s.call("accepted " + strconv.Itoa(port)))))
	return n
}

func curl(url string) []string {
	return []string{"curl", "-sS", "--max-time", "5", "-g", url}
}

func requireTool(t *testing.T, name string) {
	if _, err := exec.LookPath(name); err != nil {
		testutil.Unavailable(t, fmt.Errorf("%s is not installed (.ci/run installs it)", name))
	}
}

func TestE2EKernelRedirectAndBlock(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	cg := testutil.NewCgroup(t)
	d := startKernelDaemon(t, cg, kernelDir(t), "--metrics-addr", "127.0.0.1:0")
	s, pid := startScenario(t, cg, d.pins)
	if errs, code := d.apply(t, redirectPolicy(pid, 3128, true)); code != 0 {
		t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
	}
	events := d.followEvents(t)
	for i, url := range []string{"http://127.0.0.1:8080/x", "http://[::1]:8080/y"} {
		r := s.run(curl(url)...)
		origin := "127.0.0.1:8080"
		if strings.Contains(url, "::1") {
			origin = "[::1]:8080"
		}
		if r.Code != 0 || !strings.Contains(r.Out, "origin "+origin) {
			t.Fatalf("curl %s: exit %d, out %q, err %q", url, r.Code, r.Out, r.Err)
		}
		// Exactly one connection per request reached the proxy: its own
		// outbound connection, carrying the records, was not redirected.
		if n := s.accepted(3128); n != i+1 {
			t.Fatalf("after curl %s the proxy accepted %d connections, want %d (a loop?)", url, n, i+1)
		}
		if !strings.Contains(r.Out, "via-proxy:3128 records=ok context=ok") {
			t.Errorf("curl %s: the proxy did not see records and context: %q", url, r.Out)
		}
	}
	// Not redirected (port 9090) and allowed.
	if r := s.run(curl("http://127.0.0.1:9090/")...); r.Code != 0 || !strings.Contains(r.Out, "origin 127.0.0.1:9090") || strings.Contains(r.Out, "via-proxy") {
		t.Fatalf("direct curl: %+v", r)
	}
	// Blocked: refused at connect, at once.
	for _, url := range []string{"http://127.0.0.3:9090/", "http://[::1]:9090/"} {
		r := s.run(curl(url)...)
		if r.Code != 7 || !strings.Contains(strings.ToLower(r.Err), "couldn't connect") {
			t.Errorf("curl %s to a blocked address: exit %d, stderr %q; want 7, couldn't connect", url, r.Code, r.Err)
		}
		if r.Took > 2*time.Second {
			t.Errorf("curl %s took %v to fail: not refused at connect", url, r.Took)
		}
	}

	t.Run("net events and counters from the kernel", func(t *testing.T) {
		curlPath, _ := exec.LookPath("curl")
		curlPath, _ = filepath.EvalSymlinks(curlPath)
		var drop, redirect bool
		deadline := time.After(10 * time.Second)
		for !drop || !redirect {
			select {
			case e := <-events:
				// The path is resolved once per process in fwpd; a curl
				// that exited before fwpd read its first event is named
				// by the comm captured in the hook.
				if e.AppID != curlPath && e.AppID != "[curl]" || e.ProcessID == 0 {
					continue
				}
				// curl runs as root in the test cgroup: the hook's gid and
				// cgroup id reach the event.
				if e.CgroupID != cg.ID || e.GroupID == nil || *e.GroupID != 0 {
					continue
				}
				// The reason is the engine's for the deciding filter.
				drop = drop || e.Type == "classify_drop" && e.Remote == "127.0.0.3:9090" && e.Layer == "ALE_AUTH_CONNECT_V4" && e.FilterID != 0 && e.Reason == "block filter"
				redirect = redirect || e.Type == "classify_redirect" && e.Remote == "127.0.0.1:8080" && e.Layer == "ALE_CONNECT_REDIRECT_V4" && e.Reason == "callout permitted"
			case <-deadline:
				t.Fatalf("fwpctl events --follow: drop seen %v, redirect seen %v (app %s, cgroup id %d, gid 0)", drop, redirect, curlPath, cg.ID)
			}
		}
		m := d.metrics(t)
		for _, key := range []string{"block-host3", "block-v6-9090", "redirect-http4", "redirect-http6"} {
			if !regexp.MustCompile(`fwp_kernel_filter_decisions_total\{filter_id="\d+",filter_key="` + key + `"\} [1-9]`).MatchString(m) {
				t.Errorf("no kernel counter for %s in /metrics:\n%s", key, grepLines(m, "fwp_kernel"))
			}
		}
		// The hooks' decisions count in fwp_classifications_total.
		for _, la := range [][2]string{{"ALE_AUTH_CONNECT_V4", "block"}, {"ALE_AUTH_CONNECT_V4", "permit"}, {"ALE_CONNECT_REDIRECT_V4", "permit"}, {"ALE_AUTH_CONNECT_V6", "block"}} {
			if !regexp.MustCompile(`fwp_classifications_total\{action="` + la[1] + `",layer="` + la[0] + `"\} [1-9]`).MatchString(m) {
				t.Errorf("no %s %s classifications counted in /metrics:\n%s", la[0], la[1], grepLines(m, "fwp_classifications_total"))
			}
		}
		// explain gives the kernel's decision for a redirected tuple: the
		// built-in callout is registered with fwpd's engine.
		out := d.mustCtl("explain", "--layer", "ALE_CONNECT_REDIRECT_V4", "--remote", "127.0.0.1:8080", "--proto", "tcp")
		if !strings.Contains(out, "decision: permit") || !strings.Contains(out, "redirect-http4") || strings.Contains(out, "not registered") {
			t.Errorf("fwpctl explain of a redirected tuple:\n%s", out)
		}
	})

	t.Run("dig through a UDP redirect", func(t *testing.T) {
		requireTool(t, "dig")
		r := s.run("dig", "+short", "+time=2", "+tries=1", "@127.0.0.1", "-p", "53", "fwp.test", "A")
		if r.Code != 0 || strings.TrimSpace(r.Out) != "10.1.2.3" {
			t.Fatalf("dig: exit %d, out %q, err %q", r.Code, r.Out, r.Err)
		}
		if n := s.accepted(5354); n < 1 {
			t.Fatalf("the UDP proxy relayed %d queries: dig was not redirected", n)
		}
	})

	t.Run("SO_ORIGINAL_DST proxy", func(t *testing.T) {
		if errs, code := d.apply(t, deleteRedirectPolicy+redirectPolicy(pid, 3129, false)); code != 0 {
			t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
		}
		for _, url := range []string{"http://127.0.0.1:8080/o", "http://[::1]:8080/o"} {
			r := s.run(curl(url)...)
			if r.Code != 0 || !strings.Contains(r.Out, "via-original-dst") || !strings.Contains(r.Out, "origin ") {
				t.Fatalf("curl %s via the SO_ORIGINAL_DST proxy: %+v", url, r)
			}
		}
	})

	t.Run("two proxies of two providers chain", func(t *testing.T) {
		if errs, code := d.apply(t, strings.Replace(deleteRedirectPolicy, "  - {kind: filter, key: block-v6-9090}\n", "", 1)+chainPolicy(pid)); code != 0 {
			t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
		}
		a0, b0 := s.accepted(3128), s.accepted(3130)
		r := s.run(curl("http://127.0.0.1:8080/chain")...)
		// The client goes to acme's proxy, whose outbound (carrying acme's
		// record) goes to beta's, whose outbound (carrying both) reaches
		// the origin: each proxy once, no loop.
		if r.Code != 0 || !strings.Contains(r.Out, "origin 127.0.0.1:8080 via-proxy:3128 records=ok context=ok,via-proxy:3130 records=ok context=ok /chain") {
			t.Fatalf("chained curl: %+v", r)
		}
		if a, b := s.accepted(3128)-a0, s.accepted(3130)-b0; a != 1 || b != 1 {
			t.Fatalf("proxies accepted %d and %d connections, want 1 each", a, b)
		}
	})
}

// oneRedirectPolicy sends IPv4 connections (TCP, and UDP flows) to each of
// ports to the proxy at proxyAddr, whose process is pid.
func oneRedirectPolicy(proxyAddr, pid string, ports ...int) string {
	var filters strings.Builder
	for _, port := range ports {
		fmt.Fprintf(&filters, "  - {key: redirect-%d, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect/one, provider_context: to-proxy, conditions: [{field: ip_remote_port, match: equal, value: %d}]}\n", port, port)
	}
	return fmt.Sprintf(`providers:
  - {key: one, name: One}
provider_contexts:
  - {key: to-proxy, provider: one, data: %q}
callouts:
  - {key: fwp.builtin.connect_redirect/one, provider: one, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
filters:
%s`, fmt.Sprintf(`{"proxy":%q,"target_pid":%s}`, proxyAddr, pid), filters.String())
}

// deleteOneRedirectPolicy removes what oneRedirectPolicy added.
func deleteOneRedirectPolicy(ports ...int) string {
	var b strings.Builder
	b.WriteString("delete:\n")
	for _, port := range ports {
		fmt.Fprintf(&b, "  - {kind: filter, key: redirect-%d}\n", port)
	}
	b.WriteString("  - {kind: provider_context, key: to-proxy}\n  - {kind: callout, key: fwp.builtin.connect_redirect/one}\n  - {kind: provider, key: one}\n")
	return b.String()
}

// TestE2EKernelExampleProxy: examples/redirectproxy, a process of its own
// asking fwpd for each connection's redirect, relays curl's redirected
// connection to the original server without a loop.
func TestE2EKernelExampleProxy(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	requireTool(t, "dig")
	cg := testutil.NewCgroup(t)
	d := startKernelDaemon(t, cg, kernelDir(t))
	s, helperPID := startScenario(t, cg, d.pins)
	// HTTP to :8080 and DNS to :53 go to the example proxy on :3131.
	ports := []int{8080, 53}
	// Redirected, nothing listening on the proxy's port yet: refused.
	if errs, code := d.apply(t, oneRedirectPolicy("127.0.0.1:3131", strconv.Itoa(helperPID), ports...)); code != 0 {
		t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
	}
	if r := s.run(curl("http://127.0.0.1:8080/before")...); r.Code != 7 {
		t.Fatalf("curl before the proxy runs: %+v, want exit 7 (redirected to a closed port)", r)
	}
	dig := []string{"dig", "+short", "+time=2", "+tries=1", "@127.0.0.1", "-p", "53", "fwp.test", "A"}
	if r := s.run(dig...); r.Code == 0 && strings.TrimSpace(r.Out) == "10.1.2.3" {
		t.Fatalf("dig before the proxy runs was answered: %+v (not redirected?)", r)
	}
	req, _ := json.Marshal(spawnRequest{Argv: []string{bins.redirectproxy, "-listen", "127.0.0.1:3131", "-udp", "-socket", d.sock, "-v"}, Ready: "127.0.0.1:3131"})
	pid := strings.TrimSpace(string(s.call("spawn " + string(req))))
	if errs, code := d.apply(t, deleteOneRedirectPolicy(ports...)+oneRedirectPolicy("127.0.0.1:3131", pid, ports...)); code != 0 {
		t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
	}
	for i := range 3 {
		// The proxy's outbound connection carries the records fwpd put on
		// it, so the redirect lets it through: a loop would never answer.
		r := s.run(curl(fmt.Sprintf("http://127.0.0.1:8080/through-example-%d", i))...)
		if r.Code != 0 || !strings.Contains(r.Out, fmt.Sprintf("origin 127.0.0.1:8080  /through-example-%d", i)) {
			t.Fatalf("curl through the example proxy: %+v", r)
		}
	}
	// dig's query goes to the example proxy (it failed above, redirected
	// to nothing), which relays it (records set) to the original server;
	// the answer comes back to dig as from 127.0.0.1:53 (the recvmsg
	// hook), which dig checks.
	before := s.accepted(5354)
	for range 2 {
		r := s.run(dig...)
		if r.Code != 0 || strings.TrimSpace(r.Out) != "10.1.2.3" {
			t.Fatalf("dig through the example proxy: exit %d, out %q, err %q", r.Code, r.Out, r.Err)
		}
	}
	if n := s.accepted(5354) - before; n != 0 {
		t.Fatalf("the helper's own UDP proxy relayed %d queries: not the example's", n)
	}
}

// TestE2EKernelRefusesWhatItCannotEnforce: a Go callout (not built in),
// a malformed redirect and a policy too big for the maps are refused at
// commit with a clear error; nothing of the file is applied and the policy
// in force stays enforced.
func TestE2EKernelRefusesWhatItCannotEnforce(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	cg := testutil.NewCgroup(t)
	d := startKernelDaemon(t, cg, kernelDir(t), "--kernel-max-classes", "16")
	s, _ := startScenario(t, cg, d.pins)
	if errs, code := d.apply(t, blockHost3); code != 0 {
		t.Fatal(errs)
	}
	var many strings.Builder
	many.WriteString("filters:\n")
	for p := range 40 {
		fmt.Fprintf(&many, "  - {key: port-%d, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, match: equal, value: %d}]}\n", p, 2000+p)
	}
	for _, c := range []struct{ name, yaml, want, where string }{
		{"go callout", `filters:
  - {key: ok-block, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, match: equal, value: 9090}]}
  - {key: go-callout, layer: ALE_AUTH_CONNECT_V4, action: callout_terminating, callout: my-go-callout}
callouts:
  - {key: my-go-callout, layer: ALE_AUTH_CONNECT_V4}
`, "not supported by the kernel datapath", `policy.yaml:3: |filter "go-callout" (#`},
		{"malformed redirect", `provider_contexts:
  - {key: bad, data: "not json"}
callouts:
  - {key: fwp.builtin.connect_redirect, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
filters:
  - {key: ok-block, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, match: equal, value: 9090}]}
  - {key: bad-redirect, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect, provider_context: bad}
`, "invalid redirect configuration", `policy.yaml:7: |filter "bad-redirect" (#`},
		// Issue 16: a redirect off the host cannot work (the proxy must
		// be local); it was accepted without a word.
		{"non-local proxy", `provider_contexts:
  - {key: far, data: '{"proxy":"8.8.8.8:3131"}'}
callouts:
  - {key: fwp.builtin.connect_redirect, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
filters:
  - {key: far-redirect, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect, provider_context: far}
`, "proxy 8.8.8.8:3131 is not a local address", `policy.yaml:6: |filter "far-redirect" (#`},
		{"map full", many.String(), "exceeds the kernel datapath's capacity", "|"},
	} {
		t.Run(c.name, func(t *testing.T) {
			errs, code := d.apply(t, c.yaml)
			if code == 0 || !strings.Contains(errs, "kernel datapath refuses the policy") || !strings.Contains(errs, c.want) {
				t.Fatalf("fwpctl apply: exit %d, stderr %q; want a refusal saying %q", code, errs, c.want)
			}
			// The refusal names the filter by key and file:line, never by
			// the ID of a transaction that was not committed.
			pos, name, _ := strings.Cut(c.where, "|")
			if !strings.Contains(errs, pos) || !strings.Contains(errs, name) || strings.Contains(errs, "filter#") {
				t.Fatalf("fwpctl apply: stderr %q; want the filter named as %q", errs, c.where)
			}
			if keys := d.filterKeys(); fmt.Sprint(keys) != "[block-host3]" {
				t.Fatalf("filters after a refused apply: %v", keys)
			}
			if r := s.run(curl("http://127.0.0.3:9090/")...); r.Code != 7 {
				t.Fatalf("the policy in force is no longer enforced: %+v", r)
			}
			if r := s.run(curl("http://127.0.0.1:9090/")...); r.Code != 0 {
				t.Fatalf("part of the refused policy is enforced: %+v", r)
			}
		})
	}
}

const blockHost3 = `lifetime: persistent
filters:
  - {key: block-host3, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_address, match: equal, value: 127.0.0.3}]}
`

// TestE2EKernelLifetime: SIGKILLed fwpd leaves no hooks by default; with
// --keep-hooks-on-exit its policy stays enforced and the next fwpd adopts it.
func TestE2EKernelLifetime(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	block := blockHost3
	blocked := func(s *scenario) bool {
		r := s.run(curl("http://127.0.0.3:9090/")...)
		if r.Code != 0 && r.Code != 7 {
			t.Fatalf("curl: %+v", r)
		}
		return r.Code == 7
	}
	t.Run("default: hooks go with fwpd", func(t *testing.T) {
		cg := testutil.NewCgroup(t)
		d := startKernelDaemon(t, cg, kernelDir(t))
		s, _ := startScenario(t, cg, d.pins)
		if errs, code := d.apply(t, block); code != 0 {
			t.Fatal(errs)
		}
		if !blocked(s) {
			t.Fatal("not blocked while fwpd runs")
		}
		d.stop(syscall.SIGKILL)
		if blocked(s) {
			t.Fatal("still blocked after fwpd was killed: hooks left behind")
		}
	})
	t.Run("--keep-hooks-on-exit", func(t *testing.T) {
		cg := testutil.NewCgroup(t)
		dir := kernelDir(t)
		d := startKernelDaemon(t, cg, dir, "--keep-hooks-on-exit")
		s, _ := startScenario(t, cg, d.pins)
		if errs, code := d.apply(t, block); code != 0 {
			t.Fatal(errs)
		}
		d.stop(syscall.SIGKILL)
		if !blocked(s) {
			t.Fatal("not blocked after fwpd was killed with --keep-hooks-on-exit")
		}
		d2 := startKernelDaemon(t, cg, dir, "--keep-hooks-on-exit")
		if !blocked(s) {
			t.Fatal("not blocked after a new fwpd adopted the hooks")
		}
		d2.mustCtl("filter", "delete", "block-host3")
		if blocked(s) {
			t.Fatal("still blocked after the adopting fwpd deleted the filter")
		}
		// A fwpd without the flag starts afresh and leaves nothing.
		// Only one fwpd may use a pin directory.
		cmd := exec.Command(bins.fwpd, "--socket", filepath.Join(dir, "other.sock"), "--state-dir", filepath.Join(dir, "other"),
			"--cgroup", cg.Path, "--bpffs-dir", d.pins, "--bpffs-lock-wait", "0")
		if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "another fwpd uses --bpffs-dir") {
			t.Fatalf("second fwpd on the same pins: %v\n%s", err, out)
		}
		d2.stop(syscall.SIGTERM)
		d3 := startKernelDaemon(t, cg, dir)
		d3.stop(syscall.SIGTERM)
		if ents, _ := os.ReadDir(d.pins); len(ents) != 0 {
			t.Fatalf("pins left behind: %v", ents)
		}
	})
}

// kscenarioHelper runs the servers and proxies of the kernel e2e tests and
// answers requests: "pid", "accepted PORT", "run [argv JSON]".
func kscenarioHelper(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: kscenario PINDIR")
	}
	r, err := ebpf.OpenRedirects(args[0])
	if err != nil {
		return err
	}
	defer proxy.Register(ebpf.ProxyBackend{R: r})()
	counts := map[int]*atomic.Int64{3128: {}, 3129: {}, 3130: {}, 5354: {}}
	for _, port := range []int{8080, 9090} {
		ln, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
		if err != nil {
			return err
		}
		go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			fmt.Fprintf(w, "origin %s %s %s\n", req.Host, strings.Join(req.Header.Values("X-Fwp-Proxy"), ","), req.URL.Path)
		}))
	}
	for port, handle := range map[int]func(net.Conn) error{3128: proxyConn, 3129: originalDstConn, 3130: proxyConn} {
		if err := serveTCP(fmt.Sprintf(":%d", port), func(c net.Conn) {
			counts[port].Add(1)
			if err := handle(c); err != nil {
				fmt.Fprintf(os.Stderr, "proxy %d: %v\n", port, err)
			}
		}); err != nil {
			return err
		}
	}
	if err := dnsServers(counts[5354], ebpf.ProxyBackend{R: r}); err != nil {
		return err
	}
	var spawned []*exec.Cmd
	defer func() {
		for _, c := range spawned {
			c.Process.Kill() // spawn's goroutine reaps it
		}
	}()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd, arg, _ := strings.Cut(in.Text(), " ")
		switch cmd {
		case "pid":
			fmt.Println(os.Getpid())
		case "accepted":
			port, _ := strconv.Atoi(arg)
			fmt.Println(counts[port].Load())
		case "bulk":
			// bulk ADDR BYTES: send BYTES to the sink at ADDR, wait for
			// its count; answers the nanoseconds it took.
			addr, n, _ := strings.Cut(arg, " ")
			size, _ := strconv.ParseInt(n, 10, 64)
			took, err := bulkSend(addr, size)
			if err != nil {
				return err
			}
			fmt.Println(took.Nanoseconds())
		case "spawn":
			// spawn {"argv":[...],"env":[...],"ready":"ADDR"}: start a
			// process in this helper's cgroup and network namespace, kept
			// until the helper ends; answers its pid once ADDR accepts.
			var req spawnRequest
			if err := json.Unmarshal([]byte(arg), &req); err != nil {
				return err
			}
			c, err := spawn(req)
			if err != nil {
				return err
			}
			spawned = append(spawned, c)
			fmt.Println(c.Process.Pid)
		case "soak":
			// soak BINARY SOCKET OPS: see kernelSoak; answers a soakResult.
			if err := json.NewEncoder(os.Stdout).Encode(kernelSoak(arg)); err != nil {
				return err
			}
		case "run":
			var argv []string
			if err := json.Unmarshal([]byte(arg), &argv); err != nil {
				return err
			}
			var out, errb bytes.Buffer
			c := exec.Command(argv[0], argv[1:]...)
			c.Stdout, c.Stderr = &out, &errb
			start := time.Now()
			err := c.Run()
			res := runResult{Out: out.String(), Err: errb.String(), Took: time.Since(start)}
			if ee, ok := err.(*exec.ExitError); ok {
				res.Code = ee.ExitCode()
			} else if err != nil {
				res.Code, res.Err = -1, err.Error()
			}
			b, _ := json.Marshal(res)
			fmt.Println(string(b))
		default:
			return fmt.Errorf("unknown request %q", cmd)
		}
	}
	return nil
}

// proxyConn is a proxy on the proxy package: it reads the records and the
// context (the original destination), sets the records on its dialer and
// relays an HTTP request, marking it.
func proxyConn(c net.Conn) error {
	out, err := dialOriginal(c)
	if err != nil {
		return err
	}
	defer out.Close()
	return relayHTTP(c, out, fmt.Sprintf("via-proxy:%d records=ok context=ok", c.LocalAddr().(*net.TCPAddr).Port))
}

// dialOriginal is a proxy's use of the proxy package: it reads the
// records and the context (the original destination) of an accepted
// connection, sets the records on its dialer and connects there.
func dialOriginal(c net.Conn) (net.Conn, error) {
	records, err := proxy.QueryRedirectRecords(c)
	if err != nil {
		return nil, err
	}
	rctx, err := proxy.QueryRedirectContext(c)
	if err != nil {
		return nil, err
	}
	orig, err := netip.ParseAddrPort(string(rctx))
	if err != nil {
		return nil, fmt.Errorf("context %q: %w", rctx, err)
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	if err := proxy.SetRedirectRecords(d, records); err != nil {
		return nil, err
	}
	return d.Dial("tcp", orig.String())
}

// originalDstConn is a proxy written for iptables REDIRECT: it knows only
// SO_ORIGINAL_DST. Its outbound connection carries no records, so it goes
// to port 9090 of the original address (not redirected).
func originalDstConn(c net.Conn) error {
	tc := c.(*net.TCPConn)
	sc, err := tc.SyscallConn()
	if err != nil {
		return err
	}
	v6 := tc.LocalAddr().(*net.TCPAddr).IP.To4() == nil
	var orig netip.AddrPort
	var oerr error
	if err := sc.Control(func(fd uintptr) { orig, oerr = unix.OriginalDst(int(fd), v6) }); err != nil {
		return err
	}
	if oerr != nil {
		return oerr
	}
	out, err := net.DialTimeout("tcp", netip.AddrPortFrom(orig.Addr(), 9090).String(), 5*time.Second)
	if err != nil {
		return err
	}
	defer out.Close()
	return relayHTTP(c, out, "via-original-dst "+orig.String())
}

// relayHTTP forwards one request with a header naming the proxy, then
// splices the rest.
func relayHTTP(c, out net.Conn, mark string) error {
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		return err
	}
	req.Header.Add("X-Fwp-Proxy", mark)
	if err := req.Write(out); err != nil {
		return err
	}
	_, err = io.Copy(c, out)
	return err
}

// dnsServers runs the original DNS server on 127.0.0.1:53 (answers any A
// query with 10.1.2.3) and a UDP proxy on 127.0.0.1:5354 that finds each
// datagram's redirect by its 4-tuple (the datagram's source, its own
// address) and forwards it to the original destination from a socket
// carrying the redirect records (so it is not redirected back to itself).
// A datagram without a redirect, or whose context is not its original
// destination, is dropped, so dig fails.
func dnsServers(relayed *atomic.Int64, b ebpf.ProxyBackend) error {
	srv, err := net.ListenPacket("udp4", "127.0.0.1:53")
	if err != nil {
		return err
	}
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := srv.ReadFrom(buf)
			if err != nil {
				return
			}
			if a := testutil.DNSAnswer(buf[:n]); a != nil {
				srv.WriteTo(a, from)
			}
		}
	}()
	p, err := net.ListenPacket("udp4", "127.0.0.1:5354")
	if err != nil {
		return err
	}
	local := p.LocalAddr().(*net.UDPAddr).AddrPort()
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := p.ReadFrom(buf)
			if err != nil {
				return
			}
			rd, orig, err := b.QueryTuple(local, from.(*net.UDPAddr).AddrPort())
			if err != nil || string(rd.Context) != orig.String() {
				fmt.Fprintf(os.Stderr, "udp proxy: datagram from %s: context %q, original %s: %v\n", from, rd.Context, orig, err)
				continue
			}
			relayed.Add(1)
			q := append([]byte(nil), buf[:n]...)
			go func() {
				d := &net.Dialer{Timeout: 2 * time.Second}
				if err := proxy.SetRedirectRecords(d, rd.Records); err != nil {
					fmt.Fprintln(os.Stderr, "udp proxy:", err)
					return
				}
				up, err := d.Dial("udp4", orig.String())
				if err != nil {
					fmt.Fprintln(os.Stderr, "udp proxy:", err)
					return
				}
				defer up.Close()
				up.SetDeadline(time.Now().Add(2 * time.Second))
				if _, err := up.Write(q); err != nil {
					return
				}
				ans := make([]byte, 512)
				m, err := up.Read(ans)
				if err == nil {
					p.WriteTo(ans[:m], from)
				}
			}()
		}
	}()
	return nil
}

// TestE2EKernelNeedsRoot: without root fwpd says what is missing and exits
// non-zero instead of serving a policy it does not enforce.
func TestE2EKernelNeedsRoot(t *testing.T) {
	testutil.RequireRoot(t) // to become another user
	dir := shortDir(t)
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	// The test binaries' directory is private: run a copy.
	bin, err := os.ReadFile(bins.fwpd)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "fwpd"), bin, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(dir, "fwpd"), "--socket", filepath.Join(dir, "s"), "--state-dir", filepath.Join(dir, "state"), "--bpffs-dir", filepath.Join(dir, "bpf", "fwp"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 || !strings.Contains(string(out), "needs root (CAP_BPF, CAP_NET_ADMIN)") || !strings.Contains(string(out), "--datapath none") {
		t.Fatalf("fwpd as nobody: %v\n%s", err, out)
	}
}

// followEvents runs fwpctl events --follow and delivers its events.
func (d *kdaemon) followEvents(t *testing.T) <-chan eventLine {
	cmd := exec.Command(bins.fwpctl, "events", "--follow", "-o", "json")
	cmd.Env = append(os.Environ(), "FWPD_SOCKET="+d.sock)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	c := make(chan eventLine, 1024)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var e eventLine
			if json.Unmarshal(sc.Bytes(), &e) == nil {
				select {
				case c <- e:
				default:
				}
			}
		}
	}()
	return c
}

type eventLine struct {
	Type, Layer, Remote, Reason string
	FilterID                    uint64  `json:"filter_id"`
	AppID                       string  `json:"app_id"`
	ProcessID                   uint32  `json:"process_id"`
	GroupID                     *uint32 `json:"group_id"` // nil: missing from the JSON
	CgroupID                    uint64  `json:"cgroup_id"`
}

// metrics fetches /metrics from the address fwpd logged.
func (d *kdaemon) metrics(t *testing.T) string {
	m := regexp.MustCompile(`msg="metrics listening" addr=(\S+)`).FindStringSubmatch(d.log.String())
	if m == nil {
		t.Fatalf("fwpd did not log its metrics address:\n%s", d.log)
	}
	resp, err := http.Get("http://" + m[1] + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// bulkSinkHelper is the sink of the throughput benchmark, a process of
// its own (spawned by kscenario, so in its namespace): on :7071 and :7072
// it counts what it reads and sends the count back.
func bulkSinkHelper([]string) error {
	for _, port := range []int{7071, 7072, 7073} {
		if err := serveTCP(fmt.Sprintf("127.0.0.1:%d", port), func(c net.Conn) {
			// Read as the client writes, 256 KiB at a time (io.Discard
			// alone would read 8 KiB at a time).
			n, _ := io.CopyBuffer(struct{ io.Writer }{io.Discard}, c, make([]byte, 256<<10))
			binary.Write(c, binary.BigEndian, n)
		}); err != nil {
			return err
		}
	}
	select {}
}

type spawnRequest struct {
	Argv  []string `json:"argv"`
	Env   []string `json:"env"`
	Ready string   `json:"ready"`
}

// spawn starts req.Argv (its output to the helper's stderr) and waits
// until req.Ready accepts a TCP connection.
func spawn(req spawnRequest) (*exec.Cmd, error) {
	if len(req.Argv) == 0 {
		return nil, fmt.Errorf("spawn: no argv")
	}
	c := exec.Command(req.Argv[0], req.Argv[1:]...)
	c.Env = append(os.Environ(), req.Env...)
	c.Stdout, c.Stderr = os.Stderr, os.Stderr
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.Start(); err != nil {
		return nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- c.Wait() }()
	for deadline := time.Now().Add(20 * time.Second); ; {
		if conn, err := net.DialTimeout("tcp", req.Ready, time.Second); err == nil {
			conn.Close()
			return c, nil
		}
		select {
		case err := <-exited:
			return nil, fmt.Errorf("spawn %q: exited before %s accepted: %v", req.Argv, req.Ready, err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.Process.Kill()
			return nil, fmt.Errorf("spawn %q: %s never accepted", req.Argv, req.Ready)
		}
	}
}

// serveTCP accepts connections on addr and handles each in a goroutine,
// closing it afterwards.
func serveTCP(addr string, handle func(net.Conn)) error {
	ln, err := net.Listen("tcp", addr)
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
				handle(c)
			}()
		}
	}()
	return nil
}

// cpuBusy reads the machine's busy and total CPU time (all CPUs, clock
// ticks) from /proc/stat: busy counts everything but idle and iowait, so
// softirq work and kernel threads on the path are in it too.
func cpuBusy() (busy, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	for i, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseUint(f, 10, 64)
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total
}

func bulkSend(addr string, size int64) (time.Duration, error) {
	start := time.Now()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	for sent := int64(0); sent < size; sent += int64(len(buf)) {
		if _, err := c.Write(buf); err != nil {
			return 0, err
		}
	}
	c.(*net.TCPConn).CloseWrite()
	var n int64
	if err := binary.Read(c, binary.BigEndian, &n); err != nil {
		return 0, err
	}
	if n < size {
		return 0, fmt.Errorf("sink got %d bytes of %d", n, size)
	}
	return time.Since(start), nil
}

// publicCopy copies a binary where an unprivileged user can run it (the
// build directory is 0700), removed with the test.
func publicCopy(tb testing.TB, path string) string {
	tb.Helper()
	pub, err := os.MkdirTemp("", "fwpbin")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(pub) })
	bin, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	out := filepath.Join(pub, filepath.Base(path))
	if err := os.WriteFile(out, bin, 0o755); err != nil {
		tb.Fatal(err)
	}
	if err := os.Chmod(pub, 0o755); err != nil {
		tb.Fatal(err)
	}
	return out
}

// BenchmarkE2EKernelRedirectThroughput sends bulk data to a sink directly,
// through fwp's kernel redirect to a relaying proxy, to the same relay
// without fwp, and through iptables REDIRECT to the same relay, alternating.
// Targets: fwp-vs-plain-proxy ≥ 0.95 (fwp costs ≤ 5 % over the relay
// reached without it) and fwp-vs-iptables ≥ 1.
func BenchmarkE2EKernelRedirectThroughput(b *testing.B) {
	testutil.RequireRoot(b)
	cg := testutil.NewCgroup(b)
	dir, err := os.MkdirTemp("", "fwpbench")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	defer unix.Unmount(filepath.Join(dir, "bpf"))
	pins := filepath.Join(dir, "bpf", "fwp")
	sock := filepath.Join(dir, "fwpd.sock")
	cmd := exec.Command(bins.fwpd, "--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--datapath", "kernel", "--cgroup", cg.Path, "--bpffs-dir", pins, "--proxy-cgroup", "none")
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if i > 1000 {
			b.Fatal("fwpd did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Client (this helper), sink and proxies are processes of their own,
	// as curl, a server and the example proxy would be; all in cg and one
	// network namespace.
	h := testutil.StartHelper(b, cg, "kscenario", pins)
	spawn := func(req spawnRequest) string {
		j, _ := json.Marshal(req)
		out, err := h.Call(append([]byte("spawn "), j...))
		if err != nil {
			b.Fatal(err)
		}
		return strings.TrimSpace(string(out))
	}
	spawn(spawnRequest{Argv: []string{os.Args[0]}, Env: testutil.HelperEnv("bulksink"), Ready: "127.0.0.1:7072"})
	pid := spawn(spawnRequest{Argv: []string{bins.redirectproxy, "-listen", "127.0.0.1:3131", "-socket", sock}, Ready: "127.0.0.1:3131"})
	// The same relay without fwp, for comparison: every connection to the
	// sink's :7072.
	spawn(spawnRequest{Argv: []string{bins.redirectproxy, "-listen", "127.0.0.1:3132", "-to", "127.0.0.1:7072"}, Ready: "127.0.0.1:3132"})
	// iptables REDIRECT (nat OUTPUT, in the helper's namespace) of :7073
	// to the same relay asking SO_ORIGINAL_DST alone, as nobody so that
	// its own connection to :7073 is not redirected (-m owner).
	pubProxy := publicCopy(b, bins.redirectproxy)
	withIptables := false
	if _, err := exec.LookPath("iptables"); err == nil {
		spawn(spawnRequest{Argv: []string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", pubProxy, "-listen", "127.0.0.1:3133", "-original-dst"}, Ready: "127.0.0.1:3133"})
		j, _ := json.Marshal([]string{"iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1", "--dport", "7073", "-m", "owner", "!", "--uid-owner", "65534", "-j", "REDIRECT", "--to-ports", "3133"})
		out, err := h.Call(append([]byte("run "), j...))
		if err != nil {
			b.Fatal(err)
		}
		var res runResult
		if err := json.Unmarshal(out, &res); err != nil || res.Code != 0 {
			b.Fatalf("iptables: %v %+v", err, res)
		}
		withIptables = true
	} else if os.Getenv("CI") != "" {
		b.Fatalf("the iptables arm needs iptables (apt-get install iptables): %v", err)
	}
	policy := oneRedirectPolicy("127.0.0.1:3131", pid, 7071)
	f := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(f, []byte(policy), 0o644); err != nil {
		b.Fatal(err)
	}
	ctl := exec.Command(bins.fwpctl, "apply", "-f", f)
	ctl.Env = append(os.Environ(), "FWPD_SOCKET="+sock)
	if out, err := ctl.CombinedOutput(); err != nil {
		b.Fatalf("fwpctl apply: %v: %s", err, out)
	}
	const size = 64 << 20
	// send answers the transfer's time and the CPUs busy meanwhile, the
	// whole machine's (client, proxy, sink, softirqs, fwpd idle).
	send := func(addr string) (took time.Duration, cpus float64) {
		b0, t0 := cpuBusy()
		out, err := h.Call([]byte(fmt.Sprintf("bulk %s %d", addr, size)))
		if err != nil {
			b.Fatal(err)
		}
		b1, t1 := cpuBusy()
		ns, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
		if err != nil {
			b.Fatalf("bulk: %q", out)
		}
		if t1 > t0 {
			cpus = float64(runtime.NumCPU()) * float64(b1-b0) / float64(t1-t0)
		}
		return time.Duration(ns), cpus
	}
	mbps := func(d time.Duration) float64 { return float64(b.N) * size / d.Seconds() / 1e6 }
	var direct, redirected, plain, ipt time.Duration
	var directCPU, redirectedCPU float64 // CPU-seconds
	var vsPlain, vsIptables []float64    // per iteration
	b.ReportAllocs()
	b.SetBytes(3 * size)
	i := 0
	for b.Loop() {
		t, c := send("127.0.0.1:7072")
		direct, directCPU = direct+t, directCPU+c*t.Seconds()
		// The arms through the relay in rotating order: the load of a
		// shared machine drifts within seconds.
		var r, p, q time.Duration
		for j := range 3 {
			switch (i + j) % 3 {
			case 0:
				t, c = send("127.0.0.1:7071")
				redirected, redirectedCPU, r = redirected+t, redirectedCPU+c*t.Seconds(), t
			case 1:
				t, _ = send("127.0.0.1:3132")
				plain, p = plain+t, t
			case 2:
				if withIptables {
					t, _ = send("127.0.0.1:7073")
					ipt, q = ipt+t, t
				}
			}
		}
		vsPlain = append(vsPlain, p.Seconds()/r.Seconds())
		if withIptables {
			vsIptables = append(vsIptables, q.Seconds()/r.Seconds())
		}
		i++
	}
	median := func(v []float64) float64 {
		slices.Sort(v)
		return v[len(v)/2]
	}
	b.ReportMetric(median(vsPlain), "fwp-vs-plain-proxy-median")
	if withIptables {
		b.ReportMetric(mbps(ipt), "iptables-MB/s")
		b.ReportMetric(ipt.Seconds()/redirected.Seconds(), "fwp-vs-iptables")
		b.ReportMetric(median(vsIptables), "fwp-vs-iptables-median")
	}
	b.ReportMetric(mbps(direct), "direct-MB/s")
	b.ReportMetric(mbps(redirected), "redirected-MB/s")
	b.ReportMetric(direct.Seconds()/redirected.Seconds(), "ratio")
	// The same relay reached without a redirect: what the proxy hop costs
	// by itself, and fwp's share (fwp-vs-plain-proxy = redirected / plain).
	b.ReportMetric(mbps(plain), "plainproxy-MB/s")
	b.ReportMetric(plain.Seconds()/redirected.Seconds(), "fwp-vs-plain-proxy")
	// CPUs busy during each kind of transfer and the CPU time per byte:
	// once the redirected path keeps every CPU busy, its rate is bounded
	// by its CPU cost per byte, whatever the relay.
	b.ReportMetric(directCPU/direct.Seconds(), "direct-cpus")
	b.ReportMetric(redirectedCPU/redirected.Seconds(), "redirected-cpus")
	b.ReportMetric(redirectedCPU/directCPU, "cpu-per-byte-ratio")
}

// TestE2EKernelAppFollowsUpgrade: a policy blocks one application (a copy
// of curl at a path of its own) from port 9090; a package upgrade renames
// a new file over that path, and fwpd compiles the policy again on its own
// so the rule follows the new file.
func TestE2EKernelAppFollowsUpgrade(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	requireTool(t, "wget")
	cg := testutil.NewCgroup(t)
	d := startKernelDaemon(t, cg, kernelDir(t))
	s, _ := startScenario(t, cg, d.pins)
	dir, err := os.MkdirTemp("/var/tmp", "fwp-e2e-app-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	app := filepath.Join(dir, "app")
	install := func() {
		b, err := os.ReadFile("/usr/bin/curl")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(app+".new", b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(app+".new", app); err != nil {
			t.Fatal(err)
		}
	}
	install()
	if errs, code := d.apply(t, fmt.Sprintf(`filters:
  - key: block-app
    layer: ALE_AUTH_CONNECT_V4
    conditions: [{field: ale_app_id, match: equal, value: %s}, {field: ip_remote_port, match: equal, value: 9090}]
    action: block
`, app)); code != 0 {
		t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
	}
	appCurl := append([]string{app}, curl("http://127.0.0.1:9090/")[1:]...)
	if r := s.run(appCurl...); r.Code != 7 {
		t.Fatalf("the application: %+v, want exit 7", r)
	}
	if r := s.run("wget", "-q", "-O", "/dev/null", "-T", "5", "-t", "1", "http://127.0.0.1:9090/"); r.Code != 0 {
		t.Fatalf("wget: %+v, want exit 0", r)
	}
	for i := range 3 { // upgrades, one after another
		install()
		deadline := time.Now().Add(5 * time.Second)
		for {
			r := s.run(appCurl...)
			if r.Code == 7 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("upgrade %d: the new file at %s is not blocked 5 s later: %+v\nfwpd: %s", i, app, r, d.log.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if !strings.Contains(d.log.String(), "kernel policy recompiled to follow it") {
		t.Errorf("fwpd did not log the recompilation: %s", d.log.String())
	}
}

// blocklistE2ESize is the list of TestE2EKernelBlocklistFile (FWP_BLOCKLIST).
var blocklistE2ESize = func() int {
	if n, err := strconv.Atoi(os.Getenv("FWP_BLOCKLIST")); err == nil && n > 0 {
		return n
	}
	return 1_000_000
}()

// writeBlocklist writes n even addresses from 127.1.0.0 + 2*from, one per
// line as blocklists are published (with a comment line).
func writeBlocklist(t *testing.T, path string, from, n int) {
	var b bytes.Buffer
	b.WriteString("# test blocklist\n")
	for i := range n {
		v := uint32(127<<24|1<<16) + 2*uint32(from+i)
		fmt.Fprintf(&b, "%d.%d.%d.%d\n", byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func listedAddr(i int) string {
	v := uint32(127<<24|1<<16) + 2*uint32(i)
	return fmt.Sprintf("%d.%d.%d.%d", byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}

// TestE2EKernelBlocklistFile: a million-address blocklist, one filter
// whose list is read from a file, applied with fwpctl apply in one
// transaction and enforced by the kernel; then replaced by another list.
func TestE2EKernelBlocklistFile(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	n := blocklistE2ESize
	if testing.Short() {
		n = 100_000
	}
	cg := testutil.NewCgroup(t)
	d := startKernelDaemon(t, cg, kernelDir(t))
	s, _ := startScenario(t, cg, d.pins)
	dir := t.TempDir()
	writeBlocklist(t, filepath.Join(dir, "list.txt"), 0, n)
	pol := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(pol, []byte(`filters:
  - key: blocklist
    layer: ALE_AUTH_CONNECT_V4
    conditions: [{field: ip_remote_address, match: equal, values_file: list.txt}]
    action: block
`), 0o644); err != nil {
		t.Fatal(err)
	}
	rss := func() string { // fwpd's resident memory, for docs/benchmarks.md
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
		var out []string
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "VmRSS:") || strings.HasPrefix(l, "VmHWM:") {
				out = append(out, strings.Join(strings.Fields(l), " "))
			}
		}
		return strings.Join(out, ", ")
	}
	t.Logf("fwpd before: %s", rss())
	start := time.Now()
	if _, errs, code := d.ctl("apply", "-f", pol); code != 0 {
		t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
	}
	t.Logf("fwpctl apply of a %d-address list: %v; fwpd after: %s", n, time.Since(start), rss())
	check := func(addr string, want int) {
		t.Helper()
		if r := s.run(curl("http://" + addr + ":9090/")...); r.Code != want {
			t.Fatalf("curl %s: exit %d, want %d (%s)", addr, r.Code, want, r.Err)
		}
	}
	// 9090 serves on every loopback address: a permitted connect gets 0.
	check(listedAddr(0), 7)
	check(listedAddr(n-1), 7)
	check(listedAddr(n/2), 7)
	check("127.1.0.1", 0)
	check(listedAddr(n), 0)
	// Replaced by another list in one transaction (the same filter key).
	writeBlocklist(t, filepath.Join(dir, "list.txt"), n/2, n)
	if err := os.WriteFile(pol, []byte(`delete:
  - {kind: filter, key: blocklist}
filters:
  - key: blocklist
    layer: ALE_AUTH_CONNECT_V4
    conditions: [{field: ip_remote_address, match: equal, values_file: list.txt}]
    action: block
`), 0o644); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if _, errs, code := d.ctl("apply", "-f", pol); code != 0 {
		t.Fatalf("fwpctl apply (replacement): exit %d: %s", code, errs)
	}
	t.Logf("fwpctl apply of the replacement: %v", time.Since(start))
	check(listedAddr(0), 0)
	check(listedAddr(n-1), 7)
	check(listedAddr(n+n/4), 7)
	// A bad line is refused with its file and line; the list stays.
	if err := os.WriteFile(filepath.Join(dir, "bad.txt"), []byte("127.0.0.1\n\nnot-an-address\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pol, []byte(`filters:
  - {key: bad, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_address, values_file: bad.txt}]}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, errs, code := d.ctl("apply", "-f", pol); code == 0 || !strings.Contains(errs, "bad.txt:3") {
		t.Fatalf("a bad values file: exit %d, stderr %q; want an error naming bad.txt:3", code, errs)
	}
	check(listedAddr(n-1), 7)
}

// pinsLockDir is where fwpd keeps its --bpffs-dir lock files: root's
// /run/fwp/locks (the temporary directory without root).
func pinsLockDir() string {
	if os.Geteuid() != 0 {
		return os.TempDir()
	}
	return "/run/fwp/locks"
}
