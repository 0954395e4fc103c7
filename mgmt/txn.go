package mgmt

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"fwp/engine"
)

// txn is a management transaction: an engine transaction plus the
// objects' owners and lifetimes and the store changes it will commit.
type txn struct {
	m  *Manager
	s  *session
	tx *engine.Txn
	// ov is the transaction's overlay over the manager's maps.
	ov overlay
	// filters holds the stored copies of the transaction's filters,
	// allocated a chunk at a time.
	filters []Filter
	// conds is engineFilter's scratch space.
	conds []engine.Condition
	// loading: the store is being loaded; nothing to write back.
	loading bool
	// pos is where the transaction's added objects came from (a policy
	// file's file:line), for errors found only at commit.
	pos map[objKey]string
}

func (t *txn) metaOf(k objKey) (objMeta, bool) {
	if e := t.ov.latest(k); e != nil {
		return e.meta, e.hasMeta
	}
	v, ok := t.m.meta[k] // safe: meta changes only under the lock t holds
	return v, ok
}

func (t *txn) storedOf(k objKey) (Object, bool) {
	if e := t.ov.latest(k); e != nil && e.stored != storedInherit {
		return e.obj, e.stored == storedPut
	}
	v, ok := t.m.stored[k]
	return v, ok
}

// record notes an add (o non-nil) or a delete of k in the overlay.
func (t *txn) record(k objKey, id uint64, l Lifetime, o *Object) {
	e := overlayEntry{k: k, id: id, live: true, prev: -1}
	// A key added has an earlier entry only if the transaction deleted
	// it before (the engine refuses a key twice): the overlay knows when
	// none can have one, and then skips the lookup.
	var prev *overlayEntry
	if o == nil || t.ov.mayHaveEntry(k) {
		if e.prev, prev = t.ov.find(k); prev != nil {
			e.stored, e.obj = prev.stored, prev.obj
		}
	}
	if o != nil {
		e.hasMeta = true
		e.meta = objMeta{session: t.s.info.ID, lifetime: l}
	}
	if !t.loading {
		switch {
		case o != nil && l.durable():
			e.stored, e.obj = storedPut, t.storedForm(*o, l, k.key)
		case o == nil:
			if _, ok := t.storedOf(k); ok {
				e.stored, e.obj = storedRemoved, Object{}
			}
		}
	}
	if prev != nil {
		prev.live = false
	}
	t.ov.push(e)
}

// storedForm returns o's copy for the store (o.stored with the engine's
// key), a filter's copy cut from a chunk rather than allocated alone.
func (t *txn) storedForm(o Object, l Lifetime, key string) Object {
	if o.Kind() != KindFilter {
		return t.withKey(o.stored(l), key)
	}
	if len(t.filters) == cap(t.filters) {
		// Chunks double from 4 to 256 filters: a small transaction
		// allocates little, a large one few times.
		t.filters = make([]Filter, 0, min(256, max(4, 2*cap(t.filters))))
	}
	t.filters = append(t.filters, *o.Filter)
	c := &t.filters[len(t.filters)-1]
	c.ID, c.Session, c.EffectiveWeight, c.Lifetime, c.Key = 0, 0, 0, l, key
	return Object{Filter: c}
}

// withKey sets the engine-generated key on a stored object.
func (t *txn) withKey(o Object, key string) Object {
	if k, _ := o.head(); k != nil {
		*k = key
	}
	return o
}

func (t *txn) apply(ops []Op, undoable bool) (ApplyResult, error) {
	var sp engine.Savepoint
	nents := t.ov.len()
	if undoable {
		sp = t.tx.Savepoint()
	}
	var res ApplyResult
	if len(ops) > 1 {
		adds := 0
		for _, op := range ops {
			if op.Add != nil {
				adds++
			}
		}
		if adds > 0 {
			res.Added = make([]Ref, 0, adds)
		}
	}
	for i, op := range ops {
		var err error
		var r Ref
		switch {
		case op.Add != nil && op.Delete == nil:
			if r, err = t.add(*op.Add); err == nil {
				res.Added = append(res.Added, r)
				if op.Pos != "" {
					if t.pos == nil {
						t.pos = map[objKey]string{}
					}
					t.pos[objKey{r.Kind, r.Key}] = op.Pos
				}
			}
		case op.Delete != nil && op.Add == nil:
			if r, err = t.delete(*op.Delete); err == nil {
				res.Deleted = append(res.Deleted, r)
			}
		default:
			err = fmt.Errorf("%w: an op is either an add or a delete", engine.ErrInvalidArgument)
		}
		if err != nil {
			if undoable {
				t.undo(sp, nents)
			}
			pos := op.Pos
			if pos == "" && len(ops) > 1 {
				pos = fmt.Sprintf("op %d", i+1)
			}
			if pos != "" {
				err = fmt.Errorf("%s: %w", pos, err)
			}
			return ApplyResult{}, err
		}
	}
	return res, nil
}

// undo takes the overlay back to its first n entries and the engine to
// sp.
func (t *txn) undo(sp engine.Savepoint, n int) {
	_ = t.tx.RollbackTo(sp) // fails only on a finished txn, which t is not
	t.ov.truncate(n)
}

func (t *txn) abort() {
	t.release()
	t.tx.Abort()
}

// posOf is "file:line: " of the object err is about, when the
// transaction added it from a policy file, or "".
func (t *txn) posOf(err error) string {
	var oe *engine.ObjectError
	if !errors.As(err, &oe) {
		return ""
	}
	k, kerr := ParseKind(oe.Kind)
	if p, ok := t.pos[objKey{k, oe.Key}]; ok && kerr == nil {
		return p + ": "
	}
	return ""
}

// release forgets t's session as the lock holder, before the engine lets
// the lock go (and the next holder is recorded).
func (t *txn) release() { t.m.holder.CompareAndSwap(t.s, nil) }

// commit writes the store (when durable objects changed) and then swaps
// the engine's state. A failed store write aborts: nothing changes.
func (t *txn) commit() error {
	start := time.Now()
	m := t.m
	if m.opts.BeforeCommit != nil {
		if err := m.opts.BeforeCommit(t.tx.View()); err != nil {
			t.abort()
			return fmt.Errorf("%w: %s%w", engine.ErrTxnAborted, t.posOf(err), err)
		}
	}
	// m.stored changes only here, under the transaction lock t holds.
	if ch := t.storeChanges(); len(ch) > 0 && m.store != nil {
		if err := m.store.write(m.stored, ch); err != nil {
			t.abort()
			if m.opts.BeforeCommit != nil {
				if rerr := m.opts.BeforeCommit(m.eng.View()); rerr != nil {
					m.log.Error("datapath not restored after a failed store write", "err", rerr)
				}
			}
			return fmt.Errorf("%w: %w: %w", engine.ErrTxnAborted, ErrStore, err)
		}
	}
	m.mu.Lock()
	t.release()
	if err := t.tx.Commit(); err != nil {
		m.mu.Unlock()
		return err
	}
	// A large transaction grows the manager's maps at once rather than an
	// entry at a time (a million filters: seconds of rehashing).
	nmeta, nstored := 0, 0
	for e := range t.ov.entries() {
		if e.live {
			nmeta++
			if e.stored == storedPut {
				nstored++
			}
		}
	}
	if nmeta > len(m.meta) {
		m.meta = growMap(m.meta, nmeta)
	}
	if nstored > len(m.stored) {
		m.stored = growMap(m.stored, nstored)
	}
	for e := range t.ov.entries() {
		if !e.live {
			continue
		}
		if e.hasMeta {
			m.meta[e.k] = e.meta
		} else {
			delete(m.meta, e.k)
		}
		switch e.stored {
		case storedPut:
			m.stored[e.k] = e.obj
		case storedRemoved:
			delete(m.stored, e.k)
		}
	}
	m.publishLocked(t.s.info.ID, &t.ov)
	m.mu.Unlock()
	if m.opts.OnCommit != nil {
		m.opts.OnCommit(time.Since(start))
	}
	return nil
}

// lifetimeFor resolves an object's requested lifetime in the session.
func (t *txn) lifetimeFor(l Lifetime) (Lifetime, error) {
	if t.s.info.Dynamic {
		if l != LifetimeDefault && l != LifetimeDynamic {
			return 0, fmt.Errorf("%w: %s requested", ErrDynamicSession, l)
		}
		return LifetimeDynamic, nil
	}
	if l == LifetimeDefault {
		return LifetimeStatic, nil
	}
	if l > LifetimeBootTime {
		return 0, fmt.Errorf("%w: unknown lifetime %d", engine.ErrInvalidArgument, l)
	}
	return l, nil
}

// checkRef refuses a reference from an object of lifetime l to a shorter
// lived one, or to another session's dynamic object. Built-in objects
// (the universal sublayer) have no meta and outlive everything.
func (t *txn) checkRef(kind Kind, key string, l Lifetime) error {
	mt, ok := t.metaOf(objKey{kind, key})
	if !ok {
		return nil
	}
	if !l.mayReference(mt.lifetime) {
		return fmt.Errorf("%w: a %s object cannot reference %s %q, which is %s", ErrLifetime, l, kind, key, mt.lifetime)
	}
	if mt.lifetime == LifetimeDynamic && mt.session != t.s.info.ID {
		return fmt.Errorf("%w: %s %q is a dynamic object of session #%d", ErrLifetime, kind, key, mt.session)
	}
	return nil
}

func (t *txn) provider(key string, l Lifetime) (engine.ProviderID, error) {
	if key == "" {
		return 0, nil
	}
	p, err := t.tx.View().ProviderByKey(key)
	if err != nil {
		return 0, err
	}
	return p.ID, t.checkRef(KindProvider, key, l)
}

func (t *txn) add(o Object) (Ref, error) {
	l, err := t.lifetimeFor(o.lifetime())
	if err != nil {
		return Ref{}, err
	}
	v := t.tx.View()
	var id uint64
	var key string
	switch o.Kind() {
	case KindProvider:
		p := o.Provider
		pid, err := t.tx.AddProvider(engine.Provider{Key: p.Key, Name: p.Name, Description: p.Description})
		if err != nil {
			return Ref{}, err
		}
		got, _ := v.Provider(pid)
		id, key = uint64(pid), got.Key
	case KindProviderContext:
		c := o.ProviderContext
		if c.DataRedacted {
			// A reader's listing, applied back, would blank the data.
			return Ref{}, fmt.Errorf("%w: provider context %q: its data was redacted (a reader's copy: %d bytes withheld); add it with the data itself", ErrInvalidPolicy, c.Key, c.DataLength)
		}
		prov, err := t.provider(c.Provider, l)
		if err != nil {
			return Ref{}, err
		}
		cid, err := t.tx.AddProviderContext(engine.ProviderContext{Key: c.Key, Name: c.Name, Provider: prov, Data: c.Data})
		if err != nil {
			return Ref{}, err
		}
		got, _ := t.tx.View().ProviderContext(cid)
		id, key = uint64(cid), got.Key
	case KindSublayer:
		s := o.Sublayer
		prov, err := t.provider(s.Provider, l)
		if err != nil {
			return Ref{}, err
		}
		sid, err := t.tx.AddSublayer(engine.Sublayer{Key: s.Key, Name: s.Name, Provider: prov, Weight: s.Weight})
		if err != nil {
			return Ref{}, err
		}
		got, _ := t.tx.View().Sublayer(sid)
		id, key = uint64(sid), got.Key
	case KindCallout:
		c := o.Callout
		layer, err := ParseLayer(c.Layer)
		if err != nil {
			return Ref{}, err
		}
		flags, err := ParseCalloutFlags(c.Flags)
		if err != nil {
			return Ref{}, err
		}
		prov, err := t.provider(c.Provider, l)
		if err != nil {
			return Ref{}, err
		}
		cid, err := t.tx.AddCallout(engine.Callout{Key: c.Key, Name: c.Name, Provider: prov, Layer: layer, Flags: flags})
		if err != nil {
			return Ref{}, err
		}
		got, _ := t.tx.View().Callout(cid)
		id, key = uint64(cid), got.Key
	case KindFilter:
		f, err := t.engineFilter(o.Filter, l)
		if err != nil {
			return Ref{}, err
		}
		o = compactLists(o, f)
		fid, err := t.tx.AddFilter(f)
		if err != nil {
			return Ref{}, err
		}
		id, key = uint64(fid), f.Key
		if key == "" { // generated by the engine
			got, _ := t.tx.View().Filter(fid)
			key = got.Key
		}
	default:
		return Ref{}, fmt.Errorf("%w: empty object", engine.ErrInvalidArgument)
	}
	k := objKey{o.Kind(), key}
	t.record(k, id, l, &o)
	return Ref{Kind: k.kind, Key: key, ID: id}, nil
}

func (t *txn) engineFilter(f *Filter, l Lifetime) (engine.Filter, error) {
	layer, err := ParseLayer(f.Layer)
	if err != nil {
		return engine.Filter{}, err
	}
	w, err := ParseWeight(f.Weight)
	if err != nil {
		return engine.Filter{}, err
	}
	act, ok := engine.ActionTypeByName(f.Action)
	if !ok || act == engine.ActionContinue {
		return engine.Filter{}, fmt.Errorf("%w: %q (block, permit, callout_terminating, callout_inspection, callout_unknown)", engine.ErrInvalidAction, f.Action)
	}
	flags, err := ParseFilterFlags(f.Flags)
	if err != nil {
		return engine.Filter{}, err
	}
	ef := engine.Filter{Key: f.Key, Name: f.Name, Description: f.Description, Layer: layer, Weight: w, Flags: flags, Action: engine.Action{Type: act}}
	// The engine copies the conditions it keeps: build them in t's
	// scratch slice rather than a new one per filter.
	ef.Conditions = t.conds[:0]
	defer func() { t.conds = ef.Conditions[:0] }()
	for i, c := range f.Conditions {
		if len(c.Values) == 0 {
			ec, err := ParseCondition(layer, c)
			if err != nil {
				return engine.Filter{}, fmt.Errorf("condition %d: %w", i+1, err)
			}
			ef.Conditions = append(ef.Conditions, ec)
			continue
		}
		if c.Value != "" || c.List != nil {
			return engine.Filter{}, fmt.Errorf("condition %d: %w: value and values both set", i+1, engine.ErrInvalidCondition)
		}
		if len(c.Values) > MaxListValues {
			return engine.Filter{}, fmt.Errorf("condition %d: %w: %d values, the limit is %d", i+1, engine.ErrInvalidCondition, len(c.Values), MaxListValues)
		}
		ecs, err := listConditions(layer, c)
		if err != nil {
			return engine.Filter{}, fmt.Errorf("condition %d: %w", i+1, err)
		}
		if len(ef.Conditions)+len(ecs) > engine.MaxConditions {
			return engine.Filter{}, fmt.Errorf("condition %d: %w: %d values exceed %d conditions per filter", i+1, engine.ErrInvalidCondition, len(c.Values), engine.MaxConditions)
		}
		ef.Conditions = append(ef.Conditions, ecs...)
	}
	v := t.tx.View()
	if ef.Provider, err = t.provider(f.Provider, l); err != nil {
		return engine.Filter{}, err
	}
	if f.Sublayer != "" {
		s, err := v.SublayerByKey(f.Sublayer)
		if err != nil {
			return engine.Filter{}, err
		}
		if err := t.checkRef(KindSublayer, f.Sublayer, l); err != nil {
			return engine.Filter{}, err
		}
		ef.Sublayer = s.ID
	}
	if f.ProviderContext != "" {
		c, err := v.ProviderContextByKey(f.ProviderContext)
		if err != nil {
			return engine.Filter{}, err
		}
		if err := t.checkRef(KindProviderContext, f.ProviderContext, l); err != nil {
			return engine.Filter{}, err
		}
		ef.ProviderContext = c.ID
	}
	if f.Callout != "" {
		if !act.IsCallout() {
			return engine.Filter{}, fmt.Errorf("%w: a %s filter names no callout", engine.ErrInvalidAction, act)
		}
		c, err := v.CalloutByKey(f.Callout)
		if err != nil {
			return engine.Filter{}, fmt.Errorf("%w: %w", engine.ErrCalloutNotFound, err)
		}
		if err := t.checkRef(KindCallout, f.Callout, l); err != nil {
			return engine.Filter{}, err
		}
		ef.Action.Callout = c.ID
	}
	return ef, nil
}

// compactLists returns o with each list of values the engine holds as an
// engine.List replaced by that list, so the store keeps the packed form
// (a few bytes per address) rather than the text of each value. The
// caller's object is not modified.
func compactLists(o Object, ef engine.Filter) Object {
	f := o.Filter
	if !slices.ContainsFunc(f.Conditions, func(c Condition) bool { return len(c.Values) > 0 }) {
		return o
	}
	// engineFilter appends one engine condition per condition without
	// values, and one per value or one List per list.
	nf := *f
	nf.Conditions = slices.Clone(f.Conditions)
	j := 0
	for i, c := range f.Conditions {
		if len(c.Values) == 0 {
			j++
			continue
		}
		if l := ef.Conditions[j].Value.List(); l != nil {
			nf.Conditions[i].Values, nf.Conditions[i].List = nil, l
			j++
			continue
		}
		j += len(c.Values)
	}
	o.Filter = &nf
	return o
}

// listConditions turns a list condition's values into an engine.List
// condition when it is Listable, else into one condition per value (WFP's
// form). An error starts with the value's number.
func listConditions(layer engine.LayerID, c Condition) ([]engine.Condition, error) {
	one := c
	one.Values = nil
	f, ok := engine.FieldByName(strings.TrimSpace(c.Field))
	if !ok || !Listable(f, c.Match) {
		out := make([]engine.Condition, 0, len(c.Values))
		for j, v := range c.Values {
			one.Value = v
			ec, err := ParseCondition(layer, one)
			if err != nil {
				return nil, fmt.Errorf("value %d: %w", j+1, err)
			}
			out = append(out, ec)
		}
		return out, nil
	}
	b := engine.NewListBuilder(f.Type(), len(c.Values))
	for j, s := range c.Values {
		v, err := engine.ParseValue(f.Type(), s)
		if err == nil {
			err = b.Add(v)
		}
		if err != nil {
			return nil, fmt.Errorf("value %d: field %s: %w", j+1, f, err)
		}
	}
	one.List = b.List()
	ec, err := ParseCondition(layer, one)
	if err != nil {
		return nil, err
	}
	return []engine.Condition{ec}, nil
}

// delete deletes by key, or by ID when the key is empty. A boot-time
// object that lives only in the store (after start) is deleted there.
func (t *txn) delete(r Ref) (Ref, error) {
	_, key, id, err := find(t.tx.View(), r)
	if err == nil {
		switch r.Kind {
		case KindProvider:
			err = t.tx.DeleteProvider(engine.ProviderID(id))
		case KindProviderContext:
			err = t.tx.DeleteProviderContext(engine.ProviderContextID(id))
		case KindSublayer:
			err = t.tx.DeleteSublayer(engine.SublayerID(id))
		case KindCallout:
			err = t.tx.DeleteCallout(engine.CalloutID(id))
		case KindFilter:
			err = t.tx.DeleteFilter(engine.FilterID(id))
		}
	} else {
		key = r.Key // for a boot-time object that lives only in the store
	}
	k := objKey{r.Kind, key}
	if err != nil {
		if so, ok := t.storedOf(k); ok && key != "" && so.lifetime() == LifetimeBootTime && errors.Is(err, engine.ErrNotFound) {
			// The engine cannot see references among stored objects.
			if rk, ok := t.storedReferrer(k); ok {
				return Ref{}, fmt.Errorf("%w: boot-time %s %q is referenced by stored %s %q", engine.ErrInUse, k.kind, k.key, rk.kind, rk.key)
			}
			t.record(k, 0, LifetimeBootTime, nil)
			return Ref{Kind: r.Kind, Key: key}, nil
		}
		return Ref{}, err
	}
	t.record(k, id, 0, nil)
	return Ref{Kind: r.Kind, Key: key, ID: id}, nil
}

// storeChanges lists the store's changes of the transaction, in order:
// a key's last put (the object) or removal (nil object).
func (t *txn) storeChanges() []storeChange {
	var out []storeChange
	for e := range t.ov.entries() {
		if !e.live || e.stored == storedInherit {
			continue
		}
		if out == nil {
			out = make([]storeChange, 0, t.ov.len())
		}
		c := storeChange{k: e.k}
		if e.stored == storedPut {
			c.o = &e.obj
		}
		out = append(out, c)
	}
	return out
}

// storedReferrer finds a stored object (as t will leave the store) that
// references k.
func (t *txn) storedReferrer(k objKey) (objKey, bool) {
	for e := range t.ov.entries() {
		if e.live && e.stored == storedPut && slices.Contains(e.obj.refs(), k) {
			return e.k, true
		}
	}
	for rk, o := range t.m.stored {
		if e := t.ov.latest(rk); (e == nil || e.stored == storedInherit) && slices.Contains(o.refs(), k) {
			return rk, true
		}
	}
	return objKey{}, false
}

// growMap returns a copy of m with room for n more entries.
func growMap[K comparable, V any](m map[K]V, n int) map[K]V {
	g := make(map[K]V, len(m)+n)
	for k, v := range m {
		g[k] = v
	}
	return g
}
