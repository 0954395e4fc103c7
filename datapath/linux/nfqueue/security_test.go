//go:build linux

package nfqueue

import (
	"crypto/rand"
	"encoding/hex"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"testing"

	"fwp/internal/testutil"
)

// newUser adds a system user without a home for the test and removes it
// when the test ends.
func newUser(t *testing.T) (uid, gid string) {
	t.Helper()
	var b [4]byte
	rand.Read(b[:])
	name := "fwp17" + hex.EncodeToString(b[:])
	if out, err := exec.Command("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name).CombinedOutput(); err != nil {
		testutil.Unavailable(t, &exec.Error{Name: "useradd", Err: err})
		t.Fatalf("useradd: %s", out)
	}
	t.Cleanup(func() { exec.Command("userdel", name).Run() })
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	return u.Uid, u.Gid
}

// An unprivileged program in the hooked cgroup is decided by the Go
// callout like any other (which sees its user), and cannot forge fwp's
// permit bit on its socket: setting SO_MARK needs CAP_NET_ADMIN.
func TestUnprivilegedProgram(t *testing.T) {
	for _, tool := range []string{"setpriv", "socat", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Unavailable(t, err)
		}
	}
	fx := newFixture(t, pendTimeout)
	uid, gid := newUser(t)
	as := func(args ...string) (int, string) {
		f := fx.call(t, "as "+uid+" "+gid+" "+strings.Join(args, " "))
		code, err := strconv.Atoi(f[0])
		if err != nil {
			t.Fatalf("as %v: %v", args, f)
		}
		return code, strings.Join(f[1:], " ")
	}
	if code, msg := as("curl", "-sS", "-o", "/dev/null", "--max-time", "5", "http://127.0.0.1:8001/"); code != 0 {
		t.Fatalf("unprivileged curl through a permitting callout: exit %d %s", code, msg)
	}
	if got := strconv.FormatInt(fx.uid.Load(), 10); got != uid {
		t.Fatalf("the callout saw user %s, the program ran as %s", got, uid)
	}
	if code, msg := as("curl", "-sS", "-o", "/dev/null", "--max-time", "5", "http://127.0.0.1:8003/"); code != 7 {
		t.Fatalf("unprivileged curl through a blocking callout: exit %d %s, want 7", code, msg)
	}
	// SOL_SOCKET=1, SO_MARK=36, the permit bit 0x04000000 (socat sets
	// it once connected, so the port is one the callout permits).
	code, msg := as("socat", "-u", "OPEN:/dev/null", "TCP4:127.0.0.1:8001,setsockopt-int=1:36:67108864")
	if code == 0 || !strings.Contains(msg, "not permitted") {
		t.Fatalf("unprivileged socat setting the permit mark: exit %d %s; want the setsockopt refused", code, msg)
	}
	fx.checkClean(t)
}
