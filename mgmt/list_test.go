package mgmt

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"fwp/engine"
)

// TestListConditionPersists: a persistent filter with a list (Values) is
// held as one engine.List condition, stored compactly and restored equal
// after a restart; Get renders it as a List.
func TestListConditionPersists(t *testing.T) {
	dir := t.TempDir()
	m := newManager(t, dir)
	s := open(m, "a", false)
	const n = 20000
	vals := make([]string, n)
	for i := range vals {
		vals[i] = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).Next().String()
	}
	vals = append(vals, "192.168.0.0/16")
	f := &Filter{Key: "bl", Layer: "ALE_AUTH_CONNECT_V4", Action: "block", Lifetime: LifetimePersistent,
		Conditions: []Condition{{Field: "ip_remote_address", Values: vals}, {Field: "ip_remote_port", Values: []string{"80", "443"}}}}
	if _, err := m.Add(context.Background(), s, Object{Filter: f}); err != nil {
		t.Fatal(err)
	}
	check := func(m *Manager) {
		t.Helper()
		fs := m.Engine().View().Filters(engine.FilterTemplate{})
		if len(fs) != 1 || len(fs[0].Conditions) != 2 {
			t.Fatalf("filters %v", fs)
		}
		l := fs[0].Conditions[0].Value.List()
		if l == nil || l.Len() != n+1 || !l.Contains(engine.Addr(netip.MustParseAddr("192.168.3.4"))) || !l.Contains(engine.Addr(netip.MustParseAddr(vals[n-1]))) {
			t.Fatalf("list %v", l)
		}
		got, err := m.Get(0, Ref{Kind: KindFilter, Key: "bl"})
		if err != nil || got.Filter.Conditions[0].List == nil || !got.Filter.Conditions[0].List.Equal(l) {
			t.Fatalf("Get: %v %v", got.Filter, err)
		}
		if decides(t, m, 443) != "" { // no address: the list cannot match
			t.Fatalf("matched without an address")
		}
	}
	check(m)
	m.Close()
	// The journal line holds the packed list, not the text of each value.
	var size int64
	for _, name := range []string{"policy.json", "policy.journal"} {
		if st, err := os.Stat(filepath.Join(dir, name)); err == nil {
			size += st.Size()
		}
	}
	if size > 6*n {
		t.Errorf("the store takes %d bytes for %d addresses", size, n)
	}
	t.Logf("store: %d bytes for %d addresses (%.1f per address)", size, n, float64(size)/n)
	m2 := newManager(t, dir)
	check(m2)
	x, err := m2.Explain("ALE_AUTH_CONNECT_V4", map[string]string{"ip_remote_address": vals[7], "ip_remote_port": "80"})
	if err != nil || x.FilterKeys[x.Trace.Result.Filter] != "bl" {
		t.Fatalf("explain: %v %v", x, err)
	}
	// A bad value names its number.
	f.Key = "bad"
	f.Conditions = []Condition{{Field: "ip_remote_address", Values: []string{"10.0.0.1", "nope"}}}
	if _, err := m2.Add(context.Background(), open(m2, "b", false), Object{Filter: f}); err == nil || !strings.Contains(err.Error(), "condition 1: value 2") {
		t.Fatalf("bad value: %v", err)
	}
}
