//go:build linux

package main_test

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"fwp/internal/testutil"
)

func runFwpd(t *testing.T, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(bins.fwpd, args...)
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill() // it started when it should have refused
		}
	}()
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(out), 0
}

func randName(prefix string) string {
	b := make([]byte, 6)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// TestE2ERefusesUntrustedPaths is issue 16's first attack, on the real
// fwpd: an unprivileged user creates the state directory (mode 0777)
// before root's fwpd first starts; fwpd must refuse to start, naming the
// path, the owner and the mode, and write nothing there. A socket straight
// in the shared /tmp is refused too.
func TestE2ERefusesUntrustedPaths(t *testing.T) {
	testutil.RequireRoot(t)
	u := testutil.NewUser(t)
	state := filepath.Join(os.TempDir(), randName("fwpattack"))
	if out, err := u.Command("mkdir", "-m", "0777", state).CombinedOutput(); err != nil {
		t.Fatalf("mkdir as %s: %v: %s", u.Name, err, out)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	dir := shortDir(t)
	out, code := runFwpd(t, "--datapath", "none", "--socket", filepath.Join(dir, "s"), "--state-dir", state)
	for _, want := range []string{"state directory " + state, "uid " + strconv.Itoa(int(u.UID)) + " (" + u.Name + ")", "drwxrwxrwx"} {
		if code != 1 || !strings.Contains(out, want) {
			t.Fatalf("fwpd on a state directory %s made: exit %d, want 1 and %q in:\n%s", u.Name, code, want, out)
		}
	}
	if ents, _ := os.ReadDir(state); len(ents) != 0 {
		t.Fatalf("fwpd wrote into the untrusted directory: %v", ents)
	}

	sock := filepath.Join(os.TempDir(), randName("fwpd")+".sock")
	out, code = runFwpd(t, "--datapath", "none", "--socket", sock, "--state-dir", filepath.Join(dir, "state"))
	if code != 1 || !strings.Contains(out, "socket directory "+os.TempDir()) || !strings.Contains(out, "sticky") {
		t.Fatalf("fwpd with its socket in %s: exit %d\n%s", os.TempDir(), code, out)
	}
	if _, err := os.Stat(sock); err == nil {
		os.Remove(sock)
		t.Fatal("fwpd listened in the shared directory")
	}
}

// TestE2EKernelRefusesForeignPins: with --keep-hooks-on-exit, fwpd adopts
// the pinned hooks and policy maps it finds; a pin another user owns is
// refused, named with its owner and mode.
func TestE2EKernelRefusesForeignPins(t *testing.T) {
	testutil.RequireRoot(t)
	u := testutil.NewUser(t)
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	d := startKernelDaemon(t, cg, dir, "--keep-hooks-on-exit")
	d.stop(syscall.SIGTERM)
	pin := filepath.Join(d.pins, "fwp_filters")
	if err := os.Chown(pin, int(u.UID), int(u.GID)); err != nil {
		t.Fatal(err)
	}
	out, code := runFwpd(t, "--socket", d.sock, "--state-dir", d.state, "--cgroup", cg.Path, "--bpffs-dir", d.pins, "--keep-hooks-on-exit")
	if code != 1 || !strings.Contains(out, pin) || !strings.Contains(out, "uid "+strconv.Itoa(int(u.UID))) {
		t.Fatalf("fwpd adopting a pin %s owns: exit %d\n%s", u.Name, code, out)
	}
	os.Chown(pin, 0, 0)
	d2 := startKernelDaemon(t, cg, dir) // without the flag: starts afresh, removes the pins
	d2.stop(syscall.SIGTERM)
}

// TestE2EKernelWaitsForPinLock is issue 16's item 5: a fwpd started while
// the previous one still holds --bpffs-dir (killed, its maps still being
// torn down) waits for it, saying so, and then starts.
func TestE2EKernelWaitsForPinLock(t *testing.T) {
	testutil.RequireRoot(t)
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	pins := filepath.Join(dir, "bpf", "fwp")
	sum := sha256.Sum256([]byte(pins))
	lock, err := os.OpenFile(filepath.Join(pinsLockDir(), "fwpd-pins-"+hex.EncodeToString(sum[:8])+".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(time.Second, func() { lock.Close() }) // the old process is gone
	d := startKernelDaemon(t, cg, dir)
	if !strings.Contains(d.log.String(), "waiting for it to exit") {
		t.Errorf("fwpd did not say it waited:\n%s", d.log)
	}
	d.stop(syscall.SIGTERM)
}
