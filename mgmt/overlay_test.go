package mgmt

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// modelFilter is what a filter key holds in the model: its lifetime and
// the port it blocks.
type modelFilter struct {
	l    Lifetime
	port int
}

// Random transactions of adds, deletes, re-adds of a key deleted in the
// same transaction, failed batches (undone) and aborts, checked against
// a model: what the session reads inside its transaction, the manager's
// owners and stored objects after each commit, the changes a subscriber
// is told, and the store after a restart.
func TestOverlayMatchesModel(t *testing.T) {
	for seed := range uint64(4) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { checkOverlayModel(t, seed) })
	}
}

func checkOverlayModel(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 15))
	dir := t.TempDir()
	m := newManager(t, dir)
	ctx := context.Background()
	s := open(m, "writer", false)
	if _, err := m.Add(ctx, s, Object{Sublayer: &Sublayer{Key: "sl", Weight: 5, Lifetime: LifetimePersistent}}); err != nil {
		t.Fatal(err)
	}
	reader := open(m, "reader", false)
	sub, err := m.Subscribe(reader, []Kind{KindFilter}, MaxSubscriptionBuffer)
	if err != nil {
		t.Fatal(err)
	}
	committed := map[string]modelFilter{}
	published := 0
	const keys = 12
	for range 150 {
		if err := m.Begin(ctx, s); err != nil {
			t.Fatal(err)
		}
		state := clone(committed)
		changes := 0
		for range 1 + rng.IntN(4) {
			var ops []Op
			next := clone(state)
			ok, n := true, 0
			for range 1 + rng.IntN(6) {
				key := fmt.Sprintf("k%d", rng.IntN(keys))
				_, exists := next[key]
				if rng.IntN(2) == 0 {
					l := LifetimeStatic
					if rng.IntN(2) == 0 {
						l = LifetimePersistent
					}
					port := 1 + rng.IntN(60000)
					o := blockPort(key, port, l)
					if rng.IntN(2) == 0 {
						o.Filter.Sublayer = "sl"
					}
					ops = append(ops, Op{Add: &o})
					ok = ok && !exists
					next[key] = modelFilter{l, port}
				} else {
					ops = append(ops, Op{Delete: &Ref{Kind: KindFilter, Key: key}})
					ok = ok && exists
					delete(next, key)
				}
				n++
			}
			_, err := m.Apply(ctx, s, ops)
			if (err == nil) != ok {
				t.Fatalf("batch %v: error %v, the model expects success %v", ops, err, ok)
			}
			if err == nil {
				state, changes = next, changes+n
			}
			checkTxnView(t, m, s, state, keys)
		}
		if rng.IntN(5) == 0 {
			if err := m.Abort(s); err != nil {
				t.Fatal(err)
			}
		} else {
			if err := m.Commit(s); err != nil {
				t.Fatal(err)
			}
			committed = state
			published += changes
		}
		checkCommitted(t, m, committed)
	}
	got := 0
	for len(sub.C) > 0 {
		<-sub.C
		got++
	}
	if got != published || sub.Lost() != 0 {
		t.Fatalf("subscriber told %d changes (lost %d), want %d", got, sub.Lost(), published)
	}
	m.Close()
	m = newManager(t, dir)
	checkCommitted(t, m, persistentOnly(committed))
}

func clone(m map[string]modelFilter) map[string]modelFilter {
	c := make(map[string]modelFilter, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

func persistentOnly(m map[string]modelFilter) map[string]modelFilter {
	c := map[string]modelFilter{}
	for k, v := range m {
		if v.l == LifetimePersistent {
			c[k] = v
		}
	}
	return c
}

// checkTxnView: the session sees its transaction's filters with their
// lifetimes (the overlay's owners).
func checkTxnView(t *testing.T, m *Manager, s uint64, want map[string]modelFilter, keys int) {
	t.Helper()
	for i := range keys {
		key := fmt.Sprintf("k%d", i)
		o, err := m.Get(s, Ref{Kind: KindFilter, Key: key})
		w, ok := want[key]
		if (err == nil) != ok {
			t.Fatalf("in the transaction, %s: %v, the model has it: %v", key, err, ok)
		}
		if ok && (o.Filter.Lifetime != w.l || o.Filter.Session != s || o.Filter.Conditions[0].Value != fmt.Sprint(w.port)) {
			t.Fatalf("in the transaction, %s is %+v, want %+v of session %d", key, *o.Filter, w, s)
		}
	}
}

// checkCommitted: the manager's owners and stored filters are the model's.
func checkCommitted(t *testing.T, m *Manager, want map[string]modelFilter) {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	nmeta, nstored := 0, 0
	for k, mt := range m.meta {
		if k.kind != KindFilter {
			continue
		}
		nmeta++
		if w, ok := want[k.key]; !ok || w.l != mt.lifetime {
			t.Fatalf("owner of %s: %+v, want %+v (present %v)", k.key, mt, w, ok)
		}
	}
	for k, o := range m.stored {
		if k.kind != KindFilter {
			continue
		}
		nstored++
		w, ok := want[k.key]
		if !ok || w.l != LifetimePersistent || o.Filter.Key != k.key || o.Filter.Conditions[0].Value != fmt.Sprint(w.port) {
			t.Fatalf("stored %s: %+v, want %+v (present %v)", k.key, *o.Filter, w, ok)
		}
	}
	if nmeta != len(want) || nstored != len(persistentOnly(want)) {
		t.Fatalf("%d owners and %d stored filters, want %d and %d", nmeta, nstored, len(want), len(persistentOnly(want)))
	}
}

// sortedKeys orders as the comparison it replaced: kind, then key bytes.
func TestSortedKeys(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	objs := map[objKey]int{}
	for i := range 2000 {
		objs[objKey{Kind(1 + rng.IntN(int(numKinds)-1)), fmt.Sprintf("%x\xff%d", rng.Uint32(), i%7)}] = i
	}
	got, want := sortedKeys(objs), sortedKeysFunc(objs)
	if !slices.Equal(got, want) || len(got) != len(objs) {
		t.Fatalf("sortedKeys differs from the comparison sort")
	}
}
