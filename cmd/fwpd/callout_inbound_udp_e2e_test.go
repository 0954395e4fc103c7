//go:build linux

package main_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"fwp/client"
	"fwp/datapath/linux/nfqueue"
	"fwp/engine"
	"fwp/internal/testutil"
)

func init() { testutil.RegisterHelper("inudpecho", inudpEchoHelper) }

// inudpEchoHelper answers each UDP datagram to 127.0.0.1:PORT (for each
// port of its arguments) with "in PORT", and listens on the same TCP port
// as the spawner's readiness signal, until killed.
func inudpEchoHelper(args []string) error {
	for _, port := range args {
		pc, err := net.ListenPacket("udp4", "127.0.0.1:"+port)
		if err != nil {
			return err
		}
		go func() {
			buf := make([]byte, 512)
			for {
				_, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo([]byte("in "+port+"\n"), from)
			}
		}()
		ln, err := net.Listen("tcp4", "127.0.0.1:"+port)
		if err != nil {
			return err
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
	}
	select {}
}

const inboundUDPCalloutPolicy = `callouts:
  - {key: inudp-decide, layer: ALE_AUTH_RECV_ACCEPT_V4}
filters:
  - {key: inudp-7073, layer: ALE_AUTH_RECV_ACCEPT_V4, action: callout_terminating, callout: inudp-decide,
     conditions: [{field: ip_local_port, value: 7073}, {field: ip_protocol, value: 17}]}
  - {key: inudp-7074, layer: ALE_AUTH_RECV_ACCEPT_V4, action: callout_terminating, callout: inudp-decide,
     conditions: [{field: ip_local_port, value: 7074}, {field: ip_protocol, value: 17}]}
`

// TestE2EKernelInboundUDPCallout: fwpd serving the scenario's namespace
// holds the first datagram of inbound UDP flows to its sockets for a Go
// callout at AUTH_RECV_ACCEPT — a callout program's over the callout
// socket — which permits :7073 (the echo comes back) and blocks :7074
// (dropped: no answer); with the callout gone the fail-closed filters
// drop new flows; fwpd's tables leave with it.
func TestE2EKernelInboundUDPCallout(t *testing.T) {
	testutil.RequireRoot(t)
	requireTool(t, "socat")
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
	var seenPID, seenProto atomic.Int64
	rc, err := client.RegisterCallout(ctx, "inudp-decide", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		out.Action = engine.ActionBlock
		if req.Values.Uint(engine.FieldIPLocalPort) == 7073 && req.Meta.Direction == engine.DirectionInbound {
			seenPID.Store(int64(req.Meta.ProcessID))
			seenProto.Store(int64(req.Values.Uint(engine.FieldIPProtocol)))
			out.Action = engine.ActionPermit
		}
	}}, client.CalloutOptions{Socket: d.sock})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if errs, code := d.apply(t, inboundUDPCalloutPolicy); code != 0 {
		t.Fatalf("fwpctl apply: %s", errs)
	}
	// The server binds after the policy: the hooks record its owner.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	req, _ := json.Marshal(map[string]any{"argv": []string{exe, "7073", "7074"}, "env": testutil.HelperEnv("inudpecho"), "ready": "127.0.0.1:7074"})
	out := strings.TrimSpace(string(s.call("spawn " + string(req))))
	if out == "" {
		t.Fatal("spawn failed")
	}
	// socat waits wait seconds for the answer: one for a datagram that
	// must get none, longer for one that must (a loaded machine must not
	// read as a drop).
	send := func(port, wait int) runResult {
		return s.run("sh", "-c", fmt.Sprintf("echo hello | socat -T%d - UDP4:127.0.0.1:%d", wait, port))
	}
	if r := send(7073, 10); r.Code != 0 || strings.TrimSpace(r.Out) != "in 7073" {
		t.Fatalf("a datagram to :7073, permitted by the callout: %+v", r)
	}
	if got := seenPID.Load(); fmt.Sprint(got) != out || seenProto.Load() != 17 {
		t.Fatalf("the callout saw pid %d protocol %d, want the server's pid %s, UDP", got, seenProto.Load(), out)
	}
	if r := send(7074, 1); r.Code != 0 || r.Out != "" {
		t.Fatalf("a datagram to :7074, blocked by the callout: %+v; want no answer", r)
	}
	rc.Close() // the callout goes: the fail-closed filters drop new flows
	time.Sleep(200 * time.Millisecond)
	if r := send(7073, 1); r.Code != 0 || r.Out != "" {
		t.Fatalf("a new flow to :7073 with the callout gone (fail-closed filter): %+v; want no answer", r)
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
