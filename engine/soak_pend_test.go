package engine

import (
	"context"
	goruntime "runtime"
	"testing"
	"time"
)

// TestSoakPendReauthorize runs 100,000 pended classifications through the
// paths issue 12 changed — a pend at AUTH_RECV_ACCEPT completed with the
// held data and reauthorized, a pended classify whose asynchronous apply
// makes another callout reauthorize, refused pends without the write
// right — in one engine, and checks that nothing is left behind: pends,
// classify handles, goroutines, live heap.
func TestSoakPendReauthorize(t *testing.T) {
	n := 100_000
	if testing.Short() || raceEnabled {
		n = 10_000
	}
	accept := newPendThenAnswer(ActionPermit)
	e, _ := rtEngine(t, Options{}, rtCallout{key: "acc", layer: LayerALEAuthRecvAcceptV4, sublayer: 20, reg: accept.reg()})
	addPlain(t, e, LayerALEAuthRecvAcceptV4, 10, ActionBlock, 0)
	// A hard permit above a callout that tries to pend: refused each time.
	refused := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		if _, err := req.PendOperation(); err == nil {
			t.Error("a pend without the write right was allowed")
		}
	}}
	e2, _ := rtEngine(t, Options{}, rtCallout{key: "late", layer: LayerALEAuthConnectV4, sublayer: 10, reg: refused})
	addPlain(t, e2, LayerALEAuthConnectV4, 20, ActionPermit, FilterClearActionRight)

	go func() {
		for p := range accept.pends {
			_ = e.CompleteOperation(p, p) // any non-nil data: reinjected
		}
	}()
	defer close(accept.pends)
	round := func() {
		res, err := e.ClassifyWait(context.Background(), LayerALEAuthRecvAcceptV4, tcpValues(server, client), &Metadata{}, "held")
		if err != nil || res.Permitted() {
			t.Fatalf("pend, completion, reauthorization: %v %v", res, err)
		}
		if res := e2.Classify(LayerALEAuthConnectV4, tcpValues(client, server), &Metadata{}); !res.Permitted() || res.Pend != nil {
			t.Fatalf("refused pend: %v", res)
		}
	}
	for range 1000 { // warm up pools and maps before the baseline
		round()
	}
	base := heapAndGoroutines()
	for range n {
		round()
	}
	time.Sleep(10 * time.Millisecond)
	after := heapAndGoroutines()
	t.Logf("%d rounds: live heap %d -> %d bytes, goroutines %d -> %d", n, base.heap, after.heap, base.goroutines, after.goroutines)
	if o := e.Outstanding(); o.Pends != 0 || o.ClassifyHandles != 0 {
		t.Fatalf("engine holds %+v after %d rounds", o, n)
	}
	if after.goroutines > base.goroutines+2 {
		t.Fatalf("goroutines %d -> %d", base.goroutines, after.goroutines)
	}
	if after.heap > base.heap+8<<20 {
		t.Fatalf("live heap %d -> %d bytes after %d rounds", base.heap, after.heap, n)
	}
	var refusals uint64
	for _, c := range e2.ClassifyCounts() {
		refusals += c.PendRefused
	}
	if refusals != uint64(n+1000) {
		t.Fatalf("%d refused pends counted, want %d", refusals, n+1000)
	}
}

type usage struct {
	heap       uint64
	goroutines int
}

func heapAndGoroutines() usage {
	goruntime.GC()
	var ms goruntime.MemStats
	goruntime.ReadMemStats(&ms)
	return usage{ms.HeapAlloc, goruntime.NumGoroutine()}
}
