//go:build linux

package main_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	cebpf "github.com/cilium/ebpf"

	"fwp/datapath/linux/ebpf"
	"fwp/internal/testutil"
)

// soakOps is how many of each operation the daemon soak runs in one fwpd
// lifetime (the project's floor is 100,000).
var soakOps = func() int {
	if n, err := strconv.Atoi(os.Getenv("FWP_SOAK_OPS")); err == nil && n > 0 {
		return n
	}
	return 100_000
}()

type soakResult struct {
	TCP, UDP, Blocked, Queries int
	Took                       [4]time.Duration // per phase
	FirstErr                   string
}

// soakPolicy: TCP to :8080 and UDP to :53 go to the example proxy; :8081 to
// a listener of the scenario that holds the connection (for fwpd's
// queries); 127.0.0.3 is blocked.
func soakPolicy(examplePID, helperPID string) string {
	cfg := func(proxy, pid string) string {
		return strconv.Quote(fmt.Sprintf(`{"proxy":%q,"target_pid":%s}`, proxy, pid))
	}
	return fmt.Sprintf(`providers:
  - {key: soak, name: Soak}
provider_contexts:
  - {key: to-example, provider: soak, data: %s}
  - {key: to-hold, provider: soak, data: %s}
callouts:
  - {key: fwp.builtin.connect_redirect/soak, provider: soak, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
filters:
  - {key: soak-http, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect/soak, provider_context: to-example, conditions: [{field: ip_remote_port, match: equal, value: 8080}, {field: ip_protocol, match: equal, value: 6}]}
  - {key: soak-dns, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect/soak, provider_context: to-example, conditions: [{field: ip_remote_port, match: equal, value: 53}, {field: ip_protocol, match: equal, value: 17}]}
  - {key: soak-hold, layer: ALE_CONNECT_REDIRECT_V4, action: callout_unknown, callout: fwp.builtin.connect_redirect/soak, provider_context: to-hold, conditions: [{field: ip_remote_port, match: equal, value: 8081}, {field: ip_protocol, match: equal, value: 6}]}
  - {key: soak-block, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_address, match: equal, value: 127.0.0.3}]}
`, cfg("127.0.0.1:3131", examplePID), cfg("127.0.0.1:3132", helperPID))
}

// kernelSoak runs the soak client (cmd/fwpd/internal/soakclient, built
// without the race detector: the soak measures the daemon, not an
// instrumented client) in the scenario helper's cgroup and namespace; arg
// is "BINARY SOCKET OPS" (the helper is a process of its own: the path of
// the client the test built comes with the request).
func kernelSoak(arg string) (res soakResult) {
	argv := strings.Fields(arg)
	if len(argv) != 3 {
		res.FirstErr = fmt.Sprintf("soak %q: want BINARY SOCKET OPS", arg)
		return res
	}
	out, err := exec.Command(argv[0], argv[1:]...).Output()
	if err == nil {
		err = json.Unmarshal(out, &res)
	}
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", err, ee.Stderr)
		}
		res.FirstErr = "soak client: " + err.Error()
	}
	return res
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// procFDs counts a process's open files.
func procFDs(t *testing.T, pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// metricValue reads one unlabelled sample from /metrics text.
func metricValue(t *testing.T, text, name string) float64 {
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("no %s in /metrics", name)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// pinnedEntries counts the entries of a map fwpd pinned.
func pinnedEntries(t *testing.T, pins, name string) int {
	m, err := cebpf.LoadPinnedMap(filepath.Join(pins, name), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	n := 0
	var prev any
	for {
		next := make([]byte, m.KeySize())
		if err := m.NextKey(prev, &next); errors.Is(err, cebpf.ErrKeyNotExist) {
			return n
		} else if err != nil {
			t.Fatal(err)
		}
		n++
		prev = next
	}
}

// TestE2EKernelSoak: one fwpd and one example proxy serve soakOps
// redirected HTTP connections, DNS flows, blocked connects and redirect
// queries; all succeed, and fwpd's and the proxy's fds, fwpd's goroutines
// and memory, and the per-socket maps come back to their level.
func TestE2EKernelSoak(t *testing.T) {
	testutil.RequireRoot(t)
	cg := testutil.NewCgroup(t)
	d := startKernelDaemon(t, cg, kernelDir(t), "--metrics-addr", "127.0.0.1:0")
	s, helperPID := startScenario(t, cg, d.pins)
	req, _ := json.Marshal(spawnRequest{Argv: []string{bins.redirectproxy, "-listen", "127.0.0.1:3131", "-udp", "-udp-idle", "1s", "-udp-max", "65536", "-socket", d.sock},
		Ready: "127.0.0.1:3131"})
	examplePID, _ := strconv.Atoi(strings.TrimSpace(string(s.call("spawn " + string(req)))))
	if errs, code := d.apply(t, soakPolicy(strconv.Itoa(examplePID), strconv.Itoa(helperPID))); code != 0 {
		t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
	}
	perSocket := []string{"fwp_sock_redirect", "fwp_tuple_redirect", "fwp_sock_records", "fwp_udp_key"}
	maps := map[string]int{}
	for _, name := range perSocket {
		maps[name] = pinnedEntries(t, d.pins, name)
	}
	m0 := d.metrics(t)
	fwpdFDs, proxyFDs := procFDs(t, d.cmd.Process.Pid), procFDs(t, examplePID)
	start := time.Now()
	var res soakResult
	if err := json.Unmarshal(s.call(fmt.Sprintf("soak %s %s %d", bins.soakclient, d.sock, soakOps)), &res); err != nil {
		t.Fatal(err)
	}
	t.Logf("in %v: %d HTTP connections (%v), %d DNS flows (%v), %d blocked connects (%v), %d fwpd queries (%v)",
		time.Since(start), res.TCP, res.Took[0], res.UDP, res.Took[1], res.Blocked, res.Took[2], res.Queries, res.Took[3])
	if res.TCP != soakOps || res.UDP != soakOps || res.Blocked != soakOps || res.Queries != soakOps {
		t.Fatalf("of %d each: %d HTTP, %d DNS, %d blocked, %d queries; first error: %s\nhelper and proxy stderr:\n%s",
			soakOps, res.TCP, res.UDP, res.Blocked, res.Queries, res.FirstErr, lastLines(s.h.Stderr(), 20))
	}
	// The proxy's UDP relays end after 1 s idle; the helper's query
	// client has closed.
	var grew []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		grew = grew[:0]
		if n := procFDs(t, d.cmd.Process.Pid); n > fwpdFDs+2 {
			grew = append(grew, fmt.Sprintf("fwpd fds %d -> %d", fwpdFDs, n))
		}
		if n := procFDs(t, examplePID); n > proxyFDs+2 {
			grew = append(grew, fmt.Sprintf("example proxy fds %d -> %d", proxyFDs, n))
		}
		m1 := d.metrics(t)
		if g0, g1 := metricValue(t, m0, "go_goroutines"), metricValue(t, m1, "go_goroutines"); g1 > g0+5 {
			grew = append(grew, fmt.Sprintf("fwpd goroutines %v -> %v", g0, g1))
		}
		// Heap in use, not RSS: the Go runtime keeps freed pages a while.
		if h0, h1 := metricValue(t, m0, "go_memstats_heap_inuse_bytes"), metricValue(t, m1, "go_memstats_heap_inuse_bytes"); h1 > 2*h0+(16<<20) {
			grew = append(grew, fmt.Sprintf("fwpd heap in use %.0f -> %.0f bytes", h0, h1))
		}
		if len(grew) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(grew) > 0 {
		t.Errorf("after the soak: %s", strings.Join(grew, "; "))
	}
	// Every socket of the soak is closed: the TCP records went with
	// them; the UDP 4-tuple records are swept past their grace (fwpd
	// sweeps every grace period; here at once).
	r, err := ebpf.OpenRedirects(d.pins)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	grace := ebpf.ReleasedGrace
	ebpf.ReleasedGrace = 0
	defer func() { ebpf.ReleasedGrace = grace }()
	if _, err := r.SweepReleased(); err != nil {
		t.Fatal(err)
	}
	for _, name := range perSocket {
		// The held connection's own records (2 TCP: socket and 4-tuple)
		// are still there while the helper lives.
		if n := pinnedEntries(t, d.pins, name); n > maps[name]+1 {
			t.Errorf("%s: %d entries after the soak, %d before", name, n, maps[name])
		}
	}
	// fwpd's own account agrees: a record per redirected connection and
	// DNS flow, each ended with its socket (the held connection's is not
	// yet).
	m2 := d.metrics(t)
	made, rel := `fwp_kernel_redirect_records_total{event="made"}`, `fwp_kernel_redirect_records_total{event="released"}`
	dm, dr := metricValue(t, m2, made)-metricValue(t, m0, made), metricValue(t, m2, rel)-metricValue(t, m0, rel)
	if dm < float64(2*soakOps) || dm-dr > 1 {
		t.Errorf("fwpd's kernel made %v redirect records during the soak (want at least %d) and ended %v", dm, 2*soakOps, dr)
	}
}
