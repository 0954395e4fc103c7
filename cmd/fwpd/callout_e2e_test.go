//go:build linux

package main_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"fwp/datapath/linux/nfqueue"
	"fwp/internal/testutil"
)

// calloutPolicy hands TCP to 8080 and 9090 to a Go callout no one
// registered: the engine decides them by the filters' flags — 8080 fails
// closed, 9090 open.
const calloutPolicy = `lifetime: persistent
callouts:
  - {key: my-go-callout, layer: ALE_AUTH_CONNECT_V4}
filters:
  - {key: closed, layer: ALE_AUTH_CONNECT_V4, action: callout_terminating, callout: my-go-callout,
     conditions: [{field: ip_remote_port, match: equal, value: 8080}, {field: ip_protocol, match: equal, value: 6}]}
  - {key: open, layer: ALE_AUTH_CONNECT_V4, action: callout_terminating, callout: my-go-callout, flags: [permit_if_callout_unregistered],
     conditions: [{field: ip_remote_port, match: equal, value: 9090}, {field: ip_protocol, match: equal, value: 6}]}
`

// TestE2EKernelCalloutPath: fwpd serving the scenario's network namespace
// (--callout-netns) starts its callout path with the first policy that
// hands flows to Go callouts; curl in the cgroup is refused at once or
// let through as the engine decides, and fwpd's nftables tables leave the
// namespace with fwpd.
func TestE2EKernelCalloutPath(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	// The namespace is the scenario's, which starts after fwpd: fwpd opens
	// the link when its callout path starts (at the policy's commit).
	link := filepath.Join(dir, "netns")
	d := startKernelDaemon(t, cg, dir, "--callout-netns", link)
	s, pid := startScenario(t, cg, d.pins)
	if err := os.Symlink(fmt.Sprintf("/proc/%d/ns/net", pid), link); err != nil {
		t.Fatal(err)
	}
	if r := s.run(curl("http://127.0.0.1:8080/")...); r.Code != 0 {
		t.Fatalf("before the policy: %+v", r)
	}
	if errs, code := d.apply(t, calloutPolicy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	if r := s.run(curl("http://127.0.0.1:8080/")...); r.Code != 7 || r.Took >= time.Second {
		t.Fatalf("fail-closed callout filter, callout unregistered: curl %+v, want exit 7 at once (a reset)", r)
	}
	if r := s.run(curl("http://127.0.0.1:9090/")...); r.Code != 0 {
		t.Fatalf("fail-open callout filter, callout unregistered: curl %+v, want 200", r)
	}
	ns, err := os.Open(link)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if n, err := nfqueue.Rules(int(ns.Fd())); err != nil || n <= 0 {
		t.Fatalf("fwp's tables in the scenario's namespace: %d rules, %v", n, err)
	}
	d.stop(15) // SIGTERM: a clean exit
	if n, err := nfqueue.Rules(int(ns.Fd())); err != nil || n != -1 {
		t.Fatalf("after fwpd exited: %d rules left in fwp's tables (%v), want none", n, err)
	}
}
