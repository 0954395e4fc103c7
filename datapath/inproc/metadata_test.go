package inproc_test

import (
	"context"
	"net/netip"
	"sync"
	"testing"

	"fwp/datapath/inproc"
	"fwp/engine"
)

// seen is what an inspection callout recorded at one layer.
type seen struct {
	layer engine.LayerID
	vals  engine.Values
	meta  engine.Metadata
}

// Flags and direction are what the datapath knows: a flow redirected from
// a remote address to a local proxy is loopback at AUTH_CONNECT; a flow
// has a direction (outbound dialed, inbound accepted), a listening or
// unconnected UDP socket's own classifications have none.
func TestMetadataLoopbackAndDirection(t *testing.T) {
	original := netip.MustParseAddrPort("192.0.2.1:80") // TEST-NET-1: never dialed, the redirect goes first
	var mu sync.Mutex
	var got []seen
	record := engine.InlineInspection(func(req *engine.ClassifyRequest) {
		mu.Lock()
		got = append(got, seen{req.Layer, *req.Values, *req.Meta})
		mu.Unlock()
	})
	layers := []engine.LayerID{engine.LayerALEAuthConnectV4, engine.LayerALEResourceAssignmentV4,
		engine.LayerALEAuthRecvAcceptV4, engine.LayerALEAuthListenV4}
	cs := []callout{{key: "r", layer: engine.LayerALEConnectRedirectV4, sublayer: 1, conds: []engine.Condition{port(original.Port())}}}
	for i, l := range layers {
		cs = append(cs, callout{key: "obs" + string(rune('a'+i)), layer: l, sublayer: 2, action: engine.ActionCalloutInspection, reg: record})
	}
	e, _ := newEngine(t, engine.Options{}, cs...)
	dp := inproc.New(e, inproc.Options{})
	lc := &inproc.ListenConfig{Datapath: dp}
	pxLn := listen(t, lc)
	defer pxLn.Close()
	pc, err := lc.ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	cr := &engine.ConnectRedirect{Handle: e.RedirectHandleCreate("r"), Target: redirectTo(apOf(pxLn.Addr()), dp.Identity().PID)}
	if err := e.RegisterCallout("r", cr.Registration()); err != nil {
		t.Fatal(err)
	}
	c, ac := dialAccept(t, dp, pxLn, original.String())
	c.Close()
	ac.Close()

	pxLn.Close()
	pc.Close()
	e.RedirectHandleDestroy(cr.Handle)
	noLeaks(t, e)
	mu.Lock()
	defer mu.Unlock()
	count := map[engine.LayerID]int{}
	for _, s := range got {
		count[s.layer]++
		flags := uint32(s.vals.Uint(engine.FieldFlags))
		hasDir := s.meta.Has(engine.MetaPacketDirection)
		switch s.layer {
		case engine.LayerALEAuthConnectV4:
			if flags&engine.FlagIsLoopback == 0 || flags&engine.FlagIsConnectionRedirected == 0 {
				t.Errorf("auth connect of a flow redirected to a local proxy: flags %#x", flags)
			}
			if !hasDir || s.meta.Direction != engine.DirectionOutbound || s.vals.Uint(engine.FieldDirection) != uint64(engine.DirectionOutbound) {
				t.Errorf("auth connect direction: present %v, %v", hasDir, s.meta.Direction)
			}
		case engine.LayerALEAuthRecvAcceptV4:
			if flags&engine.FlagIsLoopback == 0 {
				t.Errorf("recv accept flags %#x", flags)
			}
			if !hasDir || s.meta.Direction != engine.DirectionInbound || s.vals.Uint(engine.FieldDirection) != uint64(engine.DirectionInbound) {
				t.Errorf("recv accept direction: present %v, %v", hasDir, s.meta.Direction)
			}
		case engine.LayerALEResourceAssignmentV4, engine.LayerALEAuthListenV4:
			if hasDir || s.meta.Has(engine.MetaFlowHandle) {
				t.Errorf("%s: a socket without a flow got direction %v / flow %v", s.layer, s.meta.Direction, s.meta.FlowHandle)
			}
		}
	}
	want := map[engine.LayerID]int{engine.LayerALEAuthConnectV4: 1, engine.LayerALEAuthRecvAcceptV4: 1,
		engine.LayerALEResourceAssignmentV4: 2, engine.LayerALEAuthListenV4: 1}
	for l, n := range want {
		if count[l] != n {
			t.Errorf("%s classified %d times, want %d", l, count[l], n)
		}
	}
}
