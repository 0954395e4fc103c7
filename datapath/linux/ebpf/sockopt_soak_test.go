//go:build linux

package ebpf

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"

	"fwp/internal/testutil"
	"fwp/internal/unix"
	"fwp/proxy"
)

func init() {
	testutil.RegisterHelper("sockoptsoak", sockoptSoakHelper)
}

type sockoptSoakResult struct {
	Connections, Gets, Sets int
}

func rawGetsockopt(fd uintptr, opt int, b []byte) (int, syscall.Errno) {
	l := uint32(len(b))
	_, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, proxy.SolFWP, uintptr(opt), uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)), 0)
	return int(l), e
}

func rawSetsockopt(fd uintptr, b []byte) syscall.Errno {
	_, _, e := syscall.Syscall6(syscall.SYS_SETSOCKOPT, fd, proxy.SolFWP, proxy.SoFWPRedirectRecords, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), 0)
	return e
}

// sockoptSoakHelper (args: origin, proxy, handle, connections; the
// fwp_sock_records map as fd 3) makes redirected connections to itself
// and, per connection, asks the socket options 16 times on the accepted
// socket and sets records 4 times on an outbound socket (the last set
// wins: checked in the map after its connect), which then reaches the
// origin without a loop. Every socket closes with a reset (no TIME_WAIT
// to run out of ports).
func sockoptSoakHelper(args []string) error {
	origin, proxyAddr := netip.MustParseAddrPort(args[0]), netip.MustParseAddrPort(args[1])
	h, _ := strconv.ParseUint(args[2], 10, 32)
	n, _ := strconv.Atoi(args[3])
	recordsMap, err := ebpf.NewMapFromFD(3)
	if err != nil {
		return err
	}
	ol, err := net.Listen("tcp", origin.String())
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := ol.Accept()
			if err != nil {
				return
			}
			go func() {
				// Answer, then wait for the client's reset: a reset from
				// here could beat the client's connect to its socket
				// error.
				c.Write([]byte{'o'})
				io.Copy(io.Discard, c)
				c.Close()
			}()
		}
	}()
	pl, err := net.Listen("tcp", proxyAddr.String())
	if err != nil {
		return err
	}
	wantRecords := EncodeRecords([]uint32{uint32(h)})
	var res sockoptSoakResult
	buf := make([]byte, 128)
	for i := range n {
		c, err := net.Dial("tcp", origin.String())
		if err != nil {
			return fmt.Errorf("#%d: dial: %w", i, err)
		}
		c.(*net.TCPConn).SetLinger(0)
		a, err := pl.Accept()
		if err != nil {
			return err
		}
		a.(*net.TCPConn).SetLinger(0)
		raw, _ := a.(*net.TCPConn).SyscallConn()
		var qerr error
		raw.Control(func(fd uintptr) {
			for q := range 16 {
				opt := 1 + q%3
				l, e := rawGetsockopt(fd, opt, buf)
				res.Gets++
				var ok bool
				switch opt {
				case proxy.SoFWPRedirectRecords:
					ok = e == 0 && bytes.Equal(buf[:l], wantRecords)
				case proxy.SoFWPRedirectContext:
					ok = e == 0 && string(buf[:l]) == "secret"
				default:
					ok = e == 0 && l == 16 && bytes.Equal(buf[4:8], origin.Addr().AsSlice())
				}
				if !ok {
					qerr = fmt.Errorf("#%d: getsockopt %d: %v, %d bytes %x", i, opt, e, l, buf[:max(l, 0)])
					return
				}
			}
		})
		if qerr != nil {
			return qerr
		}
		var cookie uint64
		final := EncodeRecords([]uint32{uint32(i%1000 + 1), uint32(h)})
		d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			rc.Control(func(fd uintptr) {
				for s, recs := range [][]byte{wantRecords, EncodeRecords([]uint32{9, uint32(h)}), wantRecords, final} {
					res.Sets++
					if e := rawSetsockopt(fd, recs); e != 0 {
						serr = fmt.Errorf("#%d: setsockopt %d: %v", i, s, e)
						return
					}
				}
				cookie, serr = unix.SocketCookie(int(fd))
			})
			return serr
		}}
		out, err := d.Dial("tcp", origin.String())
		if err != nil {
			return fmt.Errorf("#%d: outbound: %w", i, err)
		}
		out.(*net.TCPConn).SetLinger(0)
		var rec fwpRecords
		if err := recordsMap.Lookup(cookie, &rec); err != nil {
			return fmt.Errorf("#%d: the outbound socket's records: %w", i, err)
		}
		if got := EncodeRecords(rec.Handles[:rec.N]); !bytes.Equal(got, final) {
			return fmt.Errorf("#%d: records %x after four setsockopts, want the last, %x", i, got, final)
		}
		b := make([]byte, 1)
		out.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := out.Read(b); err != nil || b[0] != 'o' {
			return fmt.Errorf("#%d: the outbound connection did not reach the origin (%q, %v): looped?", i, b, err)
		}
		out.Close()
		a.Close()
		c.Close()
		res.Connections++
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

func mapLen(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	n := 0
	it := m.Iterate()
	var k, v []byte
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

func fdCount(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestKernelSockoptSoak: 100,000 socket-option queries and sets over
// 5,000 redirected connections in one datapath lifetime; the per-socket
// maps return to their size and the datapath's process holds no more
// file descriptors or goroutines.
func TestKernelSockoptSoak(t *testing.T) {
	d, cg := kernelSetup(t)
	origin, proxyAddr := netip.MustParseAddrPort("127.0.0.1:18280"), netip.MustParseAddrPort("127.0.0.1:18281")
	e, co := sockoptPolicy(t, false, origin.Port(), proxyAddr, 77, []byte("secret")...)
	apply(t, d, e)
	maps := map[string]*ebpf.Map{"fwp_sock_records": d.objs.FwpSockRecords, "fwp_sock_redirect": d.objs.FwpSockRedirect,
		"fwp_tuple_redirect": d.objs.FwpTupleRedirect, "fwp_udp_key": d.objs.FwpUdpKey, "fwp_targets": d.objs.FwpTargets}
	before := map[string]int{}
	for name, m := range maps {
		before[name] = mapLen(t, m)
	}
	records := mapFile(t, d.objs.FwpSockRecords)
	fds, gs := fdCount(t), runtime.NumGoroutine()
	const conns = 5000
	start := time.Now()
	out, err := testutil.RunHelperFiles(cg, "sockoptsoak", nil, []*os.File{records},
		origin.String(), proxyAddr.String(), fmt.Sprint(uint32(co)), strconv.Itoa(conns))
	if err != nil {
		t.Fatal(err)
	}
	var res sockoptSoakResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Logf("%+v in %v", res, time.Since(start).Round(time.Millisecond))
	if res.Connections != conns || res.Gets+res.Sets < 100_000 {
		t.Fatalf("%+v: want %d connections and at least 100,000 queries", res, conns)
	}
	for name, m := range maps {
		if n := mapLen(t, m); n != before[name] {
			t.Errorf("%s: %d entries after the soak, %d before", name, n, before[name])
		}
	}
	if n := fdCount(t); n > fds {
		t.Errorf("%d file descriptors after the soak, %d before", n, fds)
	}
	if n := runtime.NumGoroutine(); n > gs+2 {
		t.Errorf("%d goroutines after the soak, %d before", n, gs)
	}
}

func init() {
	testutil.RegisterHelper("sockoptfuzz", sockoptFuzzHelper)
}

// wellFormedRecords is the setsockopt hook's rule for records, in Go.
func wellFormedRecords(b []byte) bool {
	return len(b) >= 8 && len(b) <= 4+4*maxRecords && len(b)%4 == 0 && string(b[:4]) == "fwpk"
}

// sockoptFuzzHelper gives the setsockopt hook args[0] random values (as
// root: only the format decides) and reports the first disagreement with
// wellFormedRecords.
func sockoptFuzzHelper(args []string) error {
	n, _ := strconv.Atoi(args[0])
	r := rand.New(rand.NewPCG(uint64(n), 11))
	s, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(s)
	for i := range n {
		b := make([]byte, r.IntN(48)+1)
		for j := range b {
			b[j] = byte(r.Uint32())
		}
		if r.IntN(2) == 0 && len(b) >= 4 {
			copy(b, "fwpk") // half of them look like records
		}
		e := rawSetsockopt(uintptr(s), b)
		if ok := e == 0; ok != wellFormedRecords(b) || (!ok && e != syscall.EINVAL) {
			return fmt.Errorf("#%d: setsockopt of %x: %v, want accepted=%v", i, b, e, wellFormedRecords(b))
		}
	}
	return nil
}

// TestKernelSetsockoptRandomRecords: the BPF setsockopt hook parses what
// any local process hands it; random values are accepted exactly when
// well formed, and refused with EINVAL otherwise.
func TestKernelSetsockoptRandomRecords(t *testing.T) {
	d, cg := kernelSetup(t)
	e, _ := sockoptPolicy(t, false, 18380, netip.MustParseAddrPort("127.0.0.1:18381"), 77)
	apply(t, d, e)
	if _, err := testutil.RunHelperFiles(cg, "sockoptfuzz", nil, nil, "20000"); err != nil {
		t.Fatal(err)
	}
}
