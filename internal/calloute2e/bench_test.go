package calloute2e

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"fwp/client"
	"fwp/engine"
	"fwp/internal/peercred"
	"fwp/internal/server"
)

// host is fwpd's callout service over an engine of this process, so that
// a benchmark can time the engine's Classify itself; the callout program
// is still a process of its own.
type host struct {
	e    *engine.Engine
	sock string // the API socket name; the callout socket is sock+".callouts"
	cid  engine.CalloutID
}

func startHost(tb testing.TB, layer engine.LayerID, key string) *host {
	tb.Helper()
	dir, err := os.MkdirTemp("", "fwpcoh")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	h := &host{e: engine.New(engine.Options{}), sock: filepath.Join(dir, "s")}
	l, err := net.Listen("unix", client.CalloutSocket(h.sock))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { l.Close() })
	go server.NewCallouts(h.e, func(peercred.Cred) bool { return true }, nil).Serve(l)
	err = h.e.Update(func(tx *engine.Txn) error {
		id, err := tx.AddCallout(engine.Callout{Key: key, Layer: layer})
		if err != nil {
			return err
		}
		h.cid = id
		_, err = tx.AddFilter(engine.Filter{Layer: layer, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: id}})
		return err
	})
	if err != nil {
		tb.Fatal(err)
	}
	return h
}

// startHostProg starts a callout program against the host.
func (h *host) startProg(tb testing.TB, regs ...string) *proc {
	tb.Helper()
	t, ok := tb.(*testing.T)
	if !ok {
		t = &testing.T{}
	}
	p := startProgNoWait(t, &daemon{t: t, sock: h.sock}, nil, "30s", regs...)
	p.expect("ready")
	return p
}

func percentile(ds []time.Duration, q float64) time.Duration {
	slices.Sort(ds)
	return ds[int(q*float64(len(ds)-1))]
}

// TestAddedLatency measures (and logs) what a remote callout adds to a
// classification over the same callout embedded, in one run with the arms
// alternated; the figures are in docs/benchmarks.md. It asserts nothing
// about time.
func TestAddedLatency(t *testing.T) {
	if testing.Short() || raceOn {
		t.Skip("a measurement: not under -short or the race detector")
	}
	h := startHost(t, connV4, "co-permit")
	p := h.startProg(t, "co-permit=permit")
	defer p.kill()
	emb := engine.New(engine.Options{})
	emb.Update(func(tx *engine.Txn) error {
		id, _ := tx.AddCallout(engine.Callout{Key: "co-permit", Layer: connV4})
		_, err := tx.AddFilter(engine.Filter{Layer: connV4, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: id}})
		return err
	})
	emb.RegisterCallout("co-permit", progCallout("permit"))
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.1.1:80"))
	// The floor: one byte to another process and back over pipes, the
	// least a round trip between two processes costs on this machine now.
	echo := exec.Command(os.Args[0])
	echo.Env = append(os.Environ(), "FWP_ECHO=1")
	ein, _ := echo.StdinPipe()
	eout, _ := echo.StdoutPipe()
	if err := echo.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { ein.Close(); echo.Wait() }()
	// A second floor: one byte over a unix socket to a Go process and
	// back, Go's poller on both sides, as on the callout socket: what any
	// protocol on it costs, frames and callouts aside.
	ul, err := net.Listen("unix", h.sock+".echo")
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	uecho := exec.Command(os.Args[0])
	uecho.Env = append(os.Environ(), "FWP_ECHO_UNIX="+h.sock+".echo")
	if err := uecho.Start(); err != nil {
		t.Fatal(err)
	}
	uc, err := ul.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { uc.Close(); uecho.Wait() }()
	const n = 20000
	var re, ee, fe, ue []time.Duration
	b := []byte{1}
	for i := range 4 * n {
		s := time.Now()
		switch i % 4 {
		case 3:
			uc.Write(b)
			io.ReadFull(uc, b)
			ue = append(ue, time.Since(s))
		case 0:
			if r := h.e.Classify(connV4, &vs, nil); r.Action != engine.ActionPermit || r.Reason != engine.ReasonCalloutPermit {
				t.Fatalf("%+v", r)
			}
			re = append(re, time.Since(s))
		case 1:
			emb.Classify(connV4, &vs, nil)
			ee = append(ee, time.Since(s))
		case 2:
			ein.Write(b)
			io.ReadFull(eout, b)
			fe = append(fe, time.Since(s))
		}
	}
	t.Logf("remote:   p50 %v p99 %v", percentile(re, .5), percentile(re, .99))
	t.Logf("embedded: p50 %v p99 %v", percentile(ee, .5), percentile(ee, .99))
	t.Logf("added:    p50 %v p99 %v", percentile(re, .5)-percentile(ee, .5), percentile(re, .99)-percentile(ee, .99))
	t.Logf("floor (pipe round trip to a process): p50 %v p99 %v", percentile(fe, .5), percentile(fe, .99))
	t.Logf("floor (unix socket round trip to a Go process): p50 %v p99 %v", percentile(ue, .5), percentile(ue, .99))
	t.Logf("remote over the unix-socket floor: p50 %v p99 %v", percentile(re, .5)-percentile(ue, .5), percentile(re, .99)-percentile(ue, .99))
	for _, par := range []int{1, 8, 64} {
		var wg sync.WaitGroup
		per := 40000 / par
		start := time.Now()
		for range par {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var vs engine.Values
				vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.1.1:80"))
				for range per {
					h.e.Classify(connV4, &vs, nil)
				}
			}()
		}
		wg.Wait()
		t.Logf("%d concurrent: %.0f classifications/s through one remote callout", par, float64(per*par)/time.Since(start).Seconds())
	}
	_ = context.Background
}

// TestTransportRTT compares one round trip to a real fwpd over its gRPC
// API (a unary call that does almost nothing) and over the callout
// socket's frames (a request that does almost nothing), alternated in one
// run: the transport choice of calloutwire, measured.
func TestTransportRTT(t *testing.T) {
	if testing.Short() || raceOn {
		t.Skip("a measurement: not under -short or the race detector")
	}
	d := startDaemon(t)
	ctx := context.Background()
	var g, f []time.Duration
	for i := range 10000 {
		s := time.Now()
		if i%2 == 0 {
			if _, err := d.c.Sessions(ctx); err != nil {
				t.Fatal(err)
			}
			g = append(g, time.Since(s))
		} else {
			if _, err := d.cl.Outstanding(ctx); err != nil {
				t.Fatal(err)
			}
			f = append(f, time.Since(s))
		}
	}
	t.Logf("gRPC unary round trip:    p50 %v p99 %v", percentile(g, .5), percentile(g, .99))
	t.Logf("calloutwire round trip:   p50 %v p99 %v", percentile(f, .5), percentile(f, .99))
}
