package main_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"fwp/client"
	"fwp/internal/testutil"
)

// holdConn opens a raw connection and sends nothing: it holds one of the
// daemon's connection slots until closed.
func holdConn(t *testing.T, path string) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second)) // reads below fail rather than hang
	t.Cleanup(func() { c.Close() })
	return c
}

// The real fwpd with --max-connections 2: two held connections on the API
// socket make fwpctl fail as unavailable; when one goes, fwpctl works
// again. The records socket has its own bound of two, and refuses the
// third at once.
func TestE2EMaxConnections(t *testing.T) {
	dir := shortDir(t)
	d := startDaemon(t, dir, "--max-connections", "2", "--log-level", "debug")
	held := []net.Conn{holdConn(t, d.sock), holdConn(t, d.sock)}
	if _, errs, code := d.ctl("filter", "list"); code != 4 {
		t.Fatalf("third connection: fwpctl exit %d (%s), want 4 (unavailable)", code, errs)
	}
	held[0].Close()
	// fwpd frees the slot when it reads the end of the connection: retry,
	// failing only if it never does.
	for deadline := time.Now().Add(30 * time.Second); ; {
		_, errs, code := d.ctl("filter", "list")
		if code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no slot freed: exit %d %s\n%s", code, errs, d.log)
		}
		time.Sleep(20 * time.Millisecond)
	}

	rec := client.RecordsSocket(d.sock)
	r1, r2 := holdConn(t, rec), holdConn(t, rec)
	if b, err := io.ReadAll(holdConn(t, rec)); err != nil || len(b) != 0 {
		t.Fatalf("third records connection: %q %v, want closed without a reply", b, err)
	}
	for _, c := range []net.Conn{r1, r2} {
		c.(*net.UnixConn).CloseWrite()
		if b, _ := io.ReadAll(c); !strings.HasPrefix(string(b), "invalid_argument ") {
			t.Fatalf("held records connection: %q, want a reply", b)
		}
	}
	if log := d.log.String(); !strings.Contains(log, "refusing connections beyond --max-connections") ||
		!strings.Contains(log, "connection refused: too many connections") {
		t.Errorf("refusals not logged:\n%s", log)
	}
	d.mustCtl("filter", "list") // still serving
}

func TestE2EMaxConnectionsFlag(t *testing.T) {
	out, err := exec.Command(bins.fwpd, "--help").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "-max-connections") {
		t.Errorf("fwpd --help: %v\n%s", err, out)
	}
	dir := shortDir(t)
	for _, bad := range []string{"0", "-1", "x"} {
		cmd := exec.Command(bins.fwpd, "--socket", dir+"/s", "--state-dir", dir+"/st", "--datapath", "none", "--max-connections", bad)
		var ee *exec.ExitError
		if out, err := cmd.CombinedOutput(); !errors.As(err, &ee) || !strings.Contains(string(out), "max-connections") {
			t.Errorf("--max-connections %s: %v\n%s", bad, err, out)
		}
	}
}

// Administration by supplementary group, on the groups the kernel
// recorded at connect (SO_PEERGROUPS): fwpctl runs with root's uid and
// gid but root is not an administrator (--no-root-admin), so only its
// supplementary group can make it one. (Its primary group, 0, is made a
// reader group so that the test can read back.)
func TestE2EAdminBySupplementaryGroup(t *testing.T) {
	testutil.RequireRoot(t)
	dir := shortDir(t)
	d := startDaemon(t, dir, "--no-root-admin", "--admin-group", "4242", "--reader-group", "0")
	ctlAs := func(groups []uint32, args ...string) (string, int) {
		var errb bytes.Buffer
		cmd := exec.Command(bins.fwpctl, args...)
		cmd.Env = append(os.Environ(), "FWPD_SOCKET="+d.sock)
		cmd.Stderr = &errb
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 0, Gid: 0, Groups: groups}}
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return errb.String(), ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return errb.String(), 0
	}
	if errs, code := ctlAs([]uint32{4243}, "provider", "add", "--key", "p"); code != 3 || !strings.Contains(errs, "access denied") {
		t.Fatalf("not in the admin group: exit %d %s", code, errs)
	}
	if errs, code := ctlAs([]uint32{4243, 4242}, "provider", "add", "--key", "p"); code != 0 {
		t.Fatalf("in the admin group: exit %d %s", code, errs)
	}
	if out := d.mustCtl("provider", "list", "-o", "json"); !strings.Contains(out, `"p"`) {
		t.Fatalf("the admin's write is missing:\n%s", out)
	}
}
