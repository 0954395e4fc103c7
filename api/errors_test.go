package api

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"fwp/engine"
	"fwp/mgmt"
	"fwp/proxy"
)

func TestErrorRoundTrip(t *testing.T) {
	for _, c := range []struct {
		err  error
		code codes.Code
		is   []error
	}{
		{fmt.Errorf("p.yaml:3: %w", engine.ErrNotFound), codes.NotFound, []error{engine.ErrNotFound}},
		{fmt.Errorf("%w after 1s: %w", mgmt.ErrTimeout, engine.ErrTxnInProgress), codes.DeadlineExceeded, []error{mgmt.ErrTimeout, engine.ErrTxnInProgress}},
		{fmt.Errorf("%w: uid 5", mgmt.ErrAccessDenied), codes.PermissionDenied, []error{mgmt.ErrAccessDenied}},
		{errors.Join(mgmt.ErrInvalidPolicy, engine.ErrInvalidLayer), codes.InvalidArgument, []error{mgmt.ErrInvalidPolicy, engine.ErrInvalidLayer}},
		{fmt.Errorf("%w: target pid 7, caller pid 8", proxy.ErrAccessDenied), codes.PermissionDenied, []error{proxy.ErrAccessDenied}},
		{fmt.Errorf("%w: 127.0.0.1:1 -> 127.0.0.1:2", proxy.ErrNotFound), codes.NotFound, []error{proxy.ErrNotFound}},
		{fmt.Errorf("%w: no kernel datapath", proxy.ErrNotSupported), codes.Unimplemented, []error{proxy.ErrNotSupported}},
	} {
		st := Status(c.err)
		if s, _ := status.FromError(st); s.Code() != c.code {
			t.Errorf("%v: code %v, want %v", c.err, s.Code(), c.code)
		}
		back := FromStatus(st)
		if back.Error() != c.err.Error() {
			t.Errorf("message %q, want %q", back, c.err)
		}
		for _, want := range c.is {
			if !errors.Is(back, want) {
				t.Errorf("%v: not errors.Is %v", back, want)
			}
		}
	}
	// Statuses without fwp details map by code.
	if err := FromStatus(status.Error(codes.ResourceExhausted, "grpc: received message larger than max")); !errors.Is(err, mgmt.ErrTooLarge) {
		t.Errorf("resource exhausted: %v", err)
	}
	if err := FromStatus(status.Error(codes.Unavailable, "connection refused")); !errors.Is(err, ErrUnavailable) {
		t.Errorf("unavailable: %v", err)
	}
	if Status(nil) != nil || FromStatus(nil) != nil {
		t.Error("nil")
	}
}

func TestConvertRoundTrip(t *testing.T) {
	objs := []mgmt.Object{
		{Provider: &mgmt.Provider{Key: "p", Name: "n", Description: "d", Lifetime: mgmt.LifetimePersistent, ID: 3, Session: 4}},
		{ProviderContext: &mgmt.ProviderContext{Key: "c", Provider: "p", Data: []byte{1, 2}, Lifetime: mgmt.LifetimeStatic, ID: 5}},
		{Sublayer: &mgmt.Sublayer{Key: "s", Provider: "p", Weight: 65535, Lifetime: mgmt.LifetimeDynamic}},
		{Callout: &mgmt.Callout{Key: "co", Layer: "ALE_AUTH_CONNECT_V4", Flags: []string{"conditional_on_flow"}, Lifetime: mgmt.LifetimeBootTime}},
		{Filter: &mgmt.Filter{Key: "f", Layer: "ALE_AUTH_CONNECT_V4", Sublayer: "s", Weight: "index:2", Action: "callout_terminating",
			Callout: "co", ProviderContext: "c", Flags: []string{"disabled"}, EffectiveWeight: 9, ID: 7, Session: 1,
			Conditions: []mgmt.Condition{{Field: "ip_remote_port", Match: "range", Value: "1-2"}}}},
	}
	for _, o := range objs {
		back, err := ToObject(FromObject(o))
		if err != nil || fmt.Sprintf("%+v", deref(back)) != fmt.Sprintf("%+v", deref(o)) {
			t.Errorf("round trip:\n%+v\n%+v %v", deref(o), deref(back), err)
		}
	}
	if _, err := ToObject(&Object{Kind: &Object_Sublayer{Sublayer: &Sublayer{Key: "s", Weight: 70000}}}); !errors.Is(err, engine.ErrInvalidWeight) {
		t.Errorf("weight: %v", err)
	}
	if _, err := ToObject(&Object{}); !errors.Is(err, engine.ErrInvalidArgument) {
		t.Errorf("empty: %v", err)
	}
}

func deref(o mgmt.Object) any {
	switch o.Kind() {
	case mgmt.KindProvider:
		return *o.Provider
	case mgmt.KindProviderContext:
		return *o.ProviderContext
	case mgmt.KindSublayer:
		return *o.Sublayer
	case mgmt.KindCallout:
		return *o.Callout
	}
	return *o.Filter
}

// Partial messages, as a Go caller can build them (the wire always gives
// non-nil messages), convert without a panic.
func TestConvertPartialMessages(t *testing.T) {
	for _, o := range []*Object{
		nil, {},
		{Kind: &Object_Provider{}}, {Kind: &Object_ProviderContext{}}, {Kind: &Object_Sublayer{}},
		{Kind: &Object_Callout{}}, {Kind: &Object_Filter{}},
		{Kind: &Object_Filter{Filter: &Filter{Conditions: []*Condition{nil, {}}}}},
	} {
		got, err := ToObject(o)
		if err != nil && !errors.Is(err, engine.ErrInvalidArgument) {
			t.Errorf("%v: untyped error %v", o, err)
		}
		if err == nil && got.Kind() == 0 {
			t.Errorf("%v: no object and no error", o)
		}
	}
	if ops, err := ToOps([]*Op{nil}); !errors.Is(err, engine.ErrInvalidArgument) {
		t.Errorf("nil op: %v %v", ops, err)
	}
	if ops, err := ToOps([]*Op{{Op: &Op_Add{}}, {Op: &Op_Delete{}}}); !errors.Is(err, engine.ErrInvalidArgument) {
		t.Errorf("empty add: %v %v", ops, err)
	}
	if _, err := ToRef(nil); !errors.Is(err, engine.ErrInvalidArgument) {
		t.Errorf("nil ref: %v", err)
	}
	_ = ToSession(nil)
	_ = ToChange(nil)
}
