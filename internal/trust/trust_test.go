package trust_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"fwp/internal/testutil"
	"fwp/internal/trust"
)

// TestUntrusted plants each way another user could control a path fwpd
// trusts; each must be refused with an error naming the path, its owner
// and its mode, and the sound layouts must pass.
func TestUntrusted(t *testing.T) {
	testutil.RequireRoot(t)
	u := testutil.NewUser(t)
	base, err := os.MkdirTemp("", "fwptrust") // in /tmp: a sticky parent
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	mk := func(rel string, mode os.FileMode, uid uint32) string {
		p := filepath.Join(base, rel)
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, int(uid), -1); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// Sound: ours, under root's sticky /tmp; a private dir under ours.
	if err := trust.Dir("state directory", mk("ok", 0o755, 0)); err != nil {
		t.Errorf("a root-owned 0755 directory under /tmp: %v", err)
	}
	if err := trust.Dir("state directory", mk("ok/sub", 0o700, 0)); err != nil {
		t.Errorf("a root-owned 0700 directory: %v", err)
	}
	f := filepath.Join(base, "ok", "policy.journal")
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := trust.File("store file", f); err != nil {
		t.Errorf("a root-owned 0600 file: %v", err)
	}

	bad := []struct {
		name, what, path, blame, mode string
		dir                           bool
	}{
		{"dir owned by another user", "state directory", mk("theirs", 0o700, u.UID), "theirs", "drwx------", true},
		{"dir mode 0777 (the issue's attack)", "state directory", mk("open", 0o777, u.UID), "open", "drwxrwxrwx", true},
		{"dir group-writable", "state directory", mk("gw", 0o775, 0), "gw", "drwxrwxr-x", true},
		{"parent owned by another user", "state directory", mk("theirparent/state", 0o700, 0), "theirparent", "drwx------", true},
		{"parent writable without sticky", "state directory", mk("openparent/state", 0o700, 0), "openparent", "drwxrwxrwx", true},
		{"the shared /tmp itself", "socket directory", os.TempDir(), os.TempDir(), "dtrwxrwxrwx", true},
	}
	os.Chown(filepath.Join(base, "theirparent"), int(u.UID), -1)
	os.Chmod(filepath.Join(base, "openparent"), 0o777)
	// A file of theirs, a group-writable one, and a symlink to their dir.
	theirs := filepath.Join(base, "ok", "policy.json")
	os.WriteFile(theirs, nil, 0o600)
	os.Chown(theirs, int(u.UID), -1)
	bad = append(bad, struct {
		name, what, path, blame, mode string
		dir                           bool
	}{"file owned by another user", "store file", theirs, "ok/policy.json", "-rw-------", false})
	gw := filepath.Join(base, "ok", "lock")
	os.WriteFile(gw, nil, 0o600)
	os.Chmod(gw, 0o666)
	bad = append(bad, struct {
		name, what, path, blame, mode string
		dir                           bool
	}{"file writable by all", "store file", gw, "ok/lock", "-rw-rw-rw-", false})
	link := filepath.Join(base, "ok", "link")
	os.Symlink(filepath.Join(base, "theirs"), link)
	bad = append(bad, struct {
		name, what, path, blame, mode string
		dir                           bool
	}{"symlink to another user's dir", "state directory", link, "theirs", "drwx------", true})

	for _, c := range bad {
		var err error
		if c.dir {
			err = trust.Dir(c.what, c.path)
		} else {
			err = trust.File(c.what, c.path)
		}
		var pe *trust.PathError
		if !errors.Is(err, trust.ErrUntrusted) || !errors.As(err, &pe) {
			t.Errorf("%s: %v; want trust.ErrUntrusted", c.name, err)
			continue
		}
		blame := c.blame
		if !filepath.IsAbs(blame) {
			blame = filepath.Join(base, blame)
		}
		if pe.Path != blame || pe.Mode.String() != c.mode || !strings.Contains(err.Error(), c.what) || !strings.Contains(err.Error(), pe.Mode.String()) {
			t.Errorf("%s: %v (path %s mode %s); want path %s mode %s", c.name, err, pe.Path, pe.Mode, blame, c.mode)
		}
	}
}
