package engine_test

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"fwp/engine"
)

// This file is the slow reference classifier: a literal, linear reading of
// design.md section 2's arbitration rules over the engine's committed
// filters. It shares no code with compile.go or classify.go (it lives in the
// external test package and has its own condition matcher), so that the
// differential tests compare two independent readings of the contract.

// refOutcome is what the reference decides for one tuple.
type refOutcome struct {
	Action engine.ActionType // ActionPermit or ActionBlock
	Hard   bool              // ACTION_WRITE cleared
	Filter engine.FilterID   // the deciding filter, 0 when none decided
	Veto   bool
	Absorb bool
}

func (o refOutcome) String() string {
	return fmt.Sprintf("%s hard=%v filter=%d veto=%v absorb=%v", o.Action, o.Hard, o.Filter, o.Veto, o.Absorb)
}

// refOutcomeOf projects an engine result onto what the reference decides.
func refOutcomeOf(r engine.Result) refOutcome {
	return refOutcome{Action: r.Action, Hard: r.Hard(), Filter: r.Filter, Veto: r.Veto, Absorb: r.Flags&engine.OutAbsorb != 0}
}

// refModel is one layer's filter set as the reference sees it.
type refModel struct {
	layer   engine.LayerID
	filters []engine.Filter // enabled filters, in the reference's evaluation order
	// regs are the callout registrations the test made, by callout ID; a
	// callout missing here is unregistered.
	regs map[engine.CalloutID]*engine.CalloutRegistration
}

// newRefModel reads the committed filters of layer from v. regs maps callout
// keys to the registrations the test made. It reports a weight whose
// effective value contradicts what was asked (explicit weights are kept as
// given; a range index sets the top four bits; auto is range index 0).
func newRefModel(v engine.View, layer engine.LayerID, regs map[string]*engine.CalloutRegistration) (*refModel, error) {
	m := &refModel{layer: layer, regs: map[engine.CalloutID]*engine.CalloutRegistration{}}
	subWeight := map[engine.SublayerID]uint16{}
	for _, s := range v.Sublayers(0) {
		subWeight[s.ID] = s.Weight
	}
	for _, c := range v.Callouts(0, layer) {
		if r, ok := regs[c.Key]; ok && r != nil {
			m.regs[c.ID] = r
		}
	}
	for _, f := range v.Filters(engine.FilterTemplate{Layer: layer}) {
		switch {
		case f.Weight.IsExact() && f.EffectiveWeight != f.Weight.Value():
			return nil, fmt.Errorf("filter %d: explicit weight %d became %d", f.ID, f.Weight.Value(), f.EffectiveWeight)
		case f.Weight.IsIndex() && f.EffectiveWeight>>60 != f.Weight.Value():
			return nil, fmt.Errorf("filter %d: range index %d became weight %#x", f.ID, f.Weight.Value(), f.EffectiveWeight)
		case f.Weight.IsAuto() && f.EffectiveWeight>>60 != 0:
			return nil, fmt.Errorf("filter %d: automatic weight %#x is outside range index 0", f.ID, f.EffectiveWeight)
		}
		if _, ok := subWeight[f.Sublayer]; !ok {
			return nil, fmt.Errorf("filter %d: sublayer %d unknown", f.ID, f.Sublayer)
		}
		if f.Flags&engine.FilterDisabled != 0 {
			continue
		}
		m.filters = append(m.filters, f)
	}
	// Sublayers by weight, highest first; filters within one by weight,
	// highest first. Equal weights: lower sublayer ID, then lower filter ID
	// first (fwp's documented tie-break).
	slices.SortStableFunc(m.filters, func(a, b engine.Filter) int {
		if c := cmp.Compare(subWeight[b.Sublayer], subWeight[a.Sublayer]); c != 0 {
			return c
		}
		if c := cmp.Compare(a.Sublayer, b.Sublayer); c != 0 {
			return c
		}
		if c := cmp.Compare(b.EffectiveWeight, a.EffectiveWeight); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	return m, nil
}

// classify decides the tuple. With dry set no callout is called: terminating
// and unknown callout filters take their unregistered default and inspection
// ones pass, which is what Engine.Explain documents.
func (m *refModel) classify(vs *engine.Values, meta *engine.Metadata, dry bool) refOutcome {
	decided := false
	var action engine.ActionType
	write := true // the running decision's ACTION_WRITE right
	var decider engine.FilterID
	veto, absorb := false, false

	for i := 0; i < len(m.filters); {
		// One sublayer: filters[i:j].
		j := i
		for j < len(m.filters) && m.filters[j].Sublayer == m.filters[i].Sublayer {
			j++
		}
		for k := i; k < j; k++ {
			f := &m.filters[k]
			if !refFilterMatches(f, vs) {
				continue
			}
			rights := engine.Rights(0)
			if write {
				rights = engine.RightActionWrite
			}
			ret, hard, flags, called := m.evaluate(f, vs, meta, rights, dry)
			if ret != engine.ActionPermit && ret != engine.ActionBlock {
				continue // CONTINUE: the next filter of the sublayer
			}
			// The sublayer has decided. Fold it into the running decision.
			switch {
			case !decided || write:
				decided, action, write, decider = true, ret, !hard, f.ID
				absorb = flags&engine.OutAbsorb != 0
			case action == engine.ActionPermit && ret == engine.ActionBlock && called:
				// A called callout blocks a hard permit: a veto, final.
				action, write, decider, veto = engine.ActionBlock, false, f.ID, true
				absorb = flags&engine.OutAbsorb != 0
			}
			break
		}
		i = j
	}
	if !decided {
		return refOutcome{Action: engine.ActionPermit}
	}
	return refOutcome{Action: action, Hard: !write, Filter: decider, Veto: veto,
		Absorb: absorb && action == engine.ActionBlock}
}

// evaluate returns what one matching filter says: permit, block or
// continue, whether that is hard, the out flags, and whether a callout was
// actually called.
func (m *refModel) evaluate(f *engine.Filter, vs *engine.Values, meta *engine.Metadata, rights engine.Rights, dry bool) (ret engine.ActionType, hard bool, flags engine.OutFlags, called bool) {
	clear := f.Flags&engine.FilterClearActionRight != 0
	switch f.Action.Type {
	case engine.ActionPermit:
		return engine.ActionPermit, clear, 0, false // a filter's permit is soft
	case engine.ActionBlock:
		return engine.ActionBlock, true, 0, false // a filter's block is hard
	}
	reg := m.regs[f.Action.Callout]
	if f.Action.Type == engine.ActionCalloutInspection {
		if reg != nil && !dry {
			m.call(f, reg, vs, meta, rights) // its return is always CONTINUE
		}
		return engine.ActionContinue, false, 0, false
	}
	if reg == nil || dry {
		if f.Flags&engine.FilterPermitIfCalloutUnregistered != 0 {
			return engine.ActionPermit, clear, 0, false
		}
		return engine.ActionBlock, true, 0, false
	}
	out := m.call(f, reg, vs, meta, rights)
	if out.Action == engine.ActionPermit && rights&engine.RightActionWrite == 0 {
		return engine.ActionContinue, false, 0, true // a permit it had no right to write: not made
	}
	hard = out.Rights&engine.RightActionWrite == 0 || clear
	switch out.Action {
	case engine.ActionPermit, engine.ActionBlock:
		return out.Action, hard, out.Flags, true
	}
	if f.Action.Type == engine.ActionCalloutTerminating {
		return engine.ActionBlock, hard, out.Flags, true // CONTINUE from a terminating callout
	}
	return engine.ActionContinue, false, 0, true
}

func (m *refModel) call(f *engine.Filter, reg *engine.CalloutRegistration, vs *engine.Values, meta *engine.Metadata, rights engine.Rights) engine.ClassifyOut {
	req := engine.ClassifyRequest{Layer: m.layer, Values: vs, Meta: meta, Filter: f}
	out := engine.ClassifyOut{Action: engine.ActionContinue, Rights: rights}
	reg.Classify(&req, &out)
	return out
}

// refFilterMatches: conditions on one field are ORed, fields are ANDed; a
// filter without conditions matches everything.
func refFilterMatches(f *engine.Filter, vs *engine.Values) bool {
	conds := f.Conditions
	for i, c := range conds {
		if slices.ContainsFunc(conds[:i], func(d engine.Condition) bool { return d.Field == c.Field }) {
			continue // this field's group was decided already
		}
		met := false
		for _, d := range conds[i:] {
			if d.Field == c.Field && refCondMatches(d, vs.Get(d.Field)) {
				met = true
				break
			}
		}
		if !met {
			return false
		}
	}
	return true
}

// refCondMatches is a straightforward matcher, one case per match type. An
// absent incoming value matches no condition, negated ones included.
func refCondMatches(c engine.Condition, v engine.Value) bool {
	if v.IsEmpty() {
		return false
	}
	cv := c.Value
	switch c.Match {
	case engine.MatchEqual:
		return refEqual(cv, v)
	case engine.MatchNotEqual:
		return !refEqual(cv, v)
	case engine.MatchGreater:
		return refCompare(v, cv) > 0
	case engine.MatchLess:
		return refCompare(v, cv) < 0
	case engine.MatchGreaterOrEqual:
		return refCompare(v, cv) >= 0
	case engine.MatchLessOrEqual:
		return refCompare(v, cv) <= 0
	case engine.MatchRange:
		return refCompare(v, cv.Low()) >= 0 && refCompare(v, cv.High()) <= 0
	case engine.MatchFlagsAllSet:
		return v.Uint()&cv.Uint() == cv.Uint()
	case engine.MatchFlagsAnySet:
		return v.Uint()&cv.Uint() != 0
	case engine.MatchFlagsNoneSet:
		return v.Uint()&cv.Uint() == 0
	case engine.MatchEqualCaseInsensitive:
		return strings.EqualFold(v.Str(), cv.Str())
	case engine.MatchPrefix:
		return refPrefix(cv, v)
	case engine.MatchNotPrefix:
		return !refPrefix(cv, v)
	}
	return false
}

func refEqual(cv, v engine.Value) bool {
	switch cv.Type() {
	case engine.TypePrefix:
		return v.Type() == engine.TypeAddr && cv.Prefix().Contains(v.Addr())
	case engine.TypeAddr:
		return v.Type() == engine.TypeAddr && v.Addr() == cv.Addr()
	case engine.TypeString, engine.TypeBytes:
		return v.Str() == cv.Str()
	}
	return v.Uint() == cv.Uint()
}

func refPrefix(cv, v engine.Value) bool {
	if cv.Type() == engine.TypePrefix {
		return v.Type() == engine.TypeAddr && cv.Prefix().Contains(v.Addr())
	}
	return strings.HasPrefix(v.Str(), cv.Str())
}

func refCompare(a, b engine.Value) int {
	if a.Type() == engine.TypeAddr {
		return a.Addr().Compare(b.Addr())
	}
	if a.Type() == engine.TypeString || a.Type() == engine.TypeBytes {
		return strings.Compare(a.Str(), b.Str())
	}
	return cmp.Compare(a.Uint(), b.Uint())
}
