package main_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"fwp/client"
	"fwp/internal/testutil"
	"fwp/mgmt"
)

// hostFiltersE2ESize is the filters of TestE2EKernelHostFilters:
// FWP_FILTERS, or 100,000 (CI; a million takes tens of seconds in the
// management plane, docs/benchmarks.md).
var hostFiltersE2ESize = func() int {
	if n, err := strconv.Atoi(os.Getenv("FWP_FILTERS")); err == nil && n > 0 {
		return n
	}
	return 100_000
}()

// vmStatus returns fwpd's resident memory now and at its peak.
func vmStatus(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") || strings.HasPrefix(l, "VmHWM:") {
			out = append(out, strings.Join(strings.Fields(l), " "))
		}
	}
	return strings.Join(out, ", ")
}

// procCPU returns the CPU time (user + system) a process has used.
func procCPU(pid int) time.Duration {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	// The fields after the command's closing parenthesis: utime and stime
	// are the 12th and 13th, in clock ticks (100 per second).
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+st) * 10 * time.Millisecond
}

// TestE2EKernelHostFilters: a blocklist written as WFP writes it, one
// persistent filter per address, applied through fwpd in one transaction
// (Begin, batches of 10,000 ops as a client sends them, Commit: the
// store's journal, the engine, the kernel): a listed connect is refused,
// an unlisted one passes, and the filters come back from the store after
// a restart.
func TestE2EKernelHostFilters(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	n := hostFiltersE2ESize
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	d := startKernelDaemon(t, cg, dir)
	s, _ := startScenario(t, cg, d.pins)
	ops := make([]mgmt.Op, n)
	for i := range n {
		ops[i] = mgmt.Op{Add: &mgmt.Object{Filter: &mgmt.Filter{Key: "host-" + strconv.Itoa(i), Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Weight: "10",
			Lifetime: mgmt.LifetimePersistent, Conditions: []mgmt.Condition{{Field: "ip_remote_address", Match: "equal", Value: listedAddr(i)}}}}}
	}
	ctx := context.Background()
	c, err := client.Dial(ctx, d.sock, client.Options{Name: "hosts"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t.Logf("fwpd before: %s", vmStatus(d.cmd.Process.Pid))
	cpu0 := procCPU(d.cmd.Process.Pid)
	start := time.Now()
	if err := c.Begin(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i += 10_000 {
		if _, err := c.Apply(ctx, ops[i:min(n, i+10_000)]); err != nil {
			t.Fatal(err)
		}
	}
	sent := time.Since(start)
	if err := c.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d host filters through fwpd: %v (ops sent in %v, commit %v), fwpd CPU %v; fwpd after: %s", n, time.Since(start), sent, time.Since(start)-sent,
		procCPU(d.cmd.Process.Pid)-cpu0, vmStatus(d.cmd.Process.Pid))
	check := func(addr string, want int) {
		t.Helper()
		if r := s.run(curl("http://" + addr + ":9090/")...); r.Code != want {
			t.Fatalf("curl %s: exit %d, want %d (%s)", addr, r.Code, want, r.Err)
		}
	}
	// 9090 serves on every loopback address: a permitted connect gets 0.
	check(listedAddr(0), 7)
	check(listedAddr(n/2), 7)
	check(listedAddr(n-1), 7)
	check("127.1.0.1", 0)
	check(listedAddr(n), 0)
	// Restarted, fwpd loads them from its store in one transaction.
	c.Close()
	d.stop(syscall.SIGTERM)
	start = time.Now()
	d = startKernelDaemon(t, cg, dir)
	t.Logf("fwpd restart with %d stored filters: %v, fwpd CPU %v; fwpd after: %s", n, time.Since(start), procCPU(d.cmd.Process.Pid), vmStatus(d.cmd.Process.Pid))
	check(listedAddr(n/3), 7)
	check(listedAddr(n), 0)
}
