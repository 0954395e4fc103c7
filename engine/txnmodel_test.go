package engine_test

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"fwp/engine"
)

// TestTxnModel: random transactions of adds and deletes (keys given and
// generated, host, prefix and port filters of few weights, in two
// sublayers), with savepoints rolled back to at random, against a model
// of the filter set kept by the test: after every commit the engine holds
// the model's filters (by key: weight, action, conditions), finds each by
// key and by ID, and classifies as the reference classifier does over
// them.
func TestTxnModel(t *testing.T) {
	for seed := range uint64(6) {
		r := rand.New(rand.NewPCG(seed, 15))
		e := engine.New(engine.Options{})
		var sub engine.SublayerID
		if err := e.Update(func(tx *engine.Txn) error {
			var err error
			sub, err = tx.AddSublayer(engine.Sublayer{Key: "high", Weight: 5})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		host := func() netip.Addr { return netip.AddrFrom4([4]byte{10, 0, byte(r.IntN(8)), byte(r.IntN(256))}) }
		type mf struct {
			f  engine.Filter
			id engine.FilterID
		}
		model := map[string]mf{}
		next := 0
		for txn := range 6 {
			tx, err := e.Begin(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			type mark struct {
				sp    engine.Savepoint
				model map[string]mf
			}
			var marks []mark
			for range 1500 {
				switch k := r.IntN(100); {
				case k < 60: // add
					f := engine.Filter{Layer: engine.LayerALEAuthConnectV4, Weight: engine.WeightExact(uint64(r.IntN(3))), Action: engine.Action{Type: engine.ActionBlock}}
					if r.IntN(3) == 0 {
						f.Action.Type = engine.ActionPermit
					}
					if r.IntN(4) == 0 {
						f.Sublayer = sub
					}
					switch r.IntN(6) {
					case 0:
						f.Conditions = []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Prefix(netip.PrefixFrom(host(), 24).Masked())}}
					case 1:
						f.Conditions = []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(80 + r.IntN(3)))}}
					case 2: // two hosts, ORed
						f.Conditions = []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(host())},
							{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(host())}}
					default:
						f.Conditions = []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(host())}}
					}
					if r.IntN(2) == 0 {
						f.Key = fmt.Sprintf("k%d", next)
						next++
					}
					id, err := tx.AddFilter(f)
					if err != nil {
						t.Fatal(err)
					}
					got, err := tx.View().Filter(id)
					if err != nil {
						t.Fatal(err)
					}
					model[got.Key] = mf{f, id}
				case k < 85 && len(model) > 0: // delete, by key or by ID
					keys := slices.Sorted(maps.Keys(model))
					key := keys[r.IntN(len(keys))]
					if r.IntN(2) == 0 {
						err = tx.DeleteFilterByKey(key)
					} else {
						err = tx.DeleteFilter(model[key].id)
					}
					if err != nil {
						t.Fatal(err)
					}
					delete(model, key)
				case k < 93:
					marks = append(marks, mark{tx.Savepoint(), maps.Clone(model)})
				case len(marks) > 0:
					i := r.IntN(len(marks))
					if err := tx.RollbackTo(marks[i].sp); err != nil {
						t.Fatal(err)
					}
					model = maps.Clone(marks[i].model)
					marks = marks[:i+1]
				}
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			v := e.View()
			fs := v.Filters(engine.FilterTemplate{})
			if len(fs) != len(model) || v.FilterCount(0) != len(model) {
				t.Fatalf("seed %d txn %d: %d filters (count %d), the model has %d", seed, txn, len(fs), v.FilterCount(0), len(model))
			}
			for _, f := range fs {
				m, ok := model[f.Key]
				if !ok || m.id != f.ID || f.Action != m.f.Action || f.Weight != m.f.Weight || fmt.Sprint(f.Conditions) != fmt.Sprint(m.f.Conditions) {
					t.Fatalf("seed %d txn %d: engine filter %+v, model %+v (%v)", seed, txn, f, m, ok)
				}
				if g, err := v.FilterByKey(f.Key); err != nil || g.ID != f.ID {
					t.Fatalf("seed %d txn %d: FilterByKey(%s) = %d %v, want %d", seed, txn, f.Key, g.ID, err, f.ID)
				}
				if g, err := v.Filter(f.ID); err != nil || g.Key != f.Key {
					t.Fatalf("seed %d txn %d: Filter(%d) = %s %v, want %s", seed, txn, f.ID, g.Key, err, f.Key)
				}
			}
			ref, err := newRefModel(v, engine.LayerALEAuthConnectV4, nil)
			if err != nil {
				t.Fatal(err)
			}
			for range 400 {
				vs := (&engine.Values{}).Set(engine.FieldIPRemoteAddress, engine.Addr(host())).Set(engine.FieldIPRemotePort, engine.Uint16(uint16(79+r.IntN(4))))
				if got, want := refOutcomeOf(e.Classify(engine.LayerALEAuthConnectV4, vs, nil)), ref.classify(vs, nil, false); got != want {
					t.Fatalf("seed %d txn %d: %s: engine %s, reference %s", seed, txn, vs, got, want)
				}
			}
		}
	}
}
