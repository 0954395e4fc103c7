//go:build linux

package main_test

import (
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"fwp/internal/testutil"
)

// TestE2EAccessRoles is issue 16's second finding on the real fwpd and
// fwpctl: as a user with no role, `fwpctl context list` printed a provider
// context's bytes and `events` root's connections. Now an unprivileged
// user is refused, a member of --reader-group lists the policy with the
// data withheld (its length and sha256 shown) and reads net events, and
// an --admin-group member sees the data.
func TestE2EAccessRoles(t *testing.T) {
	testutil.RequireRoot(t)
	admGroup, _ := testutil.NewGroup(t)
	rdGroup, _ := testutil.NewGroup(t)
	admin := testutil.NewUser(t, admGroup)
	reader := testutil.NewUser(t, rdGroup)
	nobody := testutil.NewUser(t)
	dir := shortDir(t)
	if err := os.Chmod(dir, 0o755); err != nil { // others reach the socket
		t.Fatal(err)
	}
	d := startDaemon(t, dir, "--admin-group", admGroup, "--reader-group", rdGroup)
	const secret = "proxy-password-1234"
	pol := filepath.Join(dir, "p.yaml")
	if err := os.WriteFile(pol, []byte("provider_contexts:\n  - {key: creds, data: \""+secret+"\"}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d.mustCtl("apply", "-f", pol)
	// The private test binaries' directory: run a copy of fwpctl.
	b, err := os.ReadFile(bins.fwpctl)
	if err != nil {
		t.Fatal(err)
	}
	ctl := filepath.Join(dir, "fwpctl")
	if err := os.WriteFile(ctl, b, 0o755); err != nil {
		t.Fatal(err)
	}
	as := func(u *testutil.User, args ...string) (string, int) {
		cmd := u.Command(ctl, args...)
		cmd.Env = []string{"FWPD_SOCKET=" + d.sock}
		out, err := cmd.CombinedOutput()
		if err != nil && cmd.ProcessState == nil {
			t.Fatal(err)
		}
		return string(out), cmd.ProcessState.ExitCode()
	}
	sum := fmt.Sprintf("%x", sha256.Sum256([]byte(secret)))
	for _, args := range [][]string{{"context", "list"}, {"context", "list", "-o", "json"}, {"events"}, {"sessions"}} {
		out, code := as(nobody, args...)
		if code == 0 || !strings.Contains(out, "access denied") || strings.Contains(out, secret) {
			t.Errorf("unprivileged fwpctl %v: exit %d\n%s", args, code, out)
		}
		out, code = as(reader, args...)
		if code != 0 || strings.Contains(out, secret) {
			t.Errorf("reader fwpctl %v: exit %d\n%s", args, code, out)
		}
		if args[0] == "context" && !strings.Contains(out, sum) {
			t.Errorf("reader fwpctl %v: no sha256 %s of the withheld data\n%s", args, sum, out)
		}
		out, code = as(admin, args...)
		if code != 0 || args[0] == "context" && !strings.Contains(out, secret) && !strings.Contains(out, base64.StdEncoding.EncodeToString([]byte(secret))) {
			t.Errorf("admin fwpctl %v: exit %d\n%s", args, code, out)
		}
	}
	if out, code := as(reader, "filter", "delete", "x"); code == 0 || !strings.Contains(out, "access denied") {
		t.Errorf("reader deleting: exit %d\n%s", code, out)
	}
}
