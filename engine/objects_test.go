package engine_test

import (
	"slices"
	"testing"

	"fwp/engine"
)

// objWorld: two providers, each with a sublayer, a context and callouts on
// two layers, and filters spread over them.
type objWorld struct {
	e          *engine.Engine
	p1, p2     engine.ProviderID
	s1, s2     engine.SublayerID
	c1, c2     engine.ProviderContextID
	co1, co2   engine.CalloutID // p1 on v4, p2 on v6
	co3        engine.CalloutID // p1 on v6
	fBlock     engine.FilterID  // v4, s1, p1, weight 10
	fPermit    engine.FilterID  // v4, s1, p1, weight 20
	fCallout   engine.FilterID  // v4, s2, p2, co1
	fV6        engine.FilterID  // v6, universal, p2, co2
	fV6Inspect engine.FilterID  // v6, s2, no provider, co3
}

func newObjWorld(t *testing.T) *objWorld {
	t.Helper()
	w := &objWorld{e: engine.New(engine.Options{})}
	err := w.e.Update(func(tx *engine.Txn) (err error) {
		// Added out of key order, so that sorting by ID is visible.
		if w.p1, err = tx.AddProvider(engine.Provider{Key: "zeta", Name: "Zeta", Description: "first"}); err != nil {
			return err
		}
		if w.p2, err = tx.AddProvider(engine.Provider{Key: "alpha", Name: "Alpha"}); err != nil {
			return err
		}
		if w.s1, err = tx.AddSublayer(engine.Sublayer{Key: "s1", Provider: w.p1, Weight: 10}); err != nil {
			return err
		}
		if w.s2, err = tx.AddSublayer(engine.Sublayer{Key: "s2", Provider: w.p2, Weight: 300}); err != nil {
			return err
		}
		if w.c1, err = tx.AddProviderContext(engine.ProviderContext{Key: "c1", Provider: w.p1, Data: []byte("one")}); err != nil {
			return err
		}
		if w.c2, err = tx.AddProviderContext(engine.ProviderContext{Key: "c2", Provider: w.p2, Data: []byte("two")}); err != nil {
			return err
		}
		if w.co1, err = tx.AddCallout(engine.Callout{Key: "co1", Provider: w.p1, Layer: v4}); err != nil {
			return err
		}
		if w.co2, err = tx.AddCallout(engine.Callout{Key: "co2", Provider: w.p2, Layer: v6, Flags: engine.CalloutConditionalOnFlow}); err != nil {
			return err
		}
		if w.co3, err = tx.AddCallout(engine.Callout{Key: "co3", Provider: w.p1, Layer: v6}); err != nil {
			return err
		}
		if w.fBlock, err = tx.AddFilter(engine.Filter{Key: "block", Name: "b", Layer: v4, Sublayer: w.s1, Provider: w.p1, Weight: engine.WeightExact(10),
			Action: engine.Action{Type: engine.ActionBlock}, Conditions: []engine.Condition{condPort80, condTCP}}); err != nil {
			return err
		}
		if w.fPermit, err = tx.AddFilter(engine.Filter{Key: "permit", Layer: v4, Sublayer: w.s1, Provider: w.p1, Weight: engine.WeightExact(20),
			Action: engine.Action{Type: engine.ActionPermit}}); err != nil {
			return err
		}
		if w.fCallout, err = tx.AddFilter(engine.Filter{Layer: v4, Sublayer: w.s2, Provider: w.p2, ProviderContext: w.c1,
			Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: w.co1}}); err != nil {
			return err
		}
		if w.fV6, err = tx.AddFilter(engine.Filter{Key: "v6", Layer: v6, Provider: w.p2, ProviderContext: w.c2,
			Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: w.co2}}); err != nil {
			return err
		}
		w.fV6Inspect, err = tx.AddFilter(engine.Filter{Layer: v6, Sublayer: w.s2, Action: engine.Action{Type: engine.ActionCalloutInspection, Callout: w.co3}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func filterIDs(fs []engine.Filter) []engine.FilterID {
	var ids []engine.FilterID
	for _, f := range fs {
		ids = append(ids, f.ID)
	}
	return ids
}

func TestObjectsGet(t *testing.T) {
	w := newObjWorld(t)
	v := w.e.View()

	p, err := v.Provider(w.p1)
	if err != nil || p.ID != w.p1 || p.Key != "zeta" || p.Name != "Zeta" || p.Description != "first" {
		t.Fatalf("Provider: %+v %v", p, err)
	}
	if p2, err := v.ProviderByKey("zeta"); err != nil || p2 != p {
		t.Fatalf("ProviderByKey: %+v %v", p2, err)
	}

	s, err := v.Sublayer(w.s2)
	if err != nil || s.Key != "s2" || s.Weight != 300 || s.Provider != w.p2 {
		t.Fatalf("Sublayer: %+v %v", s, err)
	}
	if s2, err := v.SublayerByKey("s2"); err != nil || s2 != s {
		t.Fatalf("SublayerByKey: %+v %v", s2, err)
	}
	if u, err := v.Sublayer(engine.UniversalSublayer); err != nil || u.Weight != 0 || u.Key != "universal" {
		t.Fatalf("universal sublayer: %+v %v", u, err)
	}

	c, err := v.ProviderContext(w.c1)
	if err != nil || c.Key != "c1" || string(c.Data) != "one" || c.Provider != w.p1 {
		t.Fatalf("ProviderContext: %+v %v", c, err)
	}
	if c2, err := v.ProviderContextByKey("c2"); err != nil || c2.ID != w.c2 || string(c2.Data) != "two" {
		t.Fatalf("ProviderContextByKey: %+v %v", c2, err)
	}

	co, err := v.Callout(w.co2)
	if err != nil || co.Key != "co2" || co.Layer != v6 || co.Provider != w.p2 || co.Flags != engine.CalloutConditionalOnFlow {
		t.Fatalf("Callout: %+v %v", co, err)
	}
	if co2, err := v.CalloutByKey("co2"); err != nil || co2 != co {
		t.Fatalf("CalloutByKey: %+v %v", co2, err)
	}

	f, err := v.Filter(w.fBlock)
	if err != nil || f.Key != "block" || f.Name != "b" || f.Layer != v4 || f.Sublayer != w.s1 || f.Provider != w.p1 ||
		f.Action.Type != engine.ActionBlock || len(f.Conditions) != 2 || f.EffectiveWeight != 10 || !f.Weight.IsExact() {
		t.Fatalf("Filter: %+v %v", f, err)
	}
	if fk, err := v.FilterByKey("block"); err != nil || fk.ID != w.fBlock {
		t.Fatalf("FilterByKey: %+v %v", fk, err)
	}
	// Generated keys, the universal sublayer for Sublayer 0.
	fc, err := v.Filter(w.fCallout)
	if err != nil || fc.Key == "" || fc.ProviderContext != w.c1 || fc.Action.Callout != w.co1 {
		t.Fatalf("callout filter: %+v %v", fc, err)
	}
	if fk, err := v.FilterByKey(fc.Key); err != nil || fk.ID != w.fCallout {
		t.Fatalf("generated key %q: %v", fc.Key, err)
	}
	if f6, _ := v.Filter(w.fV6); f6.Sublayer != engine.UniversalSublayer {
		t.Fatalf("Sublayer 0 became %s, want the universal sublayer", f6.Sublayer)
	}
	// Transactions read their own state through the same accessors.
	tx, err := w.e.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Abort()
	if f, err := tx.FilterByKey("permit"); err != nil || f.ID != w.fPermit {
		t.Fatalf("Txn.FilterByKey: %+v %v", f, err)
	}
}

func TestObjectsEnumerate(t *testing.T) {
	w := newObjWorld(t)
	v := w.e.View()

	provs := v.Providers()
	if len(provs) != 2 || provs[0].ID != w.p1 || provs[1].ID != w.p2 {
		t.Fatalf("Providers by ID: %+v", provs)
	}
	if subs := v.Sublayers(0); len(subs) != 3 || subs[0].ID != engine.UniversalSublayer || subs[1].ID != w.s1 || subs[2].ID != w.s2 {
		t.Fatalf("Sublayers(0): %+v", subs)
	}
	if subs := v.Sublayers(w.p2); len(subs) != 1 || subs[0].ID != w.s2 {
		t.Fatalf("Sublayers(p2): %+v", subs)
	}
	if ctxs := v.ProviderContexts(0); len(ctxs) != 2 || ctxs[0].ID != w.c1 || ctxs[1].ID != w.c2 {
		t.Fatalf("ProviderContexts(0): %+v", ctxs)
	}
	if ctxs := v.ProviderContexts(w.p2); len(ctxs) != 1 || ctxs[0].ID != w.c2 {
		t.Fatalf("ProviderContexts(p2): %+v", ctxs)
	}
	callouts := func(p engine.ProviderID, l engine.LayerID) []engine.CalloutID {
		var ids []engine.CalloutID
		for _, c := range v.Callouts(p, l) {
			ids = append(ids, c.ID)
		}
		return ids
	}
	for _, tt := range []struct {
		p    engine.ProviderID
		l    engine.LayerID
		want []engine.CalloutID
	}{
		{0, 0, []engine.CalloutID{w.co1, w.co2, w.co3}},
		{w.p1, 0, []engine.CalloutID{w.co1, w.co3}},
		{0, v6, []engine.CalloutID{w.co2, w.co3}},
		{w.p1, v6, []engine.CalloutID{w.co3}},
		{w.p2, v4, nil},
	} {
		if got := callouts(tt.p, tt.l); !slices.Equal(got, tt.want) {
			t.Errorf("Callouts(%v, %v) = %v, want %v", tt.p, tt.l, got, tt.want)
		}
	}

	// Filters: by layer, then evaluation order (sublayer weight desc,
	// filter weight desc, ID).
	for _, tt := range []struct {
		name string
		tmpl engine.FilterTemplate
		want []engine.FilterID
	}{
		{"all", engine.FilterTemplate{}, []engine.FilterID{w.fCallout, w.fPermit, w.fBlock, w.fV6Inspect, w.fV6}},
		{"layer v4", engine.FilterTemplate{Layer: v4}, []engine.FilterID{w.fCallout, w.fPermit, w.fBlock}},
		{"layer v6", engine.FilterTemplate{Layer: v6}, []engine.FilterID{w.fV6Inspect, w.fV6}},
		{"empty layer", engine.FilterTemplate{Layer: engine.LayerALEBindRedirectV4}, nil},
		{"sublayer s1", engine.FilterTemplate{Sublayer: w.s1}, []engine.FilterID{w.fPermit, w.fBlock}},
		{"sublayer s2", engine.FilterTemplate{Sublayer: w.s2}, []engine.FilterID{w.fCallout, w.fV6Inspect}},
		{"universal", engine.FilterTemplate{Sublayer: engine.UniversalSublayer}, []engine.FilterID{w.fV6}},
		{"provider p1", engine.FilterTemplate{Provider: w.p1}, []engine.FilterID{w.fPermit, w.fBlock}},
		{"provider p2", engine.FilterTemplate{Provider: w.p2}, []engine.FilterID{w.fCallout, w.fV6}},
		{"callout co1", engine.FilterTemplate{Callout: w.co1}, []engine.FilterID{w.fCallout}},
		{"callout co3", engine.FilterTemplate{Callout: w.co3}, []engine.FilterID{w.fV6Inspect}},
		{"action block", engine.FilterTemplate{ActionType: engine.ActionBlock}, []engine.FilterID{w.fBlock}},
		{"action inspection", engine.FilterTemplate{ActionType: engine.ActionCalloutInspection}, []engine.FilterID{w.fV6Inspect}},
		{"combined", engine.FilterTemplate{Layer: v4, Sublayer: w.s1, Provider: w.p1, ActionType: engine.ActionPermit}, []engine.FilterID{w.fPermit}},
		{"combined, none", engine.FilterTemplate{Layer: v6, Provider: w.p1}, nil},
	} {
		if got := filterIDs(v.Filters(tt.tmpl)); !slices.Equal(got, tt.want) {
			t.Errorf("Filters(%s) = %v, want %v", tt.name, got, tt.want)
		}
	}
	for l, n := range map[engine.LayerID]int{0: 5, v4: 3, v6: 2, engine.LayerALEBindRedirectV6: 0} {
		if got := v.FilterCount(l); got != n {
			t.Errorf("FilterCount(%v) = %d, want %d", l, got, n)
		}
	}
}

// IDs start at 1, grow, and are never reused after a delete.
func TestObjectsIDsNotReused(t *testing.T) {
	e := engine.New(engine.Options{})
	var first, second engine.FilterID
	add := func() (id engine.FilterID) {
		if err := e.Update(func(tx *engine.Txn) (err error) {
			id, err = tx.AddFilter(engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionBlock}})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return id
	}
	first = add()
	if first != 1 {
		t.Fatalf("first filter ID %d, want 1", first)
	}
	if err := e.Update(func(tx *engine.Txn) error { return tx.DeleteFilter(first) }); err != nil {
		t.Fatal(err)
	}
	second = add()
	if second <= first {
		t.Fatalf("ID %d reused or went back (first %d)", second, first)
	}
	var p engine.ProviderID
	if err := e.Update(func(tx *engine.Txn) (err error) { p, err = tx.AddProvider(engine.Provider{}); return err }); err != nil {
		t.Fatal(err)
	}
	if p != 1 {
		t.Fatalf("first provider ID %d, want 1 (each kind counts on its own)", p)
	}
}

// Objects handed out are copies: changing them changes nothing in the
// engine, and neither does changing what was handed in.
func TestObjectsCopiesIsolated(t *testing.T) {
	w := newObjWorld(t)
	v := w.e.View()

	f, _ := v.Filter(w.fBlock)
	f.Conditions[0] = condPort443
	f.Conditions = append(f.Conditions, condRemoteHost)
	f.Name = "changed"
	if g, _ := v.Filter(w.fBlock); len(g.Conditions) != 2 || g.Conditions[0] != condPort80 || g.Name != "b" {
		t.Fatalf("Filter copy leaked: %+v", g)
	}
	fs := v.Filters(engine.FilterTemplate{Layer: v4})
	for i := range fs {
		for j := range fs[i].Conditions {
			fs[i].Conditions[j] = condPort443
		}
	}
	if fk, _ := v.FilterByKey("block"); fk.Conditions[0] != condPort80 {
		t.Fatalf("Filters copy leaked: %+v", fk)
	}

	c, _ := v.ProviderContext(w.c1)
	c.Data[0] = 'X'
	if c2, _ := v.ProviderContextByKey("c1"); string(c2.Data) != "one" {
		t.Fatalf("ProviderContext copy leaked: %q", c2.Data)
	}
	cs := v.ProviderContexts(0)
	cs[0].Data[0] = 'X'
	if c2, _ := v.ProviderContext(w.c1); string(c2.Data) != "one" {
		t.Fatalf("ProviderContexts copy leaked: %q", c2.Data)
	}

	// What the caller passed in is copied too.
	conds := []engine.Condition{condPort80}
	data := []byte("abc")
	var fid engine.FilterID
	var cid engine.ProviderContextID
	if err := w.e.Update(func(tx *engine.Txn) (err error) {
		if cid, err = tx.AddProviderContext(engine.ProviderContext{Data: data}); err != nil {
			return err
		}
		fid, err = tx.AddFilter(engine.Filter{Layer: v4, Conditions: conds, Action: engine.Action{Type: engine.ActionBlock}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	conds[0] = condPort443
	data[0] = 'X'
	v = w.e.View()
	if g, _ := v.Filter(fid); g.Conditions[0] != condPort80 {
		t.Fatalf("AddFilter kept the caller's slice: %+v", g.Conditions)
	}
	if g, _ := v.ProviderContext(cid); string(g.Data) != "abc" {
		t.Fatalf("AddProviderContext kept the caller's slice: %q", g.Data)
	}
}

// A View is a snapshot: later commits do not change it.
func TestObjectsViewIsSnapshot(t *testing.T) {
	w := newObjWorld(t)
	old := w.e.View()
	if err := w.e.Update(func(tx *engine.Txn) error { return tx.DeleteFilter(w.fPermit) }); err != nil {
		t.Fatal(err)
	}
	if _, err := old.Filter(w.fPermit); err != nil {
		t.Fatalf("old view lost the filter: %v", err)
	}
	if _, err := w.e.View().Filter(w.fPermit); err == nil {
		t.Fatal("new view still has the deleted filter")
	}
}
