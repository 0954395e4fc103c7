package calloute2e

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"fwp/client"
	"fwp/engine"
)

// Flow handles are per classifying connection: two clients that both
// name their flow 1 classify two flows of fwpd's engine (neither a kernel
// flow: the engine's handles have the top bit set, a socket cookie never
// does), a client's FlowDeleted ends only its own flow, and a client's
// flows end when its connection does — their contexts' flowDeleteFn run,
// nothing left in the engine.
func TestClassifierFlowsPerConnection(t *testing.T) {
	h := startHost(t, connV4, "flows")
	var mu sync.Mutex
	handles := map[engine.FlowHandle]bool{}
	deleted := map[string]int{}
	err := h.e.RegisterCallout("flows", engine.CalloutRegistration{
		Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			out.Action = engine.ActionPermit
			if !req.Meta.Has(engine.MetaFlowHandle) {
				return
			}
			f := req.Meta.FlowHandle
			ctx := string(req.Values.Get(engine.FieldALEAppID).Str())
			if err := req.Engine().FlowAssociateContext(f, req.Layer, req.Filter.Action.Callout, ctx); err != nil && !errors.Is(err, engine.ErrAlreadyExists) {
				t.Errorf("associate %d: %v", f, err)
			}
			mu.Lock()
			handles[f] = true
			mu.Unlock()
		},
		FlowDelete: func(layer engine.LayerID, callout engine.CalloutID, ctx any) {
			mu.Lock()
			deleted[ctx.(string)]++
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	dial := func() *client.Classifier {
		c, err := client.DialClassifier(ctx, h.sock)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	classify := func(c *client.Classifier, app string, flow engine.FlowHandle) {
		t.Helper()
		var vs engine.Values
		vs.Set(engine.FieldALEAppID, engine.String(app))
		if _, err := c.Classify(ctx, connV4, &vs, &engine.Metadata{Present: engine.MetaFlowHandle, FlowHandle: flow}); err != nil {
			t.Fatal(err)
		}
	}
	a, b := dial(), dial()
	defer b.Close()
	classify(a, "a", 1)
	classify(a, "a", 1) // the same flow again: one context
	classify(b, "b", 1)
	mu.Lock()
	if len(handles) != 2 {
		t.Fatalf("two clients' flow 1: %d engine flows, want 2", len(handles))
	}
	for f := range handles {
		if f>>63 != 1 {
			t.Errorf("engine flow %#x: the top bit clear (it could be a socket cookie)", f)
		}
	}
	mu.Unlock()
	if n := h.e.Outstanding().FlowContexts; n != 2 {
		t.Fatalf("%d flow contexts, want 2", n)
	}
	// b ends its flow 1: b's context only.
	if err := b.FlowDeleted(ctx, 1); err != nil {
		t.Fatal(err)
	}
	// An unknown flow (another client's, a kernel cookie): nothing.
	if err := b.FlowDeleted(ctx, 12345); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if deleted["b"] != 1 || deleted["a"] != 0 {
		t.Fatalf("after b's FlowDeleted(1): flowDeleteFn %v, want b once", deleted)
	}
	mu.Unlock()
	// a goes away without a word: its flow ends with its connection.
	a.Close()
	deadline := time.Now().Add(5 * time.Second)
	for h.e.Outstanding().FlowContexts != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("a's connection closed: %d flow contexts left", h.e.Outstanding().FlowContexts)
		}
		time.Sleep(5 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if deleted["a"] != 1 || deleted["b"] != 1 {
		t.Fatalf("flowDeleteFn %v, want each once", deleted)
	}
}
