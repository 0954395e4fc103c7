package api

import (
	"fmt"
	"testing"

	"google.golang.org/protobuf/proto"

	"fwp/mgmt"
)

// A batch converted with its filters and conditions cut from slabs and
// repeated strings shared comes back as sent, and each filter's
// conditions are its own: appending to one does not write into the next.
func TestToOpsBatch(t *testing.T) {
	var ops []*Op
	for i := range 1500 {
		f := &Filter{Key: fmt.Sprintf("f%d", i), Layer: []string{"ALE_AUTH_CONNECT_V4", "ALE_AUTH_CONNECT_V6"}[i/100%2], Action: "block",
			Weight: fmt.Sprint(i % 3), Lifetime: "persistent"}
		for j := range i % 4 {
			f.Conditions = append(f.Conditions, &Condition{Field: "ip_remote_port", Match: []string{"equal", "range"}[j%2], Value: fmt.Sprint(i + j)})
		}
		ops = append(ops, &Op{Op: &Op_Add{Add: &Object{Kind: &Object_Filter{Filter: f}}}})
		if i%500 == 0 {
			ops = append(ops, &Op{Op: &Op_Delete{Delete: &ObjectRef{Kind: "filter", Key: f.Key}}})
		}
	}
	got, err := ToOps(ops)
	if err != nil {
		t.Fatal(err)
	}
	back := FromOps(got)
	for i := range ops {
		if !proto.Equal(ops[i], back[i]) {
			t.Fatalf("op %d: sent %v, converted back %v", i, ops[i], back[i])
		}
	}
	for i := range got {
		if got[i].Add == nil || i+1 == len(got) || got[i+1].Add == nil {
			continue
		}
		f, next := got[i].Add.Filter, got[i+1].Add.Filter
		before := fmt.Sprint(next.Conditions)
		f.Conditions = append(f.Conditions, mgmt.Condition{Field: "ip_protocol", Value: "6"})
		if after := fmt.Sprint(next.Conditions); after != before {
			t.Fatalf("appending to op %d's conditions changed op %d's: %s -> %s", i, i+1, before, after)
		}
	}
}
