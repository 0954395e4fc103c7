package engine

import (
	"slices"
	"sync"
	"time"
)

// Invocation is one callout call whose classification runs in another
// engine: fwpd's, for a callout program that registered over a socket.
// The callout's code runs in this engine, against its pend, classify
// handle and redirect API, unchanged; Invoke reports what the callout did
// so the caller can carry it back to the engine that classifies. This is
// how one callout runs embedded or remote without a change.
type Invocation struct {
	Layer           LayerID
	Values          Values
	Meta            Metadata
	Filter          Filter // as the classifying engine has it (its IDs)
	ProviderContext []byte
	Rights          Rights // the ACTION_WRITE right the callout receives
	// Connect or Bind is the current version of the writable layer data at
	// a redirect layer, its PreviousVersion chain included.
	Connect   *ConnectRequest
	Bind      *BindRequest
	LayerData any
}

// Invoked is what the callout did in Invoke.
type Invoked struct {
	Out ClassifyOut
	// Pend is set when the callout pended (PendOperation or, see
	// Pend.IsClassify, PendClassify); it resolves in this engine, from
	// any goroutine of the callout program.
	Pend *Pend
	// Connect or Bind is the version the callout applied inline (nil when
	// it applied none), with the flags it applied it with.
	Connect    *ConnectRequest
	Bind       *BindRequest
	ApplyFlags ApplyFlags
}

// Invoke calls reg's classify function for in as this engine would for a
// filter of its own. Flow contexts are this engine's (FlowAssociateContext
// here); a callout conditional on flow is the classifying engine's
// concern, so reg.Flags are not looked at. A call whose callout neither
// pends nor acquires a classify handle allocates nothing: its state comes
// from a pool (a remote callout pays for it on every classification).
func (e *Engine) Invoke(reg *CalloutRegistration, in *Invocation) Invoked {
	st := invokePool.Get().(*invokeState)
	st.f = in.Filter
	st.vs = in.Values
	st.meta = in.Meta
	st.cf = cfilter{f: &st.f, id: st.f.ID, action: st.f.Action.Type, flags: st.f.Flags, callout: st.f.Action.Callout, pctx: in.ProviderContext}
	cs := &st.cs
	more := cs.keep()
	*cs = classifyState{e: e, layer: in.Layer, vs: &st.vs, meta: &st.meta, layerData: in.LayerData, seq: e.rt.nextSeq.Add(1)}
	cs.called.more = more
	if l := LayerByID(in.Layer); l != nil {
		if l.CanPendOperation {
			st.meta.Present |= MetaCompletionHandle
			st.meta.CompletionHandle = CompletionHandle{cs, cs.seq}
		}
		if l.Writable != WritableNone && (in.Connect != nil || in.Bind != nil) {
			rd := &redirectState{layer: in.Layer, connect: in.Connect, bind: in.Bind, foreignHandles: true}
			if in.Connect != nil {
				rd.original = in.Connect.RemoteAddressAndPort
			} else {
				rd.original = in.Bind.LocalAddressAndPort
			}
			if st.meta.Has(MetaRedirectRecords) && st.meta.RedirectRecords != nil {
				rd.records = slices.Clone(st.meta.RedirectRecords.recs)
			}
			cs.rd = rd
		}
	}
	r := *reg
	r.Flags = 0
	out, _ := cs.call(&st.cf, &r, in.Rights)
	cs.seq = 0 // a handle kept past the call is stale, as in a classify
	res := Invoked{Out: out, Pend: cs.pend}
	if cs.rd != nil && cs.pend == nil {
		res.Connect, res.Bind, res.ApplyFlags = cs.rd.applied(st.f.ID)
	}
	// A classify handle keeps the state (its classification and filter):
	// such a state is left to the collector, never reused under it.
	if cs.rd == nil || !cs.rd.hasHandles() {
		cs.reset()
		st.vs, st.meta, st.f, st.cf = Values{}, Metadata{}, Filter{}, cfilter{}
		invokePool.Put(st)
	}
	return res
}

// invokeState is one Invoke's classification, pooled.
type invokeState struct {
	cs   classifyState
	cf   cfilter
	f    Filter
	vs   Values
	meta Metadata
}

var invokePool = sync.Pool{New: func() any { return new(invokeState) }}

func (rd *redirectState) hasHandles() bool {
	rd.mu.Lock()
	defer rd.mu.Unlock()
	return len(rd.handles) > 0
}

// applied is the version filter by applied and its flags, if it did.
func (rd *redirectState) applied(by FilterID) (*ConnectRequest, *BindRequest, ApplyFlags) {
	rd.mu.Lock()
	defer rd.mu.Unlock()
	if !rd.modified || rd.lastBy != by {
		return nil, nil, 0
	}
	var fl ApplyFlags
	if slices.Contains(rd.reauthBy, by) {
		fl = ApplyReauthorizeIfModifiedByOthers
	}
	return rd.connect, rd.bind, fl
}

// IsClassify reports whether the pend is a PendClassify (else a
// PendOperation).
func (p *Pend) IsClassify() bool { return p.kind == pendClassify }

// Completed returns what completed a pended classify: the callout's final
// output and the layer data it applied to the pended classification
// (none: nil) with its flags. Valid once Done is closed with PendCompleted.
func (p *Pend) Completed() (ClassifyOut, *ConnectRequest, *BindRequest, ApplyFlags) {
	p.mu.Lock()
	out := p.out
	p.mu.Unlock()
	if p.rd == nil {
		return out, nil, nil, 0
	}
	c, b, fl := p.rd.applied(p.filter)
	return out, c, b, fl
}

// PendTimeout is how long a pend of this engine waits (Options.PendTimeout).
func (e *Engine) PendTimeout() time.Duration { return e.opts.PendTimeout }

// CalloutFuncs is a callout's functions by the name the remote-callout API
// uses (client.RegisterCallout): the same type as an embedded
// registration, so one callout runs either way unchanged.
type CalloutFuncs = CalloutRegistration
