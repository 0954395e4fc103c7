package peercred

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"fwp/internal/testutil"
)

const childEnv = "FWP_PEERCRED_CHILD"

// TestMain doubles as the child of TestGroupsFixedAtConnect: it connects
// to the socket, then changes its supplementary groups, then says so.
func TestMain(m *testing.M) {
	if path := os.Getenv(childEnv); path != "" {
		if err := child(path); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func child(path string) error {
	c, err := net.Dial("unix", path)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := syscall.Setgroups([]int{changedGroup}); err != nil {
		return err
	}
	if _, err := c.Write([]byte{1}); err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, c) // until the parent is done
	return err
}

const changedGroup = 80000

// accepted returns the server end of a connection the dial function makes
// to a fresh unix socket.
func accepted(t *testing.T, dial func(path string)) (net.Conn, string) {
	t.Helper()
	l, path := testutil.UnixListener(t)
	go dial(path)
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, path
}

func ownGroups(t *testing.T) []uint32 {
	t.Helper()
	gs, err := os.Getgroups()
	if err != nil {
		t.Fatal(err)
	}
	var out []uint32
	for _, g := range gs {
		out = append(out, uint32(g))
	}
	slices.Sort(out)
	return out
}

func sameGroups(got, want []uint32) bool {
	got = slices.Clone(got)
	slices.Sort(got)
	return slices.Equal(got, want)
}

func TestFromConn(t *testing.T) {
	done := make(chan struct{})
	defer close(done)
	c, _ := accepted(t, func(path string) {
		c, err := net.Dial("unix", path)
		if err == nil {
			defer c.Close()
			<-done
		}
	})
	cr, err := FromConn(c)
	if err != nil {
		t.Fatal(err)
	}
	if cr.PID != uint32(os.Getpid()) || cr.UID != uint32(os.Getuid()) || cr.GID != uint32(os.Getgid()) {
		t.Fatalf("cred %+v", cr)
	}
	if want := ownGroups(t); !sameGroups(cr.Groups, want) {
		t.Fatalf("groups %v, want %v (getgroups)", cr.Groups, want)
	}
	// A wrapper that exposes the connection (as a limiting listener's
	// does) gives the same answer.
	wcr, err := FromConn(wrapped{wrapped{c}})
	if err != nil || wcr.PID != cr.PID || !slices.Equal(wcr.Groups, cr.Groups) {
		t.Fatalf("wrapped: %+v %v", wcr, err)
	}
	for _, bad := range []net.Conn{&net.TCPConn{}, wrapped{&net.TCPConn{}}, nil, loop{}} {
		if _, err := FromConn(bad); !errors.Is(err, ErrNoCred) {
			t.Errorf("%T: want ErrNoCred, got %v", bad, err)
		}
	}
}

type wrapped struct{ net.Conn }

func (w wrapped) NetConn() net.Conn { return w.Conn }

type loop struct{ net.Conn }

func (l loop) NetConn() net.Conn { return l }

// A buffer too small for the groups is retried with the size the kernel
// asks for, on a real socket pair (both ends carry this process's groups).
func TestPeerGroupsBufferSizes(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fds[0])
	defer syscall.Close(fds[1])
	want := ownGroups(t)
	for _, n := range []int{0, 1, len(want), initialGroups} {
		gs, err := peerGroups(fds[0], n)
		if err != nil {
			t.Fatalf("room for %d: %v", n, err)
		}
		if !sameGroups(gs, want) {
			t.Fatalf("room for %d: groups %v, want %v", n, gs, want)
		}
	}
	// Not a socket with peer credentials: a typed error, no loop.
	f, err := os.CreateTemp("", "pc")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if _, err := peerGroups(int(f.Fd()), initialGroups); !errors.Is(err, syscall.ENOTSOCK) {
		t.Fatalf("file: %v", err)
	}
}

// The groups come from the socket, as they were at connect(): a child
// started with other supplementary groups (more than the first buffer
// holds) changes them after connecting, and the answer is still the old
// ones, while /proc/PID/status — what fwpd read before — shows the new.
func TestGroupsFixedAtConnect(t *testing.T) {
	testutil.RequireRoot(t)
	var groups []uint32
	for i := range initialGroups + 8 {
		groups = append(groups, 70000+uint32(i))
	}
	var cmd *exec.Cmd
	var stderr strings.Builder
	started := make(chan error, 1)
	c, _ := accepted(t, func(path string) {
		cmd = exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childEnv+"="+path, "GORACE=atexit_sleep_ms=0 "+os.Getenv("GORACE"))
		cmd.Stderr = &stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 0, Gid: 0, Groups: groups}, Pdeathsig: syscall.SIGKILL}
		started <- cmd.Start()
	})
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	defer func() {
		c.Close()
		if err := cmd.Wait(); err != nil {
			t.Errorf("child: %v\n%s", err, stderr.String())
		}
	}()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second)) // a hung child fails rather than hangs
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("child did not change its groups: %v\n%s", err, stderr.String())
	}
	cr, err := FromConn(c)
	if err != nil {
		t.Fatal(err)
	}
	if cr.PID != uint32(cmd.Process.Pid) {
		t.Fatalf("pid %d, child %d", cr.PID, cmd.Process.Pid)
	}
	if !sameGroups(cr.Groups, groups) {
		t.Fatalf("groups %v, want the connect-time %v", cr.Groups, groups)
	}
	if now := procGroups(t, cr.PID); !slices.Equal(now, []uint32{changedGroup}) {
		t.Fatalf("/proc shows %v: the child did not change its groups, the test proves nothing", now)
	}
	if gs, err := FromConn(c); err != nil || !slices.Equal(gs.Groups, cr.Groups) {
		t.Fatalf("second read: %v %v", gs.Groups, err)
	}
}

// procGroups reads a process's current supplementary groups the way fwpd
// used to, to show the answers differ.
func procGroups(t *testing.T, pid uint32) []uint32 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.FormatUint(uint64(pid), 10) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Groups:"); ok {
			var out []uint32
			for _, f := range strings.Fields(rest) {
				n, err := strconv.ParseUint(f, 10, 32)
				if err != nil {
					t.Fatal(err)
				}
				out = append(out, uint32(n))
			}
			return out
		}
	}
	t.Fatal("no Groups line")
	return nil
}
