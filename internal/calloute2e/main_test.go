package calloute2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"fwp/client"
	"fwp/engine"
	"fwp/mgmt"
)

var bins struct{ dir, fwpd, fwpctl, askuser, appproxy string }

func TestMain(m *testing.M) {
	if path := os.Getenv("FWP_ECHO_UNIX"); path != "" { // the same over a unix socket, Go's poller on both sides
		c, err := net.Dial("unix", path)
		if err != nil {
			os.Exit(1)
		}
		b := make([]byte, 1)
		for {
			if _, err := c.Read(b); err != nil {
				os.Exit(0)
			}
			c.Write(b)
		}
	}
	if os.Getenv("FWP_ECHO") != "" { // the floor of a round trip between processes
		b := make([]byte, 1)
		for {
			if _, err := os.Stdin.Read(b); err != nil {
				os.Exit(0)
			}
			os.Stdout.Write(b)
		}
	}
	if os.Getenv(progEnv) != "" {
		if err := prog(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "callout program:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "fwpcallout")
	if err != nil {
		panic(err)
	}
	bins.dir = dir
	bins.fwpd, bins.fwpctl = filepath.Join(dir, "fwpd"), filepath.Join(dir, "fwpctl")
	bins.askuser, bins.appproxy = filepath.Join(dir, "askuser"), filepath.Join(dir, "appproxy")
	for _, b := range []struct{ out, pkg string }{{bins.fwpd, "fwp/cmd/fwpd"}, {bins.fwpctl, "fwp/cmd/fwpctl"},
		{bins.askuser, "fwp/examples/askuser"}, {bins.appproxy, "fwp/examples/appproxy"}} {
		// fwpd is built without the race detector (CI's budget): its side of
		// the protocol runs under it in this binary (startHost), with the
		// callout programs, which are this binary too.
		if out, err := exec.Command("go", "build", "-o", b.out, b.pkg).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", b.pkg, err, out)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type daemon struct {
	t    *testing.T
	dir  string
	sock string
	cmd  *exec.Cmd
	log  *syncBuffer
	c    *client.Client
	cl   *client.Classifier
}

func startDaemon(t *testing.T, args ...string) *daemon {
	t.Helper()
	dir, err := os.MkdirTemp("", "fwpco")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	d := &daemon{t: t, dir: dir, sock: filepath.Join(dir, "fwpd.sock"), log: &syncBuffer{}}
	d.cmd = exec.Command(bins.fwpd, append([]string{"--socket", d.sock, "--state-dir", filepath.Join(dir, "state"), "--datapath", "none"}, args...)...)
	d.cmd.Stderr = d.log
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.cmd.Process.Kill(); d.cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(d.log.String(), "fwpd listening") {
		if time.Now().After(deadline) {
			t.Fatalf("fwpd did not start:\n%s", d.log)
		}
		time.Sleep(10 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if d.c, err = client.Dial(ctx, d.sock, client.Options{Name: "e2e"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.c.Close() })
	if d.cl, err = client.DialClassifier(ctx, d.sock); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.cl.Close() })
	return d
}

// apply adds objects through the API.
func (d *daemon) apply(objs ...mgmt.Object) {
	d.t.Helper()
	var ops []mgmt.Op
	for i := range objs {
		ops = append(ops, mgmt.Op{Add: &objs[i]})
	}
	if _, err := d.c.Apply(context.Background(), ops); err != nil {
		d.t.Fatal(err)
	}
}

func calloutObj(key string, layer engine.LayerID, flags ...string) mgmt.Object {
	return mgmt.Object{Callout: &mgmt.Callout{Key: key, Layer: layer.String(), Flags: flags}}
}

func filterObj(key string, layer engine.LayerID, action, callout string, weight string, flags []string, conds ...mgmt.Condition) mgmt.Object {
	return mgmt.Object{Filter: &mgmt.Filter{Key: key, Layer: layer.String(), Action: action, Callout: callout, Weight: weight, Flags: flags, Conditions: conds}}
}

func (d *daemon) classify(layer engine.LayerID, remote string, meta *engine.Metadata) client.ClassifyResult {
	d.t.Helper()
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort(remote))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := d.cl.Classify(ctx, layer, &vs, meta)
	if err != nil {
		d.t.Fatal(err)
	}
	return r
}

// proc is a callout program.
type proc struct {
	t       *testing.T
	cmd     *exec.Cmd
	in      io.WriteCloser
	lines   chan string
	backlog []string // lines read, not yet expected
	errb    *syncBuffer
}

// startProg starts a callout program registering key=mode pairs.
func startProg(t *testing.T, d *daemon, deadline string, regs ...string) *proc {
	t.Helper()
	p := startProgNoWait(t, d, nil, deadline, regs...)
	p.expect("ready")
	return p
}

func startProgNoWait(t *testing.T, d *daemon, wrap []string, deadline string, regs ...string) *proc {
	t.Helper()
	args := append([]string{d.sock, deadline}, regs...)
	var cmd *exec.Cmd
	if wrap != nil { // wrap ends with the program to run
		cmd = exec.Command(wrap[0], append(wrap[1:], args...)...)
	} else {
		cmd = exec.Command(os.Args[0], args...)
	}
	cmd.Env = append(os.Environ(), progEnv+"=1", "GORACE=atexit_sleep_ms=0")
	p := &proc{t: t, cmd: cmd, lines: make(chan string, 1<<16), errb: &syncBuffer{}}
	cmd.Stderr = p.errb
	var err error
	if p.in, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
	}()
	t.Cleanup(func() { p.kill() })
	return p
}

func (p *proc) kill() {
	p.cmd.Process.Kill()
	p.cmd.Wait()
}

// expect returns the first line starting with prefix not returned yet,
// waiting for it; the lines before it are kept for later expects.
func (p *proc) expect(prefix string) string {
	p.t.Helper()
	for i, l := range p.backlog {
		if strings.HasPrefix(l, prefix) {
			p.backlog = append(p.backlog[:i], p.backlog[i+1:]...)
			return l
		}
	}
	timeout := time.After(20 * time.Second)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				p.t.Fatalf("callout program ended before %q; stderr:\n%s", prefix, p.errb)
			}
			if strings.HasPrefix(l, prefix) {
				return l
			}
			p.backlog = append(p.backlog, l)
		case <-timeout:
			p.t.Fatalf("no %q from the callout program; stderr:\n%s", prefix, p.errb)
		}
	}
}

func (p *proc) send(line string) {
	p.t.Helper()
	if _, err := io.WriteString(p.in, line+"\n"); err != nil {
		p.t.Fatal(err)
	}
}

// waitUnregistered waits until fwpd no longer lists key as registered.
func (d *daemon) waitUnregistered(key string) {
	d.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ls, err := d.cl.ListCallouts(context.Background())
		if err != nil {
			d.t.Fatal(err)
		}
		reg := false
		for _, c := range ls {
			reg = reg || c.Key == key && c.Registered
		}
		if !reg {
			return
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("callout %s still registered", key)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (d *daemon) info(key string) client.CalloutInfo {
	d.t.Helper()
	ls, err := d.cl.ListCallouts(context.Background())
	if err != nil {
		d.t.Fatal(err)
	}
	for _, c := range ls {
		if c.Key == key {
			return c
		}
	}
	d.t.Fatalf("callout %s not listed: %+v", key, ls)
	return client.CalloutInfo{}
}

func portIs(p uint16) mgmt.Condition {
	return mgmt.Condition{Field: "ip_remote_port", Match: "equal", Value: fmt.Sprint(p)}
}
