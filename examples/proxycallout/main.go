package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
	"fwp/proxy"
)

func main() {
	async := flag.Bool("async", false, "redirect asynchronously (pend the classify, complete it from another goroutine)")
	size := flag.Int("bytes", 64<<10, "bytes the client sends")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := run(ctx, config{Async: *async, Payload: *size}, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "proxycallout:", err)
		os.Exit(1)
	}
}

type config struct {
	Async   bool
	Payload int  // bytes of the client's request body
	Sink    bool // the server reads fixed chunks and acks each (benchmarks)
	Chunk   int  // chunk size of a sink server
}

// report is what one client exchange showed.
type report struct {
	Server, Proxy    netip.AddrPort
	ClientRemote     string         // what the client's RemoteAddr says
	ClientSocket     netip.AddrPort // where the client's socket really went
	OriginalSeen     netip.AddrPort // the proxy's reading of the redirect context
	RecordsLen       int
	OutboundState    engine.RedirectState // the callout's view of the proxy's own outbound
	OutboundRemote   netip.AddrPort       // where the proxy's outbound really went
	ClientSent       int64
	ServerGot        int64
	ClientGot        int64
	ProxyUp, ProxyDn int64 // bytes the proxy spliced client→server, server→client
}

// scenario is the server, the proxy and the callouts, on one engine.
type scenario struct {
	e      *engine.Engine
	dp     *inproc.Datapath
	server net.Listener
	proxy  net.Listener
	handle engine.RedirectHandle
	cfg    config

	states sync.Map // flow handle -> redirect state seen at CONNECT_REDIRECT
	mu     sync.Mutex
	seen   []hop // what the proxy saw per connection
	wg     sync.WaitGroup
	served atomic.Int64 // bytes the server read
}

type hop struct {
	original netip.AddrPort
	records  int
	outFlow  engine.FlowHandle
	outTo    netip.AddrPort
	up, down int64
	err      error
}

const (
	providerKey = "fwp-example-proxy"
	redirectKey = "fwp-example-proxy-redirect"
	observeKey  = "fwp-example-proxy-observe"
)

func setup(ctx context.Context, cfg config) (s *scenario, err error) {
	e := engine.New(engine.Options{})
	s = &scenario{e: e, dp: inproc.New(e, inproc.Options{}), cfg: cfg}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	lc := &inproc.ListenConfig{Datapath: s.dp}
	if s.server, err = lc.Listen(ctx, "tcp4", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	if s.proxy, err = lc.Listen(ctx, "tcp4", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	serverAddr := s.server.Addr().(*net.TCPAddr).AddrPort()
	proxyAddr := s.proxy.Addr().(*net.TCPAddr).AddrPort()
	s.handle = e.RedirectHandleCreate(providerKey)

	// The callout of WFPSampler's proxy scenario: matching connections go
	// to the local proxy, their original destination in the context.
	redirect := &engine.ConnectRedirect{Handle: s.handle, Async: cfg.Async,
		Target: func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
			orig := netip.AddrPortFrom(req.Values.Get(engine.FieldIPRemoteAddress).Addr(), uint16(req.Values.Uint(engine.FieldIPRemotePort)))
			b, err := orig.MarshalBinary()
			if err != nil {
				return engine.RedirectTarget{}, false
			}
			return engine.RedirectTarget{To: proxyAddr, TargetPID: s.dp.Identity().PID, Context: b}, true
		}}
	// An inspection callout in a higher sublayer notes how each flow was
	// redirected before this classification: the proxy's outbound must be
	// REDIRECTED_BY_SELF, which is what keeps it from looping.
	observe := engine.InlineInspection(func(req *engine.ClassifyRequest) {
		if req.Meta.Has(engine.MetaFlowHandle) {
			s.states.Store(req.Meta.FlowHandle, req.RedirectState(s.handle))
		}
	})
	err = e.Update(func(tx *engine.Txn) error {
		p, err := tx.AddProvider(engine.Provider{Key: providerKey, Name: "fwp proxy-callout example"})
		if err != nil {
			return err
		}
		sub, err := tx.AddSublayer(engine.Sublayer{Key: providerKey + "-sublayer", Provider: p, Weight: 100})
		if err != nil {
			return err
		}
		obsSub, err := tx.AddSublayer(engine.Sublayer{Key: providerKey + "-observe", Provider: p, Weight: 200})
		if err != nil {
			return err
		}
		conds := []engine.Condition{
			{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(serverAddr.Addr())},
			{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(serverAddr.Port())},
		}
		for _, c := range []struct {
			key string
			sub engine.SublayerID
			act engine.ActionType
		}{{redirectKey, sub, engine.ActionCalloutUnknown}, {observeKey, obsSub, engine.ActionCalloutInspection}} {
			id, err := tx.AddCallout(engine.Callout{Key: c.key, Provider: p, Layer: engine.LayerALEConnectRedirectV4})
			if err != nil {
				return err
			}
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEConnectRedirectV4, Sublayer: c.sub, Provider: p,
				Conditions: conds, Action: engine.Action{Type: c.act, Callout: id}}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err = e.RegisterCallout(redirectKey, redirect.Registration()); err != nil {
		return nil, err
	}
	if err = e.RegisterCallout(observeKey, observe); err != nil {
		return nil, err
	}
	s.wg.Add(2)
	go s.serve(s.server, s.handleServer)
	go s.serve(s.proxy, s.handleProxy)
	return s, nil
}

func (s *scenario) serve(ln net.Listener, handle func(net.Conn)) {
	defer s.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			handle(c)
		}()
	}
}

// handleServer is an HTTP-ish echo: it reads the request to EOF and
// answers with a status line and the request echoed back. As a sink it
// reads fixed chunks and acks each with one byte.
func (s *scenario) handleServer(c net.Conn) {
	if s.cfg.Sink {
		buf := make([]byte, s.cfg.Chunk)
		for {
			n, err := io.ReadFull(c, buf)
			s.served.Add(int64(n))
			if err != nil {
				return
			}
			if _, err := c.Write([]byte{1}); err != nil {
				return
			}
		}
	}
	req, err := io.ReadAll(c)
	s.served.Add(int64(len(req)))
	if err != nil {
		return
	}
	fmt.Fprintf(c, "HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n", len(req))
	c.Write(req)
}

// handleProxy is the proxy of seed 000: query the records and the context
// of the accepted connection, dial the original destination with the
// records set, splice both ways.
func (s *scenario) handleProxy(c net.Conn) {
	h := hop{}
	defer func() {
		s.mu.Lock()
		s.seen = append(s.seen, h)
		s.mu.Unlock()
	}()
	records, err := proxy.QueryRedirectRecords(c)
	if err != nil {
		h.err = err
		return
	}
	rctx, err := proxy.QueryRedirectContext(c)
	if err != nil {
		h.err = err
		return
	}
	if err := h.original.UnmarshalBinary(rctx); err != nil {
		h.err = fmt.Errorf("redirect context: %w", err)
		return
	}
	h.records = len(records)
	d := &inproc.Dialer{Datapath: s.dp}
	if err := proxy.SetRedirectRecords(d, records); err != nil {
		h.err = err
		return
	}
	out, err := d.Dial("tcp", h.original.String())
	if err != nil {
		h.err = err
		return
	}
	defer out.Close()
	oc := out.(*inproc.Conn)
	h.outFlow, h.outTo = oc.Flow(), oc.RedirectedRemote()
	h.up, h.down, h.err = proxy.Splice(c, out)
}

func (s *scenario) Close() {
	if s.server != nil {
		s.server.Close()
	}
	if s.proxy != nil {
		s.proxy.Close()
	}
	s.wg.Wait()
	if s.handle != 0 {
		s.e.RedirectHandleDestroy(s.handle)
	}
}

// exchange makes one client connection through the datapath and reads
// the server's answer.
func (s *scenario) exchange(ctx context.Context) (report, error) {
	r := report{Server: s.server.Addr().(*net.TCPAddr).AddrPort(), Proxy: s.proxy.Addr().(*net.TCPAddr).AddrPort()}
	d := &inproc.Dialer{Datapath: s.dp}
	c, err := d.DialContext(ctx, "tcp", r.Server.String())
	if err != nil {
		return r, err
	}
	defer c.Close()
	r.ClientRemote = c.RemoteAddr().String()
	r.ClientSocket = c.(*inproc.Conn).RedirectedRemote()
	body := strings.Repeat("x", s.cfg.Payload)
	req := "GET / HTTP/1.0\r\nHost: " + r.Server.String() + "\r\n\r\n" + body
	n, err := io.WriteString(c, req)
	r.ClientSent = int64(n)
	if err != nil {
		return r, err
	}
	if err := c.(*inproc.Conn).CloseWrite(); err != nil {
		return r, err
	}
	br := bufio.NewReader(c)
	status, err := br.ReadString('\n')
	if err != nil {
		return r, err
	}
	if !strings.HasPrefix(status, "HTTP/1.0 200") {
		return r, fmt.Errorf("server answered %q", status)
	}
	hdr, err := br.ReadString('\n')
	if err != nil {
		return r, err
	}
	want, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(hdr, "Content-Length:")))
	if err != nil {
		return r, fmt.Errorf("bad header %q", hdr)
	}
	blank, err := br.ReadString('\n')
	if err != nil {
		return r, err
	}
	got, err := io.Copy(io.Discard, br)
	if err != nil {
		return r, err
	}
	r.ClientGot = int64(len(status)+len(hdr)+len(blank)) + got
	if int(got) != want || int(got) != len(req) {
		return r, fmt.Errorf("client got %d echoed bytes, server announced %d, sent %d", got, want, len(req))
	}
	return r, nil
}

// run starts the scenario, makes one client exchange, and prints what the
// callout, the proxy, the server and the client saw.
func run(ctx context.Context, cfg config, w io.Writer) (report, error) {
	s, err := setup(ctx, cfg)
	if err != nil {
		return report{}, err
	}
	r, err := s.exchange(ctx)
	s.Close() // waits for the proxy and server to finish
	if err != nil {
		return r, err
	}
	s.mu.Lock()
	seen := s.seen
	s.mu.Unlock()
	if len(seen) != 1 {
		return r, fmt.Errorf("the proxy handled %d connections, want 1", len(seen))
	}
	h := seen[0]
	if h.err != nil {
		return r, fmt.Errorf("proxy: %w", h.err)
	}
	r.OriginalSeen, r.RecordsLen, r.OutboundRemote, r.ProxyUp, r.ProxyDn = h.original, h.records, h.outTo, h.up, h.down
	st, ok := s.states.Load(h.outFlow)
	if !ok {
		return r, errors.New("the callout never saw the proxy's outbound connection")
	}
	r.OutboundState = st.(engine.RedirectState)
	r.ServerGot = s.served.Load()

	mode := "inline"
	if cfg.Async {
		mode = "asynchronous (pend classify, complete later)"
	}
	fmt.Fprintf(w, "server    listening on %s (HTTP-ish echo)\n", r.Server)
	fmt.Fprintf(w, "proxy     listening on %s, pid %d\n", r.Proxy, s.dp.Identity().PID)
	fmt.Fprintf(w, "callout   connect redirect, %s: %s -> %s\n", mode, r.Server, r.Proxy)
	fmt.Fprintf(w, "client    dialed %s; its socket went to %s, RemoteAddr reports %s\n", r.Server, r.ClientSocket, r.ClientRemote)
	fmt.Fprintf(w, "proxy     accepted; redirect records %d bytes; context says original destination %s\n", r.RecordsLen, r.OriginalSeen)
	fmt.Fprintf(w, "proxy     outbound to %s: redirect state %s, connected to %s (not redirected again)\n", r.OriginalSeen, r.OutboundState, r.OutboundRemote)
	fmt.Fprintf(w, "bytes     client->server %d (proxy spliced %d, server read %d)\n", r.ClientSent, r.ProxyUp, r.ServerGot)
	fmt.Fprintf(w, "bytes     server->client %d (proxy spliced %d)\n", r.ClientGot, r.ProxyDn)
	fmt.Fprintf(w, "engine    %+v\n", s.e.Outstanding())
	if o := s.e.Outstanding(); o.Pends != 0 || o.ClassifyHandles != 0 || o.FlowContexts != 0 {
		return r, fmt.Errorf("engine still holds %+v", o)
	}
	return r, nil
}
