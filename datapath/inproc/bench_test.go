package inproc_test

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
)

// install10k adds 10,000 filters that a loopback dial does not match:
// remote /32 blocks on AUTH_CONNECT and remote-port permits on
// CONNECT_REDIRECT, FLOW_ESTABLISHED and ENDPOINT_CLOSURE.
func install10k(b *testing.B, e *engine.Engine) {
	err := e.Update(func(tx *engine.Txn) error {
		for i := range 10000 {
			f := engine.Filter{Action: engine.Action{Type: engine.ActionPermit}}
			switch i % 4 {
			case 0, 1:
				f.Layer = engine.LayerALEAuthConnectV4
				f.Action.Type = engine.ActionBlock
				a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
				f.Conditions = []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(a)}}
			case 2:
				f.Layer = engine.LayerALEConnectRedirectV4
				f.Conditions = []engine.Condition{port(uint16(1 + i%1000))}
			case 3:
				f.Layer = engine.LayerALEFlowEstablishedV4
				if i%8 == 7 {
					f.Layer = engine.LayerALEEndpointClosureV4
				}
				f.Conditions = []engine.Condition{port(uint16(1 + i%1000))}
			}
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}

// BenchmarkDialClose: loopback dial+close through the inproc Dialer with
// 10k filters installed against net.Dialer, interleaved in one run.
// ratio = inproc time / net.Dialer time.
func BenchmarkDialClose(b *testing.B) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	e := engine.New(engine.Options{})
	install10k(b, e)
	if n := e.View().FilterCount(engine.LayerALEAuthConnectV4); n != 5000 {
		b.Fatalf("auth-connect filters %d", n)
	}
	addr := ln.Addr().String()
	nd := &net.Dialer{}
	d := &inproc.Dialer{Datapath: inproc.New(e, inproc.Options{})}
	dial := func(dial func(string, string) (net.Conn, error)) time.Duration {
		t0 := time.Now()
		c, err := dial("tcp4", addr)
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
		return time.Since(t0)
	}
	var dNet, dFwp time.Duration
	n := 0
	b.ReportAllocs()
	for b.Loop() {
		dNet += dial(nd.Dial)
		dFwp += dial(d.Dial)
		n++
	}
	b.ReportMetric(float64(dNet.Nanoseconds())/float64(n), "net-ns/dial")
	b.ReportMetric(float64(dFwp.Nanoseconds())/float64(n), "inproc-ns/dial")
	b.ReportMetric(dFwp.Seconds()/dNet.Seconds(), "ratio")
}
