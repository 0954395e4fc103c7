//go:build linux

package ebpf

import (
	"context"
	"fmt"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
)

// TestFlowReleaseOnlyWithFlowEvents: with reauthorization alone the
// sock_release program is not attached (it only reports ends); from
// EnableFlowEvents it is, on a cgroup hooked before as well as on one
// hooked after, and each reports its outbound flows' ends.
func TestFlowReleaseOnlyWithFlowEvents(t *testing.T) {
	testutil.RequireRoot(t)
	d, err := Load(Options{}) // its own: the shared one's flow events may be on
	if err != nil {
		testutil.Unavailable(t, err)
	}
	defer d.Close()
	before, after := testutil.NewCgroup(t), testutil.NewCgroup(t)
	if err := d.Attach(before.Path); err != nil {
		testutil.Unavailable(t, err)
	}
	if err := d.EnableReauthorization(); err != nil {
		testutil.Unavailable(t, err)
	}
	apply(t, d, engine.New(engine.Options{}))
	stats, err := EnableStats()
	if err != nil {
		t.Fatal(err)
	}
	defer stats.Close()
	churn := func(cg *testutil.Cgroup, n int) {
		h := testutil.StartHelper(t, cg, "holdconns")
		var ports map[string]int
		callJSON(t, h, "open 0", &ports)
		var ok int
		callJSON(t, h, fmt.Sprintf("churn %d 1", n), &ok)
		if ok != n {
			t.Fatalf("%d of %d connects", ok, n)
		}
	}
	r0, _ := d.reauth.objs.FwpFlowRelease.Stats()
	churn(before, 20)
	r1, _ := d.reauth.objs.FwpFlowRelease.Stats()
	if r1.RunCount != r0.RunCount {
		t.Errorf("sock_release ran %d times with flow events off: attached for nothing", r1.RunCount-r0.RunCount)
	}

	if err := d.EnableFlowEvents(); err != nil {
		testutil.Unavailable(t, err)
	}
	if err := d.Attach(after.Path); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	closed := make(chan uint64, 1024)
	done := make(chan error, 1)
	go func() {
		done <- d.ReadFlowEvents(ctx, func(ev FlowEvent) {
			if ev.Type == FlowClosed && !ev.Flow.Inbound {
				select {
				case closed <- ev.Flow.CgroupID:
				default:
				}
			}
		})
	}()
	defer func() { cancel(); <-done }()
	churn(before, 5)
	churn(after, 5)
	got := map[uint64]int{}
	for deadline := time.After(10 * time.Second); got[before.ID] < 5 || got[after.ID] < 5; {
		select {
		case id := <-closed:
			got[id]++
		case <-deadline:
			t.Fatalf("closure reports: %d from the cgroup hooked before EnableFlowEvents, %d from the one hooked after; want 5 each",
				got[before.ID], got[after.ID])
		}
	}
}
