//go:build linux

package main_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"fwp/internal/testutil"
)

const blockOutboundUDPPolicy = `filters:
  - {key: no-udp-out-v4, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_protocol, value: 17}]}
  - {key: no-udp-out-v6, layer: ALE_AUTH_CONNECT_V6, action: block, conditions: [{field: ip_protocol, value: 17}]}
`

// TestE2EKernelUDPServerReplies: under a policy committed through fwpd
// that blocks outbound UDP, unmodified UDP servers of the hooked cgroup —
// socat and the scenario's DNS server — answer clients outside the cgroup
// (socat, dig): a reply within an inbound flow is that flow's, as in WFP;
// a UDP send of the cgroup to a remote that never sent to it is refused.
func TestE2EKernelUDPServerReplies(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tool := range []string{"socat", "dig", "nsenter"} {
		requireTool(t, tool)
	}
	cg := testutil.NewCgroup(t)
	dir := kernelDir(t)
	d := startKernelDaemon(t, cg, dir)
	s, pid := startScenario(t, cg, d.pins)
	if errs, code := d.apply(t, blockOutboundUDPPolicy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	// socat's UDP server, a process of its own (spawn kills it at the
	// end); ready once the scenario's HTTP server (always up) accepts and
	// the UDP port is bound.
	req, _ := json.Marshal(map[string]any{"argv": []string{"socat", "UDP4-RECVFROM:7075,bind=127.0.0.1,fork", "SYSTEM:echo reply"}, "ready": "127.0.0.1:8080"})
	if out := strings.TrimSpace(string(s.call("spawn " + string(req)))); out == "" {
		t.Fatal("spawn failed")
	}
	for i := 0; ; i++ {
		if r := s.run("ss", "-Hnul", "sport = :7075"); strings.Contains(r.Out, "7075") {
			break
		} else if i == 100 {
			t.Fatalf("socat never bound :7075: %+v", r)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// A client outside the cgroup, in the scenario's namespace.
	outside := func(shell string) (string, error) {
		c := exec.Command("nsenter", fmt.Sprintf("--net=/proc/%d/ns/net", pid), "sh", "-c", shell)
		var out, errb bytes.Buffer
		c.Stdout, c.Stderr = &out, &errb
		err := c.Run()
		if err != nil {
			err = errors.Join(err, errors.New(errb.String()))
		}
		return strings.TrimSpace(out.String()), err
	}
	if out, err := outside("echo hello | socat -T10 - UDP4:127.0.0.1:7075"); err != nil || out != "reply" {
		t.Fatalf("socat client outside to socat's UDP server in the cgroup: %q, %v; want its reply", out, err)
	}
	if out, err := outside("dig @127.0.0.1 -p 53 +tries=1 +time=10 +short fwp.test"); err != nil || out != "10.1.2.3" {
		t.Fatalf("dig outside to the DNS server in the cgroup: %q, %v; want 10.1.2.3", out, err)
	}
	// The cgroup's own first send is still refused at AUTH_CONNECT.
	if r := s.run("sh", "-c", "echo hello | socat -T1 - UDP4-SENDTO:127.0.0.1:7076"); r.Code == 0 || !strings.Contains(r.Err, "Operation not permitted") {
		t.Fatalf("a UDP send of the cgroup to a remote that never sent: %+v; want EPERM", r)
	}
}
