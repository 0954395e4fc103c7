//go:build linux

package main_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"fwp/client"
	"fwp/engine"
	"fwp/internal/testutil"
)

func init() {
	testutil.RegisterHelper("killscen", killScenarioHelper)
	testutil.RegisterHelper("pender", penderHelper)
}

// penderHelper is a callout program: it registers "pend-forever" with the
// fwpd whose socket is args[0], pends every classification and never
// completes one, says "ready", and runs until killed.
func penderHelper(args []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rc, err := client.RegisterCallout(ctx, "pend-forever", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		if _, err := req.PendOperation(); err == nil {
			out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
			fmt.Println("pended")
			return
		}
		out.Action = engine.ActionBlock
	}}, client.CalloutOptions{Socket: args[0]})
	if err != nil {
		return err
	}
	fmt.Println("ready")
	<-rc.Done()
	return rc.Err()
}

// pendPolicy hands TCP to 8080 (fail-closed) and 9090 (fail-open) to a
// Go callout at AUTH_CONNECT_V4.
const pendPolicy = `lifetime: persistent
callouts:
  - {key: pend-forever, layer: ALE_AUTH_CONNECT_V4}
filters:
  - {key: closed, layer: ALE_AUTH_CONNECT_V4, action: callout_terminating, callout: pend-forever,
     conditions: [{field: ip_remote_port, match: equal, value: 8080}, {field: ip_protocol, match: equal, value: 6}]}
  - {key: open, layer: ALE_AUTH_CONNECT_V4, action: callout_terminating, callout: pend-forever, flags: [permit_if_callout_unregistered],
     conditions: [{field: ip_remote_port, match: equal, value: 9090}, {field: ip_protocol, match: equal, value: 6}]}
`

// curlEnd is one curl's outcome: its exit code and when it ended.
type curlEnd struct {
	Port int
	Code int
	End  time.Time
	Out  string
}

// killScenarioHelper runs in the hooked cgroup and a network namespace of
// its own: HTTP servers on 127.0.0.1:8080 and :9090; "bg" starts a curl
// to each in the background, "wait" reports how they ended (JSON), "curl
// PORT" runs one and reports it.
func killScenarioHelper([]string) error {
	for _, port := range []int{8080, 9090} {
		ln, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			return err
		}
		go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") }))
	}
	run := func(port int) curlEnd {
		out, err := exec.Command("curl", "-sS", "--max-time", "20", fmt.Sprintf("http://127.0.0.1:%d/", port)).CombinedOutput()
		e := curlEnd{Port: port, End: time.Now(), Out: strings.TrimSpace(string(out))}
		if ee, ok := err.(*exec.ExitError); ok {
			e.Code = ee.ExitCode()
		}
		return e
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var ends []curlEnd
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd, arg, _ := strings.Cut(strings.TrimSpace(in.Text()), " ")
		switch cmd {
		case "":
		case "bg":
			for _, port := range []int{8080, 9090} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					e := run(port)
					mu.Lock()
					ends = append(ends, e)
					mu.Unlock()
				}()
			}
			fmt.Println("started")
		case "running":
			mu.Lock()
			fmt.Println(len(ends))
			mu.Unlock()
		case "wait":
			wg.Wait()
			b, _ := json.Marshal(ends)
			ends = nil
			fmt.Println(string(b))
		case "burst":
			// burst PORT N: N concurrent connects; how many connected and
			// how many were refused
			var port, n int
			fmt.Sscan(arg, &port, &n)
			var wg sync.WaitGroup
			var mu sync.Mutex
			ok, refused := 0, 0
			for range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", port), 3*time.Second)
					mu.Lock()
					defer mu.Unlock()
					if err == nil {
						ok++
						c.Close()
					} else if strings.Contains(err.Error(), "refused") {
						refused++
					}
				}()
			}
			wg.Wait()
			fmt.Println(ok, refused)
		case "curl":
			var port int
			fmt.Sscan(arg, &port)
			start := time.Now()
			e := run(port)
			b, _ := json.Marshal(struct {
				curlEnd
				Took time.Duration
			}{e, e.End.Sub(start)})
			fmt.Println(string(b))
		}
	}
	return in.Err()
}

// TestE2EKernelCalloutKill9: flows held by a pending Go callout (a callout
// program that never completes) when fwpd is killed with SIGKILL resolve
// by their filters' flags within a second — fail-closed refused, fail-open
// connected — with no SYN timer; and with --keep-hooks-on-exit, while
// fwpd is down, a fail-closed callout filter keeps refusing (at once) and
// a fail-open one passes.
func TestE2EKernelCalloutKill9(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	link := filepath.Join(dir, "netns")
	d := startKernelDaemon(t, cg, dir, "--callout-netns", link, "--keep-hooks-on-exit", "--metrics-addr", "127.0.0.1:0")
	h := testutil.StartHelper(t, cg, "killscen")
	if line, err := h.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		t.Fatalf("helper: %q %v %s", line, err, h.Stderr())
	}
	if err := os.Symlink(fmt.Sprintf("/proc/%d/ns/net", h.Pid()), link); err != nil {
		t.Fatal(err)
	}
	call := func(req string) string {
		line, err := h.Call([]byte(req))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(line))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pends := make(chan *engine.Pend, 16)
	rc, err := client.RegisterCallout(ctx, "pend-forever", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		p, err := req.PendOperation()
		if err != nil {
			out.Action = engine.ActionBlock
			return
		}
		pends <- p // never completed
		out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
	}}, client.CalloutOptions{Socket: d.sock})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if errs, code := d.apply(t, pendPolicy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	call("bg")
	for range 2 {
		select {
		case <-pends:
		case <-time.After(10 * time.Second):
			t.Fatal("the callout was not called for both flows")
		}
	}
	// Held past the first SYN retransmission timer.
	time.Sleep(1500 * time.Millisecond)
	if n := call("running"); n != "0" {
		t.Fatalf("%s curls ended while their flows were pended", n)
	}
	if n := len(pends); n != 0 {
		t.Fatalf("the callout was called %d more times for the held flows (their SYNs sent again)", n)
	}
	// TCP sends no SYN again while its first one is held (the kernel's
	// skb_still_in_host_queue): it probes every 500 ms instead, so a held
	// SYN the queue drops is sent again within 500 ms (1 s for the first).
	if m := d.metrics(t); !strings.Contains(m, `fwp_callout_path_flows_total{outcome="queued"} 2`) {
		t.Fatalf("want just the 2 first SYNs queued:\n%s", grepLines(m, "fwp_callout_path"))
	}
	killed := time.Now()
	d.cmd.Process.Kill()
	d.cmd.Wait()
	var ends []curlEnd
	if err := json.Unmarshal([]byte(call("wait")), &ends); err != nil {
		t.Fatal(err)
	}
	for _, e := range ends {
		after := e.End.Sub(killed)
		t.Logf("port %d: curl exit %d %.0f ms after the kill (%s)", e.Port, e.Code, after.Seconds()*1000, e.Out)
		want := 7
		if e.Port == 9090 {
			want = 0
		}
		if e.Code != want || after > time.Second {
			t.Errorf("port %d: held when fwpd was killed: curl exit %d %v after the kill; want exit %d within 1 s", e.Port, e.Code, after, want)
		}
	}
	// fwpd is down; its hooks (kept) and tables stay.
	for _, c := range []struct {
		port, code int
	}{{8080, 7}, {9090, 0}} {
		var r struct {
			curlEnd
			Took time.Duration
		}
		if err := json.Unmarshal([]byte(call(fmt.Sprintf("curl %d", c.port))), &r); err != nil {
			t.Fatal(err)
		}
		if r.Code != c.code || r.Took > time.Second {
			t.Errorf("fwpd down, port %d: curl exit %d in %v (%s); want exit %d at once", c.port, r.Code, r.Took, r.Out, c.code)
		}
	}
}

// TestE2EKernelCalloutQueueFull: fwpd's queues hold 4 packets
// (--callout-queue-len); 200 concurrent connects toward a fail-closed
// callout filter whose callout pends them all: the SYNs that do not fit are
// refused at once by the filter's flag, none connects, and fwpd counts them
// in /metrics and records a net event (a drop, "callout not registered
// (fail closed)") for each it was told of.
func TestE2EKernelCalloutQueueFull(t *testing.T) {
	testutil.RequireRoot(t)
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	link := filepath.Join(dir, "netns")
	d := startKernelDaemon(t, cg, dir, "--callout-netns", link, "--callout-queue-len", "4", "--metrics-addr", "127.0.0.1:0")
	h := testutil.StartHelper(t, cg, "killscen")
	if line, err := h.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		t.Fatalf("helper: %q %v %s", line, err, h.Stderr())
	}
	if err := os.Symlink(fmt.Sprintf("/proc/%d/ns/net", h.Pid()), link); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rc, err := client.RegisterCallout(ctx, "pend-forever", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		if _, err := req.PendOperation(); err == nil {
			out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb // never completed: fwpd's pend timeout blocks
			return
		}
		out.Action = engine.ActionBlock
	}}, client.CalloutOptions{Socket: d.sock})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if errs, code := d.apply(t, pendPolicy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	events := d.followEvents(t)
	time.Sleep(200 * time.Millisecond) // the follower is subscribed
	line, err := h.Call([]byte("burst 8080 200"))
	if err != nil {
		t.Fatal(err)
	}
	var ok, refused int
	fmt.Sscan(string(line), &ok, &refused)
	if ok != 0 || refused == 0 {
		t.Fatalf("200 connects toward a fail-closed filter with full queues: %d connected, %d refused; want none through, the overflow refused", ok, refused)
	}
	m := d.metrics(t)
	if !regexp.MustCompile(`fwp_callout_path_flows_total\{outcome="flag_refused"\} [1-9]`).MatchString(m) {
		t.Fatalf("/metrics:\n%s\nwant the flows refused by the flag counted", grepLines(m, "fwp_callout_path"))
	}
	deadline := time.After(5 * time.Second)
	for {
		select {
		case e := <-events:
			if e.Type == "classify_drop" && strings.Contains(e.Reason, "fail closed") && strings.HasSuffix(e.Remote, ":8080") {
				t.Logf("net event %+v (%d connects refused)", e, refused)
				return
			}
		case <-deadline:
			t.Fatal("no net event for a flow refused by the flag")
		}
	}
}

// TestE2EKernelCalloutProgramKilled: the callout program (a process of its
// own) is killed with SIGKILL while it holds two flows pended: fwpd sees
// its connection go and decides both by their filters' flags within a
// second — fail-closed refused, fail-open connected.
func TestE2EKernelCalloutProgramKilled(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	cg, progCg := testutil.NewCgroup(t), testutil.NewCgroup(t)
	dir := kernelDir(t)
	link := filepath.Join(dir, "netns")
	d := startKernelDaemon(t, cg, dir, "--callout-netns", link)
	h := testutil.StartHelper(t, cg, "killscen")
	if line, err := h.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		t.Fatalf("helper: %q %v %s", line, err, h.Stderr())
	}
	if err := os.Symlink(fmt.Sprintf("/proc/%d/ns/net", h.Pid()), link); err != nil {
		t.Fatal(err)
	}
	prog := testutil.StartHelper(t, progCg, "pender", d.sock)
	if line, err := prog.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		t.Fatalf("callout program: %q %v %s", line, err, prog.Stderr())
	}
	if errs, code := d.apply(t, pendPolicy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	call := func(req string) string {
		line, err := h.Call([]byte(req))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(line))
	}
	call("bg")
	for range 2 { // the program's "pended" lines
		if line, err := prog.Call(nil); err != nil || strings.TrimSpace(string(line)) != "pended" {
			t.Fatalf("callout program: %q %v", line, err)
		}
	}
	time.Sleep(500 * time.Millisecond)
	if n := call("running"); n != "0" {
		t.Fatalf("%s curls ended while their flows were pended", n)
	}
	killed := time.Now()
	syscall.Kill(prog.Pid(), syscall.SIGKILL)
	var ends []curlEnd
	if err := json.Unmarshal([]byte(call("wait")), &ends); err != nil {
		t.Fatal(err)
	}
	if len(ends) != 2 {
		t.Fatalf("curls: %+v", ends)
	}
	for _, e := range ends {
		after := e.End.Sub(killed)
		t.Logf("port %d: curl exit %d %.0f ms after the kill (%s)", e.Port, e.Code, after.Seconds()*1000, e.Out)
		want := 7
		if e.Port == 9090 {
			want = 0
		}
		if e.Code != want || after > time.Second {
			t.Errorf("port %d: held when the callout program was killed: curl exit %d %v after; want exit %d within 1 s", e.Port, e.Code, after, want)
		}
	}
}
