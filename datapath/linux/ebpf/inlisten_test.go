//go:build linux

package ebpf

import (
	"errors"
	"strings"
	"testing"

	"fwp/engine"
)

// TestCompileInboundCallouts: a Go callout at AUTH_RECV_ACCEPT matching
// TCP alone or UDP alone is taken (the callout path holds the SYN, or the
// flow's first datagram); one matching any protocol, or one at
// AUTH_LISTEN, is refused naming the filter.
func TestCompileInboundCallouts(t *testing.T) {
	proto := func(p uint8) []engine.Condition {
		return []engine.Condition{{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(p)}}
	}
	for _, c := range []struct {
		name  string
		layer engine.LayerID
		conds []engine.Condition
		ok    bool
		say   string
	}{
		{"tcp v4", engine.LayerALEAuthRecvAcceptV4, proto(6), true, ""},
		{"tcp v6", engine.LayerALEAuthRecvAcceptV6, proto(6), true, ""},
		{"udp v4", engine.LayerALEAuthRecvAcceptV4, proto(17), true, ""},
		{"udp v6", engine.LayerALEAuthRecvAcceptV6, proto(17), true, ""},
		{"any protocol", engine.LayerALEAuthRecvAcceptV4, nil, false, "== 6"},
		{"listen", engine.LayerALEAuthListenV4, proto(6), false, "no packet to hold"},
	} {
		e := buildEngine(t, func(tx *engine.Txn) error {
			co, err := tx.AddCallout(engine.Callout{Key: "in-callout", Layer: c.layer})
			if err != nil {
				return err
			}
			_, err = tx.AddFilter(engine.Filter{Key: "in-filter", Layer: c.layer, Conditions: c.conds,
				Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co}})
			return err
		})
		p, err := Compile(e.View())
		if c.ok {
			// Inbound UDP callouts need the input chain's UDP rules,
			// not the outbound ones.
			udp := strings.HasPrefix(c.name, "udp")
			if err != nil || !p.InboundCallouts() || !p.Callouts() || p.UDPCallouts() || p.InboundUDPCallouts() != udp {
				t.Errorf("%s: %v (inbound callouts %v)", c.name, err, p != nil && p.InboundCallouts())
			}
			continue
		}
		if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "in-filter") || !strings.Contains(err.Error(), c.say) {
			t.Errorf("%s: %v, want ErrNotSupported naming the filter and saying %q", c.name, err, c.say)
		}
	}
}
