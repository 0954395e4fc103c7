package engine

import (
	"cmp"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"math/bits"
	"net/netip"
	"slices"
	"strings"
)

// List is an immutable set of values of one field, held compactly: the
// values of a list condition (a blocklist of a million addresses). WFP
// writes such a list as one condition per value on one field, which it
// ORs; a condition whose value is a List (ListValue, match EQUAL) matches
// exactly what those conditions would, and weighs what they would in an
// automatic weight, but it is one condition and costs a few bytes per
// value: 4 per v4 address, 16 per v6 address, 8 or 32 per v4 or v6 prefix
// or range, 8 per integer (16 per integer range). Lookups are binary
// searches.
//
// An address list takes addresses, prefixes and address ranges (v4 and v6
// alike); an integer list takes integers of its type and their ranges.
// Build one with a ListBuilder; a List is safe for concurrent use.
type List struct {
	typ   Type     // the field's type: TypeAddr or an integer type
	a4    []uint32 // v4 addresses, sorted, distinct, none inside r4
	r4    []span4  // v4 prefixes and ranges, merged, sorted
	a6    []u128
	r6    []span6
	n     []uint64 // integers, sorted, distinct, none inside rn
	rn    []span64
	score uint64 // the values' specificities, summed (saturated)
	given int    // values given (duplicates included)
}

type span4 struct{ lo, hi uint32 }
type u128 struct{ hi, lo uint64 }
type span6 struct{ lo, hi u128 }
type span64 struct{ lo, hi uint64 }

func (a u128) cmp(b u128) int {
	return cmp.Or(cmp.Compare(a.hi, b.hi), cmp.Compare(a.lo, b.lo))
}

func (a u128) next() (u128, bool) {
	lo, c := bits.Add64(a.lo, 1, 0)
	hi, c2 := bits.Add64(a.hi, 0, c)
	return u128{hi, lo}, c2 == 0
}

func u128Of(a netip.Addr) u128 { hi, lo := addrKey6(a); return u128{hi, lo} }

func (a u128) addr() netip.Addr {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], a.hi)
	binary.BigEndian.PutUint64(b[8:], a.lo)
	return netip.AddrFrom16(b)
}

func addr4(x uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(x >> 24), byte(x >> 16), byte(x >> 8), byte(x)})
}

// MaxListValues bounds the values of one list: sixteen million.
const MaxListValues = 1 << 24

// ListValue returns a condition value holding a list (TypeList). A nil
// list is the empty value.
func ListValue(l *List) Value {
	if l == nil {
		return Value{}
	}
	return Value{t: TypeList, l: l}
}

// List returns a list value's list (nil for other values).
func (v Value) List() *List { return v.l }

// Type is the type of the list's values' field: TypeAddr or an integer type.
func (l *List) Type() Type { return l.typ }

// Len is the number of entries the list holds: distinct addresses and
// integers, and merged prefixes and ranges.
func (l *List) Len() int {
	return len(l.a4) + len(l.r4) + len(l.a6) + len(l.r6) + len(l.n) + len(l.rn)
}

// Given is the number of values the list was built from.
func (l *List) Given() int { return l.given }

// Has4 and Has6 report whether the list holds v4 or v6 addresses.
func (l *List) Has4() bool { return len(l.a4)+len(l.r4) > 0 }

// Has6 reports whether the list holds v6 addresses.
func (l *List) Has6() bool { return len(l.a6)+len(l.r6) > 0 }

// Bytes is the memory the list's entries take.
func (l *List) Bytes() int {
	return 4*len(l.a4) + 8*len(l.r4) + 16*len(l.a6) + 32*len(l.r6) + 8*len(l.n) + 16*len(l.rn)
}

// Contains reports whether v is one of the list's values, or in one of
// its prefixes or ranges. An empty value or one of another type is not.
func (l *List) Contains(v Value) bool {
	switch {
	case v.t == TypeAddr && l.typ == TypeAddr:
		if v.ip.Is4() {
			x := addrKey4(v.ip)
			if _, ok := slices.BinarySearch(l.a4, x); ok {
				return true
			}
			i, _ := slices.BinarySearchFunc(l.r4, x, func(s span4, x uint32) int { return cmp.Compare(s.lo, x) })
			// r4[i-1] is the last span starting at or below x (or r4[i] starts at x).
			if i < len(l.r4) && l.r4[i].lo == x {
				return true
			}
			return i > 0 && l.r4[i-1].hi >= x
		}
		x := u128Of(v.ip)
		if _, ok := slices.BinarySearchFunc(l.a6, x, u128.cmp); ok {
			return true
		}
		i, _ := slices.BinarySearchFunc(l.r6, x, func(s span6, x u128) int { return s.lo.cmp(x) })
		if i < len(l.r6) && l.r6[i].lo == x {
			return true
		}
		return i > 0 && l.r6[i-1].hi.cmp(x) >= 0
	case v.t.isInt() && l.typ.isInt():
		x := v.n
		if _, ok := slices.BinarySearch(l.n, x); ok {
			return true
		}
		i, _ := slices.BinarySearchFunc(l.rn, x, func(s span64, x uint64) int { return cmp.Compare(s.lo, x) })
		if i < len(l.rn) && l.rn[i].lo == x {
			return true
		}
		return i > 0 && l.rn[i-1].hi >= x
	}
	return false
}

// Addrs yields the list's single addresses, v4 then v6, in order.
func (l *List) Addrs() iter.Seq[netip.Addr] {
	return func(yield func(netip.Addr) bool) {
		for _, x := range l.a4 {
			if !yield(addr4(x)) {
				return
			}
		}
		for _, x := range l.a6 {
			if !yield(x.addr()) {
				return
			}
		}
	}
}

// AddrRanges yields the list's merged address ranges (prefixes and ranges
// given), v4 then v6, in order, as inclusive [lo, hi] pairs.
func (l *List) AddrRanges() iter.Seq2[netip.Addr, netip.Addr] {
	return func(yield func(netip.Addr, netip.Addr) bool) {
		for _, s := range l.r4 {
			if !yield(addr4(s.lo), addr4(s.hi)) {
				return
			}
		}
		for _, s := range l.r6 {
			if !yield(s.lo.addr(), s.hi.addr()) {
				return
			}
		}
	}
}

// V4Hosts returns the list's single v4 addresses, sorted, as big-endian
// integers. The slice is the list's own: do not modify it.
func (l *List) V4Hosts() []uint32 { return l.a4 }

// Ints yields the list's integers and merged integer ranges, in order, as
// inclusive [lo, hi] pairs (lo == hi for a single integer).
func (l *List) Ints() iter.Seq2[uint64, uint64] {
	return func(yield func(uint64, uint64) bool) {
		i, j := 0, 0
		for i < len(l.n) || j < len(l.rn) {
			if j == len(l.rn) || i < len(l.n) && l.n[i] < l.rn[j].lo {
				if !yield(l.n[i], l.n[i]) {
					return
				}
				i++
				continue
			}
			if !yield(l.rn[j].lo, l.rn[j].hi) {
				return
			}
			j++
		}
	}
}

// Values yields the list's entries as values: addresses and integers,
// and each merged range as a prefix when it is one, else a range.
func (l *List) Values() iter.Seq[Value] {
	return func(yield func(Value) bool) {
		if l.typ == TypeAddr {
			for a := range l.Addrs() {
				if !yield(Addr(a)) {
					return
				}
			}
			for lo, hi := range l.AddrRanges() {
				if !yield(rangeValue(lo, hi)) {
					return
				}
			}
			return
		}
		for lo, hi := range l.Ints() {
			v := Value{t: l.typ, n: lo}
			if lo != hi {
				v = Range(v, Value{t: l.typ, n: hi})
			}
			if !yield(v) {
				return
			}
		}
	}
}

// rangeValue is [lo, hi] as a prefix when it is exactly one.
func rangeValue(lo, hi netip.Addr) Value {
	for b := 0; b <= lo.BitLen(); b++ {
		p, err := lo.Prefix(b)
		if err == nil && p.Addr() == lo && lastOf(p) == hi {
			return Prefix(p)
		}
	}
	return Range(Addr(lo), Addr(hi))
}

func lastOf(p netip.Prefix) netip.Addr {
	if p.Addr().Is4() {
		x := addrKey4(p.Addr()) | ^newPrefixLen(p.Bits()).mask4
		return addr4(x)
	}
	hi, lo := addrKey6(p.Addr())
	pl := newPrefixLen(p.Bits())
	return u128{hi | ^pl.mhi, lo | ^pl.mlo}.addr()
}

// String summarizes the list (its values can be millions).
func (l *List) String() string {
	var b strings.Builder
	b.WriteByte('[')
	n := 0
	for v := range l.Values() {
		if n == 3 {
			fmt.Fprintf(&b, ", ... %d entries", l.Len())
			break
		}
		if n > 0 {
			b.WriteString(", ")
		}
		b.WriteString(v.String())
		n++
	}
	b.WriteByte(']')
	return b.String()
}

// Equal reports whether two lists hold the same set and weigh the same.
func (l *List) Equal(m *List) bool {
	if l == m {
		return true
	}
	if l == nil || m == nil {
		return false
	}
	return l.typ == m.typ && l.score == m.score && slices.Equal(l.a4, m.a4) && slices.Equal(l.r4, m.r4) &&
		slices.Equal(l.a6, m.a6) && slices.Equal(l.r6, m.r6) && slices.Equal(l.n, m.n) && slices.Equal(l.rn, m.rn)
}

// ListBuilder collects the values of a List.
type ListBuilder struct {
	l List
}

// NewListBuilder starts a list for a field of type t (an address or
// integer field), with room for n values.
func NewListBuilder(t Type, n int) *ListBuilder {
	b := &ListBuilder{l: List{typ: t}}
	if t == TypeAddr {
		b.l.a4 = make([]uint32, 0, n)
	} else {
		b.l.n = make([]uint64, 0, n)
	}
	return b
}

// Add adds a value: for an address list an address, a prefix or an
// address range; for an integer list an integer of the list's type or a
// range of them. Another value is refused (ErrTypeMismatch).
func (b *ListBuilder) Add(v Value) error {
	l := &b.l
	if l.given >= MaxListValues {
		return fmt.Errorf("%w: more than %d values in a list", ErrInvalidCondition, MaxListValues)
	}
	if err := b.add(v); err != nil {
		return err
	}
	l.given++
	l.score = min(l.score+Condition{Match: MatchEqual, Value: v}.specificity(), 1<<60-1)
	return nil
}

func (b *ListBuilder) add(v Value) error {
	l := &b.l
	bad := func() error { return fmt.Errorf("%w: a %s value in a list of %s", ErrTypeMismatch, v.t, l.typ) }
	if l.typ == TypeAddr {
		switch v.t {
		case TypeAddr:
			if v.ip.Is4() {
				l.a4 = append(l.a4, addrKey4(v.ip))
			} else {
				l.a6 = append(l.a6, u128Of(v.ip))
			}
			return nil
		case TypePrefix:
			p := v.Prefix()
			b.addRange(p.Addr(), lastOf(p))
			return nil
		case TypeRange:
			lo, hi := v.r[0], v.r[1]
			if lo.t != TypeAddr || hi.t != TypeAddr {
				return bad()
			}
			if lo.ip.Is4() != hi.ip.Is4() {
				return fmt.Errorf("%w: range %s mixes address families", ErrInvalidValue, v)
			}
			if lo.ip.Compare(hi.ip) > 0 {
				return fmt.Errorf("%w: range %s has its low end above its high end", ErrInvalidValue, v)
			}
			b.addRange(lo.ip, hi.ip)
			return nil
		}
		return bad()
	}
	if !l.typ.isInt() {
		return fmt.Errorf("%w: a list holds addresses or integers, not %s", ErrTypeMismatch, l.typ)
	}
	switch {
	case v.t == l.typ:
		l.n = append(l.n, v.n)
		return nil
	case v.t == TypeRange && v.r[0].t == l.typ && v.r[1].t == l.typ:
		if v.r[0].n > v.r[1].n {
			return fmt.Errorf("%w: range %s has its low end above its high end", ErrInvalidValue, v)
		}
		l.rn = append(l.rn, span64{v.r[0].n, v.r[1].n})
		return nil
	}
	return bad()
}

func (b *ListBuilder) addRange(lo, hi netip.Addr) {
	if lo.Is4() {
		b.l.r4 = append(b.l.r4, span4{addrKey4(lo), addrKey4(hi)})
		return
	}
	b.l.r6 = append(b.l.r6, span6{u128Of(lo), u128Of(hi)})
}

// List finishes the list: sorted, duplicates dropped, ranges merged. The
// builder must not be used after.
func (b *ListBuilder) List() *List {
	l := &b.l
	l.r4 = mergeSpans(l.r4, func(s span4) (uint32, uint32) { return s.lo, s.hi },
		func(hi, lo uint32) bool { return lo == 0 || lo-1 <= hi })
	l.r6 = mergeSpans(l.r6, func(s span6) (u128, u128) { return s.lo, s.hi },
		func(a, b u128) bool { n, ok := a.next(); return !ok || n.cmp(b) >= 0 })
	l.rn = mergeSpans(l.rn, func(s span64) (uint64, uint64) { return s.lo, s.hi },
		func(hi, lo uint64) bool { return lo == 0 || lo-1 <= hi })
	// A span of one value is that value (a /32 is an address).
	l.r4 = slices.DeleteFunc(l.r4, func(s span4) bool {
		if s.lo == s.hi {
			l.a4 = append(l.a4, s.lo)
		}
		return s.lo == s.hi
	})
	l.r6 = slices.DeleteFunc(l.r6, func(s span6) bool {
		if s.lo == s.hi {
			l.a6 = append(l.a6, s.lo)
		}
		return s.lo == s.hi
	})
	l.rn = slices.DeleteFunc(l.rn, func(s span64) bool {
		if s.lo == s.hi {
			l.n = append(l.n, s.lo)
		}
		return s.lo == s.hi
	})
	slices.Sort(l.a4)
	l.a4 = slices.Compact(l.a4)
	l.a4 = dropCovered(l.a4, l.r4, func(x uint32, s span4) (bool, bool) { return x < s.lo, x <= s.hi })
	slices.SortFunc(l.a6, u128.cmp)
	l.a6 = slices.Compact(l.a6)
	l.a6 = dropCovered(l.a6, l.r6, func(x u128, s span6) (bool, bool) { return x.cmp(s.lo) < 0, x.cmp(s.hi) <= 0 })
	slices.Sort(l.n)
	l.n = slices.Compact(l.n)
	l.n = dropCovered(l.n, l.rn, func(x uint64, s span64) (bool, bool) { return x < s.lo, x <= s.hi })
	l.a4, l.r4, l.a6, l.r6, l.n, l.rn = slices.Clip(l.a4), slices.Clip(l.r4), slices.Clip(l.a6), slices.Clip(l.r6), slices.Clip(l.n), slices.Clip(l.rn)
	out := *l
	*l = List{}
	return &out
}

// mergeSpans sorts spans and merges those that overlap or touch
// (touches(hi, lo): lo is at most hi+1).
func mergeSpans[S any, T any](ss []S, ends func(S) (T, T), touches func(hi, lo T) bool) []S {
	if len(ss) < 2 {
		return ss
	}
	slices.SortFunc(ss, func(a, b S) int {
		alo, _ := ends(a)
		blo, _ := ends(b)
		return cmpAny(alo, blo)
	})
	out := ss[:1]
	for _, s := range ss[1:] {
		last := &out[len(out)-1]
		llo, lhi := ends(*last)
		lo, hi := ends(s)
		if touches(lhi, lo) {
			if cmpAny(hi, lhi) > 0 {
				*last = makeSpan[S](llo, hi)
			}
			continue
		}
		out = append(out, s)
	}
	return out
}

func cmpAny[T any](a, b T) int {
	switch x := any(a).(type) {
	case uint32:
		return cmp.Compare(x, any(b).(uint32))
	case uint64:
		return cmp.Compare(x, any(b).(uint64))
	case u128:
		return x.cmp(any(b).(u128))
	}
	panic("unreachable")
}

func makeSpan[S any, T any](lo, hi T) S {
	var s S
	switch p := any(&s).(type) {
	case *span4:
		*p = span4{any(lo).(uint32), any(hi).(uint32)}
	case *span6:
		*p = span6{any(lo).(u128), any(hi).(u128)}
	case *span64:
		*p = span64{any(lo).(uint64), any(hi).(uint64)}
	}
	return s
}

// dropCovered removes the sorted xs that fall in one of the sorted,
// disjoint spans: pos(x, s) reports x below s and x not above s's end.
func dropCovered[X, S any](xs []X, ss []S, pos func(X, S) (below, notAbove bool)) []X {
	if len(ss) == 0 {
		return xs
	}
	out := xs[:0]
	j := 0
	for _, x := range xs {
		for j < len(ss) {
			if _, notAbove := pos(x, ss[j]); notAbove {
				break
			}
			j++
		}
		if j < len(ss) {
			if below, _ := pos(x, ss[j]); !below {
				continue // inside ss[j]
			}
		}
		out = append(out, x)
	}
	return out
}

// The binary form of a list (MarshalBinary): a header, then each part as
// a count and its entries, sorted entries delta-encoded as uvarints (a
// million random v4 addresses take about 3 bytes each).
const listMagic = "fwpL\x01"

// MarshalBinary encodes the list compactly.
func (l *List) MarshalBinary() ([]byte, error) {
	out := make([]byte, 0, 16+3*len(l.a4)+8*len(l.r4)+16*len(l.a6)+32*len(l.r6)+3*len(l.n)+8*len(l.rn))
	out = append(out, listMagic...)
	out = append(out, byte(l.typ))
	out = binary.AppendUvarint(out, l.score)
	out = binary.AppendUvarint(out, uint64(l.given))
	put := binary.AppendUvarint
	out = put(out, uint64(len(l.a4)))
	prev := uint64(0)
	for _, x := range l.a4 {
		out = put(out, uint64(x)-prev)
		prev = uint64(x)
	}
	out = put(out, uint64(len(l.r4)))
	for _, s := range l.r4 {
		out = put(out, uint64(s.lo))
		out = put(out, uint64(s.hi-s.lo))
	}
	out = put(out, uint64(len(l.a6)))
	for _, x := range l.a6 {
		out = binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(out, x.hi), x.lo)
	}
	out = put(out, uint64(len(l.r6)))
	for _, s := range l.r6 {
		for _, x := range []u128{s.lo, s.hi} {
			out = binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(out, x.hi), x.lo)
		}
	}
	out = put(out, uint64(len(l.n)))
	prev = 0
	for _, x := range l.n {
		out = put(out, x-prev)
		prev = x
	}
	out = put(out, uint64(len(l.rn)))
	for _, s := range l.rn {
		out = put(out, s.lo)
		out = put(out, s.hi-s.lo)
	}
	return out, nil
}

// errList is a malformed binary list.
var errList = errors.New("malformed list encoding")

// UnmarshalBinary decodes a list MarshalBinary encoded. Malformed input
// is refused with an error wrapping ErrInvalidValue; the entries are
// sorted and merged again, so any well-formed input is a valid list.
func (l *List) UnmarshalBinary(data []byte) error {
	fail := func(what string) error { return fmt.Errorf("%w: %w: %s", ErrInvalidValue, errList, what) }
	rest, ok := strings.CutPrefix(string(data), listMagic)
	if !ok {
		return fail("bad header")
	}
	d := []byte(rest)
	if len(d) < 1 {
		return fail("truncated")
	}
	typ := Type(d[0])
	d = d[1:]
	if typ != TypeAddr && !typ.isInt() {
		return fail("bad type")
	}
	uv := func() (uint64, bool) {
		x, n := binary.Uvarint(d)
		if n <= 0 {
			return 0, false
		}
		d = d[n:]
		return x, true
	}
	count := func(size int) (int, error) {
		n, ok := uv()
		if !ok || n > MaxListValues || n*uint64(size) > uint64(len(d)) {
			return 0, fail("bad count")
		}
		return int(n), nil
	}
	score, ok1 := uv()
	given, ok2 := uv()
	if !ok1 || !ok2 || score >= 1<<60 || given > MaxListValues {
		return fail("bad header")
	}
	nl := List{typ: typ, score: score, given: int(given)}
	var n int
	var err error
	if n, err = count(1); err != nil {
		return err
	}
	if n > 0 && typ != TypeAddr {
		return fail("addresses in an integer list")
	}
	nl.a4 = make([]uint32, n)
	prev := uint64(0)
	for i := range nl.a4 {
		x, ok := uv()
		if !ok || (i > 0 && x == 0) || prev+x > 0xffffffff {
			return fail("bad v4 address")
		}
		prev += x
		nl.a4[i] = uint32(prev)
	}
	if n, err = count(2); err != nil {
		return err
	}
	if n > 0 && typ != TypeAddr {
		return fail("addresses in an integer list")
	}
	nl.r4 = make([]span4, n)
	for i := range nl.r4 {
		lo, ok1 := uv()
		w, ok2 := uv()
		if !ok1 || !ok2 || lo+w > 0xffffffff {
			return fail("bad v4 range")
		}
		nl.r4[i] = span4{uint32(lo), uint32(lo + w)}
	}
	get128 := func() u128 {
		x := u128{binary.BigEndian.Uint64(d), binary.BigEndian.Uint64(d[8:])}
		d = d[16:]
		return x
	}
	if n, err = count(16); err != nil {
		return err
	}
	if n > 0 && typ != TypeAddr {
		return fail("addresses in an integer list")
	}
	nl.a6 = make([]u128, n)
	for i := range nl.a6 {
		nl.a6[i] = get128()
	}
	if n, err = count(32); err != nil {
		return err
	}
	if n > 0 && typ != TypeAddr {
		return fail("addresses in an integer list")
	}
	nl.r6 = make([]span6, n)
	for i := range nl.r6 {
		nl.r6[i] = span6{get128(), get128()}
		if nl.r6[i].lo.cmp(nl.r6[i].hi) > 0 {
			return fail("bad v6 range")
		}
	}
	maxInt := maxOf(typ)
	if typ == TypeAddr {
		maxInt = 0
	}
	if n, err = count(1); err != nil {
		return err
	}
	nl.n = make([]uint64, n)
	prev = 0
	for i := range nl.n {
		x, ok := uv()
		if !ok || (i > 0 && x == 0) || x > maxInt-prev {
			return fail("bad integer")
		}
		prev += x
		nl.n[i] = prev
	}
	if n, err = count(2); err != nil {
		return err
	}
	nl.rn = make([]span64, n)
	for i := range nl.rn {
		lo, ok1 := uv()
		w, ok2 := uv()
		if !ok1 || !ok2 || lo > maxInt || w > maxInt-lo {
			return fail("bad integer range")
		}
		nl.rn[i] = span64{lo, lo + w}
	}
	if len(d) != 0 {
		return fail("trailing bytes")
	}
	if nl.Len() == 0 {
		return fail("no values")
	}
	b := ListBuilder{l: nl}
	*l = *b.List()
	return nil
}

// MarshalText encodes the list as base64 of its binary form (JSON).
func (l *List) MarshalText() ([]byte, error) {
	b, _ := l.MarshalBinary()
	out := make([]byte, base64.StdEncoding.EncodedLen(len(b)))
	base64.StdEncoding.Encode(out, b)
	return out, nil
}

// UnmarshalText decodes MarshalText's form.
func (l *List) UnmarshalText(text []byte) error {
	b := make([]byte, base64.StdEncoding.DecodedLen(len(text)))
	n, err := base64.StdEncoding.Decode(b, text)
	if err != nil {
		return fmt.Errorf("%w: %w: %v", ErrInvalidValue, errList, err)
	}
	return l.UnmarshalBinary(b[:n])
}
