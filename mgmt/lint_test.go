package mgmt

import (
	"strings"
	"testing"

	"fwp/engine"
)

// A condition that can match only remote port 0 is warned about, with
// the filter's key and position; other port conditions are not.
func TestWarningsRemotePortZero(t *testing.T) {
	filter := func(match, value string) Op {
		return Op{Pos: "p.yaml:7", Add: &Object{Filter: &Filter{Key: "f", Layer: "ALE_AUTH_CONNECT_V4", Action: "block",
			Conditions: []Condition{{Field: "ip_remote_port", Match: match, Value: value}}}}}
	}
	for _, c := range []struct {
		match, value string
		warn         bool
	}{
		{"", "0", true}, {"equal", "0", true}, {"range", "0-0", true}, {"less", "1", true}, {"less_or_equal", "0", true},
		{"", "80", false}, {"not_equal", "0", false}, {"greater", "0", false}, {"range", "0-1023", false}, {"less", "1024", false},
	} {
		w := Warnings([]Op{filter(c.match, c.value)})
		if got := len(w) == 1 && strings.HasPrefix(w[0], `p.yaml:7: filter "f": `) && strings.Contains(w[0], "only remote port 0"); got != c.warn || (!c.warn && len(w) != 0) {
			t.Errorf("ip_remote_port %s %s: warnings %q, want a warning %v", c.match, c.value, w, c.warn)
		}
	}
	// A list warns only when 0 is its one value.
	list := func(vals ...uint16) Op {
		b := engine.NewListBuilder(engine.TypeUint16, len(vals))
		for _, v := range vals {
			_ = b.Add(engine.Uint16(v))
		}
		return Op{Add: &Object{Filter: &Filter{Key: "l", Layer: "ALE_AUTH_CONNECT_V4", Action: "block",
			Conditions: []Condition{{Field: "ip_remote_port", List: b.List()}}}}}
	}
	if w := Warnings([]Op{list(80, 443)}); len(w) != 0 {
		t.Errorf("a list of ports 80, 443: warnings %q", w)
	}
	if w := Warnings([]Op{list(0)}); len(w) != 1 {
		t.Errorf("a list of port 0 alone: warnings %q", w)
	}
	// Deletes, other objects and invalid filters are not looked at.
	if w := Warnings([]Op{{Delete: &Ref{Kind: KindFilter, Key: "x"}}, {Add: &Object{Provider: &Provider{Key: "p"}}},
		{Add: &Object{Filter: &Filter{Key: "bad", Layer: "NOPE", Conditions: []Condition{{Field: "ip_remote_port", Value: "0"}}}}}}); len(w) != 0 {
		t.Fatalf("warnings %q", w)
	}
}
