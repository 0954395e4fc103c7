package calloute2e

import (
	"context"
	"errors"
	"fmt"
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
	"fwp/internal/calloutwire"
	"fwp/internal/testutil"
	"fwp/mgmt"
)

func (d *daemon) outstanding() engine.Outstanding {
	d.t.Helper()
	o, err := d.cl.Outstanding(context.Background())
	if err != nil {
		d.t.Fatal(err)
	}
	return o
}

// A callout program killed (SIGKILL) while it holds pends: each resolves
// by its filter's PERMIT_IF_CALLOUT_UNREGISTERED flag, at once, and fwpd's
// runtime holds nothing afterwards.
func TestKillMidPend(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-hold", connV4),
		filterObj("f-open", connV4, "callout_terminating", "co-hold", "10", []string{"permit_if_callout_unregistered"}, portIs(90)),
		filterObj("f-closed", connV4, "callout_terminating", "co-hold", "10", nil, portIs(91)))
	base := d.outstanding()
	p := startProg(t, d, "0s", "co-hold=hold")
	type res struct {
		r  client.ClassifyResult
		at time.Time
	}
	results := make(chan res, 2)
	for _, port := range []string{"90", "91"} {
		go func() {
			r := d.classify(connV4, "10.1.1.1:"+port, nil)
			results <- res{r, time.Now()}
		}()
	}
	p.expect("pended")
	p.expect("pended")
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		// The program said so before its answer reached fwpd.
		o := d.outstanding()
		if o.Pends == base.Pends+2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fwpd holds %+v, want 2 pends more than %+v", o, base)
		}
	}
	killed := time.Now()
	p.cmd.Process.Kill()
	got := map[engine.FilterID]engine.ActionType{}
	var worst time.Duration
	for range 2 {
		r := <-results
		got[r.r.Filter] = r.r.Action
		worst = max(worst, r.at.Sub(killed))
		if r.r.Action == engine.ActionPermit && r.r.Reason != engine.ReasonCalloutUnregisteredPermit ||
			r.r.Action == engine.ActionBlock && r.r.Reason != engine.ReasonCalloutUnregisteredBlock {
			t.Fatalf("after the kill: %+v", r.r)
		}
	}
	fs, err := d.c.Filters(context.Background(), mgmt.Template{})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fs {
		want := map[string]engine.ActionType{"f-open": engine.ActionPermit, "f-closed": engine.ActionBlock}[f.Key]
		if got[engine.FilterID(f.ID)] != want {
			t.Fatalf("filter %s: %s, want %s (all: %v)", f.Key, got[engine.FilterID(f.ID)], want, got)
		}
	}
	t.Logf("both pends resolved %v after SIGKILL", worst)
	if worst > 100*time.Millisecond {
		t.Errorf("pends resolved %v after the program's death, want within 100ms", worst)
	}
	if o := d.outstanding(); o != base {
		t.Fatalf("fwpd holds %+v after the death, want %+v", o, base)
	}
	if i := d.info("co-hold"); i.Registered || i.Held != 0 || i.Pends != 2 {
		t.Fatalf("listing after the death: %+v", i)
	}
	// A program that registers again resumes: new classifications call it.
	p2 := startProg(t, d, "0s", "co-hold=permit")
	if r := d.classify(connV4, "10.1.1.1:91", nil); r.Action != engine.ActionPermit || r.Reason != engine.ReasonCalloutPermit {
		t.Fatalf("after re-registration: %+v", r)
	}
	p2.kill()
}

// The same with pended classifies at CONNECT_REDIRECT: each completes
// as the flag says (fail open: permitted, not redirected; fail closed:
// blocked) and no classify handle is left.
func TestKillMidPendClassify(t *testing.T) {
	redir := engine.LayerALEConnectRedirectV4
	d := startDaemon(t)
	d.apply(calloutObj("co-holdc", redir),
		filterObj("f-open", redir, "callout_unknown", "co-holdc", "10", []string{"permit_if_callout_unregistered"}, portIs(90)),
		filterObj("f-closed", redir, "callout_unknown", "co-holdc", "10", nil, portIs(91)))
	p := startProg(t, d, "0s", "co-holdc=holdclassify")
	results := make(chan client.ClassifyResult, 2)
	for _, port := range []string{"90", "91"} {
		go func() { results <- d.classify(redir, "10.1.1.1:"+port, &engine.Metadata{}) }()
	}
	p.expect("pended")
	p.expect("pended")
	for deadline := time.Now().Add(10 * time.Second); d.outstanding().Pends != 2; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("fwpd holds %+v", d.outstanding())
		}
	}
	p.cmd.Process.Kill()
	keys := map[engine.FilterID]string{}
	fs, err := d.c.Filters(context.Background(), mgmt.Template{})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fs {
		keys[engine.FilterID(f.ID)] = f.Key
	}
	for range 2 {
		r := <-results
		if r.Connect != nil && r.Connect.RemoteAddressAndPort != r.Original {
			t.Fatalf("redirected after the death: %+v", r)
		}
		want := map[string]engine.ActionType{"f-open": engine.ActionPermit, "f-closed": engine.ActionBlock}[keys[r.Filter]]
		if r.Action != want {
			t.Fatalf("%s: %+v, want %s", keys[r.Filter], r, want)
		}
	}
	if o := d.outstanding(); o != (engine.Outstanding{}) {
		t.Fatalf("fwpd holds %+v", o)
	}
}

// A callout that never answers hits its answer deadline: the filter's flag
// decides, the timeout is counted and a net event says so.
func TestHungCalloutDeadline(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-hang", connV4),
		filterObj("f-open", connV4, "callout_terminating", "co-hang", "10", []string{"permit_if_callout_unregistered"}, portIs(90)),
		filterObj("f-closed", connV4, "callout_terminating", "co-hang", "10", nil, portIs(91)))
	startProg(t, d, "150ms", "co-hang=hang")
	start := time.Now()
	if r := d.classify(connV4, "10.1.1.1:90", nil); r.Action != engine.ActionPermit {
		t.Fatalf("fail-open filter: %+v", r)
	}
	if el := time.Since(start); el < 150*time.Millisecond {
		t.Fatalf("answered after %v, before the 150ms deadline", el)
	}
	if r := d.classify(connV4, "10.1.1.1:91", nil); r.Action != engine.ActionBlock {
		t.Fatalf("fail-closed filter: %+v", r)
	}
	if i := d.info("co-hang"); i.Timeouts != 2 || !i.Registered || i.DeadlineUS != 150000 {
		t.Fatalf("listing: %+v", i)
	}
	evs, err := d.c.NetEvents(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range evs {
		if e.Type == "callout_failure" {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d callout_failure events, want 2: %+v", n, evs)
	}
	if o := d.outstanding(); o != (engine.Outstanding{}) {
		t.Fatalf("fwpd holds %+v", o)
	}
}

func TestDuplicateRegistration(t *testing.T) {
	d := startDaemon(t)
	startProg(t, d, "0s", "co-dup=permit")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := client.RegisterCallout(ctx, "co-dup", engine.CalloutRegistration{Classify: func(*engine.ClassifyRequest, *engine.ClassifyOut) {}},
		client.CalloutOptions{Socket: d.sock})
	if !errors.Is(err, engine.ErrAlreadyExists) {
		t.Fatalf("second registration of a live key: %v", err)
	}
	// Another key on the same daemon still registers.
	rc, err := client.RegisterCallout(ctx, "co-other", engine.CalloutRegistration{Classify: func(*engine.ClassifyRequest, *engine.ClassifyOut) {}},
		client.CalloutOptions{Socket: d.sock})
	if err != nil {
		t.Fatal(err)
	}
	rc.Close()
	d.waitUnregistered("co-other")
}

// A user who is neither root nor in the admin group cannot register a
// callout, classify through fwpd or list the callouts.
func TestNonAdminRefused(t *testing.T) {
	testutil.RequireRoot(t)
	const user = "fwpcotest"
	exec.Command("userdel", user).Run()
	if out, err := exec.Command("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user).CombinedOutput(); err != nil {
		testutil.Unavailable(t, errors.New(string(out)))
	}
	t.Cleanup(func() { exec.Command("userdel", user).Run() })
	d := startDaemon(t)
	// The test binary, where the user may run it.
	bin := filepath.Join(d.dir, "prog")
	data, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	args := []string{"setpriv", "--reuid=" + user, "--regid=" + user, "--clear-groups", bin}
	p := startProgNoWait(t, d, args, "0s", "co-x=permit")
	line := p.expect("error")
	if !strings.Contains(line, "access denied") {
		t.Fatalf("unprivileged registration: %s", line)
	}
	d.waitUnregistered("co-x")
	// Classify and list through the callout socket: refused too.
	cmd := exec.Command("setpriv", "--reuid="+user, "--regid="+user, "--clear-groups", bins.fwpctl, "callouts", "--socket", d.sock)
	out, err := cmd.CombinedOutput()
	if cmd.ProcessState.ExitCode() != 3 || !strings.Contains(string(out), "fwp: access denied: the callout socket needs the admin right") {
		t.Fatalf("unprivileged fwpctl callouts: %v: %s", err, out)
	}
}

// Malformed and truncated frames get a typed error and the connection is
// closed; fwpd goes on serving everyone else.
func TestMalformedFrames(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-ok", connV4), filterObj("f", connV4, "callout_terminating", "co-ok", "10", nil, portIs(80)))
	startProg(t, d, "0s", "co-ok=permit")
	good := calloutwire.AppendFrame(nil, calloutwire.Register{Key: "co-raw"})
	for name, raw := range map[string][]byte{
		"garbage":         []byte("GET / HTTP/1.1\r\n\r\n"),
		"huge length":     {0x7f, 0xff, 0xff, 0xff, 1},
		"unknown type":    {0, 0, 0, 1, 200},
		"bad varint":      {0, 0, 0, 3, byte(calloutwire.TRegister), 0xff, 0xff},
		"after register":  append(append([]byte{}, good...), 0, 0, 0, 2, byte(calloutwire.TAnswer), 0x80),
		"answer unasked":  calloutwire.AppendFrame(nil, calloutwire.Answer{ID: 1}),
		"truncated frame": good[:len(good)-2],
	} {
		c, err := net.Dial("unix", client.CalloutSocket(d.sock))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(raw); err != nil {
			t.Fatal(err)
		}
		if name == "truncated frame" {
			c.(*net.UnixConn).CloseWrite()
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		r := calloutwire.NewReader(c)
		var last calloutwire.Message
		for {
			m, err := r.Next()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) && err.Error() != "EOF" {
					t.Fatalf("%s: the connection did not close cleanly: %v", name, err)
				}
				break
			}
			last = m
		}
		c.Close()
		if name == "truncated frame" {
			// Nothing to answer: the frame never completed; the
			// connection is closed.
			continue
		}
		rep, ok := last.(calloutwire.Reply)
		wantCode := calloutwire.CodeMalformed
		if name == "answer unasked" {
			wantCode = calloutwire.CodeInvalidArgument
		}
		if !ok || rep.Code != wantCode {
			t.Fatalf("%s: last frame %#v, want a reply with code %d", name, last, wantCode)
		}
	}
	d.waitUnregistered("co-raw")
	if r := d.classify(connV4, "10.1.1.1:80", nil); r.Action != engine.ActionPermit {
		t.Fatalf("fwpd after the bad connections: %+v", r)
	}
	if err := d.cmd.Process.Signal(os.Signal(nil)); err != nil && !strings.Contains(err.Error(), "unsupported") {
		t.Fatal(err)
	}
}

// 10,000 concurrent classifications through one remote callout that pends
// half of them and completes those from another goroutine: all resolve,
// none lost, nothing held afterwards in fwpd or in the program.
func TestTenThousandConcurrent(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-half", connV4), filterObj("f", connV4, "callout_terminating", "co-half", "10", nil))
	p := startProg(t, d, "5s", "co-half=half")
	const n = 10000
	var wg sync.WaitGroup
	var mu sync.Mutex
	bad := 0
	reasons := map[string]int{}
	var firstErr error
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var vs engine.Values
			vs.SetTuple(6, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(1000+i/2)), netip.AddrPortFrom(netip.MustParseAddr("10.1.1.1"), uint16(2000+i)))
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			r, err := d.cl.Classify(ctx, connV4, &vs, &engine.Metadata{})
			mu.Lock()
			defer mu.Unlock()
			if err != nil && firstErr == nil {
				firstErr = err
			}
			if err != nil || r.Action != engine.ActionPermit {
				bad++
				reasons[r.Reason.String()+"/"+fmt.Sprint(i%2)]++
			}
		}()
	}
	wg.Wait()
	if firstErr != nil || bad != 0 {
		t.Fatalf("%d of %d not permitted (%v); first error %v; listing %+v", bad, n, reasons, firstErr, d.info("co-half"))
	}
	if o := d.outstanding(); o != (engine.Outstanding{}) {
		t.Fatalf("fwpd holds %+v", o)
	}
	p.send("outstanding")
	if l := p.expect("outstanding"); l != "outstanding co-half 0 0 0" {
		t.Fatalf("the program holds: %s", l)
	}
	i := d.info("co-half")
	if i.Calls != n+n/2 || i.Pends != n/2 || i.Held != 0 || i.Timeouts != 0 || i.Errors != 0 {
		t.Fatalf("listing: %+v (want %d calls: every classification and each pended one's reauthorization)", i, n+n/2)
	}
}
