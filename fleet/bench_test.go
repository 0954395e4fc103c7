package fleet

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"fwp/engine"
	"fwp/internal/etcdtest"
	"fwp/mgmt"
)

// BenchmarkPropagation simulates a fleet in one process: N followers
// (each its own in-memory manager and engine, as N hosts with datapath
// none; one etcd client per 50 of them) against a 3-member etcd cluster
// on loopback. Each iteration writes one document revision with
// PutDocument (fwpctl fleet apply's path: parse, list, dry run, one txn)
// and waits until every follower has committed it. It reports the
// propagation to all N (median and p99) and etcd's load per revision.
//
//	go test -run XXX -bench Propagation -benchtime 50x ./fleet/
func BenchmarkPropagation(b *testing.B) {
	for _, n := range []int{3, 100, 1000} {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) { benchPropagation(b, n) })
	}
}

func benchPropagation(b *testing.B, n int) {
	c := etcdtest.Start(b, 3)
	ctx := context.Background()
	const pfx = "/bench/"
	var clients []*clientv3.Client
	for range (n + 49) / 50 {
		cl, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			b.Fatal(err)
		}
		defer cl.Close()
		clients = append(clients, cl)
	}
	revs := make([]atomic.Int64, n)
	fctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{}, n)
	for i := range n {
		m, err := mgmt.New(engine.New(engine.Options{}), mgmt.Options{Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			b.Fatal(err)
		}
		defer m.Close()
		f, err := NewFollower(Config{Client: clients[i%len(clients)], Prefix: pfx, Manager: m, Node: Node{Name: fmt.Sprintf("node-%04d", i)},
			LeaseTTL: 30 * time.Second, OnApply: func(r Result, err error) {
				if err == nil {
					revs[i].Store(r.Revision)
				}
			}})
		if err != nil {
			b.Fatal(err)
		}
		go func() { f.Run(fctx); done <- struct{}{} }()
	}
	defer func() {
		cancel()
		for range n {
			<-done
		}
	}()
	writer := clients[0]
	for {
		ns, _, err := Nodes(ctx, writer, pfx)
		if err == nil && len(ns) == n {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	doc := func(g int) []byte {
		return fmt.Appendf(nil, "sublayers:\n  - {key: corp, weight: 100}\nfilters:\n  - {key: block-a, layer: ALE_AUTH_CONNECT_V4, sublayer: corp, action: block, conditions: [{field: ip_remote_port, value: %d}]}\n  - {key: block-b, layer: ALE_AUTH_CONNECT_V6, sublayer: corp, action: block, conditions: [{field: ip_remote_port, value: 445}]}\n", 1+g%60000)
	}
	wait := func(rev int64) {
		for {
			all := true
			for i := range revs {
				if revs[i].Load() < rev {
					all = false
					break
				}
			}
			if all {
				return
			}
			time.Sleep(200 * time.Microsecond)
		}
	}
	// Settle: one revision applied everywhere, statuses written.
	rev, err := PutDocument(ctx, writer, pfx, "corp", doc(0))
	if err != nil {
		b.Fatal(err)
	}
	wait(rev)
	time.Sleep(500 * time.Millisecond)
	before := c.Metrics()
	var lat, wr []time.Duration
	g := 1
	for b.Loop() {
		start := time.Now()
		rev, err := PutDocument(ctx, writer, pfx, "corp", doc(g))
		if err != nil {
			b.Fatal(err)
		}
		wr = append(wr, time.Since(start))
		wait(rev)
		lat = append(lat, time.Since(start))
		g++
	}
	b.StopTimer()
	time.Sleep(500 * time.Millisecond) // the last statuses
	after := c.Metrics()
	per := func(name string, labels ...string) float64 {
		return (etcdtest.Sum(after, name, labels...) - etcdtest.Sum(before, name, labels...)) / float64(len(lat))
	}
	slices.Sort(lat)
	slices.Sort(wr)
	q := func(d []time.Duration, p float64) float64 {
		return float64(d[min(len(d)-1, int(p*float64(len(d))))].Microseconds()) / 1000
	}
	b.ReportMetric(q(lat, 0.5), "p50-ms")
	b.ReportMetric(q(lat, 0.99), "p99-ms")
	b.ReportMetric(q(wr, 0.5), "write-p50-ms")
	b.ReportMetric(per("grpc_server_handled_total", `grpc_type="unary"`), "etcd-req/rev")
	b.ReportMetric(per("etcd_mvcc_put_total")/3, "etcd-puts/rev")
	b.ReportMetric(per("grpc_server_msg_sent_total", `grpc_method="Watch"`), "watch-msgs/rev")
	b.ReportMetric(per("etcd_network_client_grpc_sent_bytes_total")/1024, "etcd-sent-KiB/rev")
	b.ReportMetric(0, "ns/op")
}
