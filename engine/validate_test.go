package engine_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"fwp/engine"
)

// sentinels is every error the engine's management API may wrap.
var sentinels = []error{
	engine.ErrNotFound, engine.ErrAlreadyExists, engine.ErrInUse, engine.ErrInvalidLayer,
	engine.ErrInvalidField, engine.ErrInvalidCondition, engine.ErrInvalidMatchType,
	engine.ErrTypeMismatch, engine.ErrInvalidValue, engine.ErrInvalidWeight,
	engine.ErrInvalidAction, engine.ErrInvalidFlags, engine.ErrCalloutNotFound,
	engine.ErrIncompatibleLayer, engine.ErrInvalidArgument, engine.ErrTxnInProgress,
	engine.ErrNoTxnInProgress, engine.ErrTxnAborted, engine.ErrCalloutAlreadyRegistered,
}

func isSentinel(err error) bool {
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// wantErr fails unless err wraps want (and, for want nil, is nil).
func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	switch {
	case want == nil && err != nil:
		t.Errorf("%s: unexpected error %v", what, err)
	case want != nil && !errors.Is(err, want):
		t.Errorf("%s: error %v, want %v", what, err, want)
	}
}

// valFixture is an engine with one object of each kind to refer to.
type valFixture struct {
	e        *engine.Engine
	prov     engine.ProviderID
	sub      engine.SublayerID
	pctx     engine.ProviderContextID
	callout  engine.CalloutID // on ALE_AUTH_CONNECT_V4
	callout6 engine.CalloutID // on ALE_AUTH_CONNECT_V6
}

func newValFixture(t *testing.T) *valFixture {
	t.Helper()
	v := &valFixture{e: engine.New(engine.Options{})}
	err := v.e.Update(func(tx *engine.Txn) (err error) {
		if v.prov, err = tx.AddProvider(engine.Provider{Key: "prov"}); err != nil {
			return err
		}
		if v.sub, err = tx.AddSublayer(engine.Sublayer{Key: "sub", Provider: v.prov, Weight: 5}); err != nil {
			return err
		}
		if v.pctx, err = tx.AddProviderContext(engine.ProviderContext{Key: "ctx", Provider: v.prov, Data: []byte{1}}); err != nil {
			return err
		}
		if v.callout, err = tx.AddCallout(engine.Callout{Key: "co", Provider: v.prov, Layer: v4}); err != nil {
			return err
		}
		v.callout6, err = tx.AddCallout(engine.Callout{Key: "co6", Layer: v6})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func (v *valFixture) tx(t *testing.T) *engine.Txn {
	t.Helper()
	tx, err := v.e.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tx.Abort)
	return tx
}

func TestValidateFilter(t *testing.T) {
	v := newValFixture(t)
	block := engine.Action{Type: engine.ActionBlock}
	c := func(f engine.FieldID, m engine.MatchType, val engine.Value) []engine.Condition {
		return []engine.Condition{cond(f, m, val)}
	}
	eq := engine.MatchEqual
	rp, ra, app := engine.FieldIPRemotePort, engine.FieldIPRemoteAddress, engine.FieldALEAppID
	tests := []struct {
		name string
		f    engine.Filter
		want error
	}{
		{"valid", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, eq, u16(80))}, nil},
		{"valid with every reference", engine.Filter{Layer: v4, Sublayer: v.sub, Provider: v.prov, ProviderContext: v.pctx,
			Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: v.callout}, Flags: engine.FilterPermitIfCalloutUnregistered | engine.FilterIndexed}, nil},

		{"layer 0", engine.Filter{Action: block}, engine.ErrInvalidLayer},
		{"layer out of range", engine.Filter{Layer: 200, Action: block}, engine.ErrInvalidLayer},

		{"field 0", engine.Filter{Layer: v4, Action: block, Conditions: []engine.Condition{{}}}, engine.ErrInvalidCondition},
		{"field out of range", engine.Filter{Layer: v4, Action: block, Conditions: c(200, eq, u16(1))}, engine.ErrInvalidCondition},
		{"remote address on bind redirect", engine.Filter{Layer: engine.LayerALEBindRedirectV4, Action: block, Conditions: c(ra, eq, addr("10.0.0.1"))}, engine.ErrInvalidField},
		{"remote port on auth listen", engine.Filter{Layer: engine.LayerALEAuthListenV6, Action: block, Conditions: c(rp, eq, u16(1))}, engine.ErrInvalidField},
		{"direction on connect redirect", engine.Filter{Layer: engine.LayerALEConnectRedirectV4, Action: block, Conditions: c(engine.FieldDirection, eq, u32(0))}, engine.ErrInvalidField},
		{"original destination on recv accept", engine.Filter{Layer: engine.LayerALEAuthRecvAcceptV4, Action: block,
			Conditions: c(engine.FieldALEOriginalRemotePort, eq, u16(80))}, engine.ErrInvalidField},
		{"one bad condition among good ones", engine.Filter{Layer: engine.LayerALEBindRedirectV4, Action: block,
			Conditions: []engine.Condition{cond(engine.FieldIPLocalPort, eq, u16(80)), cond(rp, eq, u16(80))}}, engine.ErrInvalidField},

		{"uint8 on a port", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, eq, u8(80))}, engine.ErrTypeMismatch},
		{"uint16 on the protocol", engine.Filter{Layer: v4, Action: block, Conditions: c(engine.FieldIPProtocol, eq, u16(6))}, engine.ErrTypeMismatch},
		{"uint32 on a cgroup id", engine.Filter{Layer: v4, Action: block, Conditions: c(engine.FieldCgroupID, eq, u32(6))}, engine.ErrTypeMismatch},
		{"uint64 on a user id", engine.Filter{Layer: v4, Action: block, Conditions: c(engine.FieldALEUserID, eq, u64(6))}, engine.ErrTypeMismatch},
		{"string on a port", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, eq, str("80"))}, engine.ErrTypeMismatch},
		{"number on the app id", engine.Filter{Layer: v4, Action: block, Conditions: c(app, eq, u32(1))}, engine.ErrTypeMismatch},
		{"bytes on the app id", engine.Filter{Layer: v4, Action: block, Conditions: c(app, eq, engine.Bytes([]byte("/bin/sh")))}, engine.ErrTypeMismatch},
		{"string on an address", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, eq, str("10.0.0.1"))}, engine.ErrTypeMismatch},
		{"empty value", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, eq, empty)}, engine.ErrTypeMismatch},
		{"range value with EQUAL", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, eq, rng(u16(1), u16(2)))}, engine.ErrTypeMismatch},
		{"scalar value with RANGE", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, engine.MatchRange, u16(1))}, engine.ErrTypeMismatch},
		{"address with PREFIX", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, engine.MatchPrefix, addr("10.0.0.1"))}, engine.ErrTypeMismatch},
		{"prefix with GREATER", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, engine.MatchGreater, prefix("10.0.0.0/8"))}, engine.ErrTypeMismatch},
		{"prefix on a port", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, eq, prefix("10.0.0.0/8"))}, engine.ErrTypeMismatch},

		{"unknown match type", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, 99, u16(1))}, engine.ErrInvalidMatchType},
		{"FLAGS_ALL_SET on a string", engine.Filter{Layer: v4, Action: block, Conditions: c(app, engine.MatchFlagsAllSet, str("x"))}, engine.ErrInvalidMatchType},
		{"FLAGS_ANY_SET on an address", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, engine.MatchFlagsAnySet, addr("10.0.0.1"))}, engine.ErrInvalidMatchType},
		{"FLAGS_NONE_SET on a string", engine.Filter{Layer: v4, Action: block, Conditions: c(app, engine.MatchFlagsNoneSet, str("x"))}, engine.ErrInvalidMatchType},
		{"EQUAL_CASE_INSENSITIVE on a port", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, engine.MatchEqualCaseInsensitive, u16(1))}, engine.ErrInvalidMatchType},
		{"EQUAL_CASE_INSENSITIVE on an address", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, engine.MatchEqualCaseInsensitive, addr("10.0.0.1"))}, engine.ErrInvalidMatchType},
		{"PREFIX on a user id", engine.Filter{Layer: v4, Action: block, Conditions: c(engine.FieldALEUserID, engine.MatchPrefix, u32(1))}, engine.ErrInvalidMatchType},
		{"NOT_PREFIX on a port", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, engine.MatchNotPrefix, u16(1))}, engine.ErrInvalidMatchType},
		{"GREATER on a string", engine.Filter{Layer: v4, Action: block, Conditions: c(app, engine.MatchGreater, str("a"))}, engine.ErrInvalidMatchType},
		{"LESS_OR_EQUAL on a string", engine.Filter{Layer: v4, Action: block, Conditions: c(app, engine.MatchLessOrEqual, str("a"))}, engine.ErrInvalidMatchType},
		{"RANGE on a string", engine.Filter{Layer: v4, Action: block, Conditions: c(app, engine.MatchRange, rng(str("a"), str("b")))}, engine.ErrInvalidMatchType},

		{"range low above high", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, engine.MatchRange, rng(u16(90), u16(80)))}, engine.ErrInvalidValue},
		{"address range low above high", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, engine.MatchRange, rng(addr("10.0.0.9"), addr("10.0.0.1")))}, engine.ErrInvalidValue},
		{"range of mixed types", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, engine.MatchRange, rng(u16(1), u32(2)))}, engine.ErrTypeMismatch},
		{"range of the wrong type", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, engine.MatchRange, rng(u32(1), u32(2)))}, engine.ErrTypeMismatch},
		{"range of empties", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, engine.MatchRange, rng(empty, empty))}, engine.ErrTypeMismatch},
		{"range of prefixes", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, engine.MatchRange, rng(prefix("10.0.0.0/8"), prefix("11.0.0.0/8")))}, engine.ErrTypeMismatch},
		{"range of ranges", engine.Filter{Layer: v4, Action: block, Conditions: c(rp, engine.MatchRange, rng(rng(u16(1), u16(2)), rng(u16(3), u16(4))))}, engine.ErrTypeMismatch},
		{"range mixing families (v4 low)", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, engine.MatchRange, rng(addr("10.0.0.1"), addr("::1")))}, engine.ErrInvalidValue},
		{"range mixing families (v6 low)", engine.Filter{Layer: v6, Action: block, Conditions: c(ra, engine.MatchRange, rng(addr("::1"), addr("10.0.0.1")))}, engine.ErrInvalidValue},

		{"v6 address on a v4 layer", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, eq, addr("2001:db8::1"))}, engine.ErrInvalidValue},
		{"v6 prefix on a v4 layer", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, engine.MatchPrefix, prefix("2001:db8::/32"))}, engine.ErrInvalidValue},
		{"v6 range on a v4 layer", engine.Filter{Layer: v4, Action: block, Conditions: c(ra, engine.MatchRange, rng(addr("::1"), addr("::2")))}, engine.ErrInvalidValue},
		{"v6 original destination on a v4 layer", engine.Filter{Layer: v4, Action: block,
			Conditions: c(engine.FieldALEOriginalRemoteAddress, eq, addr("::1"))}, engine.ErrInvalidValue},
		{"v4 local address on a v6 layer", engine.Filter{Layer: v6, Action: block, Conditions: c(engine.FieldIPLocalAddress, eq, addr("127.0.0.1"))}, engine.ErrInvalidValue},
		{"v4 prefix on a v6 layer", engine.Filter{Layer: v6, Action: block, Conditions: c(ra, engine.MatchNotPrefix, prefix("10.0.0.0/8"))}, engine.ErrInvalidValue},

		{"unknown sublayer", engine.Filter{Layer: v4, Sublayer: 999, Action: block}, engine.ErrNotFound},
		{"unknown provider", engine.Filter{Layer: v4, Provider: 999, Action: block}, engine.ErrNotFound},
		{"unknown provider context", engine.Filter{Layer: v4, ProviderContext: 999, Action: block}, engine.ErrNotFound},
		{"unknown callout", engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: 999}}, engine.ErrCalloutNotFound},
		{"callout action without a callout", engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionCalloutInspection}}, engine.ErrCalloutNotFound},
		{"callout on the wrong layer", engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: v.callout6}}, engine.ErrIncompatibleLayer},
		{"callout on the sibling layer", engine.Filter{Layer: v6, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: v.callout}}, engine.ErrIncompatibleLayer},

		{"PERMIT_IF_CALLOUT_UNREGISTERED on BLOCK", engine.Filter{Layer: v4, Action: block, Flags: engine.FilterPermitIfCalloutUnregistered}, engine.ErrInvalidFlags},
		{"PERMIT_IF_CALLOUT_UNREGISTERED on PERMIT", engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionPermit}, Flags: engine.FilterPermitIfCalloutUnregistered}, engine.ErrInvalidFlags},
		{"PERMIT_IF_CALLOUT_UNREGISTERED on INSPECTION", engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionCalloutInspection, Callout: v.callout},
			Flags: engine.FilterPermitIfCalloutUnregistered}, engine.ErrInvalidFlags},
		{"PERMIT_IF_CALLOUT_UNREGISTERED on UNKNOWN", engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: v.callout},
			Flags: engine.FilterPermitIfCalloutUnregistered}, nil},
		{"unknown flag", engine.Filter{Layer: v4, Action: block, Flags: 1 << 20}, engine.ErrInvalidFlags},

		{"weight index 15", engine.Filter{Layer: v4, Action: block, Weight: engine.WeightIndex(15)}, nil},
		{"weight index 16", engine.Filter{Layer: v4, Action: block, Weight: engine.WeightIndex(16)}, engine.ErrInvalidWeight},
		{"weight index 255", engine.Filter{Layer: v4, Action: block, Weight: engine.WeightIndex(255)}, engine.ErrInvalidWeight},
		{"explicit max weight", engine.Filter{Layer: v4, Action: block, Weight: engine.WeightExact(1<<64 - 1)}, nil},

		{"action 0", engine.Filter{Layer: v4}, engine.ErrInvalidAction},
		{"action continue", engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionContinue}}, engine.ErrInvalidAction},
		{"action 99", engine.Filter{Layer: v4, Action: engine.Action{Type: 99}}, engine.ErrInvalidAction},
		{"block naming a callout", engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionBlock, Callout: v.callout}}, engine.ErrInvalidAction},
		{"permit naming a callout", engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionPermit, Callout: v.callout}}, engine.ErrInvalidAction},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tx := v.tx(t)
			f := tt.f
			wantErr(t, "ValidateFilter", tx.ValidateFilter(&f), tt.want)
			id, err := tx.AddFilter(tt.f)
			wantErr(t, "AddFilter", err, tt.want)
			if err != nil && id != 0 {
				t.Errorf("failed AddFilter returned ID %s", id)
			}
			if err == nil {
				if _, gerr := tx.View().Filter(id); gerr != nil {
					t.Errorf("added filter not visible in its txn: %v", gerr)
				}
			}
			if err != nil && tx.View().FilterCount(0) != 0 {
				t.Errorf("failed AddFilter left a filter")
			}
		})
	}
}

func TestValidateDuplicateKeys(t *testing.T) {
	v := newValFixture(t)
	tx := v.tx(t)
	_, err := tx.AddFilter(engine.Filter{Key: "f", Layer: v4, Action: engine.Action{Type: engine.ActionBlock}})
	wantErr(t, "first filter", err, nil)
	_, err = tx.AddFilter(engine.Filter{Key: "f", Layer: v4, Action: engine.Action{Type: engine.ActionPermit}})
	wantErr(t, "filter key, same layer", err, engine.ErrAlreadyExists)
	_, err = tx.AddFilter(engine.Filter{Key: "f", Layer: v6, Action: engine.Action{Type: engine.ActionPermit}})
	wantErr(t, "filter key, other layer", err, engine.ErrAlreadyExists)
	_, err = tx.AddProvider(engine.Provider{Key: "prov"})
	wantErr(t, "provider key", err, engine.ErrAlreadyExists)
	_, err = tx.AddSublayer(engine.Sublayer{Key: "sub"})
	wantErr(t, "sublayer key", err, engine.ErrAlreadyExists)
	_, err = tx.AddSublayer(engine.Sublayer{Key: "universal"})
	wantErr(t, "universal sublayer key", err, engine.ErrAlreadyExists)
	_, err = tx.AddProviderContext(engine.ProviderContext{Key: "ctx"})
	wantErr(t, "context key", err, engine.ErrAlreadyExists)
	_, err = tx.AddCallout(engine.Callout{Key: "co", Layer: v4})
	wantErr(t, "callout key", err, engine.ErrAlreadyExists)
	// Keys of different kinds do not collide, and a generated key does not
	// take a given one.
	_, err = tx.AddCallout(engine.Callout{Key: "prov", Layer: v4})
	wantErr(t, "callout named like a provider", err, nil)
}

func TestValidateObjectReferences(t *testing.T) {
	v := newValFixture(t)
	tx := v.tx(t)
	_, err := tx.AddSublayer(engine.Sublayer{Provider: 999})
	wantErr(t, "sublayer of unknown provider", err, engine.ErrNotFound)
	_, err = tx.AddProviderContext(engine.ProviderContext{Provider: 999})
	wantErr(t, "context of unknown provider", err, engine.ErrNotFound)
	_, err = tx.AddCallout(engine.Callout{Layer: v4, Provider: 999})
	wantErr(t, "callout of unknown provider", err, engine.ErrNotFound)
	_, err = tx.AddCallout(engine.Callout{})
	wantErr(t, "callout without layer", err, engine.ErrInvalidLayer)
	_, err = tx.AddCallout(engine.Callout{Layer: 77})
	wantErr(t, "callout on unknown layer", err, engine.ErrInvalidLayer)
}

func TestValidateDelete(t *testing.T) {
	v := newValFixture(t)
	tx := v.tx(t)
	fid, err := tx.AddFilter(engine.Filter{Key: "f", Layer: v4, Sublayer: v.sub, ProviderContext: v.pctx,
		Action: engine.Action{Type: engine.ActionCalloutInspection, Callout: v.callout}})
	if err != nil {
		t.Fatal(err)
	}
	// Referenced: refused, nothing changes.
	wantErr(t, "sublayer with a filter", tx.DeleteSublayer(v.sub), engine.ErrInUse)
	wantErr(t, "callout with a filter", tx.DeleteCallout(v.callout), engine.ErrInUse)
	wantErr(t, "context with a filter", tx.DeleteProviderContext(v.pctx), engine.ErrInUse)
	wantErr(t, "universal sublayer", tx.DeleteSublayer(engine.UniversalSublayer), engine.ErrInUse)
	wantErr(t, "provider of sublayer, context, callout", tx.DeleteProvider(v.prov), engine.ErrInUse)
	// Unknown IDs.
	wantErr(t, "filter", tx.DeleteFilter(999), engine.ErrNotFound)
	wantErr(t, "filter key", tx.DeleteFilterByKey("nope"), engine.ErrNotFound)
	wantErr(t, "provider", tx.DeleteProvider(999), engine.ErrNotFound)
	wantErr(t, "context", tx.DeleteProviderContext(999), engine.ErrNotFound)
	wantErr(t, "sublayer", tx.DeleteSublayer(999), engine.ErrNotFound)
	wantErr(t, "callout", tx.DeleteCallout(999), engine.ErrNotFound)
	// Unwind in order: each delete frees the next.
	wantErr(t, "filter by key", tx.DeleteFilterByKey("f"), nil)
	wantErr(t, "filter again", tx.DeleteFilter(fid), engine.ErrNotFound)
	wantErr(t, "sublayer", tx.DeleteSublayer(v.sub), nil)
	wantErr(t, "still referenced by context and callout", tx.DeleteProvider(v.prov), engine.ErrInUse)
	wantErr(t, "context", tx.DeleteProviderContext(v.pctx), nil)
	wantErr(t, "still referenced by callout", tx.DeleteProvider(v.prov), engine.ErrInUse)
	wantErr(t, "callout", tx.DeleteCallout(v.callout), nil)
	wantErr(t, "provider", tx.DeleteProvider(v.prov), nil)
	wantErr(t, "provider again", tx.DeleteProvider(v.prov), engine.ErrNotFound)

	// A provider referenced by a filter alone.
	p, err := tx.AddProvider(engine.Provider{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.AddFilter(engine.Filter{Layer: v6, Provider: p, Action: engine.Action{Type: engine.ActionBlock}}); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "provider of a filter", tx.DeleteProvider(p), engine.ErrInUse)
}

func TestValidateLookupsNotFound(t *testing.T) {
	e := engine.New(engine.Options{})
	view := e.View()
	for name, get := range map[string]func() error{
		"Filter":               func() error { _, err := view.Filter(1); return err },
		"FilterByKey":          func() error { _, err := view.FilterByKey("x"); return err },
		"Provider":             func() error { _, err := view.Provider(1); return err },
		"ProviderByKey":        func() error { _, err := view.ProviderByKey("x"); return err },
		"ProviderContext":      func() error { _, err := view.ProviderContext(1); return err },
		"ProviderContextByKey": func() error { _, err := view.ProviderContextByKey("x"); return err },
		"Sublayer":             func() error { _, err := view.Sublayer(99); return err },
		"SublayerByKey":        func() error { _, err := view.SublayerByKey("x"); return err },
		"Callout":              func() error { _, err := view.Callout(1); return err },
		"CalloutByKey":         func() error { _, err := view.CalloutByKey("x"); return err },
	} {
		wantErr(t, name, get(), engine.ErrNotFound)
	}
}

func TestValidateRuntimeArguments(t *testing.T) {
	e := engine.New(engine.Options{})
	noop := func(*engine.ClassifyRequest, *engine.ClassifyOut) {}
	wantErr(t, "register without key", e.RegisterCallout("", engine.CalloutRegistration{Classify: noop}), engine.ErrInvalidArgument)
	wantErr(t, "register without classify", e.RegisterCallout("k", engine.CalloutRegistration{}), engine.ErrInvalidArgument)
	wantErr(t, "register", e.RegisterCallout("k", engine.CalloutRegistration{Classify: noop}), nil)
	wantErr(t, "register twice", e.RegisterCallout("k", engine.CalloutRegistration{Classify: noop}), engine.ErrCalloutAlreadyRegistered)
	wantErr(t, "unregister", e.UnregisterCallout("k"), nil)
	wantErr(t, "unregister twice", e.UnregisterCallout("k"), engine.ErrNotFound)
	wantErr(t, "unregister unknown", e.UnregisterCallout("nope"), engine.ErrNotFound)
	wantErr(t, "register again after unregister", e.RegisterCallout("k", engine.CalloutRegistration{Classify: noop}), nil)

	flow := e.NewFlowHandle()
	wantErr(t, "flow context without flow", e.FlowAssociateContext(0, v4, 1, nil), engine.ErrInvalidArgument)
	wantErr(t, "flow context without layer", e.FlowAssociateContext(flow, 0, 1, nil), engine.ErrInvalidArgument)
	wantErr(t, "flow context without callout", e.FlowAssociateContext(flow, v4, 0, nil), engine.ErrInvalidArgument)
	wantErr(t, "flow context", e.FlowAssociateContext(flow, v4, 1, "x"), nil)
	wantErr(t, "flow context twice", e.FlowAssociateContext(flow, v4, 1, "y"), engine.ErrAlreadyExists)
	wantErr(t, "remove flow context", e.FlowRemoveContext(flow, v4, 1), nil)
	wantErr(t, "remove flow context twice", e.FlowRemoveContext(flow, v4, 1), engine.ErrNotFound)

	_, err := e.Explain(0, &engine.Values{}, nil)
	wantErr(t, "explain layer 0", err, engine.ErrInvalidLayer)
	_, err = e.BestTerminatingMatch(99, &engine.Values{})
	wantErr(t, "best match layer 99", err, engine.ErrInvalidLayer)
	// Classify cannot return an error: a bad layer or no values fails closed.
	for _, l := range []engine.LayerID{0, 99} {
		if r := e.Classify(l, &engine.Values{}, nil); r.Action != engine.ActionBlock {
			t.Errorf("Classify(layer %d) = %s, want block", l, r)
		}
	}
	if r := e.Classify(v4, nil, nil); r.Action != engine.ActionBlock {
		t.Errorf("Classify(nil values) = %s, want block", r)
	}
}

// Every Txn method after Commit or Abort reports ErrNoTxnInProgress and
// changes nothing.
func TestTxnUseAfterEnd(t *testing.T) {
	for _, end := range []string{"commit", "abort"} {
		t.Run(end, func(t *testing.T) {
			v := newValFixture(t)
			tx, err := v.e.Begin(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			fid, err := tx.AddFilter(engine.Filter{Key: "f", Layer: v4, Action: engine.Action{Type: engine.ActionBlock}})
			if err != nil {
				t.Fatal(err)
			}
			if end == "commit" {
				wantErr(t, "commit", tx.Commit(), nil)
			} else {
				tx.Abort()
			}
			none := engine.ErrNoTxnInProgress
			var errs []error
			add := func(_ any, err error) { errs = append(errs, err) }
			add(tx.AddProvider(engine.Provider{}))
			add(tx.AddProviderContext(engine.ProviderContext{}))
			add(tx.AddSublayer(engine.Sublayer{}))
			add(tx.AddCallout(engine.Callout{Layer: v4}))
			add(tx.AddFilter(engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionPermit}}))
			add(nil, tx.ValidateFilter(&engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionPermit}}))
			add(nil, tx.DeleteFilter(fid))
			add(nil, tx.DeleteFilterByKey("f"))
			add(nil, tx.DeleteFilterByKey("never-existed"))
			add(nil, tx.DeleteProvider(v.prov))
			add(nil, tx.DeleteProviderContext(v.pctx))
			add(nil, tx.DeleteSublayer(v.sub))
			add(nil, tx.DeleteCallout(v.callout6))
			add(nil, tx.Commit())
			for i, err := range errs {
				wantErr(t, "call "+string(rune('a'+i)), err, none)
			}
			tx.Abort() // a no-op, and must not release the writer slot twice
			wantFilters := 0
			if end == "commit" {
				wantFilters = 1
			}
			if n := v.e.View().FilterCount(0); n != wantFilters {
				t.Fatalf("%d filters, want %d", n, wantFilters)
			}
			// Exactly one writer slot: a Begin works, a second one times out.
			tx2, err := v.e.Begin(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			defer tx2.Abort()
			ctx, cancel := context.WithCancel(t.Context())
			cancel()
			_, err = v.e.Begin(ctx)
			wantErr(t, "second Begin", err, engine.ErrTxnInProgress)
		})
	}
	var nilTx *engine.Txn
	_, err := nilTx.AddProvider(engine.Provider{})
	wantErr(t, "nil txn", err, engine.ErrNoTxnInProgress)
	wantErr(t, "nil txn commit", nilTx.Commit(), engine.ErrNoTxnInProgress)
	nilTx.Abort()
}

// A second Begin waits for the open transaction: with a context that ends
// it gives up with ErrTxnInProgress; otherwise it starts after the Commit
// and sees its changes.
func TestTxnBeginWaits(t *testing.T) {
	e := engine.New(engine.Options{})
	tx, err := e.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond) // any expiry proves the point
	defer cancel()
	if _, err := e.Begin(ctx); !errors.Is(err, engine.ErrTxnInProgress) {
		t.Fatalf("Begin while open: %v", err)
	}
	got := make(chan engine.View, 1)
	go func() {
		tx2, err := e.Begin(context.Background())
		if err != nil {
			t.Error(err)
			got <- engine.View{}
			return
		}
		got <- tx2.View()
		tx2.Abort()
	}()
	if _, err := tx.AddProvider(engine.Provider{Key: "first"}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	view := <-got
	if _, err := view.ProviderByKey("first"); err != nil {
		t.Fatalf("the waiting txn began before the Commit: %v", err)
	}
}

// A failed call inside a transaction changes nothing and does not doom it.
func TestTxnFailedCallDoesNotDoom(t *testing.T) {
	v := newValFixture(t)
	var good engine.FilterID
	err := v.e.Update(func(tx *engine.Txn) error {
		bad := []error{}
		_, err := tx.AddFilter(engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionBlock}, Conditions: []engine.Condition{cond(engine.FieldIPRemotePort, engine.MatchEqual, str("x"))}})
		bad = append(bad, err)
		_, err = tx.AddSublayer(engine.Sublayer{Key: "sub"})
		bad = append(bad, err)
		bad = append(bad, tx.DeleteSublayer(engine.UniversalSublayer), tx.DeleteFilter(12345))
		for _, err := range bad {
			if err == nil {
				t.Error("expected an error")
			}
		}
		good, err = tx.AddFilter(engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionBlock}, Conditions: []engine.Condition{condPort80}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if n := v.e.View().FilterCount(0); n != 1 {
		t.Fatalf("%d filters, want 1", n)
	}
	if r := v.e.Classify(v4, arbTuple(), nil); r.Filter != good || r.Action != engine.ActionBlock {
		t.Fatalf("classify: %s", r)
	}
	if len(v.e.View().Sublayers(0)) != 2 {
		t.Fatalf("sublayers: %v", v.e.View().Sublayers(0))
	}
}

// Abort discards everything, though the transaction saw its own changes.
func TestTxnAbortDiscards(t *testing.T) {
	e := engine.New(engine.Options{})
	tx, err := e.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	p, _ := tx.AddProvider(engine.Provider{Key: "p"})
	s, _ := tx.AddSublayer(engine.Sublayer{Key: "s", Provider: p})
	c, _ := tx.AddCallout(engine.Callout{Key: "c", Layer: v4})
	f, err := tx.AddFilter(engine.Filter{Key: "f", Layer: v4, Sublayer: s, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: c}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.View().Filter(f); err != nil {
		t.Fatalf("txn does not see its own filter: %v", err)
	}
	if tx.Pending() != 1 {
		t.Fatalf("pending %d", tx.Pending())
	}
	tx.Abort()
	view := e.View()
	if _, err := view.Filter(f); !errors.Is(err, engine.ErrNotFound) {
		t.Fatalf("aborted filter present: %v", err)
	}
	if _, err := view.ProviderByKey("p"); !errors.Is(err, engine.ErrNotFound) {
		t.Fatalf("aborted provider present: %v", err)
	}
	if _, err := view.SublayerByKey("s"); !errors.Is(err, engine.ErrNotFound) {
		t.Fatalf("aborted sublayer present: %v", err)
	}
	if _, err := view.CalloutByKey("c"); !errors.Is(err, engine.ErrNotFound) {
		t.Fatalf("aborted callout present: %v", err)
	}
	if r := e.Classify(v4, arbTuple(), nil); r.Reason != engine.ReasonNoMatch {
		t.Fatalf("classify after abort: %s", r)
	}
	// The keys are free again.
	if err := e.Update(func(tx *engine.Txn) error { _, err := tx.AddProvider(engine.Provider{Key: "p"}); return err }); err != nil {
		t.Fatal(err)
	}
}

// Commit is atomic: classification sees all of a transaction's changes or
// none. A block filter alone would block; together with a hard permit in a
// heavier sublayer the tuple is permitted; a block is therefore a torn read.
func TestTxnCommitAtomic(t *testing.T) {
	e := engine.New(engine.Options{})
	var hi engine.SublayerID
	if err := e.Update(func(tx *engine.Txn) (err error) {
		hi, err = tx.AddSublayer(engine.Sublayer{Weight: 100})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// Before Commit the transaction's filters are invisible.
	tx, err := e.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.AddFilter(engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionBlock}}); err != nil {
		t.Fatal(err)
	}
	if r := e.Classify(v4, arbTuple(), nil); r.Reason != engine.ReasonNoMatch {
		t.Fatalf("uncommitted filter seen: %s", r)
	}
	tx.Abort()

	var stop atomic.Bool
	var torn atomic.Int64
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			vs := arbTuple()
			for !stop.Load() {
				if r := e.Classify(v4, vs, nil); r.Action != engine.ActionPermit {
					torn.Add(1)
				}
			}
		})
	}
	for i := range 100 {
		var block, permit engine.FilterID
		err := e.Update(func(tx *engine.Txn) (err error) {
			// The block goes in first, so a non-atomic publish would show it alone.
			if block, err = tx.AddFilter(engine.Filter{Layer: v4, Action: engine.Action{Type: engine.ActionBlock}}); err != nil {
				return err
			}
			permit, err = tx.AddFilter(engine.Filter{Layer: v4, Sublayer: hi, Action: engine.Action{Type: engine.ActionPermit}, Flags: engine.FilterClearActionRight})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if r := e.Classify(v4, arbTuple(), nil); r.Filter != permit {
			t.Fatalf("round %d: after commit %s", i, r)
		}
		err = e.Update(func(tx *engine.Txn) error {
			// The permit goes first, so a non-atomic publish would leave the block alone.
			if err := tx.DeleteFilter(permit); err != nil {
				return err
			}
			return tx.DeleteFilter(block)
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if n := torn.Load(); n != 0 {
		t.Fatalf("%d classifications saw half a transaction", n)
	}
}

// Random, mostly invalid filters: AddFilter never panics, every error wraps
// a sentinel, and whatever is accepted classifies without a panic.
func TestValidateNeverPanics(t *testing.T) {
	v := newValFixture(t)
	r := rand.New(rand.NewPCG(1, 2))
	vals := []engine.Value{
		empty, u8(6), u16(80), u32(1000), u64(1 << 40), str("/bin/sh"), engine.Bytes([]byte{1, 2}),
		addr("10.0.0.1"), addr("::1"), prefix("10.0.0.0/8"), prefix("::/0"), prefix("0.0.0.0/0"),
		rng(u16(1), u16(2)), rng(u16(9), u16(2)), rng(addr("10.0.0.1"), addr("::1")), rng(empty, u8(1)),
		rng(rng(u8(1), u8(2)), u8(3)), rng(str("a"), str("b")), rng(addr("::1"), addr("::2")), rng(u64(0), u64(1<<64-1)),
	}
	accepted := 0
	for i := range 3000 {
		// Mostly plausible, sometimes wild: both paths must hold.
		wild := func() bool { return r.IntN(8) == 0 }
		f := engine.Filter{Layer: []engine.LayerID{v4, v6}[r.IntN(2)], Action: engine.Action{Type: engine.ActionType(1 + r.IntN(2))}}
		if wild() {
			f.Layer = engine.LayerID(r.IntN(engine.NumLayers + 3))
		}
		if wild() {
			f.Sublayer = []engine.SublayerID{v.sub, 999}[r.IntN(2)]
		}
		if wild() {
			f.Weight = []engine.Weight{engine.WeightIndex(uint8(r.IntN(20))), engine.WeightExact(r.Uint64())}[r.IntN(2)]
		}
		if wild() {
			f.Action = engine.Action{Type: engine.ActionType(r.IntN(8)), Callout: []engine.CalloutID{0, v.callout, v.callout6, 999}[r.IntN(4)]}
		}
		if wild() {
			f.Flags = engine.FilterFlags(r.IntN(32))
		}
		l := engine.LayerByID(f.Layer)
		for range r.IntN(4) {
			c := engine.Condition{Match: engine.MatchType(r.IntN(13)), Value: vals[r.IntN(len(vals))]}
			if l != nil && !wild() {
				c.Field = l.Fields[r.IntN(len(l.Fields))]
			} else {
				c.Field = engine.FieldID(r.IntN(engine.NumFields + 3))
			}
			if wild() {
				c.Match = engine.MatchType(r.IntN(256))
			}
			f.Conditions = append(f.Conditions, c)
		}
		err := v.e.Update(func(tx *engine.Txn) error { _, err := tx.AddFilter(f); return err })
		if err != nil {
			if !isSentinel(err) {
				t.Fatalf("filter %d %+v: error %v wraps no sentinel", i, f, err)
			}
			continue
		}
		accepted++
	}
	if accepted == 0 {
		t.Fatal("no random filter was valid; the generator is broken")
	}
	for _, l := range engine.Layers() {
		for _, vs := range []*engine.Values{arbTuple(), {}} {
			v.e.Classify(l.ID, vs, &engine.Metadata{})
		}
		var vs engine.Values
		vs.SetTuple(17, netip.MustParseAddrPort("[::1]:53"), netip.MustParseAddrPort("[2001:db8::1]:8080"))
		v.e.Classify(l.ID, &vs, nil)
	}
	t.Logf("%d of 3000 random filters accepted", accepted)
}
