package inproc

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"fwp/engine"
)

// Idle expiry by an explicit clock: an association is kept while it is
// used and while it is being classified, and ends once idle for the
// timeout; the next datagram makes a new flow.
func TestPacketConnExpireIdleClock(t *testing.T) {
	e := engine.New(engine.Options{})
	dp := New(e, Options{UDPIdleTimeout: time.Hour}) // the timer never fires in the test
	lc := &ListenConfig{Datapath: dp}
	npc, err := lc.ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pc := npc.(*PacketConn)
	defer pc.Close()
	peerSock, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peerSock.Close()
	to := peerSock.LocalAddr()
	flow := func() engine.FlowHandle {
		pc.mu.Lock()
		defer pc.mu.Unlock()
		for _, p := range pc.peers {
			return p.c.flow
		}
		return 0
	}

	if _, err := pc.WriteTo([]byte("a"), to); err != nil {
		t.Fatal(err)
	}
	first := flow()
	start := time.Now()
	if n := pc.expireIdle(start.Add(59 * time.Minute)); n != 0 || flow() != first {
		t.Fatalf("expired %d associations before the timeout", n)
	}
	// Used again 30 minutes in (as far as the association knows): the
	// timeout counts from then.
	pc.peers[apOf(to)].last.Add(int64(30 * time.Minute))
	if n := pc.expireIdle(start.Add(80 * time.Minute)); n != 0 {
		t.Fatalf("expired %d associations used 50 minutes ago", n)
	}
	if n := pc.expireIdle(start.Add(91 * time.Minute)); n != 1 || flow() != 0 {
		t.Fatalf("expired %d associations idle for over an hour, want 1", n)
	}
	if _, err := pc.WriteTo([]byte("b"), to); err != nil {
		t.Fatal(err)
	}
	if second := flow(); second == 0 || second == first {
		t.Fatalf("after expiry the association has flow %d (first %d)", second, first)
	}

	// An association still being classified is not idle.
	pc.mu.Lock()
	pending := pc.newPeer(netip.MustParseAddrPort("127.0.0.1:9"), engine.DirectionInbound)
	pc.mu.Unlock()
	if n := pc.expireIdle(time.Now().Add(10 * time.Hour)); n != 1 {
		t.Fatalf("expired %d associations, want the idle one only", n)
	}
	pc.mu.Lock()
	_, kept := pc.peers[pending.remote]
	pc.mu.Unlock()
	if !kept {
		t.Fatal("an association being classified expired")
	}
	close(pending.done)
}

func apOf(a net.Addr) netip.AddrPort {
	ap, _ := addrPortOf(a)
	return ap
}
