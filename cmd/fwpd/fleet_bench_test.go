//go:build linux

package main_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"fwp/fleet"
	"fwp/internal/etcdtest"
	"fwp/internal/testutil"
	"fwp/internal/unix"
)

// BenchmarkE2EFleetPropagation: three real fwpd on a 3-member etcd
// cluster on loopback (as root, one of them with the kernel datapath on a
// child cgroup); each iteration runs the real fwpctl fleet apply and waits
// until every host reports the revision in force (a host reports right
// after its commit, which for the kernel host includes installing the
// policy in the kernel).
//
//	go test -run XXX -bench E2EFleetPropagation -benchtime 200x ./cmd/fwpd/
func BenchmarkE2EFleetPropagation(b *testing.B) {
	c := etcdtest.Start(b, 3)
	eps := strings.Join(c.Endpoints(), ",")
	dir, err := os.MkdirTemp("", "fwpfleet")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	names := []string{"a", "b", "k"}
	for _, n := range names {
		args := []string{"--socket", filepath.Join(dir, n, "fwpd.sock"), "--state-dir", filepath.Join(dir, n, "state"),
			"--policy-source", "etcd", "--etcd-endpoints", eps, "--node-name", n, "--datapath", "none"}
		if n == "k" && unix.Geteuid() == 0 {
			cg := testutil.NewCgroup(b)
			defer unix.Unmount(filepath.Join(dir, "bpf"))
			args = append(args, "--datapath", "kernel", "--cgroup", cg.Path, "--bpffs-dir", filepath.Join(dir, "bpf", "fwp"), "--proxy-cgroup", "none")
		}
		cmd := exec.Command(bins.fwpd, args...)
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	}
	cl := c.Client(b)
	var mu sync.Mutex
	cond := sync.NewCond(&mu)
	at := map[string]int64{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		for wr := range cl.Watch(ctx, fleet.NodesPrefix("/fwp/"), clientv3.WithPrefix()) {
			for _, ev := range wr.Events {
				var s fleet.Status
				if json.Unmarshal(ev.Kv.Value, &s) == nil {
					mu.Lock()
					at[s.Node] = s.Revision
					cond.Broadcast()
					mu.Unlock()
				}
			}
		}
	}()
	wait := func(rev int64) {
		mu.Lock()
		defer mu.Unlock()
		for {
			all := true
			for _, n := range names {
				if at[n] < rev {
					all = false
				}
			}
			if all {
				return
			}
			cond.Wait()
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		ns, _, _ := fleet.Nodes(ctx, cl, "/fwp/")
		if len(ns) == 3 {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("the three fwpd did not report")
		}
		time.Sleep(20 * time.Millisecond)
	}
	file := filepath.Join(dir, "corp.yaml")
	var lat []time.Duration
	g := 0
	for b.Loop() {
		os.WriteFile(file, fmt.Appendf(nil, "filters:\n  - {key: block-a, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, value: %d}]}\n", 1+g%60000), 0o644)
		g++
		start := time.Now()
		out, err := exec.Command(bins.fwpctl, "fleet", "apply", "-f", file, "--etcd-endpoints", eps, "-o", "json").Output()
		if err != nil {
			b.Fatalf("fwpctl fleet apply: %v", err)
		}
		var r struct{ Revision int64 }
		json.Unmarshal(out, &r)
		wait(r.Revision)
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	q := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(q(0.5), "p50-ms")
	b.ReportMetric(q(0.99), "p99-ms")
	b.ReportMetric(0, "ns/op")
}
