package engine

import (
	"context"
	"testing"
)

// A classification pended inline is finished by FinishPended from another
// goroutine: the completed operation is reauthorized and the callout's
// kept decision stands; a result without a pend comes back unchanged.
func TestFinishPended(t *testing.T) {
	pends := make(chan *Pend, 1)
	reg := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		if uint32(req.Values.Uint(FieldFlags))&FlagIsReauthorize != 0 {
			out.Action = ActionBlock // the decision the callout kept
			return
		}
		p, err := req.PendOperation()
		if err != nil {
			t.Error(err)
			return
		}
		out.Action, out.Flags = ActionBlock, OutAbsorb
		pends <- p
	}}
	e, _ := rtEngine(t, Options{}, rtCallout{key: "later", layer: LayerALEAuthConnectV4, sublayer: 1, action: ActionCalloutTerminating, reg: reg})
	vs, meta := tcpValues(client, server), &Metadata{}
	res := e.Classify(LayerALEAuthConnectV4, vs, meta)
	if res.Pend == nil {
		t.Fatalf("not pended: %v", res)
	}
	go func() {
		if err := e.CompleteOperation(<-pends, nil); err != nil {
			t.Error(err)
		}
	}()
	done := make(chan Result)
	go func() {
		r, err := e.FinishPended(context.Background(), res, vs, meta)
		if err != nil {
			t.Error(err)
		}
		done <- r
	}()
	r := <-done
	if r.Permitted() || r.Pend != nil || r.Reason != ReasonCalloutBlock {
		t.Fatalf("finished as %v (%v), want the callout's block", r, r.Reason)
	}
	plain := Result{ClassifyOut: ClassifyOut{Action: ActionPermit}}
	if r, err := e.FinishPended(context.Background(), plain, vs, meta); err != nil || r.Action != ActionPermit {
		t.Fatalf("%v %v", r, err)
	}
	noLeaks(t, e)
}
