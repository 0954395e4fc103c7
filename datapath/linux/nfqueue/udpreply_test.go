//go:build linux

package nfqueue

import (
	"strconv"
	"testing"
	"time"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
)

// TestInboundUDPCalloutReplies: an inbound UDP flow a Go callout permits
// at AUTH_RECV_ACCEPT (at once, after a pend, or by a fail-open filter's
// deadline) makes a flow whose replies pass the sendmsg hook under a
// policy that blocks outbound UDP (ebpf's udpreply.h: the ingress hook
// records the flow it lets in with the verdict's mark); a flow the
// callout blocks gets no reply.
func TestInboundUDPCalloutReplies(t *testing.T) {
	fx := newInUDPFixture(t, pendTimeout)
	if err := fx.eng.Update(func(tx *engine.Txn) error {
		udp := engine.Condition{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)}
		for _, l := range []engine.LayerID{engine.LayerALEAuthConnectV4, engine.LayerALEAuthConnectV6} {
			if _, err := tx.AddFilter(engine.Filter{Layer: l, Action: engine.Action{Type: engine.ActionBlock}, Conditions: []engine.Condition{udp}}); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	pol, err := ebpf.Compile(fx.eng.View())
	if err != nil {
		t.Fatal(err)
	}
	if err := fx.dp.Apply(pol); err != nil {
		t.Fatal(err)
	}
	s0, err := fx.dp.UDPReplyStats()
	if err != nil {
		t.Fatal(err)
	}
	addr := func(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }
	for _, c := range []struct {
		name, net, addr string
		n               int
	}{
		{"permit", "udp4", addr(udpInPermit), 5},
		{"pend then permit", "udp4", addr(udpInPend), 2},
		{"fail-open deadline", "udp4", addr(udpInFailOpen), 2},
		{"kernel permit", "udp4", addr(udpInKernel), 2},
		{"v6 permit", "udp6", "[::1]:" + strconv.Itoa(udpInPermit), 2},
	} {
		if got, _, err := fx.exchange(t, c.net, c.addr, 0, c.n, 5*time.Second); err != nil || got != c.n {
			t.Fatalf("%s under 'block outbound UDP': %d of %d echoes, %v; want every reply", c.name, got, c.n, err)
		}
	}
	if got, _, err := fx.exchange(t, "udp4", addr(udpInBlock), 0, 1, time.Second); !isTimeout(err) || got != 0 {
		t.Fatalf("block: %d echoes, %v; want a timeout", got, err)
	}
	s1, err := fx.dp.UDPReplyStats()
	if err != nil {
		t.Fatal(err)
	}
	if got := s1.Replies - s0.Replies; got != 13 {
		t.Fatalf("%d sends passed as replies, want the 13 echoes", got)
	}
	fx.clean(t)
}
