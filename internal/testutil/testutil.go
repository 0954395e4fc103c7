//go:build linux

package testutil

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"fwp/internal/unix"
)

// RequireRoot skips the test when not run as root, unless the environment
// variable CI is set: in CI privileged tests must run, so it fails instead.
func RequireRoot(t testing.TB) {
	t.Helper()
	if unix.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("this test needs root, and CI is set: privileged tests must run in CI")
	}
	t.Skip("needs root (CAP_BPF, CAP_NET_ADMIN)")
}

// Unavailable skips (or, with CI set, fails) a test that cannot run here.
func Unavailable(t testing.TB, err error) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("privileged test cannot run in CI: %v", err)
	}
	t.Skipf("cannot run here: %v", err)
}

// Cgroup2Root returns the mount point of the cgroup v2 hierarchy, read from
// /proc/mounts. When none is mounted it mounts one in a temporary directory
// (unmounted when the test ends).
func Cgroup2Root(t testing.TB) string {
	t.Helper()
	if dir, err := FindCgroup2(); err == nil {
		return dir
	}
	dir := t.TempDir()
	if err := unix.MountCgroup2(dir); err != nil {
		Unavailable(t, fmt.Errorf("no cgroup2 mounted and mounting one failed: %w", err))
	}
	t.Cleanup(func() { _ = unix.Unmount(dir) })
	return dir
}

// FindCgroup2 returns the first cgroup2 mount point in /proc/mounts.
func FindCgroup2() (string, error) { return unix.FindCgroup2() }

// Cgroup is a child cgroup a test created.
type Cgroup struct {
	Path string
	ID   uint64 // what bpf_get_current_cgroup_id reports inside
}

// NewCgroup creates a child cgroup under the cgroup2 root and removes it
// when the test ends (after its helper processes have exited).
func NewCgroup(t testing.TB) *Cgroup {
	t.Helper()
	root := Cgroup2Root(t)
	var b [6]byte
	_, _ = rand.Read(b[:])
	path := filepath.Join(root, "fwp-test-"+hex.EncodeToString(b[:]))
	if err := os.Mkdir(path, 0o755); err != nil {
		Unavailable(t, fmt.Errorf("create cgroup: %w", err))
	}
	t.Cleanup(func() {
		// rmdir fails with EBUSY while an exiting process is still counted.
		var err error
		for range 100 {
			if err = os.Remove(path); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Errorf("remove cgroup %s: %v", path, err)
	})
	id, err := unix.CgroupID(path)
	if err != nil {
		t.Fatal(err)
	}
	return &Cgroup{Path: path, ID: id}
}

const helperEnv = "FWP_TESTUTIL_HELPER"

var helpers = map[string]func(args []string) error{}

// RegisterHelper names a function a helper process can run.
func RegisterHelper(name string, fn func(args []string) error) { helpers[name] = fn }

// HelperMain runs the helper named by the environment, if any, and exits;
// call it first thing in TestMain. In a helper process, lo is brought up
// first (the process starts in a new network namespace).
func HelperMain() {
	name := os.Getenv(helperEnv)
	if name == "" {
		return
	}
	fn, ok := helpers[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown helper %q\n", name)
		os.Exit(2)
	}
	if err := unix.SetLinkUp("lo"); err != nil {
		fmt.Fprintf(os.Stderr, "helper %s: %v\n", name, err)
		os.Exit(2)
	}
	if err := fn(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "helper %s: %v\n", name, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// RunHelper runs the named helper in a new process placed in cg from its
// start (clone3 with CLONE_INTO_CGROUP) and in a new network namespace,
// feeding it stdin and returning its stdout. The namespace goes away with
// the process.
func RunHelper(t testing.TB, cg *Cgroup, name string, stdin []byte, args ...string) []byte {
	t.Helper()
	out, err := RunHelperFiles(cg, name, stdin, nil, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// RunHelperFiles is RunHelper with extra files, which the helper finds as
// file descriptors 3, 4, ...; it returns an error rather than failing.
func RunHelperFiles(cg *Cgroup, name string, stdin []byte, files []*os.File, args ...string) ([]byte, error) {
	// A helper that hangs must not hang the test binary until its timeout.
	return RunHelperFilesTimeout(cg, name, stdin, files, time.Minute, args...)
}

// RunHelperFilesTimeout is RunHelperFiles with a longer (or shorter) bound
// than a minute on the helper's run, for a soak.
func RunHelperFilesTimeout(cg *Cgroup, name string, stdin []byte, files []*os.File, timeout time.Duration, args ...string) ([]byte, error) {
	dir, err := os.Open(cg.Path)
	if err != nil {
		return nil, err
	}
	defer dir.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], args...)
	cmd.Env = helperEnviron(name)
	cmd.Stdin = bytes.NewReader(stdin)
	cmd.ExtraFiles = files
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		UseCgroupFD: true,
		CgroupFD:    int(dir.Fd()),
		Cloneflags:  syscall.CLONE_NEWNET,
		Pdeathsig:   syscall.SIGKILL,
	}
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("helper %s: %v\nstderr: %s", name, err, stderr.String())
	}
	return stdout.Bytes(), nil
}

// Helper is a long-lived helper process answering one line per request
// line, for tests that alternate between changing policy and probing.
type Helper struct {
	cmd    *exec.Cmd
	in     io.WriteCloser
	out    *bufio.Reader
	stderr lockedBuffer
	dir    *os.File
}

// StartHelper starts the named helper like RunHelper, keeping it running;
// it is stopped when the test ends.
func StartHelper(t testing.TB, cg *Cgroup, name string, args ...string) *Helper {
	t.Helper()
	dir, err := os.Open(cg.Path)
	if err != nil {
		t.Fatal(err)
	}
	h := &Helper{dir: dir}
	h.cmd = exec.Command(os.Args[0], args...)
	h.cmd.Env = helperEnviron(name)
	h.cmd.Stderr = &h.stderr
	h.cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd()), Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	if h.in, err = h.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := h.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	h.out = bufio.NewReader(stdout)
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// Call sends one request line and returns the helper's answer line.
func (h *Helper) Call(req []byte) ([]byte, error) {
	if _, err := h.in.Write(append(bytes.TrimSpace(req), '\n')); err != nil {
		return nil, fmt.Errorf("helper: %v; stderr: %s", err, h.stderr.String())
	}
	line, err := h.out.ReadBytes('\n')
	if err != nil {
		return nil, fmt.Errorf("helper: %v; stderr: %s", err, h.stderr.String())
	}
	return line, nil
}

// lockedBuffer is a helper's stderr, written by exec's copying goroutine
// while a failing test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Stderr is what the helper (and processes it started on its stderr)
// wrote so far, for a failing test's message.
func (h *Helper) Stderr() string { return h.stderr.String() }

// Pid is the helper process's id (its network namespace is
// /proc/<pid>/ns/net).
func (h *Helper) Pid() int { return h.cmd.Process.Pid }

// Close ends the helper (closing its stdin) and waits for it.
func (h *Helper) Close() error {
	h.in.Close()
	done := make(chan error, 1)
	go func() { done <- h.cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(10 * time.Second):
		h.cmd.Process.Kill()
		err = <-done
	}
	h.dir.Close()
	return err
}

// HelperEnv is the environment that makes this test binary, started by
// hand (by a helper, say), run the named helper.
func HelperEnv(name string) []string {
	return []string{helperEnv + "=" + name, "GORACE=atexit_sleep_ms=0 " + os.Getenv("GORACE")}
}

// helperEnviron names the helper and stops a race-enabled helper from
// sleeping a second at exit (the race runtime's default).
func helperEnviron(name string) []string {
	return append(os.Environ(), HelperEnv(name)...)
}
