package ebpf

import (
	"errors"
	"strings"
	"testing"

	"fwp/engine"
)

// A filter calling a Go callout compiles to a hand-over to user space at
// CONNECT_REDIRECT and AUTH_CONNECT when it matches TCP alone or UDP
// alone; anywhere else, or for other protocols, it is refused naming the
// filter.
func TestCompileGoCallout(t *testing.T) {
	tcp := engine.Condition{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(6)}
	udp := engine.Condition{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)}
	for _, c := range []struct {
		name   string
		layer  engine.LayerID
		act    engine.ActionType
		conds  []engine.Condition
		flags  engine.FilterFlags
		ok     bool
		reason string
	}{
		{"terminating, tcp", engine.LayerALEAuthConnectV4, engine.ActionCalloutTerminating, []engine.Condition{tcp}, 0, true, ""},
		{"unknown, tcp, v6, fail open", engine.LayerALEAuthConnectV6, engine.ActionCalloutUnknown, []engine.Condition{tcp}, engine.FilterPermitIfCalloutUnregistered, true, ""},
		{"inspection at connect redirect", engine.LayerALEConnectRedirectV4, engine.ActionCalloutInspection, []engine.Condition{tcp}, 0, true, ""},
		{"terminating, udp", engine.LayerALEAuthConnectV4, engine.ActionCalloutTerminating, []engine.Condition{udp}, 0, true, ""},
		{"no protocol condition", engine.LayerALEAuthConnectV4, engine.ActionCalloutTerminating, nil, 0, false, "one protocol per filter"},
		{"tcp or udp", engine.LayerALEAuthConnectV4, engine.ActionCalloutTerminating, []engine.Condition{tcp, udp}, 0, false, "one protocol per filter"},
		{"bind layer", engine.LayerALEResourceAssignmentV4, engine.ActionCalloutTerminating, []engine.Condition{tcp}, 0, false, "no packet to hold"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := engine.New(engine.Options{})
			var fid engine.FilterID
			err := e.Update(func(tx *engine.Txn) error {
				co, err := tx.AddCallout(engine.Callout{Key: "my.callout", Layer: c.layer})
				if err != nil {
					return err
				}
				fid, err = tx.AddFilter(engine.Filter{Layer: c.layer, Conditions: c.conds, Flags: c.flags, Action: engine.Action{Type: c.act, Callout: co}})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			p, err := Compile(e.View())
			if !c.ok {
				var oe *engine.ObjectError
				if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), c.reason) || !errors.As(err, &oe) || oe.ID != uint64(fid) {
					t.Fatalf("Compile: %v; want ErrNotSupported naming %s and saying %q", err, fid, c.reason)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			slot, _ := slotOf(c.layer)
			lp := p.layers[slot]
			if !p.Callouts() || lp == nil || !lp.callouts || len(lp.filters) != 1 {
				t.Fatalf("compiled: callouts %v, layer %+v", p.Callouts(), lp)
			}
			if wantUDP := len(c.conds) == 1 && c.conds[0] == udp; p.UDPCallouts() != wantUDP {
				t.Fatalf("UDPCallouts %v, want %v", p.UDPCallouts(), wantUDP)
			}
			if wantRedir := c.layer.Kind() == engine.KindConnectRedirect; p.CalloutRedirects() != wantRedir {
				t.Fatalf("CalloutRedirects %v, want %v", p.CalloutRedirects(), wantRedir)
			}
			m := lp.filters[0]
			wantFlags := uint16(0)
			if c.flags&engine.FilterPermitIfCalloutUnregistered != 0 {
				wantFlags = fmFailOpen
			}
			if m.Action != actCallout || m.Flags != wantFlags || m.Id != uint64(fid) {
				t.Fatalf("filter meta %+v: want the callout action, flags %d", m, wantFlags)
			}
		})
	}
}
