package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
	"fwp/proxy"
)

func TestRun(t *testing.T) {
	for _, async := range []bool{false, true} {
		var out bytes.Buffer
		r, err := run(context.Background(), config{Async: async, Payload: 200000}, &out)
		if err != nil {
			t.Fatalf("async=%v: %v\n%s", async, err, out.String())
		}
		if r.OriginalSeen != r.Server || r.OutboundRemote != r.Server || r.ClientSocket != r.Proxy || r.ClientRemote != r.Server.String() {
			t.Fatalf("async=%v: %+v", async, r)
		}
		if r.OutboundState != engine.RedirectedBySelf {
			t.Fatalf("proxy outbound state %v", r.OutboundState)
		}
		if r.ServerGot != r.ClientSent || r.ProxyUp != r.ClientSent || r.ProxyDn != r.ClientGot || r.ClientGot <= r.ClientSent {
			t.Fatalf("bytes: %+v", r)
		}
		if !strings.Contains(out.String(), "redirected_by_self") {
			t.Fatalf("output:\n%s", out.String())
		}
	}
}

// BenchmarkProxyThroughput measures bulk transfer over a connection
// redirected through the example proxy against a direct one, in one run:
// each iteration sends one chunk on each and waits for the server's ack.
// ratio = proxied throughput / direct throughput. A third connection goes
// through a plain Go splice proxy without fwp, so that the cost of the
// extra loopback hop and the cost of fwp can be told apart
// (fwp-vs-plain-proxy = fwp proxied / plain proxied).
func BenchmarkProxyThroughput(b *testing.B) {
	const chunk = 16 << 20
	ctx := context.Background()
	s, err := setup(ctx, config{Sink: true, Chunk: chunk})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	direct, err := net.Dial("tcp4", s.server.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer direct.Close()
	proxied, err := (&inproc.Dialer{Datapath: s.dp}).DialContext(ctx, "tcp4", s.server.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer proxied.Close()
	if proxied.(*inproc.Conn).RedirectedRemote() != s.proxy.Addr().(*net.TCPAddr).AddrPort() {
		b.Fatal("the benchmark connection is not redirected")
	}
	plainLn, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer plainLn.Close()
	go func() {
		for {
			c, err := plainLn.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				o, err := net.Dial("tcp4", s.server.Addr().String())
				if err != nil {
					return
				}
				defer o.Close()
				proxy.Splice(c, o)
			}()
		}
	}()
	plain, err := net.Dial("tcp4", plainLn.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer plain.Close()
	buf := make([]byte, chunk)
	ack := make([]byte, 1)
	send := func(c net.Conn) time.Duration {
		t0 := time.Now()
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, ack); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	var dDirect, dProxied, dPlain time.Duration
	b.SetBytes(3 * chunk)
	b.ReportAllocs()
	n := 0
	for b.Loop() {
		dDirect += send(direct)
		dProxied += send(proxied)
		dPlain += send(plain)
		n++
	}
	mb := float64(n) * chunk / 1e6
	b.ReportMetric(mb/dDirect.Seconds(), "direct-MB/s")
	b.ReportMetric(mb/dProxied.Seconds(), "proxied-MB/s")
	b.ReportMetric(mb/dPlain.Seconds(), "plainproxy-MB/s")
	b.ReportMetric(dDirect.Seconds()/dProxied.Seconds(), "ratio")
	b.ReportMetric(dPlain.Seconds()/dProxied.Seconds(), "fwp-vs-plain-proxy")
}
