package etcdtest

import (
	"context"
	"testing"
	"time"
)

func TestClusterKillAndRestart(t *testing.T) {
	c := Start(t, 3)
	cl := c.Client(t)
	ctx := context.Background()
	if _, err := cl.Put(ctx, "k", "v1"); err != nil {
		t.Fatal(err)
	}
	c.Members[0].Kill()
	// The killed member may have led: the two left elect a new leader
	// first (election timeouts, slower on a loaded machine).
	// etcd answers "request timed out, possibly due to previous leader
	// failure" while it does; a client tries again, as fleet's do.
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		_, err := cl.Put(wctx, "k", "v2")
		if err == nil {
			break
		}
		if wctx.Err() != nil {
			t.Fatalf("a write with one member of three down: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.Restart(c.Members[0])
	c.WaitHealthy(t, 10*time.Second)
	r, err := cl.Get(ctx, "k")
	if err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != "v2" {
		t.Fatalf("get: %v %v", r, err)
	}
}
