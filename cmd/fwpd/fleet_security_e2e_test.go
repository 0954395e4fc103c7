//go:build linux

package main_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"fwp/fleet"
	"fwp/internal/etcdtest"
	"fwp/internal/testutil"
)

// TestE2EFleetTLSAndUnprivileged: fwpd and fwpctl reach a TLS etcd with
// client certificates given by flag; a local unprivileged user can
// neither change the fleet's objects through fwpd, nor read the host's
// fleet status file, nor write to etcd without a client key of its own.
func TestE2EFleetTLSAndUnprivileged(t *testing.T) {
	testutil.RequireRoot(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		testutil.Unavailable(t, err)
	}
	c := etcdtest.StartWith(t, 1, etcdtest.Options{TLS: true})
	cl := c.Client(t)
	eps := strings.Join(c.Endpoints(), ",")
	tlsArgs := []string{"--etcd-endpoints", eps, "--etcd-cert", c.TLS.ClientCert, "--etcd-key", c.TLS.ClientKey, "--etcd-cacert", c.TLS.CA}
	dir := shortDir(t)
	os.Chmod(dir, 0o755) // the socket is for everyone; the state directory (0700) is not
	d := startDaemon(t, dir, append([]string{"--policy-source", "etcd", "--node-name", "tls-host"}, tlsArgs...)...)
	doc := write(t, dir, "corp.yaml", blockHost3)
	out := d.mustCtl(append([]string{"fleet", "apply", "-f", doc, "-o", "json"}, tlsArgs...)...)
	if !strings.Contains(out, `"revision"`) {
		t.Fatalf("fleet apply over TLS: %s", out)
	}
	waitNodes(t, cl, 5*time.Second, "the host applies over TLS", func(ns map[string]fleet.Status) bool {
		return ns["tls-host"].Objects == 1 && ns["tls-host"].Connected
	})
	if keys := d.filterKeys(); fmt.Sprint(keys) != "[block-host3]" {
		t.Fatalf("filters: %v", keys)
	}

	// A real unprivileged user, and an fwpctl it can run.
	name := fmt.Sprintf("fwpfl%d", os.Getpid()%100000)
	if out, err := exec.Command("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name).CombinedOutput(); err != nil {
		testutil.Unavailable(t, fmt.Errorf("useradd: %v: %s", err, out))
	}
	t.Cleanup(func() { exec.Command("userdel", name).Run() })
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := os.MkdirTemp("", "fwpctl-pub")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pub) })
	os.Chmod(pub, 0o755)
	ctl := filepath.Join(pub, "fwpctl")
	if b, err := os.ReadFile(bins.fwpctl); err != nil || os.WriteFile(ctl, b, 0o755) != nil {
		t.Fatal("copying fwpctl", err)
	}
	asUser := func(args ...string) (string, int) {
		cmd := exec.Command("setpriv", append([]string{"--reuid=" + u.Uid, "--regid=" + u.Gid, "--clear-groups", ctl}, args...)...)
		cmd.Env = []string{"FWPD_SOCKET=" + d.sock, "PATH=/usr/bin:/bin"}
		var b bytes.Buffer
		cmd.Stdout, cmd.Stderr = &b, &b
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return b.String(), ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return b.String(), 0
	}
	// fwpd's socket is reachable (0666), but a user with neither the
	// admin nor the reader role may neither change nor read the policy
	// (docs/security.md).
	if out, code := asUser("filter", "delete", "block-host3"); code != 3 {
		t.Fatalf("an unprivileged user deleting a fleet filter: exit %d: %s", code, out)
	}
	if out, code := asUser("filter", "list"); code != 3 || strings.Contains(out, "block-host3") {
		t.Fatalf("an unprivileged user reading the filters: exit %d: %s", code, out)
	}
	// The host's status file is in the state directory (0700).
	if out, code := asUser("fleet", "status", "--local", filepath.Join(d.state, "fleet-status.json")); code == 0 || !strings.Contains(out, "permission denied") {
		t.Fatalf("an unprivileged user reading the status file: exit %d: %s", code, out)
	}
	// etcd: the client key is root's alone, and without one etcd refuses.
	if out, code := asUser(append([]string{"fleet", "apply", "-f", "/dev/null", "--name", "x"}, tlsArgs...)...); code == 0 || !strings.Contains(out, "permission denied") {
		t.Fatalf("an unprivileged user using fwpd's client key: exit %d: %s", code, out)
	}
	pubDoc := filepath.Join(pub, "evil.yaml")
	os.WriteFile(pubDoc, []byte("filters: []\n"), 0o644)
	caCopy := filepath.Join(pub, "ca.pem")
	if b, err := os.ReadFile(c.TLS.CA); err != nil || os.WriteFile(caCopy, b, 0o644) != nil {
		t.Fatal(err)
	}
	if out, code := asUser("fleet", "apply", "-f", pubDoc, "--etcd-endpoints", eps, "--etcd-cacert", caCopy, "--etcd-timeout", "2s"); code != 4 {
		t.Fatalf("an unprivileged user writing to etcd without a client certificate: exit %d: %s", code, out)
	}
	if r, err := cl.Get(t.Context(), fleet.PoliciesPrefix("/fwp/")+"evil"); err != nil || len(r.Kvs) != 0 {
		t.Fatalf("the refused write is in etcd: %v %v", r, err)
	}
}
