package engine_test

import (
	"errors"
	"net/netip"
	"testing"

	"fwp/engine"
)

// allTypes includes the types ParseValue refuses and one past the last.
var allTypes = []engine.Type{
	engine.TypeEmpty, engine.TypeUint8, engine.TypeUint16, engine.TypeUint32, engine.TypeUint64,
	engine.TypeAddr, engine.TypePrefix, engine.TypeRange, engine.TypeBytes, engine.TypeString, engine.Type(10),
}

// checkParse is the property FuzzParseValue holds for every input and type:
// no panic; an error wraps ErrInvalidValue or ErrTypeMismatch; a value is of
// a type the field type admits, and its String() parses back to an equal value.
func checkParse(t *testing.T, typ engine.Type, s string) {
	v, err := engine.ParseValue(typ, s)
	if err != nil {
		if !errors.Is(err, engine.ErrInvalidValue) && !errors.Is(err, engine.ErrTypeMismatch) {
			t.Fatalf("ParseValue(%s, %q): untyped error %v", typ, s, err)
		}
		if !v.IsEmpty() {
			t.Fatalf("ParseValue(%s, %q) failed with a value %v", typ, s, v)
		}
		return
	}
	switch v.Type() {
	case typ:
	case engine.TypePrefix:
		if typ != engine.TypeAddr {
			t.Fatalf("ParseValue(%s, %q) = prefix %v", typ, s, v)
		}
	case engine.TypeRange:
		if v.Low().Type() != typ || v.High().Type() != typ {
			t.Fatalf("ParseValue(%s, %q) = range of %s..%s", typ, s, v.Low().Type(), v.High().Type())
		}
	default:
		t.Fatalf("ParseValue(%s, %q) = a %s value", typ, s, v.Type())
	}
	back, err := engine.ParseValue(typ, v.String())
	if err != nil {
		t.Fatalf("ParseValue(%s, %q) = %v, which does not parse back: %v", typ, s, v, err)
	}
	if !back.Equal(v) || !v.Equal(back) {
		t.Fatalf("ParseValue(%s, %q) = %v, parses back as %v", typ, s, v, back)
	}
}

func FuzzParseValue(f *testing.F) {
	for _, s := range []string{
		"0", "255", "256", "65535", "4294967296", "18446744073709551615", "18446744073709551616",
		"0x1f", "0X1F", "0b101", "0o17", "1_000", "-1", "+1", "6-17", "17-6", "1-2-3", "1--2", "-", "1-", "-1-2",
		"10.0.0.1", "::1", "::ffff:10.0.0.1", "fe80::1%eth0", "fe80::1%a-b", "10.0.0.0/8", "10.1.2.3/8", "2001:db8::/32",
		"10.0.0.1-10.0.0.9", "::1-::2", "10.0.0.1-::1", "10.0.0.0/8-11.0.0.0/8", "1.2.3.4/33",
		"/usr/bin/curl", "  padded  ", "\t", "\u0085x\u0085", "a\x00b", "\xff\xfe",
		"0x", "0x0102", "0xabc", "zz", "0x0X12", "", " ",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, typ := range allTypes {
			checkParse(t, typ, s)
		}
	})
}

func TestParseValue(t *testing.T) {
	a := func(s string) engine.Value { return engine.Addr(netip.MustParseAddr(s)) }
	p := func(s string) engine.Value { return engine.Prefix(netip.MustParsePrefix(s)) }
	ok := []struct {
		typ  engine.Type
		in   string
		want engine.Value
	}{
		{engine.TypeUint8, "0", u8(0)},
		{engine.TypeUint8, "255", u8(255)},
		{engine.TypeUint8, " 17 ", u8(17)},
		{engine.TypeUint8, "0x11", u8(17)},
		{engine.TypeUint8, "6-17", rng(u8(6), u8(17))},
		{engine.TypeUint8, "6 - 17", rng(u8(6), u8(17))},
		{engine.TypeUint16, "65535", u16(65535)},
		{engine.TypeUint16, "80-443", rng(u16(80), u16(443))},
		{engine.TypeUint16, "443-80", rng(u16(443), u16(80))}, // order is Validate's business
		{engine.TypeUint32, "4294967295", u32(1<<32 - 1)},
		{engine.TypeUint64, "18446744073709551615", u64(1<<64 - 1)},
		{engine.TypeUint64, "0x10000000000", u64(1 << 40)},
		{engine.TypeAddr, "10.0.0.1", a("10.0.0.1")},
		{engine.TypeAddr, "::ffff:10.0.0.1", a("10.0.0.1")},
		{engine.TypeAddr, "2001:DB8::1", a("2001:db8::1")},
		{engine.TypeAddr, "10.0.0.0/8", p("10.0.0.0/8")},
		{engine.TypeAddr, "10.1.2.3/8", p("10.0.0.0/8")},
		{engine.TypeAddr, "2001:db8::/32", p("2001:db8::/32")},
		{engine.TypeAddr, "10.0.0.1-10.0.0.9", rng(a("10.0.0.1"), a("10.0.0.9"))},
		{engine.TypeAddr, "::1 - ::2", rng(a("::1"), a("::2"))},
		{engine.TypeString, "/usr/bin/curl", str("/usr/bin/curl")},
		{engine.TypeString, "  padded  ", str("padded")},
		{engine.TypeString, "a-b", str("a-b")},
		{engine.TypeBytes, "0x0102", engine.Bytes([]byte{1, 2})},
		{engine.TypeBytes, "0XaB", engine.Bytes([]byte{0xab})},
		{engine.TypeBytes, "ab", engine.Bytes([]byte{0xab})},
		{engine.TypeBytes, "0x", engine.Bytes(nil)},
	}
	for _, tt := range ok {
		got, err := engine.ParseValue(tt.typ, tt.in)
		if err != nil || !got.Equal(tt.want) {
			t.Errorf("ParseValue(%s, %q) = %v, %v; want %v", tt.typ, tt.in, got, err, tt.want)
		}
		checkParse(t, tt.typ, tt.in)
	}
	bad := []struct {
		typ  engine.Type
		in   string
		want error
	}{
		{engine.TypeUint8, "", engine.ErrInvalidValue},
		{engine.TypeUint8, "   ", engine.ErrInvalidValue},
		{engine.TypeUint8, "256", engine.ErrInvalidValue},
		{engine.TypeUint8, "-1", engine.ErrInvalidValue},
		{engine.TypeUint8, "six", engine.ErrInvalidValue},
		{engine.TypeUint8, "1-", engine.ErrInvalidValue},
		{engine.TypeUint8, "-", engine.ErrInvalidValue},
		{engine.TypeUint8, "1--2", engine.ErrInvalidValue},
		{engine.TypeUint8, "1-2-3", engine.ErrInvalidValue},
		{engine.TypeUint8, "1-300", engine.ErrInvalidValue},
		{engine.TypeUint16, "65536", engine.ErrInvalidValue},
		{engine.TypeUint32, "4294967296", engine.ErrInvalidValue},
		{engine.TypeUint64, "18446744073709551616", engine.ErrInvalidValue},
		{engine.TypeUint64, "0x", engine.ErrInvalidValue},
		{engine.TypeAddr, "10.0.0.256", engine.ErrInvalidValue},
		{engine.TypeAddr, "fe80::1%eth0", engine.ErrInvalidValue},
		{engine.TypeAddr, "10.0.0.0/33", engine.ErrInvalidValue},
		{engine.TypeAddr, "10.0.0.1-x", engine.ErrInvalidValue},
		{engine.TypeAddr, "10.0.0.0/8-11.0.0.0/8", engine.ErrInvalidValue},
		{engine.TypeAddr, "example.com", engine.ErrInvalidValue},
		{engine.TypeBytes, "0x1", engine.ErrInvalidValue},
		{engine.TypeBytes, "zz", engine.ErrInvalidValue},
		{engine.TypeString, " ", engine.ErrInvalidValue},
		{engine.TypePrefix, "10.0.0.0/8", engine.ErrTypeMismatch},
		{engine.TypeRange, "1-2", engine.ErrTypeMismatch},
		{engine.TypeEmpty, "x", engine.ErrTypeMismatch},
		{engine.Type(200), "x", engine.ErrTypeMismatch},
	}
	for _, tt := range bad {
		got, err := engine.ParseValue(tt.typ, tt.in)
		if !errors.Is(err, tt.want) {
			t.Errorf("ParseValue(%s, %q) = %v, %v; want %v", tt.typ, tt.in, got, err, tt.want)
		}
	}
}

// The accessors of Value agree with the constructors.
func TestValueAccessors(t *testing.T) {
	if v := (engine.Value{}); !v.IsEmpty() || v.Type() != engine.TypeEmpty || v.String() != "<empty>" {
		t.Errorf("zero value: %v", v)
	}
	if v := engine.Addr(netip.Addr{}); !v.IsEmpty() {
		t.Errorf("invalid address is not empty: %v", v)
	}
	if v := engine.Prefix(netip.Prefix{}); !v.IsEmpty() {
		t.Errorf("invalid prefix is not empty: %v", v)
	}
	if v := engine.Addr(netip.MustParseAddr("fe80::1%eth0")); v.Addr().Zone() != "" {
		t.Errorf("zone kept: %v", v)
	}
	pv := engine.Prefix(netip.MustParsePrefix("10.1.2.3/16"))
	if pv.Prefix() != netip.MustParsePrefix("10.1.0.0/16") || pv.Addr() != netip.MustParseAddr("10.1.0.0") {
		t.Errorf("prefix not masked: %v", pv)
	}
	if u16(80).Prefix().IsValid() || u16(80).Low().Type() != engine.TypeEmpty || u16(80).High().Type() != engine.TypeEmpty {
		t.Error("non-prefix, non-range accessors")
	}
	b := []byte{1, 2}
	bv := engine.Bytes(b)
	b[0] = 9
	if bv.Str() != "\x01\x02" || bv.String() != "0x0102" {
		t.Errorf("Bytes did not copy: %q", bv.Str())
	}
	if rng(u8(1), u8(2)).Equal(rng(u8(1), u8(3))) || !rng(u8(1), u8(2)).Equal(rng(u8(1), u8(2))) || u8(1).Equal(u16(1)) {
		t.Error("Equal")
	}
	var vs engine.Values
	vs.Set(0, u8(1)).Set(200, u8(1)).Set(engine.FieldIPProtocol, u8(6))
	if vs.Get(0).Type() != engine.TypeEmpty || vs.Get(200).Type() != engine.TypeEmpty || vs.Uint(engine.FieldIPProtocol) != 6 {
		t.Errorf("Values with invalid fields: %s", vs.String())
	}
	if vs.String() != "ip_protocol=6" {
		t.Errorf("Values.String() = %q", vs.String())
	}
	vs.Reset()
	if vs.String() != "" {
		t.Errorf("after Reset: %q", vs.String())
	}
}
