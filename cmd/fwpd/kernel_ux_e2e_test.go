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
