package calloute2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"fwp/engine"
	"fwp/mgmt"
)

// The seed's out-of-band authorizer, remote: odd remote ports pend and
// are completed from another goroutine of the program; the completed
// operation is reauthorized and the decision it kept applies.
func TestRemotePendComplete(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-async", connV4), filterObj("f", connV4, "callout_terminating", "co-async", "10", nil))
	p := startProg(t, d, "0s", "co-async=async")
	meta := &engine.Metadata{Present: engine.MetaFlowHandle, FlowHandle: 7}
	for port, want := range map[string]engine.ActionType{"1": engine.ActionPermit, "3": engine.ActionBlock, "2": engine.ActionPermit, "5": engine.ActionPermit} {
		m := *meta
		m.FlowHandle = engine.FlowHandle(100 + len(port) + int(port[0]))
		if r := d.classify(connV4, "10.1.1.1:"+port, &m); r.Action != want {
			t.Fatalf("port %s: %+v, want %s", port, r, want)
		}
	}
	if i := d.info("co-async"); i.Pends != 3 || i.Held != 0 || i.Calls != 7 {
		t.Fatalf("listing: %+v (3 pends, each reauthorized: 7 calls)", i)
	}
	if o := d.outstanding(); o != (engine.Outstanding{}) {
		t.Fatalf("fwpd holds %+v", o)
	}
	p.send("outstanding")
	if l := p.expect("outstanding"); l != "outstanding co-async 0 0 0" {
		t.Fatalf("the program holds: %s", l)
	}
}

// A reauthorization cannot pend: the program's engine refuses it
// (CANNOT_PEND), as the embedded engine does.
func TestRemoteReauthCannotPend(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-reauth", connV4), filterObj("f", connV4, "callout_terminating", "co-reauth", "10", nil))
	p := startProg(t, d, "0s", "co-reauth=reauth")
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.1.1:80"))
	vs.Set(engine.FieldFlags, engine.Uint32(engine.FlagIsReauthorize))
	r, err := d.cl.Classify(context.Background(), connV4, &vs, &engine.Metadata{})
	if err != nil || r.Action != engine.ActionPermit {
		t.Fatalf("%+v %v", r, err)
	}
	if l := p.expect("pend"); !strings.Contains(l, "reauth=true") || !strings.Contains(l, "cannot pend") {
		t.Fatalf("the callout saw: %s", l)
	}
}

// CONNECT_REDIRECT through a remote callout, inline and pended: the
// redirect, target pid, context and records reach the classifier; a
// connection carrying the records back (the proxy's own) is left alone.
func TestRemoteRedirect(t *testing.T) {
	redir := engine.LayerALEConnectRedirectV4
	for _, mode := range []string{"redirect", "redirect-async"} {
		t.Run(mode, func(t *testing.T) {
			d := startDaemon(t)
			d.apply(calloutObj("co-redir", redir), filterObj("f", redir, "callout_unknown", "co-redir", "10", nil))
			startProg(t, d, "0s", "co-redir="+mode)
			r := d.classify(redir, "10.1.1.1:80", &engine.Metadata{})
			if r.Action != engine.ActionPermit || r.Connect == nil {
				t.Fatalf("%+v", r)
			}
			c := r.Connect
			if c.RemoteAddressAndPort != netip.MustParseAddrPort("127.0.0.1:1080") || c.LocalRedirectTargetPID != 4242 ||
				string(c.LocalRedirectContext) != "orig=80" || r.Original != netip.MustParseAddrPort("10.1.1.1:80") || c.LocalRedirectHandle == 0 {
				t.Fatalf("connect request %+v original %s", c, r.Original)
			}
			if c.PreviousVersion == nil || c.PreviousVersion.RemoteAddressAndPort != r.Original {
				t.Fatalf("previous version %+v", c.PreviousVersion)
			}
			// The records, as a proxy gets them: they name the callout's
			// handle, and a connection carrying them is not redirected again.
			recs, err := engine.ParseRedirectRecords(r.Records)
			if err != nil || recs.Len() != 1 {
				t.Fatalf("records %v %v", recs, err)
			}
			last, _ := recs.Last()
			if last.Handle != c.LocalRedirectHandle || last.Redirected != c.RemoteAddressAndPort || last.TargetPID != 4242 {
				t.Fatalf("record %+v", last)
			}
			again := d.classify(redir, "10.1.1.1:80", &engine.Metadata{Present: engine.MetaRedirectRecords, RedirectRecords: recs})
			if again.Connect != nil {
				t.Fatalf("the proxy's own connection was redirected again: %+v", again.Connect)
			}
			if o := d.outstanding(); o.Pends != 0 || o.ClassifyHandles != 0 || o.RedirectHandles != 1 {
				t.Fatalf("fwpd holds %+v (one redirect handle, the program's)", o)
			}
		})
	}
}

// notifyFn for filters present at registration and for each add and
// delete after.
func TestRemoteNotify(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-notify", connV4), filterObj("f-before", connV4, "callout_terminating", "co-notify", "10", nil))
	// The first notification may come before "ready": not startProg, which
	// skips what comes before it.
	p := startProgNoWait(t, d, nil, "0s", "co-notify=notify")
	if l := p.expect("notify"); l != "notify add_filter f-before" {
		t.Fatalf("%s", l)
	}
	p.expect("ready")
	d.apply(filterObj("f-after", connV4, "callout_terminating", "co-notify", "11", nil))
	if l := p.expect("notify"); l != "notify add_filter f-after" {
		t.Fatalf("%s", l)
	}
	if err := d.c.Delete(context.Background(), mgmt.Ref{Kind: mgmt.KindFilter, Key: "f-before"}); err != nil {
		t.Fatal(err)
	}
	if l := p.expect("notify"); l != "notify delete_filter f-before" {
		t.Fatalf("%s", l)
	}
}

// Flow contexts: associated by the program, passed back on the flow's
// later classifies, deleted once (flowDeleteFn) when the flow ends; a
// callout conditional on flow is called only for flows with a context.
func TestRemoteFlowContexts(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-flow", connV4), filterObj("f", connV4, "callout_inspection", "co-flow", "10", nil))
	p := startProg(t, d, "0s", "co-flow=flow")
	meta := engine.Metadata{Present: engine.MetaFlowHandle, FlowHandle: 5}
	d.classify(connV4, "10.1.1.1:80", &meta)
	// The program sees fwpd's handle of the client's flow 5 (flow handles
	// are per classifying connection), the same on each classify of it.
	l := p.expect("associate")
	var flow uint64
	if _, err := fmt.Sscanf(l, "associate %d <nil>", &flow); err != nil || flow>>63 != 1 {
		t.Fatalf("%s: want fwpd's handle of the flow, the association done", l)
	}
	d.classify(connV4, "10.1.1.1:80", &meta)
	if l := p.expect("context"); l != fmt.Sprintf("context %d ctx-%d", flow, flow) {
		t.Fatalf("%s", l)
	}
	if o := d.outstanding(); o.FlowContexts != 1 {
		t.Fatalf("fwpd holds %+v", o)
	}
	if err := d.cl.FlowDeleted(context.Background(), 5); err != nil {
		t.Fatal(err)
	}
	if l := p.expect("flowdelete"); l != fmt.Sprintf("flowdelete ctx-%d", flow) {
		t.Fatalf("%s", l)
	}
	if err := d.cl.FlowDeleted(context.Background(), 5); err != nil {
		t.Fatal(err)
	}
	p.send("outstanding")
	if l := p.expect("outstanding"); l != "outstanding co-flow 0 0 0" {
		t.Fatalf("%s", l)
	}
	for _, l := range p.backlog {
		if strings.HasPrefix(l, "flowdelete") {
			t.Fatalf("a second flowdelete: %s", l)
		}
	}
	// A context left when the program dies goes with it.
	meta.FlowHandle = 6
	d.classify(connV4, "10.1.1.1:80", &meta)
	p.expect("associate ")
	p.kill()
	d.waitUnregistered("co-flow")
	if o := d.outstanding(); o != (engine.Outstanding{}) {
		t.Fatalf("fwpd holds %+v after the program's death", o)
	}
}

// fwpctl callouts shows who registered a callout and its counters.
func TestFwpctlCallouts(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-shown", connV4), calloutObj("co-idle", connV4), filterObj("f", connV4, "callout_terminating", "co-shown", "10", nil))
	p := startProg(t, d, "0s", "co-shown=permit")
	d.classify(connV4, "10.1.1.1:80", nil)
	out, err := exec.Command(bins.fwpctl, "callouts", "--socket", d.sock).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	s := string(out)
	pid := fmt.Sprint(p.cmd.Process.Pid)
	if !strings.Contains(s, "co-shown") || !strings.Contains(s, pid) || !strings.Contains(s, "co-idle") {
		t.Fatalf("fwpctl callouts:\n%s", s)
	}
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "co-shown") && !strings.Contains(l, " 1 ") {
			t.Fatalf("no call counted: %s", l)
		}
	}
	out, err = exec.Command(bins.fwpctl, "callouts", "--socket", d.sock, "-o", "json").CombinedOutput()
	if err != nil || !strings.Contains(string(out), `"calls": 1`) {
		t.Fatalf("%v: %s", err, out)
	}
}

// /metrics has the remote callouts' counters.
func TestRemoteCalloutMetrics(t *testing.T) {
	d := startDaemon(t, "--metrics-addr", "127.0.0.1:0")
	var addr string
	if m := regexp.MustCompile(`msg="metrics listening" addr=(\S+)`).FindStringSubmatch(d.log.String()); m != nil {
		addr = m[1]
	}
	if addr == "" {
		t.Fatalf("no metrics address in the log:\n%s", d.log)
	}
	d.apply(calloutObj("co-m", connV4), filterObj("f", connV4, "callout_terminating", "co-m", "10", nil))
	startProg(t, d, "0s", "co-m=permit")
	d.classify(connV4, "10.1.1.1:80", nil)
	d.classify(connV4, "10.1.1.1:81", nil)
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{`fwp_remote_callout_calls_total{key="co-m"} 2`, `fwp_remote_callout_registered{key="co-m"} 1`, `fwp_remote_callout_timeouts_total{key="co-m"} 0`} {
		if !strings.Contains(string(body), want) {
			t.Fatalf("no %q in /metrics:\n%s", want, body)
		}
	}
}
