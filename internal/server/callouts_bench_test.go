package server

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"fwp/client"
	"fwp/engine"
	"fwp/internal/peercred"
)

// inprocRemote is fwpd's callout service and a callout program in one
// process, over a real unix socket: the whole round trip of a remote
// callout (both sides' encoding, writes, reads, decoding, hand-offs) with
// one process's allocation counters and CPU profile.
type inprocRemote struct {
	e   *engine.Engine
	emb *engine.Engine // the same callout embedded
	rc  *client.RemoteCallout
	vs  engine.Values
}

var authConnectV4 = engine.LayerALEAuthConnectV4

func permitCallout() engine.CalloutRegistration {
	return engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		if out.CanWrite() {
			out.Action = engine.ActionPermit
		}
	}}
}

func calloutFilter(tb testing.TB, e *engine.Engine, key string) {
	tb.Helper()
	err := e.Update(func(tx *engine.Txn) error {
		id, err := tx.AddCallout(engine.Callout{Key: key, Layer: authConnectV4})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Layer: authConnectV4, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: id}})
		return err
	})
	if err != nil {
		tb.Fatal(err)
	}
}

func startInprocRemote(tb testing.TB) *inprocRemote {
	tb.Helper()
	dir, err := os.MkdirTemp("", "fwpcoal")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", client.CalloutSocket(sock))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { l.Close() })
	ir := &inprocRemote{e: engine.New(engine.Options{}), emb: engine.New(engine.Options{})}
	go NewCallouts(ir.e, func(peercred.Cred) bool { return true }, nil).Serve(l)
	calloutFilter(tb, ir.e, "co")
	calloutFilter(tb, ir.emb, "co")
	if err := ir.emb.RegisterCallout("co", permitCallout()); err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if ir.rc, err = client.RegisterCallout(ctx, "co", permitCallout(), client.CalloutOptions{Socket: sock}); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ir.rc.Close() })
	ir.vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.1.1:80"))
	return ir
}

func (ir *inprocRemote) classify(tb testing.TB, e *engine.Engine) {
	if r := e.Classify(authConnectV4, &ir.vs, nil); r.Action != engine.ActionPermit || r.Reason != engine.ReasonCalloutPermit {
		tb.Fatalf("classify: %+v", r)
	}
}

// BenchmarkRemoteCalloutInProcess: one classification through a remote
// callout that permits at once, fwpd's side and the program's in this
// process over a unix socket, beside the same callout embedded. Its
// allocs/op are both sides' per call.
func BenchmarkRemoteCalloutInProcess(b *testing.B) {
	ir := startInprocRemote(b)
	b.Run("remote", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			ir.classify(b, ir.e)
		}
	})
	b.Run("embedded", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			ir.classify(b, ir.emb)
		}
	})
}

// A classification through a remote callout that answers at once
// allocates nothing on either side once warm: fwpd's request frame is
// encoded into the connection's buffer, the answer decoded in place and
// handed over on a pooled channel; the program decodes each call into its
// one Classify (strings equal to the last call's reused) and runs the
// callout on pooled engine state. Metadata and an application id are
// present, as the kernel callout path sends them.
func TestRemoteCalloutAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector makes sync.Pool drop items at random")
	}
	ir := startInprocRemote(t)
	ir.vs.Set(engine.FieldALEAppID, engine.String("/usr/bin/curl"))
	meta := engine.Metadata{Present: engine.MetaProcessID | engine.MetaProcessPath | engine.MetaUserID | engine.MetaFlowHandle,
		ProcessID: 4242, ProcessPath: "/usr/bin/curl", UserID: 1000, FlowHandle: 77}
	m := new(engine.Metadata) // the caller's, as a datapath keeps one per flow
	classify := func() {
		*m = meta
		if r := ir.e.Classify(authConnectV4, &ir.vs, m); r.Action != engine.ActionPermit || r.Reason != engine.ReasonCalloutPermit {
			t.Fatalf("classify: %+v", r)
		}
	}
	for range 100 { // warm the pools and buffers
		classify()
	}
	if n := testing.AllocsPerRun(1000, classify); n != 0 {
		t.Fatalf("%.1f allocations per remote callout call, want 0", n)
	}
}
