package fleet

import (
	"context"
	"errors"
	"strings"
	"testing"

	"fwp/engine"
	"fwp/mgmt"
)

func TestParseDocumentRules(t *testing.T) {
	for _, c := range []struct{ name, doc, want string }{
		{"web", "delete:\n  - {kind: filter, key: x}\n", "web:2: fleet: invalid policy document: a fleet document has no delete section"},
		{"web", "filters:\n  - {key: x, lifetime: static, layer: ALE_AUTH_CONNECT_V4, action: block}\n", `filter "x" is static; fleet objects are persistent`},
		{"web", "lifetime: dynamic\nproviders: [{key: p}]\n", `provider "p" is dynamic`},
		{"web", "providers: [{key: fwp.fleet}]\n", "reserved"},
		{"web", "provider_contexts: [{key: fwp.fleet.state, data: x}]\n", "reserved"},
		{"a/b", "", "document name"},
		{"", "", "document name"},
		{"web", "filters:\n  - {key: x, layer: NOPE, action: block}\n", "web:2:"},
		{"web", "nodes: [a]\n", "nodes must be a mapping"},
		{"web", "nodes: {hosts: [a], color: red}\n", `unknown nodes attribute "color"`},
		{"web", "nodes: {labels: [a]}\n", "labels must be a mapping"},
	} {
		_, err := ParseDocument(c.name, []byte(c.doc))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseDocument(%q, %q) = %v, want an error containing %q", c.name, c.doc, err, c.want)
		}
	}
	d, err := ParseDocument("web", []byte("lifetime: persistent\nnodes: {hosts: [h1], labels: {role: web, zone: a}}\nfilters:\n  - {key: x, layer: ALE_AUTH_CONNECT_V4, action: block}\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		n    Node
		want bool
	}{
		{Node{Name: "h1"}, true},
		{Node{Name: "h2"}, false},
		{Node{Name: "h2", Labels: map[string]string{"role": "web"}}, false},
		{Node{Name: "h2", Labels: map[string]string{"role": "web", "zone": "a", "x": "y"}}, true},
		{Node{Name: "h2", Labels: map[string]string{"role": "web", "zone": "b"}}, false},
	} {
		if got := d.Selects(c.n); got != c.want {
			t.Errorf("Selects(%+v) = %v, want %v", c.n, got, c.want)
		}
	}
	all, _ := ParseDocument("all", []byte("filters: []\n"))
	if !all.Selects(Node{Name: "anything"}) {
		t.Error("a document without a nodes section must select every host")
	}
}

func mustDoc(t testing.TB, name, s string) *Document {
	t.Helper()
	d, err := ParseDocument(name, []byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func newManager(t testing.TB, dir string) *mgmt.Manager {
	t.Helper()
	m, err := mgmt.New(engine.New(engine.Options{}), mgmt.Options{StateDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

func filterSet(t testing.TB, m *mgmt.Manager) map[string]string {
	t.Helper()
	fs, err := m.List(0, mgmt.KindFilter, mgmt.Template{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, o := range fs {
		out[o.Filter.Key] = o.Filter.Provider + "/" + o.Filter.Sublayer + "/" + o.Filter.Description + "/" + o.Filter.Lifetime.String()
	}
	return out
}

const docBase = `sublayers:
  - {key: corp, weight: 100}
filters:
  - {key: block-telnet, layer: ALE_AUTH_CONNECT_V4, sublayer: corp, action: block, description: v1, conditions: [{field: ip_remote_port, value: 23}]}
  - {key: block-smb, layer: ALE_AUTH_CONNECT_V4, sublayer: corp, action: block, conditions: [{field: ip_remote_port, value: 445}]}
`

func TestApplierDiffAndLocalObjects(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	m := newManager(t, dir)
	// A local object, added as fwpctl would.
	local := m.OpenSession(mgmt.SessionInfo{Name: "fwpctl"}).ID
	if _, err := m.Add(ctx, local, mgmt.Object{Filter: &mgmt.Filter{Key: "local-rule", Layer: "ALE_AUTH_CONNECT_V4", Action: "permit", Lifetime: mgmt.LifetimePersistent}}); err != nil {
		t.Fatal(err)
	}
	a, err := NewApplier(m, Node{Name: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := a.Apply(ctx, 5, []*Document{mustDoc(t, "base", docBase)})
	if err != nil || !r.Committed || r.Added != 3 {
		t.Fatalf("first apply: %+v %v", r, err)
	}
	got := filterSet(t, m)
	if got["block-telnet"] != "fwp.fleet/corp/v1/persistent" || got["local-rule"] != "/universal//persistent" || len(got) != 3 {
		t.Fatalf("filters: %v", got)
	}
	id := func(key string) uint64 {
		o, err := m.Get(0, mgmt.Ref{Kind: mgmt.KindFilter, Key: key})
		if err != nil {
			t.Fatal(err)
		}
		return o.Filter.ID
	}
	smbID := id("block-smb")
	// Change one filter: only it is replaced.
	r, err = a.Apply(ctx, 6, []*Document{mustDoc(t, "base", strings.Replace(docBase, "v1", "v2", 1))})
	if err != nil || r.Added != 1 || r.Deleted != 1 {
		t.Fatalf("second apply: %+v %v", r, err)
	}
	if id("block-smb") != smbID {
		t.Error("an unchanged filter was replaced")
	}
	// Change the sublayer: its filters are replaced with it.
	r, err = a.Apply(ctx, 7, []*Document{mustDoc(t, "base", strings.Replace(strings.Replace(docBase, "v1", "v2", 1), "weight: 100", "weight: 200", 1))})
	if err != nil || r.Added != 3 || r.Deleted != 3 {
		t.Fatalf("sublayer change: %+v %v", r, err)
	}
	// Nothing changes: no commit, the revision moves on.
	r, err = a.Apply(ctx, 8, []*Document{mustDoc(t, "base", strings.Replace(strings.Replace(docBase, "v1", "v2", 1), "weight: 100", "weight: 200", 1))})
	if err != nil || r.Committed || a.Revision() != 8 || a.State().Revision != 7 {
		t.Fatalf("no-op: %+v %v rev %d state %d", r, err, a.Revision(), a.State().Revision)
	}
	// A refused policy (a filter in a sublayer nobody adds) changes nothing.
	before := filterSet(t, m)
	bad := mustDoc(t, "extra", "filters:\n  - {key: orphan, layer: ALE_AUTH_CONNECT_V4, sublayer: nope, action: block}\n")
	if _, err := a.Apply(ctx, 9, []*Document{mustDoc(t, "base", docBase), bad}); err == nil || !strings.Contains(err.Error(), "extra:2") {
		t.Fatalf("a policy with a dangling reference: %v", err)
	}
	if after := filterSet(t, m); len(after) != len(before) || after["block-telnet"] != before["block-telnet"] {
		t.Fatalf("a refused policy changed the filters: %v -> %v", before, after)
	}
	// Two documents adding the same object.
	if _, err := a.Apply(ctx, 9, []*Document{mustDoc(t, "base", docBase), mustDoc(t, "copy", docBase)}); err == nil || !strings.Contains(err.Error(), "also added by base") {
		t.Fatalf("duplicate: %v", err)
	}
	// A fleet object named like a local one is refused, the local one kept.
	if _, err := a.Apply(ctx, 9, []*Document{mustDoc(t, "x", "filters:\n  - {key: local-rule, layer: ALE_AUTH_CONNECT_V4, action: block}\n")}); !errors.Is(err, engine.ErrAlreadyExists) {
		t.Fatalf("a fleet filter named like a local one: %v", err)
	}
	// An administrator deletes a fleet filter locally: the next revision
	// adds it again.
	if err := m.Delete(ctx, local, mgmt.Ref{Kind: mgmt.KindFilter, Key: "block-smb"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Apply(ctx, 10, []*Document{mustDoc(t, "base", docBase)}); err != nil {
		t.Fatal(err)
	}
	if _, ok := filterSet(t, m)["block-smb"]; !ok {
		t.Fatal("a fleet filter deleted locally was not added again")
	}
	// The fleet policy empties: its objects go, the local one stays.
	if _, err := a.Apply(ctx, 11, nil); err != nil {
		t.Fatal(err)
	}
	if got := filterSet(t, m); len(got) != 1 || got["local-rule"] == "" {
		t.Fatalf("after the fleet policy emptied: %v", got)
	}
	if _, err := a.Apply(ctx, 12, []*Document{mustDoc(t, "base", docBase)}); err != nil {
		t.Fatal(err)
	}
	a.Close()
	m.Close()
	// The state is persistent: a new manager on the same directory knows
	// what it enforces.
	m2 := newManager(t, dir)
	a2, err := NewApplier(m2, Node{Name: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	if a2.Revision() != 12 || a2.State().Hash != a.State().Hash || len(filterSet(t, m2)) != 3 {
		t.Fatalf("after restart: rev %d hash %s/%s filters %v", a2.Revision(), a2.State().Hash, a.State().Hash, filterSet(t, m2))
	}
	r, err = a2.Apply(ctx, 13, []*Document{mustDoc(t, "base", docBase)})
	if err != nil || r.Committed {
		t.Fatalf("the same policy after restart was applied again: %+v %v", r, err)
	}
}
