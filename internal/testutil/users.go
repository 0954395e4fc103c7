//go:build linux

package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"testing"
)

// User is a local user a test created (useradd), removed when it ends.
type User struct {
	Name     string
	UID, GID uint32
	Groups   []uint32 // supplementary
}

// NewGroup creates a local group (groupadd) and removes it when the test
// ends; it returns its name and gid. It needs root.
func NewGroup(t testing.TB) (string, uint32) {
	t.Helper()
	RequireRoot(t)
	name := "fwpt" + randHex(4)
	if out, err := exec.Command("groupadd", name).CombinedOutput(); err != nil {
		Unavailable(t, fmt.Errorf("groupadd: %v: %s", err, out))
	}
	t.Cleanup(func() { _ = exec.Command("groupdel", name).Run() })
	g, err := user.LookupGroup(name)
	if err != nil {
		t.Fatal(err)
	}
	gid, _ := strconv.ParseUint(g.Gid, 10, 32)
	return name, uint32(gid)
}

// NewUser creates a local user without a home or a login shell, member
// of the named supplementary groups, and removes it when the test ends.
// It needs root.
func NewUser(t testing.TB, groups ...string) *User {
	t.Helper()
	RequireRoot(t)
	name := "fwpt" + randHex(4)
	args := []string{"-M", "-U", "-s", "/usr/sbin/nologin"}
	if len(groups) > 0 {
		args = append(args, "-G", strings.Join(groups, ","))
	}
	if out, err := exec.Command("useradd", append(args, name)...).CombinedOutput(); err != nil {
		Unavailable(t, fmt.Errorf("useradd: %v: %s", err, out))
	}
	t.Cleanup(func() { _ = exec.Command("userdel", name).Run() })
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	out := &User{Name: name, UID: uint32(uid), GID: uint32(gid)}
	for _, g := range groups {
		gr, err := user.LookupGroup(g)
		if err != nil {
			t.Fatal(err)
		}
		n, _ := strconv.ParseUint(gr.Gid, 10, 32)
		out.Groups = append(out.Groups, uint32(n))
	}
	return out
}

// Command returns cmd run as u through setpriv: its uid, its gid and
// exactly its supplementary groups, as login would set them, so that the
// kernel's SO_PEERCRED and SO_PEERGROUPS name u.
func (u *User) Command(name string, args ...string) *exec.Cmd {
	sp := []string{"--reuid=" + strconv.FormatUint(uint64(u.UID), 10), "--regid=" + strconv.FormatUint(uint64(u.GID), 10)}
	if len(u.Groups) == 0 {
		sp = append(sp, "--clear-groups")
	} else {
		gs := make([]string, len(u.Groups))
		for i, g := range u.Groups {
			gs[i] = strconv.FormatUint(uint64(g), 10)
		}
		sp = append(sp, "--groups="+strings.Join(gs, ","))
	}
	sp = append(sp, "--", name)
	return exec.Command("setpriv", append(sp, args...)...)
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
