package engine_test

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"fwp/engine"
)

// A pend whose callout went away under a fail-closed filter is blocked at
// once by FailPendClosed, even when the filter went too (a dynamic
// session that ended with the callout's program): a completion would be
// reauthorized, and the reauthorization, finding no filter, permits.
func TestFailPendClosed(t *testing.T) {
	l := engine.LayerALEAuthConnectV4
	for _, fail := range []bool{true, false} {
		e := engine.New(engine.Options{})
		var fid engine.FilterID
		err := e.Update(func(tx *engine.Txn) error {
			cid, err := tx.AddCallout(engine.Callout{Key: "co", Layer: l})
			if err != nil {
				return err
			}
			fid, err = tx.AddFilter(engine.Filter{Key: "f", Layer: l, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: cid}})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		e.RegisterCallout("co", engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			if _, err := req.PendOperation(); err != nil {
				t.Error(err)
			}
			out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
		}})
		var vs engine.Values
		vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.1.1:80"))
		meta := &engine.Metadata{}
		res := e.Classify(l, &vs, meta)
		if res.Pend == nil {
			t.Fatalf("not pended: %+v", res)
		}
		// The program dies: its callout and its session's filter go.
		e.UnregisterCallout("co")
		if err := e.Update(func(tx *engine.Txn) error { return tx.DeleteFilter(fid) }); err != nil {
			t.Fatal(err)
		}
		if fail {
			if err := e.FailPendClosed(res.Pend); err != nil {
				t.Fatal(err)
			}
		} else if err := e.CompleteOperation(res.Pend, nil); err != nil {
			t.Fatal(err)
		}
		got, err := e.FinishPended(context.Background(), res, &vs, meta)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case fail && (got.Action != engine.ActionBlock || got.Reason != engine.ReasonCalloutUnregisteredBlock || got.Filter != fid):
			t.Fatalf("FailPendClosed: %+v, want blocked by filter %d as callout_unregistered_block", got, fid)
		case !fail && got.Action != engine.ActionPermit:
			t.Fatalf("completed with the filter gone: %+v (the reauthorization finds nothing to block)", got)
		}
		if o := e.Outstanding(); o.Pends != 0 {
			t.Fatalf("outstanding %+v", o)
		}
		if err := e.FailPendClosed(res.Pend); !errors.Is(err, engine.ErrPendResolved) {
			t.Fatalf("again: %v", err)
		}
	}
}
