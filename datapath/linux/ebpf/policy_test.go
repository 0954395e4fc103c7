package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"fwp/engine"
)

// tuple is one classification input as the kernel hooks see it.
type tuple struct {
	proto  uint8
	remote netip.AddrPort
	local  netip.AddrPort // zero address / port: not bound yet (absent)
	uid    uint32
	gid    uint32
	cgroup uint64
	v6     bool
	app    string // the executable's path; "" for none
	// redirected: the built-in connect redirect ran (AUTH_CONNECT after it).
	redirected bool
}

// flags is the flags value the hooks compute for the tuple (as nfqueue's
// and the flow layers' values: loopback by the remote address).
func (t tuple) flags() uint32 {
	var f uint32
	if t.remote.Addr().IsLoopback() {
		f |= engine.FlagIsLoopback
	}
	if t.redirected {
		f |= engine.FlagIsConnectionRedirected
	}
	return f
}

func (t tuple) values() *engine.Values {
	var vs engine.Values
	vs.Set(engine.FieldIPProtocol, engine.Uint8(t.proto))
	vs.Set(engine.FieldIPRemoteAddress, engine.Addr(t.remote.Addr()))
	vs.Set(engine.FieldIPRemotePort, engine.Uint16(t.remote.Port()))
	if a := t.local.Addr(); a.IsValid() && !a.IsUnspecified() {
		vs.Set(engine.FieldIPLocalAddress, engine.Addr(a))
	}
	if t.local.Port() != 0 {
		vs.Set(engine.FieldIPLocalPort, engine.Uint16(t.local.Port()))
	}
	vs.Set(engine.FieldALEUserID, engine.Uint32(t.uid))
	vs.Set(engine.FieldALEGroupID, engine.Uint32(t.gid))
	vs.Set(engine.FieldCgroupID, engine.Uint64(t.cgroup))
	vs.Set(engine.FieldFlags, engine.Uint32(t.flags()))
	if t.app != "" {
		vs.Set(engine.FieldALEAppID, engine.String(t.app))
	}
	return &vs
}

// engineBlocks is what the engine decides for a connect: CONNECT_REDIRECT
// then AUTH_CONNECT, blocked if either blocks.
func engineBlocks(e *engine.Engine, t tuple) bool {
	vs := t.values()
	for _, k := range []engine.LayerKind{engine.KindConnectRedirect, engine.KindAuthConnect} {
		r := e.Classify(engine.LayerFor(k, t.v6), vs, &engine.Metadata{})
		if !r.Permitted() {
			return true
		}
	}
	return false
}

// simulate runs the compiled maps the way bpf/fwp.c does, in Go.
func (p *Policy) simulate(slot int, t tuple) (block bool, redirect int) {
	lp := p.layers[slot]
	if lp == nil {
		return false, 0
	}
	n := len(lp.filters)
	acc := lp.classes[fieldAll].sets[0].clone()
	for f := range fieldAll {
		if lp.active&(1<<f) == 0 {
			continue
		}
		cls := lp.def[f]
		switch f {
		case fieldRAddr, fieldLAddr:
			a := t.remote.Addr().Unmap()
			if f == fieldLAddr {
				a = t.local.Addr().Unmap()
			}
			if !a.IsValid() || a.IsUnspecified() {
				cls = lp.empty[f]
				break
			}
			best := -1
			if ht := lp.hosts[f-fieldRAddr]; a.Is4() && len(ht.hosts) > 0 {
				b := a.As4()
				if _, ok := slices.BinarySearch(ht.hosts, binary.BigEndian.Uint32(b[:])); ok {
					cls = ht.cls // the host table first, as fwp_host_class
					break
				}
			}
			for _, e := range lp.addrs[f-fieldRAddr] {
				if e.prefix.Contains(a) && e.prefix.Bits() > best {
					best, cls = e.prefix.Bits(), e.class
				}
			}
		case fieldRPort, fieldLPort:
			port := t.remote.Port()
			if f == fieldLPort {
				port = t.local.Port()
			}
			if port == 0 && f == fieldLPort {
				cls = lp.empty[f]
				break
			}
			cls = uint32(lp.ports[f-fieldRPort][port])
		case fieldApp:
			id, err := ResolveApp(t.app)
			if t.app == "" || err != nil {
				cls = lp.empty[f]
				break
			}
			if c, ok := lp.apps[id]; ok {
				cls = c
			}
		case fieldGID:
			if c, ok := lp.gids[uint64(t.gid)]; ok {
				cls = c
			}
		default:
			v := uint64(t.proto)
			if lp.active&activeFlags != 0 {
				v |= flagIndex(t.flags()) << 8
			}
			if f == fieldUID {
				v = uint64(t.uid)
			} else if f == fieldCgroup {
				v = t.cgroup
			}
			if c, ok := lp.ints[f-fieldProto][v]; ok {
				cls = c
			}
		}
		b := lp.classes[f].sets[cls]
		for i := range acc {
			acc[i] &= b[i]
		}
	}
	var action, write uint8 = 0, 1
	for r := 0; r < n; {
		if !acc.has(r) {
			r++
			continue
		}
		m := lp.filters[r]
		act := m.Action
		if act == actRedirect {
			if redirect == 0 {
				redirect = int(m.Redirect) + 1
			}
			act = actPermit
		}
		if action == 0 || write == 1 {
			action, write = act, 1-m.Hard
		}
		if write == 0 {
			break
		}
		r = int(m.SubEnd)
	}
	return action == actBlock, redirect
}

func (p *Policy) simulateBlocks(t tuple) bool {
	v6 := 0
	if t.v6 {
		v6 = 1
	}
	for _, slot := range []int{0 + v6, 2 + v6} {
		if b, _ := p.simulate(slot, t); b {
			return true
		}
	}
	return false
}

// gen builds random filter sets and tuples over small pools, so that
// conditions often hit and arbitration matters.
type gen struct {
	r      *rand.Rand
	cgroup uint64
	v6     bool
	// redirects: some CONNECT_REDIRECT filters are built-in redirects to
	// genProxy (nothing listens there).
	redirects bool
	// apps: app id conditions name these paths; tuples run tupleApps (or
	// the process itself when tupleApps is empty).
	apps, tupleApps []string
	// gids: conditions on the group id too (tuples run as gid 0, or
	// tupleGIDs).
	gids      bool
	tupleGIDs []uint32
	// kinds: the layers filters go to (CONNECT_REDIRECT and AUTH_CONNECT
	// when empty).
	kinds []engine.LayerKind
	// hostRuns: runs of v4 host filters (one action, consecutive weights
	// or not), which Compile collapses when nothing falls between them.
	hostRuns bool
	// flags: conditions on the flags (FieldFlags) too; nonLoopback: the
	// address pools have an address that is not loopback (nonLoopback4/6,
	// which the probe helper puts on its lo).
	flags, nonLoopback bool
}

const (
	nonLoopback4 = "10.99.0.1"
	nonLoopback6 = "fd00:99::1"
)

// genApps are the app id paths of random policies: the test binary (the
// probe helper that connects), another program, and a path with no file.
func genApps(t testing.TB) []string {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return []string{self, "/usr/bin/curl", "/nonexistent/fwp-app"}
}

var genProxy = map[bool]netip.AddrPort{false: netip.MustParseAddrPort("127.0.0.1:9"), true: netip.MustParseAddrPort("[::1]:9")}

var (
	v4Pool = []string{"127.0.0.1", "127.0.0.2", "127.0.1.1", "127.0.1.200", "127.1.0.9", "127.0.0.77"}
	v6Pool = []string{"::1"}
)

func (g *gen) addr() netip.Addr {
	if g.nonLoopback && g.r.IntN(3) == 0 {
		if g.v6 {
			return netip.MustParseAddr(nonLoopback6)
		}
		return netip.MustParseAddr(nonLoopback4)
	}
	if g.v6 {
		return netip.MustParseAddr(v6Pool[g.r.IntN(len(v6Pool))])
	}
	return netip.MustParseAddr(v4Pool[g.r.IntN(len(v4Pool))])
}

func (g *gen) port() uint16 {
	return []uint16{53, 80, 443, 8080, 1000, 1001, 1005, 40000}[g.r.IntN(8)]
}

func (g *gen) cond() engine.Condition {
	r := g.r
	if len(g.apps) > 0 && r.IntN(6) == 0 {
		m := []engine.MatchType{engine.MatchEqual, engine.MatchNotEqual}[r.IntN(2)]
		return engine.Condition{Field: engine.FieldALEAppID, Match: m, Value: engine.String(g.apps[r.IntN(len(g.apps))])}
	}
	if g.flags && r.IntN(5) == 0 {
		bits := []uint32{engine.FlagIsLoopback, engine.FlagIsConnectionRedirected, engine.FlagIsReauthorize,
			engine.FlagIsLoopback | engine.FlagIsConnectionRedirected, engine.FlagIsLoopback | engine.FlagIsWildcardBind}[r.IntN(5)]
		m := []engine.MatchType{engine.MatchFlagsAllSet, engine.MatchFlagsAnySet, engine.MatchFlagsNoneSet, engine.MatchEqual, engine.MatchNotEqual}[r.IntN(5)]
		if m == engine.MatchEqual || m == engine.MatchNotEqual {
			bits = []uint32{0, engine.FlagIsLoopback, engine.FlagIsReauthorize}[r.IntN(3)]
		}
		return engine.Condition{Field: engine.FieldFlags, Match: m, Value: engine.Uint32(bits)}
	}
	switch r.IntN(7) {
	case 0, 1:
		a := g.addr()
		switch r.IntN(6) {
		case 5: // a list (engine.List): addresses, prefixes and ranges, ORed
			b := engine.NewListBuilder(engine.TypeAddr, 4)
			for range 1 + r.IntN(6) {
				a, c := g.addr(), g.addr()
				var err error
				switch r.IntN(3) {
				case 0:
					err = b.Add(engine.Addr(a))
				case 1:
					bits := []int{16, 24, 30}[r.IntN(3)]
					if g.v6 {
						bits = []int{64, 120, 127}[r.IntN(3)]
					}
					err = b.Add(engine.Prefix(netip.PrefixFrom(a, bits)))
				default:
					if c.Less(a) {
						a, c = c, a
					}
					err = b.Add(engine.Range(engine.Addr(a), engine.Addr(c)))
				}
				if err != nil {
					panic(err)
				}
			}
			return engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.ListValue(b.List())}
		case 0:
			return engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(a)}
		case 1:
			return engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchNotEqual, Value: engine.Addr(a)}
		case 2:
			bits := []int{8, 16, 24, 31}[r.IntN(4)]
			if g.v6 {
				bits = []int{64, 127, 128}[r.IntN(3)]
			}
			return engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchPrefix, Value: engine.Prefix(netip.PrefixFrom(a, bits))}
		case 3:
			b := g.addr()
			if b.Less(a) {
				a, b = b, a
			}
			return engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchRange, Value: engine.Range(engine.Addr(a), engine.Addr(b))}
		default:
			return engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchNotPrefix, Value: engine.Prefix(netip.PrefixFrom(a, a.BitLen()-1))}
		}
	case 2, 3:
		p := g.port()
		switch r.IntN(5) {
		case 4:
			b := engine.NewListBuilder(engine.TypeUint16, 3)
			_ = b.Add(engine.Uint16(p))
			q := g.port()
			_ = b.Add(engine.Range(engine.Uint16(min(p, q)), engine.Uint16(max(p, q))))
			_ = b.Add(engine.Uint16(g.port()))
			return engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.ListValue(b.List())}
		case 0:
			return engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(p)}
		case 1:
			return engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchNotEqual, Value: engine.Uint16(p)}
		case 2:
			q := g.port()
			return engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(min(p, q)), engine.Uint16(max(p, q)))}
		default:
			return engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchGreater, Value: engine.Uint16(p)}
		}
	case 4:
		if r.IntN(2) == 0 {
			return engine.Condition{Field: engine.FieldIPLocalPort, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(1000), engine.Uint16(1003))}
		}
		a := g.addr()
		return engine.Condition{Field: engine.FieldIPLocalAddress, Match: engine.MatchEqual, Value: engine.Addr(a)}
	case 5:
		return engine.Condition{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8([]uint8{6, 17}[r.IntN(2)])}
	default:
		if r.IntN(2) == 0 {
			m := []engine.MatchType{engine.MatchEqual, engine.MatchNotEqual}[r.IntN(2)]
			return engine.Condition{Field: engine.FieldALEUserID, Match: m, Value: engine.Uint32([]uint32{0, 1000}[r.IntN(2)])}
		}
		if g.gids && r.IntN(3) == 0 {
			m := []engine.MatchType{engine.MatchEqual, engine.MatchNotEqual}[r.IntN(2)]
			return engine.Condition{Field: engine.FieldALEGroupID, Match: m, Value: engine.Uint32([]uint32{0, 1000}[r.IntN(2)])}
		}
		return engine.Condition{Field: engine.FieldCgroupID, Match: engine.MatchEqual, Value: engine.Uint64([]uint64{g.cgroup, 12345}[r.IntN(2)])}
	}
}

// policy builds an engine with random sublayers and filters.
func (g *gen) policy(t testing.TB, nfilters int) *engine.Engine {
	return buildEngine(t, func(tx *engine.Txn) error {
		subs := []engine.SublayerID{engine.UniversalSublayer}
		for i := range 2 {
			id, err := tx.AddSublayer(engine.Sublayer{Name: fmt.Sprint("s", i), Weight: uint16(g.r.IntN(3) * 100)})
			if err != nil {
				return err
			}
			subs = append(subs, id)
		}
		var redirect engine.CalloutID
		var redirectCtx engine.ProviderContextID
		if g.redirects {
			var err error
			layer := engine.LayerFor(engine.KindConnectRedirect, g.v6)
			if redirect, err = tx.AddCallout(engine.Callout{Key: BuiltinConnectRedirectKey + "/gen", Layer: layer}); err != nil {
				return err
			}
			data, _ := RedirectConfig{Proxy: genProxy[g.v6], TargetPID: 1}.Marshal()
			if redirectCtx, err = tx.AddProviderContext(engine.ProviderContext{Data: data}); err != nil {
				return err
			}
		}
		for range nfilters {
			kinds := g.kinds
			if len(kinds) == 0 {
				kinds = []engine.LayerKind{engine.KindConnectRedirect, engine.KindAuthConnect}
			}
			kind := kinds[g.r.IntN(len(kinds))]
			f := engine.Filter{Layer: engine.LayerFor(kind, g.v6), Sublayer: subs[g.r.IntN(len(subs))],
				Action: engine.Action{Type: []engine.ActionType{engine.ActionPermit, engine.ActionPermit, engine.ActionBlock}[g.r.IntN(3)]}}
			if redirect != 0 && kind == engine.KindConnectRedirect && g.r.IntN(3) == 0 {
				f.Action = engine.Action{Type: engine.ActionCalloutUnknown, Callout: redirect}
				f.ProviderContext = redirectCtx
			}
			switch g.r.IntN(3) {
			case 0:
				f.Weight = engine.WeightExact(uint64(g.r.IntN(4)))
			case 1:
				f.Weight = engine.WeightIndex(uint8(g.r.IntN(3)))
			}
			if g.r.IntN(3) == 0 {
				f.Flags |= engine.FilterClearActionRight
			}
			for range g.r.IntN(4) {
				f.Conditions = append(f.Conditions, g.cond())
			}
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
			if g.hostRuns && !g.v6 && g.r.IntN(4) == 0 {
				if err := g.hostRun(tx, subs); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// hostRun adds 2-8 filters that differ only in their remote host (drawn
// from the pool: some twice), of one action, sublayer and flags, with one
// weight or weights among the other filters'.
func (g *gen) hostRun(tx *engine.Txn, subs []engine.SublayerID) error {
	kind := []engine.LayerKind{engine.KindConnectRedirect, engine.KindAuthConnect}[g.r.IntN(2)]
	f := engine.Filter{Layer: engine.LayerFor(kind, false), Sublayer: subs[g.r.IntN(len(subs))],
		Action: engine.Action{Type: []engine.ActionType{engine.ActionPermit, engine.ActionBlock}[g.r.IntN(2)]}}
	if g.r.IntN(3) == 0 {
		f.Flags |= engine.FilterClearActionRight
	}
	var extra []engine.Condition
	if g.r.IntN(2) == 0 {
		extra = append(extra, engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(g.port())})
	}
	same := g.r.IntN(2) == 0
	w := engine.WeightExact(uint64(g.r.IntN(4)))
	for range 2 + g.r.IntN(7) {
		m := f
		m.Weight = w
		if !same {
			m.Weight = engine.WeightExact(uint64(g.r.IntN(4)))
		}
		m.Conditions = append([]engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(g.addr())}}, extra...)
		if _, err := tx.AddFilter(m); err != nil {
			return err
		}
	}
	return nil
}

// smallRuns makes Compile use host tables and collapse runs from the
// sizes random policies have.
func smallRuns(t testing.TB) {
	oh, or := hostTableMin, runMin
	hostTableMin, runMin = 1, 2
	t.Cleanup(func() { hostTableMin, runMin = oh, or })
}

// TestCompileMatchesEngineHostRuns is TestCompileMatchesEngine with host
// tables and collapsed runs of host filters.
func TestCompileMatchesEngineHostRuns(t *testing.T) {
	smallRuns(t)
	collapsed, tables := 0, 0
	for seed := range uint64(400) {
		g := &gen{r: rand.New(rand.NewPCG(seed, 8)), cgroup: 4242, hostRuns: true}
		e := g.policy(t, 1+g.r.IntN(25))
		p, err := Compile(e.View())
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		for _, lp := range p.layers {
			if lp != nil {
				collapsed += len(lp.runs)
				if len(lp.hosts[0].hosts)+len(lp.hosts[1].hosts) > 0 {
					tables++
				}
			}
		}
		for range 60 {
			tp := g.tuple()
			if want, got := engineBlocks(e, tp), p.simulateBlocks(tp); want != got {
				t.Fatalf("seed %d tuple %+v: engine blocks=%v, compiled blocks=%v", seed, tp, want, got)
			}
		}
	}
	t.Logf("%d runs collapsed, %d layers with host tables", collapsed, tables)
	if collapsed == 0 || tables == 0 {
		t.Fatalf("no run collapsed or no host table: the test proves nothing")
	}
}

// buildEngine returns a new engine holding what fn adds in one transaction.
func buildEngine(t testing.TB, fn func(tx *engine.Txn) error) *engine.Engine {
	t.Helper()
	e := engine.New(engine.Options{})
	if err := e.Update(fn); err != nil {
		t.Fatal(err)
	}
	return e
}

func (g *gen) tuple() tuple {
	t := tuple{proto: []uint8{6, 17}[g.r.IntN(2)], uid: 0, cgroup: g.cgroup, v6: g.v6}
	t.remote = netip.AddrPortFrom(g.addr(), g.port())
	if len(g.tupleGIDs) > 0 {
		t.gid = g.tupleGIDs[g.r.IntN(len(g.tupleGIDs))]
	}
	if len(g.tupleApps) > 0 {
		t.app = g.tupleApps[g.r.IntN(len(g.tupleApps))]
	} else if len(g.apps) > 0 {
		t.app = g.apps[0]
	}
	switch g.r.IntN(3) {
	case 0: // unbound
	case 1:
		t.local = netip.AddrPortFrom(g.addr(), 0)
	default:
		t.local = netip.AddrPortFrom(g.addr(), uint16(1000+g.r.IntN(6)))
		if t.local.Port() == t.remote.Port() {
			// A connect to itself would succeed (simultaneous open) and
			// leave the port in TIME_WAIT for the binds of later tuples.
			t.local = netip.AddrPortFrom(t.local.Addr(), 1002)
		}
	}
	return t
}

// TestCompileMatchesEngine checks the compiled maps, run by a Go model of
// the BPF walk, against engine.Classify over random policies and tuples.
func TestCompileMatchesEngine(t *testing.T) {
	apps := genApps(t)
	for seed := range uint64(300) {
		g := &gen{r: rand.New(rand.NewPCG(seed, 7)), cgroup: 4242, v6: seed%5 == 4,
			apps: apps, tupleApps: []string{apps[0], "/usr/bin/curl", "/usr/bin/wget"}, gids: true, tupleGIDs: []uint32{0, 1000, 7},
			flags: seed%3 != 0, nonLoopback: seed%2 == 0}
		e := g.policy(t, 1+g.r.IntN(25))
		p, err := Compile(e.View())
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		for range 60 {
			tp := g.tuple()
			if want, got := engineBlocks(e, tp), p.simulateBlocks(tp); want != got {
				t.Fatalf("seed %d tuple %+v: engine blocks=%v, compiled blocks=%v", seed, tp, want, got)
			}
		}
	}
}

func TestCompileRefusesWhatTheKernelCannotDecide(t *testing.T) {
	cases := []struct {
		name string
		add  func(tx *engine.Txn) error
		want error
	}{
		{"go callout", func(tx *engine.Txn) error {
			co, err := tx.AddCallout(engine.Callout{Key: "my.callout", Layer: engine.LayerALEAuthConnectV4})
			if err != nil {
				return err
			}
			_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: co}})
			return err
		}, ErrNotSupported},
		{"app id prefix", func(tx *engine.Txn) error {
			_, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionBlock},
				Conditions: []engine.Condition{{Field: engine.FieldALEAppID, Match: engine.MatchPrefix, Value: engine.String("/usr/bin/")}}})
			return err
		}, ErrNotSupported},
		{"relative app id", func(tx *engine.Txn) error {
			_, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionBlock},
				Conditions: []engine.Condition{{Field: engine.FieldALEAppID, Match: engine.MatchEqual, Value: engine.String("curl")}}})
			return err
		}, ErrNotSupported},
		{"uid range", func(tx *engine.Txn) error {
			_, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionBlock},
				Conditions: []engine.Condition{{Field: engine.FieldALEUserID, Match: engine.MatchRange, Value: engine.Range(engine.Uint32(1), engine.Uint32(9))}}})
			return err
		}, ErrNotSupported},
		{"unhooked layer", func(tx *engine.Txn) error {
			_, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEResourceReleaseV4, Action: engine.Action{Type: engine.ActionBlock}})
			return err
		}, ErrNotSupported},
		{"redirect without context", func(tx *engine.Txn) error {
			co, err := tx.AddCallout(engine.Callout{Key: BuiltinConnectRedirectKey, Layer: engine.LayerALEConnectRedirectV4})
			if err != nil {
				return err
			}
			_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEConnectRedirectV4, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}})
			return err
		}, ErrInvalidRedirect},
		{"redirect with a bad context", func(tx *engine.Txn) error {
			co, err := tx.AddCallout(engine.Callout{Key: BuiltinConnectRedirectKey + "/p", Layer: engine.LayerALEConnectRedirectV4})
			if err != nil {
				return err
			}
			pc, err := tx.AddProviderContext(engine.ProviderContext{Data: []byte(`{"proxy":"x"}`)})
			if err != nil {
				return err
			}
			_, err = tx.AddFilter(engine.Filter{Layer: engine.LayerALEConnectRedirectV4, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}, ProviderContext: pc})
			return err
		}, ErrInvalidRedirect},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Compile(buildEngine(t, c.add).View())
			if !errors.Is(err, c.want) {
				t.Fatalf("Compile: %v, want %v", err, c.want)
			}
			// The refusal names the filter by its key, not by an ID of
			// a transaction that is never committed.
			var oe *engine.ObjectError
			if !errors.As(err, &oe) || oe.Kind != "filter" || oe.Key == "" || !strings.Contains(err.Error(), fmt.Sprintf("filter %q (#", oe.Key)) {
				t.Fatalf("Compile: %v does not name the filter by key", err)
			}
		})
	}
}

// redirectTo is an engine with one built-in connect redirect to proxy.
func redirectTo(t *testing.T, proxy string) *engine.Engine {
	return buildEngine(t, func(tx *engine.Txn) error {
		co, err := tx.AddCallout(engine.Callout{Key: BuiltinConnectRedirectKey, Layer: engine.LayerALEConnectRedirectV4})
		if err != nil {
			return err
		}
		pc, err := tx.AddProviderContext(engine.ProviderContext{Key: "to-proxy", Data: []byte(`{"proxy":"` + proxy + `"}`)})
		if err != nil {
			return err
		}
		_, err = tx.AddFilter(engine.Filter{Key: "redirect-web", Layer: engine.LayerALEConnectRedirectV4, Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: co}, ProviderContext: pc})
		return err
	})
}

// A connect redirect's proxy must be on this host: loopback always, or an
// address of the host's interfaces when the policy is compiled. Anything
// else is refused with a reason, naming the filter and its context.
func TestCompileRefusesNonLocalProxy(t *testing.T) {
	saved := hostAddrs
	defer func() { hostAddrs = saved }()
	hostAddrs = func() ([]netip.Addr, error) {
		return []netip.Addr{netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")}, nil
	}
	for _, ok := range []string{"127.0.0.1:3128", "127.0.0.53:53", "[::1]:3128", "192.0.2.10:3128", "[2001:db8::10]:3128", "[::ffff:192.0.2.10]:3128"} {
		if _, err := Compile(redirectTo(t, ok).View()); err != nil {
			t.Errorf("proxy %s: %v", ok, err)
		}
	}
	for _, bad := range []string{"8.8.8.8:3131", "192.0.2.11:3128", "[2001:db8::11]:3128"} {
		_, err := Compile(redirectTo(t, bad).View())
		if !errors.Is(err, ErrInvalidRedirect) || !strings.Contains(err.Error(), "is not a local address") ||
			!strings.Contains(err.Error(), `filter "redirect-web"`) || !strings.Contains(err.Error(), `provider context "to-proxy"`) {
			t.Errorf("proxy %s: %v, want a refusal naming the filter, its context and why", bad, err)
		}
	}
	// The real interfaces: loopback is always local.
	hostAddrs = saved
	if _, err := Compile(redirectTo(t, "127.0.0.1:3128").View()); err != nil {
		t.Fatal(err)
	}
}

func TestCompileTooManyFilters(t *testing.T) {
	e := buildEngine(t, func(tx *engine.Txn) error {
		for i := range MaxFilters + 1 {
			if _, err := tx.AddFilter(engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionBlock},
				Conditions: []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(i))}}}); err != nil {
				return err
			}
		}
		return nil
	})
	if _, err := Compile(e.View()); !errors.Is(err, ErrCapacity) {
		t.Fatalf("Compile: %v, want ErrCapacity", err)
	}
}

func TestRangePrefixes(t *testing.T) {
	for _, c := range []struct {
		lo, hi string
		want   int
	}{
		{"10.0.0.0", "10.0.0.255", 1}, {"10.0.0.1", "10.0.0.2", 2}, {"0.0.0.0", "255.255.255.255", 1},
		{"10.0.0.1", "10.0.0.1", 1}, {"::", "::3", 1}, {"10.0.0.5", "10.0.1.3", 8},
	} {
		ps := rangePrefixes(netip.MustParseAddr(c.lo), netip.MustParseAddr(c.hi))
		if len(ps) != c.want {
			t.Errorf("%s-%s: %v", c.lo, c.hi, ps)
		}
		// Every prefix lies in the range and they tile it without gaps.
		next := netip.MustParseAddr(c.lo)
		for _, p := range ps {
			if p.Addr() != next {
				t.Fatalf("%s-%s: gap before %s", c.lo, c.hi, p)
			}
			next = lastAddr(p).Next()
		}
		if last := lastAddr(ps[len(ps)-1]); last != netip.MustParseAddr(c.hi) {
			t.Fatalf("%s-%s ends at %s", c.lo, c.hi, last)
		}
	}
}

// tenThousand is the benchmark policy: 10,000 filters at AUTH_CONNECT_V4 in
// two sublayers, on remote addresses (exact and /24), ports (exact and
// ranges) and protocol, none of which matches 127.0.0.1.
func tenThousand(t testing.TB) *engine.Engine {
	return buildEngine(t, func(tx *engine.Txn) error {
		sub, err := tx.AddSublayer(engine.Sublayer{Name: "bench", Weight: 10})
		if err != nil {
			return err
		}
		for i := range 10000 {
			f := engine.Filter{Layer: engine.LayerALEAuthConnectV4, Action: engine.Action{Type: engine.ActionBlock}}
			if i%2 == 0 {
				f.Sublayer = sub
			}
			a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
			switch i % 10 {
			case 0, 1, 2, 3, 4, 5:
				f.Conditions = []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(a)}}
			case 6, 7:
				f.Conditions = []engine.Condition{
					{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Prefix(netip.PrefixFrom(netip.AddrFrom4([4]byte{11, byte(i >> 8), byte(i), 0}), 24))},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(443)},
				}
			case 8:
				f.Conditions = []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(uint16(1 + i/10))}}
			default:
				lo := uint16(2000 + i/10*2)
				f.Conditions = []engine.Condition{
					{Field: engine.FieldIPRemotePort, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(lo), engine.Uint16(lo+1))},
					{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)},
				}
			}
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
}

func BenchmarkCompile10k(b *testing.B) {
	e := tenThousand(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Compile(e.View()); err != nil {
			b.Fatal(err)
		}
	}
}
