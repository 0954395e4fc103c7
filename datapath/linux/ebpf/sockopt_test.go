//go:build linux

package ebpf

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"fwp/engine"
	"fwp/internal/testutil"
	"fwp/internal/unix"
	"fwp/proxy"
)

func init() {
	testutil.RegisterHelper("sockoptproxy", sockoptProxyHelper)
	testutil.RegisterHelper("sockoptclient", sockoptClientHelper)
}

// sockoptResult is what the socket-option proxy helper saw.
type sockoptResult struct {
	OrigDst    string   `json:"orig_dst"`    // SO_ORIGINAL_DST, as iptables REDIRECT proxies ask
	Query      string   `json:"query"`       // proxy.QueryKernelRedirect: "" or an error class
	Records    string   `json:"records"`     // hex
	Context    string   `json:"context"`     // the redirect's context
	Orig       string   `json:"orig"`        // FWP_SO_ORIGINAL_DST
	SmallBuf   string   `json:"small_buf"`   // getsockopt of the records into 4 bytes
	SmallQuery string   `json:"small_query"` // FWP_SO_REDIRECT_QUERY into one byte too few
	Each       string   `json:"each"`        // records|context|original asked one option at a time
	Set        string   `json:"set"`         // the outbound dial with records: "" or an error class
	Reply      string   `json:"reply"`       // what the outbound connection answered
	Direct     string   `json:"direct"`      // a connection to the proxy that no redirect sent
	Client     string   `json:"client"`      // what the client read
	ProxyUID   int      `json:"proxy_uid"`   // the proxy's uid when it asked
	OutboundOK bool     `json:"outbound_ok"` // the outbound connection was made
	BadSets    []string `json:"bad_sets"`    // setsockopt of malformed records
}

func errClass(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, proxy.ErrNotFound):
		return "notfound"
	case errors.Is(err, proxy.ErrAccessDenied):
		return "denied"
	case errors.Is(err, proxy.ErrInvalidArgument):
		return "invalid"
	case errors.Is(err, proxy.ErrNotSupported):
		return "nohook"
	}
	return err.Error()
}

// sockoptProxyHelper is a transparent proxy in its own process (and, for
// some tests, its own cgroup), in a fresh network namespace: args origin,
// proxy address, the client's cgroup, the uid to ask as, and the handle
// to forge records with. It answers "hello" with its pid; at "go" it starts
// the client (in the client's cgroup, this namespace), drops to the uid,
// and serves one redirected connection with the socket options alone.
func sockoptProxyHelper(args []string) error {
	origin, proxyAddr := netip.MustParseAddrPort(args[0]), netip.MustParseAddrPort(args[1])
	clientCg := args[2]
	uid, _ := strconv.Atoi(args[3])
	handle, _ := strconv.ParseUint(args[4], 10, 32)
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
			fmt.Fprintf(c, "origin\n")
			c.Close()
		}
	}()
	pl, err := net.Listen("tcp", proxyAddr.String())
	if err != nil {
		return err
	}
	in := bufio.NewScanner(os.Stdin)
	if !in.Scan() {
		return in.Err()
	}
	fmt.Printf("{\"pid\":%d}\n", os.Getpid())
	if !in.Scan() {
		return in.Err()
	}
	dir, err := os.Open(clientCg)
	if err != nil {
		return err
	}
	client := exec.Command(os.Args[0], origin.String())
	client.Env = append(os.Environ(), testutil.HelperEnv("sockoptclient")...)
	client.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd()), Pdeathsig: syscall.SIGKILL}
	var clientOut strings.Builder
	client.Stdout, client.Stderr = &clientOut, os.Stderr
	if err := client.Start(); err != nil {
		return err
	}
	dir.Close()
	if uid != 0 {
		if err := syscall.Setgroups(nil); err != nil {
			return err
		}
		if err := syscall.Setgid(uid); err != nil {
			return err
		}
		if err := syscall.Setuid(uid); err != nil {
			return err
		}
	}
	res := sockoptResult{ProxyUID: os.Getuid()}
	pl.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	c, err := pl.Accept()
	if err != nil {
		return fmt.Errorf("accept: %w", err)
	}
	// Later connections to the proxy: a redirected one is a loop, the
	// others were not redirected and must find no record.
	go func() {
		for {
			c, err := pl.Accept()
			if err != nil {
				return
			}
			if _, _, err := proxy.QueryKernelRedirect(c); err == nil || errors.Is(err, proxy.ErrAccessDenied) {
				fmt.Fprintf(c, "loop\n")
			} else {
				fmt.Fprintf(c, "direct:%s\n", errClass(err))
			}
			c.Close()
		}
	}()
	raw, _ := c.(*net.TCPConn).SyscallConn()
	raw.Control(func(fd uintptr) {
		if od, err := unix.OriginalDst(int(fd), origin.Addr().Is6()); err == nil {
			res.OrigDst = netip.AddrPortFrom(od.Addr().Unmap(), od.Port()).String()
		} else {
			res.OrigDst = err.Error()
		}
	})
	r, orig, err := proxy.QueryKernelRedirect(c)
	res.Query, res.Records, res.Context = errClass(err), hex.EncodeToString(r.Records), string(r.Context)
	if orig.IsValid() {
		res.Orig = orig.String()
	}
	recs := r.Records
	if err != nil {
		recs = EncodeRecords([]uint32{uint32(handle)}) // forged: the handle the test names
	}
	raw.Control(func(fd uintptr) {
		var b [4]byte
		l := uint32(len(b))
		_, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, proxy.SolFWP, proxy.SoFWPRedirectRecords, uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)), 0)
		res.SmallBuf = e.Error()
		q := make([]byte, proxy.KernelQuerySize-1)
		l = uint32(len(q))
		_, _, e = syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, proxy.SolFWP, proxy.SoFWPRedirectQuery, uintptr(unsafe.Pointer(&q[0])), uintptr(unsafe.Pointer(&l)), 0)
		res.SmallQuery = e.Error()
		// The three options one by one answer what the one query did.
		get := func(opt, size int) ([]byte, syscall.Errno) {
			b := make([]byte, size)
			l := uint32(size)
			_, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, proxy.SolFWP, uintptr(opt), uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)), 0)
			return b[:min(l, uint32(size))], e
		}
		recs, e1 := get(proxy.SoFWPRedirectRecords, proxy.KernelRecordsMax)
		ctx, e2 := get(proxy.SoFWPRedirectContext, proxy.KernelContextMax)
		sa, e3 := get(proxy.SoFWPOriginalDst, 28)
		var o netip.AddrPort
		if e3 == 0 && len(sa) >= 8 && binary.NativeEndian.Uint16(sa) == syscall.AF_INET {
			o = netip.AddrPortFrom(netip.AddrFrom4([4]byte(sa[4:8])), binary.BigEndian.Uint16(sa[2:4]))
		} else if e3 == 0 && len(sa) >= 24 {
			o = netip.AddrPortFrom(netip.AddrFrom16([16]byte(sa[8:24])), binary.BigEndian.Uint16(sa[2:4]))
		}
		if e2 == syscall.ENODATA {
			ctx, e2 = []byte(o.String()), 0
		}
		if e1 == 0 && e2 == 0 && e3 == 0 {
			res.Each = hex.EncodeToString(recs) + "|" + string(ctx) + "|" + o.String()
		} else {
			res.Each = fmt.Sprint(e1, e2, e3)
		}
	})
	// Malformed records: too short, not the kernel's, too long.
	if s, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0); err == nil {
		for _, b := range [][]byte{make([]byte, 6), []byte("xxxx\x01\x00\x00\x00"), append([]byte("fwpk"), make([]byte, 36)...)} {
			_, _, e := syscall.Syscall6(syscall.SYS_SETSOCKOPT, uintptr(s), proxy.SolFWP, proxy.SoFWPRedirectRecords, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), 0)
			res.BadSets = append(res.BadSets, e.Error())
		}
		syscall.Close(s)
	}
	d := &net.Dialer{Timeout: 2 * time.Second}
	reply := "none"
	err = proxy.SetRedirectRecords(d, recs)
	var out net.Conn
	if err == nil {
		out, err = d.Dial("tcp", origin.String())
	}
	res.Set = errClass(err)
	if err != nil {
		// Refused: what a dial without records reaches.
		out, err = net.DialTimeout("tcp", origin.String(), 2*time.Second)
	} else {
		res.OutboundOK = true
	}
	if err == nil {
		out.SetDeadline(time.Now().Add(5 * time.Second))
		reply, _ = bufio.NewReader(out).ReadString('\n')
		out.Close()
	}
	res.Reply = reply
	fmt.Fprintf(c, "proxy:%s", reply)
	c.Close()
	if dc, err := net.DialTimeout("tcp", proxyAddr.String(), 2*time.Second); err == nil {
		dc.SetDeadline(time.Now().Add(5 * time.Second))
		res.Direct, _ = bufio.NewReader(dc).ReadString('\n')
		dc.Close()
	}
	if err := client.Wait(); err != nil {
		return fmt.Errorf("client: %w", err)
	}
	res.Client = clientOut.String()
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return err
	}
	in.Scan() // until the test closes stdin
	return nil
}

// sockoptClientHelper dials args[0] and prints the line it reads.
func sockoptClientHelper(args []string) error {
	c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	fmt.Print(line)
	return err
}

// sockoptPolicy redirects connects to originPort to the proxy, naming
// target as the redirect's target process.
func sockoptPolicy(t testing.TB, v6 bool, originPort uint16, proxyAddr netip.AddrPort, target uint32, ctxBytes ...byte) (*engine.Engine, engine.CalloutID) {
	var co engine.CalloutID
	e := buildEngine(t, func(tx *engine.Txn) error {
		layer := engine.LayerFor(engine.KindConnectRedirect, v6)
		var err error
		if co, err = tx.AddCallout(engine.Callout{Key: BuiltinConnectRedirectKey + "/sockopt", Layer: layer}); err != nil {
			return err
		}
		data, err := RedirectConfig{Proxy: proxyAddr, TargetPID: target, Context: ctxBytes}.Marshal()
		if err != nil {
			return err
		}
		pc, err := tx.AddProviderContext(engine.ProviderContext{Data: data})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Layer: layer, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}, ProviderContext: pc,
			Conditions: []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(originPort)}}})
		return err
	})
	return e, co
}

// TestKernelSockoptProxyAPI runs a transparent proxy that uses only the
// socket options (no maps, no fwpd): as root, as the redirect's target
// process without privileges, and as an unprivileged process that is not
// the target (refused, and its connection cannot escape the redirect);
// in the client's cgroup, and in a cgroup of its own that the proxy hooks
// reach through the target's pid or AttachProxy (and do not reach
// without them: the failure of issue 16 item 7).
func TestKernelSockoptProxyAPI(t *testing.T) {
	d, cg := kernelSetup(t)
	const nobody = 65534
	for _, c := range []struct {
		name        string
		v6          bool
		ownCgroup   bool // the proxy runs in a cgroup of its own
		attachProxy bool // ... which AttachProxy names
		uid         int
		target      string // "self", "other" or "none"
		noContext   bool   // the redirect sets no context: the original destination stands for it
		want        sockoptResult
	}{
		{name: "root", uid: 0, target: "other", want: sockoptResult{Query: "", Set: "", Reply: "origin\n", Direct: "direct:notfound\n", OutboundOK: true}},
		{name: "target", uid: nobody, target: "self", want: sockoptResult{Query: "", Set: "", Reply: "origin\n", Direct: "direct:notfound\n", OutboundOK: true}},
		{name: "target-no-context", uid: nobody, target: "self", noContext: true, want: sockoptResult{Query: "", Set: "", Reply: "origin\n", Direct: "direct:notfound\n", OutboundOK: true}},
		{name: "target-v6", v6: true, uid: nobody, target: "self", want: sockoptResult{Query: "", Set: "", Reply: "origin\n", Direct: "direct:notfound\n", OutboundOK: true}},
		// Not the target: no answer, no records, and the connection it
		// makes is redirected back to the proxy (no escape).
		{name: "not-target", uid: nobody, target: "other", want: sockoptResult{Query: "denied", Set: "denied", Reply: "loop\n", Direct: "direct:notfound\n"}},
		{name: "no-target-named", uid: nobody, target: "none", want: sockoptResult{Query: "denied", Set: "denied", Reply: "loop\n", Direct: "direct:notfound\n"}},
		// Elsewhere: the target's cgroup gets the proxy hooks at Apply.
		{name: "own-cgroup-target", ownCgroup: true, uid: nobody, target: "self", want: sockoptResult{Query: "", Set: "", Reply: "origin\n", Direct: "direct:notfound\n", OutboundOK: true}},
		{name: "own-cgroup-attached", ownCgroup: true, attachProxy: true, uid: 0, target: "none", want: sockoptResult{Query: "", Set: "", Reply: "origin\n", Direct: "direct:notfound\n", OutboundOK: true}},
		// Neither: no hook sees the proxy's sockets.
		{name: "own-cgroup-unreached", ownCgroup: true, uid: 0, target: "none", want: sockoptResult{Query: "nohook", Set: "nohook", Reply: "origin\n", Direct: "direct:nohook\n"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			origin, proxyAddr := netip.MustParseAddrPort("127.0.0.1:18180"), netip.MustParseAddrPort("127.0.0.1:18181")
			if c.v6 {
				origin, proxyAddr = netip.MustParseAddrPort("[::1]:18180"), netip.MustParseAddrPort("[::1]:18181")
			}
			pcg := cg
			if c.ownCgroup {
				pcg = testutil.NewCgroup(t)
				t.Cleanup(func() { d.Detach(pcg.Path) })
				if c.attachProxy {
					if err := d.AttachProxy(pcg.Path); err != nil {
						t.Fatal(err)
					}
				}
			}
			// The handle a forging proxy names: the next callout ID the
			// policy will get is not known before it is built, so build
			// it first with a placeholder target.
			ctxBytes := []byte("secret")
			if c.noContext {
				ctxBytes = nil
			}
			_, co := sockoptPolicy(t, c.v6, origin.Port(), proxyAddr, 0, ctxBytes...)
			h := testutil.StartHelper(t, pcg, "sockoptproxy", origin.String(), proxyAddr.String(), cg.Path, strconv.Itoa(c.uid), fmt.Sprint(uint32(co)))
			ans, err := h.Call([]byte("hello"))
			if err != nil {
				t.Fatal(err)
			}
			var hello struct{ PID uint32 }
			if err := json.Unmarshal(ans, &hello); err != nil {
				t.Fatalf("%v: %s", err, ans)
			}
			target := map[string]uint32{"self": hello.PID, "other": 77, "none": 0}[c.target]
			e, co2 := sockoptPolicy(t, c.v6, origin.Port(), proxyAddr, target, ctxBytes...)
			if co2 != co {
				t.Fatalf("callout IDs differ between builds: %d, %d", co, co2)
			}
			apply(t, d, e)
			if c.ownCgroup && c.target == "self" {
				found := false
				for _, p := range d.ProxyCgroups() {
					found = found || p == pcg.Path
				}
				if !found {
					t.Errorf("the target's cgroup %s did not get the proxy hooks: %v", pcg.Path, d.ProxyCgroups())
				}
			}
			ans, err = h.Call([]byte("go"))
			if err != nil {
				t.Fatal(err)
			}
			var res sockoptResult
			if err := json.Unmarshal(ans, &res); err != nil {
				t.Fatalf("%v: %s", err, ans)
			}
			t.Logf("%+v", res)
			if res.ProxyUID != c.uid {
				t.Fatalf("the proxy asked as uid %d, want %d", res.ProxyUID, c.uid)
			}
			w := c.want
			if res.Query != w.Query || res.Set != w.Set || res.Reply != w.Reply || res.Direct != w.Direct || res.OutboundOK != w.OutboundOK {
				t.Errorf("query %q set %q reply %q direct %q outbound %v; want %q %q %q %q %v",
					res.Query, res.Set, res.Reply, res.Direct, res.OutboundOK, w.Query, w.Set, w.Reply, w.Direct, w.OutboundOK)
			}
			if res.Client != "proxy:"+w.Reply {
				t.Errorf("client read %q, want %q", res.Client, "proxy:"+w.Reply)
			}
			// SO_ORIGINAL_DST answers whoever holds the socket, as
			// netfilter's does, wherever the hooks reach.
			unreached := c.ownCgroup && !c.attachProxy && c.target != "self"
			if (res.OrigDst == origin.String()) == unreached {
				t.Errorf("SO_ORIGINAL_DST %q (hooks reach the proxy: %v), want %s", res.OrigDst, !unreached, origin)
			}
			for i, e := range res.BadSets {
				if want := syscall.EINVAL.Error(); !unreached && e != want {
					t.Errorf("malformed records #%d: %q, want %q", i, e, want)
				}
			}
			if len(res.BadSets) != 3 {
				t.Errorf("malformed records: %q", res.BadSets)
			}
			if w.Query == "" {
				if want := hex.EncodeToString(EncodeRecords([]uint32{uint32(co)})); res.Records != want {
					t.Errorf("records %s, want %s", res.Records, want)
				}
				wantCtx := "secret"
				if c.noContext {
					wantCtx = origin.String()
				}
				if res.Context != wantCtx || res.Orig != origin.String() {
					t.Errorf("context %q original %q, want %q and %s", res.Context, res.Orig, wantCtx, origin)
				}
				if res.SmallBuf != syscall.EINVAL.Error() || res.SmallQuery != syscall.EINVAL.Error() {
					t.Errorf("records into 4 bytes: %q, the query into %d: %q; want EINVAL", res.SmallBuf, proxy.KernelQuerySize-1, res.SmallQuery)
				}
				if want := res.Records + "|" + res.Context + "|" + res.Orig; res.Each != want {
					t.Errorf("one option at a time: %q; FWP_SO_REDIRECT_QUERY: %q", res.Each, want)
				}
			}
		})
	}
}
