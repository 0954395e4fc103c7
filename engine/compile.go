package engine

import (
	"cmp"
	"maps"
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

func (cf *cfilter) match(vs *Values) bool {
	for _, g := range cf.groups {
		v := vs.v[g.field]
		ok := false
		for i := g.from; i < g.to; i++ {
			if cf.conds[i].matches(v) {
				ok = true
				break
			}
		}
		if !ok {
			return false
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
	layer       LayerID
	filters     []cfilter
	subs        []csub
	hasCallouts bool

	wild         []int32
	proto        map[uint8][]int32
	rport, lport portIndex
	raddr, laddr prefixIndex
	app          map[string][]int32
}

type portIndex struct {
	exact map[uint16][]int32
	seg   segIndex
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

type prefixIndex struct {
	lens []uint8 // distinct prefix lengths present, longest first
	m    map[netip.Prefix][]int32
}

// segBudget bounds the entries of one segment index; range filters past it
// are scanned as wildcards (correct, slower) rather than exhaust memory.
const segBudget = 1 << 22

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

func (s *state) sublayerWeight(id SublayerID) uint16 {
	if sl, ok := s.sublayers.byID[id]; ok {
		return sl.Weight
	}
	return 0
}

// ordered returns the layer's filters in evaluation order.
func (s *state) ordered(l LayerID) []*Filter {
	fs := slices.Collect(maps.Values(s.filters[l].byID))
	slices.SortFunc(fs, s.rankCmp)
	return fs
}

type keyKind uint8

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
	c := &compiledLayer{layer: l}
	var ordered []*Filter
	for _, f := range s.ordered(l) {
		if f.Flags&FilterDisabled == 0 {
			ordered = append(ordered, f)
		}
	}
	c.filters = make([]cfilter, len(ordered))
	// Conditions of all filters share one backing array.
	total := 0
	for _, f := range ordered {
		total += len(f.Conditions)
	}
	condBuf := make([]Condition, 0, total)
	for i, f := range ordered {
		if len(c.subs) == 0 || c.subs[len(c.subs)-1].id != f.Sublayer {
			if len(c.subs) > 0 {
				c.subs[len(c.subs)-1].end = int32(i)
			}
			c.subs = append(c.subs, csub{id: f.Sublayer, weight: s.sublayerWeight(f.Sublayer)})
		}
		start := len(condBuf)
		condBuf = append(condBuf, f.Conditions...)
		conds := condBuf[start:len(condBuf):len(condBuf)]
		slices.SortStableFunc(conds, func(a, b Condition) int { return cmp.Compare(a.Field, b.Field) })
		cf := cfilter{f: f, id: f.ID, sub: int32(len(c.subs) - 1), action: f.Action.Type, flags: f.Flags, conds: conds}
		for j := 0; j < len(conds); {
			k := j
			for k < len(conds) && conds[k].Field == conds[j].Field {
				k++
			}
			cf.groups = append(cf.groups, cgroup{field: conds[j].Field, from: int32(j), to: int32(k)})
			j = k
		}
		if f.Action.Type.IsCallout() {
			c.hasCallouts = true
			cf.callout = f.Action.Callout
			if co, ok := s.callouts.byID[f.Action.Callout]; ok && e != nil {
				cf.slot = e.slot(co.Key)
			}
		}
		if f.ProviderContext != 0 {
			if pc, ok := s.contexts.byID[f.ProviderContext]; ok {
				cf.pctx = pc.Data
			}
		}
		c.filters[i] = cf
	}
	if len(c.subs) > 0 {
		c.subs[len(c.subs)-1].end = int32(len(c.filters))
	}
	c.buildIndex()
	return c
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
		for _, cond := range cf.conds[g.from:g.to] {
			v := cond.Value
			switch kind {
			case keyRAddr, keyLAddr:
				idx := &c.raddr
				if kind == keyLAddr {
					idx = &c.laddr
				}
				p := netip.PrefixFrom(v.ip, v.ip.BitLen())
				if v.t == TypePrefix {
					p = netip.PrefixFrom(v.ip, int(v.n))
				}
				if idx.m == nil {
					idx.m = map[netip.Prefix][]int32{}
				}
				idx.m[p] = appendRank(idx.m[p], rank)
				if !slices.Contains(idx.lens, uint8(p.Bits())) {
					idx.lens = append(idx.lens, uint8(p.Bits()))
				}
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
	slices.Sort(c.wild)
	c.wild = slices.Compact(c.wild)
	slices.SortFunc(c.raddr.lens, func(a, b uint8) int { return cmp.Compare(b, a) })
	slices.SortFunc(c.laddr.lens, func(a, b uint8) int { return cmp.Compare(b, a) })
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
					s = int(c.Value.n)
					if c.Value.ip.Is4() {
						s *= 4
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
// and returns how many, or -1 when they do not fit.
func (c *compiledLayer) candidates(vs *Values, cur *[maxCursors][]int32) int {
	n := 0
	add := func(l []int32) bool {
		if len(l) == 0 {
			return true
		}
		if n == maxCursors {
			return false
		}
		cur[n] = l
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
		ok = add(c.app[v.s])
	}
	ok = ok && c.raddr.lookup(vs.v[FieldIPRemoteAddress], add)
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
	if p.exact != nil && !add(p.exact[uint16(v.n)]) {
		return false
	}
	return add(p.seg.lookup(uint32(v.n)))
}

func (p *prefixIndex) lookup(v Value, add func([]int32) bool) bool {
	if v.t != TypeAddr || p.m == nil {
		return true
	}
	for _, bits := range p.lens {
		if int(bits) > v.ip.BitLen() {
			continue
		}
		pfx, err := v.ip.Prefix(int(bits))
		if err != nil {
			continue
		}
		if !add(p.m[pfx]) {
			return false
		}
	}
	return true
}
