package mgmt

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
	"fwp/internal/trust"
)

// TestStoreRefusesUntrusted reproduces issue 16's attack: an unprivileged
// user creates the state directory first (mode 0777), so that they can
// later swap the journal for one of their own. The store must refuse to
// open it, naming the path, the owner and the mode; and the same for a
// store file another user owns or can write.
func TestStoreRefusesUntrusted(t *testing.T) {
	testutil.RequireRoot(t)
	u := testutil.NewUser(t)
	base, err := os.MkdirTemp("", "fwpstore") // under the shared, sticky /tmp
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o777|os.ModeSticky) // a /tmp of its own, where the user may create
	newStore := func(dir string) error {
		m, err := New(engine.New(engine.Options{}), Options{StateDir: dir, TxnTimeout: 200 * time.Millisecond})
		if err == nil {
			m.Close()
		}
		return err
	}
	wantUntrusted := func(what string, err error, path, mode string) {
		t.Helper()
		var pe *trust.PathError
		if !errors.Is(err, ErrStore) || !errors.As(err, &pe) {
			t.Fatalf("%s: %v; want ErrStore and a trust.PathError", what, err)
		}
		msg := err.Error()
		if pe.Path != path || !strings.Contains(msg, path) || !strings.Contains(msg, mode) || !strings.Contains(msg, "uid "+strconv.Itoa(int(u.UID))) {
			t.Fatalf("%s: %q; want it to name %s, mode %s and uid %d", what, msg, path, mode, u.UID)
		}
	}

	// The user creates the directory, as the user, through the kernel.
	attacked := filepath.Join(base, "state")
	if out, err := u.Command("mkdir", "-m", "0777", attacked).CombinedOutput(); err != nil {
		t.Fatalf("mkdir as %s: %v: %s", u.Name, err, out)
	}
	wantUntrusted("state directory the user made", newStore(attacked), attacked, "drwxrwxrwx")
	if _, err := os.Stat(filepath.Join(attacked, "policy.journal")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the refused store wrote its journal there: %v", err)
	}

	// A store of root's own; then one of its files handed to the user,
	// and one made writable by all.
	own := filepath.Join(base, "own")
	if err := newStore(own); err != nil {
		t.Fatalf("root's own directory under a sticky parent: %v", err)
	}
	j := filepath.Join(own, "policy.journal")
	os.Chown(j, int(u.UID), int(u.GID))
	wantUntrusted("journal owned by the user", newStore(own), j, "-rw-------")
	os.Chown(j, 0, 0)
	if err := newStore(own); err != nil {
		t.Fatalf("after chown back: %v", err)
	}
	os.Chmod(j, 0o646)
	err = newStore(own)
	if pe := (*trust.PathError)(nil); !errors.As(err, &pe) || pe.Path != j || pe.Mode.String() != "-rw-r--rw-" {
		t.Fatalf("journal writable by others: %v", err)
	}
}

// A reader's copy of a provider context (data withheld) applied back by
// an administrator must not blank the data: it is refused, by key.
func TestRedactedContextNotAdded(t *testing.T) {
	m := newManager(t, "")
	s := open(m, "a", false)
	_, err := m.Add(context.Background(), s, Object{ProviderContext: &ProviderContext{Key: "creds", DataRedacted: true, DataLength: 19}})
	if !errors.Is(err, ErrInvalidPolicy) || !strings.Contains(err.Error(), `"creds"`) || !strings.Contains(err.Error(), "redacted") {
		t.Fatalf("adding a redacted copy: %v", err)
	}
	if has(m, KindProviderContext, "creds") {
		t.Fatal("the redacted copy was added")
	}
}
