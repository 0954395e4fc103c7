package engine

import (
	"crypto/rand"
	"fmt"
	"sync"
	"sync/atomic"
)

// runtime is the callout runtime's mutable state: registrations, flow
// contexts, pends, classify and redirect handles.
type runtime struct {
	e *Engine

	flowMu    sync.RWMutex
	flows     map[flowKey]any
	byFlow    map[FlowHandle][]flowKey
	nflows    atomic.Int64
	nextFlow  atomic.Uint64
	nextSeq   atomic.Uint64
	nextRedir atomic.Uint64

	pendMu      sync.Mutex
	pends       map[*Pend]struct{}
	handles     atomic.Int64 // classify handles acquired and not released
	redirectsMu sync.Mutex
	redirects   map[RedirectHandle]string

	recordKey [32]byte // authenticates redirect records this engine issued
}

type flowKey struct {
	flow    FlowHandle
	layer   LayerID
	callout CalloutID
}

func (rt *runtime) init(e *Engine) {
	rt.e = e
	rt.flows = map[flowKey]any{}
	rt.byFlow = map[FlowHandle][]flowKey{}
	rt.pends = map[*Pend]struct{}{}
	rt.redirects = map[RedirectHandle]string{}
	if _, err := rand.Read(rt.recordKey[:]); err != nil {
		panic("engine: no randomness for the redirect record key: " + err.Error())
	}
}

var csPool = sync.Pool{New: func() any { return new(classifyState) }}

// RegisterCallout attaches Go functions to the callout with this key, as a
// driver's FwpsCalloutRegister does. The callout object may be added before
// or after. Notify is called for every existing filter that uses it.
func (e *Engine) RegisterCallout(key string, reg CalloutRegistration) error {
	if key == "" || reg.Classify == nil {
		return fmt.Errorf("%w: a registration needs a key and a classify function", ErrInvalidArgument)
	}
	s := e.slot(key)
	r := reg
	if !s.reg.CompareAndSwap(nil, &r) {
		return fmt.Errorf("%w: %q", ErrCalloutAlreadyRegistered, key)
	}
	if reg.Flags&CalloutMayBlock != 0 {
		e.mayBlock.Add(1)
	}
	if reg.Notify != nil {
		v := e.View()
		if c, err := v.CalloutByKey(key); err == nil {
			for _, f := range v.Filters(FilterTemplate{Callout: c.ID}) {
				reg.Notify(NotifyAddFilter, &f)
			}
		}
	}
	return nil
}

// UnregisterCallout removes a callout's functions. Filters using it then act
// as unregistered (block, or permit with PERMIT_IF_CALLOUT_UNREGISTERED).
// Flow contexts the callout still holds are deleted through its FlowDelete.
func (e *Engine) UnregisterCallout(key string) error {
	e.idMu.Lock()
	s, ok := e.calloutSlots[key]
	e.idMu.Unlock()
	if !ok || s.reg.Load() == nil {
		return fmt.Errorf("%w: callout %q is not registered", ErrNotFound, key)
	}
	if c, err := e.View().CalloutByKey(key); err == nil {
		e.removeFlowContexts(func(k flowKey) bool { return k.callout == c.ID })
	}
	if old := s.reg.Swap(nil); old != nil && old.Flags&CalloutMayBlock != 0 {
		e.mayBlock.Add(-1)
	}
	return nil
}

func (e *Engine) notify(n notifyEvent) {
	if n.slot == nil {
		return
	}
	if reg := n.slot.reg.Load(); reg != nil && reg.Notify != nil {
		f := cloneFilter(n.f)
		reg.Notify(n.t, &f)
	}
}

// NewFlowHandle returns a fresh flow handle for a datapath to name a flow.
// Its top bit is set: the kernel datapaths name a flow by its socket
// cookie (counted from 1 by the kernel), so an engine shared by both never
// gives two flows one handle.
func (e *Engine) NewFlowHandle() FlowHandle { return FlowHandle(1<<63 | e.rt.nextFlow.Add(1)) }

// FlowAssociateContext associates ctx with (flow, layer, callout); later
// classifies of the flow at that layer pass it to the callout
// (FwpsFlowAssociateContext). One context per triple.
func (e *Engine) FlowAssociateContext(flow FlowHandle, layer LayerID, callout CalloutID, ctx any) error {
	if flow == 0 || !layer.Valid() || callout == 0 {
		return fmt.Errorf("%w: flow, layer and callout are all required", ErrInvalidArgument)
	}
	k := flowKey{flow, layer, callout}
	rt := &e.rt
	rt.flowMu.Lock()
	defer rt.flowMu.Unlock()
	if _, ok := rt.flows[k]; ok {
		return fmt.Errorf("%w: a context for %d/%s/%s", ErrAlreadyExists, flow, layer, callout)
	}
	rt.flows[k] = ctx
	rt.byFlow[flow] = append(rt.byFlow[flow], k)
	rt.nflows.Add(1)
	if hook := e.opts.FlowContextHook; hook != nil {
		hook(flow, layer, callout, ctx, true)
	}
	return nil
}

// FlowRemoveContext removes a context and calls the callout's FlowDelete
// for it (FwpsFlowRemoveContext).
func (e *Engine) FlowRemoveContext(flow FlowHandle, layer LayerID, callout CalloutID) error {
	k := flowKey{flow, layer, callout}
	n := e.removeFlowContexts(func(x flowKey) bool { return x == k })
	if n == 0 {
		return fmt.Errorf("%w: no context for %d/%s/%s", ErrNotFound, flow, layer, callout)
	}
	return nil
}

// FlowHandles returns the handles of the flows that hold contexts now: a
// datapath that may have missed a flow's end checks them against the
// flows that still exist (the kernel datapath's liveness sweep).
func (e *Engine) FlowHandles() []FlowHandle {
	rt := &e.rt
	rt.flowMu.Lock()
	defer rt.flowMu.Unlock()
	out := make([]FlowHandle, 0, len(rt.byFlow))
	for f := range rt.byFlow {
		out = append(out, f)
	}
	return out
}

// FlowDeleted is what a datapath calls when a flow ends: every context of
// the flow is removed and its callout's FlowDelete called, exactly once.
func (e *Engine) FlowDeleted(flow FlowHandle) int {
	rt := &e.rt
	rt.flowMu.Lock()
	keys := rt.byFlow[flow]
	delete(rt.byFlow, flow)
	ctxs := make([]any, len(keys))
	for i, k := range keys {
		ctxs[i] = rt.flows[k]
		delete(rt.flows, k)
	}
	rt.nflows.Add(-int64(len(keys)))
	rt.flowMu.Unlock()
	for i, k := range keys {
		e.callFlowDelete(k, ctxs[i])
	}
	return len(keys)
}

func (e *Engine) removeFlowContexts(match func(flowKey) bool) int {
	rt := &e.rt
	type gone struct {
		k   flowKey
		ctx any
	}
	var removed []gone
	rt.flowMu.Lock()
	for k, ctx := range rt.flows {
		if match(k) {
			removed = append(removed, gone{k, ctx})
			delete(rt.flows, k)
			keys := rt.byFlow[k.flow]
			for i := range keys {
				if keys[i] == k {
					keys = append(keys[:i], keys[i+1:]...)
					break
				}
			}
			if len(keys) == 0 {
				delete(rt.byFlow, k.flow)
			} else {
				rt.byFlow[k.flow] = keys
			}
		}
	}
	rt.nflows.Add(-int64(len(removed)))
	rt.flowMu.Unlock()
	for _, g := range removed {
		e.callFlowDelete(g.k, g.ctx)
	}
	return len(removed)
}

func (e *Engine) callFlowDelete(k flowKey, ctx any) {
	if hook := e.opts.FlowContextHook; hook != nil {
		hook(k.flow, k.layer, k.callout, ctx, false)
	}
	c, err := e.View().Callout(k.callout)
	if err != nil {
		return
	}
	e.idMu.Lock()
	s := e.calloutSlots[c.Key]
	e.idMu.Unlock()
	if s == nil {
		return
	}
	if reg := s.reg.Load(); reg != nil && reg.FlowDelete != nil {
		reg.FlowDelete(k.layer, k.callout, ctx)
	}
}

func (e *Engine) flowContext(flow FlowHandle, layer LayerID, callout CalloutID) (any, bool) {
	rt := &e.rt
	if rt.nflows.Load() == 0 {
		return nil, false
	}
	rt.flowMu.RLock()
	ctx, ok := rt.flows[flowKey{flow, layer, callout}]
	rt.flowMu.RUnlock()
	return ctx, ok
}

// Outstanding counts what the runtime holds, so that tests and operators
// can prove nothing leaks.
type Outstanding struct {
	Pends           int // pended operations and classifies not yet resolved
	ClassifyHandles int // acquired and not released
	FlowContexts    int
	RedirectHandles int
}

// Outstanding returns the current counts.
func (e *Engine) Outstanding() Outstanding {
	rt := &e.rt
	rt.pendMu.Lock()
	p := len(rt.pends)
	rt.pendMu.Unlock()
	rt.redirectsMu.Lock()
	r := len(rt.redirects)
	rt.redirectsMu.Unlock()
	return Outstanding{Pends: p, ClassifyHandles: int(rt.handles.Load()), FlowContexts: int(rt.nflows.Load()), RedirectHandles: r}
}

// call invokes a registered callout. It reports false when the callout is
// conditional on flow and the flow has no context for it.
func (cs *classifyState) call(cf *cfilter, reg *CalloutRegistration, rights Rights) (ClassifyOut, bool) {
	if cs.memo != nil {
		if out, ok := cs.memo.lookup(cf.id); ok {
			return out, true
		}
	}
	var flowCtx any
	hasCtx := false
	if cs.meta.Has(MetaFlowHandle) {
		flowCtx, hasCtx = cs.e.flowContext(cs.meta.FlowHandle, cs.layer, cf.callout)
	}
	if reg.Flags&CalloutConditionalOnFlow != 0 && !hasCtx {
		return ClassifyOut{}, false
	}
	cs.req = ClassifyRequest{
		Layer: cs.layer, Values: cs.vs, Meta: cs.meta, Filter: cf.f, ProviderContext: cf.pctx,
		FlowContext: flowCtx, LayerData: cs.layerData, e: cs.e, cs: cs, cf: cf,
	}
	cs.out = ClassifyOut{Action: ActionContinue, Rights: rights}
	cs.rights = rights
	cs.inCallout = cf
	reg.Classify(&cs.req, &cs.out)
	cs.inCallout = nil
	cs.req = ClassifyRequest{}
	out := cs.out
	cs.out = ClassifyOut{}
	if cs.pendAt == cf && cs.pend != nil && cs.pend.kind == pendClassify {
		// The callout pended the classify: its output is the pended one.
		out = cs.pend.pendedOut
	}
	cs.remember(cf.id, out)
	return out, true
}
