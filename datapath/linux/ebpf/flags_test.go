package ebpf

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"fwp/engine"
	"fwp/internal/testutil"
)

// TestKernelFlags: the flags the hooks compute, each matched by a filter
// that blocks only when its bit is set (issue 15): IS_LOOPBACK by the
// remote address at AUTH_CONNECT, IS_CONNECTION_REDIRECTED after the
// built-in redirect, IS_WILDCARD_BIND at RESOURCE_ASSIGNMENT. Flags the
// hooks never set (IS_REAUTHORIZE) never match.
func TestKernelFlags(t *testing.T) {
	d, cg := kernelSetup(t)
	h := testutil.StartHelper(t, cg, "probe")
	t.Cleanup(func() {
		// No policy and none of this test's drop events left for the
		// next test (its filter ids start at 1 too).
		apply(t, d, engine.New(engine.Options{}))
		rd, err := ringbuf.NewReader(d.objs.FwpEvents)
		if err != nil {
			t.Error(err)
			return
		}
		defer rd.Close()
		rd.SetDeadline(time.Now()) // reads what is there, never waits
		for {
			if _, err := rd.Read(); err != nil {
				return
			}
		}
	})
	flag := func(m engine.MatchType, bits uint32) engine.Condition {
		return engine.Condition{Field: engine.FieldFlags, Match: m, Value: engine.Uint32(bits)}
	}
	cases := []struct {
		name string
		add  func(tx *engine.Txn) error
		ops  []probeOp
		want []string
	}{
		{"loopback", func(tx *engine.Txn) error {
			for _, v6 := range []bool{false, true} {
				if _, err := tx.AddFilter(blockFilter(engine.LayerFor(engine.KindAuthConnect, v6), flag(engine.MatchFlagsAllSet, engine.FlagIsLoopback))); err != nil {
					return err
				}
			}
			return nil
		}, []probeOp{
			{Net: "tcp4", Remote: "127.0.0.1:81"}, {Net: "tcp4", Remote: nonLoopback4 + ":81"},
			{Net: "tcp6", Remote: "[::1]:81"}, {Net: "tcp6", Remote: "[" + nonLoopback6 + "]:81"},
		}, []string{"eperm", "refused", "eperm", "refused"}},
		{"not loopback", func(tx *engine.Txn) error {
			_, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4, flag(engine.MatchFlagsNoneSet, engine.FlagIsLoopback)))
			return err
		}, []probeOp{{Net: "tcp4", Remote: "127.0.0.1:81"}, {Net: "tcp4", Remote: nonLoopback4 + ":81"}},
			[]string{"refused", "eperm"}},
		{"equal zero", func(tx *engine.Txn) error {
			_, err := tx.AddFilter(blockFilter(engine.LayerALEConnectRedirectV4, flag(engine.MatchEqual, 0)))
			return err
		}, []probeOp{{Net: "tcp4", Remote: "127.0.0.1:81"}, {Net: "tcp4", Remote: nonLoopback4 + ":81"}},
			[]string{"refused", "eperm"}},
		{"reauthorize never set", func(tx *engine.Txn) error {
			_, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4, flag(engine.MatchFlagsAnySet, engine.FlagIsReauthorize)))
			return err
		}, []probeOp{{Net: "tcp4", Remote: "127.0.0.1:81"}, {Net: "tcp4", Remote: nonLoopback4 + ":81"}},
			[]string{"refused", "refused"}},
		{"redirected", func(tx *engine.Txn) error {
			// Port 80 is redirected to a proxy where nothing listens.
			if _, err := addRedirect(tx, false, 80, netip.MustParseAddrPort("127.0.0.1:9"), nil); err != nil {
				return err
			}
			_, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4, flag(engine.MatchFlagsAllSet, engine.FlagIsConnectionRedirected)))
			return err
		}, []probeOp{{Net: "tcp4", Remote: "127.0.0.1:80"}, {Net: "tcp4", Remote: "127.0.0.1:81"}},
			[]string{"eperm", "refused"}},
		{"wildcard bind", func(tx *engine.Txn) error {
			_, err := tx.AddFilter(blockFilter(engine.LayerALEResourceAssignmentV4, flag(engine.MatchFlagsAllSet, engine.FlagIsWildcardBind)))
			return err
		}, []probeOp{{Net: "tcp4", Local: "0.0.0.0:1200"}, {Net: "tcp4", Local: "127.0.0.1:1201"}},
			[]string{"eperm", "ok"}},
	}
	for _, c := range cases {
		e := buildEngine(t, c.add)
		apply(t, d, e)
		if got := probe(t, h, c.ops); !slices.Equal(got, c.want) {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}
