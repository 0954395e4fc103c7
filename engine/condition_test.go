package engine_test

import (
	"net/netip"
	"testing"

	"fwp/engine"
)

// Every match type over every value type, checked through a real filter and
// Classify (so through the compiled index as well as the matcher).

type condRow struct {
	name  string
	layer engine.LayerID
	conds []engine.Condition
	in    map[engine.FieldID]engine.Value
	match bool
}

var (
	u8    = engine.Uint8
	u16   = engine.Uint16
	u32   = engine.Uint32
	u64   = engine.Uint64
	str   = engine.String
	rng   = engine.Range
	v4    = engine.LayerALEAuthConnectV4
	v6    = engine.LayerALEAuthConnectV6
	empty engine.Value
)

func addr(s string) engine.Value   { return engine.Addr(netip.MustParseAddr(s)) }
func prefix(s string) engine.Value { return engine.Prefix(netip.MustParsePrefix(s)) }

func cond(f engine.FieldID, m engine.MatchType, v engine.Value) engine.Condition {
	return engine.Condition{Field: f, Match: m, Value: v}
}

// condMatrix expands one condition over several incoming values.
func condMatrix(name string, layer engine.LayerID, c engine.Condition, cases map[string]struct {
	in    engine.Value
	match bool
}) []condRow {
	var rows []condRow
	for cn, cs := range cases {
		rows = append(rows, condRow{name + "/" + cn, layer, []engine.Condition{c}, map[engine.FieldID]engine.Value{c.Field: cs.in}, cs.match})
	}
	return rows
}

type in = struct {
	in    engine.Value
	match bool
}

// intRows covers every match type valid for an integer field.
func intRows(typ string, f engine.FieldID, mk func(uint64) engine.Value, lo, mid, hi uint64) []condRow {
	var rows []condRow
	add := func(name string, m engine.MatchType, v engine.Value, cases map[string]in) {
		rows = append(rows, condMatrix(typ+"/"+name, v4, cond(f, m, v), cases)...)
	}
	add("equal", engine.MatchEqual, mk(mid), map[string]in{"same": {mk(mid), true}, "below": {mk(mid - 1), false}, "above": {mk(mid + 1), false}, "empty": {empty, false}})
	add("not_equal", engine.MatchNotEqual, mk(mid), map[string]in{"same": {mk(mid), false}, "other": {mk(hi), true}, "zero": {mk(0), true}, "empty": {empty, false}})
	add("greater", engine.MatchGreater, mk(mid), map[string]in{"same": {mk(mid), false}, "above": {mk(mid + 1), true}, "max": {mk(hi), true}, "below": {mk(lo), false}, "empty": {empty, false}})
	add("less", engine.MatchLess, mk(mid), map[string]in{"same": {mk(mid), false}, "below": {mk(mid - 1), true}, "zero": {mk(0), true}, "above": {mk(hi), false}, "empty": {empty, false}})
	add("greater_or_equal", engine.MatchGreaterOrEqual, mk(mid), map[string]in{"same": {mk(mid), true}, "above": {mk(hi), true}, "below": {mk(mid - 1), false}, "empty": {empty, false}})
	add("less_or_equal", engine.MatchLessOrEqual, mk(mid), map[string]in{"same": {mk(mid), true}, "below": {mk(0), true}, "above": {mk(mid + 1), false}, "empty": {empty, false}})
	add("range", engine.MatchRange, rng(mk(lo), mk(mid)), map[string]in{"low end": {mk(lo), true}, "high end": {mk(mid), true}, "inside": {mk(lo + 1), true},
		"below": {mk(lo - 1), false}, "above": {mk(mid + 1), false}, "empty": {empty, false}})
	add("range single", engine.MatchRange, rng(mk(mid), mk(mid)), map[string]in{"it": {mk(mid), true}, "next": {mk(mid + 1), false}})
	add("range whole", engine.MatchRange, rng(mk(0), mk(hi)), map[string]in{"zero": {mk(0), true}, "max": {mk(hi), true}, "empty": {empty, false}})
	add("flags_all_set", engine.MatchFlagsAllSet, mk(0b0110), map[string]in{"exact": {mk(0b0110), true}, "more": {mk(0b1111), true}, "one": {mk(0b0100), false}, "none": {mk(0), false}, "empty": {empty, false}})
	add("flags_any_set", engine.MatchFlagsAnySet, mk(0b0110), map[string]in{"one": {mk(0b0100), true}, "other": {mk(0b1001), false}, "none": {mk(0), false}, "empty": {empty, false}})
	add("flags_none_set", engine.MatchFlagsNoneSet, mk(0b0110), map[string]in{"other": {mk(0b1001), true}, "zero": {mk(0), true}, "one": {mk(0b0010), false}, "empty": {empty, false}})
	return rows
}

// addrRows covers every match type valid for an address field, on one family.
func addrRows(fam string, layer engine.LayerID, lo, a, b, hi, out, net, net0, host string) []condRow {
	var rows []condRow
	f := engine.FieldIPRemoteAddress
	add := func(name string, m engine.MatchType, v engine.Value, cases map[string]in) {
		rows = append(rows, condMatrix("addr "+fam+"/"+name, layer, cond(f, m, v), cases)...)
	}
	add("equal", engine.MatchEqual, addr(a), map[string]in{"same": {addr(a), true}, "other": {addr(b), false}, "empty": {empty, false}})
	add("not_equal", engine.MatchNotEqual, addr(a), map[string]in{"same": {addr(a), false}, "other": {addr(b), true}, "empty": {empty, false}})
	add("greater", engine.MatchGreater, addr(a), map[string]in{"same": {addr(a), false}, "above": {addr(b), true}, "below": {addr(lo), false}, "empty": {empty, false}})
	add("less", engine.MatchLess, addr(b), map[string]in{"same": {addr(b), false}, "below": {addr(a), true}, "above": {addr(hi), false}})
	add("greater_or_equal", engine.MatchGreaterOrEqual, addr(a), map[string]in{"same": {addr(a), true}, "above": {addr(hi), true}, "below": {addr(lo), false}})
	add("less_or_equal", engine.MatchLessOrEqual, addr(a), map[string]in{"same": {addr(a), true}, "below": {addr(lo), true}, "above": {addr(b), false}})
	add("range", engine.MatchRange, rng(addr(a), addr(b)), map[string]in{"low end": {addr(a), true}, "high end": {addr(b), true},
		"below": {addr(lo), false}, "above": {addr(hi), false}, "empty": {empty, false}})
	// A prefix value: EQUAL and PREFIX test membership.
	add("equal prefix", engine.MatchEqual, prefix(net), map[string]in{"inside": {addr(a), true}, "outside": {addr(out), false}, "empty": {empty, false}})
	add("not_equal prefix", engine.MatchNotEqual, prefix(net), map[string]in{"inside": {addr(a), false}, "outside": {addr(out), true}, "empty": {empty, false}})
	add("prefix", engine.MatchPrefix, prefix(net), map[string]in{"inside": {addr(b), true}, "outside": {addr(out), false}, "empty": {empty, false}})
	add("not_prefix", engine.MatchNotPrefix, prefix(net), map[string]in{"inside": {addr(b), false}, "outside": {addr(out), true}, "empty": {empty, false}})
	add("prefix /0", engine.MatchPrefix, prefix(net0), map[string]in{"any": {addr(out), true}, "empty": {empty, false}})
	add("prefix host", engine.MatchEqual, prefix(host), map[string]in{"it": {addr(a), true}, "neighbour": {addr(b), false}})
	return rows
}

func condRows() []condRow {
	var rows []condRow
	rows = append(rows, intRows("uint8", engine.FieldIPProtocol, func(n uint64) engine.Value { return u8(uint8(n)) }, 3, 17, 0xff)...)
	rows = append(rows, intRows("uint16", engine.FieldIPRemotePort, func(n uint64) engine.Value { return u16(uint16(n)) }, 22, 8080, 0xffff)...)
	rows = append(rows, intRows("uint16 local", engine.FieldIPLocalPort, func(n uint64) engine.Value { return u16(uint16(n)) }, 1024, 40000, 0xffff)...)
	rows = append(rows, intRows("uint32", engine.FieldALEUserID, func(n uint64) engine.Value { return u32(uint32(n)) }, 100, 1000, 0xffffffff)...)
	rows = append(rows, intRows("uint32 flags", engine.FieldFlags, func(n uint64) engine.Value { return u32(uint32(n)) }, 1, 64, 0xffffffff)...)
	rows = append(rows, intRows("uint64", engine.FieldCgroupID, u64, 1<<32, 1<<40, 1<<64-1)...)
	rows = append(rows, addrRows("v4", v4, "10.0.0.1", "10.1.2.3", "10.1.2.200", "11.0.0.1", "192.168.1.1", "10.1.2.0/24", "0.0.0.0/0", "10.1.2.3/32")...)
	rows = append(rows, addrRows("v6", v6, "2001:db8::1", "2001:db8:1::10", "2001:db8:1::ff", "2001:db9::1", "fd00::1", "2001:db8:1::/64", "::/0", "2001:db8:1::10/128")...)

	app := engine.FieldALEAppID
	addS := func(name string, m engine.MatchType, v engine.Value, cases map[string]in) {
		rows = append(rows, condMatrix("string/"+name, v4, cond(app, m, v), cases)...)
	}
	addS("equal", engine.MatchEqual, str("/usr/bin/curl"), map[string]in{"same": {str("/usr/bin/curl"), true}, "case": {str("/USR/bin/curl"), false},
		"longer": {str("/usr/bin/curl2"), false}, "empty": {empty, false}})
	addS("not_equal", engine.MatchNotEqual, str("/usr/bin/curl"), map[string]in{"same": {str("/usr/bin/curl"), false}, "other": {str("/usr/bin/wget"), true}, "empty": {empty, false}})
	addS("equal_case_insensitive", engine.MatchEqualCaseInsensitive, str("/usr/bin/Curl"), map[string]in{"lower": {str("/usr/bin/curl"), true}, "upper": {str("/USR/BIN/CURL"), true},
		"other": {str("/usr/bin/curly"), false}, "empty": {empty, false}})
	addS("prefix", engine.MatchPrefix, str("/usr/"), map[string]in{"under": {str("/usr/bin/curl"), true}, "itself": {str("/usr/"), true},
		"elsewhere": {str("/opt/usr/x"), false}, "shorter": {str("/us"), false}, "empty": {empty, false}})
	addS("not_prefix", engine.MatchNotPrefix, str("/usr/"), map[string]in{"under": {str("/usr/bin/curl"), false}, "elsewhere": {str("/opt/x"), true}, "empty": {empty, false}})
	rows = append(rows, condMatrix("string cgroup/prefix", v4, cond(engine.FieldCgroupPath, engine.MatchPrefix, str("/system.slice/")),
		map[string]in{"service": {str("/system.slice/nginx.service"), true}, "user": {str("/user.slice/user-1000.slice"), false}})...)

	// Same field ORed, different fields ANDed.
	port := func(p uint16) engine.Condition { return cond(engine.FieldIPRemotePort, engine.MatchEqual, u16(p)) }
	proto := func(p uint8) engine.Condition { return cond(engine.FieldIPProtocol, engine.MatchEqual, u8(p)) }
	type vals = map[engine.FieldID]engine.Value
	rp, pr := engine.FieldIPRemotePort, engine.FieldIPProtocol
	or := []engine.Condition{port(80), port(443)}
	and := []engine.Condition{port(80), proto(6)}
	both := []engine.Condition{port(80), proto(6), port(443), proto(17)}
	mixed := []engine.Condition{port(80), cond(rp, engine.MatchRange, rng(u16(8000), u16(8999)))}
	rows = append(rows,
		condRow{"or/first", v4, or, vals{rp: u16(80)}, true},
		condRow{"or/second", v4, or, vals{rp: u16(443)}, true},
		condRow{"or/neither", v4, or, vals{rp: u16(22)}, false},
		condRow{"or/empty", v4, or, vals{}, false},
		condRow{"or mixed/exact", v4, mixed, vals{rp: u16(80)}, true},
		condRow{"or mixed/range", v4, mixed, vals{rp: u16(8123)}, true},
		condRow{"or mixed/neither", v4, mixed, vals{rp: u16(443)}, false},
		condRow{"and/both", v4, and, vals{rp: u16(80), pr: u8(6)}, true},
		condRow{"and/port only", v4, and, vals{rp: u16(80), pr: u8(17)}, false},
		condRow{"and/proto only", v4, and, vals{rp: u16(443), pr: u8(6)}, false},
		condRow{"and/proto missing", v4, and, vals{rp: u16(80)}, false},
		condRow{"and of ors/80 udp", v4, both, vals{rp: u16(80), pr: u8(17)}, true},
		condRow{"and of ors/443 tcp", v4, both, vals{rp: u16(443), pr: u8(6)}, true},
		condRow{"and of ors/443 icmp", v4, both, vals{rp: u16(443), pr: u8(1)}, false},
		condRow{"and of ors/22 tcp", v4, both, vals{rp: u16(22), pr: u8(6)}, false},
		condRow{"no conditions match everything", v4, nil, vals{}, true},
		// A v4-mapped v6 incoming address is seen as v4 on a v4 layer.
		condRow{"v4-mapped incoming", v4, []engine.Condition{cond(engine.FieldIPRemoteAddress, engine.MatchEqual, prefix("10.0.0.0/8"))},
			vals{engine.FieldIPRemoteAddress: addr("::ffff:10.1.1.1")}, true},
		// An incoming address of the other family never falls in a prefix.
		condRow{"other family incoming", v4, []engine.Condition{cond(engine.FieldIPRemoteAddress, engine.MatchPrefix, prefix("0.0.0.0/0"))},
			vals{engine.FieldIPRemoteAddress: addr("2001:db8::1")}, false},
	)
	return rows
}

func TestConditionMatch(t *testing.T) {
	for _, r := range condRows() {
		t.Run(r.name, func(t *testing.T) {
			e := engine.New(engine.Options{})
			var id engine.FilterID
			err := e.Update(func(tx *engine.Txn) (err error) {
				id, err = tx.AddFilter(engine.Filter{Layer: r.layer, Conditions: r.conds, Action: engine.Action{Type: engine.ActionBlock}})
				return err
			})
			if err != nil {
				t.Fatalf("conditions %v: %v", r.conds, err)
			}
			var vs engine.Values
			for f, v := range r.in {
				vs.Set(f, v)
			}
			res := e.Classify(r.layer, &vs, nil)
			if got := res.Filter == id; got != r.match {
				t.Fatalf("conditions %v, values {%s}: matched %v, want %v (%s)", r.conds, vs.String(), got, r.match, res)
			}
			if got := res.Action == engine.ActionBlock; got != r.match {
				t.Fatalf("action %s with match %v", res.Action, r.match)
			}
			// Best terminating match agrees with Classify.
			best, err := e.BestTerminatingMatch(r.layer, &vs)
			if err != nil || (best == id) != r.match {
				t.Fatalf("best terminating match %s, %v; want match %v", best, err, r.match)
			}
		})
	}
}

// Filters of every value type in one layer, so the index serves them side
// by side: each tuple selects exactly the filters it should.
func TestConditionIndexMix(t *testing.T) {
	e := engine.New(engine.Options{})
	type spec struct {
		key  string
		cond engine.Condition
	}
	specs := []spec{
		{"port80", cond(engine.FieldIPRemotePort, engine.MatchEqual, u16(80))},
		{"ports8k", cond(engine.FieldIPRemotePort, engine.MatchRange, rng(u16(8000), u16(8999)))},
		{"lport", cond(engine.FieldIPLocalPort, engine.MatchEqual, u16(5353))},
		{"net10", cond(engine.FieldIPRemoteAddress, engine.MatchPrefix, prefix("10.0.0.0/8"))},
		{"host", cond(engine.FieldIPRemoteAddress, engine.MatchEqual, addr("192.168.1.1"))},
		{"lnet", cond(engine.FieldIPLocalAddress, engine.MatchEqual, prefix("172.16.0.0/12"))},
		{"udp", cond(engine.FieldIPProtocol, engine.MatchEqual, u8(17))},
		{"app", cond(engine.FieldALEAppID, engine.MatchEqual, str("/bin/nc"))},
		{"uid", cond(engine.FieldALEUserID, engine.MatchGreaterOrEqual, u32(1000))},
	}
	ids := map[engine.FilterID]string{}
	err := e.Update(func(tx *engine.Txn) error {
		for i, s := range specs {
			// Distinct explicit weights: every filter is its own sublayer's
			// only candidate, so the Trace lists all matching filters.
			sl, err := tx.AddSublayer(engine.Sublayer{Weight: uint16(100 - i)})
			if err != nil {
				return err
			}
			id, err := tx.AddFilter(engine.Filter{Layer: v4, Sublayer: sl, Conditions: []engine.Condition{s.cond}, Action: engine.Action{Type: engine.ActionPermit}})
			if err != nil {
				return err
			}
			ids[id] = s.key
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		proto         uint8
		local, remote string
		app           string
		uid           uint32
		want          []string
	}{
		{6, "172.16.1.1:5353", "10.2.3.4:80", "/bin/nc", 1000, []string{"port80", "lport", "net10", "lnet", "app", "uid"}},
		{17, "192.0.2.1:1", "192.168.1.1:8500", "/bin/sh", 0, []string{"ports8k", "host", "udp"}},
		{6, "192.0.2.1:1", "192.168.1.2:9000", "", 999, nil},
	}
	for _, tt := range tests {
		var vs engine.Values
		vs.SetTuple(tt.proto, netip.MustParseAddrPort(tt.local), netip.MustParseAddrPort(tt.remote))
		if tt.app != "" {
			vs.Set(engine.FieldALEAppID, str(tt.app))
		}
		vs.Set(engine.FieldALEUserID, u32(tt.uid))
		tr, err := e.Explain(v4, &vs, nil)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, s := range tr.Steps {
			got = append(got, ids[s.Filter])
		}
		if len(got) != len(tt.want) {
			t.Fatalf("%s: matched %v, want %v", vs.String(), got, tt.want)
		}
		for i := range got {
			if got[i] != tt.want[i] {
				t.Fatalf("%s: matched %v, want %v", vs.String(), got, tt.want)
			}
		}
	}
}

// An application's rule with a remote port RANGE (indexed per application
// by port segments) matches exactly the ports of its range, bounds
// included, among overlapping ranges of the same application and others.
func TestAppPortRangeBoundaries(t *testing.T) {
	e := engine.New(engine.Options{})
	type rule struct {
		app    string
		lo, hi uint16
	}
	rules := []rule{{"a", 100, 200}, {"a", 150, 300}, {"a", 400, 400}, {"b", 100, 200}}
	ids := map[engine.FilterID]rule{}
	if err := e.Update(func(tx *engine.Txn) error {
		for _, r := range rules {
			id, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionBlock},
				Conditions: []engine.Condition{
					{Field: engine.FieldALEAppID, Match: engine.MatchEqual, Value: engine.String(r.app)},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(r.lo), engine.Uint16(r.hi))},
				}})
			if err != nil {
				return err
			}
			ids[id] = r
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, app := range []string{"a", "b", "c"} {
		for port := uint16(90); port <= 410; port++ {
			var vs engine.Values
			vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.AddrPortFrom(netip.MustParseAddr("10.1.1.1"), port))
			vs.Set(engine.FieldALEAppID, engine.String(app))
			res := e.Classify(engine.LayerALEAuthConnectV4, &vs, nil)
			want := false
			for _, r := range rules {
				want = want || r.app == app && r.lo <= port && port <= r.hi
			}
			if got := res.Action == engine.ActionBlock; got != want {
				t.Fatalf("app %s port %d: blocked %v, want %v (%v)", app, port, got, want, res)
			}
			if want {
				if r := ids[res.Filter]; r.app != app || port < r.lo || port > r.hi {
					t.Fatalf("app %s port %d decided by %+v", app, port, r)
				}
			}
		}
	}
}
