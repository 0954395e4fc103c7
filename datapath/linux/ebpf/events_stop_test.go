//go:build linux

package ebpf

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
)

// TestReadEventsStopsWhileEventsFlow ends ReadEvents by its context 200
// times while blocked connects keep the ring busy: the reader's close,
// run when the context ends, once raced the caught-up check
// (AvailableBytes on a closed reader: a nil dereference under -race).
func TestReadEventsStopsWhileEventsFlow(t *testing.T) {
	d, cg := kernelSetup(t)
	e := engine.New(engine.Options{})
	if err := e.Update(func(tx *engine.Txn) error {
		_, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionBlock},
			Conditions: []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(19)}}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	apply(t, d, e)
	h := testutil.StartHelper(t, cg, "probe")
	ops, _ := json.Marshal([]probeOp{{Net: "tcp4", Remote: "127.0.0.1:19"}, {Net: "tcp4", Remote: "127.0.0.1:19"}, {Net: "tcp4", Remote: "127.0.0.1:19"}})
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // blocked connects: a drop event each
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			if _, err := h.Call(ops); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	defer func() { close(done); wg.Wait() }()
	var seen int
	for i := range 200 {
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			errc <- d.ReadEvents(ctx, func(Event) {
				seen++ // on ReadEvents' goroutine only
				if seen%3 == 0 {
					cancel() // mid-batch, as a subscriber leaving does
				}
			})
		}()
		time.Sleep(time.Duration(i%7) * time.Millisecond)
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Fatalf("round %d: %v", i, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: ReadEvents did not return after its context ended", i)
		}
	}
	if seen == 0 {
		t.Fatal("no event was read: the test exercised nothing")
	}
}
