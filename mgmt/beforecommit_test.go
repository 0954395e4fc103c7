package mgmt

import (
	"context"
	"errors"
	"testing"
	"time"

	"fwp/engine"
)

// BeforeCommit sees the state about to be committed and can refuse it:
// the transaction then aborts wholly and the error says why.
func TestBeforeCommitRefuses(t *testing.T) {
	errRefused := errors.New("datapath refuses")
	var seen []int
	m, err := New(engine.New(engine.Options{}), Options{TxnTimeout: 200 * time.Millisecond,
		BeforeCommit: func(v engine.View) error {
			n := v.FilterCount(engine.LayerALEAuthConnectV4)
			seen = append(seen, n)
			if n > 1 {
				return errRefused
			}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ctx := context.Background()
	s := open(m, "a", false)
	if _, err := m.Add(ctx, s, blockPort("f1", 23, 0)); err != nil {
		t.Fatal(err)
	}
	_, err = m.Apply(ctx, s, []Op{{Add: ptr(blockPort("f2", 24, 0))}, {Add: ptr(blockPort("f3", 25, 0))}})
	if !errors.Is(err, errRefused) || !errors.Is(err, engine.ErrTxnAborted) {
		t.Fatalf("refused apply: %v, want errRefused and ErrTxnAborted", err)
	}
	if !has(m, KindFilter, "f1") || has(m, KindFilter, "f2") || has(m, KindFilter, "f3") {
		t.Fatal("a refused commit changed the state")
	}
	if got := seen[len(seen)-1]; got != 3 {
		t.Fatalf("BeforeCommit saw %d filters, want the pending 3", got)
	}
	// The lock is free again: the next commit goes through.
	if _, err := m.Add(ctx, s, blockPort("f4", 26, 0)); !errors.Is(err, errRefused) {
		t.Fatalf("second filter: %v, want refused", err)
	}
	if err := m.Delete(ctx, s, Ref{Kind: KindFilter, Key: "f1"}); err != nil {
		t.Fatal(err)
	}
}
