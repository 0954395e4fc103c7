package main_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"fwp/internal/testutil"
	"fwp/internal/unix"
)

// fwpd mounts a bpffs for its pins when none is there, and unmounts it
// when it stops (without --keep-hooks-on-exit); --cgroup on a directory
// not of the cgroup v2 hierarchy says so.
func TestE2EKernelBPFFSAndCgroupV1(t *testing.T) {
	testutil.RequireRoot(t)
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	fs := filepath.Join(dir, "bpf")
	d := startKernelDaemon(t, cg, dir)
	if ok, err := unix.IsBPFFS(fs); err != nil || !ok {
		t.Fatalf("no bpffs under the pins while fwpd runs: %v %v", ok, err)
	}
	// The events table names the filter by key next to its ID, in
	// aligned columns.
	requireTool(t, "curl")
	sc, _ := startScenario(t, cg, d.pins)
	if errs, code := d.apply(t, blockHost3); code != 0 {
		t.Fatal(errs)
	}
	if r := sc.run(curl("http://127.0.0.3:9090/")...); r.Code != 7 {
		t.Fatalf("not blocked: %+v", r)
	}
	ev := d.mustCtl("events")
	lines := strings.Split(strings.TrimSpace(ev), "\n")
	at := strings.Index(lines[0], "FILTER")
	var row string
	for _, l := range lines[1:] {
		if strings.Contains(l, "block-host3(#") {
			row = l
		}
	}
	if at < 0 || row == "" || strings.Index(row, "block-host3(#") != at || !strings.Contains(row, " tcp ") {
		t.Fatalf("events table: want the filter's key and ID under FILTER and the protocol by name:\n%s", ev)
	}
	d.stop(syscall.SIGTERM)
	if ok, err := unix.IsBPFFS(fs); err != nil || ok {
		t.Fatalf("the bpffs fwpd mounted is still mounted after it stopped: %v %v\n%s", ok, err, d.log)
	}
	// A cgroup v1 directory (when the machine has one) and a plain one.
	bad := []string{t.TempDir()}
	if b, err := os.ReadFile("/proc/mounts"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 3 && f[2] == "cgroup" {
				bad = append(bad, f[1])
				break
			}
		}
	}
	for _, cgroup := range bad {
		sd := shortDir(t)
		out, err := exec.Command(bins.fwpd, "--socket", filepath.Join(sd, "s"), "--state-dir", filepath.Join(sd, "state"),
			"--bpffs-dir", filepath.Join(dir, "bpf", "fwp"), "--cgroup", cgroup).CombinedOutput()
		if exitCode(err) != 1 || !strings.Contains(string(out), cgroup+" is not a cgroup v2 directory") || strings.Contains(string(out), "bad file descriptor") {
			t.Errorf("fwpd --cgroup %s: exit %d\n%s", cgroup, exitCode(err), out)
		}
	}
}
