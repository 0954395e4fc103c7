package engine

import (
	"fmt"
	"strings"
)

// Reason says why a classification ended as it did.
type Reason uint8

const (
	ReasonNoMatch                   Reason = iota // no filter decided: the layer permits
	ReasonFilterPermit                            // a permit filter
	ReasonFilterBlock                             // a block filter
	ReasonCalloutPermit                           // a callout returned permit
	ReasonCalloutBlock                            // a callout returned block
	ReasonCalloutVeto                             // a callout blocked a hard permit
	ReasonCalloutContinueAsBlock                  // a terminating callout returned continue
	ReasonCalloutUnregisteredBlock                // the callout is not registered: fail closed
	ReasonCalloutUnregisteredPermit               // not registered, PERMIT_IF_CALLOUT_UNREGISTERED: fail open
	ReasonPended                                  // a callout pended the classification
	ReasonPendTimeout                             // a pend ran out of time; the filter's default applied
)

var reasonText = [...]string{
	"no filter matched; the layer permits",
	"permit filter",
	"block filter",
	"callout permitted",
	"callout blocked",
	"callout vetoed a hard permit",
	"terminating callout returned continue (treated as block)",
	"callout not registered (fail closed)",
	"callout not registered, permit_if_callout_unregistered (fail open)",
	"callout pended the classification",
	"pend timed out; the filter's default applied",
}

func (r Reason) String() string {
	if int(r) < len(reasonText) {
		return reasonText[r]
	}
	return fmt.Sprintf("reason(%d)", uint8(r))
}

// Result is the outcome of one classification: WFP's ClassifyOut plus
// which filter decided and why.
type Result struct {
	ClassifyOut
	Filter   FilterID   // the deciding filter; 0 when none matched
	Sublayer SublayerID // its sublayer
	Callout  CalloutID  // the callout, when a callout decided
	Reason   Reason
	Veto     bool
	// Pend is set when a callout pended the classification; the datapath
	// holds the connection until Pend resolves (see pend.go).
	Pend *Pend
	// Redirect is set at a redirect layer when a callout applied modified
	// layer data (see redirect.go).
	Redirect *Redirect
}

// Permitted reports whether the connection may proceed.
func (r Result) Permitted() bool { return r.Action == ActionPermit }

// Hard reports whether the decision was final (ACTION_WRITE cleared).
func (r Result) Hard() bool { return r.Rights&RightActionWrite == 0 }

// String reads the result the way a person would want it.
func (r Result) String() string {
	var b strings.Builder
	if r.Action == ActionPermit {
		b.WriteString("permit")
	} else {
		b.WriteString("block")
	}
	if r.Filter != 0 {
		if r.Hard() {
			b.WriteString(" (hard)")
		} else {
			b.WriteString(" (soft)")
		}
		fmt.Fprintf(&b, " by %s in %s", r.Filter, r.Sublayer)
		if r.Callout != 0 {
			fmt.Fprintf(&b, " via %s", r.Callout)
		}
	}
	b.WriteString(": ")
	b.WriteString(r.Reason.String())
	if r.Flags&OutAbsorb != 0 {
		b.WriteString(", absorbed")
	}
	return b.String()
}

// ClassifyRequest is what a callout's classify function receives: the
// incoming values, metadata, the filter that matched, its provider context
// and the flow context (WFP classifyFn's parameters). Values, Meta, Filter
// and ProviderContext are the engine's and the datapath's own memory,
// shared without a copy so that a callout call costs no allocation: read
// them, never write them, and do not keep them past the call (copy what an
// asynchronous completion needs).
type ClassifyRequest struct {
	Layer           LayerID
	Values          *Values
	Meta            *Metadata
	Filter          *Filter
	ProviderContext []byte
	FlowContext     any // the context this callout associated with the flow, or nil
	// LayerData is what the datapath holds for this classify (at
	// AUTH_RECV_ACCEPT, the accepted connection or first datagram), for a
	// callout that pends and later reinjects it.
	LayerData any

	e  *Engine
	cs *classifyState
	cf *cfilter
}

// Engine returns the engine that called the callout.
func (r *ClassifyRequest) Engine() *Engine { return r.e }

// arbiter is the running decision of one classification.
type arbiter struct {
	out     ClassifyOut // Action 0 until a sublayer decides
	decider *cfilter
	reason  Reason
	veto    bool
}

// Step is one line of an arbitration trace.
type Step struct {
	Sublayer     SublayerID
	Filter       FilterID
	FilterAction ActionType
	Callout      CalloutID
	Returned     ActionType // what the filter or callout returned; ActionContinue when it passed
	RightsBefore Rights
	RightsAfter  Rights
	Note         string
}

// Trace is the full arbitration of one tuple.
type Trace struct {
	Layer  LayerID
	Steps  []Step
	Result Result
}

func (t *Trace) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "layer %s\n", t.Layer)
	for _, s := range t.Steps {
		fmt.Fprintf(&b, "  %s %s action=%s", s.Sublayer, s.Filter, s.FilterAction)
		if s.Callout != 0 {
			fmt.Fprintf(&b, " callout=%s", s.Callout)
		}
		fmt.Fprintf(&b, " returned=%s write:%v->%v", s.Returned, s.RightsBefore&RightActionWrite != 0, s.RightsAfter&RightActionWrite != 0)
		if s.Note != "" {
			b.WriteString(" (" + s.Note + ")")
		}
		b.WriteByte('\n')
	}
	fmt.Fprintf(&b, "result: %s\n", t.Result)
	return b.String()
}

// classifyState carries one classification through the callouts. It is
// pooled, so that handles into it cost no allocation.
type classifyState struct {
	e         *Engine
	layer     LayerID
	vs        *Values
	meta      *Metadata
	seq       uint64
	trace     *Trace
	dry       bool // explain: do not call callouts
	pend      *Pend
	pendAt    *cfilter
	inCallout *cfilter
	rights    Rights      // the called callout's rights on entry
	memo      *resumeMemo // a resumed classify: outputs of callouts already called
	called    resumeMemo  // callouts called so far, for a later pend
	rd        *redirectState
	layerData any
	req       ClassifyRequest
	out       ClassifyOut // the called callout's output: a field, so it does not escape per call
}

// maxReauthPasses bounds the classifications REAUTHORIZE_IF_MODIFIED_BY_OTHERS
// may add, so that two callouts that keep undoing each other still end.
const maxReauthPasses = 3

// Classify runs the layer's filters over the incoming values and returns
// WFP's decision. It never blocks on a lock and, when no callout is
// involved, allocates nothing. At a layer where operations can be pended,
// the engine sets meta's completion handle for the callouts.
func (e *Engine) Classify(layer LayerID, vs *Values, meta *Metadata) Result {
	return e.ClassifyLayerData(layer, vs, meta, nil)
}

// ClassifyLayerData is Classify with the datapath's layer data, which
// callouts receive as ClassifyRequest.LayerData.
func (e *Engine) ClassifyLayerData(layer LayerID, vs *Values, meta *Metadata, data any) Result {
	if !layer.Valid() || vs == nil {
		return Result{ClassifyOut: ClassifyOut{Action: ActionBlock}, Reason: ReasonFilterBlock}
	}
	c := e.state.Load().compiled[layer]
	cs := csPool.Get().(*classifyState)
	more := cs.keep()
	*cs = classifyState{e: e, layer: layer, vs: vs, meta: meta, layerData: data}
	cs.called.more = more
	if c.hasCallouts {
		cs.seq = e.rt.nextSeq.Add(1)
		if meta != nil && layers[layer].CanPendOperation {
			meta.Present |= MetaCompletionHandle
			meta.CompletionHandle = CompletionHandle{cs, cs.seq}
		}
	}
	res := c.classify(cs)
	if cs.rd != nil {
		res = c.reauthorize(cs, res)
	}
	e.afterClassify(cs, &res)
	e.count(layer, &res)
	if meta != nil && meta.CompletionHandle.cs == cs {
		meta.CompletionHandle = CompletionHandle{}
		meta.Present &^= MetaCompletionHandle
	}
	cs.reset()
	csPool.Put(cs)
	return res
}

// reauthorize runs the passes REAUTHORIZE_IF_MODIFIED_BY_OTHERS asked
// for: while a callout that applied with the flag saw another modify the
// data after it, the layer is classified again (FlagIsReauthorize) on the
// latest version, every callout called afresh. The passes of one flow's
// classification are bounded together, those after a pended classify
// resumed included. A pass may pend: the resume carries on from there.
func (c *compiledLayer) reauthorize(cs *classifyState, res Result) Result {
	for cs.pend == nil && cs.rd.takeReauth() {
		vs := cs.vs
		vs2 := *vs
		vs2.Set(FieldFlags, Uint32(uint32(vs2.Uint(FieldFlags))|FlagIsReauthorize))
		cs.vs = &vs2
		cs.memo = nil
		cs.called = resumeMemo{more: cs.keep()}
		res = c.classify(cs)
		cs.vs = vs
	}
	return res
}

// afterClassify attaches the pend and the redirect to the result and
// records the net event.
func (e *Engine) afterClassify(cs *classifyState, res *Result) {
	if p := cs.pend; p != nil {
		// A pend holds the connection whatever lower sublayers said.
		res.Pend = p
		res.ClassifyOut = ClassifyOut{Action: ActionBlock, Flags: OutAbsorb}
		res.Filter, res.Callout, res.Reason = p.filter, p.callout, ReasonPended
		if sl := cs.pendAt; sl != nil {
			res.Sublayer = sl.f.Sublayer
		}
		if p.kind == pendClassify {
			res.ClassifyOut.Flags = 0
		}
		return
	}
	if cs.rd != nil {
		res.Redirect = cs.rd.result() // nil when nothing was applied
	}
	e.recordEvent(cs, res)
}

// Explain runs the arbitration for a tuple without traffic and returns the
// full trace. Callouts are not called: a callout filter is reported, and a
// terminating one is taken as its registration-less default, so the answer
// is what the filters alone decide (the "best terminating match").
func (e *Engine) Explain(layer LayerID, vs *Values, meta *Metadata) (*Trace, error) {
	if !layer.Valid() {
		return nil, fmt.Errorf("%w: %d", ErrInvalidLayer, layer)
	}
	if vs == nil {
		vs = &Values{}
	}
	t := &Trace{Layer: layer}
	c := e.state.Load().compiled[layer]
	cs := classifyState{e: e, layer: layer, vs: vs, meta: meta, trace: t, dry: true}
	t.Result = c.classify(&cs)
	return t, nil
}

// BestTerminatingMatch returns the filter that decides the tuple when no
// callout is called (0 when none matches), as WFP's
// FWP_FILTER_ENUM_FLAG_BEST_TERMINATING_MATCH does.
func (e *Engine) BestTerminatingMatch(layer LayerID, vs *Values) (FilterID, error) {
	t, err := e.Explain(layer, vs, nil)
	if err != nil {
		return 0, err
	}
	return t.Result.Filter, nil
}

func (c *compiledLayer) classify(cs *classifyState) Result {
	var a arbiter
	a.out.Rights = RightActionWrite
	var cur [maxCursors][]int32
	var met [maxCursors]FieldID
	n := c.candidates(cs.vs, &cur, &met)
	if n < 0 {
		c.scan(cs, &a)
	} else {
		c.merge(cs, &a, &cur, &met, n)
	}
	return a.result()
}

// merge walks the candidate lists in rank order, skipping the rest of a
// sublayer once it has decided. A candidate taken from a list whose
// filters are known to meet their conditions on met[i] is matched on the
// other fields only.
func (c *compiledLayer) merge(cs *classifyState, a *arbiter, cur *[maxCursors][]int32, met *[maxCursors]FieldID, n int) {
	last, skipTo := int32(-1), int32(0)
	for {
		best, bv := -1, int32(1<<31-1)
		for i := 0; i < n; i++ {
			if l := cur[i]; len(l) > 0 && l[0] < bv {
				best, bv = i, l[0]
			}
		}
		if best < 0 {
			return
		}
		cur[best] = cur[best][1:]
		if bv == last || bv < skipTo {
			continue
		}
		last = bv
		if !c.quick[bv].pass(cs.vs) {
			continue
		}
		cf := &c.filters[bv]
		if !cf.matchExcept(cs.vs, met[best]) {
			continue
		}
		if c.eval(cs, a, cf) {
			skipTo = c.subs[cf.sub].end
			if a.out.Rights&RightActionWrite == 0 && !c.hasCallouts || cs.pend != nil {
				return // a hard decision no callout can veto, or a pend that holds the flow
			}
		}
	}
}

// scan is the index-free path for lookups with too many candidate lists.
func (c *compiledLayer) scan(cs *classifyState, a *arbiter) {
	for i := 0; i < len(c.filters); i++ {
		cf := &c.filters[i]
		if !cf.match(cs.vs) {
			continue
		}
		if c.eval(cs, a, cf) {
			if cs.pend != nil {
				return
			}
			i = int(c.subs[cf.sub].end) - 1
		}
	}
}

// eval evaluates one matching filter and folds its result into the running
// decision. It reports whether the filter ended its sublayer.
func (c *compiledLayer) eval(cs *classifyState, a *arbiter, cf *cfilter) bool {
	before := a.out.Rights
	var ret ClassifyOut
	reason := ReasonFilterPermit
	called := false
	note := ""
	switch cf.action {
	case ActionPermit:
		ret = ClassifyOut{Action: ActionPermit, Rights: RightActionWrite}
	case ActionBlock:
		ret = ClassifyOut{Action: ActionBlock} // a filter's block is hard
		reason = ReasonFilterBlock
	default:
		var reg *CalloutRegistration
		if cf.slot != nil {
			reg = cf.slot.reg.Load()
		}
		callable := reg != nil && reg.Classify != nil && (!cs.dry || reg.Flags&CalloutExplainable != 0)
		switch {
		case reg == nil || reg.Classify == nil || (!callable && cf.action != ActionCalloutInspection):
			if cs.dry && reg != nil {
				note = "callout registered, not called by explain"
			} else {
				note = "callout not registered"
			}
			if cf.action == ActionCalloutInspection {
				ret.Action = ActionContinue
				break
			}
			if cf.flags&FilterPermitIfCalloutUnregistered != 0 {
				ret = ClassifyOut{Action: ActionPermit, Rights: RightActionWrite}
				reason = ReasonCalloutUnregisteredPermit
			} else {
				ret = ClassifyOut{Action: ActionBlock}
				reason = ReasonCalloutUnregisteredBlock
			}
		case !callable:
			ret.Action, note = ActionContinue, "inspection callout, not called by explain"
		default:
			var ok bool
			ret, ok = cs.call(cf, reg, a.out.Rights)
			if !ok {
				ret.Action = ActionContinue // conditional on a flow it has no context for
				note = "conditional on flow: no context"
				break
			}
			called = true
			reason = ReasonCalloutPermit
			switch {
			case cf.action == ActionCalloutInspection:
				ret.Action = ActionContinue
			case ret.Action == ActionBlock:
				reason = ReasonCalloutBlock
			case ret.Action == ActionPermit && before&RightActionWrite == 0:
				// A permit the callout had no right to write is not made
				// (seed 003): the filter passes, so a later callout of the
				// sublayer may still veto. Not reread as a terminating
				// callout's CONTINUE: that would turn it into a veto.
				ret.Action = ActionContinue
				note = "permit without the write right: not made"
			case ret.Action == ActionPermit:
			case cf.action == ActionCalloutTerminating:
				ret = ClassifyOut{Action: ActionBlock, Rights: ret.Rights, Flags: ret.Flags}
				reason = ReasonCalloutContinueAsBlock
			default:
				ret.Action = ActionContinue
			}
			if cs.pendAt == cf {
				reason = ReasonPended
			}
		}
	}
	if ret.Action != ActionPermit && ret.Action != ActionBlock {
		cs.step(cf, c, ActionContinue, before, before, note)
		return false
	}
	hard := ret.Rights&RightActionWrite == 0 || cf.flags&FilterClearActionRight != 0
	a.apply(cf, ret.Action, hard, ret.Flags, reason, called)
	cs.step(cf, c, ret.Action, before, a.out.Rights, note)
	return true
}

// apply folds a sublayer's decision into the running one (WFP's override
// policy): while the running decision holds ACTION_WRITE, the new one
// replaces it, so a soft permit falls to a later block and a soft block to
// a later permit; a hard permit falls only to a called callout's block (a
// veto); a hard block is final.
func (a *arbiter) apply(cf *cfilter, act ActionType, hard bool, flags OutFlags, reason Reason, called bool) {
	switch {
	case a.out.Action == 0 || a.out.Rights&RightActionWrite != 0:
		a.out.Action = act
		a.out.Flags = flags
		if hard {
			a.out.Rights = 0
		} else {
			a.out.Rights = RightActionWrite
		}
		a.decider, a.reason = cf, reason
	case a.out.Action == ActionPermit && act == ActionBlock && called:
		a.out = ClassifyOut{Action: ActionBlock, Flags: flags}
		a.decider, a.reason, a.veto = cf, ReasonCalloutVeto, true
	}
}

func (a *arbiter) result() Result {
	r := Result{ClassifyOut: a.out, Reason: a.reason, Veto: a.veto}
	if a.out.Action == 0 {
		r.Action = ActionPermit
		r.Rights = RightActionWrite
		r.Reason = ReasonNoMatch
		return r
	}
	if r.Action != ActionBlock {
		r.Flags &^= OutAbsorb // absorb only matters on a deciding block
	}
	if d := a.decider; d != nil {
		r.Filter = d.id
		r.Sublayer = d.f.Sublayer
		if d.action.IsCallout() {
			r.Callout = d.callout
		}
	}
	return r
}

func (cs *classifyState) step(cf *cfilter, c *compiledLayer, ret ActionType, before, after Rights, note string) {
	if cs.trace == nil {
		return
	}
	if note == "" && cs.pendAt == cf {
		note = "pended"
	}
	cs.trace.Steps = append(cs.trace.Steps, Step{
		Sublayer: c.subs[cf.sub].id, Filter: cf.id, FilterAction: cf.action, Callout: cf.callout,
		Returned: ret, RightsBefore: before, RightsAfter: after, Note: note,
	})
}
