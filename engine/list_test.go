package engine

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// randListValues returns n random values of an address list (addresses,
// prefixes, ranges, v4 or v6 by v6) or of a port list, crowded into a
// small space so that they overlap and touch.
func randListValues(r *rand.Rand, n int, kind string) []Value {
	out := make([]Value, 0, n)
	for range n {
		switch kind {
		case "v4", "v6":
			a := func() netip.Addr {
				x := 0x0a000000 | r.Uint32N(512)
				if kind == "v4" {
					return addr4(x)
				}
				return u128{0x20010db8 << 32, uint64(x)}.addr()
			}
			switch r.IntN(4) {
			case 0, 1:
				out = append(out, Addr(a()))
			case 2:
				bits := 32 - r.IntN(6)
				if kind == "v6" {
					bits = 128 - r.IntN(6)
				}
				p, _ := a().Prefix(bits)
				out = append(out, Prefix(p))
			default:
				lo, hi := a(), a()
				if lo.Compare(hi) > 0 {
					lo, hi = hi, lo
				}
				out = append(out, Range(Addr(lo), Addr(hi)))
			}
		default:
			p := uint16(r.IntN(300))
			if r.IntN(3) == 0 {
				out = append(out, Range(Uint16(p), Uint16(p+uint16(r.IntN(10)))))
			} else {
				out = append(out, Uint16(p))
			}
		}
	}
	return out
}

// TestListMatchesConditions: a list condition matches exactly what one
// EQUAL condition per value, ORed, matches, and weighs the same.
func TestListMatchesConditions(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, kind := range []string{"v4", "v6", "port"} {
		for round := range 50 {
			vals := randListValues(r, 1+r.IntN(40), kind)
			typ := TypeAddr
			if kind == "port" {
				typ = TypeUint16
			}
			b := NewListBuilder(typ, len(vals))
			var conds []Condition
			for _, v := range vals {
				if err := b.Add(v); err != nil {
					t.Fatal(err)
				}
				conds = append(conds, Condition{Match: matchOf(v), Value: v})
			}
			l := b.List()
			lc := Condition{Match: MatchEqual, Value: ListValue(l)}
			var score uint64
			for _, c := range conds {
				score += c.specificity()
			}
			if lc.specificity() != score {
				t.Fatalf("%s round %d: list weighs %d, its conditions %d", kind, round, lc.specificity(), score)
			}
			// Round trip through the binary and text forms.
			bin, _ := l.MarshalBinary()
			var l2 List
			if err := l2.UnmarshalBinary(bin); err != nil || !l2.Equal(l) {
				t.Fatalf("%s round %d: binary round trip: %v, equal %v", kind, round, err, l2.Equal(l))
			}
			txt, _ := l.MarshalText()
			var l3 List
			if err := l3.UnmarshalText(txt); err != nil || !l3.Equal(l) {
				t.Fatalf("%s round %d: text round trip: %v", kind, round, err)
			}
			// A list rebuilt from its own Values is the same set.
			b2 := NewListBuilder(typ, 0)
			for v := range l.Values() {
				if err := b2.Add(v); err != nil {
					t.Fatal(err)
				}
			}
			if l4 := b2.List(); !sameSet(l4, l) {
				t.Fatalf("%s round %d: Values do not rebuild the list", kind, round)
			}
			probe := func(v Value) {
				want := false
				for _, c := range conds {
					if c.matches(v) {
						want = true
					}
				}
				for _, m := range []*List{l, &l2} {
					if got := (&Condition{Match: MatchEqual, Value: ListValue(m)}).matches(v); got != want {
						t.Fatalf("%s round %d: %s in %s: list says %v, conditions %v", kind, round, v, l, got, want)
					}
				}
			}
			for x := uint32(0); x < 520; x++ {
				switch kind {
				case "v4":
					probe(Addr(addr4(0x0a000000 | x)))
				case "v6":
					probe(Addr(u128{0x20010db8 << 32, uint64(0x0a000000 | x)}.addr()))
				default:
					probe(Uint16(uint16(x)))
				}
			}
			probe(Value{})
		}
	}
}

// matchOf is the match of a value's own condition: a range is matched
// with range.
func matchOf(v Value) MatchType {
	if v.Type() == TypeRange {
		return MatchRange
	}
	return MatchEqual
}

func sameSet(a, b *List) bool {
	c, d := *a, *b
	c.score, d.score = 0, 0
	return c.Equal(&d)
}

// TestListValidate: a list condition is EQUAL, of the field's type and of
// the layer's family; an empty list is refused.
func TestListValidate(t *testing.T) {
	v4 := NewListBuilder(TypeAddr, 1)
	_ = v4.Add(Addr(netip.MustParseAddr("192.0.2.1")))
	l4 := v4.List()
	ports := NewListBuilder(TypeUint16, 1)
	_ = ports.Add(Uint16(80))
	lp := ports.List()
	layer4, layer6 := LayerByID(LayerALEAuthConnectV4), LayerByID(LayerALEAuthConnectV6)
	for _, tc := range []struct {
		c     Condition
		l     *Layer
		want  error
		valid bool
	}{
		{Condition{FieldIPRemoteAddress, MatchEqual, ListValue(l4)}, layer4, nil, true},
		{Condition{FieldIPRemoteAddress, MatchEqual, ListValue(l4)}, layer6, ErrInvalidValue, false},
		{Condition{FieldIPRemoteAddress, MatchNotEqual, ListValue(l4)}, layer4, ErrInvalidMatchType, false},
		{Condition{FieldIPRemotePort, MatchEqual, ListValue(l4)}, layer4, ErrTypeMismatch, false},
		{Condition{FieldIPRemotePort, MatchEqual, ListValue(lp)}, layer4, nil, true},
		{Condition{FieldIPRemoteAddress, MatchEqual, ListValue(&List{typ: TypeAddr})}, layer4, ErrInvalidCondition, false},
	} {
		err := tc.c.validate(tc.l)
		if tc.valid != (err == nil) || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("%s on %s: %v, want %v", tc.c, tc.l.Name, err, tc.want)
		}
	}
	if err := NewListBuilder(TypeAddr, 0).Add(Uint16(1)); !errors.Is(err, ErrTypeMismatch) {
		t.Errorf("a port in an address list: %v", err)
	}
}

// TestListClassify: a filter with a list condition classifies as the
// filter with one condition per value, through the compiled index.
func TestListClassify(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	vals := randListValues(r, 200, "v4")
	b := NewListBuilder(TypeAddr, len(vals))
	var conds []Condition
	for _, v := range vals {
		_ = b.Add(v)
		conds = append(conds, Condition{Field: FieldIPRemoteAddress, Match: matchOf(v), Value: v})
	}
	l := b.List()
	mk := func(cs []Condition) *Engine {
		e := New(Options{})
		tx, err := e.Begin(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.AddFilter(Filter{Layer: LayerALEAuthConnectV4, Action: Action{Type: ActionBlock}, Conditions: cs}); err != nil {
			t.Fatal(err)
		}
		if _, err := tx.AddFilter(Filter{Layer: LayerALEAuthConnectV4, Action: Action{Type: ActionPermit}, Weight: WeightExact(1 << 59),
			Conditions: []Condition{{Field: FieldIPRemoteAddress, Match: MatchEqual, Value: Addr(netip.MustParseAddr("10.0.0.7"))}}}); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		return e
	}
	pb := NewListBuilder(TypeUint16, 2)
	_ = pb.Add(Uint16(80))
	_ = pb.Add(Range(Uint16(443), Uint16(444)))
	ports := []Condition{{Field: FieldIPRemotePort, Match: MatchEqual, Value: Uint16(80)}, {Field: FieldIPRemotePort, Match: MatchRange, Value: Range(Uint16(443), Uint16(444))}}
	listE := mk([]Condition{{Field: FieldIPRemoteAddress, Match: MatchEqual, Value: ListValue(l)}, {Field: FieldIPRemotePort, Match: MatchEqual, Value: ListValue(pb.List())}})
	condE := mk(append(conds, ports...))
	lf := listE.View().Filters(FilterTemplate{})[0]
	cf := condE.View().Filters(FilterTemplate{})[0]
	if lf.EffectiveWeight != cf.EffectiveWeight {
		t.Fatalf("effective weights: list %x, conditions %x", lf.EffectiveWeight, cf.EffectiveWeight)
	}
	for x := uint32(0); x < 520*4; x++ {
		var vs Values
		vs.SetTuple(6, netip.AddrPort{}, netip.AddrPortFrom(addr4(0x0a000000|x/4), []uint16{0, 80, 443, 445}[x%4]))
		a, b := listE.Classify(LayerALEAuthConnectV4, &vs, nil), condE.Classify(LayerALEAuthConnectV4, &vs, nil)
		if a.ClassifyOut != b.ClassifyOut || (a.Filter == 0) != (b.Filter == 0) {
			t.Fatalf("%s: list %+v, conditions %+v", vs.String(), a, b)
		}
	}
}

// FuzzListUnmarshal: any input decodes to a valid list or a typed error,
// never a panic, and a decoded list encodes to a form that decodes to it.
func FuzzListUnmarshal(f *testing.F) {
	r := rand.New(rand.NewPCG(5, 6))
	for _, kind := range []string{"v4", "v6", "port"} {
		typ := TypeAddr
		if kind == "port" {
			typ = TypeUint16
		}
		b := NewListBuilder(typ, 0)
		for _, v := range randListValues(r, 20, kind) {
			_ = b.Add(v)
		}
		enc, _ := b.List().MarshalBinary()
		f.Add(enc)
	}
	f.Add([]byte(listMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		var l List
		if err := l.UnmarshalBinary(data); err != nil {
			if !errors.Is(err, ErrInvalidValue) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		enc, _ := l.MarshalBinary()
		var l2 List
		if err := l2.UnmarshalBinary(enc); err != nil || !l2.Equal(&l) {
			t.Fatalf("re-encoding: %v", err)
		}
		for v := range l.Values() {
			first := v
			switch v.Type() {
			case TypeRange:
				first = v.Low()
			case TypePrefix:
				first = Addr(v.Addr())
			}
			if !l.Contains(first) {
				t.Fatalf("%s not in its list", v)
			}
		}
	})
}
