package metrics

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"fwp/engine"
)

func TestMetrics(t *testing.T) {
	eng := engine.New(engine.Options{})
	m := New(eng)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.Follow(ctx)
	err := eng.Update(func(tx *engine.Txn) error {
		_, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionBlock}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	m.ObserveCommit(3 * time.Millisecond)
	// Wait until Follow's subscription is in place, then classify.
	vs := &engine.Values{}
	vs.SetTuple(6, netip.AddrPort{}, netip.MustParseAddrPort("127.0.0.1:1"))
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(m.classify.WithLabelValues("ALE_AUTH_CONNECT_V4", "block")) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("classification not counted")
		}
		eng.Classify(engine.LayerALEAuthConnectV4, vs, nil)
		time.Sleep(5 * time.Millisecond)
	}
	want := `
# HELP fwp_filters Filters per layer.
# TYPE fwp_filters gauge
fwp_filters{layer="ALE_AUTH_CONNECT_V4"} 1
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want+filtersRest()), "fwp_filters"); err != nil {
		t.Fatal(err)
	}
	if n, err := testutil.GatherAndCount(m.Registry(), "fwp_pends_outstanding", "fwp_commit_duration_seconds"); err != nil || n != 2 {
		t.Fatalf("gauges: %d %v", n, err)
	}
}

// filtersRest lists the other layers' zero filter counts.
func filtersRest() string {
	var b strings.Builder
	for _, l := range engine.Layers() {
		if l.ID != engine.LayerALEAuthConnectV4 {
			b.WriteString(`fwp_filters{layer="` + l.Name + `"} 0` + "\n")
		}
	}
	return b.String()
}
