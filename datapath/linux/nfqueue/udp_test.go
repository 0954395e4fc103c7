//go:build linux

package nfqueue

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"fwp/engine"
	"fwp/internal/testutil"
)

// DNS servers of the UDP scenario, on 127.0.0.1 in the helper's namespace.
const (
	portDNSPend  = 5300 // the callout pends pendDelay, then permits
	portDNSBlock = 5301 // the callout blocks
	portDNSOK    = 5302 // the callout permits at once
)

func init() { testutil.RegisterHelper("udp", udpHelper) }

// udpHelper: miekg/dns servers answering every A question with
// 192.0.2.1, and a client answering one command line at a time.
func udpHelper([]string) error {
	for _, addr := range []string{"127.0.0.1", "[::1]"} {
		for _, port := range []int{portDNSPend, portDNSBlock, portDNSOK} {
			if err := serveDNS(addr + ":" + strconv.Itoa(port)); err != nil {
				return err
			}
		}
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "dig", "dig6":
			// dig PORT NAME: exit code, wall time (ms), the answer
			// (dig6: to the server on ::1)
			server := "@127.0.0.1"
			if f[0] == "dig6" {
				server = "@::1"
			}
			start := time.Now()
			out, err := exec.Command("dig", server, "-p", f[1], f[2], "A", "+short", "+tries=1", "+time=5").CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			fmt.Printf("%d %d %q\n", code, time.Since(start).Milliseconds(), strings.TrimSpace(string(out)))
		case "many":
			// many PORT N: N queries on one connected socket; answered count
			n, _ := strconv.Atoi(f[2])
			fmt.Println(udpMany(f[1], n))
		case "many6":
			// many6 PORT N: the same to ::1
			n, _ := strconv.Atoi(f[2])
			fmt.Println(udpMany6(f[1], n))
		case "flows":
			// flows PORT N FROM: N connected sockets on local ports FROM,
			// FROM+1, ... (no 4-tuple reused), one query each; answered count
			n, _ := strconv.Atoi(f[2])
			from, _ := strconv.Atoi(f[3])
			ok := 0
			for i := range n {
				if udpManyFrom(f[1], from+i, 1) == "1" {
					ok++
				}
			}
			fmt.Println(ok)
		case "burst":
			// burst PORT K: K queries sent at once on one connected
			// socket, then the answers read; answered count
			k, _ := strconv.Atoi(f[2])
			fmt.Println(udpBurst(f[1], k))
		case "sendto":
			// sendto PORT: one query from an unconnected socket; "answered" or the error
			fmt.Println(udpSendto(f[1]))
		}
	}
	return in.Err()
}

// serveDNS answers every A question on addr with 192.0.2.1.
func serveDNS(addr string) error {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		for _, q := range r.Question {
			if rr, err := dns.NewRR(q.Name + " 60 IN A 192.0.2.1"); err == nil {
				m.Answer = append(m.Answer, rr)
			}
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	return nil
}

func udpMany(port string, n int) string { return udpManyFrom(port, 0, n) }

func udpMany6(port string, n int) string { return udpQueries("udp6", net.IPv6loopback, port, 0, n) }

func udpManyFrom(port string, from, n int) string {
	return udpQueries("udp4", net.IPv4(127, 0, 0, 1), port, from, n)
}

// udpQueries: n queries on one socket connected from lo:from to lo:port.
func udpQueries(network string, lo net.IP, port string, from, n int) string {
	raddr := &net.UDPAddr{IP: lo}
	raddr.Port, _ = strconv.Atoi(port)
	c, err := net.DialUDP(network, &net.UDPAddr{IP: lo, Port: from}, raddr)
	if err != nil {
		return "error " + err.Error()
	}
	defer c.Close()
	dc := &dns.Conn{Conn: c}
	ok := 0
	for i := range n {
		m := new(dns.Msg)
		m.SetQuestion(fmt.Sprintf("n%d.example.", i), dns.TypeA)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if err := dc.WriteMsg(m); err != nil {
			return fmt.Sprintf("%d error %v", ok, err)
		}
		r, err := dc.ReadMsg()
		if err != nil {
			return fmt.Sprintf("%d error %v", ok, err)
		}
		if r.Id == m.Id && len(r.Answer) == 1 {
			ok++
		}
	}
	return strconv.Itoa(ok)
}

func udpBurst(port string, k int) string {
	c, err := net.Dial("udp4", "127.0.0.1:"+port)
	if err != nil {
		return "error " + err.Error()
	}
	defer c.Close()
	dc := &dns.Conn{Conn: c}
	for i := range k {
		m := new(dns.Msg)
		m.SetQuestion(fmt.Sprintf("b%d.example.", i), dns.TypeA)
		if err := dc.WriteMsg(m); err != nil {
			return "error " + err.Error()
		}
	}
	ok := 0
	c.SetDeadline(time.Now().Add(5 * time.Second))
	for range k {
		if r, err := dc.ReadMsg(); err != nil {
			break
		} else if len(r.Answer) == 1 {
			ok++
		}
	}
	return strconv.Itoa(ok)
}

func udpSendto(port string) string {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		return "error " + err.Error()
	}
	defer pc.Close()
	m := new(dns.Msg)
	m.SetQuestion("unconnected.example.", dns.TypeA)
	b, _ := m.Pack()
	to, _ := net.ResolveUDPAddr("udp4", "127.0.0.1:"+port)
	if _, err := pc.WriteTo(b, to); err != nil {
		return "error " + err.Error()
	}
	pc.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 512)
	if _, _, err := pc.ReadFrom(buf); err != nil {
		return "unanswered"
	}
	return "answered"
}

// udpPolicy: UDP to the pend port goes to a Go callout that pends
// pendDelay and then permits; UDP to the block port to one that blocks;
// to the ok port to one that permits at once — v4 and v6.
func udpPolicy(fx *fixture, tx *engine.Txn) error {
	classify := func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		fx.calls.Add(1)
		switch int(req.Values.Uint(engine.FieldIPRemotePort)) {
		case portDNSBlock:
			out.Action = engine.ActionBlock
			return
		case portDNSOK:
			out.Action = engine.ActionPermit
			return
		}
		if uint32(req.Values.Uint(engine.FieldFlags))&engine.FlagIsReauthorize != 0 {
			out.Action = engine.ActionPermit
			return
		}
		p, err := req.PendOperation()
		if err != nil {
			out.Action = engine.ActionBlock
			return
		}
		out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
		time.AfterFunc(pendDelay, func() { fx.eng.CompleteOperation(p, nil) })
	}
	p, err := tx.AddProvider(engine.Provider{Key: "udp"})
	if err != nil {
		return err
	}
	sl, err := tx.AddSublayer(engine.Sublayer{Key: "udp", Provider: p, Weight: 10})
	if err != nil {
		return err
	}
	for key, layer := range map[string]engine.LayerID{"test.udp": engine.LayerALEAuthConnectV4, "test.udp6": engine.LayerALEAuthConnectV6} {
		if err := fx.eng.RegisterCallout(key, engine.CalloutRegistration{Classify: classify}); err != nil {
			return err
		}
		co, err := tx.AddCallout(engine.Callout{Key: key, Provider: p, Layer: layer})
		if err != nil {
			return err
		}
		for _, port := range []int{portDNSPend, portDNSBlock, portDNSOK} {
			if _, err := tx.AddFilter(engine.Filter{Layer: layer, Sublayer: sl, Provider: p,
				Conditions: []engine.Condition{
					{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(port))},
				},
				Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co}}); err != nil {
				return err
			}
		}
	}
	return nil
}

// TestDigThroughPendingCalloutV6: the UDP callout path over IPv6 (its own
// nftables family): dig to ::1 is answered after the pend, a block refuses
// it at once (ICMPv6 port unreachable), and an authorized v6 flow's later
// datagrams stay in the kernel.
func TestDigThroughPendingCalloutV6(t *testing.T) {
	fx := customFixture(t, "udp", Options{UDP: true}, 5*time.Second, udpPolicy)
	line := must(fx.h.Call([]byte(fmt.Sprintf("dig6 %d pended6.example.", portDNSPend))))
	f := strings.Fields(string(line))
	ms, _ := strconv.Atoi(f[1])
	if f[0] != "0" || !strings.Contains(string(line), "192.0.2.1") || time.Duration(ms)*time.Millisecond < pendDelay {
		t.Fatalf("dig @::1 through a pending callout: %s; want the answer after at least %v", line, pendDelay)
	}
	if st := fx.path.Stats(); st.Pended != 1 || st.Permitted != 1 {
		t.Fatalf("stats %+v: want dig's v6 flow pended once and permitted", st)
	}
	before := fx.path.Stats().Queued
	if got := strings.TrimSpace(string(must(fx.h.Call([]byte(fmt.Sprintf("many6 %d 50", portDNSOK)))))); got != "50" {
		t.Fatalf("50 queries on one connected v6 socket: %s answered", got)
	}
	if q := fx.path.Stats().Queued - before; q != 1 {
		t.Fatalf("%d datagrams of one authorized v6 UDP flow came to user space; want only its first", q)
	}
	line = must(fx.h.Call([]byte(fmt.Sprintf("dig6 %d blocked6.example.", portDNSBlock))))
	f = strings.Fields(string(line))
	ms, _ = strconv.Atoi(f[1])
	if f[0] == "0" || strings.Contains(string(line), "192.0.2.1") || ms >= 2000 {
		t.Fatalf("dig @::1 to a blocked UDP flow: %s; want it refused at once (ICMPv6), not timed out", line)
	}
	t.Logf("stats %+v", fx.path.Stats())
	fx.checkClean(t)
}

// TestDigThroughPendingCallout: dig's query (the first datagram of its UDP
// flow) is held while a Go callout pends, and answered once it permits;
// 100 more queries on one connected socket pass in the kernel (one
// datagram came to user space); a blocked flow is refused with an ICMP
// error (dig fails at once, not after its timeout); an unconnected
// socket's send is decided by the filter's flag in the hook.
func TestDigThroughPendingCallout(t *testing.T) {
	fx := customFixture(t, "udp", Options{UDP: true}, 5*time.Second, udpPolicy)
	line, err := fx.h.Call([]byte(fmt.Sprintf("dig %d pended.example.", portDNSPend)))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(line))
	ms, _ := strconv.Atoi(f[1])
	if f[0] != "0" || !strings.Contains(string(line), "192.0.2.1") || time.Duration(ms)*time.Millisecond < pendDelay {
		t.Fatalf("dig through a pending callout: %s; want the answer after at least %v", line, pendDelay)
	}
	if st := fx.path.Stats(); st.Pended != 1 || st.Permitted != 1 {
		t.Fatalf("stats %+v: want dig's flow pended once and permitted", st)
	}
	before := fx.path.Stats().Queued
	if got := strings.TrimSpace(string(must(fx.h.Call([]byte(fmt.Sprintf("many %d 100", portDNSPend)))))); got != "100" {
		t.Fatalf("100 queries on one connected socket: %s answered", got)
	}
	if q := fx.path.Stats().Queued - before; q != 1 {
		t.Fatalf("%d datagrams of one authorized UDP flow came to user space; want only its first", q)
	}
	line = must(fx.h.Call([]byte(fmt.Sprintf("dig %d blocked.example.", portDNSBlock))))
	f = strings.Fields(string(line))
	ms, _ = strconv.Atoi(f[1])
	if f[0] == "0" || strings.Contains(string(line), "192.0.2.1") || ms >= 2000 {
		t.Fatalf("dig to a blocked UDP flow: %s; want it refused at once (ICMP), not timed out", line)
	}
	// Five datagrams sent at once while the first is held: one
	// classification (one pend), the four others wait with it and get
	// its verdict.
	st0 := fx.path.Stats()
	if got := strings.TrimSpace(string(must(fx.h.Call([]byte(fmt.Sprintf("burst %d 5", portDNSPend)))))); got != "5" {
		t.Fatalf("5 queries sent at once through a pending callout: %s answered", got)
	}
	if st := fx.path.Stats(); st.Pended-st0.Pended != 1 || st.Resent-st0.Resent != 4 {
		t.Fatalf("stats %+v (before %+v): want one pend and 4 datagrams held behind it", st, st0)
	}
	// An unconnected socket's datagram took the socket's mark before the
	// sendmsg hook ran, so it cannot be held: the hook decides it by the
	// filter's flag at once (fail-closed here: sendto fails with EPERM),
	// never letting it through unasked.
	for _, port := range []int{portDNSBlock, portDNSPend} {
		if got := strings.TrimSpace(string(must(fx.h.Call([]byte(fmt.Sprintf("sendto %d", port)))))); !strings.Contains(got, "operation not permitted") {
			t.Fatalf("unconnected sendto to port %d (fail-closed callout filter): %s; want EPERM", port, got)
		}
	}
	t.Logf("stats %+v", fx.path.Stats())
	fx.checkClean(t)
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

// TestSoakUDP: soakOps (100,000) queries on one authorized UDP flow bring
// one datagram to user space; then 5,000 flows (a socket each) decided by
// a callout one by one: each one datagram, all answered, and afterwards no
// hook record, pend, goroutine or fd is left.
func TestSoakUDP(t *testing.T) {
	fx := customFixture(t, "udp", Options{UDP: true}, 5*time.Second, udpPolicy)
	fx.call(t, fmt.Sprintf("flows %d 10 20000", portDNSOK)) // warm up
	runtime.GC()
	g0, fd0 := runtime.NumGoroutine(), fdCount(t)
	q0 := fx.path.Stats().Queued
	start := time.Now()
	if got := strings.TrimSpace(string(must(fx.h.Call([]byte(fmt.Sprintf("many %d %d", portDNSOK, soakOps)))))); got != strconv.Itoa(soakOps) {
		t.Fatalf("%d queries on one flow: %s answered", soakOps, got)
	}
	if q := fx.path.Stats().Queued - q0; q != 1 {
		t.Fatalf("%d datagrams of one authorized flow came to user space, want 1", q)
	}
	// Distinct local ports: a socket reusing a 4-tuple while its conntrack
	// entry lives is not asked again (docs/semantics.md).
	const flows = 5000
	if got := strings.TrimSpace(string(must(fx.h.Call([]byte(fmt.Sprintf("flows %d %d 21000", portDNSOK, flows)))))); got != strconv.Itoa(flows) {
		t.Fatalf("%d flows: %s answered", flows, got)
	}
	st := fx.path.Stats()
	t.Logf("%d queries + %d flows in %v; stats %+v", soakOps, flows, time.Since(start), st)
	if q := st.Queued - q0; q != flows+1 || st.NoFlow != 0 || st.Errors != 0 {
		t.Fatalf("stats %+v: want %d datagrams queued (one per flow), none without a record", st, flows+1)
	}
	fx.checkClean(t)
	runtime.GC()
	g1, fd1 := runtime.NumGoroutine(), fdCount(t)
	if g1 > g0+2 || fd1 > fd0 {
		t.Fatalf("grew: goroutines %d -> %d, fds %d -> %d", g0, g1, fd0, fd1)
	}
}
