//go:build linux

package ebpf

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
)

func init() { testutil.RegisterHelper("udpreplybench", udpReplyBenchHelper) }

// udpReplyBenchHelper runs in the hooked cgroup: a server socket S on
// 127.0.0.1:7300 that received a datagram from P1 (127.0.0.1:7301, so its
// sends there are replies). Commands on stdin, one answer line each:
//
//	alt N       N sendto's from S to P1 and N first sends (each to a new
//	            remote of 127.2/16), alternating; answers the mean ns of
//	            each ("reply first")
//	reply N     N sendto's to P1; first N: N first sends (bpf_stats passes)
//	newflows N  N datagrams to S, each from a new socket on a new address
//	            and port of 127.3/16 (a new flow: ingress records it);
//	            sameflow N: N from P1 (a known flow)
func udpReplyBenchHelper([]string) error {
	s, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:7300")))
	if err != nil {
		return err
	}
	p1, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:7301")))
	if err != nil {
		return err
	}
	p2, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:7302")))
	if err != nil {
		return err
	}
	sAddr := netip.MustParseAddrPort("127.0.0.1:7300")
	if _, err := p1.WriteToUDPAddrPort([]byte("x"), sAddr); err != nil {
		return err
	}
	buf := make([]byte, 16)
	s.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, _, err := s.ReadFromUDPAddrPort(buf); err != nil {
		return err
	}
	s.SetReadDeadline(time.Time{})
	// Drain every socket: full receive queues would drop, not slow, but
	// keep memory flat.
	for _, c := range []*net.UDPConn{s, p1, p2} {
		go func() {
			b := make([]byte, 16)
			for {
				if _, _, err := c.ReadFromUDPAddrPort(b); err != nil {
					return
				}
			}
		}()
	}
	_ = p2
	to1 := p1.LocalAddr().(*net.UDPAddr).AddrPort()
	send := func(to netip.AddrPort) error {
		_, err := s.WriteToUDPAddrPort([]byte("y"), to)
		return err
	}
	// A first send goes to a remote never sent to before (the sends to a
	// remote after its first are its flow's: not classified).
	var nfirst, nflow int
	next := func(a byte, n *int) netip.AddrPort {
		i := *n
		*n++
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, a, byte(i >> 8), byte(i)}), uint16(10000+i>>16))
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		n, _ := strconv.Atoi(f[1])
		var answer string
		switch f[0] {
		case "alt":
			var d [2]time.Duration
			for range n {
				for i, to := range []netip.AddrPort{to1, next(2, &nfirst)} {
					start := time.Now()
					if err := send(to); err != nil {
						return err
					}
					d[i] += time.Since(start)
				}
			}
			answer = fmt.Sprintf("%d %d", d[0].Nanoseconds()/int64(n), d[1].Nanoseconds()/int64(n))
		case "reply", "first":
			for range n {
				to := to1
				if f[0] == "first" {
					to = next(2, &nfirst)
				}
				if err := send(to); err != nil {
					return err
				}
			}
			answer = "ok"
		case "newflows":
			for range n {
				c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(next(3, &nflow)))
				if err != nil {
					return err
				}
				_, err = c.WriteToUDPAddrPort([]byte("z"), sAddr)
				c.Close()
				if err != nil {
					return err
				}
			}
			answer = "ok"
		case "sameflow":
			for range n {
				if _, err := p1.WriteToUDPAddrPort([]byte("z"), sAddr); err != nil {
					return err
				}
			}
			answer = "ok"
		}
		if _, err := fmt.Println(answer); err != nil {
			return err
		}
	}
	return in.Err()
}

// BenchmarkKernelUDPReply measures what the sendmsg hook costs an
// unconnected send that is a reply within an inbound flow (one lookup,
// no classification) against a first send to a remote that never sent
// (classified at CONNECT_REDIRECT and AUTH_CONNECT, and permitted), under
// a policy of 1 or 1,000 AUTH_CONNECT filters; then the hooks' own run
// time per send and the ingress hook's per datagram (a new flow it
// records, a datagram of a known flow, and a new flow under a policy
// without outbound filters, which records nothing).
func BenchmarkKernelUDPReply(b *testing.B) {
	for _, n := range []int{1, 1000} {
		b.Run(fmt.Sprintf("filters=%d", n), func(b *testing.B) { benchUDPReply(b, n) })
	}
}

func benchUDPReply(b *testing.B, nfilters int) {
	testutil.RequireRoot(b)
	cg := testutil.NewCgroup(b)
	d, err := Load(Options{})
	if err != nil {
		testutil.Unavailable(b, err)
	}
	b.Cleanup(func() { d.Close() })
	if err := d.Attach(cg.Path); err != nil {
		testutil.Unavailable(b, err)
	}
	// Blocks of UDP to other remote ports: the first sends are permitted.
	outbound := buildEngine(b, func(tx *engine.Txn) error {
		for i := range nfilters {
			if _, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4, udpProto(), engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(10 + i))})); err != nil {
				return err
			}
		}
		return nil
	})
	apply(b, d, outbound)
	h := testutil.StartHelper(b, cg, "udpreplybench")
	call := func(cmd string) string {
		ans, err := h.Call([]byte(cmd))
		if err != nil {
			b.Fatal(err)
		}
		return strings.TrimSpace(string(ans))
	}
	const batch = 200
	var reply, first int64
	runs := 0
	for b.Loop() {
		var r, f int64
		if _, err := fmt.Sscan(call(fmt.Sprintf("alt %d", batch)), &r, &f); err != nil {
			b.Fatal(err)
		}
		reply += r
		first += f
		runs++
	}
	b.ReportMetric(float64(reply)/float64(runs), "ns/sendto-reply")
	b.ReportMetric(float64(first)/float64(runs), "ns/sendto-first")
	b.ReportMetric(float64(first)/float64(reply), "first/reply")

	// The hooks' own run time, in passes of their own (bpf_stats adds
	// clock reads to every run).
	b.StopTimer()
	stats, err := EnableStats()
	if err != nil {
		b.Fatal(err)
	}
	defer stats.Close()
	const passes = 20000
	pass := func(cmd, prog, unit string) {
		before, err := d.Stats()
		if err != nil {
			b.Fatal(err)
		}
		if a := call(fmt.Sprintf("%s %d", cmd, passes)); a != "ok" {
			b.Fatalf("%s: %s", cmd, a)
		}
		time.Sleep(20 * time.Millisecond) // datagrams in flight reach ingress
		after, err := d.Stats()
		if err != nil {
			b.Fatal(err)
		}
		if n := after[prog].Runs - before[prog].Runs; n > 0 {
			b.ReportMetric(float64(after[prog].RunTime-before[prog].RunTime)/float64(n), "ns/"+prog+"-"+unit)
		}
	}
	pass("reply", "sendmsg4", "reply")
	pass("first", "sendmsg4", "first")
	pass("sameflow", "ingress", "knownflow")
	s0, err := d.UDPReplyStats()
	if err != nil {
		b.Fatal(err)
	}
	pass("newflows", "ingress", "newflow")
	s1, err := d.UDPReplyStats()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(s1.Recorded-s0.Recorded)/passes, "recorded/newflow")
	// No outbound filters: ingress records nothing (the hook stays
	// attached once a policy needed it).
	apply(b, d, buildEngine(b, func(tx *engine.Txn) error {
		_, err := tx.AddFilter(blockFilter(engine.LayerFor(engine.KindBindRedirect, false), engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(9)}))
		return err
	}))
	pass("newflows", "ingress", "newflow-nooutbound")
}
