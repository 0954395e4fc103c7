package engine

import (
	"math/rand/v2"
	"net/netip"
	"testing"
	"unsafe"
)

// The quick check and the key choice only make classification fast; the
// differential tests prove them correct but would not notice them stop
// working. These tests pin the fast path down.

// quickFilter compiles field-sorted conditions as compileLayer does.
func quickFilter(conds ...Condition) *cfilter {
	return &cfilter{conds: conds, groups: appendCondGroups(nil, conds)}
}

// TestQuickCheckRemoteAddr: for a single remote address or prefix of
// either family, the quick check rejects only what the condition rejects,
// and for a v4 address and a v6 prefix of up to 64 bits it rejects all of
// it (a v6 address is checked on its top 64 bits).
func TestQuickCheckRemoteAddr(t *testing.T) {
	if n := unsafe.Sizeof(quickCheck{}); n > 20 {
		t.Errorf("quickCheck is %d bytes; it was 20 for v4 alone, and its array's size is classification time", n)
	}
	if n := unsafe.Sizeof(prefixLen{}); n > 64 {
		t.Errorf("prefixLen is %d bytes, more than a cache line; a lookup walks them all", n)
	}
	r := rand.New(rand.NewPCG(1, 2))
	randAddr := func(v6 bool) netip.Addr {
		var b [16]byte
		for i := range b {
			b[i] = byte(r.IntN(256))
		}
		if !v6 {
			return netip.AddrFrom4([4]byte(b[:4]))
		}
		b[0], b[1] = 0x20, byte(r.IntN(2)) // nearby networks
		return netip.AddrFrom16(b)
	}
	// near flips one bit of a around position bit.
	near := func(a netip.Addr, bit int) netip.Addr {
		b := a.AsSlice()
		bit = max(0, min(len(b)*8-1, bit+r.IntN(3)-1))
		b[bit/8] ^= 0x80 >> (bit % 8)
		x, _ := netip.AddrFromSlice(b)
		return x
	}
	rejected := map[bool]int{}
	for i := range 20000 {
		v6 := i%2 == 1
		a := randAddr(v6)
		bits := r.IntN(a.BitLen() + 1)
		c := Condition{Field: FieldIPRemoteAddress, Match: MatchEqual, Value: Prefix(netip.PrefixFrom(a, bits))}
		switch r.IntN(3) {
		case 0:
			c.Value, bits = Addr(a), a.BitLen()
		case 1:
			c.Match = MatchPrefix
		}
		q := newQuickCheck(quickFilter(c, Condition{Field: FieldIPRemotePort, Match: MatchEqual, Value: Uint16(443)}))
		want := uint8(quickRAddr4)
		if v6 {
			want = quickRAddr6
		}
		if q.has&want == 0 {
			t.Fatalf("no address in the quick check of %s", c)
		}
		for range 8 {
			var vs Values
			vs.Set(FieldIPRemotePort, Uint16(443))
			switch x := r.IntN(4); {
			case x == 0:
				vs.Set(FieldIPRemoteAddress, Addr(randAddr(v6)))
			case x == 1 && r.IntN(4) == 0:
				vs.Set(FieldIPRemoteAddress, Addr(randAddr(!v6))) // the other family: left to the full match
			default:
				vs.Set(FieldIPRemoteAddress, Addr(near(a, bits)))
			}
			match, pass := c.matches(vs.v[FieldIPRemoteAddress]), q.pass(&vs)
			if match && !pass {
				t.Fatalf("quick check rejects %s, which %s matches", vs.v[FieldIPRemoteAddress], c)
			}
			other := vs.v[FieldIPRemoteAddress].ip.Is4() == v6
			exact := !v6 || bits <= 64
			if !match && pass && exact && !other {
				t.Fatalf("quick check passes %s, which %s does not match", vs.v[FieldIPRemoteAddress], c)
			}
			if !pass {
				rejected[v6]++
			}
		}
	}
	t.Logf("rejected of 80,000 tuples per family (v6: true): %v", rejected)
	if rejected[false] < 10000 || rejected[true] < 10000 {
		t.Errorf("the quick check rejected too few tuples: %v", rejected)
	}
}

// TestChooseKeyV6Prefix: a v6 remote prefix of a subnet or longer is the
// index key of a filter that also names a port, as a v4 /24 is; shorter
// ones leave the key to the port and the prefix to the quick check.
func TestChooseKeyV6Prefix(t *testing.T) {
	port := Condition{Field: FieldIPRemotePort, Match: MatchEqual, Value: Uint16(443)}
	for _, tc := range []struct {
		prefix string
		want   keyKind
	}{
		{"2001:db8:1:2::/64", keyRAddr}, {"2001:db8:1::/48", keyRAddr}, {"2001:db8::/40", keyRAddr},
		{"2001:db8::/32", keyRPort}, {"2001:db8:1:2:3:4::/96", keyRAddr},
		{"192.0.2.0/24", keyRAddr}, {"198.18.0.0/16", keyRPort},
	} {
		c := Condition{Field: FieldIPRemoteAddress, Match: MatchEqual, Value: Prefix(netip.MustParsePrefix(tc.prefix))}
		if got, _ := chooseKey(quickFilter(c, port)); got != tc.want {
			t.Errorf("%s with a port: key %d, want %d", tc.prefix, got, tc.want)
		}
	}
}
