package ebpf

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
)

func init() { testutil.RegisterHelper("sweepconns", sweepConnsHelper) }

const (
	// Ports no other test of the package uses: the datapath (and so its
	// maps) is shared with them.
	sweepOrigin     = 24716 // redirected to the proxy, which accepts
	sweepOriginDown = 24717 // redirected to a port nothing listens on
	sweepProxyPort  = 24718 // the helper's proxy
	sweepDownPort   = 24719
)

// sweepConnsHelper runs in the test cgroup and namespace. "open N" listens
// on the proxy port, connects once to sweepOrigin (redirected to that
// listener, accepted and held open) and N times to sweepOriginDown
// (redirected to a closed port: refused), and answers "ok". "close" closes
// the held pair.
func sweepConnsHelper([]string) error {
	in := bufio.NewScanner(os.Stdin)
	var held []net.Conn
	for in.Scan() {
		f := strings.Fields(in.Text())
		switch {
		case len(f) == 2 && f[0] == "open":
			var n int
			fmt.Sscan(f[1], &n)
			l, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", sweepProxyPort))
			if err != nil {
				return err
			}
			c, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", sweepOrigin))
			if err != nil {
				return err
			}
			a, err := l.Accept()
			if err != nil {
				return err
			}
			l.Close()
			held = append(held, c, a)
			for range n {
				c, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", sweepOriginDown))
				if err == nil {
					c.Close()
					return fmt.Errorf("a connect redirected to a closed port connected")
				}
				if !strings.Contains(err.Error(), "refused") {
					return err
				}
			}
			fmt.Println("ok")
		case len(f) == 1 && f[0] == "close":
			for _, c := range held {
				c.Close()
			}
			held = nil
			fmt.Println("ok")
		default:
			return fmt.Errorf("sweepconns: %q", in.Text())
		}
	}
	return in.Err()
}

// tupleRecords counts the 4-tuple redirect records naming proxy port (one
// of this test's), and how many of them the kernel marked accepted.
func tupleRecords(t *testing.T, d *Datapath, port uint16) (n, accepted int) {
	t.Helper()
	var k fwpTupleKey
	var s fwpRedirectState
	it := d.objs.FwpTupleRedirect.Iterate()
	for it.Next(&k, &s) {
		if k.ProxyPort == port {
			n++
			if s.Accepted != 0 {
				accepted++
			}
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n, accepted
}

// TCP redirect records that no proxy socket will end — the connection was
// refused at the proxy's port, so its handshake never completed there — are
// swept once their client has closed and UnacceptedGrace has passed; a
// record the proxy's accepted socket holds is marked accepted by the kernel
// and stays while that socket is open, and goes with its close. Before
// this sweep such records stayed until the LRU map evicted them (and then
// live ones with them).
func TestUnacceptedRedirectRecordsSwept(t *testing.T) {
	d, cg := kernelSetup(t)
	e := buildEngine(t, func(tx *engine.Txn) error {
		co, err := addRedirect(tx, false, sweepOrigin, netip.MustParseAddrPort(fmt.Sprintf("127.0.0.1:%d", sweepProxyPort)), nil)
		if err != nil {
			return err
		}
		data, err := RedirectConfig{Proxy: netip.MustParseAddrPort(fmt.Sprintf("127.0.0.1:%d", sweepDownPort))}.Marshal()
		if err != nil {
			return err
		}
		pc, err := tx.AddProviderContext(engine.ProviderContext{Data: data})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEConnectRedirectV4, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}, ProviderContext: pc,
			Conditions: []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(sweepOriginDown)}}})
		return err
	})
	apply(t, d, e)
	grace := UnacceptedGrace
	t.Cleanup(func() { UnacceptedGrace = grace })

	h := testutil.StartHelper(t, cg, "sweepconns")
	const refused = 5
	if out, err := h.Call([]byte(fmt.Sprintf("open %d", refused))); err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("open: %s %v", out, err)
	}
	if n, acc := tupleRecords(t, d, sweepProxyPort); n != 1 || acc != 1 {
		t.Fatalf("the accepted connection: %d records, %d marked accepted; want 1, 1", n, acc)
	}
	if n, acc := tupleRecords(t, d, sweepDownPort); n != refused || acc != 0 {
		t.Fatalf("the refused connections: %d records, %d marked accepted; want %d, 0", n, acc, refused)
	}
	// Within the grace nothing goes.
	UnacceptedGrace = time.Hour
	for range 2 {
		if _, err := d.SweepReleased(); err != nil {
			t.Fatal(err)
		}
	}
	if n, _ := tupleRecords(t, d, sweepDownPort); n != refused {
		t.Fatalf("within the grace: %d of %d refused connections' records left", n, refused)
	}
	// Past it the refused ones go; the open accepted one stays.
	UnacceptedGrace = 0
	if _, err := d.SweepReleased(); err != nil {
		t.Fatal(err)
	}
	if n, _ := tupleRecords(t, d, sweepDownPort); n != 0 {
		t.Fatalf("past the grace: %d refused connections' records left", n)
	}
	if n, _ := tupleRecords(t, d, sweepProxyPort); n != 1 {
		t.Fatalf("the open accepted connection's record was swept (%d left)", n)
	}
	// Its close ends it (sockops, at TCP_CLOSE of the proxy's socket).
	if out, err := h.Call([]byte("close")); err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("close: %s %v", out, err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for n, _ := tupleRecords(t, d, sweepProxyPort); n != 0; n, _ = tupleRecords(t, d, sweepProxyPort) {
		if time.Now().After(deadline) {
			t.Fatalf("the accepted connection's record outlived its close (%d left)", n)
		}
		time.Sleep(10 * time.Millisecond)
	}

	// A record whose client is still open is never swept, however old:
	// written by hand under a key and cookie no socket has.
	k := fwpTupleKey{ClientPort: 1, ProxyPort: 24715}
	copy(k.Client[:], []byte{192, 0, 2, 1})
	copy(k.Proxy[:], []byte{192, 0, 2, 2})
	st := fwpRedirectState{Proto: syscall.IPPROTO_TCP, Cookie: 1<<63 | 12345}
	if err := d.objs.FwpSockRedirect.Put(st.Cookie, &st); err != nil {
		t.Fatal(err)
	}
	if err := d.objs.FwpTupleRedirect.Put(&k, &st); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.objs.FwpSockRedirect.Delete(st.Cookie)
		d.objs.FwpTupleRedirect.Delete(&k)
	})
	if _, err := d.SweepReleased(); err != nil {
		t.Fatal(err)
	}
	if n, _ := tupleRecords(t, d, 24715); n != 1 {
		t.Fatal("a record whose client is open was swept")
	}
	if err := d.objs.FwpSockRedirect.Delete(st.Cookie); err != nil { // the client closes
		t.Fatal(err)
	}
	if _, err := d.SweepReleased(); err != nil {
		t.Fatal(err)
	}
	if n, _ := tupleRecords(t, d, 24715); n != 0 {
		t.Fatal("a record whose client closed, never accepted, outlived the grace")
	}
}

// A sweep (or a query) that found a UDP record expired deletes it only if
// it is still that record: a new flow reusing the 4-tuple since then wrote
// its own, which stays (TestE2EKernelSoak once lost a DNS flow so).
func TestDeleteIfExpiredKeepsNewFlow(t *testing.T) {
	d, _ := kernelSetup(t)
	r := d.redirects()
	k := fwpTupleKey{ClientPort: 3, ProxyPort: 24714}
	copy(k.Client[:], []byte{192, 0, 2, 3})
	copy(k.Proxy[:], []byte{192, 0, 2, 4})
	t.Cleanup(func() { d.objs.FwpTupleRedirect.Delete(&k) })
	old := fwpRedirectState{Proto: syscall.IPPROTO_UDP, Cookie: 1<<62 | 1, Released: 1} // closed long ago
	fresh := fwpRedirectState{Proto: syscall.IPPROTO_UDP, Cookie: 1<<62 | 2}            // open
	// The sweep saw old; a new flow replaced it before the delete.
	if err := d.objs.FwpTupleRedirect.Put(&k, &fresh); err != nil {
		t.Fatal(err)
	}
	if r.deleteIfExpired(k, old.Cookie) {
		t.Fatal("the new flow's record was deleted")
	}
	if n, _ := tupleRecords(t, d, 24714); n != 1 {
		t.Fatal("the new flow's record is gone")
	}
	// Still the old one: deleted.
	if err := d.objs.FwpTupleRedirect.Put(&k, &old); err != nil {
		t.Fatal(err)
	}
	if !r.deleteIfExpired(k, old.Cookie) {
		t.Fatal("the expired record was kept")
	}
}

// A connection redirected at CONNECT_REDIRECT whose proxy address
// AUTH_CONNECT blocks is refused, and its record ends there: counted
// made and released (fwp_kernel_redirect_records_total), none left.
func TestRedirectThenBlockEndsRecord(t *testing.T) {
	d, cg := kernelSetup(t)
	proxy := netip.MustParseAddrPort("127.0.0.1:24731")
	e := buildEngine(t, func(tx *engine.Txn) error {
		if _, err := addRedirect(tx, false, 24730, proxy, nil); err != nil {
			return err
		}
		_, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
			engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(proxy.Port())}))
		return err
	})
	apply(t, d, e)
	rc0, err := d.RedirectRecordCounts()
	if err != nil {
		t.Fatal(err)
	}
	socks0 := mapEntries(t, d.objs.FwpSockRedirect)
	h := testutil.StartHelper(t, cg, "probe")
	const n = 5
	ops := make([]probeOp, n)
	for i := range ops {
		ops[i] = probeOp{Net: "tcp4", Remote: "127.0.0.1:24730"}
	}
	for i, got := range probe(t, h, ops) {
		if got != "eperm" {
			t.Errorf("connect %d: %s, want eperm (the proxy's address is blocked)", i, got)
		}
	}
	rc, err := d.RedirectRecordCounts()
	if err != nil {
		t.Fatal(err)
	}
	if made, rel := rc.Made-rc0.Made, rc.Released-rc0.Released; made != n || rel != n {
		t.Errorf("records made %d, released %d; want %d each", made, rel, n)
	}
	if socks := mapEntries(t, d.objs.FwpSockRedirect); socks != socks0 {
		t.Errorf("fwp_sock_redirect: %d entries, %d before", socks, socks0)
	}
}
