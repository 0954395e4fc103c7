package engine

import (
	"context"
	"fmt"
	"iter"
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Options configure an Engine. The zero value is usable.
type Options struct {
	// EventCapacity bounds the net event ring (default 4096).
	EventCapacity int
	// AllowEvents records classify-allow events too (WFP's
	// FWPM_ENGINE_NET_EVENT_MATCH_ANY_KEYWORDS); drops are always recorded.
	AllowEvents bool
	// PendTimeout bounds every pend (default 10s; see pend.go).
	PendTimeout time.Duration
	// Now is the clock, for tests (default time.Now).
	Now func() time.Time
	// FlowContextHook, when set, is told of every flow context associated
	// (ctx, added) and removed (its ctx, !added): a callout program's
	// engine (client.RegisterCallout) forwards them to fwpd's.
	FlowContextHook func(flow FlowHandle, layer LayerID, callout CalloutID, ctx any, added bool)
}

// Engine is a filter engine. All methods are safe for concurrent use.
// Classify reads an immutable snapshot; writers go through a Txn.
type Engine struct {
	opts  Options
	state atomic.Pointer[state]
	// txnSem admits one writer; a channel so that waiting can time out.
	txnSem chan struct{}

	idMu         sync.Mutex
	nextProvider ProviderID
	nextContext  ProviderContextID
	nextSublayer SublayerID
	nextFilter   FilterID
	nextCallout  CalloutID
	calloutSlots map[string]*calloutSlot
	mayBlock     atomic.Int64 // registrations with CalloutMayBlock

	events   *eventRing
	rt       runtime
	counters [numLayers]layerCounter
}

// layerCounter counts one layer's classifications; padded so that two
// layers' counters do not share a cache line.
type layerCounter struct {
	permit, block, veto, pend atomic.Uint64
	pendRefused               atomic.Uint64 // pends refused for want of the write right
	_                         [24]byte
}

// ClassifyCount is the number of classifications of one layer by outcome.
// A pended classification counts once as pended and again when it ends.
// PendRefused counts pends refused to callouts without the write right.
type ClassifyCount struct {
	Layer                     LayerID
	Permit, Block, Veto, Pend uint64
	PendRefused               uint64
}

// ClassifyCounts returns every layer's classification counts.
func (e *Engine) ClassifyCounts() []ClassifyCount {
	out := make([]ClassifyCount, 0, NumLayers)
	for l := LayerID(1); l < numLayers; l++ {
		c := &e.counters[l]
		out = append(out, ClassifyCount{Layer: l, Permit: c.permit.Load(), Block: c.block.Load(), Veto: c.veto.Load(), Pend: c.pend.Load(), PendRefused: c.pendRefused.Load()})
	}
	return out
}

func (e *Engine) count(l LayerID, res *Result) {
	c := &e.counters[l]
	switch {
	case res.Pend != nil:
		c.pend.Add(1)
	case res.Veto:
		c.veto.Add(1)
	case res.Action == ActionPermit:
		c.permit.Add(1)
	default:
		c.block.Add(1)
	}
}

// New returns an engine with the universal sublayer and no filters.
func New(opts Options) *Engine {
	if opts.EventCapacity <= 0 {
		opts.EventCapacity = 4096
	}
	if opts.PendTimeout <= 0 {
		opts.PendTimeout = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	e := &Engine{
		opts:         opts,
		txnSem:       make(chan struct{}, 1),
		nextSublayer: UniversalSublayer,
		calloutSlots: map[string]*calloutSlot{},
		events:       newEventRing(opts.EventCapacity, opts.Now),
	}
	e.rt.init(e)
	s := &state{
		providers: newTable[ProviderID, Provider](),
		contexts:  newTable[ProviderContextID, ProviderContext](),
		sublayers: newTable[SublayerID, Sublayer](),
		callouts:  newTable[CalloutID, Callout](),
	}
	for i := range s.filters {
		s.filters[i] = newFilterTable()
	}
	u := &Sublayer{ID: UniversalSublayer, Key: "universal", Name: "FWPM_SUBLAYER_UNIVERSAL", Weight: 0}
	s.sublayers.put(u.ID, u.Key, u)
	for id := LayerID(1); id < numLayers; id++ {
		s.compiled[id] = compileLayer(id, s, nil)
	}
	e.state.Store(s)
	return e
}

// table is one object kind's map, by ID and by key. Tables are copied on
// the first write of a transaction and never changed once committed.
type table[I ~uint32 | ~uint64, T any] struct {
	byID  map[I]*T
	byKey map[string]I
}

func newTable[I ~uint32 | ~uint64, T any]() *table[I, T] {
	return &table[I, T]{byID: map[I]*T{}, byKey: map[string]I{}}
}

func (t *table[I, T]) clone() *table[I, T] {
	return &table[I, T]{byID: maps.Clone(t.byID), byKey: maps.Clone(t.byKey)}
}

func (t *table[I, T]) put(id I, key string, v *T) { t.byID[id] = v; t.byKey[key] = id }
func (t *table[I, T]) del(id I, key string)       { delete(t.byID, id); delete(t.byKey, key) }

// sorted returns the table's objects by ascending ID.
func (t *table[I, T]) sorted() []I {
	ids := slices.Collect(maps.Keys(t.byID))
	slices.Sort(ids)
	return ids
}

// state is one committed (or in-transaction) version of the engine's objects
// and the compiled index of every layer.
type state struct {
	providers *table[ProviderID, Provider]
	contexts  *table[ProviderContextID, ProviderContext]
	sublayers *table[SublayerID, Sublayer]
	callouts  *table[CalloutID, Callout]
	filters   [numLayers]*filterTable
	compiled  [numLayers]*compiledLayer
}

func (s *state) findFilter(id FilterID) (*Filter, LayerID) {
	for l := LayerID(1); l < numLayers; l++ {
		if f := s.filters[l].get(id); f != nil {
			return f, l
		}
	}
	return nil, LayerInvalid
}

func (s *state) filterByKey(key string) *Filter {
	id, gen := generatedID(key)
	for l := LayerID(1); l < numLayers; l++ {
		if f := s.filters[l].byKeyOf(key, id, gen); f != nil {
			return f
		}
	}
	return nil
}

// orderedFilters returns the layer's filters in evaluation order: the
// compiled layer's when it was compiled from this table (a committed
// state), else sorted now (a transaction's changed layer).
func (s *state) orderedFilters(l LayerID) []*Filter {
	if c := s.compiled[l]; c != nil && c.src == s.filters[l] {
		return c.all
	}
	return s.ordered(l)
}

// Txn is a transaction: its changes are visible to its own reads, and to
// classification only after Commit, all at once. A failed call inside a
// transaction changes nothing and does not doom it. Only one transaction
// is open per engine at a time.
type Txn struct {
	e        *Engine
	base     *state
	work     state
	cloned   uint32 // bit per table: 0 providers, 1 contexts, 2 sublayers, 3 callouts, 4+layer filters
	dirty    [numLayers]bool
	notifies []notifyEvent
	done     bool
	// fslab and cslab hold the filters and conditions the transaction
	// adds, allocated in chunks: one allocation per filter and one per
	// condition list made most of the garbage collector's work at a
	// million filters. A chunk lives while one of its filters does, so
	// the chunks start small and double (a transaction of one filter
	// allocates for one).
	fslab []Filter
	cslab []Condition
	// undo logs the filter tables' changes for RollbackTo; marks counts
	// the savepoints taken, live the ones still valid.
	undo  []undoEntry
	marks int
	live  []int
	// keys is the generated filter keys from keyFrom on, keyEnds[i] the
	// end of keyFrom+i's (filterKey).
	keys    string
	keyFrom FilterID
	keyEnds []uint32
}

// filterKey returns the generated key of a filter, "filter-<id>". The
// transaction's adds take consecutive IDs, so their keys are cut from one
// string made for the next ones (up to 64, doubling as fslab's chunks do)
// rather than allocated each.
func (tx *Txn) filterKey(id FilterID) string {
	if id < tx.keyFrom || id-tx.keyFrom >= FilterID(len(tx.keyEnds)) {
		n := FilterID(min(max(1, 2*len(tx.keyEnds)), 64)) // see fslab
		b := make([]byte, 0, n*16)
		tx.keyEnds = tx.keyEnds[:0]
		for i := range n {
			b = strconv.AppendUint(append(b, "filter-"...), uint64(id+i), 10)
			tx.keyEnds = append(tx.keyEnds, uint32(len(b)))
		}
		tx.keys, tx.keyFrom = string(b), id
	}
	i := id - tx.keyFrom
	start := uint32(0)
	if i > 0 {
		start = tx.keyEnds[i-1]
	}
	return tx.keys[start:tx.keyEnds[i]]
}

const (
	filterChunk    = 256
	conditionChunk = 1024
)

// newFilter returns a place for f that the transaction's later adds do
// not touch.
func (tx *Txn) newFilter(f *Filter) *Filter {
	if len(tx.fslab) == cap(tx.fslab) {
		tx.fslab = make([]Filter, 0, min(max(1, 2*cap(tx.fslab)), filterChunk))
	}
	tx.fslab = append(tx.fslab, *f)
	return &tx.fslab[len(tx.fslab)-1]
}

// cloneConditions copies cs into the condition chunk, capped so that an
// append to the copy cannot reach the next filter's conditions.
func (tx *Txn) cloneConditions(cs []Condition) []Condition {
	if len(cs) == 0 || len(cs) > conditionChunk/8 {
		return slices.Clone(cs)
	}
	if cap(tx.cslab)-len(tx.cslab) < len(cs) {
		tx.cslab = make([]Condition, 0, min(max(len(cs), 2*cap(tx.cslab)), conditionChunk))
	}
	i := len(tx.cslab)
	tx.cslab = append(tx.cslab, cs...)
	return tx.cslab[i:len(tx.cslab):len(tx.cslab)]
}

type notifyEvent struct {
	t    NotifyType
	f    *Filter
	slot *calloutSlot
}

// Begin opens a transaction, waiting while another is open until ctx ends.
func (e *Engine) Begin(ctx context.Context) (*Txn, error) {
	select {
	case e.txnSem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: waiting for the open transaction: %w", ErrTxnInProgress, ctx.Err())
	}
	base := e.state.Load()
	return &Txn{e: e, base: base, work: *base}, nil
}

// Update runs fn in a transaction and commits it when fn returns nil;
// otherwise it aborts and returns fn's error.
func (e *Engine) Update(fn func(tx *Txn) error) error {
	tx, err := e.Begin(context.Background())
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Abort()
		return err
	}
	return tx.Commit()
}

func (tx *Txn) check() error {
	if tx == nil || tx.done {
		return ErrNoTxnInProgress
	}
	return nil
}

func (tx *Txn) mutProviders() *table[ProviderID, Provider] {
	if tx.cloned&1 == 0 {
		tx.work.providers, tx.cloned = tx.work.providers.clone(), tx.cloned|1
	}
	return tx.work.providers
}

func (tx *Txn) mutContexts() *table[ProviderContextID, ProviderContext] {
	if tx.cloned&2 == 0 {
		tx.work.contexts, tx.cloned = tx.work.contexts.clone(), tx.cloned|2
	}
	return tx.work.contexts
}

func (tx *Txn) mutSublayers() *table[SublayerID, Sublayer] {
	if tx.cloned&4 == 0 {
		tx.work.sublayers, tx.cloned = tx.work.sublayers.clone(), tx.cloned|4
	}
	return tx.work.sublayers
}

func (tx *Txn) mutCallouts() *table[CalloutID, Callout] {
	if tx.cloned&8 == 0 {
		tx.work.callouts, tx.cloned = tx.work.callouts.clone(), tx.cloned|8
	}
	return tx.work.callouts
}

func (tx *Txn) mutFilters(l LayerID) *filterTable {
	bit := uint32(1) << (4 + uint32(l))
	if tx.cloned&bit == 0 {
		tx.work.filters[l], tx.cloned = tx.work.filters[l].clone(), tx.cloned|bit
	}
	tx.dirty[l] = true
	return tx.work.filters[l]
}

// Commit compiles every changed layer and publishes the new state in one
// atomic swap, then calls the notify functions of the callouts concerned.
func (tx *Txn) Commit() error {
	if err := tx.check(); err != nil {
		return err
	}
	tx.done = true
	defer func() { <-tx.e.txnSem }()
	s := tx.work
	for l := LayerID(1); l < numLayers; l++ {
		if tx.dirty[l] {
			// The table is this transaction's copy (or a savepoint's,
			// which ends with it): compact allocates new entries anyway.
			s.filters[l].compact()
			s.compiled[l] = compileLayer(l, &s, tx.e)
		}
	}
	tx.e.state.Store(&s)
	for _, n := range tx.notifies {
		tx.e.notify(n)
	}
	return nil
}

// Abort discards the transaction's changes.
func (tx *Txn) Abort() {
	if tx == nil || tx.done {
		return
	}
	tx.done = true
	<-tx.e.txnSem
}

// Pending reports how many filter changes the transaction holds.
func (tx *Txn) Pending() int { return len(tx.notifies) }

// Savepoint marks a transaction's state so that RollbackTo can undo the
// calls made after it without aborting the transaction: a management
// plane's batch inside an open transaction must be all or nothing.
type Savepoint struct {
	work     state
	dirty    [numLayers]bool
	notifies int
	undo     int // len(Txn.undo) at the mark
	seq      int
}

// Savepoint returns a mark of the transaction's current state, which it
// can be rolled back to any number of times (until it is rolled back to
// an earlier mark). The small tables are copied again on their next
// write, so the ones a mark holds are never changed; the filter tables
// are copied once per transaction and their changes undone from a log
// instead: copying a million-filter table at each of a client's batches
// was quadratic.
func (tx *Txn) Savepoint() Savepoint {
	tx.marks++
	sp := Savepoint{work: tx.work, dirty: tx.dirty, notifies: len(tx.notifies), undo: len(tx.undo), seq: tx.marks}
	tx.live = append(tx.live, sp.seq)
	tx.cloned &^= 0xf
	return sp
}

// RollbackTo undoes every change made since sp was taken. IDs handed out
// since then are not reused. The marks taken after sp are no longer valid.
func (tx *Txn) RollbackTo(sp Savepoint) error {
	if err := tx.check(); err != nil {
		return err
	}
	i := slices.Index(tx.live, sp.seq)
	if i < 0 || sp.undo > len(tx.undo) {
		return fmt.Errorf("%w: the savepoint was undone by a rollback to an earlier one", ErrInvalidArgument)
	}
	tx.live = tx.live[:i+1]
	for j := len(tx.undo) - 1; j >= sp.undo; j-- {
		tx.work.filters[tx.undo[j].layer].undo(tx.undo[j])
	}
	tx.undo = tx.undo[:sp.undo]
	filters := tx.work.filters
	tx.work, tx.dirty = sp.work, sp.dirty
	for l := range filters {
		// A table first copied after the mark is dropped: the mark's
		// is the one it was copied from, unchanged.
		if filters[l] != sp.work.filters[l] {
			tx.cloned &^= 1 << (4 + uint32(l))
		} else {
			tx.work.filters[l] = filters[l]
		}
	}
	tx.cloned &^= 0xf
	tx.notifies = tx.notifies[:sp.notifies]
	return nil
}

func (e *Engine) newID(kind string) uint64 {
	e.idMu.Lock()
	defer e.idMu.Unlock()
	switch kind {
	case "provider":
		e.nextProvider++
		return uint64(e.nextProvider)
	case "context":
		e.nextContext++
		return uint64(e.nextContext)
	case "sublayer":
		e.nextSublayer++
		return uint64(e.nextSublayer)
	case "callout":
		e.nextCallout++
		return uint64(e.nextCallout)
	}
	e.nextFilter++
	return uint64(e.nextFilter)
}

func genKey(kind string, id uint64) string { return kind + "-" + strconv.FormatUint(id, 10) }

// AddProvider adds a provider and returns its ID.
func (tx *Txn) AddProvider(p Provider) (ProviderID, error) {
	if err := tx.check(); err != nil {
		return 0, err
	}
	if p.Key != "" {
		if _, ok := tx.work.providers.byKey[p.Key]; ok {
			return 0, fmt.Errorf("%w: provider key %q", ErrAlreadyExists, p.Key)
		}
	}
	p.ID = ProviderID(tx.e.newID("provider"))
	if p.Key == "" {
		p.Key = genKey("provider", uint64(p.ID))
	}
	tx.mutProviders().put(p.ID, p.Key, &p)
	return p.ID, nil
}

func (tx *Txn) checkProvider(id ProviderID) error {
	if id == 0 {
		return nil
	}
	if _, ok := tx.work.providers.byID[id]; !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return nil
}

// AddProviderContext adds a provider context and returns its ID.
func (tx *Txn) AddProviderContext(c ProviderContext) (ProviderContextID, error) {
	if err := tx.check(); err != nil {
		return 0, err
	}
	if err := tx.checkProvider(c.Provider); err != nil {
		return 0, err
	}
	if c.Key != "" {
		if _, ok := tx.work.contexts.byKey[c.Key]; ok {
			return 0, fmt.Errorf("%w: provider context key %q", ErrAlreadyExists, c.Key)
		}
	}
	c.ID = ProviderContextID(tx.e.newID("context"))
	if c.Key == "" {
		c.Key = genKey("context", uint64(c.ID))
	}
	c.Data = slices.Clone(c.Data)
	tx.mutContexts().put(c.ID, c.Key, &c)
	return c.ID, nil
}

// AddSublayer adds a sublayer and returns its ID.
func (tx *Txn) AddSublayer(s Sublayer) (SublayerID, error) {
	if err := tx.check(); err != nil {
		return 0, err
	}
	if err := tx.checkProvider(s.Provider); err != nil {
		return 0, err
	}
	if s.Key != "" {
		if _, ok := tx.work.sublayers.byKey[s.Key]; ok {
			return 0, fmt.Errorf("%w: sublayer key %q", ErrAlreadyExists, s.Key)
		}
	}
	s.ID = SublayerID(tx.e.newID("sublayer"))
	if s.Key == "" {
		s.Key = genKey("sublayer", uint64(s.ID))
	}
	tx.mutSublayers().put(s.ID, s.Key, &s)
	return s.ID, nil
}

// AddCallout adds a callout's management object and returns its ID.
func (tx *Txn) AddCallout(c Callout) (CalloutID, error) {
	if err := tx.check(); err != nil {
		return 0, err
	}
	if !c.Layer.Valid() {
		return 0, fmt.Errorf("%w: callout layer %d", ErrInvalidLayer, c.Layer)
	}
	if err := tx.checkProvider(c.Provider); err != nil {
		return 0, err
	}
	if c.Key != "" {
		if _, ok := tx.work.callouts.byKey[c.Key]; ok {
			return 0, fmt.Errorf("%w: callout key %q", ErrAlreadyExists, c.Key)
		}
	}
	c.ID = CalloutID(tx.e.newID("callout"))
	if c.Key == "" {
		c.Key = genKey("callout", uint64(c.ID))
	}
	tx.mutCallouts().put(c.ID, c.Key, &c)
	return c.ID, nil
}

// MaxConditions bounds a filter's conditions.
const MaxConditions = 1 << 21

// ValidateFilter checks a filter against the engine's current objects and
// the layer's schema without adding it.
func (tx *Txn) ValidateFilter(f *Filter) error {
	if err := tx.check(); err != nil {
		return err
	}
	l := LayerByID(f.Layer)
	if l == nil {
		return fmt.Errorf("%w: %d", ErrInvalidLayer, f.Layer)
	}
	if f.Sublayer != 0 {
		if _, ok := tx.work.sublayers.byID[f.Sublayer]; !ok {
			return fmt.Errorf("%w: %s", ErrNotFound, f.Sublayer)
		}
	}
	if err := tx.checkProvider(f.Provider); err != nil {
		return err
	}
	if f.ProviderContext != 0 {
		if _, ok := tx.work.contexts.byID[f.ProviderContext]; !ok {
			return fmt.Errorf("%w: %s", ErrNotFound, f.ProviderContext)
		}
	}
	if f.Flags&^filterFlagsAll != 0 {
		return fmt.Errorf("%w: unknown filter flags %#x", ErrInvalidFlags, uint32(f.Flags&^filterFlagsAll))
	}
	switch f.Action.Type {
	case ActionBlock, ActionPermit:
		if f.Action.Callout != 0 {
			return fmt.Errorf("%w: a %s filter names no callout", ErrInvalidAction, f.Action.Type)
		}
		if f.Flags&FilterPermitIfCalloutUnregistered != 0 {
			return fmt.Errorf("%w: permit_if_callout_unregistered needs a terminating or unknown callout action", ErrInvalidFlags)
		}
	case ActionCalloutTerminating, ActionCalloutInspection, ActionCalloutUnknown:
		c, ok := tx.work.callouts.byID[f.Action.Callout]
		if !ok {
			return fmt.Errorf("%w: %s", ErrCalloutNotFound, f.Action.Callout)
		}
		if c.Layer != f.Layer {
			return fmt.Errorf("%w: %s applies to %s, the filter is on %s", ErrIncompatibleLayer, c.ID, c.Layer, f.Layer)
		}
		if f.Action.Type == ActionCalloutInspection && f.Flags&FilterPermitIfCalloutUnregistered != 0 {
			return fmt.Errorf("%w: permit_if_callout_unregistered is not valid on an inspection filter", ErrInvalidFlags)
		}
	default:
		return fmt.Errorf("%w: %s", ErrInvalidAction, f.Action.Type)
	}
	if len(f.Conditions) > MaxConditions {
		return fmt.Errorf("%w: %d conditions exceed %d", ErrInvalidCondition, len(f.Conditions), MaxConditions)
	}
	for i, c := range f.Conditions {
		if err := c.validate(l); err != nil {
			return fmt.Errorf("condition %d: %w", i, err)
		}
	}
	if _, err := f.Weight.effective(f.Conditions); err != nil {
		return err
	}
	return nil
}

// AddFilter validates and adds a filter and returns its ID.
func (tx *Txn) AddFilter(f Filter) (FilterID, error) {
	if err := tx.check(); err != nil {
		return 0, err
	}
	if err := tx.ValidateFilter(&f); err != nil {
		return 0, err
	}
	keyGiven := f.Key != ""
	if keyGiven && tx.work.filterByKey(f.Key) != nil {
		return 0, fmt.Errorf("%w: filter key %q", ErrAlreadyExists, f.Key)
	}
	f.ID = FilterID(tx.e.newID("filter"))
	if !keyGiven {
		f.Key = tx.filterKey(f.ID)
	}
	if f.Sublayer == 0 {
		f.Sublayer = UniversalSublayer
	}
	f.Conditions = tx.cloneConditions(f.Conditions)
	f.EffectiveWeight, _ = f.Weight.effective(f.Conditions)
	p := tx.newFilter(&f)
	tx.mutFilters(f.Layer).add(p, keyGiven)
	if len(tx.live) > 0 {
		tx.undo = append(tx.undo, undoEntry{layer: f.Layer, idx: -1, key: keyGiven})
	}
	if f.Action.Type.IsCallout() {
		tx.notifies = append(tx.notifies, notifyEvent{NotifyAddFilter, p, tx.slotOf(f.Action.Callout)})
	}
	return f.ID, nil
}

// DeleteFilter deletes a filter.
func (tx *Txn) DeleteFilter(id FilterID) error {
	if err := tx.check(); err != nil {
		return err
	}
	f, l := tx.work.findFilter(id)
	if f == nil {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	idx, keyDeleted := tx.mutFilters(l).del(f)
	if len(tx.live) > 0 {
		tx.undo = append(tx.undo, undoEntry{layer: l, idx: idx, f: f, key: keyDeleted})
	}
	if f.Action.Type.IsCallout() {
		tx.notifies = append(tx.notifies, notifyEvent{NotifyDeleteFilter, f, tx.slotOf(f.Action.Callout)})
	}
	return nil
}

func (tx *Txn) slotOf(id CalloutID) *calloutSlot {
	if c, ok := tx.work.callouts.byID[id]; ok {
		return tx.e.slot(c.Key)
	}
	return nil
}

// DeleteFilterByKey deletes a filter by key.
func (tx *Txn) DeleteFilterByKey(key string) error {
	if err := tx.check(); err != nil {
		return err
	}
	f, err := tx.FilterByKey(key)
	if err != nil {
		return err
	}
	return tx.DeleteFilter(f.ID)
}

// refs returns a reason the object is still referenced, or "".
func (s *state) refs(match func(f *Filter) bool) string {
	for l := LayerID(1); l < numLayers; l++ {
		by := ""
		s.filters[l].each(func(f *Filter) bool {
			if match(f) {
				by = f.Describe()
			}
			return by == ""
		})
		if by != "" {
			return by
		}
	}
	return ""
}

// DeleteProvider deletes a provider no object refers to.
func (tx *Txn) DeleteProvider(id ProviderID) error {
	if err := tx.check(); err != nil {
		return err
	}
	p, ok := tx.work.providers.byID[id]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	by := tx.work.refs(func(f *Filter) bool { return f.Provider == id })
	for _, s := range tx.work.sublayers.byID {
		if s.Provider == id {
			by = Describe("sublayer", s.Key, uint64(s.ID))
		}
	}
	for _, c := range tx.work.callouts.byID {
		if c.Provider == id {
			by = Describe("callout", c.Key, uint64(c.ID))
		}
	}
	for _, c := range tx.work.contexts.byID {
		if c.Provider == id {
			by = Describe("provider_context", c.Key, uint64(c.ID))
		}
	}
	if by != "" {
		return fmt.Errorf("%w: %s is referenced by %s", ErrInUse, Describe("provider", p.Key, uint64(id)), by)
	}
	tx.mutProviders().del(id, p.Key)
	return nil
}

// DeleteProviderContext deletes a provider context no filter refers to.
func (tx *Txn) DeleteProviderContext(id ProviderContextID) error {
	if err := tx.check(); err != nil {
		return err
	}
	c, ok := tx.work.contexts.byID[id]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if by := tx.work.refs(func(f *Filter) bool { return f.ProviderContext == id }); by != "" {
		return fmt.Errorf("%w: %s is referenced by %s", ErrInUse, Describe("provider_context", c.Key, uint64(id)), by)
	}
	tx.mutContexts().del(id, c.Key)
	return nil
}

// DeleteSublayer deletes a sublayer no filter is in. The universal
// sublayer cannot be deleted.
func (tx *Txn) DeleteSublayer(id SublayerID) error {
	if err := tx.check(); err != nil {
		return err
	}
	s, ok := tx.work.sublayers.byID[id]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if id == UniversalSublayer {
		return fmt.Errorf("%w: the universal sublayer is built in", ErrInUse)
	}
	if by := tx.work.refs(func(f *Filter) bool { return f.Sublayer == id }); by != "" {
		return fmt.Errorf("%w: %s is referenced by %s", ErrInUse, Describe("sublayer", s.Key, uint64(id)), by)
	}
	tx.mutSublayers().del(id, s.Key)
	return nil
}

// DeleteCallout deletes a callout no filter uses.
func (tx *Txn) DeleteCallout(id CalloutID) error {
	if err := tx.check(); err != nil {
		return err
	}
	c, ok := tx.work.callouts.byID[id]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if by := tx.work.refs(func(f *Filter) bool { return f.Action.Type.IsCallout() && f.Action.Callout == id }); by != "" {
		return fmt.Errorf("%w: %s is referenced by %s", ErrInUse, Describe("callout", c.Key, uint64(id)), by)
	}
	tx.mutCallouts().del(id, c.Key)
	return nil
}

// View is a read-only view of one engine state: the committed one
// (Engine.View) or a transaction's working one (a Txn embeds the same
// readers through its methods).
type View struct{ s *state }

// View returns a view of the committed state.
func (e *Engine) View() View { return View{e.state.Load()} }

// View returns a view of the transaction's working state.
func (tx *Txn) View() View { return View{&tx.work} }

// Filter returns a copy of a filter.
func (v View) Filter(id FilterID) (Filter, error) {
	f, _ := v.s.findFilter(id)
	if f == nil {
		return Filter{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	return cloneFilter(f), nil
}

// FilterByKey returns a copy of a filter found by key.
func (v View) FilterByKey(key string) (Filter, error) {
	if f := v.s.filterByKey(key); f != nil {
		return cloneFilter(f), nil
	}
	return Filter{}, fmt.Errorf("%w: filter key %q", ErrNotFound, key)
}

// FilterByKey returns a copy of a filter of the working state, by key.
func (tx *Txn) FilterByKey(key string) (Filter, error) { return tx.View().FilterByKey(key) }

func cloneFilter(f *Filter) Filter {
	c := *f
	c.Conditions = slices.Clone(f.Conditions)
	return c
}

func getByID[I ~uint32 | ~uint64, T any](t *table[I, T], id I) (T, error) {
	if p, ok := t.byID[id]; ok {
		return *p, nil
	}
	var zero T
	return zero, fmt.Errorf("%w: %v", ErrNotFound, id)
}

func getByKey[I ~uint32 | ~uint64, T any](t *table[I, T], kind, key string) (T, error) {
	if id, ok := t.byKey[key]; ok {
		return *t.byID[id], nil
	}
	var zero T
	return zero, fmt.Errorf("%w: %s key %q", ErrNotFound, kind, key)
}

func enum[I ~uint32 | ~uint64, T any](t *table[I, T], keep func(*T) bool) []T {
	var out []T
	for _, id := range t.sorted() {
		if p := t.byID[id]; keep == nil || keep(p) {
			out = append(out, *p)
		}
	}
	return out
}

// Provider returns a provider by ID.
func (v View) Provider(id ProviderID) (Provider, error) { return getByID(v.s.providers, id) }

// ProviderByKey returns a provider by key.
func (v View) ProviderByKey(key string) (Provider, error) {
	return getByKey(v.s.providers, "provider", key)
}

// Providers lists the providers by ID.
func (v View) Providers() []Provider { return enum(v.s.providers, nil) }

// ProviderContext returns a provider context by ID.
func (v View) ProviderContext(id ProviderContextID) (ProviderContext, error) {
	c, err := getByID(v.s.contexts, id)
	c.Data = slices.Clone(c.Data)
	return c, err
}

// ProviderContextByKey returns a provider context by key.
func (v View) ProviderContextByKey(key string) (ProviderContext, error) {
	c, err := getByKey(v.s.contexts, "provider context", key)
	c.Data = slices.Clone(c.Data)
	return c, err
}

// ProviderContexts lists the provider contexts by ID, optionally of one provider.
func (v View) ProviderContexts(provider ProviderID) []ProviderContext {
	out := enum(v.s.contexts, func(c *ProviderContext) bool { return provider == 0 || c.Provider == provider })
	for i := range out {
		out[i].Data = slices.Clone(out[i].Data) // the engine's copy stays immutable
	}
	return out
}

// Sublayer returns a sublayer by ID.
func (v View) Sublayer(id SublayerID) (Sublayer, error) { return getByID(v.s.sublayers, id) }

// SublayerByKey returns a sublayer by key.
func (v View) SublayerByKey(key string) (Sublayer, error) {
	return getByKey(v.s.sublayers, "sublayer", key)
}

// Sublayers lists the sublayers by ID, optionally of one provider.
func (v View) Sublayers(provider ProviderID) []Sublayer {
	return enum(v.s.sublayers, func(s *Sublayer) bool { return provider == 0 || s.Provider == provider })
}

// Callout returns a callout by ID.
func (v View) Callout(id CalloutID) (Callout, error) { return getByID(v.s.callouts, id) }

// CalloutByKey returns a callout by key.
func (v View) CalloutByKey(key string) (Callout, error) {
	return getByKey(v.s.callouts, "callout", key)
}

// Callouts lists the callouts by ID, optionally of one provider or layer.
func (v View) Callouts(provider ProviderID, layer LayerID) []Callout {
	return enum(v.s.callouts, func(c *Callout) bool {
		return (provider == 0 || c.Provider == provider) && (layer == 0 || c.Layer == layer)
	})
}

// FilterTemplate selects filters for enumeration; zero fields match all
// (WFP's FWPM_FILTER_ENUM_TEMPLATE0).
type FilterTemplate struct {
	Layer      LayerID
	Sublayer   SublayerID
	Provider   ProviderID
	Callout    CalloutID
	ActionType ActionType
}

func (t *FilterTemplate) keep(f *Filter) bool {
	return (t.Sublayer == 0 || f.Sublayer == t.Sublayer) &&
		(t.Provider == 0 || f.Provider == t.Provider) &&
		(t.Callout == 0 || (f.Action.Type.IsCallout() && f.Action.Callout == t.Callout)) &&
		(t.ActionType == 0 || f.Action.Type == t.ActionType)
}

// Filters lists the filters the template selects, by layer and then in
// evaluation order (sublayer weight, filter weight, ID).
func (v View) Filters(t FilterTemplate) []Filter {
	var out []Filter
	if t == (FilterTemplate{Layer: t.Layer}) {
		out = make([]Filter, 0, v.FilterCount(t.Layer))
	}
	for f := range v.SharedFilters(t) {
		out = append(out, cloneFilter(f))
	}
	return out
}

// SharedFilters yields the filters Filters returns, in the same order,
// without copying them: each is the engine's own, immutable and shared
// with every other reader, so neither it nor its conditions may be
// modified. A compiler of a million filters reads them so: their copies
// cost as much as its own work.
func (v View) SharedFilters(t FilterTemplate) iter.Seq[*Filter] {
	return func(yield func(*Filter) bool) {
		for l := LayerID(1); l < numLayers; l++ {
			if t.Layer != 0 && t.Layer != l {
				continue
			}
			for _, f := range v.s.orderedFilters(l) {
				if t.keep(f) && !yield(f) {
					return
				}
			}
		}
	}
}

// FilterCount returns the number of filters on a layer (all layers for 0).
func (v View) FilterCount(l LayerID) int {
	n := 0
	for id := LayerID(1); id < numLayers; id++ {
		if l == 0 || l == id {
			n += v.s.filters[id].live
		}
	}
	return n
}
