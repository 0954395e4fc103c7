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

// portRemote's filter calls a remote callout: one registered by a callout
// program (a process of its own) on a callout socket this process serves
// for the path's engine, as fwpd does.
const portRemote = 8011

const remoteProgEnv = "FWP_NFQUEUE_REMOTE_CALLOUT"

func init() {
	helperPorts = append(helperPorts, portRemote)
	if sock := os.Getenv(remoteProgEnv); sock != "" {
		os.Exit(remoteCalloutProg(sock))
	}
}

// remoteCalloutProg registers "test.remote", which permits at once, and
// runs until stdin closes.
func remoteCalloutProg(sock string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	rc, err := client.RegisterCallout(ctx, "test.remote", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		out.Action = engine.ActionPermit
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

// BenchmarkNewFlowLatencyRemote is BenchmarkNewFlowLatency's kernel and
// callout arms beside a third, remote: the filter calls a callout a callout
// program registered over the callout socket (server.Callouts on this
// path's engine), which permits at once. Each round alternates the three
// arms (200 connect+close each); medians over rounds. Run:
//
//	go test -run XXX -bench NewFlowLatencyRemote -benchtime 20x ./datapath/linux/nfqueue
func BenchmarkNewFlowLatencyRemote(b *testing.B) {
	fx := newFixture(b, pendTimeout)
	err := fx.eng.Update(func(tx *engine.Txn) error {
		co, err := tx.AddCallout(engine.Callout{Key: "test.remote", Layer: engine.LayerALEAuthConnectV4})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4,
			Conditions: []engine.Condition{
				{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)},
				{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(portRemote)},
			},
			Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co}})
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	pol, err := ebpf.Compile(fx.eng.View())
	if err != nil {
		b.Fatal(err)
	}
	if err := fx.dp.Apply(pol); err != nil {
		b.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "fwpnfqrc")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", client.CalloutSocket(sock))
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	go server.NewCallouts(fx.eng, func(peercred.Cred) bool { return true }, nil).Serve(l)
	prog := exec.Command(os.Args[0])
	prog.Env = append(os.Environ(), remoteProgEnv+"="+sock)
	in, _ := prog.StdinPipe()
	out, _ := prog.StdoutPipe()
	prog.Stderr = os.Stderr
	if err := prog.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { in.Close(); prog.Wait() }()
	if line, _ := bufio.NewReader(out).ReadString('\n'); strings.TrimSpace(line) != "ready" {
		b.Fatalf("callout program: %q", line)
	}
	const n = 200
	lat := func(port int) time.Duration {
		f := fx.call(b, "lat "+strconv.Itoa(port)+" "+strconv.Itoa(n))
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			b.Fatalf("lat %d: %v", port, f)
		}
		return time.Duration(ns)
	}
	var kernel, embedded, remote []time.Duration
	for b.Loop() {
		kernel = append(kernel, lat(portKernelPermit))
		embedded = append(embedded, lat(portPermit))
		remote = append(remote, lat(portRemote))
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
}
