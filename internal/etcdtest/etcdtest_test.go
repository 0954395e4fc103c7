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
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := cl.Put(wctx, "k", "v2"); err != nil {
		t.Fatalf("a write with one member of three down: %v", err)
	}
	c.Restart(c.Members[0])
	c.WaitHealthy(t, 10*time.Second)
	r, err := cl.Get(ctx, "k")
	if err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != "v2" {
		t.Fatalf("get: %v %v", r, err)
	}
}
