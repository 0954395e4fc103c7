package mgmt

import (
	"fmt"

	"fwp/engine"
)

// reader reads a consistent state: a session's open transaction (its own
// changes visible) or the committed state.
type reader struct {
	v    engine.View
	meta func(objKey) (objMeta, bool)
}

// read runs fn on the session's view (sid 0: the committed state).
func (m *Manager) read(sid uint64, fn func(r reader) error) error {
	if sid != 0 {
		s, err := m.lock(sid)
		if err != nil {
			return err
		}
		defer s.mu.Unlock()
		if s.txn != nil {
			return fn(reader{v: s.txn.tx.View(), meta: s.txn.metaOf})
		}
	}
	m.mu.Lock()
	v := m.eng.View()
	meta := func(k objKey) (objMeta, bool) { mt, ok := m.meta[k]; return mt, ok }
	defer m.mu.Unlock()
	return fn(reader{v: v, meta: meta})
}

func (r reader) owner(k Kind, key string) (uint64, Lifetime) {
	mt, _ := r.meta(objKey{k, key})
	return mt.session, mt.lifetime
}

func (r reader) providerKey(id engine.ProviderID) string {
	if id == 0 {
		return ""
	}
	p, _ := r.v.Provider(id)
	return p.Key
}

func (r reader) provider(p engine.Provider) Object {
	o := &Provider{Key: p.Key, Name: p.Name, Description: p.Description, ID: uint32(p.ID)}
	o.Session, o.Lifetime = r.owner(KindProvider, p.Key)
	return Object{Provider: o}
}

func (r reader) context(c engine.ProviderContext) Object {
	o := &ProviderContext{Key: c.Key, Name: c.Name, Provider: r.providerKey(c.Provider), Data: c.Data, ID: uint64(c.ID)}
	o.Session, o.Lifetime = r.owner(KindProviderContext, c.Key)
	return Object{ProviderContext: o}
}

func (r reader) sublayer(s engine.Sublayer) Object {
	o := &Sublayer{Key: s.Key, Name: s.Name, Provider: r.providerKey(s.Provider), Weight: s.Weight, ID: uint32(s.ID)}
	o.Session, o.Lifetime = r.owner(KindSublayer, s.Key)
	return Object{Sublayer: o}
}

func (r reader) callout(c engine.Callout) Object {
	o := &Callout{Key: c.Key, Name: c.Name, Provider: r.providerKey(c.Provider), Layer: c.Layer.String(),
		Flags: CalloutFlagNames(c.Flags), ID: uint32(c.ID)}
	o.Session, o.Lifetime = r.owner(KindCallout, c.Key)
	return Object{Callout: o}
}

func (r reader) filter(f engine.Filter) Object {
	o := &Filter{Key: f.Key, Name: f.Name, Description: f.Description, Layer: f.Layer.String(),
		Provider: r.providerKey(f.Provider), Weight: f.Weight.String(), Action: f.Action.Type.String(),
		Flags: FilterFlagNames(f.Flags), ID: uint64(f.ID), EffectiveWeight: f.EffectiveWeight}
	if s, err := r.v.Sublayer(f.Sublayer); err == nil {
		o.Sublayer = s.Key
	}
	if f.Action.Type.IsCallout() {
		if c, err := r.v.Callout(f.Action.Callout); err == nil {
			o.Callout = c.Key
		}
	}
	if f.ProviderContext != 0 {
		if c, err := r.v.ProviderContext(f.ProviderContext); err == nil {
			o.ProviderContext = c.Key
		}
	}
	for _, c := range f.Conditions {
		if l := c.Value.List(); l != nil {
			o.Conditions = append(o.Conditions, Condition{Field: c.Field.Name(), Match: c.Match.String(), List: l})
			continue
		}
		o.Conditions = append(o.Conditions, Condition{Field: c.Field.Name(), Match: c.Match.String(), Value: c.Value.String()})
	}
	o.Session, o.Lifetime = r.owner(KindFilter, f.Key)
	return Object{Filter: o}
}

// find resolves a reference in a view to the engine's object (a value of
// engine.Provider, engine.ProviderContext, ...), its key and its ID.
func find(v engine.View, r Ref) (obj any, key string, id uint64, err error) {
	byKey := r.Key != ""
	pick := func(o any, k string, i uint64, e error) (any, string, uint64, error) {
		if e != nil {
			return nil, "", 0, e
		}
		return o, k, i, nil
	}
	switch r.Kind {
	case KindProvider:
		var p engine.Provider
		if byKey {
			p, err = v.ProviderByKey(r.Key)
		} else {
			p, err = v.Provider(engine.ProviderID(r.ID))
		}
		return pick(p, p.Key, uint64(p.ID), err)
	case KindProviderContext:
		var c engine.ProviderContext
		if byKey {
			c, err = v.ProviderContextByKey(r.Key)
		} else {
			c, err = v.ProviderContext(engine.ProviderContextID(r.ID))
		}
		return pick(c, c.Key, uint64(c.ID), err)
	case KindSublayer:
		var s engine.Sublayer
		if byKey {
			s, err = v.SublayerByKey(r.Key)
		} else {
			s, err = v.Sublayer(engine.SublayerID(r.ID))
		}
		return pick(s, s.Key, uint64(s.ID), err)
	case KindCallout:
		var c engine.Callout
		if byKey {
			c, err = v.CalloutByKey(r.Key)
		} else {
			c, err = v.Callout(engine.CalloutID(r.ID))
		}
		return pick(c, c.Key, uint64(c.ID), err)
	case KindFilter:
		var f engine.Filter
		if byKey {
			f, err = v.FilterByKey(r.Key)
		} else {
			f, err = v.Filter(engine.FilterID(r.ID))
		}
		return pick(f, f.Key, uint64(f.ID), err)
	}
	return nil, "", 0, fmt.Errorf("%w: unknown object kind %d", engine.ErrInvalidArgument, r.Kind)
}

// Get returns one object by key (or ID when the key is empty), as the
// session sees it (sid 0: the committed state).
func (m *Manager) Get(sid uint64, ref Ref) (Object, error) {
	var out Object
	err := m.read(sid, func(r reader) error {
		obj, _, _, err := find(r.v, ref)
		switch o := obj.(type) {
		case engine.Provider:
			out = r.provider(o)
		case engine.ProviderContext:
			out = r.context(o)
		case engine.Sublayer:
			out = r.sublayer(o)
		case engine.Callout:
			out = r.callout(o)
		case engine.Filter:
			out = r.filter(o)
		}
		return err
	})
	if err != nil {
		return Object{}, err
	}
	return out, nil
}

// Template selects objects for List; empty fields match all (WFP's enum
// templates). Layer and Provider apply to every kind that has them,
// Sublayer, Callout and Action to filters.
type Template struct {
	Layer    string `json:"layer,omitempty"`
	Sublayer string `json:"sublayer,omitempty"`
	Provider string `json:"provider,omitempty"`
	Callout  string `json:"callout,omitempty"`
	Action   string `json:"action,omitempty"`
}

// List enumerates one kind: by ID, filters by layer and then in
// evaluation order (sublayer weight, filter weight).
func (m *Manager) List(sid uint64, kind Kind, t Template) ([]Object, error) {
	var out []Object
	err := m.read(sid, func(r reader) error {
		v := r.v
		var ft engine.FilterTemplate
		var err error
		if t.Layer != "" {
			if ft.Layer, err = ParseLayer(t.Layer); err != nil {
				return err
			}
		}
		if t.Provider != "" {
			p, err := v.ProviderByKey(t.Provider)
			if err != nil {
				return err
			}
			ft.Provider = p.ID
		}
		if t.Sublayer != "" {
			s, err := v.SublayerByKey(t.Sublayer)
			if err != nil {
				return err
			}
			ft.Sublayer = s.ID
		}
		if t.Callout != "" {
			c, err := v.CalloutByKey(t.Callout)
			if err != nil {
				return err
			}
			ft.Callout = c.ID
		}
		if t.Action != "" {
			a, ok := engine.ActionTypeByName(t.Action)
			if !ok {
				return fmt.Errorf("%w: %q", engine.ErrInvalidAction, t.Action)
			}
			ft.ActionType = a
		}
		switch kind {
		case KindProvider:
			for _, p := range v.Providers() {
				out = append(out, r.provider(p))
			}
		case KindProviderContext:
			for _, c := range v.ProviderContexts(ft.Provider) {
				out = append(out, r.context(c))
			}
		case KindSublayer:
			for _, s := range v.Sublayers(ft.Provider) {
				out = append(out, r.sublayer(s))
			}
		case KindCallout:
			for _, c := range v.Callouts(ft.Provider, ft.Layer) {
				out = append(out, r.callout(c))
			}
		case KindFilter:
			for _, f := range v.Filters(ft) {
				out = append(out, r.filter(f))
			}
		default:
			return fmt.Errorf("%w: unknown object kind %d", engine.ErrInvalidArgument, kind)
		}
		return nil
	})
	return out, err
}

// Explanation is the arbitration of one tuple, with keys for the IDs.
type Explanation struct {
	Trace *engine.Trace
	// Keys maps the filter, sublayer and callout IDs of the trace to keys.
	FilterKeys   map[engine.FilterID]string
	SublayerKeys map[engine.SublayerID]string
	CalloutKeys  map[engine.CalloutID]string
}

// Explain runs the committed policy's arbitration for a tuple given as
// field name → value, without traffic and without calling callouts: the
// result's filter is the best terminating match.
func (m *Manager) Explain(layer string, values map[string]string) (*Explanation, error) {
	l, err := ParseLayer(layer)
	if err != nil {
		return nil, err
	}
	vs, err := ParseValues(l, values)
	if err != nil {
		return nil, err
	}
	tr, err := m.eng.Explain(l, vs, nil)
	if err != nil {
		return nil, err
	}
	x := &Explanation{Trace: tr, FilterKeys: map[engine.FilterID]string{}, SublayerKeys: map[engine.SublayerID]string{}, CalloutKeys: map[engine.CalloutID]string{}}
	v := m.eng.View()
	note := func(f engine.FilterID, s engine.SublayerID, c engine.CalloutID) {
		if fl, err := v.Filter(f); err == nil {
			x.FilterKeys[f] = fl.Key
		}
		if sl, err := v.Sublayer(s); err == nil {
			x.SublayerKeys[s] = sl.Key
		}
		if co, err := v.Callout(c); err == nil {
			x.CalloutKeys[c] = co.Key
		}
	}
	for _, s := range tr.Steps {
		note(s.Filter, s.Sublayer, s.Callout)
	}
	note(tr.Result.Filter, tr.Result.Sublayer, tr.Result.Callout)
	return x, nil
}
