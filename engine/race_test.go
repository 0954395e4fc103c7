package engine_test

import (
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"fwp/engine"
)

// TestClassifyRacesWithUpdates classifies from several goroutines while
// others add and delete filters and register and unregister a callout (run
// it with -race). Every state the writers can leave has a known decision,
// and each classification must return one of them exactly: readers see the
// old state or the new one, never a mix.
func TestClassifyRacesWithUpdates(t *testing.T) {
	const layer = engine.LayerALEAuthConnectV4
	e := engine.New(engine.Options{EventCapacity: 64})
	var s1, s2, s3 engine.SublayerID
	var fc, fp engine.FilterID
	remote := engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual,
		Value: engine.Prefix(netip.MustParsePrefix("192.0.2.0/24"))}
	err := e.Update(func(tx *engine.Txn) error {
		var err error
		if s1, err = tx.AddSublayer(engine.Sublayer{Key: "race-high", Weight: 100}); err != nil {
			return err
		}
		if s2, err = tx.AddSublayer(engine.Sublayer{Key: "race-low", Weight: 50}); err != nil {
			return err
		}
		if s3, err = tx.AddSublayer(engine.Sublayer{Key: "race-churn", Weight: 75}); err != nil {
			return err
		}
		c, err := tx.AddCallout(engine.Callout{Key: "race-callout", Layer: layer})
		if err != nil {
			return err
		}
		// Fail open while unregistered; registered, it permits hard.
		if fc, err = tx.AddFilter(engine.Filter{Layer: layer, Sublayer: s1, Conditions: []engine.Condition{remote},
			Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: c},
			Flags:  engine.FilterPermitIfCalloutUnregistered}); err != nil {
			return err
		}
		fp, err = tx.AddFilter(engine.Filter{Layer: layer, Sublayer: s2, Weight: engine.WeightExact(10),
			Conditions: []engine.Condition{remote}, Action: engine.Action{Type: engine.ActionPermit}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	reg := engine.CalloutRegistration{Classify: func(_ *engine.ClassifyRequest, out *engine.ClassifyOut) {
		if out.CanWrite() {
			out.Action = engine.ActionPermit
			out.Rights &^= engine.RightActionWrite
		}
	}}
	blockFilter := engine.Filter{Key: "race-toggle-block", Layer: layer, Sublayer: s2, Weight: engine.WeightExact(20),
		Conditions: []engine.Condition{remote}, Action: engine.Action{Type: engine.ActionBlock}}
	var blockIDs sync.Map // every ID the toggled block filter had
	addBlock := func() error {
		return e.Update(func(tx *engine.Txn) error {
			id, err := tx.AddFilter(blockFilter)
			blockIDs.Store(id, true) // before the commit publishes it
			return err
		})
	}
	delBlock := func() error {
		return e.Update(func(tx *engine.Txn) error { return tx.DeleteFilterByKey(blockFilter.Key) })
	}

	vs := (&engine.Values{}).SetTuple(6, netip.MustParseAddrPort("198.51.100.7:40000"), netip.MustParseAddrPort("192.0.2.9:443"))
	// label names the state a result belongs to.
	label := func(r engine.Result) string {
		_, isBlock := blockIDs.Load(r.Filter)
		switch {
		case r.Action == engine.ActionPermit && !r.Hard() && r.Filter == fp:
			return "soft permit of the low sublayer" // callout unregistered, no block
		case r.Action == engine.ActionBlock && r.Hard() && isBlock:
			return "the toggled block" // callout unregistered, block present
		case r.Action == engine.ActionPermit && r.Hard() && r.Filter == fc:
			return "hard permit of the callout" // callout registered
		}
		return fmt.Sprintf("unexpected: %s", r)
	}

	// The decision of each of the four states, found serially first.
	for _, registered := range []bool{false, true} {
		for _, block := range []bool{false, true} {
			if registered {
				if err := e.RegisterCallout("race-callout", reg); err != nil {
					t.Fatal(err)
				}
			}
			if block {
				if err := addBlock(); err != nil {
					t.Fatal(err)
				}
			}
			got := label(e.Classify(layer, vs, nil))
			want := "hard permit of the callout"
			if !registered {
				want = map[bool]string{false: "soft permit of the low sublayer", true: "the toggled block"}[block]
			}
			if got != want {
				t.Fatalf("registered=%v block=%v: %s, want %s", registered, block, got, want)
			}
			if block {
				if err := delBlock(); err != nil {
					t.Fatal(err)
				}
			}
			if registered {
				if err := e.UnregisterCallout("race-callout"); err != nil {
					t.Fatal(err)
				}
			}
		}
	}

	var done atomic.Bool
	var writers, readers sync.WaitGroup
	errc := make(chan error, 16)
	writer := func(n int, step func(i int) error) {
		writers.Add(1)
		go func() {
			defer writers.Done()
			for i := range n {
				if err := step(i); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	writer(200, func(i int) error {
		if i%2 == 0 {
			return addBlock()
		}
		return delBlock()
	})
	writer(200, func(i int) error {
		if i%2 == 0 {
			return e.RegisterCallout("race-callout", reg)
		}
		return e.UnregisterCallout("race-callout")
	})
	// Churn in a sublayer between the two: filters that never match the
	// tuple, so every commit recompiles the layer without changing the answer.
	writer(100, func(i int) error {
		return e.Update(func(tx *engine.Txn) error {
			if i%2 == 1 {
				return tx.DeleteFilterByKey(fmt.Sprintf("race-churn-%d", i-1))
			}
			_, err := tx.AddFilter(engine.Filter{Key: fmt.Sprintf("race-churn-%d", i), Layer: layer, Sublayer: s3,
				Conditions: []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(i))}},
				Action:     engine.Action{Type: engine.ActionBlock}})
			return err
		})
	})
	seen := make([]map[string]int, 4)
	for r := range seen {
		seen[r] = map[string]int{}
		readers.Add(1)
		go func() {
			defer readers.Done()
			for n := 0; n < 200 || !done.Load(); n++ {
				seen[r][label(e.Classify(layer, vs, nil))]++
				if n%16 == 0 {
					tr, err := e.Explain(layer, vs, nil)
					if err != nil {
						errc <- err
						return
					}
					// Explain calls no callout: the filter fails open, so
					// the low sublayer decides.
					if o := label(tr.Result); o != "soft permit of the low sublayer" && o != "the toggled block" {
						errc <- fmt.Errorf("explain during updates: %s", o)
						return
					}
				}
			}
		}()
	}
	writers.Wait()
	done.Store(true)
	readers.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	total := map[string]int{}
	for _, m := range seen {
		for o, n := range m {
			total[o] += n
			if strings.HasPrefix(o, "unexpected") {
				t.Errorf("a classification during updates returned %s (%d times)", o, n)
			}
		}
	}
	t.Logf("outcomes during updates: %v", total)
	// The writers end with the block deleted, the callout unregistered and
	// no churn filter left.
	if o := label(e.Classify(layer, vs, nil)); o != "soft permit of the low sublayer" {
		t.Errorf("after the updates: %s", o)
	}
	if n := e.View().FilterCount(layer); n != 2 {
		t.Errorf("after the updates the layer has %d filters, want 2", n)
	}
}
