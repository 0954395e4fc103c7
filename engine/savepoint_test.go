package engine_test

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"testing"

	"fwp/engine"
)

// keysOf lists the keys of the view's filters, in evaluation order.
func keysOf(v engine.View) []string {
	var ks []string
	for _, f := range v.Filters(engine.FilterTemplate{}) {
		ks = append(ks, f.Key)
	}
	return ks
}

func hostFilter(key string, i int, w uint64) engine.Filter {
	return engine.Filter{Key: key, Layer: engine.LayerALEAuthConnectV4, Weight: engine.WeightExact(w), Action: engine.Action{Type: engine.ActionBlock},
		Conditions: []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(scaleAddr(i))}}}
}

// TestSavepointRollback: a rollback undoes the adds and deletes of filters
// made after the mark (keys given and generated, on two layers, a table
// first written before the mark and one after), leaves the earlier ones,
// can be repeated, and what is committed after it is what classifies.
func TestSavepointRollback(t *testing.T) {
	e := engine.New(engine.Options{})
	var base []engine.FilterID
	if err := e.Update(func(tx *engine.Txn) error {
		for i := range 4 {
			id, err := tx.AddFilter(hostFilter(fmt.Sprintf("old%d", i), i, 5))
			if err != nil {
				return err
			}
			base = append(base, id)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	tx, err := e.Begin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Abort()
	if _, err := tx.AddFilter(hostFilter("a", 10, 7)); err != nil {
		t.Fatal(err)
	}
	if err := tx.DeleteFilterByKey("old1"); err != nil {
		t.Fatal(err)
	}
	before := keysOf(tx.View())
	sp := tx.Savepoint()
	for round := range 2 {
		// After the mark: adds (keyed and not), deletes of old and new
		// filters, a key deleted and added again, another layer.
		if _, err := tx.AddFilter(hostFilter("b", 11, 9)); err != nil {
			t.Fatal(err)
		}
		gen, err := tx.AddFilter(hostFilter("", 12, 3))
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range []string{"old0", "a", "b"} {
			if err := tx.DeleteFilterByKey(k); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := tx.AddFilter(hostFilter("old0", 13, 1)); err != nil {
			t.Fatal(err)
		}
		v6 := engine.Filter{Key: "six", Layer: engine.LayerALEAuthConnectV6, Action: engine.Action{Type: engine.ActionPermit}}
		if _, err := tx.AddFilter(v6); err != nil {
			t.Fatal(err)
		}
		if n := tx.View().FilterCount(0); n != 5 {
			t.Fatalf("round %d: %d filters before the rollback, want 5", round, n)
		}
		if err := tx.RollbackTo(sp); err != nil {
			t.Fatal(err)
		}
		if got := keysOf(tx.View()); !slices.Equal(got, before) {
			t.Fatalf("round %d: after the rollback %v, want %v", round, got, before)
		}
		if _, err := tx.View().Filter(gen); !errors.Is(err, engine.ErrNotFound) {
			t.Fatalf("round %d: the generated filter survived the rollback: %v", round, err)
		}
		genKey := fmt.Sprintf("filter-%d", gen)
		if _, err := tx.FilterByKey(genKey); !errors.Is(err, engine.ErrNotFound) {
			t.Fatalf("round %d: its key %s survived: %v", round, genKey, err)
		}
		for _, k := range []string{"old0", "a", "old2"} {
			if _, err := tx.FilterByKey(k); err != nil {
				t.Fatalf("round %d: %s after the rollback: %v", round, k, err)
			}
		}
		if _, err := tx.FilterByKey("b"); !errors.Is(err, engine.ErrNotFound) {
			t.Fatalf("round %d: b survived the rollback: %v", round, err)
		}
		if _, err := tx.AddFilter(hostFilter("a", 0, 1)); !errors.Is(err, engine.ErrAlreadyExists) {
			t.Fatalf("round %d: a's key is free again after the rollback: %v", round, err)
		}
	}
	// A mark taken after the rollback is valid; one rolled back past is not.
	sp2 := tx.Savepoint()
	if _, err := tx.AddFilter(hostFilter("c", 14, 2)); err != nil {
		t.Fatal(err)
	}
	sp3 := tx.Savepoint()
	if err := tx.DeleteFilterByKey("old3"); err != nil {
		t.Fatal(err)
	}
	if err := tx.RollbackTo(sp2); err != nil {
		t.Fatal(err)
	}
	if err := tx.RollbackTo(sp3); !errors.Is(err, engine.ErrInvalidArgument) {
		t.Fatalf("rollback to a mark undone by an earlier one: %v", err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := keysOf(e.View()); !slices.Equal(got, before) {
		t.Fatalf("committed %v, want %v", got, before)
	}
	vs := &engine.Values{}
	for i, want := range []engine.ActionType{engine.ActionBlock, engine.ActionPermit, engine.ActionBlock, engine.ActionBlock, engine.ActionPermit, engine.ActionPermit, engine.ActionPermit} {
		vs.Set(engine.FieldIPRemoteAddress, engine.Addr(scaleAddr(i)))
		vs.Set(engine.FieldIPRemotePort, engine.Uint16(80))
		if i == 4 {
			vs.Set(engine.FieldIPRemoteAddress, engine.Addr(scaleAddr(10))) // a's
			want = engine.ActionBlock
		}
		if r := e.Classify(engine.LayerALEAuthConnectV4, vs, nil); r.Action != want {
			t.Errorf("host %d: %s, want %s", i, r.Action, want)
		}
	}
	if _, err := e.View().Filter(base[1]); !errors.Is(err, engine.ErrNotFound) {
		t.Errorf("old1, deleted before the mark, is back: %v", err)
	}
}

// TestSmallTxnMemory: filters added one transaction at a time retain
// little memory each: the chunks a transaction allocates its filters,
// conditions and keys in start small (a chunk lives while one of its
// filters does).
func TestSmallTxnMemory(t *testing.T) {
	e := engine.New(engine.Options{})
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	before := ms.HeapAlloc
	const n = 500
	for i := range n {
		if err := e.Update(func(tx *engine.Txn) error {
			_, err := tx.AddFilter(hostFilter("", i, 1))
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	per := (int64(ms.HeapAlloc) - int64(before)) / n
	t.Logf("%d bytes retained per filter", per)
	if per > 4096 {
		t.Fatalf("%d bytes retained per filter added alone, want a few hundred", per)
	}
	runtime.KeepAlive(e)
}
