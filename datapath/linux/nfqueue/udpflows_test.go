//go:build linux

package nfqueue

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
)

// TestUDPFlowContextsEnd: a Go callout on the kernel callout path permits
// each connected UDP socket's flow at its first datagram and associates a
// flow context with it (the flow handle is the socket's cookie); when the
// program closes the sockets, the kernel's closure reports end the
// contexts — flowDeleteFn once per flow, none left in the engine, no
// report lost. Before, a UDP flow had no closure report and its contexts
// stayed until the engine went.
func TestUDPFlowContextsEnd(t *testing.T) {
	const n, from = 1000, 41000
	var mu sync.Mutex
	assoc := map[engine.FlowHandle]int{}
	deleted := map[uint64]int{}
	var bad []string
	fx := customFixture(t, "udp", Options{UDP: true}, 5*time.Second, func(fx *fixture, tx *engine.Txn) error {
		p, err := tx.AddProvider(engine.Provider{Key: "udpctx"})
		if err != nil {
			return err
		}
		sl, err := tx.AddSublayer(engine.Sublayer{Key: "udpctx", Provider: p, Weight: 10})
		if err != nil {
			return err
		}
		co, err := tx.AddCallout(engine.Callout{Key: "test.udpctx", Provider: p, Layer: engine.LayerALEAuthConnectV4})
		if err != nil {
			return err
		}
		if err := fx.eng.RegisterCallout("test.udpctx", engine.CalloutRegistration{
			Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
				out.Action = engine.ActionPermit
				fh := req.Meta.FlowHandle
				err := req.Engine().FlowAssociateContext(fh, req.Layer, req.Filter.Action.Callout, uint64(fh))
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					bad = append(bad, err.Error())
					return
				}
				assoc[fh]++
			},
			FlowDelete: func(_ engine.LayerID, _ engine.CalloutID, ctx any) {
				mu.Lock()
				deleted[ctx.(uint64)]++
				mu.Unlock()
			},
		}); err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Sublayer: sl, Provider: p,
			Conditions: []engine.Condition{
				{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)},
				{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(portDNSOK)},
			},
			Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co}})
		return err
	})
	// As fwpd does for Go callouts on the kernel path: the flow events
	// run, and FlowLayers ends each closed flow's contexts.
	if err := fx.dp.EnableFlowEvents(); err != nil {
		t.Fatal(err)
	}
	lost0, err := fx.dp.FlowEventsLost()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	fl := &ebpf.FlowLayers{Engine: fx.eng}
	closures := 0
	go func() {
		done <- fx.dp.ReadFlowEvents(ctx, func(ev ebpf.FlowEvent) {
			fl.Handle(ev) // counted after: its flowDeleteFn ran
			if ev.Type == ebpf.FlowClosed && ev.Flow.Protocol == 17 && ev.Flow.Remote.Port() == portDNSOK {
				mu.Lock()
				closures++
				mu.Unlock()
			}
		})
	}()
	defer func() { cancel(); <-done }()
	if got := strings.TrimSpace(string(must(fx.h.Call([]byte(fmt.Sprintf("flows %d %d %d", portDNSOK, n, from)))))); got != strconv.Itoa(n) {
		t.Fatalf("%d flows: %s answered", n, got)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		c := closures
		mu.Unlock()
		if c >= n || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(bad) > 0 {
		t.Fatalf("FlowAssociateContext: %v", bad[0])
	}
	if len(assoc) != n || closures != n {
		t.Fatalf("%d flows got a context, %d closures reported; want %d each", len(assoc), closures, n)
	}
	for fh, k := range assoc {
		if k != 1 || deleted[uint64(fh)] != 1 {
			t.Fatalf("flow %d: associated %d, flowDeleteFn %d; want once each", fh, k, deleted[uint64(fh)])
		}
	}
	if len(deleted) != n {
		t.Fatalf("flowDeleteFn for %d flows, want %d", len(deleted), n)
	}
	if o := fx.eng.Outstanding(); o.FlowContexts != 0 {
		t.Fatalf("engine holds %+v after the %d flows closed", o, n)
	}
	if lost, err := fx.dp.FlowEventsLost(); err != nil || lost != lost0 {
		t.Fatalf("flow events lost: %d (%v)", lost-lost0, err)
	}
	fx.checkClean(t)
}
