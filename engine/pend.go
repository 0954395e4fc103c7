package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Errors of the pend and classify-handle APIs.
var (
	ErrCannotPend        = errors.New("fwp: cannot pend") // STATUS_FWP_CANNOT_PEND
	ErrPendResolved      = errors.New("fwp: pend already completed or timed out")
	ErrHandleInvalid     = errors.New("fwp: invalid or stale handle")
	ErrInvalidLayerData  = errors.New("fwp: invalid modified layer data")
	ErrRedirectRecords   = errors.New("fwp: malformed redirect records")
	ErrRecordsNotTrusted = errors.New("fwp: redirect records not issued by this engine")
)

// ErrNoWriteRight: the callout was called without FWPS_RIGHT_ACTION_WRITE,
// so it may not pend (seed 003); it comes wrapped with ErrCannotPend.
var ErrNoWriteRight = errors.New("fwp: the callout does not hold the ACTION_WRITE right")

// CompletionHandle is the metadata's completion handle: valid only inside
// the classify that carries it (WFP's completionHandle).
type CompletionHandle struct {
	cs  *classifyState
	seq uint64
}

// IsValid reports whether the handle was set.
func (h CompletionHandle) IsValid() bool { return h.cs != nil }

type pendKind uint8

const (
	pendOperation pendKind = iota + 1 // PendOperation at auth / resource layers
	pendClassify                      // PendClassify at redirect / closure layers
)

// PendOutcome is how a pend resolved.
type PendOutcome uint8

const (
	PendWaiting     PendOutcome = iota
	PendCompleted               // CompleteOperation / CompleteClassify
	PendTimedOut                // the deadline passed; the filter's default applies
	PendCanceled                // the datapath gave up (the connection went away)
	PendCalloutGone             // its callout went away under a fail-closed filter: blocked (FailPendClosed)
)

func (o PendOutcome) String() string {
	return [...]string{"waiting", "completed", "timed_out", "canceled", "callout_gone"}[o]
}

// FailPendClosed resolves a pend whose callout went away (a remote
// callout's program died) under a filter without
// PERMIT_IF_CALLOUT_UNREGISTERED: the classification is blocked at once,
// as callout_unregistered_block, without the reauthorization (or resumed
// classify) a completion brings — by then the filter itself may be gone
// too (a dynamic session that ends with the program), and the flag that
// said "closed" with it. A fail-open pend is completed instead, so that
// the rest of the policy still has its say.
func (e *Engine) FailPendClosed(p *Pend) error {
	if p == nil || p.e != e {
		return fmt.Errorf("%w: not a pend of this engine", ErrHandleInvalid)
	}
	if !p.resolve(PendCalloutGone) {
		return fmt.Errorf("%w: %s", ErrPendResolved, p.Outcome())
	}
	return nil
}

// Pend is a pended classification: the completion context of PendOperation
// and the state behind a pended classify handle. It resolves exactly once.
type Pend struct {
	e        *Engine
	kind     pendKind
	layer    LayerID
	filter   FilterID
	sublayer SublayerID
	callout  CalloutID
	failOpen bool // the pending filter's PERMIT_IF_CALLOUT_UNREGISTERED
	deadline time.Time
	done     chan struct{}
	state    atomic.Uint32 // PendOutcome
	timer    *time.Timer

	mu        sync.Mutex
	out       ClassifyOut // CompleteClassify's output
	pendedOut ClassifyOut // what PendClassify wrote (block, no write right)
	reinject  any         // AUTH_RECV_ACCEPT: the held data handed back

	rd *redirectState
	// resume is set for a pended classify: its inputs and what was decided
	// before the pend, kept apart so a pended operation stays small.
	resume *pendResume
}

type pendResume struct {
	vs   Values
	meta Metadata
	memo resumeMemo
}

// Layer, Filter and Callout say where the pend happened.
func (p *Pend) Layer() LayerID     { return p.layer }
func (p *Pend) Filter() FilterID   { return p.filter }
func (p *Pend) Callout() CalloutID { return p.callout }

// Deadline is when the pend times out.
func (p *Pend) Deadline() time.Time { return p.deadline }

// Done is closed when the pend resolves.
func (p *Pend) Done() <-chan struct{} { return p.done }

// Outcome reports how the pend resolved (PendWaiting until then).
func (p *Pend) Outcome() PendOutcome { return PendOutcome(p.state.Load()) }

// Reinjected returns the data a callout handed back when completing a pend
// at AUTH_RECV_ACCEPT (nil: drop the held connection).
func (p *Pend) Reinjected() any {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.reinject
}

func (e *Engine) newPend(cs *classifyState, cf *cfilter, kind pendKind) *Pend {
	p := &Pend{
		e: e, kind: kind, layer: cs.layer, filter: cf.id, sublayer: cf.f.Sublayer, callout: cf.callout,
		failOpen: cf.flags&FilterPermitIfCalloutUnregistered != 0,
		deadline: e.opts.Now().Add(e.opts.PendTimeout),
		done:     make(chan struct{}),
	}
	e.rt.pendMu.Lock()
	e.rt.pends[p] = struct{}{}
	e.rt.pendMu.Unlock()
	p.mu.Lock() // the timer may fire before the assignment below is seen
	p.timer = time.AfterFunc(e.opts.PendTimeout, func() { p.resolve(PendTimedOut) })
	p.mu.Unlock()
	return p
}

// resolve moves the pend to its final outcome once; later calls fail.
func (p *Pend) resolve(o PendOutcome) bool {
	if !p.state.CompareAndSwap(uint32(PendWaiting), uint32(o)) {
		return false
	}
	p.mu.Lock()
	p.timer.Stop()
	p.mu.Unlock()
	rt := &p.e.rt
	rt.pendMu.Lock()
	delete(rt.pends, p)
	rt.pendMu.Unlock()
	if o != PendCompleted && p.rd != nil {
		p.rd.releaseHandles()
	}
	close(p.done)
	return true
}

// Cancel resolves a pend the datapath no longer waits for.
func (p *Pend) Cancel() { p.resolve(PendCanceled) }

// PendOperation pends the current classification (FwpsPendOperation0). It
// is valid inside classify at AUTH_CONNECT, AUTH_RECV_ACCEPT, AUTH_LISTEN and
// RESOURCE_ASSIGNMENT, not during a reauthorization. The callout then
// returns BLOCK with ABSORB, and later calls CompleteOperation, from any
// goroutine, with the Pend returned here.
func (e *Engine) PendOperation(h CompletionHandle) (*Pend, error) {
	cs := h.cs
	if cs == nil || cs.seq != h.seq || cs.inCallout == nil || cs.e != e {
		return nil, fmt.Errorf("%w: not the completion handle of a classify in progress", ErrHandleInvalid)
	}
	l := LayerByID(cs.layer)
	if !l.CanPendOperation {
		return nil, fmt.Errorf("%w: layer %s does not pend operations", ErrCannotPend, l.Name)
	}
	if err := e.mayPend(cs, cs.inCallout); err != nil {
		return nil, err
	}
	if uint32(cs.vs.v[FieldFlags].n)&FlagIsReauthorize != 0 {
		return nil, fmt.Errorf("%w: the flow is being reauthorized", ErrCannotPend)
	}
	if cs.pend != nil {
		return nil, fmt.Errorf("%w: the classification is already pended", ErrCannotPend)
	}
	p := e.newPend(cs, cs.inCallout, pendOperation)
	cs.pend, cs.pendAt = p, cs.inCallout
	return p, nil
}

// mayPend refuses, and counts, a pend by a callout called without the
// ACTION_WRITE right: seed 003 says such a callout must not pend nor
// change the action, and a pend would end in a block (its timeout, or the
// callout's later answer) under a decision a higher sublayer made final.
func (e *Engine) mayPend(cs *classifyState, cf *cfilter) error {
	if cs.rights&RightActionWrite != 0 {
		return nil
	}
	e.counters[cs.layer].pendRefused.Add(1)
	return fmt.Errorf("%w: %w: %s was called under a final decision", ErrCannotPend, ErrNoWriteRight, cf.id)
}

// PendOperation is FwpsPendOperation0 with the request's completion handle.
func (r *ClassifyRequest) PendOperation() (*Pend, error) {
	if r.cs == nil {
		return nil, ErrHandleInvalid
	}
	return r.e.PendOperation(CompletionHandle{r.cs, r.cs.seq})
}

// CompleteOperation completes a pended operation (FwpsCompleteOperation0).
// The datapath then reauthorizes the flow: it classifies again with
// FlagIsReauthorize and the callout answers with the decision it kept.
// At AUTH_RECV_ACCEPT reinject is the held connection or packet to hand
// back, as WFP's callout reinjects the packet it cloned: nil drops it;
// otherwise the layer is reauthorized with it as layer data, and it is
// delivered only if the whole layer then permits.
func (e *Engine) CompleteOperation(p *Pend, reinject any) error {
	if p == nil || p.e != e || p.kind != pendOperation {
		return fmt.Errorf("%w: not a pended operation of this engine", ErrHandleInvalid)
	}
	p.mu.Lock()
	p.reinject = reinject
	p.mu.Unlock()
	if !p.resolve(PendCompleted) {
		return fmt.Errorf("%w: %s", ErrPendResolved, p.Outcome())
	}
	return nil
}

// Wait blocks until the pend resolves or ctx ends; on ctx's end the pend is
// canceled.
func (p *Pend) Wait(ctx context.Context) PendOutcome {
	select {
	case <-p.done:
	case <-ctx.Done():
		p.resolve(PendCanceled)
		<-p.done
	}
	return p.Outcome()
}

// ClassifyWait classifies and, when a callout pends, waits for the pend and
// finishes the classification the way WFP does: a completed operation is
// reauthorized (classified again with FlagIsReauthorize; at
// AUTH_RECV_ACCEPT with the data the callout reinjected, none: dropped); a
// completed classify resumes with the callout's final ClassifyOut; a timed-out pend
// applies the filter's default (permit with PERMIT_IF_CALLOUT_UNREGISTERED,
// else block); a canceled one blocks. vs and meta may be changed (the
// reauthorize flag).
func (e *Engine) ClassifyWait(ctx context.Context, layer LayerID, vs *Values, meta *Metadata, layerData any) (Result, error) {
	return e.ClassifyWaitNotify(ctx, layer, vs, meta, layerData, nil)
}

// ClassifyWaitNotify is ClassifyWait calling pended (when not nil) once,
// before it waits, if a callout pends: a datapath can then stop holding
// other traffic behind this classification.
func (e *Engine) ClassifyWaitNotify(ctx context.Context, layer LayerID, vs *Values, meta *Metadata, layerData any, pended func()) (Result, error) {
	res := e.ClassifyLayerData(layer, vs, meta, layerData)
	if res.Pend != nil && pended != nil {
		pended()
	}
	// A resumed classify may meet another pending callout; each pend
	// resolves before the next, and the number of callouts bounds the loop.
	for res.Pend != nil {
		p := res.Pend
		res = e.finishPend(p, p.Wait(ctx), vs, meta)
		if err := ctx.Err(); err != nil {
			if res.Pend != nil {
				res.Pend.Cancel()
				res.Pend = nil
			}
			return res, err
		}
	}
	return res, nil
}

func (e *Engine) finishPend(p *Pend, o PendOutcome, vs *Values, meta *Metadata) Result {
	base := Result{Filter: p.filter, Sublayer: p.sublayer, Callout: p.callout}
	switch o {
	case PendTimedOut:
		base.Reason = ReasonPendTimeout
		if p.failOpen {
			base.ClassifyOut = ClassifyOut{Action: ActionPermit}
		} else {
			base.ClassifyOut = ClassifyOut{Action: ActionBlock}
		}
		if vs != nil {
			e.recordEvent(&classifyState{layer: p.layer, vs: vs, meta: meta}, &base)
		}
		e.count(p.layer, &base)
		return base
	case PendCalloutGone:
		base.Reason = ReasonCalloutUnregisteredBlock
		base.ClassifyOut = ClassifyOut{Action: ActionBlock}
		if vs != nil {
			e.recordEvent(&classifyState{layer: p.layer, vs: vs, meta: meta}, &base)
		}
		e.count(p.layer, &base)
		return base
	case PendCanceled:
		base.Reason = ReasonPended
		base.ClassifyOut = ClassifyOut{Action: ActionBlock, Flags: OutAbsorb}
		return base
	}
	if p.kind == pendClassify {
		return e.resume(p)
	}
	var data any
	if p.layer.Kind() == KindAuthRecvAccept {
		// The callout hands back the held data to reinject (nil drops
		// it). Reinjected data is authorized again like any other: the
		// whole layer decides, lower sublayers included (seed 002).
		if data = p.Reinjected(); data == nil {
			base.Reason = ReasonCalloutBlock
			base.ClassifyOut = ClassifyOut{Action: ActionBlock, Flags: OutAbsorb}
			return base
		}
	}
	vs.Set(FieldFlags, Uint32(uint32(vs.Uint(FieldFlags))|FlagIsReauthorize))
	r := e.ClassifyLayerData(p.layer, vs, meta, data)
	if r.Pend != nil { // cannot happen: pends fail during reauthorization
		r.Pend.Cancel()
		r.Pend = nil
	}
	return r
}

// resumeMemo keeps the outputs of the callouts called before a pend, so a
// resumed classify does not call them twice: the first memoInline in
// place, the rest in more (whose buffer a pooled classifyState keeps, so
// that classifies calling many callouts allocate only when they pend).
type resumeMemo struct {
	n    int
	ids  [memoInline]FilterID
	out  [memoInline]ClassifyOut
	more []memoEntry
}

const memoInline = 16

type memoEntry struct {
	id  FilterID
	out ClassifyOut
}

func (m *resumeMemo) lookup(id FilterID) (ClassifyOut, bool) {
	for i := 0; i < m.n; i++ {
		if m.ids[i] == id {
			return m.out[i], true
		}
	}
	for i := range m.more {
		if m.more[i].id == id {
			return m.more[i].out, true
		}
	}
	return ClassifyOut{}, false
}

func (m *resumeMemo) add(id FilterID, out ClassifyOut) {
	if m.n < len(m.ids) {
		m.ids[m.n], m.out[m.n] = id, out
		m.n++
		return
	}
	m.more = append(m.more, memoEntry{id, out})
}

// keep returns cs's memo buffer emptied, to put back after cs is cleared
// (in place: cheaper than a literal that reads cs).
func (cs *classifyState) keep() []memoEntry { return cs.called.more[:0] }

// clone is m with more of its own, for a pend to keep once the pooled
// classifyState that shares m's buffer is reused.
func (m *resumeMemo) clone() resumeMemo {
	c := *m
	c.more = nil
	if len(m.more) > 0 {
		c.more = append([]memoEntry(nil), m.more...)
	}
	return c
}

func (cs *classifyState) remember(id FilterID, out ClassifyOut) {
	switch {
	case cs.memo != nil: // a resume: a later callout may pend again
		cs.memo.add(id, out)
	case layers[cs.layer].CanPendClassify: // a later callout may pend
		cs.called.add(id, out)
	}
}

// reset clears cs for the pool, keeping the buffer of its memo.
func (cs *classifyState) reset() {
	more := cs.keep()
	*cs = classifyState{}
	cs.called.more = more
}

// ClassifyHandle is a handle on one classification for the asynchronous
// recipes of seed 001 (FwpsAcquireClassifyHandle0).
type ClassifyHandle struct{ h *classifyHandle }

type classifyHandle struct {
	e        *Engine
	layer    LayerID
	filter   *cfilter
	cs       *classifyState // while the classify runs
	seq      uint64
	rd       *redirectState
	pend     *Pend
	released atomic.Bool
}

// AcquireClassifyHandle returns a handle on the running classification. It
// must be released with ReleaseClassifyHandle.
func (r *ClassifyRequest) AcquireClassifyHandle() (ClassifyHandle, error) {
	cs := r.cs
	if cs == nil || cs.inCallout == nil {
		return ClassifyHandle{}, fmt.Errorf("%w: only inside classify", ErrHandleInvalid)
	}
	h := &classifyHandle{e: r.e, layer: cs.layer, filter: cs.inCallout, cs: cs, seq: cs.seq, rd: cs.redirect()}
	h.rd.mu.Lock()
	h.rd.handles = append(h.rd.handles, h)
	h.rd.mu.Unlock()
	r.e.rt.handles.Add(1)
	return ClassifyHandle{h}, nil
}

// ReleaseClassifyHandle releases a classify handle (FwpsReleaseClassifyHandle0).
// Releasing twice is harmless; a handle whose pend timed out was released
// by the engine.
func (e *Engine) ReleaseClassifyHandle(h ClassifyHandle) {
	if h.h != nil && h.h.e == e && h.h.released.CompareAndSwap(false, true) {
		e.rt.handles.Add(-1)
	}
}

func (h ClassifyHandle) check(e *Engine) (*classifyHandle, error) {
	if h.h == nil || h.h.e != e {
		return nil, fmt.Errorf("%w: not a classify handle of this engine", ErrHandleInvalid)
	}
	if h.h.released.Load() {
		return nil, fmt.Errorf("%w: classify handle released", ErrHandleInvalid)
	}
	return h.h, nil
}

// PendClassify pends the classification of the handle (FwpsPendClassify0),
// valid inside classify at CONNECT_REDIRECT, BIND_REDIRECT and
// ENDPOINT_CLOSURE. The engine sets out to BLOCK with ACTION_WRITE cleared,
// as the seed's recipe does. CompleteClassify ends it.
func (e *Engine) PendClassify(h ClassifyHandle, out *ClassifyOut) (*Pend, error) {
	ch, err := h.check(e)
	if err != nil {
		return nil, err
	}
	cs := ch.cs
	if cs == nil || cs.seq != ch.seq || cs.inCallout != ch.filter {
		return nil, fmt.Errorf("%w: PendClassify is only valid inside the classify of its handle", ErrHandleInvalid)
	}
	if !LayerByID(ch.layer).CanPendClassify {
		return nil, fmt.Errorf("%w: layer %s does not pend classifies", ErrCannotPend, ch.layer)
	}
	if err := e.mayPend(cs, ch.filter); err != nil {
		return nil, err
	}
	if cs.pend != nil {
		return nil, fmt.Errorf("%w: the classification is already pended", ErrCannotPend)
	}
	p := e.newPend(cs, ch.filter, pendClassify)
	out.Action = ActionBlock
	out.Rights &^= RightActionWrite
	p.pendedOut = *out
	memo := &cs.called
	if cs.memo != nil { // pended again after a resume
		memo = cs.memo
	}
	p.resume = &pendResume{vs: *cs.vs, memo: memo.clone()}
	if cs.meta != nil {
		p.resume.meta = *cs.meta
		p.resume.meta.CompletionHandle = CompletionHandle{}
		p.resume.meta.Present &^= MetaCompletionHandle
	}
	p.rd = ch.rd
	ch.pend = p
	cs.pend, cs.pendAt = p, ch.filter
	return p, nil
}

// CompleteClassify completes a pended classify with the callout's final
// output (FwpsCompleteClassify0), from any goroutine.
func (e *Engine) CompleteClassify(h ClassifyHandle, out ClassifyOut) error {
	ch, err := h.check(e)
	if err != nil {
		return err
	}
	p := ch.pend
	if p == nil {
		return fmt.Errorf("%w: the handle's classify was not pended", ErrHandleInvalid)
	}
	p.mu.Lock()
	p.out = out
	p.mu.Unlock()
	if !p.resolve(PendCompleted) {
		return fmt.Errorf("%w: %s", ErrPendResolved, p.Outcome())
	}
	return nil
}

// resume finishes a completed pended classify: the filters are evaluated
// again in order, callouts already called answer from the memo, the pending
// callout answers with its completed output, later callouts are called.
func (e *Engine) resume(p *Pend) Result {
	p.mu.Lock()
	out := p.out
	p.mu.Unlock()
	r := p.resume
	r.memo.add(p.filter, out)
	c := e.state.Load().compiled[p.layer]
	cs := csPool.Get().(*classifyState)
	more := cs.keep()
	*cs = classifyState{e: e, layer: p.layer, vs: &r.vs, meta: &r.meta, memo: &r.memo, rd: p.rd, seq: e.rt.nextSeq.Add(1)}
	cs.called.more = more
	res := c.classify(cs)
	if cs.rd != nil {
		res = c.reauthorize(cs, res) // seed 001: the flag applies after FwpsCompleteClassify too
	}
	e.afterClassify(cs, &res)
	cs.reset()
	csPool.Put(cs)
	return res
}
