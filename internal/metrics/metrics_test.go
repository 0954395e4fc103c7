package metrics

import (
	"errors"
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
	err := eng.Update(func(tx *engine.Txn) error {
		_, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionBlock}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	m.ObserveCommit(3 * time.Millisecond)
	vs := &engine.Values{}
	vs.SetTuple(6, netip.AddrPort{}, netip.MustParseAddrPort("127.0.0.1:1"))
	for range 3 {
		eng.Classify(engine.LayerALEAuthConnectV4, vs, nil)
	}
	eng.Classify(engine.LayerALEAuthConnectV6, &engine.Values{}, nil)
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(`
# HELP fwp_classifications_total Classifications by layer and outcome (permit, block, veto, pend): the engine's and the kernel datapath's hooks'.
# TYPE fwp_classifications_total counter
`+classificationsWant()), "fwp_classifications_total"); err != nil {
		t.Fatal(err)
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

// classificationsWant: three blocks on AUTH_CONNECT_V4, one permit on
// AUTH_CONNECT_V6, zero elsewhere.
func classificationsWant() string {
	var b strings.Builder
	for _, l := range engine.Layers() {
		for _, a := range []string{"block", "pend", "permit", "veto"} {
			n := "0"
			if l.ID == engine.LayerALEAuthConnectV4 && a == "block" {
				n = "3"
			}
			if l.ID == engine.LayerALEAuthConnectV6 && a == "permit" {
				n = "1"
			}
			b.WriteString(`fwp_classifications_total{action="` + a + `",layer="` + l.Name + `"} ` + n + "\n")
		}
	}
	return b.String()
}

// A datapath's own counts add to the engine's, per layer and outcome; a
// source that fails (a closed datapath) is left out.
func TestAddClassifyCounts(t *testing.T) {
	eng := engine.New(engine.Options{})
	m := New(eng)
	eng.Classify(engine.LayerALEAuthConnectV4, &engine.Values{}, nil) // one engine permit
	m.AddClassifyCounts(func() ([]engine.ClassifyCount, error) {
		return []engine.ClassifyCount{{Layer: engine.LayerALEAuthConnectV4, Permit: 5, Block: 2}}, nil
	})
	m.AddClassifyCounts(func() ([]engine.ClassifyCount, error) { return nil, errors.New("closed") })
	fams, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range fams {
		if f.GetName() != "fwp_classifications_total" {
			continue
		}
		for _, mt := range f.GetMetric() {
			l := map[string]string{}
			for _, lp := range mt.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["layer"] == "ALE_AUTH_CONNECT_V4" {
				got[l["action"]] = mt.GetCounter().GetValue()
			}
		}
	}
	if got["permit"] != 6 || got["block"] != 2 || got["veto"] != 0 {
		t.Fatalf("ALE_AUTH_CONNECT_V4 counts %v, want permit 6, block 2", got)
	}
}
