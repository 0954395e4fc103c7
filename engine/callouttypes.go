package engine

import (
	"context"
	"net/netip"
	"sync"
)

// The callout types of seed 003, as helpers a callout author can use or
// read as the contract in code. Seed 003's types are about traffic; fwp's
// layers are ALE layers, where the inspection types map onto flows:
//
//	type (seed 003)             fwp helper           filter action         classify returns
//	inline inspection           InlineInspection     CALLOUT_INSPECTION    continue, always
//	out-of-band inspection      AsyncAuthorizer      CALLOUT_TERMINATING   block+absorb (pend), then the decision on reauthorization
//	inline modification         none yet             -                     they change packet and stream data: they come
//	out-of-band modification    none yet             -                     with the packet and stream layers
//
// Connect and bind redirection are seed 001's recipes, not modification
// callouts: they change the ALE layers' writable layer data (where a flow
// connects or binds), never the traffic.
//
//	recipe (seed 001)           fwp helper           filter action         classify returns
//	connect redirect, inline    ConnectRedirect      CALLOUT_UNKNOWN       permit after applying modified layer data
//	connect redirect, async     ConnectRedirect      CALLOUT_UNKNOWN       block, write cleared (pend classify); completed later
//	                            with Async
//	bind redirect               BindRedirect         CALLOUT_UNKNOWN       as connect redirect, on the local address
//
// Every helper checks the ACTION_WRITE right before writing an action, as
// seed 003 requires: without it a callout may only veto.

// InlineInspection returns a registration that shows every classification
// to observe and never changes the decision (its filters use
// ActionCalloutInspection).
func InlineInspection(observe func(req *ClassifyRequest)) CalloutRegistration {
	return CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		observe(req)
		out.Action = ActionContinue
	}}
}

// AsyncAuthorizer is the out-of-band inspection recipe of seed 002 at
// AUTH_CONNECT, AUTH_RECV_ACCEPT, AUTH_LISTEN and RESOURCE_ASSIGNMENT: the
// callout pends the operation, Decide runs on its own goroutine, the
// operation is completed, and the reauthorization gets the decision. At
// AUTH_RECV_ACCEPT a permit completes with the held layer data for
// reinjection (the reauthorization then gets the permit, and the layer's
// other filters still decide), a block completes with nil (dropped).
//
// Flows are told apart by the metadata's flow handle, which the datapath
// must set. Decide must return ActionPermit or ActionBlock.
type AsyncAuthorizer struct {
	Decide func(ctx context.Context, layer LayerID, vs Values, meta Metadata) ActionType

	mu        sync.Mutex
	decisions map[FlowHandle]ActionType
}

// Registration returns the callout's functions.
func (a *AsyncAuthorizer) Registration() CalloutRegistration {
	return CalloutRegistration{Classify: a.classify}
}

func (a *AsyncAuthorizer) classify(req *ClassifyRequest, out *ClassifyOut) {
	if !out.CanWrite() {
		return // a hard decision stands; this callout does not veto
	}
	flow := FlowHandle(0)
	if req.Meta.Has(MetaFlowHandle) {
		flow = req.Meta.FlowHandle
	}
	if uint32(req.Values.Uint(FieldFlags))&FlagIsReauthorize != 0 {
		a.mu.Lock()
		act, ok := a.decisions[flow]
		delete(a.decisions, flow)
		a.mu.Unlock()
		if !ok {
			act = ActionBlock // no remembered decision: fail closed
		}
		out.Action = act
		return
	}
	p, err := req.PendOperation()
	if err != nil {
		out.Action = ActionBlock
		return
	}
	vs := *req.Values
	var meta Metadata
	if req.Meta != nil {
		meta = *req.Meta
	}
	layer, held, e := req.Layer, req.LayerData, req.Engine()
	go func() {
		ctx, cancel := context.WithDeadline(context.Background(), p.Deadline())
		defer cancel()
		go func() { // a pend the datapath gave up on (canceled) ends Decide's context too
			select {
			case <-p.Done():
				cancel()
			case <-ctx.Done():
			}
		}()
		act := a.Decide(ctx, layer, vs, meta)
		var reinject any
		if layer.Kind() == KindAuthRecvAccept {
			if act != ActionPermit {
				_ = e.CompleteOperation(p, nil) // dropped: no reauthorization
				return
			}
			reinject = held
		}
		a.mu.Lock()
		if a.decisions == nil {
			a.decisions = map[FlowHandle]ActionType{}
		}
		a.decisions[flow] = act
		a.mu.Unlock()
		if e.CompleteOperation(p, reinject) != nil {
			// Timed out or canceled: nobody will reauthorize; forget it.
			a.mu.Lock()
			delete(a.decisions, flow)
			a.mu.Unlock()
		}
	}()
	out.Action = ActionBlock
	out.Flags |= OutAbsorb
}

// RedirectTarget is where a redirect callout sends a flow.
type RedirectTarget struct {
	To        netip.AddrPort // new remote (connect) or local (bind) address
	TargetPID uint32         // the local process that will receive the flow (connect)
	Context   []byte         // redirect context for the proxy, e.g. the original destination
}

// ConnectRedirect is seed 001's connect-redirect recipe, inline or
// asynchronous, with the redirect-state check that keeps chained proxies
// from looping and the deferral to another callout's local redirect.
// Its filters go on CONNECT_REDIRECT with ActionCalloutUnknown.
type ConnectRedirect struct {
	Handle RedirectHandle // from Engine.RedirectHandleCreate, one per callout
	// Target picks the destination for a flow; ok=false leaves it alone.
	Target func(req *ClassifyRequest) (t RedirectTarget, ok bool)
	// Async pends the classify and redirects from another goroutine.
	Async bool
}

// Registration returns the callout's functions.
func (c *ConnectRedirect) Registration() CalloutRegistration {
	return CalloutRegistration{Classify: c.classify}
}

func (c *ConnectRedirect) classify(req *ClassifyRequest, out *ClassifyOut) {
	if !out.CanWrite() {
		return
	}
	switch req.RedirectState(c.Handle) {
	case RedirectedBySelf, PreviouslyRedirectedBySelf:
		return // this callout's proxy made the connection: let it through
	}
	t, ok := c.Target(req)
	if !ok {
		return
	}
	e, self := req.Engine(), req.Filter.ID // req is only valid inside classify
	h, err := req.AcquireClassifyHandle()
	if err != nil {
		return
	}
	redirect := func() bool {
		w, err := e.AcquireConnectRequest(h)
		if err != nil {
			return false
		}
		if prev := w.PreviousVersion; prev != nil && prev.ModifierFilterID != 0 &&
			prev.ModifierFilterID != self && prev.LocalRedirectHandle != 0 {
			// Another callout already sends the flow to its local proxy:
			// defer, and ask to be reauthorized should that change.
			return e.ApplyConnectRequest(h, w, ApplyReauthorizeIfModifiedByOthers) == nil
		}
		w.RemoteAddressAndPort = t.To
		w.LocalRedirectTargetPID = t.TargetPID
		w.LocalRedirectHandle = c.Handle
		w.LocalRedirectContext = t.Context
		return e.ApplyConnectRequest(h, w, 0) == nil
	}
	modify(e, h, out, c.Async, redirect)
}

// BindRedirect is the bind-redirect recipe: it moves a socket's local
// address or port at BIND_REDIRECT. Its filters use ActionCalloutUnknown.
type BindRedirect struct {
	Target func(req *ClassifyRequest) (to netip.AddrPort, ok bool)
	Async  bool
}

// Registration returns the callout's functions.
func (b *BindRedirect) Registration() CalloutRegistration {
	return CalloutRegistration{Classify: b.classify}
}

func (b *BindRedirect) classify(req *ClassifyRequest, out *ClassifyOut) {
	if !out.CanWrite() {
		return
	}
	to, ok := b.Target(req)
	if !ok {
		return
	}
	e := req.Engine()
	h, err := req.AcquireClassifyHandle()
	if err != nil {
		return
	}
	apply := func() bool {
		w, err := e.AcquireBindRequest(h)
		if err != nil {
			return false
		}
		w.LocalAddressAndPort = to
		return e.ApplyBindRequest(h, w, 0) == nil
	}
	modify(e, h, out, b.Async, apply)
}

// modify runs apply, which modifies the layer data of h, either inline
// (permit when it applied) or asynchronously as seed 001's second recipe:
// pend the classify, apply on another goroutine, complete with permit when
// it applied (continue otherwise), release the handle.
func modify(e *Engine, h ClassifyHandle, out *ClassifyOut, async bool, apply func() bool) {
	if !async {
		if apply() {
			out.Action = ActionPermit
		}
		e.ReleaseClassifyHandle(h)
		return
	}
	if _, err := e.PendClassify(h, out); err != nil {
		e.ReleaseClassifyHandle(h)
		return
	}
	go func() {
		final := ClassifyOut{Action: ActionContinue, Rights: RightActionWrite}
		if apply() {
			final.Action = ActionPermit
		}
		_ = e.CompleteClassify(h, final)
		e.ReleaseClassifyHandle(h)
	}()
}
