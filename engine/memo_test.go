package engine

import (
	"context"
	"fmt"
	"runtime/debug"
	"slices"
	"sync/atomic"
	"testing"
	"time"
)

// memoLayer builds n callouts on CONNECT_REDIRECT, each in its own
// sublayer, called in index order: inspection callouts that count their
// calls, except those in pendAt, which pend the classify the first time
// they are called (and complete it with permit from another goroutine).
func memoLayer(t *testing.T, n int, pendAt ...int) (*Engine, []atomic.Int32, map[string]rtIDs) {
	t.Helper()
	calls := make([]atomic.Int32, n)
	specs := make([]rtCallout, n)
	for i := range n {
		reg := CalloutRegistration{Classify: func(req *ClassifyRequest, out *ClassifyOut) {
			if calls[i].Add(1) > 1 {
				return // called again on resume: the test fails on the count
			}
			for _, at := range pendAt {
				if at == i {
					pendThenPermit(t, req, out)
					return
				}
			}
			out.Action = ActionContinue
		}}
		specs[i] = rtCallout{key: fmt.Sprint("c", i), layer: redirLay, sublayer: uint16(1000 - i), action: ActionCalloutInspection, reg: reg}
		for _, at := range pendAt {
			if at == i {
				specs[i].action = ActionCalloutUnknown
			}
		}
	}
	e, ids := rtEngine(t, Options{}, specs...)
	return e, calls, ids
}

func pendThenPermit(t *testing.T, req *ClassifyRequest, out *ClassifyOut) {
	e := req.Engine()
	h, err := req.AcquireClassifyHandle()
	if err != nil {
		t.Error(err)
		return
	}
	if _, err := e.PendClassify(h, out); err != nil {
		t.Error(err)
		e.ReleaseClassifyHandle(h)
		return
	}
	go func() {
		if err := e.CompleteClassify(h, ClassifyOut{Action: ActionPermit, Rights: RightActionWrite}); err != nil {
			t.Error(err)
		}
		e.ReleaseClassifyHandle(h)
	}()
}

// A classify pended after more callouts than the memo holds in place
// resumes without calling any of them again, also when a callout after the
// resume pends again.
func TestPendClassifyMemoManyCallouts(t *testing.T) {
	const n = 3*memoInline + 2
	for _, pendAt := range [][]int{{n - 1}, {memoInline + 3, n - 1}, {2, memoInline, n - 1}} {
		t.Run(fmt.Sprint(pendAt), func(t *testing.T) {
			e, calls, ids := memoLayer(t, n, pendAt...)
			res, err := e.ClassifyWait(context.Background(), redirLay, tcpValues(client, server), &Metadata{}, nil)
			if err != nil || !res.Permitted() || res.Filter != ids[fmt.Sprint("c", n-1)].filter {
				t.Fatalf("classify: %v, %v; want the last pending callout's permit", res, err)
			}
			for i := range calls {
				if c := calls[i].Load(); c != 1 {
					t.Errorf("callout %d called %d times, want 1", i, c)
				}
			}
			waitNoPends(t, e)
		})
	}
}

// waitNoPends waits for the completing goroutines to release their
// handles.
func waitNoPends(t *testing.T, e *Engine) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); e.Outstanding() != (Outstanding{}); {
		if time.Now().After(deadline) {
			t.Fatalf("engine still holds %+v", e.Outstanding())
		}
		time.Sleep(time.Millisecond)
	}
}

// A classify through more callouts than the memo holds in place, at a
// layer where it could pend, allocates no more per callout than one
// through a few (the memo's overflow buffer stays with the pooled state;
// only a pend copies it).
func TestClassifyManyCalloutsAllocs(t *testing.T) {
	if bi, ok := debug.ReadBuildInfo(); ok && slices.Contains(bi.Settings, debug.BuildSetting{Key: "-race", Value: "true"}) {
		t.Skip("the race detector makes sync.Pool drop states at random")
	}
	perCallout := func(n int) float64 {
		e, _, _ := memoLayer(t, n)
		vs, meta := tcpValues(client, server), &Metadata{}
		e.Classify(redirLay, vs, meta)
		return testing.AllocsPerRun(50, func() { e.Classify(redirLay, vs, meta) }) / float64(n)
	}
	few, many := perCallout(memoInline/2), perCallout(3*memoInline)
	if many > few {
		t.Fatalf("allocations per callout call: %.2f through %d callouts, %.2f through %d", many, 3*memoInline, few, memoInline/2)
	}
}
