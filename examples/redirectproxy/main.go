package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"fwp/client"
	"fwp/datapath/linux/ebpf"
	"fwp/internal/unix"
	"fwp/proxy"
)

func main() {
	if err := run(os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "redirectproxy:", err)
		os.Exit(1)
	}
}

// finder answers the redirect of a connection the proxy accepted (or of
// datagrams from a client to the proxy's address local) and the
// destination its client asked for.
type finder interface {
	find(c net.Conn) (proxy.Redirect, netip.AddrPort, error)
	findDatagram(local, from netip.AddrPort) (proxy.Redirect, netip.AddrPort, error)
}

// fwpdFinder asks fwpd (any user: fwpd answers the redirect's target pid).
type fwpdFinder struct {
	c       *client.Client
	timeout time.Duration
}

func (f fwpdFinder) find(c net.Conn) (proxy.Redirect, netip.AddrPort, error) {
	local, remote, ok := proxy.ConnTuple(c)
	if !ok {
		return proxy.Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: not a TCP connection", proxy.ErrNotFound)
	}
	return f.findDatagram(local, remote)
}

func (f fwpdFinder) findDatagram(local, from netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
	defer cancel()
	return f.c.QueryRedirect(ctx, local, from)
}

// mapsFinder reads the kernel datapath's pinned maps (root).
type mapsFinder struct{ b ebpf.ProxyBackend }

func (f mapsFinder) find(c net.Conn) (proxy.Redirect, netip.AddrPort, error) {
	local, remote, ok := proxy.ConnTuple(c)
	if !ok {
		return proxy.Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: not a TCP connection", proxy.ErrNotFound)
	}
	return f.b.QueryTuple(local, remote)
}

func (f mapsFinder) findDatagram(local, from netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	return f.b.QueryTuple(local, from)
}

// kernelFinder asks the kernel datapath's socket options first (three
// getsockopt calls on the accepted socket, no round trip to fwpd); when no
// hook answers for the socket (the proxy runs where fwpd's hooks do not
// reach, or an older datapath), next answers, if any. Datagrams on an
// unconnected socket have no socket of their own to ask: next answers.
type kernelFinder struct{ next finder }

func (f kernelFinder) find(c net.Conn) (proxy.Redirect, netip.AddrPort, error) {
	r, orig, err := proxy.QueryKernelRedirect(c)
	if err != nil && errors.Is(err, proxy.ErrNotSupported) && f.next != nil {
		return f.next.find(c)
	}
	return r, orig, err
}

func (f kernelFinder) findDatagram(local, from netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	if f.next == nil {
		return proxy.Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: -sockopt-only answers TCP (and connected UDP) sockets", proxy.ErrNotSupported)
	}
	return f.next.findDatagram(local, from)
}

// originalDstFinder asks getsockopt(SO_ORIGINAL_DST) alone, as a proxy
// written for iptables REDIRECT does (fwp's kernel hooks answer it too):
// no records, no context.
type originalDstFinder struct{}

func (originalDstFinder) find(c net.Conn) (proxy.Redirect, netip.AddrPort, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return proxy.Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: not a TCP connection", proxy.ErrNotFound)
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return proxy.Redirect{}, netip.AddrPort{}, err
	}
	v6 := tc.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Is6() && !tc.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Is4In6()
	var orig netip.AddrPort
	var oerr error
	if err := raw.Control(func(fd uintptr) { orig, oerr = unix.OriginalDst(int(fd), v6) }); err != nil {
		return proxy.Redirect{}, netip.AddrPort{}, err
	}
	if oerr != nil {
		return proxy.Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: %v", proxy.ErrNotFound, oerr)
	}
	return proxy.Redirect{}, netip.AddrPortFrom(orig.Addr().Unmap(), orig.Port()), nil
}

func (originalDstFinder) findDatagram(_, _ netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	return proxy.Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: SO_ORIGINAL_DST answers TCP only", proxy.ErrNotSupported)
}

// fixedFinder sends every connection to one address, without fwp.
type fixedFinder struct{ to netip.AddrPort }

func (f fixedFinder) find(net.Conn) (proxy.Redirect, netip.AddrPort, error) {
	return proxy.Redirect{}, f.to, nil
}

func (f fixedFinder) findDatagram(_, _ netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	return proxy.Redirect{}, f.to, nil
}

type server struct {
	find        finder
	dialTimeout time.Duration
	udpIdle     time.Duration
	udpMax      int
	log         *slog.Logger
	wg          sync.WaitGroup
}

func run(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("redirectproxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:3131", "TCP address to accept redirected connections on (the policy's proxy address)")
	socket := fs.String("socket", client.SocketFromEnv(), "fwpd's socket, asked for each connection's redirect (env FWPD_SOCKET)")
	pins := fs.String("pins", "", "read the kernel datapath's pinned maps in this bpffs directory instead of asking fwpd (root)")
	to := fs.String("to", "", "relay every connection to this address, without fwp (a baseline)")
	dialTimeout := fs.Duration("dial-timeout", 10*time.Second, "timeout of each outbound dial")
	udp := fs.Bool("udp", false, "relay UDP on the -listen address too (redirected datagrams, DNS say)")
	udpIdle := fs.Duration("udp-idle", 60*time.Second, "a UDP client's relay ends after this long without a datagram either way")
	udpMax := fs.Int("udp-max", 4096, "UDP clients relayed at once (each holds a socket); a new client's datagrams beyond it are dropped")
	sockopt := fs.Bool("sockopt", true, "ask the kernel datapath's socket options first (no round trip to fwpd); fwpd or -pins answer when no hook does")
	sockoptOnly := fs.Bool("sockopt-only", false, "ask the kernel datapath's socket options only: no fwpd connection (TCP; records are set with setsockopt)")
	origDst := fs.Bool("original-dst", false, "ask getsockopt(SO_ORIGINAL_DST) alone, as a proxy written for iptables REDIRECT does (a baseline)")
	verbose := fs.Bool("v", false, "log every connection")
	if err := fs.Parse(args); err != nil {
		return err
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	s := &server{dialTimeout: *dialTimeout, log: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))}
	switch {
	case *to != "":
		ap, err := netip.ParseAddrPort(*to)
		if err != nil {
			return fmt.Errorf("-to: %w", err)
		}
		s.find = fixedFinder{ap}
	case *origDst:
		s.find = originalDstFinder{}
	case *sockoptOnly:
		s.find = kernelFinder{}
	case *pins != "":
		r, err := ebpf.OpenRedirects(*pins)
		if err != nil {
			return err
		}
		defer r.Close()
		b := ebpf.ProxyBackend{R: r}
		defer proxy.Register(b)()
		s.find = mapsFinder{b}
	default:
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := client.Dial(ctx, *socket, client.Options{})
		cancel()
		if err != nil {
			return fmt.Errorf("fwpd at %s: %w", *socket, err)
		}
		defer c.Close()
		defer proxy.Register(client.ProxyBackend{C: c})()
		s.find = fwpdFinder{c: c, timeout: 5 * time.Second}
	}
	if *sockopt && *to == "" && !*origDst && !*sockoptOnly {
		s.find = kernelFinder{next: s.find}
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	var pc *net.UDPConn
	if *udp {
		a, err := net.ResolveUDPAddr("udp", *listen)
		if err == nil {
			pc, err = net.ListenUDP("udp", a)
		}
		if err != nil {
			ln.Close()
			return err
		}
		s.udpIdle, s.udpMax = *udpIdle, *udpMax
		s.wg.Add(1)
		go func() { defer s.wg.Done(); s.serveUDP(pc) }()
	}
	s.log.Info("listening", "addr", ln.Addr().String(), "udp", *udp, "pid", os.Getpid())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		ln.Close()
		if pc != nil {
			pc.Close()
		}
	}()
	s.serve(ln)
	// Relays in progress get a moment to finish; the rest end with the
	// process.
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		s.log.Info("exiting with relays in progress")
	}
	return nil
}

// serve accepts until ln is closed. Other accept errors (out of file
// descriptors, say) are logged and retried after a pause that grows up to
// a second, as net/http does, rather than ending the proxy.
func (s *server) serve(ln net.Listener) {
	var pause time.Duration
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed; retrying", "err", err, "in", pause)
			time.Sleep(pause)
			continue
		}
		pause = 0
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			s.handle(c)
		}()
	}
}

// handle relays one accepted connection to the destination its client
// asked for, with the redirect's records on the outbound socket.
func (s *server) handle(c net.Conn) {
	log := s.log.With("client", c.RemoteAddr().String())
	r, orig, err := s.find.find(c)
	if err != nil {
		// Not redirected here (or not ours to ask about): nothing to relay to.
		log.Warn("no redirect for connection", "err", err)
		return
	}
	d := &net.Dialer{Timeout: s.dialTimeout}
	if len(r.Records) > 0 {
		if err := proxy.SetRedirectRecords(d, r.Records); err != nil {
			log.Warn("setting redirect records", "err", err)
			return
		}
	}
	out, err := d.Dial("tcp", orig.String())
	if err != nil {
		log.Warn("dialing original destination", "to", orig.String(), "err", err)
		return
	}
	defer out.Close()
	up, down, err := proxy.Splice(c, out)
	log.Debug("relayed", "to", orig.String(), "up", up, "down", down, "err", err)
}

// serveUDP relays datagrams until pc is closed: each client (source
// address) gets an outbound socket, with its redirect's records set,
// connected to the destination it asked for; the replies go back to the
// client from pc (the kernel datapath shows them as from that destination).
// A client's relay ends after udpIdle without a datagram either way.
func (s *server) serveUDP(pc *net.UDPConn) {
	local := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	var mu sync.Mutex
	clients := map[netip.AddrPort]*udpClient{}
	defer func() {
		mu.Lock()
		for _, c := range clients {
			c.out.Close()
		}
		mu.Unlock()
	}()
	buf := make([]byte, 64<<10)
	for {
		n, from, err := pc.ReadFromUDPAddrPort(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			s.log.Warn("udp read failed", "err", err)
			continue
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		// Touched under the lock its relay ends under: a relay found
		// here is not ended as idle before the write below.
		mu.Lock()
		c, busy := clients[from], len(clients) >= s.udpMax
		if c != nil {
			c.touch()
		}
		mu.Unlock()
		if c == nil {
			if busy {
				s.log.Debug("udp client dropped: -udp-max relays in use", "client", from.String())
				continue
			}
			if c = s.newUDPClient(local, from); c == nil {
				continue // no redirect: dropped
			}
			mu.Lock()
			clients[from] = c
			mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				c.replies(pc, from, s.udpIdle, func(force bool) bool {
					mu.Lock()
					defer mu.Unlock()
					if force || c.idle(s.udpIdle) {
						if clients[from] == c {
							delete(clients, from)
						}
						return true
					}
					return false
				})
			}()
		}
		if _, err := c.out.Write(buf[:n]); err != nil {
			s.log.Debug("udp relay write", "client", from.String(), "err", err)
		}
	}
}

// udpClient is one client's relay.
type udpClient struct {
	out  *net.UDPConn
	last atomic.Int64 // unix nanoseconds of its last datagram either way
}

func (c *udpClient) touch() { c.last.Store(time.Now().UnixNano()) }

func (c *udpClient) idle(d time.Duration) bool {
	return !time.Now().Before(time.Unix(0, c.last.Load()).Add(d))
}

// newUDPClient dials the destination from's datagrams asked for, with the
// redirect's records set; nil when there is none.
func (s *server) newUDPClient(local, from netip.AddrPort) *udpClient {
	log := s.log.With("client", from.String())
	r, orig, err := s.find.findDatagram(local, from)
	if err != nil {
		log.Warn("no redirect for datagrams", "err", err)
		return nil
	}
	d := &net.Dialer{Timeout: s.dialTimeout}
	if len(r.Records) > 0 {
		if err := proxy.SetRedirectRecords(d, r.Records); err != nil {
			log.Warn("setting redirect records", "err", err)
			return nil
		}
	}
	conn, err := d.Dial("udp", orig.String())
	if err != nil {
		log.Warn("dialing original destination", "to", orig.String(), "err", err)
		return nil
	}
	log.Debug("udp relay", "to", orig.String())
	c := &udpClient{out: conn.(*net.UDPConn)}
	c.touch()
	return c
}

// replies sends the destination's datagrams back to the client until the
// relay has been idle for idle and end agrees (it checks again under the
// lock datagrams from the client touch the relay under, and forgets the
// relay), or the relay fails (end(true)).
func (c *udpClient) replies(pc *net.UDPConn, to netip.AddrPort, idle time.Duration, end func(force bool) bool) {
	defer c.out.Close()
	buf := make([]byte, 64<<10)
	for {
		if c.idle(idle) && end(false) {
			return
		}
		c.out.SetReadDeadline(time.Unix(0, c.last.Load()).Add(idle))
		n, err := c.out.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue // idle unless a datagram came meanwhile
			}
			end(true)
			return
		}
		c.touch()
		if _, err := pc.WriteToUDPAddrPort(buf[:n], to); errors.Is(err, net.ErrClosed) {
			end(true)
			return
		}
	}
}
