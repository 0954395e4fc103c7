package engine

import (
	"cmp"
	"slices"
	"strconv"
	"strings"
)

// filterTable is one layer's filters. A policy of a million filters is
// added in one transaction, so the table is built for that: the filters
// are a slice by ascending ID (IDs only grow, so an add appends), found by
// binary search; a delete leaves a hole that Commit closes; and only the
// keys the caller gave are in a map, a generated key ("filter-<id>")
// being found by its ID. A map by ID and one by key cost ~2 µs per filter
// at a million (their growth and cache misses), most of the transaction.
//
// Like the other tables, a filter table is copied on the first write of a
// transaction and never changed once committed.
type filterTable struct {
	ents  []filterEnt
	live  int                 // entries whose f is set
	byKey map[string]FilterID // keys the caller gave
}

// filterEnt is one filter, its ID beside it for the binary search.
type filterEnt struct {
	id FilterID
	f  *Filter // nil: deleted in this transaction
}

func newFilterTable() *filterTable { return &filterTable{byKey: map[string]FilterID{}} }

func (t *filterTable) clone() *filterTable {
	c := &filterTable{ents: slices.Clone(t.ents), live: t.live, byKey: make(map[string]FilterID, len(t.byKey))}
	for k, v := range t.byKey {
		c.byKey[k] = v
	}
	return c
}

// get returns the filter with the ID, or nil.
func (t *filterTable) get(id FilterID) *Filter {
	n := len(t.ents)
	if n == 0 || id < t.ents[0].id || id > t.ents[n-1].id {
		return nil
	}
	i, ok := slices.BinarySearchFunc(t.ents, id, func(e filterEnt, id FilterID) int { return cmp.Compare(e.id, id) })
	if !ok {
		return nil
	}
	return t.ents[i].f
}

// add appends f, whose ID is above every ID in the table.
func (t *filterTable) add(f *Filter, keyGiven bool) {
	t.ents = append(t.ents, filterEnt{id: f.ID, f: f})
	t.live++
	if keyGiven {
		t.byKey[f.Key] = f.ID
	}
}

// del deletes f, a filter of the table, and returns its entry's index
// and whether its key was removed from byKey, for the undo log.
func (t *filterTable) del(f *Filter) (int, bool) {
	i, _ := slices.BinarySearchFunc(t.ents, f.ID, func(e filterEnt, id FilterID) int { return cmp.Compare(e.id, id) })
	t.ents[i].f = nil
	t.live--
	if id, ok := t.byKey[f.Key]; ok && id == f.ID {
		delete(t.byKey, f.Key)
		return i, true
	}
	return i, false
}

// undoEntry is a filter table change a rollback undoes: an add (idx -1;
// key: its key went into byKey) or a delete (of f at idx; key: its key
// left byKey).
type undoEntry struct {
	layer LayerID
	idx   int
	f     *Filter
	key   bool
}

func (t *filterTable) undo(u undoEntry) {
	if u.idx < 0 {
		last := t.ents[len(t.ents)-1]
		t.ents = t.ents[:len(t.ents)-1]
		t.live--
		if u.key {
			delete(t.byKey, last.f.Key)
		}
		return
	}
	t.ents[u.idx].f = u.f
	t.live++
	if u.key {
		t.byKey[u.f.Key] = u.f.ID
	}
}

// compact drops the holes deletes left.
func (t *filterTable) compact() {
	if t.live == len(t.ents) {
		return
	}
	ents := make([]filterEnt, 0, t.live)
	for _, e := range t.ents {
		if e.f != nil {
			ents = append(ents, e)
		}
	}
	t.ents = ents
}

// generatedID returns the ID a generated filter key names.
func generatedID(key string) (FilterID, bool) {
	s, ok := strings.CutPrefix(key, "filter-")
	if !ok || s == "" || s[0] == '0' {
		return 0, false
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return FilterID(n), err == nil
}

// byKeyOf returns the filter with the key, or nil; gen tells whether the
// key has the form of a generated one, of filter id. A generated key is
// looked at first: it was assigned after any equal key the caller gave.
func (t *filterTable) byKeyOf(key string, id FilterID, gen bool) *Filter {
	if gen {
		if f := t.get(id); f != nil && f.Key == key {
			return f
		}
	}
	if len(t.byKey) == 0 {
		return nil
	}
	if id, ok := t.byKey[key]; ok {
		return t.get(id)
	}
	return nil
}

// each calls fn with every filter, by ascending ID, until it returns false.
func (t *filterTable) each(fn func(*Filter) bool) {
	for _, e := range t.ents {
		if e.f != nil && !fn(e.f) {
			return
		}
	}
}

// ordered returns the filters in evaluation order: higher sublayer weight
// first (ties: lower sublayer ID), then higher effective weight (ties:
// lower filter ID, the older filter). The entries are by ascending ID, so
// a stable placement by (sublayer weight, sublayer, weight) is the order:
// a counting sort over the few distinct such keys a policy has, O(n).
// sw gives a sublayer's weight (fixed at the sublayer's creation).
func (t *filterTable) ordered(sw func(SublayerID) uint16) []*Filter {
	type gkey struct {
		sw  uint16
		sub SublayerID
		w   uint64
	}
	groups := map[gkey]int{}
	var keys []gkey
	gi := make([]int32, 0, t.live) // group of each live entry, by entry
	counts := []int{}
	last, lastG := gkey{}, -1
	lastSub, lastSW := SublayerID(0), uint16(0)
	for _, e := range t.ents {
		if e.f == nil {
			continue
		}
		if e.f.Sublayer != lastSub || lastG < 0 {
			lastSub, lastSW = e.f.Sublayer, sw(e.f.Sublayer)
		}
		k := gkey{lastSW, e.f.Sublayer, e.f.EffectiveWeight}
		if lastG < 0 || k != last {
			g, ok := groups[k]
			if !ok {
				g = len(keys)
				groups[k] = g
				keys = append(keys, k)
				counts = append(counts, 0)
			}
			last, lastG = k, g
		}
		counts[lastG]++
		gi = append(gi, int32(lastG))
	}
	// Place the groups in evaluation order.
	byOrder := make([]int, len(keys))
	for i := range byOrder {
		byOrder[i] = i
	}
	slices.SortFunc(byOrder, func(a, b int) int {
		x, y := keys[a], keys[b]
		return cmp.Or(cmp.Compare(y.sw, x.sw), cmp.Compare(x.sub, y.sub), cmp.Compare(y.w, x.w))
	})
	start := make([]int, len(keys))
	pos := 0
	for _, g := range byOrder {
		start[g] = pos
		pos += counts[g]
	}
	fs := make([]*Filter, pos)
	j := 0
	for _, e := range t.ents {
		if e.f == nil {
			continue
		}
		g := gi[j]
		j++
		fs[start[g]] = e.f
		start[g]++
	}
	return fs
}
