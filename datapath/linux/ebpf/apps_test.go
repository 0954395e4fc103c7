//go:build linux

package ebpf

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
)

// Ports of the app helper's HTTP servers: the app policies block openPort
// for some applications; okPort is never blocked.
const (
	appOKPort      = 8080
	appBlockedPort = 9090
)

// appReq is one request to the app helper.
type appReq struct {
	Op   string   `json:"op"` // run, start, wait, release
	Argv []string `json:"argv,omitempty"`
	Env  []string `json:"env,omitempty"`
	ID   int      `json:"id,omitempty"`
}

type appAns struct {
	Code int    `json:"code"`
	Out  string `json:"out"`
	ID   int    `json:"id,omitempty"`
}

// appHelper runs in the test cgroup and network namespace: HTTP servers on
// 127.0.0.1:appOKPort and :appBlockedPort ("/slow" answers once released),
// and real programs started on request, answering their exit codes.
func appHelper([]string) error {
	release := make(chan struct{})
	var releaseOnce sync.Once
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello\n") })
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		<-release
		io.WriteString(w, "slow\n")
	})
	for _, port := range []int{appOKPort, appBlockedPort} {
		l, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			return err
		}
		go http.Serve(l, mux)
	}
	started := map[int]*exec.Cmd{}
	outs := map[int]*strings.Builder{}
	in := bufio.NewScanner(os.Stdin)
	enc := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var req appReq
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			return err
		}
		var ans appAns
		switch req.Op {
		case "run", "start":
			cmd := exec.Command(req.Argv[0], req.Argv[1:]...)
			cmd.Env = append(os.Environ(), req.Env...)
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if req.Op == "start" {
				if err := cmd.Start(); err != nil {
					return err
				}
				ans.ID = len(started) + 1
				started[ans.ID], outs[ans.ID] = cmd, &out
				break
			}
			ans.Code, ans.Out = exitCode(cmd.Run()), out.String()
		case "wait":
			ans.Code, ans.Out = exitCode(started[req.ID].Wait()), outs[req.ID].String()
		case "release":
			releaseOnce.Do(func() { close(release) })
		}
		if err := enc.Encode(ans); err != nil {
			return err
		}
	}
	return in.Err()
}

func exitCode(err error) int {
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.ExitCode()
	}
	return -1
}

// dialExecHelper connects to args[0] as the test binary, then execs into
// args[1:]: the same process, another application from then on.
func dialExecHelper(args []string) error {
	c, err := net.Dial("tcp4", args[0])
	if err != nil {
		return fmt.Errorf("dial before exec: %w", err)
	}
	c.Close()
	fmt.Println("dialed before exec")
	return syscall.Exec(args[1], args[1:], os.Environ())
}

func appCall(t *testing.T, h *testutil.Helper, req appReq) appAns {
	t.Helper()
	b, _ := json.Marshal(req)
	line, err := h.Call(b)
	if err != nil {
		t.Fatal(err)
	}
	var ans appAns
	if err := json.Unmarshal(line, &ans); err != nil {
		t.Fatal(err)
	}
	return ans
}

func appURL(port int) string { return fmt.Sprintf("http://127.0.0.1:%d/", port) }

// curlArgs fetches one URL; exit 7 is "couldn't connect" at once (a
// dropped SYN would be 28, a timeout).
func curlArgs(bin string, port int) []string {
	return []string{bin, "-sS", "-o", "/dev/null", "--max-time", "5", appURL(port)}
}

func wgetArgs(port int) []string {
	return []string{"/usr/bin/wget", "-q", "-O", "/dev/null", "-T", "5", "-t", "1", appURL(port)}
}

// appBlockPolicy blocks connects to appBlockedPort by the applications.
func appBlockPolicy(t *testing.T, apps ...string) *engine.Engine {
	t.Helper()
	return buildEngine(t, func(tx *engine.Txn) error {
		for _, app := range apps {
			if _, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
				engine.Condition{Field: engine.FieldALEAppID, Match: engine.MatchEqual, Value: engine.String(app)},
				engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(appBlockedPort)})); err != nil {
				return err
			}
		}
		return nil
	})
}

// appDir is a directory on the file system of /usr/bin (hard links
// cannot cross file systems), removed when the test ends.
func appDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/var/tmp", "fwp-apps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

func wantCode(t *testing.T, what string, ans appAns, want int) {
	t.Helper()
	if ans.Code != want {
		t.Errorf("%s: exit %d, want %d; output: %s", what, ans.Code, want, ans.Out)
	}
}

// TestKernelAppID: a filter naming /usr/bin/curl blocks curl, whatever
// path or mount reached the file, and nothing else (wget, a copy of curl).
func TestKernelAppID(t *testing.T) {
	for _, bin := range []string{"/usr/bin/curl", "/usr/bin/wget", "/usr/bin/unshare", "/usr/bin/bash"} {
		if _, err := os.Stat(bin); err != nil {
			testutil.Unavailable(t, fmt.Errorf("%s: %w (apt-get install curl wget)", bin, err))
		}
	}
	d, cg := kernelSetup(t)
	dir := appDir(t)
	link := filepath.Join(dir, "curl-link")
	if err := os.Link("/usr/bin/curl", link); err != nil {
		t.Fatalf("hard link: %v", err)
	}
	cp := filepath.Join(dir, "curl-copy")
	copyFile(t, "/usr/bin/curl", cp)
	script := filepath.Join(dir, "script.sh")
	if err := os.WriteFile(script, fmt.Appendf(nil, "#!/bin/bash\nexec 3<>/dev/tcp/127.0.0.1/%d\n", appBlockedPort), 0o755); err != nil {
		t.Fatal(err)
	}

	h := testutil.StartHelper(t, cg, "app")
	// Started before the policy exists: its second transfer comes after.
	early := appCall(t, h, appReq{Op: "start", Argv: []string{"/usr/bin/curl", "-sS", "--max-time", "5",
		"-o", "/dev/null", appURL(appOKPort) + "slow", "-o", "/dev/null", appURL(appBlockedPort)}})
	time.Sleep(200 * time.Millisecond) // curl is waiting on /slow

	apply(t, d, appBlockPolicy(t, "/usr/bin/curl", "/bin/bash", script))
	wantCode(t, "curl to the blocked port", appCall(t, h, appReq{Op: "run", Argv: curlArgs("/usr/bin/curl", appBlockedPort)}), 7)
	wantCode(t, "curl to another port", appCall(t, h, appReq{Op: "run", Argv: curlArgs("/usr/bin/curl", appOKPort)}), 0)
	wantCode(t, "wget to the blocked port", appCall(t, h, appReq{Op: "run", Argv: wgetArgs(appBlockedPort)}), 0)
	wantCode(t, "curl through a hard link", appCall(t, h, appReq{Op: "run", Argv: curlArgs(link, appBlockedPort)}), 7)
	wantCode(t, "a copy of curl", appCall(t, h, appReq{Op: "run", Argv: curlArgs(cp, appBlockedPort)}), 0)
	// A bind mount in a mount namespace of its own (nothing on the host).
	bound := filepath.Join(dir, "bound")
	copyFile(t, "/usr/bin/wget", bound) // the mount point: another file
	sh := fmt.Sprintf("mount --bind /usr/bin/curl %s && exec %s", bound, strings.Join(curlArgs(bound, appBlockedPort), " "))
	wantCode(t, "curl through a bind mount", appCall(t, h, appReq{Op: "run", Argv: []string{"/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c", sh}}), 7)
	// The interpreter is the application: the script's own path names nothing.
	wantCode(t, "bash script by its shebang", appCall(t, h, appReq{Op: "run", Argv: []string{script}}), 1)
	wantCode(t, "bash script by bash", appCall(t, h, appReq{Op: "run", Argv: []string{"/bin/bash", script}}), 1)
	wantCode(t, "a /bin/sh script running curl", appCall(t, h, appReq{Op: "run", Argv: []string{"/bin/sh", "-c", strings.Join(curlArgs("curl", appBlockedPort), " ")}}), 7)
	// A process that execs into curl is curl from then on.
	ans := appCall(t, h, appReq{Op: "run", Argv: append([]string{os.Args[0], fmt.Sprintf("127.0.0.1:%d", appBlockedPort)}, curlArgs("/usr/bin/curl", appBlockedPort)...),
		Env: testutil.HelperEnv("dialexec")})
	wantCode(t, "exec into curl", ans, 7)
	if !strings.Contains(ans.Out, "dialed before exec") {
		t.Errorf("exec into curl: the test binary could not connect first: %s", ans.Out)
	}
	appCall(t, h, appReq{Op: "release"})
	wantCode(t, "curl started before the policy", appCall(t, h, appReq{Op: "wait", ID: early.ID}), 7)

	// Without the policy the same runs succeed: the blocks above were the app filters'.
	apply(t, d, engine.New(engine.Options{}))
	wantCode(t, "curl with no policy", appCall(t, h, appReq{Op: "run", Argv: curlArgs("/usr/bin/curl", appBlockedPort)}), 0)
	wantCode(t, "bash with no policy", appCall(t, h, appReq{Op: "run", Argv: []string{script}}), 0)
}

// TestKernelAppReplaced: a package upgrade renames a new file over the
// policy's path; the watcher reports it and the recompiled policy follows
// the new file (and lets the old one go).
func TestKernelAppReplaced(t *testing.T) {
	d, cg := kernelSetup(t)
	dir := appDir(t)
	app := filepath.Join(dir, "app")
	copyFile(t, "/usr/bin/curl", app)
	old := filepath.Join(dir, "app.old")
	if err := os.Link(app, old); err != nil {
		t.Fatal(err)
	}
	e := appBlockPolicy(t, app)
	p, err := Compile(e.View())
	if err != nil {
		t.Fatal(err)
	}
	if got := p.AppPaths(); len(got) != 1 || got[0] != app {
		t.Fatalf("AppPaths: %v", got)
	}
	w, err := WatchApps(p.AppPaths())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := d.Apply(p); err != nil {
		t.Fatal(err)
	}
	h := testutil.StartHelper(t, cg, "app")
	wantCode(t, "the policy's file", appCall(t, h, appReq{Op: "run", Argv: curlArgs(app, appBlockedPort)}), 7)
	if p.AppsChanged() {
		t.Fatal("AppsChanged before any change")
	}
	// The upgrade: a new file written beside, renamed over.
	copyFile(t, "/usr/bin/curl", app+".new")
	if err := os.Rename(app+".new", app); err != nil {
		t.Fatal(err)
	}
	select {
	case <-w.Changed():
	case <-time.After(5 * time.Second):
		t.Fatal("the watcher missed the rename")
	}
	if !p.AppsChanged() {
		t.Fatal("AppsChanged after the rename: false")
	}
	// Before the policy is compiled again the new file is another application.
	wantCode(t, "the new file, old policy", appCall(t, h, appReq{Op: "run", Argv: curlArgs(app, appBlockedPort)}), 0)
	apply(t, d, e)
	wantCode(t, "the new file, recompiled", appCall(t, h, appReq{Op: "run", Argv: curlArgs(app, appBlockedPort)}), 7)
	wantCode(t, "the old file", appCall(t, h, appReq{Op: "run", Argv: curlArgs(old, appBlockedPort)}), 0)
	// A path with no file matches nothing, and is followed when one appears.
	os.Remove(app)
	select {
	case <-w.Changed():
	case <-time.After(5 * time.Second):
		t.Fatal("the watcher missed the removal")
	}
}

// TestKernelGroupID: ale_group_id is the caller's gid, in the kernel.
func TestKernelGroupID(t *testing.T) {
	if _, err := os.Stat("/usr/bin/setpriv"); err != nil {
		testutil.Unavailable(t, fmt.Errorf("setpriv: %w", err))
	}
	d, cg := kernelSetup(t)
	apply(t, d, buildEngine(t, func(tx *engine.Txn) error {
		_, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
			engine.Condition{Field: engine.FieldALEGroupID, Match: engine.MatchEqual, Value: engine.Uint32(4242)},
			engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(appBlockedPort)}))
		return err
	}))
	h := testutil.StartHelper(t, cg, "app")
	asGroup := func(gid string, argv ...string) []string {
		return append([]string{"/usr/bin/setpriv", "--regid", gid, "--clear-groups"}, argv...)
	}
	wantCode(t, "curl as gid 4242", appCall(t, h, appReq{Op: "run", Argv: asGroup("4242", curlArgs("/usr/bin/curl", appBlockedPort)...)}), 7)
	wantCode(t, "curl as gid 4243", appCall(t, h, appReq{Op: "run", Argv: asGroup("4243", curlArgs("/usr/bin/curl", appBlockedPort)...)}), 0)
	wantCode(t, "curl as gid 4242 to another port", appCall(t, h, appReq{Op: "run", Argv: asGroup("4242", curlArgs("/usr/bin/curl", appOKPort)...)}), 0)
	wantCode(t, "curl as root", appCall(t, h, appReq{Op: "run", Argv: curlArgs("/usr/bin/curl", appBlockedPort)}), 0)
}
