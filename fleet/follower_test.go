package fleet

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"fwp/internal/etcdtest"
	"fwp/mgmt"
)

// host is one in-process follower: a manager (in memory or on dir) and
// its follower, with its own etcd client as a separate host would have.
type host struct {
	t       *testing.T
	m       *mgmt.Manager
	f       *Follower
	cl      *clientv3.Client
	cancel  context.CancelFunc
	done    chan struct{}
	applied atomic.Int64 // OnApply calls that committed
	mu      sync.Mutex
	revs    []int64 // committed revisions, in order
}

func startHost(t *testing.T, c *etcdtest.Cluster, prefix string, node Node, dir string, ttl time.Duration, check func(*host, Result, error)) *host {
	t.Helper()
	h := &host{t: t, done: make(chan struct{})}
	var err error
	h.cl, err = clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	h.m = newManager(t, dir)
	h.f, err = NewFollower(Config{Client: h.cl, Prefix: prefix, Manager: h.m, Node: node, LeaseTTL: ttl, Version: "test", Datapath: "none",
		Logger:   slog.New(slog.NewTextHandler(tlog{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Counters: func() map[string]uint64 { return map[string]uint64{"filters": 1} },
		OnApply: func(r Result, err error) {
			if r.Committed {
				h.applied.Add(1)
				h.mu.Lock()
				h.revs = append(h.revs, r.Revision)
				h.mu.Unlock()
			}
			if check != nil {
				check(h, r, err)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { defer close(h.done); h.f.Run(ctx) }()
	t.Cleanup(h.stop)
	return h
}

// tlog sends a follower's log to the test's.
type tlog struct{ t *testing.T }

func (w tlog) Write(p []byte) (int, error) { w.t.Log(strings.TrimSpace(string(p))); return len(p), nil }

func (h *host) stop() {
	h.cancel()
	<-h.done
	h.cl.Close()
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("after %s: %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

func put(t *testing.T, cl *clientv3.Client, prefix, name, doc string) int64 {
	t.Helper()
	rev, err := PutDocument(context.Background(), cl, prefix, name, []byte(doc))
	if err != nil {
		t.Fatalf("PutDocument %s: %v", name, err)
	}
	return rev
}

func TestFollowCluster(t *testing.T) {
	c := etcdtest.Start(t, 3)
	cl := c.Client(t)
	ctx := context.Background()
	const pfx = "/fwp/"
	hosts := []*host{
		startHost(t, c, pfx, Node{Name: "web-1", Labels: map[string]string{"role": "web"}}, "", 2*time.Second, nil),
		startHost(t, c, pfx, Node{Name: "web-2", Labels: map[string]string{"role": "web"}}, "", 2*time.Second, nil),
		startHost(t, c, pfx, Node{Name: "db-1", Labels: map[string]string{"role": "db"}}, "", 2*time.Second, nil),
	}
	atRev := func(rev int64) func() bool {
		return func() bool {
			for _, h := range hosts {
				if h.f.Status().Revision < rev {
					return false
				}
			}
			return true
		}
	}
	// Every host reports itself.
	waitFor(t, 5*time.Second, "three hosts in the list", func() bool {
		ns, _, err := Nodes(ctx, cl, pfx)
		return err == nil && len(ns) == 3
	})
	rev := put(t, cl, pfx, "base", docBase)
	took := waitFor(t, time.Second, "the policy reached every host within 1 s", atRev(rev))
	t.Logf("policy at revision %d on three hosts after %s", rev, took)
	for _, h := range hosts {
		if fs := filterSet(t, h.m); len(fs) != 2 {
			t.Fatalf("%s filters: %v", h.f.cfg.Node.Name, fs)
		}
	}
	// Selection: a document for role=web only.
	rev = put(t, cl, pfx, "web", "nodes: {labels: {role: web}}\nfilters:\n  - {key: web-only, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, value: 8081}]}\n")
	waitFor(t, time.Second, "the web document applied", atRev(rev))
	for i, h := range hosts {
		_, has := filterSet(t, h.m)["web-only"]
		if has != (i < 2) {
			t.Errorf("%s has web-only: %v", h.f.cfg.Node.Name, has)
		}
	}
	if hosts[0].f.Status().Hash != hosts[1].f.Status().Hash || hosts[0].f.Status().Hash == hosts[2].f.Status().Hash {
		t.Error("hosts with the same documents must report the same hash, and others another")
	}
	// The writer refuses what the followers would refuse, before writing.
	if _, err := PutDocument(ctx, cl, pfx, "dup", []byte(docBase)); err == nil || !strings.Contains(err.Error(), "also added by") {
		t.Fatalf("a document duplicating another was written: %v", err)
	}
	if _, err := PutDocument(ctx, cl, pfx, "bad", []byte("filters: [{key: x}]\n")); err == nil {
		t.Fatal("an invalid document was written")
	}
	if r, _ := cl.Get(ctx, PoliciesPrefix(pfx)+"bad"); len(r.Kvs) != 0 {
		t.Fatal("a refused document is in etcd")
	}
	// A bad document written behind the checks' back: every host refuses
	// it, keeps its policy and reports the error.
	good := rev
	pr, err := cl.Put(ctx, PoliciesPrefix(pfx)+"bad", "filters:\n  - {key: x, layer: ALE_AUTH_CONNECT_V4, action: frobnicate}\n")
	if err != nil {
		t.Fatal(err)
	}
	badRev := pr.Header.Revision
	waitFor(t, time.Second, "every host reports the bad revision", func() bool {
		for _, h := range hosts {
			s := h.f.Status()
			if s.LastError == nil || s.LastError.Revision != badRev {
				return false
			}
		}
		return true
	})
	waitFor(t, 5*time.Second, "the errors in the node list", func() bool {
		ns, _, _ := Nodes(ctx, cl, pfx)
		for _, s := range ns {
			if s.LastError == nil || s.LastError.Revision != badRev || !strings.Contains(s.LastError.Error, "bad:2") || s.Revision != good {
				return false
			}
		}
		return len(ns) == 3
	})
	for _, h := range hosts {
		if s := h.f.Status(); s.Revision != good {
			t.Fatalf("%s enforces revision %d after a refused one, want %d", s.Node, s.Revision, good)
		}
	}
	if _, err := cl.Delete(ctx, PoliciesPrefix(pfx)+"bad"); err != nil {
		t.Fatal(err)
	}
	// Kill one member: writes and sync go on.
	c.Members[0].Kill()
	rev = put(t, cl, pfx, "more", "filters:\n  - {key: more, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, value: 1}]}\n")
	waitFor(t, 5*time.Second, "sync with one member down", atRev(rev))
	// Stop every member: the hosts keep enforcing and say so.
	for _, m := range c.Members {
		m.Stop()
	}
	waitFor(t, 10*time.Second, "every host says it is disconnected", func() bool {
		for _, h := range hosts {
			if h.f.Status().Connected {
				return false
			}
		}
		return true
	})
	for _, h := range hosts {
		if s := h.f.Status(); s.Revision != rev {
			t.Fatalf("%s enforces %d while etcd is down, want %d", s.Node, s.Revision, rev)
		}
		if _, ok := filterSet(t, h.m)["more"]; !ok {
			t.Fatal("a host dropped its policy while etcd is down")
		}
	}
	for _, m := range c.Members {
		c.Restart(m)
	}
	c.WaitHealthy(t, 20*time.Second)
	rev = put(t, cl, pfx, "more", "filters:\n  - {key: more2, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, value: 2}]}\n")
	waitFor(t, 10*time.Second, "catch up after etcd returns", atRev(rev))
	waitFor(t, 10*time.Second, "connected again", func() bool {
		for _, h := range hosts {
			if !h.f.Status().Connected {
				return false
			}
		}
		return true
	})
	for _, h := range hosts {
		fs := filterSet(t, h.m)
		if _, ok := fs["more2"]; !ok || fs["more"] != "" {
			t.Fatalf("%s after catching up: %v", h.f.cfg.Node.Name, fs)
		}
	}
}

// TestRestartResumes: a host that restarts reads its applied revision
// from its store and applies only what came after; a host whose revision
// etcd compacted lists the documents instead.
func TestRestartResumes(t *testing.T) {
	c := etcdtest.Start(t, 1)
	cl := c.Client(t)
	ctx := context.Background()
	const pfx = "/r/"
	dir := t.TempDir()
	node := Node{Name: "h1"}
	h := startHost(t, c, pfx, node, dir, 2*time.Second, nil)
	var last int64
	for i := range 5 {
		last = put(t, cl, pfx, "d", fmt.Sprintf("filters:\n  - {key: f%d, layer: ALE_AUTH_CONNECT_V4, action: block}\n", i))
	}
	waitFor(t, 2*time.Second, "applied", func() bool { return h.f.Status().Revision >= last })
	h.stop()
	h.m.Close()
	firstRevs := h.revs
	// Two more revisions while it is down.
	var missed []int64
	for i := 5; i < 7; i++ {
		missed = append(missed, put(t, cl, pfx, "d", fmt.Sprintf("filters:\n  - {key: f%d, layer: ALE_AUTH_CONNECT_V4, action: block}\n", i)))
	}
	h2 := startHost(t, c, pfx, node, dir, 2*time.Second, nil)
	waitFor(t, 2*time.Second, "caught up", func() bool { return h2.f.Status().Revision >= missed[1] })
	time.Sleep(100 * time.Millisecond)
	h2.mu.Lock()
	got := fmt.Sprint(h2.revs)
	h2.mu.Unlock()
	if got != fmt.Sprint(missed) {
		t.Fatalf("after restart the host committed revisions %s, want only %v (before: %v)", got, missed, firstRevs)
	}
	h2.stop()
	h2.m.Close()
	// Compaction: the applied revision is gone from etcd.
	last = put(t, cl, pfx, "d", "filters:\n  - {key: f9, layer: ALE_AUTH_CONNECT_V4, action: block}\n")
	if _, err := cl.Compact(ctx, last); err != nil {
		t.Fatal(err)
	}
	h3 := startHost(t, c, pfx, node, dir, 2*time.Second, nil)
	waitFor(t, 2*time.Second, "resync after compaction", func() bool { return h3.f.Status().Revision >= last })
	if fs := filterSet(t, h3.m); len(fs) != 1 || fs["f9"] == "" {
		t.Fatalf("after resync: %v", fs)
	}
}

// TestLeaseExpiry: a host that dies leaves the node list when its lease
// ends; one that stops cleanly leaves at once.
func TestLeaseExpiry(t *testing.T) {
	c := etcdtest.Start(t, 1)
	cl := c.Client(t)
	ctx := context.Background()
	const pfx = "/l/"
	a := startHost(t, c, pfx, Node{Name: "dies"}, "", time.Second, nil)
	b := startHost(t, c, pfx, Node{Name: "stops"}, "", 30*time.Second, nil)
	waitFor(t, 5*time.Second, "two hosts listed", func() bool { ns, _, _ := Nodes(ctx, cl, pfx); return len(ns) == 2 })
	// Dying: the connection goes first, so nothing is revoked.
	a.cl.Close()
	start := time.Now()
	waitFor(t, 5*time.Second, "the dead host vanishes", func() bool {
		ns, _, _ := Nodes(ctx, cl, pfx)
		return len(ns) == 1 && ns[0].Node == "stops"
	})
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Errorf("the dead host vanished after %s, before its lease of 1 s could end", d)
	}
	b.stop()
	waitFor(t, time.Second, "a stopped host leaves at once", func() bool { ns, _, _ := Nodes(ctx, cl, pfx); return len(ns) == 0 })
}

// TestLoadRevisions: 1,000 revisions written back to back, each changing
// two documents in one etcd transaction. Every host ends on the last
// revision and never holds a mix of two revisions' objects.
func TestLoadRevisions(t *testing.T) {
	n := 1000
	if testing.Short() {
		n = 200
	}
	c := etcdtest.Start(t, 3)
	cl := c.Client(t)
	ctx := context.Background()
	const pfx = "/load/"
	var mixed atomic.Value
	check := func(h *host, r Result, err error) {
		if err != nil {
			mixed.Store(fmt.Sprintf("%s: revision %d refused: %v", h.f.cfg.Node.Name, r.Revision, err))
			return
		}
		// Called right after the commit, on the follower's goroutine: the
		// state in force is this revision's, whole.
		gens := map[string]bool{}
		for _, v := range filterSet(t, h.m) {
			gens[strings.Split(v, "/")[2]] = true
		}
		if len(gens) > 1 {
			mixed.Store(fmt.Sprintf("%s at revision %d holds generations %v", h.f.cfg.Node.Name, r.Revision, gens))
		}
	}
	var hosts []*host
	for i := range 3 {
		hosts = append(hosts, startHost(t, c, pfx, Node{Name: fmt.Sprintf("h%d", i)}, "", 5*time.Second, check))
	}
	doc := func(name string, gen int) string {
		return fmt.Sprintf("filters:\n  - {key: %s-1, layer: ALE_AUTH_CONNECT_V4, action: block, description: g%d, conditions: [{field: ip_remote_port, value: %d}]}\n  - {key: %s-2, layer: ALE_AUTH_CONNECT_V6, action: block, description: g%d}\n", name, gen, 1+gen%60000, name, gen)
	}
	start := time.Now()
	var last int64
	midGoroutines := 0
	for g := range n {
		if g == n/10 {
			midGoroutines = runtime.NumGoroutine()
		}
		tr, err := cl.Txn(ctx).Then(clientv3.OpPut(PoliciesPrefix(pfx)+"a", doc("a", g)), clientv3.OpPut(PoliciesPrefix(pfx)+"b", doc("b", g))).Commit()
		if err != nil {
			t.Fatal(err)
		}
		last = tr.Header.Revision
	}
	wrote := time.Since(start)
	waitFor(t, 30*time.Second, "every host on the last revision", func() bool {
		for _, h := range hosts {
			if h.f.Status().Revision != last {
				return false
			}
		}
		return true
	})
	t.Logf("%d revisions written in %s; all hosts on the last after %s", n, wrote, time.Since(start))
	// Nothing grows with the revisions: goroutines, sessions.
	if g := runtime.NumGoroutine(); g > midGoroutines+20 {
		t.Errorf("goroutines grew from %d to %d over the revisions", midGoroutines, g)
	}
	for _, h := range hosts {
		if ss := h.m.Sessions(); len(ss) != 1 {
			t.Errorf("%s has %d sessions, want the fleet's one", h.f.cfg.Node.Name, len(ss))
		}
	}
	if m := mixed.Load(); m != nil {
		t.Fatal(m)
	}
	for _, h := range hosts {
		if fs := filterSet(t, h.m); len(fs) != 4 || !strings.HasSuffix(fs["a-1"], fmt.Sprintf("/g%d/persistent", n-1)) {
			t.Fatalf("%s ends with %v", h.f.cfg.Node.Name, fs)
		}
		// Revisions are applied in order, each once.
		h.mu.Lock()
		for i := 1; i < len(h.revs); i++ {
			if h.revs[i] <= h.revs[i-1] {
				t.Fatalf("%s applied revision %d after %d", h.f.cfg.Node.Name, h.revs[i], h.revs[i-1])
			}
		}
		h.mu.Unlock()
	}
}

// TestNewCluster: a host whose store has a revision higher than a new
// etcd cluster's follows the new cluster's documents.
func TestNewCluster(t *testing.T) {
	dir := t.TempDir()
	node := Node{Name: "h1"}
	c1 := etcdtest.Start(t, 1)
	cl1 := c1.Client(t)
	var last int64
	for i := range 10 {
		last = put(t, cl1, "/n/", "d", fmt.Sprintf("filters:\n  - {key: old%d, layer: ALE_AUTH_CONNECT_V4, action: block}\n", i))
	}
	h := startHost(t, c1, "/n/", node, dir, 2*time.Second, nil)
	waitFor(t, 2*time.Second, "applied on the first cluster", func() bool { return h.f.Status().Revision >= last })
	h.stop()
	h.m.Close()
	c2 := etcdtest.Start(t, 1)
	rev := put(t, c2.Client(t), "/n/", "d", "filters:\n  - {key: new, layer: ALE_AUTH_CONNECT_V4, action: block}\n")
	if rev >= last {
		t.Fatalf("the new cluster is at %d, not below %d", rev, last)
	}
	h2 := startHost(t, c2, "/n/", node, dir, 2*time.Second, nil)
	waitFor(t, 5*time.Second, "the new cluster's policy applied", func() bool { s := h2.f.Status(); return s.Revision >= rev && s.Revision < last })
	if fs := filterSet(t, h2.m); len(fs) != 1 || fs["new"] == "" {
		t.Fatalf("filters: %v", fs)
	}
}
