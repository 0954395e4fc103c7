package engine

import (
	"context"
	"errors"
	"sync"
	"testing"
)

// The probes of issue 12: departures from the seed documents found in an
// audit, each a test that failed before its fix.

// addPlain adds a plain filter in a sublayer of its own (weight sub).
func addPlain(t *testing.T, e *Engine, layer LayerID, sub uint16, act ActionType, flags FilterFlags) FilterID {
	t.Helper()
	var id FilterID
	err := e.Update(func(tx *Txn) error {
		sl, err := tx.AddSublayer(Sublayer{Weight: sub})
		if err != nil {
			return err
		}
		id, err = tx.AddFilter(Filter{Layer: layer, Sublayer: sl, Action: Action{Type: act}, Flags: flags})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// pendThenAnswer pends the first authorization of every flow and, on the
// reauthorization, answers act (seed 002's recipe with a fixed decision).
// It records what the reauthorization showed it.
type pendThenAnswer struct {
	act     ActionType
	pends   chan *Pend
	mu      sync.Mutex
	reauths int
	pendErr error // PendOperation during the reauthorization
	data    any   // layer data of the last reauthorization
}

func newPendThenAnswer(act ActionType) *pendThenAnswer {
	return &pendThenAnswer{act: act, pends: make(chan *Pend, 4)}
}

func (a *pendThenAnswer) reg() CalloutRegistration {
	return CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		if !out.CanWrite() {
			return
		}
		if uint32(req.Values.Uint(FieldFlags))&FlagIsReauthorize != 0 {
			_, err := req.PendOperation()
			a.mu.Lock()
			a.reauths++
			a.pendErr = err
			a.data = req.LayerData
			a.mu.Unlock()
			out.Action = a.act
			return
		}
		p, err := req.PendOperation()
		if err != nil {
			out.Action = ActionBlock
			return
		}
		a.pends <- p
		out.Action, out.Flags = ActionBlock, OutAbsorb
	}}
}

// Item 1: a pend at AUTH_RECV_ACCEPT is completed with the held data; the
// layer is then authorized again as a whole, so a lower sublayer's block
// still blocks, as it does when the callout answers inline.
func TestRecvAcceptPendReauthorizesLayer(t *testing.T) {
	for _, lowerBlock := range []bool{true, false} {
		a := newPendThenAnswer(ActionPermit)
		e, ids := rtEngine(t, Options{}, rtCallout{key: "acc", layer: LayerALEAuthRecvAcceptV4, sublayer: 20, reg: a.reg()})
		var blockID FilterID
		if lowerBlock {
			blockID = addPlain(t, e, LayerALEAuthRecvAcceptV4, 10, ActionBlock, 0)
		}
		held := &struct{ conn string }{"accepted"}
		go func() {
			if err := e.CompleteOperation(<-a.pends, held); err != nil {
				t.Error(err)
			}
		}()
		meta := &Metadata{Present: MetaFlowHandle, FlowHandle: e.NewFlowHandle()}
		res, err := e.ClassifyWait(context.Background(), LayerALEAuthRecvAcceptV4, tcpValues(server, client), meta, held)
		if err != nil {
			t.Fatal(err)
		}
		a.mu.Lock()
		reauths, pendErr, data := a.reauths, a.pendErr, a.data
		a.mu.Unlock()
		if reauths != 1 || !errors.Is(pendErr, ErrCannotPend) || data != held {
			t.Fatalf("lower block %v: %d reauthorizations, pend during it %v, layer data %v", lowerBlock, reauths, pendErr, data)
		}
		if lowerBlock {
			if res.Permitted() || res.Filter != blockID {
				t.Fatalf("a lower sublayer's block was bypassed by the pend: %v", res)
			}
		} else if !res.Permitted() || res.Filter != ids["acc"].filter {
			t.Fatalf("no lower block: %v", res)
		}
		noLeaks(t, e)
	}
}

// Item 2: REAUTHORIZE_IF_MODIFIED_BY_OTHERS is honoured when the other
// callout's modification is applied by a pended classify that resumes
// (seed 001, asynchronous recipe step 9), with the same bound on passes.
func TestReauthorizeIfModifiedByOthersAfterPendedClassify(t *testing.T) {
	for _, fight := range []bool{false, true} {
		var mu sync.Mutex
		var seen []FilterID
		var e *Engine
		var hFirst, hSecond RedirectHandle
		first := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
			h, _ := req.AcquireClassifyHandle()
			defer e.ReleaseClassifyHandle(h)
			w, _ := e.AcquireConnectRequest(h)
			mu.Lock()
			seen = append(seen, w.PreviousVersion.ModifierFilterID)
			mu.Unlock()
			if w.PreviousVersion.ModifierFilterID != 0 && !fight {
				return // someone else has changed it: leave it
			}
			w.RemoteAddressAndPort, w.LocalRedirectHandle = proxyA, hFirst
			if err := e.ApplyConnectRequest(h, w, ApplyReauthorizeIfModifiedByOthers); err != nil {
				t.Error(err)
			}
		}}
		second := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
			h, _ := req.AcquireClassifyHandle()
			if _, err := e.PendClassify(h, out); err != nil {
				t.Error(err)
				e.ReleaseClassifyHandle(h)
				return
			}
			go func() {
				defer e.ReleaseClassifyHandle(h)
				w, _ := e.AcquireConnectRequest(h)
				final := ClassifyOut{Action: ActionContinue, Rights: RightActionWrite}
				if w.RemoteAddressAndPort != proxyB {
					w.RemoteAddressAndPort, w.LocalRedirectHandle = proxyB, hSecond
					if err := e.ApplyConnectRequest(h, w, 0); err != nil {
						t.Error(err)
					}
					final.Action = ActionPermit
				}
				_ = e.CompleteClassify(h, final)
			}()
		}}
		var ids map[string]rtIDs
		e, ids = rtEngine(t, Options{},
			rtCallout{key: "first", layer: redirLay, sublayer: 20, reg: first},
			rtCallout{key: "second", layer: redirLay, sublayer: 10, reg: second})
		hFirst, hSecond = e.RedirectHandleCreate("first"), e.RedirectHandleCreate("second")
		res, err := e.ClassifyWait(context.Background(), redirLay, tcpValues(client, server), &Metadata{}, nil)
		if err != nil || res.Redirect.Remote() != proxyB {
			t.Fatalf("fight=%v: %v %v remote %v", fight, res, err, res.Redirect.Remote())
		}
		mu.Lock()
		got := append([]FilterID(nil), seen...)
		mu.Unlock()
		if !fight {
			if len(got) != 2 || got[0] != 0 || got[1] != ids["second"].filter {
				t.Fatalf("first callout saw modifiers %v; want [0 %v]", got, ids["second"].filter)
			}
		} else if len(got) != 1+maxReauthPasses {
			t.Fatalf("two callouts undoing each other: first called %d times, want %d", len(got), 1+maxReauthPasses)
		}
		noLeaks(t, e)
	}
}

// Item 3: without ACTION_WRITE on entry a callout may not pend (seed 003).
// The pend is refused with a typed error and counted; a hard permit above
// stands, where the pend's timeout used to block it.
func TestPendWithoutWriteRightRefused(t *testing.T) {
	type attempt struct {
		layer LayerID
		pend  func(req *ClassifyRequest, out *ClassifyOut) error
	}
	for _, at := range []attempt{
		{LayerALEAuthConnectV4, func(req *ClassifyRequest, out *ClassifyOut) error {
			_, err := req.PendOperation()
			if err == nil {
				out.Action, out.Flags = ActionBlock, OutAbsorb
			}
			return err
		}},
		{redirLay, func(req *ClassifyRequest, out *ClassifyOut) error {
			e := req.Engine()
			h, err := req.AcquireClassifyHandle()
			if err != nil {
				return err
			}
			defer e.ReleaseClassifyHandle(h)
			before := *out
			_, err = e.PendClassify(h, out)
			if err != nil && *out != before {
				t.Errorf("a refused PendClassify changed the output: %+v -> %+v", before, *out)
			}
			return err
		}},
	} {
		var pendErr error
		reg := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
			pendErr = at.pend(req, out)
		}}
		e, _ := rtEngine(t, Options{}, rtCallout{key: "late", layer: at.layer, sublayer: 10, reg: reg})
		permit := addPlain(t, e, at.layer, 20, ActionPermit, FilterClearActionRight)
		res := e.Classify(at.layer, tcpValues(client, server), &Metadata{})
		if res.Pend != nil {
			res.Pend.Cancel()
			t.Fatalf("%s: a callout without the write right pended", at.layer)
		}
		if !errors.Is(pendErr, ErrNoWriteRight) || !errors.Is(pendErr, ErrCannotPend) {
			t.Fatalf("%s: pend error %v", at.layer, pendErr)
		}
		if !res.Permitted() || !res.Hard() || res.Filter != permit {
			t.Fatalf("%s: the hard permit did not stand: %v", at.layer, res)
		}
		var refused uint64
		for _, c := range e.ClassifyCounts() {
			if c.Layer == at.layer {
				refused = c.PendRefused
			}
		}
		if refused != 1 {
			t.Fatalf("%s: %d refused pends counted", at.layer, refused)
		}
		noLeaks(t, e)
	}
}

// Item 4: a permit written without the right is not made: the filter
// passes and the next filter of the sublayer is evaluated, so a lower
// terminating callout can still veto the hard permit.
func TestPermitWithoutRightPasses(t *testing.T) {
	e := New(Options{})
	layer := LayerALEAuthConnectV4
	var sub SublayerID
	var rude, veto FilterID
	err := e.Update(func(tx *Txn) error {
		high, err := tx.AddSublayer(Sublayer{Weight: 20})
		if err != nil {
			return err
		}
		if _, err = tx.AddFilter(Filter{Layer: layer, Sublayer: high, Action: Action{Type: ActionPermit}, Flags: FilterClearActionRight}); err != nil {
			return err
		}
		if sub, err = tx.AddSublayer(Sublayer{Weight: 10}); err != nil {
			return err
		}
		c1, err := tx.AddCallout(Callout{Key: "rude", Layer: layer})
		if err != nil {
			return err
		}
		c2, err := tx.AddCallout(Callout{Key: "veto", Layer: layer})
		if err != nil {
			return err
		}
		if rude, err = tx.AddFilter(Filter{Layer: layer, Sublayer: sub, Weight: WeightExact(2), Action: Action{Type: ActionCalloutUnknown, Callout: c1}}); err != nil {
			return err
		}
		veto, err = tx.AddFilter(Filter{Layer: layer, Sublayer: sub, Weight: WeightExact(1), Action: Action{Type: ActionCalloutTerminating, Callout: c2}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	e.RegisterCallout("rude", CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		out.Action = ActionPermit // ignores that it has no right to
	}})
	e.RegisterCallout("veto", CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		out.Action = ActionBlock
	}})
	res := e.Classify(layer, tcpValues(client, server), nil)
	if res.Permitted() || !res.Veto || res.Filter != veto {
		t.Fatalf("a permit without the right ended its sublayer: %v (rude filter %v)", res, rude)
	}
}

// Item 5: apply takes only a redirect handle RedirectHandleCreate made and
// nobody destroyed (seed 001 step 5.4); destroying one refuses later
// applies and leaves records issued before it verifiable.
func TestRedirectHandleValidated(t *testing.T) {
	var handle RedirectHandle
	var applyErr error
	reg := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		e := req.Engine()
		h, err := req.AcquireClassifyHandle()
		if err != nil {
			t.Error(err)
			return
		}
		defer e.ReleaseClassifyHandle(h)
		w, _ := e.AcquireConnectRequest(h)
		w.RemoteAddressAndPort, w.LocalRedirectHandle = proxyA, handle
		if applyErr = e.ApplyConnectRequest(h, w, 0); applyErr == nil {
			out.Action = ActionPermit
		}
	}}
	e, _ := rtEngine(t, Options{}, rtCallout{key: "r", layer: redirLay, sublayer: 1, reg: reg})
	valid := e.RedirectHandleCreate("r")
	handle = valid
	res := e.Classify(redirLay, tcpValues(client, server), &Metadata{})
	if applyErr != nil || res.Redirect.Remote() != proxyA {
		t.Fatalf("a valid handle: %v %v", applyErr, res)
	}
	blob := e.MarshalRedirectRecords(res.Redirect.Records)
	if err := e.RedirectHandleDestroy(valid); err != nil {
		t.Fatal(err)
	}
	for _, h := range []RedirectHandle{0, valid + 1000, valid} {
		handle = h
		res := e.Classify(redirLay, tcpValues(client, server), &Metadata{})
		if !errors.Is(applyErr, ErrInvalidParameter) {
			t.Fatalf("handle %d: apply error %v", h, applyErr)
		}
		if res.Redirect != nil {
			t.Fatalf("handle %d: something was applied: %+v", h, res.Redirect)
		}
	}
	recs, err := e.UnmarshalRedirectRecords(blob)
	if err != nil || QueryConnectionRedirectState(recs, valid) != RedirectedBySelf {
		t.Fatalf("records issued before destroy: %v %v", recs.Records(), err)
	}
	if err := e.RedirectHandleDestroy(valid); !errors.Is(err, ErrNotFound) {
		t.Fatalf("destroy twice: %v", err)
	}
	noLeaks(t, e)
}

// Item 7: one callout applies with REAUTHORIZE_IF_MODIFIED_BY_OTHERS
// inline, another pends and applies from its own goroutine at once, while
// the classification finishes: run with -race.
func TestReauthFlagRaceWithPendedApply(t *testing.T) {
	var e *Engine
	var hB RedirectHandle
	first := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		h, _ := req.AcquireClassifyHandle()
		defer e.ReleaseClassifyHandle(h)
		w, _ := e.AcquireConnectRequest(h)
		if w.PreviousVersion.ModifierFilterID == 0 {
			_ = e.ApplyConnectRequest(h, w, ApplyReauthorizeIfModifiedByOthers)
		}
	}}
	second := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
		if uint32(req.Values.Uint(FieldFlags))&FlagIsReauthorize != 0 {
			return
		}
		h, _ := req.AcquireClassifyHandle()
		if _, err := e.PendClassify(h, out); err != nil {
			e.ReleaseClassifyHandle(h)
			return
		}
		go func() {
			defer e.ReleaseClassifyHandle(h)
			if w, err := e.AcquireConnectRequest(h); err == nil {
				w.RemoteAddressAndPort, w.LocalRedirectHandle = proxyB, hB
				_ = e.ApplyConnectRequest(h, w, 0)
			}
			_ = e.CompleteClassify(h, ClassifyOut{Action: ActionPermit, Rights: RightActionWrite})
		}()
	}}
	e, _ = rtEngine(t, Options{},
		rtCallout{key: "first", layer: redirLay, sublayer: 20, reg: first},
		rtCallout{key: "second", layer: redirLay, sublayer: 10, reg: second})
	hB = e.RedirectHandleCreate("B")
	for range 50 {
		res, err := e.ClassifyWait(context.Background(), redirLay, tcpValues(client, server), &Metadata{}, nil)
		if err != nil || res.Redirect.Remote() != proxyB {
			t.Fatalf("%v %v", res, err)
		}
	}
	noLeaks(t, e)
}
