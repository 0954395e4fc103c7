package engine

import (
	"cmp"
	"math/rand/v2"
	"slices"
	"testing"
)

// rankCmp orders filters for evaluation. Ties are broken deterministically:
// equal sublayer weights by lower sublayer ID first, equal filter weights by
// lower filter ID (the older filter) first.
func (s *state) rankCmp(a, b *Filter) int {
	if a.Sublayer != b.Sublayer {
		wa, wb := s.sublayerWeight(a.Sublayer), s.sublayerWeight(b.Sublayer)
		if wa != wb {
			return cmp.Compare(wb, wa)
		}
		return cmp.Compare(a.Sublayer, b.Sublayer)
	}
	if a.EffectiveWeight != b.EffectiveWeight {
		return cmp.Compare(b.EffectiveWeight, a.EffectiveWeight)
	}
	return cmp.Compare(a.ID, b.ID)
}

// TestOrderedMatchesRankCmp: the sort by plain keys orders filters as
// the comparison it replaced does, on random weights with many ties.
func TestOrderedMatchesRankCmp(t *testing.T) {
	for seed := range uint64(20) {
		r := rand.New(rand.NewPCG(seed, 7))
		e := New(Options{})
		err := e.Update(func(tx *Txn) error {
			subs := []SublayerID{0}
			for i := range 4 {
				id, err := tx.AddSublayer(Sublayer{Key: "s" + string(rune('a'+i)), Weight: uint16(r.IntN(3))})
				if err != nil {
					return err
				}
				subs = append(subs, id)
			}
			for range 200 {
				w := Weight{}
				if r.IntN(2) == 0 {
					w = WeightExact(uint64(r.IntN(4)))
				}
				if _, err := tx.AddFilter(Filter{Layer: LayerALEAuthConnectV4, Sublayer: subs[r.IntN(len(subs))], Weight: w, Action: Action{Type: ActionPermit}}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		s := e.state.Load()
		got := s.ordered(LayerALEAuthConnectV4)
		want := slices.Clone(got)
		slices.SortFunc(want, s.rankCmp)
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("seed %d: position %d: filter %d, the comparison puts %d there", seed, i, got[i].ID, want[i].ID)
			}
		}
	}
}
