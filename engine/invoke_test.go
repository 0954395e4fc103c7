package engine_test

import (
	"errors"
	"net/netip"
	"testing"

	"fwp/engine"
)

// Invoke runs a callout for a classification another engine makes: what
// the callout does with this engine's API comes back in Invoked.
func TestInvoke(t *testing.T) {
	var hooked []string
	e := engine.New(engine.Options{FlowContextHook: func(flow engine.FlowHandle, l engine.LayerID, c engine.CalloutID, ctx any, added bool) {
		hooked = append(hooked, ctx.(string))
		_ = added
	}})
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.1.1:80"))
	f := engine.Filter{ID: 77, Key: "far", Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: 9}}

	// A plain answer.
	reg := engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		if req.Filter.ID != 77 || string(req.ProviderContext) != "pc" || !out.CanWrite() {
			t.Errorf("request %+v out %+v", req.Filter, out)
		}
		out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
	}}
	got := e.Invoke(&reg, &engine.Invocation{Layer: engine.LayerALEAuthConnectV4, Values: vs, Filter: f, ProviderContext: []byte("pc"), Rights: engine.RightActionWrite})
	if got.Out != (engine.ClassifyOut{Action: engine.ActionBlock, Rights: engine.RightActionWrite, Flags: engine.OutAbsorb}) || got.Pend != nil {
		t.Fatalf("%+v", got)
	}

	// A pended operation, completed later; a reauthorization cannot pend.
	var pend *engine.Pend
	var pendErr error
	reg.Classify = func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		pend, pendErr = req.PendOperation()
		out.Action = engine.ActionBlock
	}
	got = e.Invoke(&reg, &engine.Invocation{Layer: engine.LayerALEAuthConnectV4, Values: vs, Filter: f, Rights: engine.RightActionWrite})
	if pendErr != nil || got.Pend != pend || got.Pend.IsClassify() || e.Outstanding().Pends != 1 {
		t.Fatalf("%+v %v", got, pendErr)
	}
	if err := e.CompleteOperation(pend, "held"); err != nil || pend.Outcome() != engine.PendCompleted || pend.Reinjected() != "held" {
		t.Fatal(err)
	}
	re := vs
	re.Set(engine.FieldFlags, engine.Uint32(engine.FlagIsReauthorize))
	got = e.Invoke(&reg, &engine.Invocation{Layer: engine.LayerALEAuthConnectV4, Values: re, Filter: f, Rights: engine.RightActionWrite})
	if !errors.Is(pendErr, engine.ErrCannotPend) || got.Pend != nil {
		t.Fatalf("reauthorization pended: %v", pendErr)
	}

	// A redirect applied inline, on the version handed in.
	redir := engine.LayerALEConnectRedirectV4
	cur := &engine.ConnectRequest{LocalAddressAndPort: netip.MustParseAddrPort("10.0.0.1:40000"), RemoteAddressAndPort: netip.MustParseAddrPort("10.1.1.1:80"),
		ModifierFilterID: 5, LocalRedirectHandle: 3}
	cr := &engine.ConnectRedirect{Handle: 8, Target: func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
		return engine.RedirectTarget{To: netip.MustParseAddrPort("127.0.0.1:3128"), TargetPID: 1, Context: []byte("x")}, true
	}}
	r2 := cr.Registration()
	got = e.Invoke(&r2, &engine.Invocation{Layer: redir, Values: vs, Filter: f, Rights: engine.RightActionWrite, Connect: cur})
	// The callout saw another's local redirect in the previous version and deferred, asking to be reauthorized.
	if got.Connect == nil || got.Connect.RemoteAddressAndPort != cur.RemoteAddressAndPort || got.ApplyFlags != engine.ApplyReauthorizeIfModifiedByOthers {
		t.Fatalf("deferral: %+v %+v", got, got.Connect)
	}
	cur.LocalRedirectHandle = 0
	got = e.Invoke(&r2, &engine.Invocation{Layer: redir, Values: vs, Filter: f, Rights: engine.RightActionWrite, Connect: cur})
	if got.Out.Action != engine.ActionPermit || got.Connect == nil || got.Connect.RemoteAddressAndPort != netip.MustParseAddrPort("127.0.0.1:3128") ||
		got.Connect.LocalRedirectHandle != 8 || got.Connect.PreviousVersion != cur || got.ApplyFlags != 0 {
		t.Fatalf("redirect: %+v %+v", got, got.Connect)
	}

	// Pended and applied from another goroutine: Completed reports both.
	cr.Async = true
	r3 := cr.Registration()
	got = e.Invoke(&r3, &engine.Invocation{Layer: redir, Values: vs, Filter: f, Rights: engine.RightActionWrite, Connect: cur})
	if got.Pend == nil || !got.Pend.IsClassify() {
		t.Fatalf("async: %+v", got)
	}
	<-got.Pend.Done()
	out, c, b, fl := got.Pend.Completed()
	if out.Action != engine.ActionPermit || c == nil || c.RemoteAddressAndPort != netip.MustParseAddrPort("127.0.0.1:3128") || b != nil || fl != 0 {
		t.Fatalf("completed: %+v %+v", out, c)
	}

	// Flow contexts go through the hook, both ways.
	if err := e.FlowAssociateContext(4, engine.LayerALEAuthConnectV4, 9, "ctx"); err != nil {
		t.Fatal(err)
	}
	e.FlowDeleted(4)
	if len(hooked) != 2 {
		t.Fatalf("hook saw %v", hooked)
	}
	if o := e.Outstanding(); o != (engine.Outstanding{}) {
		t.Fatalf("outstanding %+v", o)
	}
}
