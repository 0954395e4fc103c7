//go:build linux

package nfqueue

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"fwp/client"
	"fwp/datapath/linux/ebpf"
	"fwp/engine"
	"fwp/internal/peercred"
	"fwp/internal/server"
)

// portRemote's and portRemoteBlock's filters call a remote callout: one
// registered by a callout program (a process of its own) on a callout
// socket this process serves for the path's engine, as fwpd does. It
// permits the first port and blocks the second, at once.
const (
	portRemote      = 8011
	portRemoteBlock = 8012
)

const remoteProgEnv = "FWP_NFQUEUE_REMOTE_CALLOUT"

func init() {
	helperPorts = append(helperPorts, portRemote, portRemoteBlock)
	if sock := os.Getenv(remoteProgEnv); sock != "" {
		os.Exit(remoteCalloutProg(sock))
	}
}

// remoteCalloutProg registers "test.remote", which permits portRemote and
// blocks the rest at once, and runs until stdin closes.
func remoteCalloutProg(sock string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	rc, err := client.RegisterCallout(ctx, "test.remote", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		out.Action = engine.ActionBlock
		if req.Values.Uint(engine.FieldIPRemotePort) == portRemote {
			out.Action = engine.ActionPermit
		}
	}}, client.CalloutOptions{Socket: sock})
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n')
	rc.Close()
	return 0
}

// startRemoteCallout adds the remote callout's filters to the fixture's
// policy, serves the callout socket for its engine and starts the callout
// program; the Callouts service is returned for its counters.
func startRemoteCallout(tb testing.TB, fx *fixture) *server.Callouts {
	tb.Helper()
	err := fx.eng.Update(func(tx *engine.Txn) error {
		co, err := tx.AddCallout(engine.Callout{Key: "test.remote", Layer: engine.LayerALEAuthConnectV4})
		if err != nil {
			return err
		}
		for _, port := range []uint16{portRemote, portRemoteBlock} {
			if _, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4,
				Conditions: []engine.Condition{
					{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(port)},
				},
				Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co}}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	pol, err := ebpf.Compile(fx.eng.View())
	if err != nil {
		tb.Fatal(err)
	}
	if err := fx.dp.Apply(pol); err != nil {
		tb.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "fwpnfqrc")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", client.CalloutSocket(sock))
	if err != nil {
		tb.Fatal(err)
	}
	co := server.NewCallouts(fx.eng, func(peercred.Cred) bool { return true }, nil)
	go co.Serve(l)
	prog := exec.Command(os.Args[0])
	prog.Env = append(os.Environ(), remoteProgEnv+"="+sock)
	in, _ := prog.StdinPipe()
	out, _ := prog.StdoutPipe()
	prog.Stderr = os.Stderr
	if err := prog.Start(); err != nil {
		tb.Fatal(err)
	}
	// Cleanups run last-in first-out: the program ends, then the socket.
	tb.Cleanup(func() { l.Close() })
	tb.Cleanup(func() { in.Close(); prog.Wait() })
	if line, _ := bufio.NewReader(out).ReadString('\n'); strings.TrimSpace(line) != "ready" {
		tb.Fatalf("callout program: %q", line)
	}
	return co
}

// BenchmarkNewFlowLatencyRemote is BenchmarkNewFlowLatency's kernel and
// callout arms beside a third, remote: the filter calls a callout a callout
// program registered over the callout socket (server.Callouts on this
// path's engine), which permits at once; peer and peer-raw as in
// BenchmarkNewFlowLatency. Each round alternates the arms (200
// connect+close each); medians over rounds. The embedded callout's flows
// stay on the read loop though the remote callout's filters are at the
// same layer (engine.FlowMayBlock). Run:
//
//	go test -run XXX -bench NewFlowLatencyRemote -benchtime 20x ./datapath/linux/nfqueue
func BenchmarkNewFlowLatencyRemote(b *testing.B) {
	fx := newFixture(b, pendTimeout)
	startRemoteCallout(b, fx)
	const n = 200
	lat := func(port int) time.Duration {
		f := fx.call(b, "lat "+strconv.Itoa(port)+" "+strconv.Itoa(n))
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			b.Fatalf("lat %d: %v", port, f)
		}
		return time.Duration(ns)
	}
	var kernel, embedded, remote, peer, peerRaw []time.Duration
	startPeers(b, fx)
	for b.Loop() {
		kernel = append(kernel, lat(portKernelPermit))
		embedded = append(embedded, lat(portPermit))
		remote = append(remote, lat(portRemote))
		peer = append(peer, lat(portPeer))
		peerRaw = append(peerRaw, lat(portPeerRaw))
	}
	med := func(ds []time.Duration) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[len(s)/2]) / float64(time.Microsecond)
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(med(kernel), "kernel-µs")
	b.ReportMetric(med(embedded), "callout-µs")
	b.ReportMetric(med(remote), "remote-µs")
	b.ReportMetric(med(remote)-med(kernel), "remote-extra-µs")
	b.ReportMetric(med(remote)-med(embedded), "remote-over-callout-µs")
	b.ReportMetric(med(peer)-med(kernel), "peer-extra-µs")
	b.ReportMetric(med(peerRaw)-med(kernel), "peer-raw-extra-µs")
}

// TestRemoteLayerInline: with a callout program's filters at the layer,
// a flow that none of them matches (the embedded callout's port) is still
// decided on the read loop; a flow that may reach the callout program
// leaves it (Stats.Async).
func TestRemoteLayerInline(t *testing.T) {
	fx := newFixture(t, pendTimeout)
	startRemoteCallout(t, fx)
	const n = 20
	st0 := fx.path.Stats()
	if f := fx.call(t, fmt.Sprintf("dial %d %d 1", portPermit, n)); f[0] != strconv.Itoa(n) {
		t.Fatalf("embedded callout's port: %v", f)
	}
	st1 := fx.path.Stats()
	if st1.Async != st0.Async || st1.Inline-st0.Inline != n {
		t.Errorf("embedded callout's flows: %d off the read loop, %d inline; want 0 and %d", st1.Async-st0.Async, st1.Inline-st0.Inline, n)
	}
	if f := fx.call(t, fmt.Sprintf("dial %d %d 1", portRemote, n)); f[0] != strconv.Itoa(n) {
		t.Fatalf("remote callout's port: %v", f)
	}
	if st2 := fx.path.Stats(); st2.Async-st1.Async != n {
		t.Errorf("remote callout's flows: %d off the read loop, want %d", st2.Async-st1.Async, n)
	}
}

// TestSoakRemote: soakOps connects decided by a remote callout (a callout
// program of its own; a tenth refused by it) through one path and one
// callout connection; every one gets its answer, none timed out or failed,
// and afterwards nothing is held and goroutines, file descriptors and
// heap of this process (the path and the callout service) are back to
// their level.
func TestSoakRemote(t *testing.T) {
	fx := newFixture(t, pendTimeout)
	co := startRemoteCallout(t, fx)
	fx.call(t, fmt.Sprintf("dial %d 100 4", portRemote)) // warm up
	runtime.GC()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	g0, fd0 := runtime.NumGoroutine(), fdCount(t)
	st0 := fx.path.Stats()
	start := time.Now()
	blocked := soakOps / 10
	permitted := soakOps - blocked
	f := fx.call(t, fmt.Sprintf("dial %d %d 16", portRemote, permitted))
	if f[0] != strconv.Itoa(permitted) || f[1] != "0" {
		t.Fatalf("permitted connects: %v", f)
	}
	f = fx.call(t, fmt.Sprintf("dial %d %d 16", portRemoteBlock, blocked))
	if f[0] != "0" || f[1] != strconv.Itoa(blocked) || !strings.Contains(strings.Join(f, " "), "connection refused") {
		t.Fatalf("blocked connects: %v", f)
	}
	took := time.Since(start)
	st := fx.path.Stats()
	if q := st.Queued - st0.Queued; q != uint64(soakOps) || st.Permitted-st0.Permitted != uint64(permitted) || st.NoFlow != 0 || st.Errors != 0 {
		t.Fatalf("stats %+v (before %+v): want %d queued, %d permitted", st, st0, soakOps, permitted)
	}
	ls := co.List()
	if len(ls) != 1 || !ls[0].Registered || ls[0].Calls != uint64(soakOps+100) || ls[0].Timeouts != 0 || ls[0].Errors != 0 {
		t.Fatalf("the remote callout's counters: %+v, want %d calls, no timeout or error", ls, soakOps+100)
	}
	t.Logf("%d connects decided by a remote callout in %v (%v each); answer latency p50 ≤ %d µs, p99 ≤ %d µs",
		soakOps, took, took/time.Duration(soakOps), ls[0].P50US, ls[0].P99US)
	fx.checkClean(t)
	runtime.GC()
	var ms1 runtime.MemStats
	runtime.ReadMemStats(&ms1)
	g1, fd1 := runtime.NumGoroutine(), fdCount(t)
	t.Logf("goroutines %d -> %d, fds %d -> %d, heap %d -> %d KiB", g0, g1, fd0, fd1, ms0.HeapAlloc>>10, ms1.HeapAlloc>>10)
	if g1 > g0+2 || fd1 > fd0 || ms1.HeapAlloc > ms0.HeapAlloc+8<<20 {
		t.Fatalf("grew: goroutines %d -> %d, fds %d -> %d, heap %d -> %d", g0, g1, fd0, fd1, ms0.HeapAlloc, ms1.HeapAlloc)
	}
}
