//go:build linux

package main_test

import (
	"net"
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

// TestE2ESystemdNotify starts fwpd as systemd starts a Type=notify unit,
// with $NOTIFY_SOCKET naming a datagram socket the test listens on (a
// path, and an abstract '@' name): fwpd must send READY=1 only once its
// socket serves (and, with the kernel datapath, the hooks are attached),
// and STOPPING=1 on SIGTERM.
func TestE2ESystemdNotify(t *testing.T) {
	for _, c := range []struct {
		name     string
		abstract bool
		kernel   bool
	}{{"path", false, false}, {"abstract", true, false}, {"kernel datapath", true, true}} {
		t.Run(c.name, func(t *testing.T) {
			var dir string
			var extra []string
			if c.kernel {
				testutil.RequireRoot(t)
				cg := testutil.NewCgroup(t)
				dir = kernelDir(t)
				extra = []string{"--datapath", "kernel", "--cgroup", cg.Path, "--bpffs-dir", filepath.Join(dir, "bpf", "fwp"), "--proxy-cgroup", "none"}
			} else {
				dir = shortDir(t)
				extra = []string{"--datapath", "none"}
			}
			name := filepath.Join(dir, "notify")
			if c.abstract {
				name = "@" + randName("fwp-notify-")
			}
			l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			sock := filepath.Join(dir, "s")
			cmd := exec.Command(bins.fwpd, append([]string{"--socket", sock, "--state-dir", filepath.Join(dir, "state")}, extra...)...)
			cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+name)
			log := &syncBuffer{}
			cmd.Stderr = log
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { cmd.Process.Kill(); cmd.Wait() }()
			recv := func(want string) string {
				t.Helper()
				l.SetReadDeadline(time.Now().Add(20 * time.Second))
				buf := make([]byte, 4096)
				n, err := l.Read(buf)
				if err != nil {
					t.Fatalf("waiting for %s: %v\nfwpd:\n%s", want, err, log)
				}
				msg := string(buf[:n])
				if !strings.Contains("\n"+msg+"\n", "\n"+want+"\n") {
					t.Fatalf("got %q, want %s", msg, want)
				}
				return msg
			}
			msg := recv("READY=1")
			if !strings.Contains(msg, "MAINPID="+strconv.Itoa(cmd.Process.Pid)) {
				t.Errorf("READY without fwpd's MAINPID: %q", msg)
			}
			// Ready means serving: a client gets an answer at once.
			ctl := exec.Command(bins.fwpctl, "sessions")
			ctl.Env = append(os.Environ(), "FWPD_SOCKET="+sock)
			if out, err := ctl.CombinedOutput(); err != nil {
				t.Fatalf("fwpctl right after READY=1: %v\n%s", err, out)
			}
			if c.kernel && !strings.Contains(log.String(), "kernel datapath attached") {
				t.Fatalf("READY=1 before the datapath was attached:\n%s", log)
			}
			cmd.Process.Signal(syscall.SIGTERM)
			recv("STOPPING=1")
			if err := cmd.Wait(); err != nil {
				t.Fatalf("fwpd after SIGTERM: %v\n%s", err, log)
			}
		})
	}
}

// TestSystemdUnit checks packaging/fwpd.service: a Type=notify unit with
// the state and runtime directories systemd makes root's, whose ExecStart
// flags fwpd knows, and that systemd-analyze accepts.
func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile("../../packaging/fwpd.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, want := range []string{"\nType=notify\n", "\nStateDirectory=fwp\n", "\nRuntimeDirectory=fwp\n", "\nProtectSystem=strict\n", "CAP_BPF", "CAP_NET_ADMIN"} {
		if !strings.Contains(unit, want) {
			t.Errorf("the unit lacks %q", strings.TrimSpace(want))
		}
	}
	var exec0 string
	for _, line := range strings.Split(unit, "\n") {
		if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
			exec0 = v
		}
	}
	args := strings.Fields(exec0)
	if len(args) < 2 {
		t.Fatalf("ExecStart=%q", exec0)
	}
	// --help after the unit's flags: fwpd parses them and exits 0, or
	// fails on one it does not know.
	if out, err := exec.Command(bins.fwpd, append(args[1:], "--help")...).CombinedOutput(); err != nil {
		t.Fatalf("fwpd %v: %v\n%s", args[1:], err, out)
	}
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skipf("no systemd-analyze to verify the unit with (the checks above ran): %v", err)
	}
	f := filepath.Join(t.TempDir(), "fwpd.service")
	if err := os.WriteFile(f, []byte(strings.Replace(unit, "ExecStart="+args[0], "ExecStart="+bins.fwpd, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(sa, "verify", f).CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
