package engine

import (
	"net/netip"
	"testing"
)

// Values.Set keeps every stored value of its field's type, so the index
// (keyed by the field's type) and the full match never disagree.
func TestValuesSetCoercesToFieldType(t *testing.T) {
	var vs Values
	vs.Set(FieldIPRemotePort, Uint32(80))
	if v := vs.Get(FieldIPRemotePort); v.Type() != TypeUint16 || v.Uint() != 80 {
		t.Fatalf("uint32 80 on a port = %v (%s)", v, v.Type())
	}
	vs.Set(FieldIPRemotePort, Uint32(70000))
	if v := vs.Get(FieldIPRemotePort); !v.IsEmpty() {
		t.Fatalf("70000 on a port = %v", v)
	}
	vs.Set(FieldIPProtocol, String("tcp"))
	if !vs.Get(FieldIPProtocol).IsEmpty() {
		t.Fatal("a string on the protocol field was kept")
	}
	vs.Set(FieldALEUserID, Uint64(1000))
	if v := vs.Get(FieldALEUserID); v.Type() != TypeUint32 || v.Uint() != 1000 {
		t.Fatalf("uid = %v", v)
	}
	vs.Set(FieldIPRemoteAddress, Prefix(netip.MustParsePrefix("10.0.0.0/8")))
	if !vs.Get(FieldIPRemoteAddress).IsEmpty() {
		t.Fatal("a prefix is not an incoming address")
	}
	// A filter on port 80 matches the converted value and not the dropped one.
	e := New(Options{})
	if err := e.Update(func(tx *Txn) error {
		_, err := tx.AddFilter(Filter{Layer: LayerALEAuthConnectV4, Action: Action{Type: ActionBlock},
			Conditions: []Condition{{Field: FieldIPRemotePort, Match: MatchEqual, Value: Uint16(80)}}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var a, b Values
	a.Set(FieldIPRemotePort, Uint64(80))
	b.Set(FieldIPRemotePort, Uint64(80+1<<16))
	ra, rb := e.Classify(LayerALEAuthConnectV4, &a, nil), e.Classify(LayerALEAuthConnectV4, &b, nil)
	if ra.Permitted() || !rb.Permitted() {
		t.Fatal("classification disagrees with the stored values")
	}
}

func TestClassifyCounts(t *testing.T) {
	e := New(Options{})
	if err := e.Update(func(tx *Txn) error {
		_, err := tx.AddFilter(Filter{Layer: LayerALEAuthConnectV4, Action: Action{Type: ActionBlock},
			Conditions: []Condition{{Field: FieldIPRemotePort, Match: MatchEqual, Value: Uint16(23)}}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var blocked, permitted Values
	blocked.SetTuple(6, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.1:23"))
	permitted.SetTuple(6, netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.1:80"))
	for range 3 {
		e.Classify(LayerALEAuthConnectV4, &blocked, nil)
	}
	e.Classify(LayerALEAuthConnectV4, &permitted, nil)
	for _, c := range e.ClassifyCounts() {
		want := ClassifyCount{Layer: c.Layer}
		if c.Layer == LayerALEAuthConnectV4 {
			want.Block, want.Permit = 3, 1
		}
		if c != want {
			t.Fatalf("%s: %+v, want %+v", c.Layer, c, want)
		}
	}
}
