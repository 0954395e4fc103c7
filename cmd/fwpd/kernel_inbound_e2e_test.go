//go:build linux

package main_test

import (
	"testing"

	"fwp/internal/testutil"
)

// TestE2EKernelInbound: fwpd with the kernel datapath takes AUTH_RECV_ACCEPT
// and AUTH_LISTEN filters (issue 17) and enforces them: the HTTP origin of
// the scenario (in the cgroup, on :8080) gets no SYN from a blocked
// source; a listen on a blocked port succeeds but its SYNs are dropped.
func TestE2EKernelInbound(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "curl")
	cg := testutil.NewCgroup(t)
	d := startKernelDaemon(t, cg, kernelDir(t))
	s, _ := startScenario(t, cg, d.pins)
	if errs, code := d.apply(t, `filters:
  - {key: no-in-from-5, layer: ALE_AUTH_RECV_ACCEPT_V4, action: block, conditions: [{field: ip_remote_address, value: 127.0.0.5}, {field: ip_local_port, value: 8080}]}
  - {key: no-listen-9090, layer: ALE_AUTH_LISTEN_V6, action: block, conditions: [{field: ip_local_port, value: 9090}]}
`); code != 0 {
		t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
	}
	// A refusal is waited for a second; an answer gets longer, so that a
	// loaded machine does not read as a refusal.
	short := func(args ...string) []string {
		return append([]string{"curl", "-sS", "--max-time", "1", "-g"}, args...)
	}
	long := func(args ...string) []string {
		return append([]string{"curl", "-sS", "--max-time", "10", "-g"}, args...)
	}
	if r := s.run(short("--interface", "127.0.0.5", "http://127.0.0.1:8080/")...); r.Code != 28 {
		t.Fatalf("curl from 127.0.0.5 to the blocked server: %+v; want exit 28 (no answer)", r)
	}
	if r := s.run(long("--interface", "127.0.0.6", "http://127.0.0.1:8080/")...); r.Code != 0 {
		t.Fatalf("curl from 127.0.0.6: %+v", r)
	}
	// The origin on :9090 listens dual-stack ([::]:9090, AUTH_LISTEN_V6):
	// it was open before the policy, so its next SYN classifies it.
	if r := s.run(short("http://127.0.0.1:9090/")...); r.Code != 28 {
		t.Fatalf("curl to the blocked listener: %+v; want exit 28 (no answer)", r)
	}
	if errs, code := d.apply(t, "delete:\n  - {kind: filter, key: no-in-from-5}\n  - {kind: filter, key: no-listen-9090}\n"); code != 0 {
		t.Fatal(errs)
	}
	for _, url := range []string{"http://127.0.0.1:8080/", "http://127.0.0.1:9090/"} {
		if r := s.run(long("--interface", "127.0.0.5", url)...); r.Code != 0 {
			t.Fatalf("after the filters went, curl %s: %+v", url, r)
		}
	}
}
