//go:build linux

package ebpf

import (
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
)

// TestKernelInboundSoak: in one datapath lifetime, soakOps inbound UDP
// flows (each a first datagram, to a server on a wildcard address, so
// each a new flow) and soakOps/10 inbound TCP connections, a tenth of
// each blocked at AUTH_RECV_ACCEPT. The UDP flow table stays within its
// bound (least recently used flows go), the per-filter counters do not
// grow with the traffic, and the datapath's process keeps its fds and
// goroutines.
func TestKernelInboundSoak(t *testing.T) {
	d, cg := kernelSetup(t)
	h := testutil.StartHelper(t, cg, "inserver")
	inServe(t, h, inListen{Net: "udp4", Addr: "0.0.0.0:7100", Sink: true}, inListen{Net: "tcp4", Addr: "0.0.0.0:7101"})
	e := buildEngine(t, func(tx *engine.Txn) error {
		for _, f := range []engine.Filter{
			// Every tenth remote address (127.x.y.0/24 with y%10 == 9) is blocked.
			blockFilter(recvAccept(false), engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchPrefix,
				Value: engine.Prefix(netip.MustParsePrefix("127.0.9.0/24"))}),
			blockFilter(recvAccept(false), engine.Condition{Field: engine.FieldIPLocalAddress, Match: engine.MatchPrefix,
				Value: engine.Prefix(netip.MustParsePrefix("127.9.0.0/16"))}),
			{Layer: recvAccept(false), Action: engine.Action{Type: engine.ActionPermit},
				Conditions: []engine.Condition{{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)}}},
			blockFilter(engine.LayerFor(engine.KindAuthListen, false), engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(1)}),
		} {
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
	apply(t, d, e)
	hitsBefore := mapEntries(t, d.objs.FwpHits)
	fds, goroutines := countFDs(), runtime.NumGoroutine()
	p0, b0 := recvCounts(t, d, engine.KindAuthRecvAccept)
	start := time.Now()
	// UDP: datagram i goes to 127.(i%10).(i/2500).(i/10%250+1): a
	// new local address, so a new flow, each time; the tenth of them to
	// 127.9.0.0/16 is blocked.
	udpAddr := func(i int) netip.Addr {
		j := i / 10 // distinct for i < 640,000
		return netip.AddrFrom4([4]byte{127, byte(i % 10), byte(j / 250), byte(j%250 + 1)})
	}
	err := inNetnsPid(h.Pid(), func() error {
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			return err
		}
		defer pc.Close()
		for i := range soakOps {
			if i%200 == 199 {
				// Paced: loopback's backlog (netdev_max_backlog) drops
				// datagrams sent faster than softirq takes them, before
				// any hook.
				time.Sleep(200 * time.Microsecond)
			}
			if _, err := pc.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(netip.AddrPortFrom(udpAddr(i), 7100))); err != nil {
				return fmt.Errorf("datagram %d: %w", i, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	udpTime := time.Since(start)
	// TCP: soakOps/10 connects from 127.0.(i%10).1: the tenth from
	// 127.0.9.1 is blocked (its SYN dropped, nothing answers); the rest
	// are accepted, read and closed.
	tcpN := soakOps / 10
	accepted, dropped := 0, 0
	start = time.Now()
	err = inNetnsPid(h.Pid(), func() error {
		for i := range tcpN {
			from := netip.AddrFrom4([4]byte{127, 0, byte(i % 10), 1})
			if i%10 == 9 {
				if i%100 != 9 { // blocked: a few probes suffice (each waits)
					continue
				}
				if got := inProbeTimeout(inOp{"tcp4", netip.AddrPortFrom(from, 0), netip.MustParseAddrPort("127.0.0.1:7101")}, 20*time.Millisecond); got != "timeout" {
					return fmt.Errorf("connect %d from the blocked range: %s", i, got)
				}
				dropped++
				continue
			}
			if got := inProbeTimeout(inOp{"tcp4", netip.AddrPortFrom(from, 0), netip.MustParseAddrPort("127.0.0.1:7101")}, 2*time.Second); got != "ok" {
				return fmt.Errorf("connect %d: %s", i, got)
			}
			accepted++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	tcpTime := time.Since(start)
	time.Sleep(100 * time.Millisecond) // the last datagrams reach the hook
	p1, b1 := recvCounts(t, d, engine.KindAuthRecvAccept)
	flows, err := d.InboundFlows()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d UDP flows in %v, %d TCP accepted and %d dropped in %v; AUTH_RECV_ACCEPT counted %d permits, %d blocks; %d flows held",
		soakOps, udpTime, accepted, dropped, tcpTime, p1-p0, b1-b0, flows)
	// Every flow's first datagram was classified (none lost before the
	// hook on loopback), the blocked tenth blocked.
	if got, want := p1-p0+b1-b0, uint64(soakOps+accepted+dropped); got < want*99/100 {
		t.Errorf("classified %d inbound requests, want about %d", got, want)
	}
	if b1-b0 < uint64(soakOps/10*99/100) {
		t.Errorf("blocked %d, want about %d", b1-b0, soakOps/10)
	}
	if flows > InboundFlowsMax {
		t.Errorf("UDP flow table holds %d flows, its bound is %d", flows, InboundFlowsMax)
	}
	if n := mapEntries(t, d.objs.FwpHits); n > hitsBefore+4 {
		t.Errorf("fwp_hits: %d entries after, %d before", n, hitsBefore)
	}
	runtime.GC()
	if n, g := countFDs(), runtime.NumGoroutine(); n > fds || g > goroutines+2 {
		t.Errorf("the datapath's process grew: fds %d -> %d, goroutines %d -> %d", fds, n, goroutines, g)
	}
}
