package api

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"fwp/engine"
	"fwp/mgmt"
)

// FuzzApplyRequest decodes arbitrary bytes as the daemon would receive
// an Apply, converts them and applies them: each step succeeds or fails
// with a typed error, never a panic. The seeds are partial messages.
func FuzzApplyRequest(f *testing.F) {
	filter := func(fl *Filter) *Op {
		return &Op{Op: &Op_Add{Add: &Object{Kind: &Object_Filter{Filter: fl}}}}
	}
	for _, r := range []*ApplyRequest{
		{}, {Ops: []*Op{{}}}, {Ops: []*Op{{Op: &Op_Add{}}}}, {Ops: []*Op{{Op: &Op_Delete{}}}},
		{Ops: []*Op{{Op: &Op_Add{Add: &Object{Kind: &Object_Provider{Provider: &Provider{Key: "p", Lifetime: "persistent"}}}}}}},
		{Ops: []*Op{{Op: &Op_Add{Add: &Object{Kind: &Object_Sublayer{Sublayer: &Sublayer{Key: "s", Weight: 70000}}}}}}},
		{Ops: []*Op{{Op: &Op_Add{Add: &Object{Kind: &Object_Callout{Callout: &Callout{Key: "c", Layer: "ALE_AUTH_CONNECT_V4", Flags: []string{"conditional_on_flow"}}}}}}}},
		{Ops: []*Op{filter(&Filter{Key: "f", Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Weight: "index:3",
			Conditions: []*Condition{{Field: "ip_remote_port", Match: "range", Value: "1-9"}, {}}})}},
		{Ops: []*Op{filter(&Filter{Layer: "ALE_AUTH_CONNECT_V4", Action: "callout_terminating", Callout: "c", Flags: []string{"permit_if_callout_unregistered"}})}},
		{Ops: []*Op{{Op: &Op_Delete{Delete: &ObjectRef{Kind: "filter", Id: 1}}}}},
		{Policy: []byte("filters: [{key: a, layer: ALE_AUTH_CONNECT_V4, action: block}]")},
		{Ops: []*Op{filter(&Filter{Key: "l", Layer: "ALE_AUTH_CONNECT_V4", Action: "block",
			Conditions: []*Condition{{Field: "ip_remote_address", List: packedList(f, "192.0.2.1", "10.0.0.0/8")}}})}},
	} {
		b, err := proto.Marshal(r)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	m, err := mgmt.New(engine.New(engine.Options{}), mgmt.Options{})
	if err != nil {
		f.Fatal(err)
	}
	sid := m.OpenSession(mgmt.SessionInfo{Name: "fuzz"}).ID
	f.Fuzz(func(t *testing.T, b []byte) {
		var r ApplyRequest
		if proto.Unmarshal(b, &r) != nil {
			return // gRPC refuses such a message before any handler
		}
		ops, err := ToOps(r.GetOps())
		if err != nil {
			if !isTyped(err) {
				t.Fatalf("ToOps: untyped %v", err)
			}
			return
		}
		// In a transaction that is aborted at the end, so that the state
		// does not grow from one input to the next.
		if err := m.Begin(context.Background(), sid); err != nil {
			t.Fatal(err)
		}
		defer m.Abort(sid)
		if _, err := m.Apply(context.Background(), sid, ops); err != nil && !isTyped(err) {
			t.Fatalf("Apply: untyped %v", err)
		}
		// What was added reads back and converts both ways.
		for _, k := range mgmt.Kinds() {
			objs, err := m.List(sid, k, mgmt.Template{})
			if err != nil {
				t.Fatal(err)
			}
			for _, o := range objs {
				if _, err := ToObject(FromObject(o)); err != nil {
					t.Fatalf("%+v: %v", o, err)
				}
			}
		}
	})
}

// packedList is the wire form of an address list.
func packedList(tb testing.TB, values ...string) []byte {
	b := engine.NewListBuilder(engine.TypeAddr, len(values))
	for _, s := range values {
		v, err := engine.ParseValue(engine.TypeAddr, s)
		if err != nil {
			tb.Fatal(err)
		}
		if err := b.Add(v); err != nil {
			tb.Fatal(err)
		}
	}
	out, _ := b.List().MarshalBinary()
	return out
}

// TestListCondition: a packed list crosses the wire as one condition and
// comes back equal; a malformed one is refused by type, naming the filter.
func TestListCondition(t *testing.T) {
	in := &Object{Kind: &Object_Filter{Filter: &Filter{Key: "l", Layer: "ALE_AUTH_CONNECT_V4", Action: "block",
		Conditions: []*Condition{{Field: "ip_remote_address", List: packedList(t, "192.0.2.1", "10.0.0.0/8", "192.0.2.1")}}}}}
	o, err := ToObject(in)
	if err != nil {
		t.Fatal(err)
	}
	l := o.Filter.Conditions[0].List
	if l == nil || l.Len() != 2 || !l.Contains(engine.Addr(netip.MustParseAddr("10.1.2.3"))) {
		t.Fatalf("list %v", l)
	}
	back := FromObject(o).GetFilter().GetConditions()[0].GetList()
	if !bytes.Equal(back, in.GetFilter().GetConditions()[0].GetList()) {
		t.Fatalf("round trip changed the packed list")
	}
	in.GetFilter().Conditions[0].List = []byte("fwpL\x01junk")
	if _, err := ToObject(in); !errors.Is(err, engine.ErrInvalidValue) || !strings.Contains(err.Error(), `filter "l" condition 1`) {
		t.Fatalf("malformed list: %v", err)
	}
}
