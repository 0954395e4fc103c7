package engine

import (
	"cmp"
	"encoding/binary"
	"math/bits"
	"net/netip"
	"slices"
	"sync/atomic"
)

// calloutSlot holds a callout's registration. Compiled filters point at the
// slot, so registering or unregistering a callout needs no recompilation.
type calloutSlot struct {
	key string
	reg atomic.Pointer[CalloutRegistration]
}

func (e *Engine) slot(key string) *calloutSlot {
	e.idMu.Lock()
	defer e.idMu.Unlock()
	s, ok := e.calloutSlots[key]
	if !ok {
		s = &calloutSlot{key: key}
		e.calloutSlots[key] = s
	}
	return s
}

// cfilter is a filter compiled for classification.
type cfilter struct {
	f       *Filter
	id      FilterID
	sub     int32 // index into compiledLayer.subs
	action  ActionType
	flags   FilterFlags
	callout CalloutID
	slot    *calloutSlot
	pctx    []byte
	conds   []Condition // sorted by field
	groups  []cgroup
}

// cgroup is the run of conditions on one field: any of them may match.
type cgroup struct {
	field    FieldID
	from, to int32
}

// match walks the field-sorted conditions directly rather than through
// groups: one memory area less to touch per candidate, which is what
// classification time is made of at 100k filters.
func (cf *cfilter) match(vs *Values) bool { return cf.matchExcept(vs, FieldInvalid) }

// matchExcept is match without the conditions on field skip, which the
// caller knows are met (skip FieldInvalid checks every field).
func (cf *cfilter) matchExcept(vs *Values, skip FieldID) bool {
	conds := cf.conds
	for i := 0; i < len(conds); {
		f := conds[i].Field
		ok := f == skip
		for ; i < len(conds) && conds[i].Field == f; i++ {
			if !ok && conds[i].matches(vs.v[f]) {
				ok = true
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

// quickCheck is a necessary condition of a filter's match, kept in a dense
// array by rank: the bounds of its single-condition protocol and port
// groups, and its single remote address or prefix. Most candidates of a
// large set fail it, and are then rejected
// without touching their conditions, whose cache misses otherwise make up
// most of a classification.
//
// A v6 address is checked on its top 64 bits only, so that the check stays
// 20 bytes as it was for v4 alone: those bits are the routing prefix,
// which tells apart the filters keyed on another field (a longer v6 prefix
// or an exact address is nearly always the filter's index key itself).
type quickCheck struct {
	rport, lport [2]uint16
	// raddr is, for v4, the masked address and the mask; for v6, the
	// masked top 64 bits, high word first, masked by r6bits.
	raddr  [2]uint32
	r6bits uint8
	proto  uint8
	has    uint8
}

const (
	quickRPort = 1 << iota
	quickLPort
	quickProto
	quickRAddr4
	quickRAddr6
)

// mask64 masks the top bits of a word; a shift by the full width yields
// 0, so 0 bits masks everything out.
func mask64(bits uint8) uint64 { return ^uint64(0) << (64 - bits) }

func newQuickCheck(cf *cfilter) quickCheck {
	var q quickCheck
	for _, g := range cf.groups {
		if g.to-g.from != 1 {
			continue // ORed conditions: left to the full match
		}
		c := &cf.conds[g.from]
		if g.field == FieldIPRemoteAddress && (c.Match == MatchEqual || c.Match == MatchPrefix) {
			bits := uint8(c.Value.ip.BitLen())
			switch c.Value.t {
			case TypePrefix:
				bits = uint8(c.Value.n)
			case TypeAddr:
				if c.Match != MatchEqual {
					continue
				}
			default:
				continue
			}
			if c.Value.ip.Is4() {
				mask := newPrefixLen(int(bits)).mask4
				q.raddr, q.has = [2]uint32{addrKey4(c.Value.ip) & mask, mask}, q.has|quickRAddr4
				continue
			}
			hi, _ := addrKey6(c.Value.ip)
			q.r6bits, q.has = min(bits, 64), q.has|quickRAddr6
			hi &= mask64(q.r6bits)
			q.raddr = [2]uint32{uint32(hi >> 32), uint32(hi)}
			continue
		}
		var lo, hi uint64
		switch {
		case c.Match == MatchEqual && c.Value.t.isInt():
			lo, hi = c.Value.n, c.Value.n
		case c.Match == MatchRange && c.Value.r[0].t.isInt():
			lo, hi = c.Value.r[0].n, c.Value.r[1].n
		default:
			continue
		}
		switch g.field {
		case FieldIPRemotePort:
			q.rport, q.has = [2]uint16{uint16(lo), uint16(hi)}, q.has|quickRPort
		case FieldIPLocalPort:
			q.lport, q.has = [2]uint16{uint16(lo), uint16(hi)}, q.has|quickLPort
		case FieldIPProtocol:
			if lo == hi {
				q.proto, q.has = uint8(lo), q.has|quickProto
			}
		}
	}
	return q
}

// pass reports false only when the full match must fail. An incoming value
// that is absent or not of the field's type is left to the full match.
func (q *quickCheck) pass(vs *Values) bool {
	if q.has == 0 {
		return true
	}
	if q.has&quickProto != 0 {
		if v := &vs.v[FieldIPProtocol]; v.t == TypeUint8 && v.n != uint64(q.proto) {
			return false
		}
	}
	if q.has&quickRPort != 0 {
		if v := &vs.v[FieldIPRemotePort]; v.t == TypeUint16 && (v.n < uint64(q.rport[0]) || v.n > uint64(q.rport[1])) {
			return false
		}
	}
	if q.has&quickLPort != 0 {
		if v := &vs.v[FieldIPLocalPort]; v.t == TypeUint16 && (v.n < uint64(q.lport[0]) || v.n > uint64(q.lport[1])) {
			return false
		}
	}
	if q.has&quickRAddr4 != 0 {
		if v := &vs.v[FieldIPRemoteAddress]; v.t == TypeAddr && v.ip.Is4() && addrKey4(v.ip)&q.raddr[1] != q.raddr[0] {
			return false
		}
	} else if q.has&quickRAddr6 != 0 {
		if v := &vs.v[FieldIPRemoteAddress]; v.t == TypeAddr && v.ip.Is6() {
			hi, _ := addrKey6(v.ip)
			if hi&mask64(q.r6bits) != uint64(q.raddr[0])<<32|uint64(q.raddr[1]) {
				return false
			}
		}
	}
	return true
}

type csub struct {
	id     SublayerID
	weight uint16
	end    int32 // rank of the first filter of the next sublayer
}

// compiledLayer is the immutable classification structure of one layer:
// its filters in rank order (sublayer weight desc, filter weight desc, ID
// asc) and indexes that yield, for given values, the ranks of the only
// filters that can match.
type compiledLayer struct {
	layer LayerID
	// src is the filter table compiled, all its filters in evaluation
	// order, disabled ones too (View.Filters reads them).
	src         *filterTable
	all         []*Filter
	filters     []cfilter
	quick       []quickCheck // by rank, beside filters
	subs        []csub
	hasCallouts bool
	// slots are the callouts the layer's filters call, once each
	// (LayerMayBlock looks at their registrations); callouts are the
	// indexes of the filters calling one (FlowMayBlock matches them).
	slots    []*calloutSlot
	callouts []int32

	wild         []int32
	proto        map[uint8][]int32
	rport, lport portIndex
	raddr, laddr prefixIndex
	app          map[string][]int32
	// appPort holds the app-keyed filters whose only app id and only remote
	// port conditions are single EQUALs: an application's rules are mostly
	// per port, and this keeps the others out of a tuple's candidates.
	appPort map[appPortKey][]int32
}

type portIndex struct {
	exact map[uint16][]int32
	seg   segIndex
	// present has a bit per port that is a key of a large exact map (see
	// prefixLen.present).
	present []uint64
}

func (p *portIndex) buildPresent() {
	if len(p.exact) < presentMin {
		return
	}
	p.present = make([]uint64, 65536/64)
	for port := range p.exact {
		p.present[port>>6] |= 1 << (port & 63)
	}
}

// segIndex answers "which ranges contain p" for port ranges: the port space
// is cut into segments at every range end, each with its list of ranks.
type segIndex struct {
	starts []uint32
	lists  [][]int32
}

func (s *segIndex) lookup(p uint32) []int32 {
	if len(s.starts) == 0 {
		return nil
	}
	i, found := slices.BinarySearch(s.starts, p)
	if !found {
		i--
	}
	if i < 0 {
		return nil
	}
	return s.lists[i]
}

// prefixIndex holds one map per prefix length present, longest first,
// keyed by the masked address as integers: hashing a uint32 or two uint64s
// costs far less than hashing a netip.Prefix.
type prefixIndex struct {
	v4 []prefixLen
	v6 []prefixLen
	// ranks holds every bucket's ranks, a bucket being a span of it: the
	// maps then hold no pointers, which the garbage collector skips (a
	// million buckets of slices were a good part of its work).
	ranks []int32
	stage *prefixStage // while building
}

// span is a bucket: offset<<32 | length in prefixIndex.ranks.
type span uint64

// table4 maps v4 keys to buckets: open addressing, linear probing, at
// most half full, a slot of 12 bytes holding key and bucket (one cache
// miss a lookup). A Go map took ~0.3-0.7 µs a key to build at a million
// keys and holds them in groups the garbage collector walks.
type table4 struct {
	slots []slot4
	shift uint8
	n     int
}

type slot4 struct{ key, off, n uint32 } // n == 0: empty

func newTable4(n int) *table4 {
	lg := max(3, bits.Len(uint(2*n)))
	return &table4{slots: make([]slot4, 1<<lg), shift: uint8(32 - lg)}
}

// home is a key's first slot: Fibonacci hashing, whose top bits spread
// the consecutive keys a blocklist has.
func (t *table4) home(k uint32) uint32 { return (k * 0x9e3779b1) >> t.shift }

// put adds a key the table does not hold.
func (t *table4) put(k, off, n uint32) {
	mask := uint32(len(t.slots) - 1)
	i := t.home(k)
	for t.slots[i].n != 0 {
		i = (i + 1) & mask
	}
	t.slots[i] = slot4{k, off, n}
	t.n++
}

func (t *table4) get(k uint32) span {
	if t == nil {
		return 0
	}
	mask := uint32(len(t.slots) - 1)
	for i := t.home(k); ; i = (i + 1) & mask {
		e := &t.slots[i]
		if e.n == 0 {
			return 0
		}
		if e.key == k {
			return span(uint64(e.off)<<32 | uint64(e.n))
		}
	}
}

func (p *prefixIndex) bucket(s span) []int32 {
	off := uint32(s >> 32)
	return p.ranks[off : off+uint32(s)]
}

type prefixLen struct {
	bits     uint8
	pshift   uint8 // beside bits, so that the struct stays one 64-byte cache line
	mask4    uint32
	mhi, mlo uint64
	m4       *table4
	m6       map[[2]uint64]span
	// present has a bit per /20 that holds an m4 key, for large maps only:
	// most lookups in a large blocklist miss, and the bitmap answers them
	// without the map's cache misses. For m6 (of any size) it has a bit per
	// value of present6's hash of a key, shifted right by pshift.
	present []uint64
}

// presentMin is the map size from which a v4 prefix length or a port map
// gets a bitmap.
const presentMin = 1024

// present6 hashes a masked v6 key for the bitmap: the top bits of a
// multiplicative hash. v6 keys have no dense top bits to index by as v4
// /20s do (a blocklist's v6 networks share their first bits).
func present6(hi, lo uint64) uint64 {
	return (hi ^ bits.RotateLeft64(lo, 32)) * 0x9e3779b97f4a7c15
}

func newPrefixLen(bits int) prefixLen {
	// A shift by the full width yields 0, so bits 0 masks everything out.
	return prefixLen{bits: uint8(bits), mask4: ^uint32(0) << (32 - min(bits, 32)),
		mhi: ^uint64(0) << (64 - min(bits, 64)), mlo: ^uint64(0) << (128 - max(bits, 64))}
}

func addrKey4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

func addrKey6(a netip.Addr) (hi, lo uint64) {
	b := a.As16()
	return binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])
}

// add files rank under the prefix ip/bits. The entries are staged and
// built into the maps by sortLens, each map made at its final size and
// every bucket a piece of one array: a map grown an entry at a time, with
// a slice allocated per bucket, was most of a million-filter commit.
func (p *prefixIndex) add(ip netip.Addr, bits int, rank int32) {
	if p.stage == nil {
		p.stage = &prefixStage{}
	}
	if ip.Is4() {
		k := addrKey4(ip) & newPrefixLen(bits).mask4
		p.stage.v4[bits] = append(p.stage.v4[bits], uint64(k)<<32|uint64(rank))
		return
	}
	l := newPrefixLen(bits)
	hi, lo := addrKey6(ip)
	p.stage.v6[bits] = append(p.stage.v6[bits], stage6{hi & l.mhi, lo & l.mlo, rank})
}

// prefixStage holds the entries add staged, by prefix length: v4 as
// key<<32 | rank.
type prefixStage struct {
	v4 [33][]uint64
	v6 [129][]stage6
}

// stage6 is a v6 entry waiting for sortLens.
type stage6 struct {
	hi, lo uint64
	rank   int32
}

// build4 and build6 fill the map from the staged entries: sorted by key
// and rank, each key's ranks are one run of the array its bucket slices.
func (l *prefixLen) build4(st []uint64, ranks *[]int32) {
	slices.Sort(st)
	st = slices.Compact(st) // a filter ORing two conditions of one bucket
	n := 1
	for i := 1; i < len(st); i++ {
		if st[i]>>32 != st[i-1]>>32 {
			n++
		}
	}
	l.m4 = newTable4(n)
	if n >= presentMin { // see sortLens; built here from the sorted keys
		l.present = make([]uint64, (1<<20)/64)
		for _, e := range st {
			k := uint32(e >> 32)
			l.present[k>>18] |= 1 << (k >> 12 & 63)
		}
	}
	for i := 0; i < len(st); {
		off := len(*ranks)
		j := i
		for ; j < len(st) && st[j]>>32 == st[i]>>32; j++ {
			*ranks = append(*ranks, int32(uint32(st[j])))
		}
		l.m4.put(uint32(st[i]>>32), uint32(off), uint32(j-i))
		i = j
	}
}

func (l *prefixLen) build6(st []stage6, ranks *[]int32) {
	slices.SortFunc(st, func(a, b stage6) int {
		return cmp.Or(cmp.Compare(a.hi, b.hi), cmp.Compare(a.lo, b.lo), cmp.Compare(a.rank, b.rank))
	})
	st = slices.Compact(st)
	n := 1
	for i := 1; i < len(st); i++ {
		if st[i].hi != st[i-1].hi || st[i].lo != st[i-1].lo {
			n++
		}
	}
	l.m6 = make(map[[2]uint64]span, n)
	for i := 0; i < len(st); {
		off := len(*ranks)
		j := i
		for ; j < len(st) && st[j].hi == st[i].hi && st[j].lo == st[i].lo; j++ {
			*ranks = append(*ranks, st[j].rank)
		}
		l.m6[[2]uint64{st[i].hi, st[i].lo}] = span(uint64(off)<<32 | uint64(j-i))
		i = j
	}
}

func (p *prefixIndex) sortLens() {
	if st := p.stage; st != nil {
		total := 0
		for _, e := range st.v4 {
			total += len(e)
		}
		for _, e := range st.v6 {
			total += len(e)
		}
		p.ranks = make([]int32, 0, total)
		for bits, e := range st.v4 {
			if len(e) > 0 {
				p.v4 = append(p.v4, newPrefixLen(bits))
				p.v4[len(p.v4)-1].build4(e, &p.ranks)
			}
		}
		for bits, e := range st.v6 {
			if len(e) > 0 {
				p.v6 = append(p.v6, newPrefixLen(bits))
				p.v6[len(p.v6)-1].build6(e, &p.ranks)
			}
		}
		p.stage = nil
	}
	longest := func(a, b prefixLen) int { return cmp.Compare(b.bits, a.bits) }
	slices.SortFunc(p.v4, longest)
	slices.SortFunc(p.v6, longest)
	for i := range p.v4 {
		l := &p.v4[i]
		if l.m4 == nil || l.m4.n < presentMin || l.present != nil {
			continue
		}
		l.present = make([]uint64, (1<<20)/64)
		for _, e := range l.m4.slots {
			if e.n != 0 {
				l.present[e.key>>18] |= 1 << (e.key >> 12 & 63)
			}
		}
	}
	for i := range p.v6 {
		// Every v6 length gets a bitmap, small ones too: hashing a 16-byte
		// map key costs more than a multiplication and one bit. About 16
		// bits per key (a few % false hits), from one cache line to 2^20
		// bits as for v4: a smaller bitmap stays in cache.
		l := &p.v6[i]
		n := max(9, min(bits.Len(uint(16*len(l.m6))), 20))
		l.pshift = uint8(64 - n)
		l.present = make([]uint64, (1<<n)/64)
		for k := range l.m6 {
			h := present6(k[0], k[1]) >> l.pshift
			l.present[h>>6] |= 1 << (h & 63)
		}
	}
}

// segBudget bounds the entries of one segment index; range filters past it
// are scanned as wildcards (correct, slower) rather than exhaust memory.
const segBudget = 1 << 22

func (s *state) sublayerWeight(id SublayerID) uint16 {
	if sl, ok := s.sublayers.byID[id]; ok {
		return sl.Weight
	}
	return 0
}

// ordered returns the layer's filters in evaluation order (filterTable.ordered).
func (s *state) ordered(l LayerID) []*Filter { return s.filters[l].ordered(s.sublayerWeight) }

type keyKind uint8

type appPortKey struct {
	app  string
	port uint16
}

// singleRemotePort returns the port of the filter's remote port group when
// that group is one EQUAL condition.
func singleRemotePort(cf *cfilter) (uint16, bool) {
	for _, g := range cf.groups {
		if g.field == FieldIPRemotePort && g.to-g.from == 1 {
			c := &cf.conds[g.from]
			return uint16(c.Value.n), c.Match == MatchEqual && c.Value.t == TypeUint16
		}
	}
	return 0, false
}

const (
	keyWild keyKind = iota
	keyRAddr
	keyLAddr
	keyApp
	keyRPort
	keyLPort
	keyProto
)

func compileLayer(l LayerID, s *state, e *Engine) *compiledLayer {
	c := &compiledLayer{layer: l, src: s.filters[l], all: s.ordered(l)}
	ordered := c.all
	if slices.ContainsFunc(ordered, func(f *Filter) bool { return f.Flags&FilterDisabled != 0 }) {
		ordered = nil
		for _, f := range c.all {
			if f.Flags&FilterDisabled == 0 {
				ordered = append(ordered, f)
			}
		}
	}
	c.filters = make([]cfilter, len(ordered))
	// A filter's conditions sorted by field are its own (the engine's
	// filters are immutable; a transaction's lie together in its
	// chunks); the others are sorted in one shared array.
	byField := func(a, b Condition) int { return cmp.Compare(a.Field, b.Field) }
	total, unsorted := 0, 0
	for _, f := range ordered {
		total += len(f.Conditions)
		if !slices.IsSortedFunc(f.Conditions, byField) {
			unsorted += len(f.Conditions)
		}
	}
	condBuf := make([]Condition, 0, unsorted)
	groupBuf := make([]cgroup, 0, total)
	for i, f := range ordered {
		if len(c.subs) == 0 || c.subs[len(c.subs)-1].id != f.Sublayer {
			if len(c.subs) > 0 {
				c.subs[len(c.subs)-1].end = int32(i)
			}
			c.subs = append(c.subs, csub{id: f.Sublayer, weight: s.sublayerWeight(f.Sublayer)})
		}
		conds := f.Conditions[:len(f.Conditions):len(f.Conditions)]
		if !slices.IsSortedFunc(conds, byField) {
			start := len(condBuf)
			condBuf = append(condBuf, conds...)
			conds = condBuf[start:len(condBuf):len(condBuf)]
			slices.SortStableFunc(conds, byField)
		}
		start := len(groupBuf)
		groupBuf = appendCondGroups(groupBuf, conds)
		cf := cfilter{f: f, id: f.ID, sub: int32(len(c.subs) - 1), action: f.Action.Type, flags: f.Flags, conds: conds, groups: groupBuf[start:len(groupBuf):len(groupBuf)]}
		if f.Action.Type.IsCallout() {
			c.hasCallouts = true
			c.callouts = append(c.callouts, int32(i))
			cf.callout = f.Action.Callout
			if co, ok := s.callouts.byID[f.Action.Callout]; ok && e != nil {
				cf.slot = e.slot(co.Key)
				if !slices.Contains(c.slots, cf.slot) {
					c.slots = append(c.slots, cf.slot)
				}
			}
		}
		if f.ProviderContext != 0 {
			if pc, ok := s.contexts.byID[f.ProviderContext]; ok {
				cf.pctx = pc.Data
			}
		}
		c.filters[i] = cf
	}
	c.quick = make([]quickCheck, len(c.filters))
	for i := range c.filters {
		c.quick[i] = newQuickCheck(&c.filters[i])
	}
	if len(c.subs) > 0 {
		c.subs[len(c.subs)-1].end = int32(len(c.filters))
	}
	c.buildIndex()
	return c
}

// appendCondGroups appends the runs of field-sorted conditions on one field.
func appendCondGroups(gs []cgroup, conds []Condition) []cgroup {
	for j := 0; j < len(conds); {
		k := j
		for k < len(conds) && conds[k].Field == conds[j].Field {
			k++
		}
		gs = append(gs, cgroup{field: conds[j].Field, from: int32(j), to: int32(k)})
		j = k
	}
	return gs
}

type rangeEntry struct {
	lo, hi uint32
	rank   int32
}

func (c *compiledLayer) buildIndex() {
	var rRanges, lRanges []rangeEntry
	for i := range c.filters {
		cf := &c.filters[i]
		rank := int32(i)
		kind, g := chooseKey(cf)
		if kind == keyWild {
			c.wild = append(c.wild, rank)
			continue
		}
		if kind == keyApp && g.to-g.from == 1 {
			if port, ok := singleRemotePort(cf); ok {
				if c.appPort == nil {
					c.appPort = map[appPortKey][]int32{}
				}
				k := appPortKey{cf.conds[g.from].Value.s, port}
				c.appPort[k] = appendRank(c.appPort[k], rank)
				continue
			}
		}
		for _, cond := range cf.conds[g.from:g.to] {
			v := cond.Value
			switch kind {
			case keyRAddr, keyLAddr:
				idx := &c.raddr
				if kind == keyLAddr {
					idx = &c.laddr
				}
				bits := v.ip.BitLen()
				if v.t == TypePrefix {
					bits = int(v.n)
				}
				idx.add(v.ip, bits, rank)
			case keyApp:
				if c.app == nil {
					c.app = map[string][]int32{}
				}
				c.app[v.s] = appendRank(c.app[v.s], rank)
			case keyProto:
				if c.proto == nil {
					c.proto = map[uint8][]int32{}
				}
				c.proto[uint8(v.n)] = appendRank(c.proto[uint8(v.n)], rank)
			case keyRPort, keyLPort:
				idx := &c.rport
				ranges := &rRanges
				if kind == keyLPort {
					idx, ranges = &c.lport, &lRanges
				}
				if v.t == TypeRange {
					*ranges = append(*ranges, rangeEntry{uint32(v.r[0].n), uint32(v.r[1].n), rank})
					continue
				}
				if idx.exact == nil {
					idx.exact = map[uint16][]int32{}
				}
				idx.exact[uint16(v.n)] = appendRank(idx.exact[uint16(v.n)], rank)
			}
		}
	}
	c.rport.seg = c.buildSeg(rRanges)
	c.lport.seg = c.buildSeg(lRanges)
	c.rport.buildPresent()
	c.lport.buildPresent()
	slices.Sort(c.wild)
	c.wild = slices.Compact(c.wild)
	c.raddr.sortLens()
	c.laddr.sortLens()
}

// appendRank appends rank unless it is already last (a filter ORing two
// conditions that land in one bucket).
func appendRank(l []int32, rank int32) []int32 {
	if n := len(l); n > 0 && l[n-1] == rank {
		return l
	}
	return append(l, rank)
}

func (c *compiledLayer) buildSeg(rs []rangeEntry) segIndex {
	if len(rs) == 0 {
		return segIndex{}
	}
	points := make([]uint32, 0, 2*len(rs)+1)
	points = append(points, 0)
	for _, r := range rs {
		points = append(points, r.lo, r.hi+1)
	}
	slices.Sort(points)
	points = slices.Compact(points)
	if points[len(points)-1] > 0xffff {
		points = points[:len(points)-1]
	}
	seg := segIndex{starts: points, lists: make([][]int32, len(points))}
	used := 0
	for _, r := range rs { // rs is in rank order, so every list stays sorted
		i, _ := slices.BinarySearch(points, r.lo)
		j, _ := slices.BinarySearch(points, r.hi+1)
		if used+(j-i) > segBudget {
			c.wild = append(c.wild, r.rank)
			continue
		}
		used += j - i
		for k := i; k < j; k++ {
			seg.lists[k] = appendRank(seg.lists[k], r.rank)
		}
	}
	return seg
}

// chooseKey picks the condition group that narrows the filter most and that
// an index can serve, or keyWild.
func chooseKey(cf *cfilter) (keyKind, cgroup) {
	best, bestScore, bestGroup := keyWild, 0, cgroup{}
	for _, g := range cf.groups {
		kind, score := keyWild, 1<<30
		conds := cf.conds[g.from:g.to]
		if slices.ContainsFunc(conds, func(c Condition) bool { return c.Value.t == TypeList }) {
			continue // no index holds a list: matched by binary search
		}
		switch g.field {
		case FieldIPRemoteAddress, FieldIPLocalAddress:
			kind = keyRAddr
			if g.field == FieldIPLocalAddress {
				kind = keyLAddr
			}
			for _, c := range conds {
				s := 0
				switch {
				case c.Match == MatchEqual && c.Value.t == TypeAddr:
					s = 128
				case (c.Match == MatchEqual || c.Match == MatchPrefix) && c.Value.t == TypePrefix:
					// On one scale for both families: a v4 /24 and a
					// v6 /48 (a site) score 96, a v6 /64 (a subnet)
					// ranks with a host and above a port.
					s = min(int(c.Value.n)*2, 128)
					if c.Value.ip.Is4() {
						s = int(c.Value.n) * 4
					}
				}
				score = min(score, s)
			}
			if kind == keyLAddr {
				score -= 8 // remote addresses discriminate better
			}
		case FieldALEAppID:
			kind = keyApp
			for _, c := range conds {
				s := 0
				if c.Match == MatchEqual {
					s = 100
				}
				score = min(score, s)
			}
		case FieldIPRemotePort, FieldIPLocalPort:
			kind = keyRPort
			if g.field == FieldIPLocalPort {
				kind = keyLPort
			}
			for _, c := range conds {
				s := 0
				switch {
				case c.Match == MatchEqual:
					s = 70
				case c.Match == MatchRange:
					s = 70 - 4*bits.Len64(c.Value.r[1].n-c.Value.r[0].n)
				}
				score = min(score, s)
			}
			if kind == keyLPort {
				score -= 4
			}
		case FieldIPProtocol:
			kind = keyProto
			for _, c := range conds {
				s := 0
				if c.Match == MatchEqual {
					s = 8
				}
				score = min(score, s)
			}
		default:
			continue
		}
		if score >= 4 && score > bestScore {
			best, bestScore, bestGroup = kind, score, g
		}
	}
	return best, bestGroup
}

// maxCursors bounds the candidate lists merged on the stack; a lookup that
// needs more falls back to a scan of the layer (correct, slower).
const maxCursors = 32

// candidates fills cur with the rank lists that may hold matching filters
// and returns how many, or -1 when they do not fit. met[i] is the field
// whose condition group every filter of cur[i] meets, where the lookup was
// exact (app id and address buckets), else FieldInvalid; matching the
// app id again would cost a cache miss on its string per candidate.
func (c *compiledLayer) candidates(vs *Values, cur *[maxCursors][]int32, met *[maxCursors]FieldID) int {
	n := 0
	field := FieldInvalid
	add := func(l []int32) bool {
		if len(l) == 0 {
			return true
		}
		if n == maxCursors {
			return false
		}
		cur[n], met[n] = l, field
		n++
		return true
	}
	ok := add(c.wild)
	if v := vs.v[FieldIPProtocol]; ok && c.proto != nil && v.t != TypeEmpty {
		ok = add(c.proto[uint8(v.n)])
	}
	ok = ok && c.rport.lookup(vs.v[FieldIPRemotePort], add)
	ok = ok && c.lport.lookup(vs.v[FieldIPLocalPort], add)
	if v := vs.v[FieldALEAppID]; ok && c.app != nil && v.t != TypeEmpty {
		field = FieldALEAppID
		ok = add(c.app[v.s])
	}
	if v, p := vs.v[FieldALEAppID], vs.v[FieldIPRemotePort]; ok && c.appPort != nil && v.t != TypeEmpty && p.t != TypeEmpty {
		field = FieldALEAppID // the port is matched again: the key truncates it
		ok = add(c.appPort[appPortKey{v.s, uint16(p.n)}])
	}
	field = FieldIPRemoteAddress
	ok = ok && c.raddr.lookup(vs.v[FieldIPRemoteAddress], add)
	field = FieldIPLocalAddress
	ok = ok && c.laddr.lookup(vs.v[FieldIPLocalAddress], add)
	if !ok {
		return -1
	}
	return n
}

func (p *portIndex) lookup(v Value, add func([]int32) bool) bool {
	if v.t == TypeEmpty {
		return true
	}
	port := uint16(v.n)
	if p.exact != nil && (p.present == nil || p.present[port>>6]&(1<<(port&63)) != 0) && !add(p.exact[port]) {
		return false
	}
	return add(p.seg.lookup(uint32(v.n)))
}

func (p *prefixIndex) lookup(v Value, add func([]int32) bool) bool {
	if v.t != TypeAddr {
		return true
	}
	if v.ip.Is4() {
		k := addrKey4(v.ip)
		for i := range p.v4 {
			l := &p.v4[i]
			key := k & l.mask4
			if l.present != nil && l.present[key>>18]&(1<<(key>>12&63)) == 0 {
				continue
			}
			if !add(p.bucket(l.m4.get(key))) {
				return false
			}
		}
		return true
	}
	hi, lo := addrKey6(v.ip)
	for i := range p.v6 {
		l := &p.v6[i]
		khi, klo := hi&l.mhi, lo&l.mlo
		if l.present != nil {
			if h := present6(khi, klo) >> l.pshift; l.present[h>>6]&(1<<(h&63)) == 0 {
				continue
			}
		}
		if !add(p.bucket(l.m6[[2]uint64{khi, klo}])) {
			return false
		}
	}
	return true
}
