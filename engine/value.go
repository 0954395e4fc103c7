package engine

import (
	"encoding/hex"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Value is a typed value: an incoming field value or a condition value
// (WFP's FWP_VALUE0 / FWP_CONDITION_VALUE0). The zero Value is empty.
// Values are small and comparable except for ranges, which hold a pointer.
type Value struct {
	t  Type
	n  uint64     // integers; prefix length for TypePrefix
	ip netip.Addr // addresses and prefixes
	s  string     // strings and byte blobs
	r  *[2]Value  // TypeRange: low, high
	l  *List      // TypeList
}

// Uint8 returns a uint8 value.
func Uint8(v uint8) Value { return Value{t: TypeUint8, n: uint64(v)} }

// Uint16 returns a uint16 value.
func Uint16(v uint16) Value { return Value{t: TypeUint16, n: uint64(v)} }

// Uint32 returns a uint32 value.
func Uint32(v uint32) Value { return Value{t: TypeUint32, n: uint64(v)} }

// Uint64 returns a uint64 value.
func Uint64(v uint64) Value { return Value{t: TypeUint64, n: v} }

// Addr returns an address value. A v4-mapped v6 address is unmapped: a v4
// layer sees v4 addresses whatever the socket family was.
func Addr(a netip.Addr) Value {
	if !a.IsValid() {
		return Value{}
	}
	return Value{t: TypeAddr, ip: a.Unmap().WithZone("")}
}

// Prefix returns a prefix value (WFP's FWP_V4_ADDR_MASK / FWP_V6_ADDR_AND_MASK).
func Prefix(p netip.Prefix) Value {
	if !p.IsValid() {
		return Value{}
	}
	p = p.Masked()
	return Value{t: TypePrefix, ip: p.Addr(), n: uint64(p.Bits())}
}

// String returns a string value (app id, cgroup path).
func String(s string) Value { return Value{t: TypeString, s: s} }

// Bytes returns a byte-blob value. The bytes are copied.
func Bytes(b []byte) Value { return Value{t: TypeBytes, s: string(b)} }

// Range returns a range value [lo, hi]. Both ends must be of one type;
// Validate reports a range whose ends differ or are out of order.
func Range(lo, hi Value) Value { return Value{t: TypeRange, r: &[2]Value{lo, hi}} }

// Type is the value's type.
func (v Value) Type() Type { return v.t }

// IsEmpty reports whether the value is absent.
func (v Value) IsEmpty() bool { return v.t == TypeEmpty }

// Uint returns an integer value's number.
func (v Value) Uint() uint64 { return v.n }

// Addr returns an address value's address, or a prefix's address.
func (v Value) Addr() netip.Addr { return v.ip }

// Prefix returns a prefix value as a netip.Prefix.
func (v Value) Prefix() netip.Prefix {
	if v.t != TypePrefix {
		return netip.Prefix{}
	}
	return netip.PrefixFrom(v.ip, int(v.n))
}

// Str returns a string or byte-blob value's content.
func (v Value) Str() string { return v.s }

// Low and High return a range's ends.
func (v Value) Low() Value {
	if v.r == nil {
		return Value{}
	}
	return v.r[0]
}

// High returns a range's upper end.
func (v Value) High() Value {
	if v.r == nil {
		return Value{}
	}
	return v.r[1]
}

// Equal reports whether two values are the same (ranges by their ends).
func (v Value) Equal(w Value) bool {
	if v.t != w.t {
		return false
	}
	if v.t == TypeRange {
		return v.r[0].Equal(w.r[0]) && v.r[1].Equal(w.r[1])
	}
	if v.t == TypeList {
		return v.l.Equal(w.l)
	}
	return v.n == w.n && v.ip == w.ip && v.s == w.s
}

// String renders the value the way ParseValue reads it.
func (v Value) String() string {
	switch v.t {
	case TypeEmpty:
		return "<empty>"
	case TypeUint8, TypeUint16, TypeUint32, TypeUint64:
		return strconv.FormatUint(v.n, 10)
	case TypeAddr:
		return v.ip.String()
	case TypePrefix:
		return v.Prefix().String()
	case TypeRange:
		return v.r[0].String() + "-" + v.r[1].String()
	case TypeBytes:
		return "0x" + hex.EncodeToString([]byte(v.s))
	case TypeString:
		return v.s
	case TypeList:
		return v.l.String()
	}
	return "<invalid>"
}

// compare orders two values of one scalar type: -1, 0, +1.
// Addresses of different families order v4 first.
func compare(a, b Value) int {
	switch a.t {
	case TypeAddr:
		return a.ip.Compare(b.ip)
	case TypeString, TypeBytes:
		return strings.Compare(a.s, b.s)
	}
	switch {
	case a.n < b.n:
		return -1
	case a.n > b.n:
		return 1
	}
	return 0
}

// ParseValue reads s as a value for a field of type t. It accepts a plain
// value, "lo-hi" for a range, and for address fields "addr/bits" for a prefix.
// Integers may be decimal or 0x-hex; a byte blob is 0x-hex.
func ParseValue(t Type, s string) (Value, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return Value{}, fmt.Errorf("%w: empty value for a %s field", ErrInvalidValue, t)
	}
	switch t {
	case TypeAddr:
		if strings.Contains(s, "/") {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return Value{}, fmt.Errorf("%w: %q is not an address prefix", ErrInvalidValue, s)
			}
			return Prefix(p), nil
		}
		if i := strings.Index(s, "-"); i > 0 {
			lo, err1 := netip.ParseAddr(strings.TrimSpace(s[:i]))
			hi, err2 := netip.ParseAddr(strings.TrimSpace(s[i+1:]))
			if err1 != nil || err2 != nil {
				return Value{}, fmt.Errorf("%w: %q is not an address range", ErrInvalidValue, s)
			}
			return Range(Addr(lo), Addr(hi)), nil
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return Value{}, fmt.Errorf("%w: %q is not an address", ErrInvalidValue, s)
		}
		if a.Zone() != "" {
			return Value{}, fmt.Errorf("%w: %q: zones are not supported", ErrInvalidValue, s)
		}
		return Addr(a), nil
	case TypeUint8, TypeUint16, TypeUint32, TypeUint64:
		bits := map[Type]int{TypeUint8: 8, TypeUint16: 16, TypeUint32: 32, TypeUint64: 64}[t]
		if i := strings.Index(s[1:], "-"); i >= 0 {
			lo, err := ParseValue(t, s[:i+1])
			if err != nil {
				return Value{}, err
			}
			hi, err := ParseValue(t, s[i+2:])
			if err != nil {
				return Value{}, err
			}
			if hi.t == TypeRange { // "1-2-3"
				return Value{}, fmt.Errorf("%w: %q is not a %s range", ErrInvalidValue, s, t)
			}
			return Range(lo, hi), nil
		}
		n, err := strconv.ParseUint(s, 0, bits)
		if err != nil {
			return Value{}, fmt.Errorf("%w: %q is not a %s", ErrInvalidValue, s, t)
		}
		return Value{t: t, n: n}, nil
	case TypeString:
		return String(s), nil
	case TypeBytes:
		h := strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X")
		b, err := hex.DecodeString(h)
		if err != nil {
			return Value{}, fmt.Errorf("%w: %q is not 0x-hex bytes", ErrInvalidValue, s)
		}
		return Bytes(b), nil
	}
	return Value{}, fmt.Errorf("%w: cannot parse a value of type %s", ErrTypeMismatch, t)
}

// Values is the set of incoming values of one classification
// (WFP's FWPS_INCOMING_VALUES0), indexed by field. A field the datapath
// does not know stays empty, and a condition on an empty field never
// matches. Values is a plain array so a datapath can keep one on its stack.
type Values struct {
	v [numFields]Value
}

// Set sets a field's value and returns the set, for chaining.
//
// A value must be of the field's type; an integer of another width is
// converted when it fits. A value that cannot be the field's (a string for
// a port, 70000 for a port) leaves the field empty, so no condition on it
// matches: an index keyed on the field's type never sees a value of
// another.
func (vs *Values) Set(f FieldID, v Value) *Values {
	if f <= FieldInvalid || f >= numFields {
		return vs
	}
	ft := fields[f].typ
	switch {
	case v.t == ft || v.t == TypeEmpty:
	case ft.isInt() && v.t.isInt() && v.n <= maxOf(ft):
		v.t = ft
	default:
		v = Value{}
	}
	vs.v[f] = v
	return vs
}

func maxOf(t Type) uint64 {
	switch t {
	case TypeUint8:
		return 1<<8 - 1
	case TypeUint16:
		return 1<<16 - 1
	case TypeUint32:
		return 1<<32 - 1
	}
	return 1<<64 - 1
}

// Get returns a field's value (empty when unset).
func (vs *Values) Get(f FieldID) Value {
	if f > FieldInvalid && f < numFields {
		return vs.v[f]
	}
	return Value{}
}

// Reset clears every value.
func (vs *Values) Reset() { *vs = Values{} }

// Uint returns an integer field's value, 0 when unset.
func (vs *Values) Uint(f FieldID) uint64 { return vs.Get(f).n }

// SetTuple sets the transport 5-tuple fields in one call.
func (vs *Values) SetTuple(proto uint8, local, remote netip.AddrPort) *Values {
	vs.Set(FieldIPProtocol, Uint8(proto))
	if local.IsValid() {
		vs.Set(FieldIPLocalAddress, Addr(local.Addr()))
		vs.Set(FieldIPLocalPort, Uint16(local.Port()))
	}
	if remote.IsValid() {
		vs.Set(FieldIPRemoteAddress, Addr(remote.Addr()))
		vs.Set(FieldIPRemotePort, Uint16(remote.Port()))
	}
	return vs
}

// String lists the set fields, for logs and explanations.
func (vs *Values) String() string {
	var b strings.Builder
	for f := FieldID(1); f < numFields; f++ {
		if vs.v[f].t == TypeEmpty {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(f.Name())
		b.WriteByte('=')
		b.WriteString(vs.v[f].String())
	}
	return b.String()
}
