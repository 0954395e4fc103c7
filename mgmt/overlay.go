package mgmt

import "iter"

// overlay is a transaction's changes over the manager's maps (meta,
// stored): one entry per add or delete, in order, each holding its key's
// whole overlay state after it (not a difference from the entry before),
// so that a lookup reads one entry, undoing a batch is a truncation, and
// the commit walks the entries in order.
//
// A million-object transaction used to keep two maps of pointers to an
// allocation each, an undo journal and a list of changes. Now the entries
// are cut from fixed chunks (no slice regrown and copied), and filters,
// which nothing references, are indexed by key only once a lookup needs
// it: a transaction that adds filters and deletes none never builds the
// index of them.
type overlay struct {
	chunks [][]overlayEntry
	n      int
	// index finds a key's latest entry: every entry of the other kinds,
	// and the filters' entries before unindexed.
	index     map[objKey]int32
	unindexed int
	// filterDeleted: the transaction deleted a filter, so a filter added
	// may have an entry already.
	filterDeleted bool
}

// storedState is an overlay entry's effect on the manager's stored map.
type storedState uint8

const (
	storedInherit storedState = iota // as the manager has it
	storedPut                        // obj, as stored
	storedRemoved
)

// overlayEntry is one add or delete of a transaction and the key's
// overlay state after it.
type overlayEntry struct {
	k    objKey
	id   uint64 // the engine's, for the change published
	meta objMeta
	// hasMeta: the object exists (false: deleted by this transaction).
	hasMeta bool
	stored  storedState
	// live: no later entry of the transaction replaced this one.
	live bool
	// prev is the key's entry before this one in the transaction, or -1.
	prev int32
	obj  Object // the stored form, when stored is storedPut
}

// The first chunk grows as a slice does (a small transaction allocates
// little); the others are allocated whole.
const (
	ovChunkBits = 10
	ovChunk     = 1 << ovChunkBits
)

func (o *overlay) len() int { return o.n }

func (o *overlay) at(i int) *overlayEntry {
	return &o.chunks[i>>ovChunkBits][i&(ovChunk-1)]
}

// entries yields the entries in order.
func (o *overlay) entries() iter.Seq[*overlayEntry] {
	return func(yield func(*overlayEntry) bool) {
		for _, c := range o.chunks {
			for i := range c {
				if !yield(&c[i]) {
					return
				}
			}
		}
	}
}

// mayHaveEntry reports whether k may have an entry: false for a filter
// when the transaction deleted none (an added key is new to it, the
// engine having refused a duplicate).
func (o *overlay) mayHaveEntry(k objKey) bool {
	return k.kind != KindFilter || o.filterDeleted
}

// find returns k's latest entry and its position, or nil.
func (o *overlay) find(k objKey) (int32, *overlayEntry) {
	if k.kind == KindFilter && o.unindexed < o.n {
		o.indexFilters()
	}
	if i, ok := o.index[k]; ok {
		return i, o.at(int(i))
	}
	return -1, nil
}

func (o *overlay) latest(k objKey) *overlayEntry {
	_, e := o.find(k)
	return e
}

// indexFilters indexes the filters' entries not yet indexed, in order, so
// that the latest of a key wins.
func (o *overlay) indexFilters() {
	if o.index == nil {
		o.index = make(map[objKey]int32, o.n-o.unindexed)
	}
	for i := o.unindexed; i < o.n; i++ {
		if e := o.at(i); e.k.kind == KindFilter {
			o.index[e.k] = int32(i)
		}
	}
	o.unindexed = o.n
}

// push appends e, whose prev the caller found (and marked not live).
func (o *overlay) push(e overlayEntry) {
	c := o.n >> ovChunkBits
	if c == len(o.chunks) {
		var next []overlayEntry
		if c > 0 {
			next = make([]overlayEntry, 0, ovChunk)
		}
		o.chunks = append(o.chunks, next)
	}
	o.chunks[c] = append(o.chunks[c], e)
	i := o.n
	o.n++
	if e.k.kind == KindFilter {
		if !e.hasMeta {
			o.filterDeleted = true
		}
		if o.unindexed < i || !o.filterDeleted && e.prev < 0 {
			// Indexed when a lookup needs it (see indexFilters).
			return
		}
		o.unindexed = o.n
	}
	if o.index == nil {
		o.index = map[objKey]int32{}
	}
	o.index[e.k] = int32(i)
}

// truncate undoes the entries from n on.
func (o *overlay) truncate(n int) {
	for i := o.n - 1; i >= n; i-- {
		e := o.at(i)
		if e.k.kind == KindFilter && i >= o.unindexed {
			continue // never indexed, and replaced no entry
		}
		if e.prev >= 0 {
			o.index[e.k] = e.prev
			o.at(int(e.prev)).live = true
		} else {
			delete(o.index, e.k)
		}
	}
	for c := n >> ovChunkBits; c < len(o.chunks); c++ {
		lo := 0
		if c == n>>ovChunkBits {
			lo = n & (ovChunk - 1)
		}
		clear(o.chunks[c][lo:]) // let the undone objects go
		o.chunks[c] = o.chunks[c][:lo]
	}
	o.chunks = o.chunks[:(n+ovChunk-1)>>ovChunkBits]
	o.n = n
	o.unindexed = min(o.unindexed, n)
}
