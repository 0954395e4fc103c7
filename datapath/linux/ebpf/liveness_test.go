//go:build linux

package ebpf

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func socketCookie(t *testing.T, c syscall.Conn) uint64 {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var cookie uint64
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return cookie
}

// udpInNamedNetns binds a UDP socket on 127.0.0.1 inside a new network
// namespace named under /run/netns (no process in it): the sweep must walk
// it by its name.
func udpInNamedNetns(t *testing.T) *net.UDPConn {
	t.Helper()
	b := make([]byte, 4)
	rand.Read(b)
	name := "fwpsweep" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	ns, err := os.Open("/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	var c *net.UDPConn
	// A socket takes the namespace of the thread that makes it.
	err = inNetns(ns, func() error {
		var err error
		c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4zero})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestSweepDeadKeepsLiveSockets: per-socket state of sockets that exist —
// in the test's namespace and in a namespace held only by its name — stays
// through any number of sweeps; state of a closed socket and of a cookie
// no socket ever had is deleted at the second sweep that finds no socket,
// never at the first; a redirect's 4-tuple record goes with its socket's.
func TestSweepDeadKeepsLiveSockets(t *testing.T) {
	d, _ := reauthSetup(t)

	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conn, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	udp, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	other := udpInNamedNetns(t)
	closed, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}

	liveTCP := socketCookie(t, conn.(*net.TCPConn))
	liveUDP := socketCookie(t, udp)
	liveOther := socketCookie(t, other)
	dead := socketCookie(t, closed)
	closed.Close()
	never := uint64(1) << 62 // cookies count from 1: never reached

	rec := fwpRecords{N: 1}
	rec.Handles[0] = 7
	for _, c := range []uint64{liveTCP, liveUDP, liveOther, dead, never} {
		if err := d.objs.FwpSockRecords.Put(c, rec); err != nil {
			t.Fatal(err)
		}
	}
	// The dead socket was a redirected UDP client: by cookie, its 4-tuple
	// key, and the 4-tuple's record.
	var tk fwpTupleKey
	tk.ClientPort, tk.ProxyPort = 40001, 53
	st := fwpRedirectState{Cookie: dead, Proto: syscall.IPPROTO_UDP}
	if err := d.objs.FwpSockRedirect.Put(dead, st); err != nil {
		t.Fatal(err)
	}
	if err := d.objs.FwpUdpKey.Put(dead, tk); err != nil {
		t.Fatal(err)
	}
	if err := d.objs.FwpTupleRedirect.Put(tk, st); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, c := range []uint64{liveTCP, liveUDP, liveOther, dead, never} {
			d.objs.FwpSockRecords.Delete(c)
		}
	})
	before, err := d.RedirectRecordCounts()
	if err != nil {
		t.Fatal(err)
	}

	flows := []uint64{liveTCP, dead}
	present := func(c uint64) bool {
		var r fwpRecords
		return d.objs.FwpSockRecords.Lookup(c, &r) == nil
	}

	first, err := d.SweepDead(flows)
	if err != nil {
		t.Fatal(err)
	}
	if len(first.Flows) != 0 || !present(dead) || !present(never) {
		t.Fatalf("first sweep deleted before a second look: %+v", first)
	}
	if first.Namespaces < 2 {
		t.Fatalf("walked %d namespaces, want the test's and the named one", first.Namespaces)
	}
	second, err := d.SweepDead(flows)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(second.Flows, []uint64{dead}) {
		t.Fatalf("dead flows %v, want [%d]", second.Flows, dead)
	}
	for _, c := range []uint64{liveTCP, liveUDP, liveOther} {
		if !present(c) {
			t.Fatalf("state of live socket %d swept (%+v)", c, second)
		}
	}
	if present(dead) || present(never) {
		t.Fatalf("state of dead sockets kept: %+v", second)
	}
	var s fwpRedirectState
	if d.objs.FwpSockRedirect.Lookup(dead, &s) == nil || d.objs.FwpTupleRedirect.Lookup(tk, &s) == nil || d.objs.FwpUdpKey.Lookup(dead, &tk) == nil {
		t.Fatal("the dead socket's redirect records kept")
	}
	after, err := d.RedirectRecordCounts()
	if err != nil {
		t.Fatal(err)
	}
	if after.Swept-before.Swept != 1 {
		t.Fatalf("swept redirect records %d, want 1", after.Swept-before.Swept)
	}
	// Further sweeps keep the live ones.
	for range 2 {
		if _, err := d.SweepDead(flows); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []uint64{liveTCP, liveUDP, liveOther} {
		if !present(c) {
			t.Fatalf("state of live socket %d swept by a later sweep", c)
		}
	}
}

// TestSweepDeadSoak: 100,000 sockets' state left behind (cookies no socket
// has, as a release that never ran leaves them), in rounds, and 100,000
// flow handles: every one swept at its second sweep, while a live
// socket's state stays; afterwards no map entry, fd, goroutine or
// remembered cookie is left.
func TestSweepDeadSoak(t *testing.T) {
	d, _ := reauthSetup(t)
	udp, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	live := socketCookie(t, udp)
	rec := fwpRecords{N: 1}
	if err := d.objs.FwpSockRecords.Put(live, rec); err != nil {
		t.Fatal(err)
	}
	defer d.objs.FwpSockRecords.Delete(live)
	// Settle: what earlier tests left is swept first.
	for range 2 {
		if _, err := d.SweepDead(nil); err != nil {
			t.Fatal(err)
		}
	}
	base := mapEntries(t, d.objs.FwpSockRecords)
	fds, gs := countFDs(), runtime.NumGoroutine()
	const total, round = 100_000, 20_000
	next := uint64(1)<<62 + 1
	swept, flows := 0, 0
	for done := 0; done < total; done += round {
		var handles []uint64
		for i := range round {
			c := next + uint64(i)
			if err := d.objs.FwpSockRecords.Put(c, rec); err != nil {
				t.Fatal(err)
			}
			handles = append(handles, c)
		}
		next += round
		for range 2 {
			res, err := d.SweepDead(append(handles, live))
			if err != nil {
				t.Fatal(err)
			}
			swept += res.Records
			flows += len(res.Flows)
		}
	}
	if swept != total || flows != total {
		t.Fatalf("swept %d sockets' state and %d flows, want %d each", swept, flows, total)
	}
	var r fwpRecords
	if d.objs.FwpSockRecords.Lookup(live, &r) != nil {
		t.Fatal("a live socket's state was swept")
	}
	if n := mapEntries(t, d.objs.FwpSockRecords); n != base {
		t.Errorf("fwp_sock_records: %d entries after, %d before", n, base)
	}
	if n := len(d.reauth.dead); n != 0 {
		t.Errorf("the sweep remembers %d dead cookies", n)
	}
	if n := countFDs(); n > fds {
		t.Errorf("fds grew from %d to %d", fds, n)
	}
	time.Sleep(50 * time.Millisecond) // inNetns's goroutines end after answering
	if n := runtime.NumGoroutine(); n > gs+2 {
		t.Errorf("goroutines grew from %d to %d", gs, n)
	}
}

// TestCalloutFlowDecidedKeepsNewSocket: the verdict noted on a callout
// flow's 4-tuple record lands only while the record is still that
// socket's; a new socket's record on the same 4-tuple (written by its
// connect hook before the note) keeps no verdict, so its SYN is
// classified, not answered with the old flow's verdict.
func TestCalloutFlowDecidedKeepsNewSocket(t *testing.T) {
	d, _ := kernelSetup(t)
	var k fwpFlowKey
	k.LocalPort, k.RemotePort = 40123, 8080
	k.Local[0], k.Remote[0] = 127, 127
	old := fwpCalloutFlow{Cookie: 1<<62 + 7, Indexed: 1, Key: k}
	fresh := fwpCalloutFlow{Cookie: 1<<62 + 8, Indexed: 1, Key: k}
	t.Cleanup(func() { d.objs.FwpCalloutTuples.Delete(&k) })

	if err := d.objs.FwpCalloutTuples.Put(&k, &old); err != nil {
		t.Fatal(err)
	}
	if err := d.CalloutFlowDecided(CalloutFlow{raw: old}, VerdictPermit); err != nil {
		t.Fatal(err)
	}
	var got fwpCalloutFlow
	if err := d.objs.FwpCalloutTuples.Lookup(&k, &got); err != nil || got.Verdict != VerdictPermit {
		t.Fatalf("the flow's own record: %+v, %v; want its verdict noted", got, err)
	}
	// The socket closed, a new one took the 4-tuple; the old flow's note
	// comes late.
	if err := d.objs.FwpCalloutTuples.Put(&k, &fresh); err != nil {
		t.Fatal(err)
	}
	if err := d.CalloutFlowDecided(CalloutFlow{raw: old}, VerdictPermit); err != nil {
		t.Fatal(err)
	}
	if err := d.objs.FwpCalloutTuples.Lookup(&k, &got); err != nil || got.Cookie != fresh.Cookie || got.Verdict != 0 {
		t.Fatalf("the new socket's record after the old flow's note: %+v, %v", got, err)
	}
}
