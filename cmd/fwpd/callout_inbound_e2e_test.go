//go:build linux

package main_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"fwp/client"
	"fwp/datapath/linux/nfqueue"
	"fwp/engine"
	"fwp/internal/testutil"
)

func init() { testutil.RegisterHelper("inhttp", inhttpHelper) }

// inhttpHelper serves HTTP on each 127.0.0.1 port of its arguments, in
// order, until killed.
func inhttpHelper(args []string) error {
	for _, port := range args {
		ln, err := net.Listen("tcp4", "127.0.0.1:"+port)
		if err != nil {
			return err
		}
		go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "in", port) }))
	}
	select {}
}

const inboundCalloutPolicy = `callouts:
  - {key: in-decide, layer: ALE_AUTH_RECV_ACCEPT_V4}
filters:
  - {key: in-7070, layer: ALE_AUTH_RECV_ACCEPT_V4, action: callout_terminating, callout: in-decide,
     conditions: [{field: ip_local_port, value: 7070}, {field: ip_protocol, value: 6}]}
  - {key: in-7071, layer: ALE_AUTH_RECV_ACCEPT_V4, action: callout_terminating, callout: in-decide,
     conditions: [{field: ip_local_port, value: 7071}, {field: ip_protocol, value: 6}]}
`

// TestE2EKernelInboundCallout: fwpd serving the scenario's namespace
// holds inbound SYNs to its listeners for a Go callout at AUTH_RECV_ACCEPT
// — here a callout program's over the callout socket — which permits
// :7070 and blocks :7071 (dropped: curl gets no answer); with the callout
// gone the fail-closed filters drop both; fwpd's tables leave with it.
func TestE2EKernelInboundCallout(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	link := filepath.Join(dir, "netns")
	d := startKernelDaemon(t, cg, dir, "--callout-netns", link, "--metrics-addr", "127.0.0.1:0")
	s, pid := startScenario(t, cg, d.pins)
	if err := os.Symlink(fmt.Sprintf("/proc/%d/ns/net", pid), link); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var seenUID atomic.Int64
	seenUID.Store(-1)
	rc, err := client.RegisterCallout(ctx, "in-decide", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		out.Action = engine.ActionBlock
		switch req.Values.Uint(engine.FieldIPLocalPort) {
		case 7070:
			if req.Meta.Direction == engine.DirectionInbound {
				out.Action = engine.ActionPermit
			}
		case 7072:
			// The listener's owner: an unprivileged user's server.
			seenUID.Store(int64(req.Values.Uint(engine.FieldALEUserID)))
			out.Action = engine.ActionPermit
		}
	}}, client.CalloutOptions{Socket: d.sock})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	u := testutil.NewUser(t)
	policy := inboundCalloutPolicy + fmt.Sprintf(`  - {key: in-7072, layer: ALE_AUTH_RECV_ACCEPT_V4, action: callout_terminating, callout: in-decide,
     conditions: [{field: ip_local_port, value: 7072}, {field: ip_protocol, value: 6}, {field: ale_user_id, value: %d}]}
`, u.UID)
	if errs, code := d.apply(t, policy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	// The servers listen after the policy: the hooks record their owner.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	req, _ := json.Marshal(map[string]any{"argv": []string{exe, "7071", "7070"}, "env": testutil.HelperEnv("inhttp"), "ready": "127.0.0.1:7070"})
	if out := strings.TrimSpace(string(s.call("spawn " + string(req)))); out == "" {
		t.Fatal("spawn failed")
	}
	// A server of an unprivileged user (socat): the callout sees that
	// user as the listener's owner.
	requireTool(t, "socat")
	argv := u.Command("socat", "TCP4-LISTEN:7072,bind=127.0.0.1,reuseaddr,fork", "SYSTEM:echo in 7072").Args
	req, _ = json.Marshal(map[string]any{"argv": argv, "ready": "127.0.0.1:7072"})
	if out := strings.TrimSpace(string(s.call("spawn " + string(req)))); out == "" {
		t.Fatal("spawn as the user failed")
	}
	if got := seenUID.Load(); got != int64(u.UID) {
		t.Fatalf("the callout saw the listener's owner as uid %d, want the unprivileged user's %d", got, u.UID)
	}
	// A refusal is waited for a second; an answer gets longer (a loaded
	// machine must not read as a refusal).
	short := func(url string) []string { return []string{"curl", "-sS", "--max-time", "1", url} }
	long := func(url string) []string { return []string{"curl", "-sS", "--max-time", "10", url} }
	if r := s.run(long("http://127.0.0.1:7070/")...); r.Code != 0 || !strings.Contains(r.Out, "in 7070") {
		t.Fatalf("curl to :7070, permitted by the callout: %+v", r)
	}
	if r := s.run(short("http://127.0.0.1:7071/")...); r.Code != 28 {
		t.Fatalf("curl to :7071, blocked by the callout: %+v; want exit 28 (no answer)", r)
	}
	m := d.metrics(t)
	if !regexp.MustCompile(`fwp_callout_path_flows_total\{outcome="permitted"\} [1-9]`).MatchString(m) ||
		!regexp.MustCompile(`fwp_callout_path_flows_total\{outcome="blocked"\} [1-9]`).MatchString(m) {
		t.Fatalf("want inbound SYNs permitted and blocked by the callout path:\n%s", grepLines(m, "fwp_callout_path"))
	}
	rc.Close() // the callout goes: the fail-closed filters drop
	time.Sleep(200 * time.Millisecond)
	if r := s.run(short("http://127.0.0.1:7070/")...); r.Code != 28 {
		t.Fatalf("curl to :7070 with the callout gone (fail-closed filter): %+v; want exit 28", r)
	}
	ns, err := os.Open(link)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if n, err := nfqueue.Rules(int(ns.Fd())); err != nil || n <= 0 {
		t.Fatalf("fwp's tables in the scenario's namespace: %d rules, %v", n, err)
	}
	d.stop(15)
	if n, err := nfqueue.Rules(int(ns.Fd())); err != nil || n != -1 {
		t.Fatalf("after fwpd exited: %d rules left in fwp's tables (%v), want none", n, err)
	}
}
