package api

import (
	"encoding/hex"
	"fmt"
	"time"

	"fwp/engine"
	"fwp/mgmt"
)

func lifetime(s string) (mgmt.Lifetime, error) { return mgmt.ParseLifetime(s) }

// ToObject converts a wire object to mgmt's. It reads through the
// generated getters, so that a partial message (a nil kind, a nil
// condition) is an error or an empty field, never a panic.
func ToObject(o *Object) (mgmt.Object, error) {
	var c converter
	return c.object(o)
}

// converter converts a batch of wire objects. It cuts filters and their
// conditions from slabs and shares a string equal to the one the previous
// filter had in the same field (layer, action, weight, a condition's
// field and match), so that a million filters of one kind keep a few
// strings rather than millions: fewer objects for the collector to walk,
// less memory (issue 15).
type converter struct {
	filters []mgmt.Filter
	conds   []mgmt.Condition
	last    struct{ layer, action, weight, field, match string }
}

// same returns prev when it equals s, else s, which becomes prev.
func same(prev *string, s string) string {
	if s == *prev {
		return *prev
	}
	*prev = s
	return s
}

func (cv *converter) object(o *Object) (mgmt.Object, error) {
	switch k := o.GetKind().(type) {
	case *Object_Provider:
		p := k.Provider
		l, err := lifetime(p.GetLifetime())
		return mgmt.Object{Provider: &mgmt.Provider{Key: p.GetKey(), Name: p.GetName(), Description: p.GetDescription(), Lifetime: l, ID: p.GetId(), Session: p.GetSession()}}, err
	case *Object_ProviderContext:
		c := k.ProviderContext
		l, err := lifetime(c.GetLifetime())
		return mgmt.Object{ProviderContext: &mgmt.ProviderContext{Key: c.GetKey(), Name: c.GetName(), Provider: c.GetProvider(), Data: c.GetData(), Lifetime: l, ID: c.GetId(), Session: c.GetSession(),
			DataRedacted: c.GetDataRedacted(), DataLength: int(c.GetDataLength()), DataSHA256: hex.EncodeToString(c.GetDataSha256())}}, err
	case *Object_Sublayer:
		s := k.Sublayer
		l, err := lifetime(s.GetLifetime())
		if err == nil && s.GetWeight() > 0xffff {
			err = fmt.Errorf("%w: sublayer weight %d is above 65535", engine.ErrInvalidWeight, s.GetWeight())
		}
		return mgmt.Object{Sublayer: &mgmt.Sublayer{Key: s.GetKey(), Name: s.GetName(), Provider: s.GetProvider(), Weight: uint16(s.GetWeight()), Lifetime: l, ID: s.GetId(), Session: s.GetSession()}}, err
	case *Object_Callout:
		c := k.Callout
		l, err := lifetime(c.GetLifetime())
		return mgmt.Object{Callout: &mgmt.Callout{Key: c.GetKey(), Name: c.GetName(), Provider: c.GetProvider(), Layer: c.GetLayer(), Flags: c.GetFlags(), Lifetime: l, ID: c.GetId(), Session: c.GetSession()}}, err
	case *Object_Filter:
		f := k.Filter
		l, err := lifetime(f.GetLifetime())
		if len(cv.filters) == cap(cv.filters) {
			cv.filters = make([]mgmt.Filter, 0, min(256, max(1, 2*cap(cv.filters))))
		}
		cv.filters = append(cv.filters, mgmt.Filter{Key: f.GetKey(), Name: f.GetName(), Description: f.GetDescription(),
			Layer: same(&cv.last.layer, f.GetLayer()), Sublayer: f.GetSublayer(), Provider: f.GetProvider(),
			Weight: same(&cv.last.weight, f.GetWeight()), Action: same(&cv.last.action, f.GetAction()), Callout: f.GetCallout(), ProviderContext: f.GetProviderContext(),
			Flags: f.GetFlags(), Lifetime: l, ID: f.GetId(), EffectiveWeight: f.GetEffectiveWeight(), Session: f.GetSession()})
		mf := &cv.filters[len(cv.filters)-1]
		if n := len(f.GetConditions()); n > 0 {
			if cap(cv.conds)-len(cv.conds) < n {
				cv.conds = make([]mgmt.Condition, 0, max(n, min(1024, 2*cap(cv.conds))))
			}
			i := len(cv.conds)
			mf.Conditions = cv.conds[i : i : i+n]
		}
		for i, c := range f.GetConditions() {
			mc := mgmt.Condition{Field: same(&cv.last.field, c.GetField()), Match: same(&cv.last.match, c.GetMatch()), Value: c.GetValue(), Values: c.GetValues()}
			if b := c.GetList(); len(b) > 0 {
				mc.List = new(engine.List)
				if lerr := mc.List.UnmarshalBinary(b); lerr != nil && err == nil {
					err = fmt.Errorf("filter %q condition %d: %w", f.GetKey(), i+1, lerr)
				}
			}
			mf.Conditions = append(mf.Conditions, mc)
		}
		cv.conds = cv.conds[:len(cv.conds)+len(mf.Conditions)]
		return mgmt.Object{Filter: mf}, err
	}
	return mgmt.Object{}, fmt.Errorf("%w: empty object", engine.ErrInvalidArgument)
}

// FromObject converts mgmt's object to the wire's.
func FromObject(o mgmt.Object) *Object {
	switch o.Kind() {
	case mgmt.KindProvider:
		p := o.Provider
		return &Object{Kind: &Object_Provider{Provider: &Provider{Key: p.Key, Name: p.Name, Description: p.Description, Lifetime: p.Lifetime.String(), Id: p.ID, Session: p.Session}}}
	case mgmt.KindProviderContext:
		c := o.ProviderContext
		return &Object{Kind: &Object_ProviderContext{ProviderContext: &ProviderContext{Key: c.Key, Name: c.Name, Provider: c.Provider, Data: c.Data, Lifetime: c.Lifetime.String(), Id: c.ID, Session: c.Session,
			DataRedacted: c.DataRedacted, DataLength: uint32(c.DataLength), DataSha256: unhex(c.DataSHA256)}}}
	case mgmt.KindSublayer:
		s := o.Sublayer
		return &Object{Kind: &Object_Sublayer{Sublayer: &Sublayer{Key: s.Key, Name: s.Name, Provider: s.Provider, Weight: uint32(s.Weight), Lifetime: s.Lifetime.String(), Id: s.ID, Session: s.Session}}}
	case mgmt.KindCallout:
		c := o.Callout
		return &Object{Kind: &Object_Callout{Callout: &Callout{Key: c.Key, Name: c.Name, Provider: c.Provider, Layer: c.Layer, Flags: c.Flags, Lifetime: c.Lifetime.String(), Id: c.ID, Session: c.Session}}}
	case mgmt.KindFilter:
		f := o.Filter
		pf := &Filter{Key: f.Key, Name: f.Name, Description: f.Description, Layer: f.Layer, Sublayer: f.Sublayer,
			Provider: f.Provider, Weight: f.Weight, Action: f.Action, Callout: f.Callout, ProviderContext: f.ProviderContext,
			Flags: f.Flags, Lifetime: f.Lifetime.String(), Id: f.ID, EffectiveWeight: f.EffectiveWeight, Session: f.Session}
		for _, c := range f.Conditions {
			pc := &Condition{Field: c.Field, Match: c.Match, Value: c.Value, Values: c.Values}
			if c.List != nil {
				pc.List, _ = c.List.MarshalBinary()
			}
			pf.Conditions = append(pf.Conditions, pc)
		}
		return &Object{Kind: &Object_Filter{Filter: pf}}
	}
	return &Object{}
}

// ToRef and FromRef convert object references.
func ToRef(r *ObjectRef) (mgmt.Ref, error) {
	k, err := mgmt.ParseKind(r.GetKind())
	return mgmt.Ref{Kind: k, Key: r.GetKey(), ID: r.GetId()}, err
}

func FromRef(r mgmt.Ref) *ObjectRef { return &ObjectRef{Kind: r.Kind.String(), Key: r.Key, Id: r.ID} }

// ToOps and FromOps convert Apply's ops.
func ToOps(ops []*Op) ([]mgmt.Op, error) {
	out := make([]mgmt.Op, 0, len(ops))
	objs := make([]mgmt.Object, len(ops))
	var cv converter
	for i, op := range ops {
		var m mgmt.Op
		switch o := op.GetOp().(type) {
		case *Op_Add:
			obj, err := cv.object(o.Add)
			if err != nil {
				return nil, fmt.Errorf("op %d: %w", i+1, err)
			}
			objs[i] = obj
			m.Add = &objs[i]
		case *Op_Delete:
			r, err := ToRef(o.Delete)
			if err != nil {
				return nil, fmt.Errorf("op %d: %w", i+1, err)
			}
			m.Delete = &r
		default:
			return nil, fmt.Errorf("%w: op %d is empty", engine.ErrInvalidArgument, i+1)
		}
		out = append(out, m)
	}
	return out, nil
}

func FromOps(ops []mgmt.Op) []*Op {
	out := make([]*Op, 0, len(ops))
	for _, op := range ops {
		switch {
		case op.Add != nil:
			out = append(out, &Op{Op: &Op_Add{Add: FromObject(*op.Add)}})
		case op.Delete != nil:
			out = append(out, &Op{Op: &Op_Delete{Delete: FromRef(*op.Delete)}})
		}
	}
	return out
}

// FromSession and ToSession convert session descriptions.
func FromSession(s mgmt.SessionInfo) *Session {
	return &Session{Id: s.ID, Pid: s.PID, Uid: s.UID, Gid: s.GID, Name: s.Name, Dynamic: s.Dynamic,
		OpenedUnixNano: s.OpenedAt.UnixNano(), Admin: s.Admin, InTransaction: s.InTransaction}
}

func ToSession(s *Session) mgmt.SessionInfo {
	return mgmt.SessionInfo{ID: s.GetId(), PID: s.GetPid(), UID: s.GetUid(), GID: s.GetGid(), Name: s.GetName(),
		Dynamic: s.GetDynamic(), OpenedAt: time.Unix(0, s.GetOpenedUnixNano()), Admin: s.GetAdmin(), InTransaction: s.GetInTransaction()}
}

// FromNetEvent converts an engine net event.
func FromNetEvent(ev engine.NetEvent) *NetEvent {
	n := &NetEvent{Seq: ev.Seq, TimeUnixNano: ev.Time.UnixNano(), Type: ev.Type.String(), Layer: ev.Layer.String(),
		FilterId: uint64(ev.Filter), Callout: uint32(ev.Callout), Reason: ev.Reason.String(), Protocol: uint32(ev.Protocol),
		AppId: ev.AppID, UserId: ev.UserID, GroupId: ev.GroupID, CgroupId: ev.CgroupID, ProcessId: ev.ProcessID}
	if ev.Local.IsValid() {
		n.Local = ev.Local.String()
	}
	if ev.Remote.IsValid() {
		n.Remote = ev.Remote.String()
	}
	return n
}

// FromExplanation converts an explanation.
func FromExplanation(x *mgmt.Explanation, values string) *ExplainResponse {
	t := x.Trace
	r := t.Result
	out := &ExplainResponse{Layer: t.Layer.String(), Action: r.Action.String(), Hard: r.Filter != 0 && r.Hard(),
		FilterId: uint64(r.Filter), FilterKey: x.FilterKeys[r.Filter], Sublayer: uint32(r.Sublayer),
		SublayerKey: x.SublayerKeys[r.Sublayer], Callout: uint32(r.Callout), Reason: r.Reason.String(), Values: values}
	if r.Action != engine.ActionPermit {
		out.Action = engine.ActionBlock.String()
	}
	for _, s := range t.Steps {
		out.Steps = append(out.Steps, &Step{Sublayer: uint32(s.Sublayer), SublayerKey: x.SublayerKeys[s.Sublayer],
			FilterId: uint64(s.Filter), FilterKey: x.FilterKeys[s.Filter], FilterAction: s.FilterAction.String(),
			Callout: uint32(s.Callout), Returned: s.Returned.String(),
			WriteBefore: s.RightsBefore&engine.RightActionWrite != 0, WriteAfter: s.RightsAfter&engine.RightActionWrite != 0, Note: s.Note})
	}
	return out
}

// FromChange and ToChange convert change notifications.
func FromChange(c mgmt.Change) *Change {
	return &Change{Kind: c.Kind.String(), Type: c.Type.String(), Key: c.Key, Id: c.ID, Session: c.Session}
}

func ToChange(c *Change) mgmt.Change {
	k, _ := mgmt.ParseKind(c.GetKind())
	t := mgmt.ChangeDelete
	if c.GetType() == "add" {
		t = mgmt.ChangeAdd
	}
	return mgmt.Change{Kind: k, Type: t, Key: c.GetKey(), ID: c.GetId(), Session: c.GetSession()}
}

// unhex decodes a hex digest; what does not decode is dropped (it only
// describes data withheld from the caller).
func unhex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		return nil
	}
	return b
}
