//go:build linux

package main_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"fwp/internal/testutil"
)

func init() {
	testutil.RegisterHelper("reauthconns", reauthConnsHelper)
}

// reauthConnsHelper runs in the test cgroup and namespace: "open N" starts
// two TCP echo servers (A, B) and a UDP echo server (C) on loopback, opens
// N long TCP connections to A and to B and one connected UDP socket to C,
// and answers the three ports; "check" answers each flow's fate in order
// (A's, B's, then UDP): "ok" when a byte comes back, "aborted" when the
// socket was destroyed (ECONNABORTED), or the error.
func reauthConnsHelper([]string) error {
	in := bufio.NewScanner(os.Stdin)
	var conns []net.Conn
	for in.Scan() {
		f := strings.Fields(in.Text())
		switch {
		case len(f) == 2 && f[0] == "open":
			n, _ := strconv.Atoi(f[1])
			var ports []int
			for range 2 {
				l, err := net.Listen("tcp4", "127.0.0.1:0")
				if err != nil {
					return err
				}
				go func() {
					for {
						c, err := l.Accept()
						if err != nil {
							return
						}
						go func() { io.Copy(c, c); c.Close() }()
					}
				}()
				ports = append(ports, l.Addr().(*net.TCPAddr).Port)
				for range n {
					c, err := net.Dial("tcp4", l.Addr().String())
					if err != nil {
						return err
					}
					conns = append(conns, c)
				}
			}
			pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
			if err != nil {
				return err
			}
			go func() {
				b := make([]byte, 64)
				for {
					n, from, err := pc.ReadFrom(b)
					if err != nil {
						return
					}
					pc.WriteTo(b[:n], from)
				}
			}()
			ports = append(ports, pc.LocalAddr().(*net.UDPAddr).Port)
			u, err := net.Dial("udp4", pc.LocalAddr().String())
			if err != nil {
				return err
			}
			conns = append(conns, u)
			if err := json.NewEncoder(os.Stdout).Encode(ports); err != nil {
				return err
			}
		case len(f) == 1 && f[0] == "check":
			out := make([]string, len(conns))
			for i, c := range conns {
				c.SetDeadline(time.Now().Add(2 * time.Second))
				b := []byte{'x'}
				_, err := c.Write(b)
				if err == nil {
					_, err = io.ReadFull(c, b)
				}
				switch {
				case err == nil:
					out[i] = "ok"
				case errors.Is(err, syscall.ECONNABORTED):
					out[i] = "aborted"
				default:
					out[i] = err.Error()
				}
			}
			if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
				return err
			}
		default:
			return fmt.Errorf("bad request %q", in.Text())
		}
	}
	return in.Err()
}

func blockPortsPolicy(tcp, udp int) string {
	return fmt.Sprintf(`filters:
  - key: block-a
    layer: ALE_AUTH_CONNECT_V4
    conditions: [{field: ip_remote_port, match: equal, value: %d}, {field: ip_protocol, match: equal, value: 6}]
    action: block
  - key: block-c
    layer: ALE_AUTH_CONNECT_V4
    conditions: [{field: ip_remote_port, match: equal, value: %d}, {field: ip_protocol, match: equal, value: 17}]
    action: block
`, tcp, udp)
}

// TestE2EKernelReauthorizeEstablished: long connections established in
// the cgroup; a committed policy that blocks some of them resets those
// within a bounded time (a flow_reset net event and a /metrics count for
// each), the flows it still permits survive; with
// --no-reauthorize-established nothing is reset.
func TestE2EKernelReauthorizeEstablished(t *testing.T) {
	testutil.RequireRoot(t)
	const n = 4
	for _, on := range []bool{true, false} {
		t.Run(fmt.Sprintf("reauthorize=%v", on), func(t *testing.T) {
			cg := testutil.NewCgroup(t)
			args := []string{"--metrics-addr", "127.0.0.1:0"}
			if !on {
				args = append(args, "--no-reauthorize-established")
			}
			d := startKernelDaemon(t, cg, kernelDir(t), args...)
			events := d.followEvents(t)
			h := testutil.StartHelper(t, cg, "reauthconns")
			call := func(req string, v any) {
				t.Helper()
				ans, err := h.Call([]byte(req))
				if err != nil {
					t.Fatal(err)
				}
				if err := json.Unmarshal(ans, v); err != nil {
					t.Fatalf("%s: %v (%q)", req, err, ans)
				}
			}
			var ports []int
			call(fmt.Sprintf("open %d", n), &ports)
			var fate []string
			call("check", &fate)
			if strings.Count(strings.Join(fate, " "), "ok") != 2*n+1 {
				t.Fatalf("before the policy: %v", fate)
			}
			start := time.Now()
			if errs, code := d.apply(t, blockPortsPolicy(ports[0], ports[2])); code != 0 {
				t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
			}
			// Reset within a bounded time: poll the flows for up to 3 s.
			// A destroyed socket's first call fails with ECONNABORTED, the
			// next ones with EPIPE: keep each flow's first failure.
			deadline := start.Add(3 * time.Second)
			first := make([]string, 2*n+1)
			for i := range first {
				first[i] = "ok"
			}
			for {
				call("check", &fate)
				for i, f := range fate {
					if first[i] == "ok" {
						first[i] = f
					}
				}
				if !on || (first[0] != "ok" && first[2*n] != "ok") || time.Now().After(deadline) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			fate = first
			took := time.Since(start)
			if !on {
				time.Sleep(500 * time.Millisecond) // a pass would have run by now
				call("check", &fate)
				for i, f := range fate {
					if f != "ok" {
						t.Fatalf("flow %d reset with --no-reauthorize-established: %s", i, f)
					}
				}
				if m := grepLines(d.metrics(t), `fwp_kernel_reauthorize_total{what="resets"}`); !strings.HasSuffix(m, " 0") {
					t.Fatalf("metrics: %q", m)
				}
				return
			}
			t.Logf("blocked flows reset %v after fwpctl apply started", took)
			for i, f := range fate {
				want := "ok"
				if i < n {
					want = "aborted"
				}
				if i == 2*n {
					want = "not ok" // a destroyed UDP socket is disconnected
				}
				if (want == "ok") != (f == "ok") || (want == "aborted" && f != want) {
					t.Errorf("flow %d: %s, want %s", i, f, want)
				}
			}
			resets := 0
			timeout := time.After(3 * time.Second)
			for resets < n+1 {
				select {
				case e := <-events:
					if e.Type != "flow_reset" {
						continue
					}
					if !strings.HasSuffix(e.Remote, ":"+strconv.Itoa(ports[0])) && !strings.HasSuffix(e.Remote, ":"+strconv.Itoa(ports[2])) ||
						e.FilterID == 0 || e.ProcessID != uint32(h.Pid()) || e.AppID == "" {
						t.Errorf("flow_reset event %+v", e)
					}
					resets++
				case <-timeout:
					t.Fatalf("%d flow_reset events, want %d", resets, n+1)
				}
			}
			m := d.metrics(t)
			if got := grepLines(m, `fwp_kernel_reauthorize_total{what="resets"}`); !strings.HasSuffix(got, fmt.Sprintf(" %d", n+1)) {
				t.Fatalf("metrics: %q", got)
			}
		})
	}
}

// TestE2EKernelFlowLayersPolicy: a policy with filters at the flow layers
// is accepted by the kernel datapath (they run in fwpd from the hooks'
// flow events), which turns the flow events on; flows still connect.
func TestE2EKernelFlowLayersPolicy(t *testing.T) {
	testutil.RequireRoot(t)
	cg := testutil.NewCgroup(t)
	d := startKernelDaemon(t, cg, kernelDir(t), "--metrics-addr", "127.0.0.1:0")
	if errs, code := d.apply(t, `filters:
  - key: inspect-established
    layer: ALE_FLOW_ESTABLISHED_V4
    action: permit
  - key: inspect-closure
    layer: ALE_ENDPOINT_CLOSURE_V4
    action: permit
`); code != 0 {
		t.Fatalf("fwpctl apply: exit %d: %s", code, errs)
	}
	if !strings.Contains(d.log.String(), "flow layers on") {
		t.Fatalf("fwpd did not turn the flow layers on:\n%s", d.log)
	}
	h := testutil.StartHelper(t, cg, "reauthconns")
	if _, err := h.Call([]byte("open 2")); err != nil {
		t.Fatal(err)
	}
	ans, err := h.Call([]byte("check"))
	if err != nil || strings.Count(string(ans), `"ok"`) != 5 {
		t.Fatalf("flows with the flow layers on: %s %v", ans, err)
	}
	if m := d.metrics(t); !strings.Contains(m, "\nfwp_kernel_flow_events_lost_total 0\n") {
		t.Fatalf("metrics: %q", grepLines(m, "fwp_kernel_flow_events_lost_total"))
	}
}
