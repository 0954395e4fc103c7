//go:build linux

package main_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"fwp/client"
	"fwp/engine"
	"fwp/internal/testutil"
)

// Remote callouts on the kernel callout path: a callout registered by a
// callout program (a process of its own, on fwpd's callout socket) decides
// real connects of the hooked cgroup, as an embedded one does, because the
// kernel callout path classifies with fwpd's engine.

func init() {
	testutil.RegisterHelper("rcallout", rcalloutHelper)
}

// rcalloutHelper is a callout program: rcallout SOCKET KEY MODE [DEADLINE]
// registers KEY with fwpd (with that answer deadline) and prints "ready";
// then, per call, mode "ports" permits remote port 9090 and blocks the
// rest at once, mode "hold" pends the connect and never completes it
// (printing "pended PORT"), mode "flow" permits and associates a flow
// context with each flow (printing "flowdelete" when one is deleted), mode
// "hang" never returns. It runs until
// stdin closes or it is killed.
func rcalloutHelper(args []string) error {
	if len(args) < 3 {
		return fmt.Errorf("usage: rcallout SOCKET KEY MODE [DEADLINE]")
	}
	var deadline time.Duration
	if len(args) > 3 {
		var err error
		if deadline, err = time.ParseDuration(args[3]); err != nil {
			return err
		}
	}
	var out sync.Mutex
	say := func(format string, a ...any) {
		out.Lock()
		defer out.Unlock()
		fmt.Printf(format+"\n", a...)
	}
	var reg engine.CalloutRegistration
	switch args[2] {
	case "ports":
		reg.Classify = func(req *engine.ClassifyRequest, o *engine.ClassifyOut) {
			o.Action = engine.ActionBlock
			if req.Values.Uint(engine.FieldIPRemotePort) == 9090 {
				o.Action = engine.ActionPermit
			}
			say("decided %d %s", req.Values.Uint(engine.FieldIPRemotePort), o.Action)
		}
	case "hold":
		reg.Classify = func(req *engine.ClassifyRequest, o *engine.ClassifyOut) {
			if _, err := req.PendOperation(); err != nil {
				say("pend-failed %v", err)
				o.Action = engine.ActionBlock
				return
			}
			say("pended %d", req.Values.Uint(engine.FieldIPRemotePort))
			o.Action, o.Flags = engine.ActionBlock, engine.OutAbsorb
		}
	case "flow": // permits, associating a flow context; says when one is deleted
		reg.Classify = func(req *engine.ClassifyRequest, o *engine.ClassifyOut) {
			o.Action = engine.ActionPermit
			err := req.Engine().FlowAssociateContext(req.Meta.FlowHandle, req.Layer, req.Filter.Action.Callout, req.Values.Uint(engine.FieldIPLocalPort))
			if err != nil {
				say("associate-failed %d %v", req.Meta.FlowHandle, err)
				return
			}
			say("associated %d", req.Meta.FlowHandle)
		}
		reg.FlowDelete = func(engine.LayerID, engine.CalloutID, any) { say("flowdelete") }
	case "hang": // never answers
		reg.Classify = func(req *engine.ClassifyRequest, o *engine.ClassifyOut) {
			say("hanging %d", req.Values.Uint(engine.FieldIPRemotePort))
			select {}
		}
	default:
		return fmt.Errorf("mode %q", args[2])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	rc, err := client.RegisterCallout(ctx, args[1], reg, client.CalloutOptions{Socket: args[0], Deadline: deadline})
	cancel()
	if err != nil {
		return err
	}
	defer rc.Close()
	say("ready")
	io.Copy(io.Discard, os.Stdin)
	return nil
}

// calloutProg is a callout program the test started, with its output lines.
type calloutProg struct {
	t     *testing.T
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
	errb  *syncBuffer
}

func startCalloutProg(t *testing.T, name string, env []string, args ...string) *calloutProg {
	t.Helper()
	p := &calloutProg{t: t, cmd: exec.Command(name, args...), lines: make(chan string, 1024), errb: &syncBuffer{}}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stderr = p.errb
	var err error
	if p.in, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
	}()
	t.Cleanup(func() { p.cmd.Process.Kill(); p.cmd.Wait() })
	return p
}

// expect waits for a line containing s, returning the lines before it.
func (p *calloutProg) expect(s string) []string {
	p.t.Helper()
	var seen []string
	timeout := time.After(20 * time.Second)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				p.t.Fatalf("callout program ended before %q (said %q); stderr:\n%s", s, seen, p.errb)
			}
			if strings.Contains(l, s) {
				return seen
			}
			seen = append(seen, l)
		case <-timeout:
			p.t.Fatalf("no %q from the callout program (said %q); stderr:\n%s", s, seen, p.errb)
		}
	}
}

// stop ends the program the way a person does (SIGTERM) and waits.
func (p *calloutProg) stop() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.in.Close()
	p.cmd.Wait()
}

var askuserBin struct {
	once sync.Once
	path string
	err  error
}

// buildAskuser builds examples/askuser once per test binary.
func buildAskuser(t *testing.T) string {
	t.Helper()
	askuserBin.once.Do(func() {
		dir, err := os.MkdirTemp("", "fwpaskuser")
		if err != nil {
			askuserBin.err = err
			return
		}
		askuserBin.path = filepath.Join(dir, "askuser")
		if out, err := exec.Command("go", "build", "-o", askuserBin.path, "fwp/examples/askuser").CombinedOutput(); err != nil {
			askuserBin.err = fmt.Errorf("building askuser: %v\n%s", err, out)
		}
	})
	if askuserBin.err != nil {
		t.Fatal(askuserBin.err)
	}
	t.Cleanup(func() {}) // the binary is removed with the temp dir at exit
	return askuserBin.path
}

// kernelCalloutScenario is fwpd with the kernel datapath and its callout
// path serving the scenario's network namespace; args go to fwpd.
func kernelCalloutScenario(t *testing.T, args ...string) (*kdaemon, *scenario) {
	t.Helper()
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	link := filepath.Join(dir, "netns")
	d := startKernelDaemon(t, cg, dir, append([]string{"--callout-netns", link}, args...)...)
	s, pid := startScenario(t, cg, d.pins)
	if err := os.Symlink(fmt.Sprintf("/proc/%d/ns/net", pid), link); err != nil {
		t.Fatal(err)
	}
	return d, s
}

// TestE2EKernelRemoteCalloutAskUser: examples/askuser, a callout program
// of its own, registers its callouts with fwpd and adds its catch-all
// filters at ALE_AUTH_CONNECT; curl in the hooked cgroup is held by the
// kernel callout path, askuser (-auto) answers, remembers the answer as a
// filter, and curl is permitted or refused accordingly; the next connect
// of the pair is decided by the remembered filter without askuser.
func TestE2EKernelRemoteCalloutAskUser(t *testing.T) {
	// The calls are counted: no reauthorization pass after askuser's
	// commits, which classifies a still-open curl connection again and
	// may call the catch-all callout once more (as WFP's reauthorization
	// does; TestE2EKernelReauthorizeEstablished covers that).
	d, s := kernelCalloutScenario(t, "--no-reauthorize-established")
	bin := buildAskuser(t)
	for _, c := range []struct {
		auto string
		port int
		code int // curl's exit: 0 (an answer) or 7 (refused: the reset)
	}{{"allow", 8080, 0}, {"block", 9090, 7}} {
		a := startCalloutProg(t, bin, []string{"FWPD_SOCKET=" + d.sock}, "-auto", c.auto, "-remember", "dynamic", "-key", "ask"+c.auto)
		a.expect("askuser: ready")
		url := fmt.Sprintf("http://127.0.0.1:%d/", c.port)
		r := s.run(curl(url)...)
		if r.Code != c.code || c.code == 0 && !strings.Contains(r.Out, "origin") {
			t.Fatalf("askuser -auto %s: curl %s: %+v, want exit %d", c.auto, url, r, c.code)
		}
		a.expect(fmt.Sprintf("127.0.0.1:%d: %s (auto)", c.port, c.auto))
		a.expect("remembered as filter")
		// Again: the remembered filter decides; askuser is not asked.
		if r := s.run(curl(url)...); r.Code != c.code {
			t.Fatalf("askuser -auto %s, again: curl %s: %+v, want exit %d", c.auto, url, r, c.code)
		}
		// Called once: the first connect, pended. Its reauthorization and
		// the second connect met the remembered filter first (weight 10
		// over the catch-all's 1).
		ls := calloutList(t, d)
		if i := ls["ask"+c.auto+"-"+engine.LayerALEAuthConnectV4.String()]; i.Calls != 1 || i.Pends != 1 || i.Held != 0 {
			t.Fatalf("askuser -auto %s: fwpd called its callout %d times (%d pends, %d held), want once: %+v", c.auto, i.Calls, i.Pends, i.Held, ls)
		}
		a.stop()
	}
}

func calloutList(t *testing.T, d *kdaemon) map[string]client.CalloutInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := client.DialClassifier(ctx, d.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ls, err := cl.ListCallouts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]client.CalloutInfo{}
	for _, i := range ls {
		m[i.Key] = i
	}
	return m
}

// remotePolicy hands TCP to 8080 (fail closed) and 9090 (fail open) to the
// callout key "remote-co", which a callout program registers.
const remotePolicy = `lifetime: persistent
callouts:
  - {key: remote-co, layer: ALE_AUTH_CONNECT_V4}
filters:
  - {key: closed, layer: ALE_AUTH_CONNECT_V4, action: callout_terminating, callout: remote-co,
     conditions: [{field: ip_remote_port, match: equal, value: 8080}, {field: ip_protocol, match: equal, value: 6}]}
  - {key: open, layer: ALE_AUTH_CONNECT_V4, action: callout_terminating, callout: remote-co, flags: [permit_if_callout_unregistered],
     conditions: [{field: ip_remote_port, match: equal, value: 9090}, {field: ip_protocol, match: equal, value: 6}]}
`

// TestE2EKernelRemoteCalloutKill: a remote callout decides real connects
// inline (permit 9090, block 8080, the opposite of the filters' flags);
// then a callout program that pends the connects is killed (SIGKILL) while
// curl is held: curl gets the filter's PERMIT_IF_CALLOUT_UNREGISTERED
// answer (8080 refused, 9090 served) within 100 ms of the death, and a
// program registering again decides new connects.
func TestE2EKernelRemoteCalloutKill(t *testing.T) {
	d, s := kernelCalloutScenario(t)
	if errs, code := d.apply(t, remotePolicy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	helper := func(mode string) *calloutProg {
		p := startCalloutProg(t, os.Args[0], testutil.HelperEnv("rcallout"), d.sock, "remote-co", mode)
		p.expect("ready")
		return p
	}
	p := helper("ports")
	if r := s.run(curl("http://127.0.0.1:8080/")...); r.Code != 7 || r.Took >= time.Second {
		t.Fatalf("remote callout blocks 8080 (fail-open would permit it): curl %+v, want exit 7 at once", r)
	}
	p.expect("decided 8080 block")
	if r := s.run(curl("http://127.0.0.1:9090/")...); r.Code != 0 || !strings.Contains(r.Out, "origin") {
		t.Fatalf("remote callout permits 9090: curl %+v, want the origin's answer", r)
	}
	p.expect("decided 9090 permit")
	p.stop()

	for _, c := range []struct {
		port, code int
	}{{8080, 7}, {9090, 0}} {
		p := helper("hold")
		type res struct {
			r  runResult
			at time.Time
		}
		done := make(chan res, 1)
		go func() {
			r := s.run(curl(fmt.Sprintf("http://127.0.0.1:%d/", c.port))...)
			done <- res{r, time.Now()}
		}()
		p.expect(fmt.Sprintf("pended %d", c.port))
		// The program printed before its answer left: let fwpd hold the pend.
		deadline := time.Now().Add(10 * time.Second)
		for calloutList(t, d)["remote-co"].Held != 1 {
			if time.Now().After(deadline) {
				t.Fatalf("fwpd holds no pend of remote-co: %+v", calloutList(t, d))
			}
			time.Sleep(2 * time.Millisecond)
		}
		killed := time.Now()
		p.cmd.Process.Kill()
		var got res
		select {
		case got = <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("port %d: curl still held 10 s after the callout program's death", c.port)
		}
		took := got.at.Sub(killed)
		if got.r.Code != c.code {
			t.Fatalf("port %d, program killed mid-pend: curl %+v, want exit %d (the filter's flag)", c.port, got.r, c.code)
		}
		t.Logf("port %d: curl answered %v after SIGKILL of the callout program", c.port, took)
		if took > 100*time.Millisecond {
			t.Errorf("port %d: held connect resolved %v after the program's death, want within 100ms", c.port, took)
		}
		p.cmd.Wait()
		if i := calloutList(t, d)["remote-co"]; i.Registered || i.Held != 0 {
			t.Fatalf("after the death: %+v", i)
		}
	}
	// Registered again: the program decides new connects.
	helper("ports")
	if r := s.run(curl("http://127.0.0.1:8080/")...); r.Code != 7 {
		t.Fatalf("after re-registration: curl %+v, want the callout's block", r)
	}
}

// TestE2EKernelAskUserKilled: askuser prompting (no -auto) holds curl's
// connect; killed (SIGKILL) before anyone answers, the held connect gets
// its catch-all filter's flag: refused under -fail-closed, let through by
// default — although askuser's catch-all filters live in its dynamic
// session, which ends in the same instant. Under -fail-closed its catch-all
// filters outlive it: a new connect is refused at once while it is not
// running, and the next run reuses them.
func TestE2EKernelAskUserKilled(t *testing.T) {
	d, s := kernelCalloutScenario(t)
	bin := buildAskuser(t)
	for _, c := range []struct {
		args []string
		code int
	}{{[]string{"-fail-closed", "-remember", "static"}, 7}, {[]string{"-remember", "dynamic"}, 0}} {
		a := startCalloutProg(t, bin, []string{"FWPD_SOCKET=" + d.sock}, c.args...)
		a.expect("askuser: ready")
		done := make(chan runResult, 1)
		go func() { done <- s.run(curl("http://127.0.0.1:8080/")...) }()
		// The prompt has no newline: wait for fwpd to hold the pend.
		deadline := time.Now().Add(10 * time.Second)
		for calloutList(t, d)["askuser-"+engine.LayerALEAuthConnectV4.String()].Held != 1 {
			if time.Now().After(deadline) {
				t.Fatalf("fwpd holds no pend of askuser: %+v", calloutList(t, d))
			}
			time.Sleep(2 * time.Millisecond)
		}
		killed := time.Now()
		a.cmd.Process.Kill()
		var r runResult
		select {
		case r = <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("askuser %v killed: curl still held 10 s later", c.args)
		}
		t.Logf("askuser %v killed: curl %d after %v", c.args, r.Code, time.Since(killed))
		if r.Code != c.code {
			t.Fatalf("askuser %v killed mid-prompt: curl %+v, want exit %d", c.args, r, c.code)
		}
		a.cmd.Wait()
		// While askuser is not running, a new connect: refused at once
		// under -fail-closed (its filters stayed), let through otherwise
		// (they went with it).
		if r := s.run(curl("http://127.0.0.1:8080/")...); r.Code != c.code || r.Took > 2*time.Second {
			t.Fatalf("askuser %v not running: a new curl %+v, want exit %d at once", c.args, r, c.code)
		}
		if c.code == 7 {
			// The next run reuses the filters it left, then they are
			// deleted by hand (the way out of the mode).
			a := startCalloutProg(t, bin, []string{"FWPD_SOCKET=" + d.sock}, c.args...)
			a.expect("askuser: ready")
			a.cmd.Process.Kill()
			a.cmd.Wait()
			v4, v6 := engine.LayerALEAuthConnectV4.String(), engine.LayerALEAuthConnectV6.String()
			d.mustCtl("filter", "delete", "askuser-catchall-"+v4, "askuser-catchall-"+v6)
			d.mustCtl("callout", "delete", "askuser-"+v4, "askuser-"+v6)
		}
	}
}

// TestE2EKernelRemoteCalloutHung: a callout program that never answers
// (its Classify blocks) costs a real connect its answer deadline, then the
// filter's flag decides (8080 refused, 9090 served); fwpd counts the
// timeouts.
func TestE2EKernelRemoteCalloutHung(t *testing.T) {
	d, s := kernelCalloutScenario(t)
	if errs, code := d.apply(t, remotePolicy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	const deadline = 300 * time.Millisecond
	p := startCalloutProg(t, os.Args[0], testutil.HelperEnv("rcallout"), d.sock, "remote-co", "hang", deadline.String())
	p.expect("ready")
	for _, c := range []struct{ port, code int }{{8080, 7}, {9090, 0}} {
		r := s.run(curl(fmt.Sprintf("http://127.0.0.1:%d/", c.port))...)
		if r.Code != c.code || r.Took < deadline {
			t.Fatalf("port %d, hung callout: curl %+v, want exit %d after the %v deadline", c.port, r, c.code, deadline)
		}
		t.Logf("port %d: curl exit %d after %v", c.port, r.Code, r.Took)
	}
	// The program's one reading goroutine is stuck in the first call: the
	// second never reached its Classify, and timed out in fwpd the same.
	if i := calloutList(t, d)["remote-co"]; i.Timeouts != 2 || !i.Registered {
		t.Fatalf("listing: %+v, want 2 timeouts", i)
	}
}

// TestE2EKernelCalloutFlowContextsEnd: a callout program on the kernel
// path associates a flow context with each connect it permits (the flow
// handle is the socket's cookie); with no filter at the flow layers, the
// contexts still end when the sockets do — flowDeleteFn once each, none
// left in fwpd. (Before, the flow events ran only for policies with flow
// layer filters, and these contexts stayed until fwpd exited.)
func TestE2EKernelCalloutFlowContextsEnd(t *testing.T) {
	d, s := kernelCalloutScenario(t)
	if errs, code := d.apply(t, remotePolicy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	p := startCalloutProg(t, os.Args[0], testutil.HelperEnv("rcallout"), d.sock, "remote-co", "flow")
	p.expect("ready")
	const n = 20
	deletes := 0
	count := func(ls []string) {
		for _, l := range ls {
			if l != "flowdelete" {
				t.Fatalf("the callout program said %q", l) // associate-failed
			}
			deletes++
		}
	}
	for i := range n {
		if r := s.run(curl("http://127.0.0.1:9090/")...); r.Code != 0 {
			t.Fatalf("curl %d: %+v", i, r)
		}
		count(p.expect("associated"))
	}
	for deletes < n {
		count(p.expect("flowdelete"))
		deletes++
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := client.DialClassifier(ctx, d.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		o, err := cl.Outstanding(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if o.FlowContexts == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fwpd holds %+v after the %d flows closed", o, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
