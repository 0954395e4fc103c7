package policy

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"fwp/engine"
	"fwp/mgmt"
)

const good = `lifetime: persistent
providers:
  - {key: acme, name: ACME, description: "the vendor"}
provider_contexts:
  - {key: c1, provider: acme, data: "127.0.0.1:3128"}
  - {key: c2, data_hex: "0x0a0b"}
sublayers:
  - {key: s1, provider: acme, weight: 100, lifetime: static}
callouts:
  - {key: co, layer: ALE_CONNECT_REDIRECT_V4, flags: [uses_provider_context]}
filters:
  - key: f1
    layer: ALE_AUTH_CONNECT_V4
    sublayer: s1
    weight: index:3
    conditions:
      - {field: ip_remote_port, match: range, value: 80-443}
      - {field: ip_remote_address, value: 10.0.0.0/8}
    action: block
    flags: [clear_action_right]
  - key: f2
    layer: FWPM_LAYER_ALE_CONNECT_REDIRECT_V4
    action: callout_terminating
    callout: co
    provider_context: c1
delete:
  - {kind: filter, key: old}
`

func TestParseGood(t *testing.T) {
	p, err := Parse("p.yaml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, op := range p.Ops {
		if op.Delete != nil {
			got = append(got, op.Pos+" delete "+op.Delete.String())
			continue
		}
		got = append(got, op.Pos+" "+op.Add.Kind().String()+" "+op.Add.Key())
	}
	want := []string{"p.yaml:27 delete filter \"old\"", "p.yaml:3 provider acme", "p.yaml:5 provider_context c1",
		"p.yaml:6 provider_context c2", "p.yaml:8 sublayer s1", "p.yaml:10 callout co", "p.yaml:12 filter f1", "p.yaml:21 filter f2"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("ops:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	f := p.Ops[6].Add.Filter
	if f.Lifetime != mgmt.LifetimePersistent || f.Weight != "index:3" || len(f.Conditions) != 2 || f.Conditions[0].Value != "80-443" || f.Flags[0] != "clear_action_right" {
		t.Fatalf("filter: %+v", f)
	}
	if p.Ops[4].Add.Sublayer.Lifetime != mgmt.LifetimeStatic || p.Ops[4].Add.Sublayer.Weight != 100 {
		t.Fatalf("sublayer: %+v", p.Ops[4].Add.Sublayer)
	}
	if string(p.Ops[3].Add.ProviderContext.Data) != "\x0a\x0b" {
		t.Fatal("data_hex")
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name, src string
		line      int
		err       error
		msg       string
	}{
		{"syntax", "filters:\n  - key: [\n", 2, nil, "YAML syntax"},
		{"not a mapping", "- a\n- b\n", 1, nil, "mapping of sections"},
		{"unknown section", "filter:\n  - {}\n", 2, nil, "unknown section"},
		{"unknown layer", "filters:\n  - key: f\n    layer: NOPE\n    action: block\n", 3, engine.ErrInvalidLayer, "NOPE"},
		{"field not in layer", "filters:\n  - key: f\n    layer: ALE_BIND_REDIRECT_V4\n    action: block\n    conditions:\n      - {field: ip_remote_port, value: 1}\n", 6, engine.ErrInvalidField, "ip_remote_port"},
		{"wrong value type", "filters:\n  - key: f\n    layer: ALE_AUTH_CONNECT_V4\n    action: block\n    conditions:\n      - field: ip_remote_port\n        value: http\n", 7, engine.ErrInvalidValue, "uint16"},
		{"value is a list", "filters:\n  - key: f\n    layer: ALE_AUTH_CONNECT_V4\n    action: block\n    conditions:\n      - field: ip_remote_port\n        value: [1, 2]\n", 7, engine.ErrTypeMismatch, "single value"},
		{"port too big", "filters:\n  - key: f\n    layer: ALE_AUTH_CONNECT_V4\n    action: block\n    conditions:\n      - {field: ip_remote_port, value: 70000}\n", 6, engine.ErrInvalidValue, "70000"},
		{"bad match", "filters:\n  - key: f\n    layer: ALE_AUTH_CONNECT_V4\n    action: block\n    conditions:\n      - {field: ip_remote_port, match: like, value: 1}\n", 6, engine.ErrInvalidMatchType, "like"},
		{"bad action", "filters:\n  - key: f\n    layer: ALE_AUTH_CONNECT_V4\n    action: allow\n", 4, engine.ErrInvalidAction, "allow"},
		{"no action", "filters:\n  - key: f\n    layer: ALE_AUTH_CONNECT_V4\n", 2, engine.ErrInvalidAction, "needs an action"},
		{"bad weight", "filters:\n  - key: f\n    layer: ALE_AUTH_CONNECT_V4\n    action: block\n    weight: index:16\n", 5, engine.ErrInvalidWeight, "0..15"},
		{"bad flag", "filters:\n  - key: f\n    layer: ALE_AUTH_CONNECT_V4\n    action: block\n    flags: [loud]\n", 5, engine.ErrInvalidFlags, "loud"},
		{"no key", "providers:\n  - {name: x}\n", 2, engine.ErrInvalidArgument, "needs a key"},
		{"dup attribute", "providers:\n  - key: a\n    key: b\n", 3, nil, "twice"},
		{"unknown attribute", "sublayers:\n  - {key: s, wieght: 3}\n", 2, nil, "wieght"},
		{"sublayer weight", "sublayers:\n  - {key: s, weight: 70000}\n", 2, engine.ErrInvalidWeight, "65535"},
		{"bad lifetime", "lifetime: forever\n", 1, engine.ErrInvalidArgument, "forever"},
		{"bad hex", "provider_contexts:\n  - {key: c, data_hex: zz}\n", 2, engine.ErrInvalidValue, "hex"},
		{"list expected", "filters: {key: f}\n", 1, nil, "must be a list"},
		{"delete kind", "delete:\n  - {kind: widget, key: x}\n", 2, engine.ErrInvalidArgument, "widget"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse("p.yaml", []byte(c.src))
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("want *Error, got %T %v", err, err)
			}
			if !errors.Is(err, mgmt.ErrInvalidPolicy) {
				t.Fatalf("not ErrInvalidPolicy: %v", err)
			}
			if c.err != nil && !errors.Is(err, c.err) {
				t.Fatalf("want %v, got %v", c.err, err)
			}
			if pe.Line != c.line || !strings.HasPrefix(err.Error(), "p.yaml:") || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got line %d %q, want line %d containing %q", pe.Line, err, c.line, c.msg)
			}
		})
	}
}

func TestParseEmptyAndTooLarge(t *testing.T) {
	for _, src := range []string{"", "# nothing\n", "---\n", "filters:\n"} {
		p, err := Parse("e.yaml", []byte(src))
		if err != nil || len(p.Ops) != 0 {
			t.Fatalf("%q: %v %v", src, p, err)
		}
	}
	if _, err := Parse("big.yaml", make([]byte, MaxSize+1)); !errors.Is(err, mgmt.ErrTooLarge) {
		t.Fatalf("too large: %v", err)
	}
}

func FuzzParsePolicy(f *testing.F) {
	f.Add(good)
	f.Add("filters:\n  - key: f\n    layer: ALE_AUTH_CONNECT_V6\n    action: permit\n    conditions:\n      - {field: ip_remote_address, value: '::1/128'}\n")
	f.Add("a: &x [*x]\n")
	f.Add("providers: [{key: a}, {key: b, lifetime: boot-time}]\n")
	f.Add("delete: [{kind: context, key: x}]\n")
	f.Add("filters:\n  - {key: f, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, values: [1, 2, 3]}]}\n")
	f.Add("filters:\n  - {key: f, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ale_app_id, match: prefix, value: /usr}]}\n")
	f.Fuzz(func(t *testing.T, src string) {
		p, err := Parse("fuzz.yaml", []byte(src))
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) || pe.Line < 1 || !errors.Is(err, mgmt.ErrInvalidPolicy) {
				t.Fatalf("untyped or unpositioned error: %T %v", err, err)
			}
			return
		}
		for _, op := range p.Ops {
			if (op.Add == nil) == (op.Delete == nil) || !strings.HasPrefix(op.Pos, "fuzz.yaml:") {
				t.Fatalf("bad op %+v", op)
			}
			// What the parser accepts, the manager's own checks accept
			// too (up to references, which need the engine's state).
			if op.Add != nil && op.Add.Filter != nil {
				f := op.Add.Filter
				l, err := mgmt.ParseLayer(f.Layer)
				if err != nil {
					t.Fatalf("accepted layer %q: %v", f.Layer, err)
				}
				for _, c := range f.Conditions {
					vals := c.Values
					if len(vals) == 0 {
						vals = []string{c.Value}
					}
					for _, v := range vals {
						one := c
						one.Value, one.Values = v, nil
						if _, err := mgmt.ParseCondition(l, one); err != nil {
							t.Fatalf("accepted condition %+v: %v", c, err)
						}
					}
				}
			}
		}
	})
}

// Hostile shapes: deep nesting and alias bombs end in a positioned, typed
// error, without expanding anything.
func TestParseHostileShapes(t *testing.T) {
	lol := "a: &a [x, x, x, x, x, x, x, x, x]\n"
	for i, prev := 0, "a"; i < 9; i++ {
		name := fmt.Sprintf("b%d", i)
		lol += fmt.Sprintf("%s: &%s [*%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s]\n", name, name, prev, prev, prev, prev, prev, prev, prev, prev, prev)
		prev = name
	}
	for name, src := range map[string]string{
		"deep flow":      "filters: " + strings.Repeat("[", 20000) + strings.Repeat("]", 20000),
		"deep mapping":   "filters:\n  - key: " + strings.Repeat("{a: ", 20000) + "x" + strings.Repeat("}", 20000),
		"deep block":     "filters:\n" + deepBlock(3000),
		"billion laughs": lol + "filters: *b8\n",
		"alias as key":   "filters:\n  - &k key: a\n    *k : b\n",
	} {
		_, err := Parse("h.yaml", []byte(src))
		var pe *Error
		if err == nil || !errors.As(err, &pe) || !errors.Is(err, mgmt.ErrInvalidPolicy) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func deepBlock(n int) string {
	var b strings.Builder
	for i := range n {
		b.WriteString(strings.Repeat(" ", 2+i) + "- \n")
	}
	return b.String()
}

func TestParseNodes(t *testing.T) {
	p, err := Parse("n.yaml", []byte("nodes:\n  hosts: [a, b]\n  labels: {role: web}\nfilters: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	if p.Nodes == nil || strings.Join(p.Nodes.Hosts, ",") != "a,b" || p.Nodes.Labels["role"] != "web" {
		t.Fatalf("nodes: %+v", p.Nodes)
	}
	if !p.Nodes.Selects("b", nil) || p.Nodes.Selects("c", map[string]string{"role": "db"}) || !p.Nodes.Selects("c", map[string]string{"role": "web"}) {
		t.Fatal("selection")
	}
	if p, _ := Parse("n.yaml", []byte("filters: []\n")); p.Nodes != nil || !p.Nodes.Selects("any", nil) {
		t.Fatal("no nodes section: nil, selecting every host")
	}
	for _, c := range []struct{ doc, want string }{
		{"nodes: {hosts: ['']}\n", "n.yaml:1:16: an empty host name"},
		{"nodes: {labels: {'': x}}\n", "an empty label name"},
		{"nodes: {hosts: [{a: b}]}\n", "want a single value"},
		{"nodes: 3\n", "nodes must be a mapping"},
	} {
		if _, err := Parse("n.yaml", []byte(c.doc)); err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, mgmt.ErrInvalidPolicy) {
			t.Errorf("Parse(%q) = %v, want %q", c.doc, err, c.want)
		}
	}
}

const listPolicy = `filters:
  - key: blocklist
    layer: ALE_AUTH_CONNECT_V4
    action: block
    conditions:
      - {field: ip_remote_address, match: equal, values_file: lists/drop.txt}
      - {field: ip_remote_port, values: [80, 443]}
`

func TestParseLists(t *testing.T) {
	names, err := ValuesFileNames("p.yaml", []byte(listPolicy))
	if err != nil || fmt.Sprint(names) != "[lists/drop.txt]" {
		t.Fatalf("ValuesFileNames: %v %v", names, err)
	}
	drop := "; Spamhaus-style comments\n10.0.0.0/8 ; SBL1\n\n  192.0.2.1  # a host\n192.0.2.1\n"
	p, err := ParseWith("p.yaml", []byte(listPolicy), Options{ValuesFiles: map[string][]byte{"lists/drop.txt": []byte(drop)}})
	if err != nil {
		t.Fatal(err)
	}
	f := p.Ops[0].Add.Filter
	// EQUAL lists on address and integer fields are engine lists.
	if got := fmt.Sprint(f.Conditions[0].List, f.Conditions[1].List, f.Conditions[0].List.Given()); got != "[192.0.2.1, 10.0.0.0/8] [80, 443] 3" {
		t.Fatalf("lists: %s", got)
	}
	// Other lists keep their values, one condition each.
	p, err = Parse("p.yaml", []byte("filters:\n  - {key: f, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ale_app_id, values: [/a, /b]}]}\n"))
	if err != nil || fmt.Sprint(p.Ops[0].Add.Filter.Conditions[0].Values) != "[/a /b]" {
		t.Fatalf("app id list: %v %v", p, err)
	}
	for _, c := range []struct {
		name, policy, file, want string
	}{
		{"file not sent", listPolicy, "", `p.yaml:6:63: values file "lists/drop.txt" was not sent with the policy`},
		{"bad line", listPolicy, "10.0.0.1\n\nnope\n", "lists/drop.txt:3:1:"},
		{"empty list", listPolicy, "# nothing\n", "the list has no values"},
		{"v6 on a v4 layer", listPolicy, "10.0.0.1\n2001:db8::/32\n", "lists/drop.txt:2:1: fwp: invalid value: address 2001:db8::/32 does not belong on layer ALE_AUTH_CONNECT_V4"},
		{"bad inline value", "filters:\n  - {key: f, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, values: [1, x]}]}\n", "", "p.yaml:2:"},
		{"value and values", "filters:\n  - {key: f, layer: ALE_AUTH_CONNECT_V4, action: block, conditions: [{field: ip_remote_port, value: 1, values: [1]}]}\n", "", "one of value, values or values_file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			files := map[string][]byte{}
			if c.file != "" {
				files["lists/drop.txt"] = []byte(c.file)
			}
			_, err := ParseWith("p.yaml", []byte(c.policy), Options{ValuesFiles: files})
			var pe *Error
			if err == nil || !errors.As(err, &pe) || !errors.Is(err, mgmt.ErrInvalidPolicy) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want a policy error containing %q", err, c.want)
			}
		})
	}
}

// FuzzValuesFile: any values file ends in its values or in an error
// naming the file and line; never a panic.
func FuzzValuesFile(f *testing.F) {
	f.Add([]byte("10.0.0.0/8\n192.0.2.1 # c\n"))
	f.Add([]byte("; x\n\n::1\n"))
	f.Add([]byte("1.2.3.4;\n\xff\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParseWith("p.yaml", []byte(listPolicy), Options{ValuesFiles: map[string][]byte{"lists/drop.txt": data}})
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) || pe.Line < 1 || !errors.Is(err, mgmt.ErrInvalidPolicy) {
				t.Fatalf("untyped or unpositioned error: %T %v", err, err)
			}
			return
		}
		l := p.Ops[0].Add.Filter.Conditions[0].List
		if l == nil || l.Len() == 0 || l.Has6() {
			t.Fatalf("accepted %q as %v", data, l)
		}
		for v := range l.Values() {
			if _, err := mgmt.ParseCondition(engine.LayerALEAuthConnectV4, mgmt.Condition{Field: "ip_remote_address", Value: v.String()}); err != nil {
				t.Fatalf("accepted %q: %v", v, err)
			}
		}
	})
}
