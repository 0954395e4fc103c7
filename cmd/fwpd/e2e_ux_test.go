package main_test

import (
	"bufio"
	"context"
	"debug/buildinfo"
	"encoding/json"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"fwp/client"
)

// fwpd --version and fwpctl version print the build: the VCS revision the
// go command stamped (the binaries are built from this repository), and
// fwpctl asks the daemon for its own over the API.
func TestE2EVersion(t *testing.T) {
	out, err := exec.Command(bins.fwpd, "--version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "fwpd ") {
		t.Fatalf("fwpd --version: %v %q", err, out)
	}
	// What the go command stamped (no revision under -buildvcs=false, or
	// in a git worktree) is what --version must print.
	bi, err := buildinfo.ReadFile(bins.fwpd)
	if err != nil {
		t.Fatal(err)
	}
	rev := ""
	for _, st := range bi.Settings {
		if st.Key == "vcs.revision" {
			rev = st.Value[:12]
		}
	}
	if !strings.HasPrefix(string(out), "fwpd "+bi.Main.Version) || (rev != "" && !strings.Contains(string(out), "(rev "+rev)) || !strings.Contains(string(out), bi.GoVersion) {
		t.Errorf("fwpd --version %q, want %s rev %q %s", out, bi.Main.Version, rev, bi.GoVersion)
	}
	dir := shortDir(t)
	d := startDaemon(t, dir)
	o := d.mustCtl("version")
	lines := strings.Split(strings.TrimSpace(o), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "fwpctl ") || !strings.HasPrefix(lines[1], "fwpd ") ||
		strings.TrimSpace(strings.TrimPrefix(lines[1], "fwpd")) != strings.TrimSpace(strings.TrimPrefix(string(out), "fwpd")) {
		t.Fatalf("fwpctl version:\n%s\nwant fwpctl's line and the daemon's %q", o, out)
	}
	var v struct {
		Client struct{ Revision string }  `json:"fwpctl"`
		Daemon *struct{ Revision string } `json:"fwpd"`
	}
	if err := json.Unmarshal([]byte(d.mustCtl("version", "-o", "json")), &v); err != nil || v.Daemon == nil || (rev != "" && !strings.HasPrefix(v.Daemon.Revision, rev)) {
		t.Fatalf("version -o json: %+v %v", v, err)
	}
	d.stop(syscall.SIGTERM)
	// Without a daemon: fwpctl's own line, and exit 4.
	o, errs, code := d.ctl("version")
	if code != 4 || !strings.HasPrefix(o, "fwpctl ") || strings.Contains(o, "fwpd ") || !strings.Contains(errs, "is fwpd running?") {
		t.Fatalf("version without fwpd: exit %d, %q, %q", code, o, errs)
	}
	// fwpd's usage errors exit 2 and --help documents the exit codes.
	if b, err := exec.Command(bins.fwpd, "--no-such-flag").CombinedOutput(); exitCode(err) != 2 {
		t.Errorf("fwpd --no-such-flag: exit %d %s", exitCode(err), b)
	}
	if b, _ := exec.Command(bins.fwpd, "--help").CombinedOutput(); !strings.Contains(string(b), "exit status: 0") || !strings.Contains(string(b), "2 usage error") {
		t.Errorf("fwpd --help does not document its exit codes:\n%s", b)
	}
}

func exitCode(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// startCtl starts a long-running fwpctl and waits for its first line.
func (d *daemon) startCtl(t *testing.T, args ...string) (*exec.Cmd, *syncBuffer, *bufio.Scanner) {
	cmd := exec.Command(bins.fwpctl, args...)
	cmd.Env = append(os.Environ(), "FWPD_SOCKET="+d.sock)
	errb := &syncBuffer{}
	cmd.Stderr = errb
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(out)
	if !sc.Scan() {
		t.Fatalf("fwpctl %v printed nothing: %s", args, errb)
	}
	return cmd, errb, sc
}

// events --follow and watch say when fwpd goes away and exit 4, rather
// than ending as if all was well.
func TestE2EFollowSaysWhenDaemonGoes(t *testing.T) {
	for _, args := range [][]string{{"events", "--follow"}, {"watch"}} {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			d := startDaemon(t, shortDir(t))
			cmd, errb, sc := d.startCtl(t, args...)
			if h := sc.Text(); !strings.Contains(h, "SEQ") && !strings.Contains(h, "CHANGE") {
				t.Fatalf("%v: header %q", args, h)
			}
			// The follow is in place once the session shows.
			for deadline := time.Now().Add(10 * time.Second); !strings.Contains(d.mustCtl("sessions"), "fwpctl"); time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("no follower session")
				}
			}
			d.stop(sig)
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if exitCode(err) != 4 || !strings.Contains(errb.String(), "fwpd went away") {
					t.Fatalf("%v after fwpd's %v: exit %d, stderr %q", args, sig, exitCode(err), errb)
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("%v still runs after fwpd's %v", args, sig)
			}
		}
	}
}

// Tables are aligned (tabwriter), show keys next to IDs and times in
// local time; -o json is what it was.
func TestE2ETables(t *testing.T) {
	d := startDaemon(t, shortDir(t))
	d.mustCtl("apply", "-f", write(t, t.TempDir(), "p.yaml", policyYAML))
	out := d.mustCtl("filter", "list")
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	col := func(l, name string) int { return strings.Index(l, name) }
	for _, name := range []string{"PROVIDER", "LAYER", "ACTION"} {
		at := col(lines[0], name)
		for _, l := range lines[1:] {
			if at < 0 || len(l) <= at || l[at-1] != ' ' || l[at] == ' ' {
				t.Fatalf("column %s is not aligned:\n%s", name, out)
			}
		}
	}
	d.mustCtl("filter", "add", "--key", "by-acme", "--provider", "acme", "--layer", "ALE_AUTH_CONNECT_V4", "--action", "block")
	out = d.mustCtl("filter", "list")
	if !regexp.MustCompile(`(?m)^\d+\s+by-acme\s+acme\s+ALE_AUTH_CONNECT_V4`).MatchString(out) {
		t.Fatalf("filter list lacks the provider key next to the filter's:\n%s", out)
	}
	out = d.mustCtl("sessions")
	now := time.Now().Format("2006-01-02 15:")
	if !strings.Contains(out, now) || !strings.Contains(out, "APP") {
		t.Fatalf("sessions: want local times (%s...) and an APP column:\n%s", now, out)
	}
	if !regexp.MustCompile(`(?m)^\d+\s+\d+\s+\d+\s+fwpctl\s+/\S*fwpctl\s`).MatchString(out) {
		t.Fatalf("sessions: the APP of fwpctl's own session is not its path:\n%s", out)
	}
	var ss []map[string]any
	if err := json.Unmarshal([]byte(d.mustCtl("sessions", "-o", "json")), &ss); err != nil || len(ss) == 0 || ss[0]["opened_at"] == nil {
		t.Fatalf("sessions -o json: %v %v", ss, err)
	}
}

// A policy that is legal but almost surely wrong applies, with a warning
// naming the object and its line; one that cannot work is refused.
func TestE2EApplyWarns(t *testing.T) {
	d := startDaemon(t, shortDir(t))
	f := write(t, t.TempDir(), "p.yaml", `filters:
  - key: ok
    layer: ALE_AUTH_CONNECT_V4
    action: block
    conditions: [{field: ip_remote_port, value: 23}]
  - key: port-zero
    layer: ALE_AUTH_CONNECT_V4
    action: block
    conditions: [{field: ip_remote_port, value: 0}]
`)
	out, errs, code := d.ctl("apply", "-f", f)
	if code != 0 || !strings.Contains(out, "2 added") || !strings.Contains(errs, "warning: "+f+`:6: filter "port-zero"`) || !strings.Contains(errs, "only remote port 0") {
		t.Fatalf("apply: exit %d, %q, %q", code, out, errs)
	}
	out, errs, code = d.ctl("filter", "add", "--key", "z2", "--layer", "ALE_AUTH_CONNECT_V6", "--action", "block", "--cond", "ip_remote_port=0")
	if code != 0 || !strings.Contains(errs, `warning: filter "z2"`) {
		t.Fatalf("filter add: exit %d, %q, %q", code, out, errs)
	}
	if _, errs, _ := d.ctl("filter", "add", "--key", "z3", "--layer", "ALE_AUTH_CONNECT_V6", "--action", "block", "--cond", "ip_remote_port=80"); strings.Contains(errs, "warning") {
		t.Fatalf("a warning for port 80: %q", errs)
	}
}

// When fwpd dies while fwpctl's apply waits for it, fwpctl says that it
// cannot know whether the transaction committed, and how to check.
func TestE2EApplyDaemonDies(t *testing.T) {
	d := startDaemon(t, shortDir(t), "--txn-timeout", "60s")
	// Another session holds the transaction lock: the apply waits in fwpd.
	c, err := client.Dial(context.Background(), d.sock, client.Options{Name: "holder"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Drop()
	if err := c.Begin(context.Background()); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bins.fwpctl, "apply", "-f", write(t, t.TempDir(), "p.yaml", policyYAML))
	cmd.Env = append(os.Environ(), "FWPD_SOCKET="+d.sock)
	errb := &syncBuffer{}
	cmd.Stderr = errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var ss []struct{ Name string }
		_ = json.Unmarshal([]byte(d.mustCtl("sessions", "-o", "json")), &ss)
		if len(ss) == 3 { // holder, the apply, this listing
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the apply's session never showed: %+v", ss)
		}
	}
	time.Sleep(100 * time.Millisecond) // the apply's request is in fwpd
	d.stop(syscall.SIGKILL)
	err = cmd.Wait()
	if exitCode(err) != 4 || !strings.Contains(errb.String(), "cannot know whether the transaction committed") || !strings.Contains(errb.String(), "fwpctl filter list") {
		t.Fatalf("apply when fwpd dies: exit %d, %q", exitCode(err), errb)
	}
}

// At the connection limit fwpd closes new connections at once: fwpctl
// says so, rather than asking whether fwpd runs.
func TestE2EConnectionLimitMessage(t *testing.T) {
	d := startDaemon(t, shortDir(t), "--max-connections", "2")
	holdConn(t, d.sock)
	holdConn(t, d.sock)
	_, errs, code := d.ctl("filter", "list")
	if code != 4 || !strings.Contains(errs, "connection limit") || !strings.Contains(errs, "--max-connections") || strings.Contains(errs, "is fwpd running") {
		t.Fatalf("at the limit: exit %d, %q", code, errs)
	}
	d.stop(syscall.SIGTERM)
	if _, errs, code := d.ctl("filter", "list"); code != 4 || !strings.Contains(errs, "is fwpd running?") || strings.Contains(errs, "connection limit") {
		t.Fatalf("no daemon: exit %d, %q", code, errs)
	}
}
