package engine_test

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"fwp/engine"
)

// The differential tests: random filter sets × random tuples, where the
// engine's compiled index and the slow reference (reference_test.go) must
// agree on action, hard/soft, deciding filter, veto and absorb, both for
// Classify (callouts called) and Explain (callouts not called).

// dgen draws the random choices. Its choices come first from data (the
// fuzzer's bytes, so that the fuzzer steers them) and then from a PCG
// seeded from data, so every input yields a full, deterministic case.
type dgen struct {
	data []byte
	pos  int
	pcg  *rand.PCG
}

func newDgen(data []byte, seed uint64) *dgen {
	h := fnv.New64a()
	h.Write(data)
	return &dgen{data: data, pcg: rand.NewPCG(seed, h.Sum64())}
}

// intn returns a number in [0, n); n must be positive.
func (g *dgen) intn(n int) int {
	if g.pos < len(g.data) {
		if n <= 256 {
			b := g.data[g.pos]
			g.pos++
			return int(b) % n
		}
		if g.pos+4 <= len(g.data) {
			x := binary.LittleEndian.Uint32(g.data[g.pos:])
			g.pos += 4
			return int(x % uint32(n))
		}
		g.pos = len(g.data)
	}
	return int(g.pcg.Uint64() % uint64(n))
}

func (g *dgen) chance(pct int) bool { return g.intn(100) < pct }
func (g *dgen) u64() uint64 {
	return uint64(g.intn(1<<30))<<34 ^ uint64(g.intn(1<<30))<<4 ^ uint64(g.intn(16))
}

func pick[T any](g *dgen, xs []T) T { return xs[g.intn(len(xs))] }

// diffLayers are the layers the cases run on: they carry every kind of field.
var diffLayers = []engine.LayerID{
	engine.LayerALEAuthConnectV4, engine.LayerALEAuthConnectV6,
	engine.LayerALEAuthRecvAcceptV4, engine.LayerALEAuthRecvAcceptV6,
	engine.LayerALEConnectRedirectV4, engine.LayerALEFlowEstablishedV6,
}

// diffPools are the values one case draws both filters and tuples from, so
// that matches are frequent.
type diffPools struct {
	v6        bool
	selective bool // filters have two or more conditions
	addrs     []netip.Addr
	ports     []uint16
	apps      []string
	users     []uint32
	cgroup    []string
}

var diffAppPaths = []string{
	"/usr/bin/curl", "/usr/bin/wget", "/usr/lib/firefox/firefox", "/opt/app/bin/server",
	"/usr/sbin/sshd", "/usr/bin/ssh", "/usr/local/bin/agent", "/usr/bin/python3",
	"/home/u/bin/tool", "/snap/bin/Chromium",
}

// newDiffPools draws the pools; scale multiplies their sizes, so that large
// filter sets spread over many index buckets.
func newDiffPools(g *dgen, v6 bool, scale int) *diffPools {
	p := &diffPools{v6: v6}
	for range (2 + g.intn(7)) * scale {
		var a netip.Addr
		if v6 {
			var b [16]byte
			b[0], b[1] = 0x20, 0x01
			b[2] = byte(g.intn(3 * scale)) // few /24s so prefixes nest
			for i := 3; i < 16; i++ {
				if g.chance(50) {
					b[i] = byte(g.intn(256))
				}
			}
			a = netip.AddrFrom16(b)
		} else {
			a = netip.AddrFrom4([4]byte{10, byte(g.intn(3 * scale)), byte(g.intn(4)), byte(g.intn(256))})
		}
		p.addrs = append(p.addrs, a)
	}
	common := []uint16{22, 53, 80, 443, 8080, 0, 65535, 1024}
	for range (2 + g.intn(6)) * scale {
		if g.chance(60 / scale) {
			p.ports = append(p.ports, pick(g, common))
		} else {
			p.ports = append(p.ports, uint16(g.intn(65536)))
		}
	}
	for range (1 + g.intn(5)) * scale {
		a := pick(g, diffAppPaths)
		if scale > 1 {
			a = fmt.Sprintf("%s%d", a, g.intn(10*scale))
		}
		p.apps = append(p.apps, a)
	}
	for range 1 + g.intn(3) {
		p.users = append(p.users, uint32(g.intn(3))*1000)
	}
	for range 1 + g.intn(3) {
		p.cgroup = append(p.cgroup, pick(g, []string{"/system.slice/a.service", "/user.slice/user-1000.slice", "/system.slice/b.service", "/"}))
	}
	return p
}

// near returns an address next to or inside the pool's addresses.
func (p *diffPools) near(g *dgen) netip.Addr {
	a := pick(g, p.addrs)
	switch g.intn(4) {
	case 0:
		return a.Next()
	case 1:
		if pa := a.Prev(); pa.IsValid() {
			return pa
		}
	case 2:
		b := a.AsSlice()
		b[len(b)-1] ^= byte(g.intn(256))
		if g.chance(30) {
			b[len(b)-2] ^= byte(g.intn(256))
		}
		x, _ := netip.AddrFromSlice(b)
		return x
	}
	return a
}

func (p *diffPools) prefix(g *dgen) netip.Prefix {
	bits := 128
	if !p.v6 {
		bits = 32
	}
	n := g.intn(bits + 1)
	if g.chance(50) { // the common lengths
		n = bits - 8*g.intn(bits/8+1)
	}
	if p.selective {
		n = bits/2 + g.intn(bits/2+1)
	}
	pf, _ := p.near(g).Prefix(n)
	return pf
}

func (p *diffPools) port(g *dgen) uint16 {
	x := pick(g, p.ports)
	switch g.intn(5) {
	case 0:
		return x + uint16(g.intn(3)) - 1 // may wrap at 0 and 65535: fine
	case 1:
		return uint16(g.intn(65536))
	}
	return x
}

// app varies the pool's paths in case and length.
func (p *diffPools) app(g *dgen) string {
	a := pick(g, p.apps)
	switch g.intn(6) {
	case 0:
		return strings.ToUpper(a)
	case 1:
		return a[:g.intn(len(a)+1)]
	case 2:
		return a + "x"
	}
	return a
}

// cut returns a prefix of s: any length, or at least half of s in a
// selective set.
func (p *diffPools) cut(g *dgen, s string) string {
	if p.selective {
		return s[:len(s)/2+g.intn(len(s)-len(s)/2+1)]
	}
	return s[:g.intn(len(s)+1)]
}

// foreign returns an address outside the pools' networks.
func (p *diffPools) foreign(g *dgen) netip.Addr {
	if p.v6 {
		return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(g.intn(256))})
	}
	return netip.AddrFrom4([4]byte{192, 168, byte(g.intn(256)), byte(g.intn(256))})
}

func addrRange(g *dgen, p *diffPools) engine.Value {
	a, b := p.near(g), p.near(g)
	if b.Less(a) {
		a, b = b, a
	}
	return engine.Range(engine.Addr(a), engine.Addr(b))
}

func uintRange[T uint16 | uint32](mk func(T) engine.Value, a, b T) engine.Value {
	if b < a {
		a, b = b, a
	}
	return engine.Range(mk(a), mk(b))
}

// condition draws one condition on field f.
func (p *diffPools) condition(g *dgen, f engine.FieldID) engine.Condition {
	c := engine.Condition{Field: f}
	// kind picks one of n cases; the first pos of them are the narrow,
	// positive ones (equal, prefix, range), which a selective set nearly always takes.
	kind := func(n, pos int) int {
		if p.selective && g.chance(97) {
			return g.intn(pos)
		}
		return g.intn(n)
	}
	switch f {
	case engine.FieldIPRemoteAddress, engine.FieldIPLocalAddress, engine.FieldALEOriginalRemoteAddress:
		switch kind(9, 5) {
		case 0, 1:
			c.Match, c.Value = engine.MatchEqual, engine.Addr(p.near(g))
		case 2, 3:
			c.Match, c.Value = engine.MatchEqual, engine.Prefix(p.prefix(g))
		case 4:
			c.Match, c.Value = engine.MatchPrefix, engine.Prefix(p.prefix(g))
		case 5:
			c.Match, c.Value = engine.MatchNotEqual, pick(g, []engine.Value{engine.Addr(p.near(g)), engine.Prefix(p.prefix(g))})
		case 6:
			c.Match, c.Value = engine.MatchNotPrefix, engine.Prefix(p.prefix(g))
		case 7:
			c.Match, c.Value = engine.MatchRange, addrRange(g, p)
		default:
			c.Match = pick(g, []engine.MatchType{engine.MatchGreater, engine.MatchLess, engine.MatchGreaterOrEqual, engine.MatchLessOrEqual})
			c.Value = engine.Addr(p.near(g))
		}
	case engine.FieldIPRemotePort, engine.FieldIPLocalPort, engine.FieldALEOriginalRemotePort:
		switch kind(7, 5) {
		case 0, 1, 2:
			c.Match, c.Value = engine.MatchEqual, engine.Uint16(p.port(g))
		case 3, 4:
			lo, hi := p.port(g), p.port(g)
			if p.selective {
				hi = uint16(min(65535, int(lo)+g.intn(1000)))
			}
			c.Match, c.Value = engine.MatchRange, uintRange(engine.Uint16, lo, hi)
		case 5:
			c.Match, c.Value = engine.MatchNotEqual, engine.Uint16(p.port(g))
		default:
			c.Match = pick(g, []engine.MatchType{engine.MatchGreater, engine.MatchLess, engine.MatchGreaterOrEqual, engine.MatchLessOrEqual})
			c.Value = engine.Uint16(p.port(g))
		}
	case engine.FieldIPProtocol:
		c.Match = []engine.MatchType{engine.MatchEqual, engine.MatchEqual, engine.MatchNotEqual}[kind(3, 2)]
		c.Value = engine.Uint8(pick(g, []uint8{6, 17, 1}))
		if g.chance(15) {
			c.Match, c.Value = engine.MatchRange, engine.Range(engine.Uint8(6), engine.Uint8(17))
		}
	case engine.FieldALEAppID, engine.FieldCgroupPath:
		src := p.app
		if f == engine.FieldCgroupPath {
			src = func(g *dgen) string { return pick(g, p.cgroup) }
		}
		switch kind(6, 4) {
		case 0, 1:
			c.Match, c.Value = engine.MatchEqual, engine.String(src(g))
		case 2:
			c.Match, c.Value = engine.MatchEqualCaseInsensitive, engine.String(src(g))
		case 3:
			s := src(g)
			c.Match, c.Value = engine.MatchPrefix, engine.String(p.cut(g, s))
		case 4:
			s := src(g)
			c.Match, c.Value = engine.MatchNotPrefix, engine.String(p.cut(g, s))
		default:
			c.Match, c.Value = engine.MatchNotEqual, engine.String(src(g))
		}
	case engine.FieldALEUserID, engine.FieldALEGroupID, engine.FieldIPLocalInterface:
		u := pick(g, p.users)
		switch kind(4, 2) {
		case 0:
			c.Match, c.Value = engine.MatchEqual, engine.Uint32(u)
		case 1:
			c.Match, c.Value = engine.MatchRange, uintRange(engine.Uint32, u, uint32(g.intn(3000)))
		case 2:
			c.Match, c.Value = engine.MatchNotEqual, engine.Uint32(u)
		default:
			c.Match = pick(g, []engine.MatchType{engine.MatchGreater, engine.MatchLess, engine.MatchGreaterOrEqual, engine.MatchLessOrEqual})
			c.Value = engine.Uint32(u)
		}
	case engine.FieldFlags:
		c.Match = []engine.MatchType{engine.MatchFlagsAllSet, engine.MatchFlagsAnySet, engine.MatchFlagsNoneSet}[kind(3, 2)]
		c.Value = engine.Uint32(diffFlags(g))
	case engine.FieldDirection:
		c.Match, c.Value = engine.MatchEqual, engine.Uint32(uint32(g.intn(2)))
	case engine.FieldCgroupID, engine.FieldCompartment:
		c.Match = []engine.MatchType{engine.MatchEqual, engine.MatchNotEqual, engine.MatchGreater, engine.MatchLessOrEqual}[kind(4, 1)]
		c.Value = engine.Uint64(uint64(g.intn(4)))
	default:
		panic(fmt.Sprintf("no generator for field %s", f))
	}
	return c
}

func diffFlags(g *dgen) uint32 {
	bitsPool := []uint32{engine.FlagIsLoopback, engine.FlagIsReauthorize, engine.FlagIsConnectionRedirected, engine.FlagIsWildcardBind}
	var x uint32
	for range 1 + g.intn(2) {
		x |= pick(g, bitsPool)
	}
	return x
}

// diffFieldWeights makes the indexed fields the common ones.
var diffFieldWeights = map[engine.FieldID]int{
	engine.FieldIPRemoteAddress: 8, engine.FieldIPRemotePort: 6, engine.FieldALEAppID: 5,
	engine.FieldIPLocalPort: 4, engine.FieldIPLocalAddress: 3,
}

func (p *diffPools) conditions(g *dgen, l *engine.Layer) []engine.Condition {
	var indexed []engine.FieldID // weighted by diffFieldWeights
	for _, f := range l.Fields {
		for range diffFieldWeights[f] {
			indexed = append(indexed, f)
		}
	}
	var conds []engine.Condition
	n := 1 + g.intn(3)
	if p.selective {
		n = 2 + g.intn(3)
	} else if g.chance(4) {
		n = 0 // matches every tuple
	}
	var used []engine.FieldID
	for i := range n {
		f := pick(g, l.Fields)
		if g.chance(70) || (p.selective && i == 0) {
			f = pick(g, indexed)
		}
		if p.selective && slices.Contains(used, f) {
			continue // distinct fields, so that the conditions AND
		}
		used = append(used, f)
		conds = append(conds, p.condition(g, f))
		for range 3 { // ORed with up to three more on the same field
			if !g.chance(20) {
				break
			}
			conds = append(conds, p.condition(g, f))
		}
	}
	return conds
}

// tuple draws incoming values for the layer from the pools.
func (p *diffPools) tuple(g *dgen, l *engine.Layer) *engine.Values {
	vs := &engine.Values{}
	for _, f := range l.Fields {
		if g.chance(4) {
			continue // an absent field
		}
		var v engine.Value
		switch f {
		case engine.FieldIPRemoteAddress, engine.FieldIPLocalAddress, engine.FieldALEOriginalRemoteAddress:
			v = engine.Addr(p.near(g))
			if p.selective && g.chance(40) {
				v = engine.Addr(p.foreign(g))
			}
		case engine.FieldIPRemotePort, engine.FieldIPLocalPort, engine.FieldALEOriginalRemotePort:
			v = engine.Uint16(p.port(g))
		case engine.FieldIPProtocol:
			v = engine.Uint8(pick(g, []uint8{6, 6, 17, 1, 58}))
		case engine.FieldALEAppID:
			v = engine.String(p.app(g))
			if p.selective && g.chance(40) {
				v = engine.String("/nowhere/" + p.app(g))
			}
		case engine.FieldCgroupPath:
			v = engine.String(pick(g, p.cgroup))
		case engine.FieldALEUserID, engine.FieldALEGroupID, engine.FieldIPLocalInterface:
			v = engine.Uint32(pick(g, p.users) + uint32(g.intn(2)))
		case engine.FieldFlags:
			if g.chance(50) {
				v = engine.Uint32(0)
			} else {
				v = engine.Uint32(diffFlags(g))
			}
		case engine.FieldDirection:
			v = engine.Uint32(uint32(g.intn(2)))
		case engine.FieldCgroupID, engine.FieldCompartment:
			v = engine.Uint64(uint64(g.intn(4)))
		}
		vs.Set(f, v)
	}
	return vs
}

// diffCalloutFunc is a deterministic callout: its answer is a hash of the
// filter, the tuple and the rights it is given. style selects its manners:
// 0 honours the right (without it, it only vetoes), 1 ignores it, 2 always
// clears it when deciding.
func diffCalloutFunc(salt uint64, style int) engine.ClassifyFunc {
	return func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		h := fnv.New64a()
		var b [16]byte
		binary.LittleEndian.PutUint64(b[:], salt)
		binary.LittleEndian.PutUint64(b[8:], uint64(req.Filter.ID)<<1|uint64(out.Rights))
		h.Write(b[:])
		h.Write([]byte(req.Values.String()))
		x := h.Sum64()
		act := [...]engine.ActionType{engine.ActionPermit, engine.ActionBlock, engine.ActionContinue, engine.ActionBlock}[x%4]
		if style == 0 && !out.CanWrite() && act != engine.ActionBlock {
			return
		}
		out.Action = act
		if act == engine.ActionContinue {
			return
		}
		if style == 2 || (x>>8)%3 == 0 {
			out.Rights &^= engine.RightActionWrite
		}
		if act == engine.ActionBlock && (x>>16)%4 == 0 {
			out.Flags |= engine.OutAbsorb
		}
	}
}

// diffCase is one engine with a random filter set on one layer.
type diffCase struct {
	e     *engine.Engine
	layer *engine.Layer
	pools *diffPools
	regs  map[string]*engine.CalloutRegistration
	ref   *refModel
	stats diffStats
}

// diffStats counts the kinds of outcomes a test met, so that a test whose
// cases never reach a rule fails instead of passing vacuously.
type diffStats map[string]int

func (st diffStats) add(o refOutcome, m *refModel) {
	switch {
	case o.Filter == 0:
		st["no match"]++
	case o.Veto:
		st["veto"]++
	case o.Hard:
		st[o.Action.String()+" hard"]++
	default:
		st[o.Action.String()+" soft"]++
	}
	if o.Absorb {
		st["absorb"]++
	}
	for _, f := range m.filters {
		if f.ID == o.Filter && f.Action.Type.IsCallout() {
			st["by "+f.Action.Type.String()]++
		}
	}
}

// require fails t unless every named outcome occurred.
func (st diffStats) require(t testing.TB, kinds ...string) {
	t.Helper()
	t.Logf("outcomes: %v", map[string]int(st))
	for _, k := range kinds {
		if st[k] == 0 {
			t.Errorf("no case reached outcome %q", k)
		}
	}
}

func (st diffStats) merge(o diffStats) {
	for k, n := range o {
		st[k] += n
	}
}

// caseSize bounds a generated case.
type caseSize struct {
	filters   int            // at most this many
	minFilter int            // at least this many (and at least one)
	sublayers int            // extra sublayers besides the universal one, at most
	callouts  int            // at most
	layer     engine.LayerID // 0: one of diffLayers
	scale     int            // pool size multiplier (0 means 1)
	selective bool           // two or more conditions per filter
}

func buildDiffCase(t testing.TB, g *dgen, size caseSize) *diffCase {
	t.Helper()
	l := engine.LayerByID(size.layer)
	if l == nil {
		l = engine.LayerByID(pick(g, diffLayers))
	}
	dc := &diffCase{e: engine.New(engine.Options{}), layer: l, pools: newDiffPools(g, l.V6, max(1, size.scale)), regs: map[string]*engine.CalloutRegistration{}}
	dc.pools.selective = size.selective
	var subs []engine.SublayerID
	var callouts []engine.CalloutID
	err := dc.e.Update(func(tx *engine.Txn) error {
		subs = append(subs, 0) // the universal sublayer
		for range g.intn(size.sublayers + 1) {
			// Few distinct weights, so that equal sublayer weights occur.
			id, err := tx.AddSublayer(engine.Sublayer{Weight: uint16(g.intn(4)) * 0x4000})
			if err != nil {
				return err
			}
			subs = append(subs, id)
		}
		for i := range g.intn(size.callouts + 1) {
			key := fmt.Sprintf("diff-callout-%d", i)
			id, err := tx.AddCallout(engine.Callout{Key: key, Layer: l.ID})
			if err != nil {
				return err
			}
			callouts = append(callouts, id)
			if g.chance(75) { // the rest stay unregistered
				dc.regs[key] = &engine.CalloutRegistration{Classify: diffCalloutFunc(uint64(g.intn(1<<30)), g.intn(3))}
			}
		}
		for range max(1, size.minFilter) + g.intn(size.filters-size.minFilter) {
			if _, err := tx.AddFilter(dc.randomFilter(g, l, subs, callouts)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("building a case: %v", err)
	}
	for key, reg := range dc.regs {
		if err := dc.e.RegisterCallout(key, *reg); err != nil {
			t.Fatalf("register %s: %v", key, err)
		}
	}
	dc.ref, err = newRefModel(dc.e.View(), l.ID, dc.regs)
	if err != nil {
		t.Fatal(err)
	}
	return dc
}

func (dc *diffCase) randomFilter(g *dgen, l *engine.Layer, subs []engine.SublayerID, callouts []engine.CalloutID) engine.Filter {
	f := engine.Filter{Layer: l.ID, Sublayer: pick(g, subs), Conditions: dc.pools.conditions(g, l)}
	switch g.intn(3) {
	case 0:
		f.Weight = engine.WeightAuto()
	case 1:
		f.Weight = engine.WeightIndex(uint8(g.intn(16)))
	default:
		if g.chance(50) {
			f.Weight = engine.WeightExact(uint64(g.intn(4))) // ties
		} else {
			f.Weight = engine.WeightExact(g.u64())
		}
	}
	f.Action.Type = pick(g, []engine.ActionType{engine.ActionBlock, engine.ActionPermit, engine.ActionPermit})
	if len(callouts) > 0 && g.chance(30) {
		f.Action = engine.Action{Type: pick(g, []engine.ActionType{engine.ActionCalloutTerminating, engine.ActionCalloutInspection, engine.ActionCalloutUnknown}), Callout: pick(g, callouts)}
		if f.Action.Type != engine.ActionCalloutInspection && g.chance(40) {
			f.Flags |= engine.FilterPermitIfCalloutUnregistered
		}
	}
	if g.chance(25) {
		f.Flags |= engine.FilterClearActionRight
	}
	if g.chance(5) {
		f.Flags |= engine.FilterDisabled
	}
	return f
}

// check classifies vs with the engine and the reference, with and without
// callouts, and reports a difference with the engine's trace.
func (dc *diffCase) check(t testing.TB, vs *engine.Values) {
	t.Helper()
	got := refOutcomeOf(dc.e.Classify(dc.layer.ID, vs, nil))
	want := dc.ref.classify(vs, nil, false)
	tr, err := dc.e.Explain(dc.layer.ID, vs, nil)
	if err != nil {
		t.Fatal(err)
	}
	gotDry := refOutcomeOf(tr.Result)
	wantDry := dc.ref.classify(vs, nil, true)
	if dc.stats == nil {
		dc.stats = diffStats{}
	}
	dc.stats.add(want, dc.ref)
	if got == want && gotDry == wantDry {
		return
	}
	var b strings.Builder
	fmt.Fprintf(&b, "layer %s tuple %s\n", dc.layer.Name, vs)
	fmt.Fprintf(&b, "classify: engine %s, reference %s\n", got, want)
	fmt.Fprintf(&b, "explain:  engine %s, reference %s\n", gotDry, wantDry)
	b.WriteString("filters in the reference's order:\n")
	for _, f := range dc.ref.filters {
		reg := ""
		if f.Action.Type.IsCallout() {
			reg = fmt.Sprintf(" callout=%d registered=%v", f.Action.Callout, dc.ref.regs[f.Action.Callout] != nil)
		}
		fmt.Fprintf(&b, "  %s sub=%d w=%#x %s flags=%s%s conds=%v matches=%v\n", f.ID, f.Sublayer, f.EffectiveWeight,
			f.Action.Type, f.Flags, reg, f.Conditions, refFilterMatches(&f, vs))
	}
	b.WriteString("explain trace:\n" + tr.String())
	t.Fatal(b.String())
}

func (dc *diffCase) checkTuples(t testing.TB, g *dgen, n int) {
	t.Helper()
	for range n {
		dc.check(t, dc.pools.tuple(g, dc.layer))
	}
}

func TestDifferentialSmallSets(t *testing.T) {
	cases, tuples := 400, 40
	if testing.Short() {
		cases = 100
	}
	all := diffStats{}
	for i := range cases {
		g := newDgen(nil, uint64(i))
		dc := buildDiffCase(t, g, caseSize{filters: 60, sublayers: 4, callouts: 5})
		dc.checkTuples(t, g, tuples)
		all.merge(dc.stats)
	}
	all.require(t, "no match", "permit soft", "permit hard", "block soft", "block hard", "veto", "absorb",
		"by callout_terminating", "by callout_unknown")
}

// TestDifferentialLargeSets uses sets big enough that every index (port
// segments, prefix lengths, app buckets, the wildcard list) holds many
// filters: on random layers, then on v6 layers (where selective sets'
// remote prefixes are /64 to /128).
func TestDifferentialLargeSets(t *testing.T) {
	for i, layer := range []engine.LayerID{0, 0, 0, engine.LayerALEAuthConnectV6, engine.LayerALEAuthRecvAcceptV6, engine.LayerALEFlowEstablishedV6} {
		g := newDgen(nil, 1000+uint64(i))
		dc := buildDiffCase(t, g, caseSize{filters: 3000, minFilter: 2000, sublayers: 5, callouts: 6, scale: 20, selective: true, layer: layer})
		if n := len(dc.ref.filters); n < 1800 {
			t.Fatalf("case %d has only %d enabled filters", i, n)
		}
		dc.checkTuples(t, g, 400)
		dc.stats.require(t, "permit soft", "permit hard", "block hard")
	}
}

// addPlain adds n plain permit/block filters with conds(i)'s conditions in
// random sublayers, and rebuilds the reference model.
func (dc *diffCase) addPlain(t *testing.T, g *dgen, n int, conds func(i int) []engine.Condition) {
	t.Helper()
	subs := []engine.SublayerID{0}
	for _, s := range dc.e.View().Sublayers(0) {
		subs = append(subs, s.ID)
	}
	err := dc.e.Update(func(tx *engine.Txn) error {
		for i := range n {
			f := engine.Filter{Layer: dc.layer.ID, Sublayer: pick(g, subs), Weight: engine.WeightAuto(),
				Action:     engine.Action{Type: pick(g, []engine.ActionType{engine.ActionPermit, engine.ActionBlock})},
				Conditions: conds(i)}
			if g.chance(30) {
				f.Flags |= engine.FilterClearActionRight
			}
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if dc.ref, err = newRefModel(dc.e.View(), dc.layer.ID, dc.regs); err != nil {
		t.Fatal(err)
	}
}

// TestDifferentialScanFallback builds sets where one tuple meets more
// candidate lists than the index merges on the stack (every prefix length
// of its remote address holds a filter), so classification falls back to
// scanning the layer; the reference must still agree.
func TestDifferentialScanFallback(t *testing.T) {
	for i, v6 := range []bool{false, true} {
		g := newDgen(nil, 2000+uint64(i))
		layer := engine.LayerFor(engine.KindAuthConnect, v6)
		dc := buildDiffCase(t, g, caseSize{filters: 200, sublayers: 3, callouts: 3, layer: layer})
		target := pick(g, dc.pools.addrs)
		dc.addPlain(t, g, target.BitLen()+1, func(bits int) []engine.Condition {
			pf, _ := target.Prefix(bits)
			return []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Prefix(pf)}}
		})
		for range 300 {
			vs := dc.pools.tuple(g, dc.layer)
			if g.chance(70) {
				vs.Set(engine.FieldIPRemoteAddress, engine.Addr(target))
			}
			dc.check(t, vs)
		}
	}
}

// TestDifferentialBigBuckets fills single index maps past the size from
// which the engine keeps presence bitmaps beside them (thousands of /32
// and /24 remote addresses, remote and local ports), then checks tuples
// that hit and miss them.
func TestDifferentialBigBuckets(t *testing.T) {
	g := newDgen(nil, 3000)
	dc := buildDiffCase(t, g, caseSize{filters: 30, sublayers: 3, callouts: 3, layer: engine.LayerALEAuthConnectV4, selective: true})
	var hosts, nets []netip.Addr
	var ports []uint16
	for i := range 2000 {
		a := netip.AddrFrom4([4]byte{byte(1 + g.intn(200)), byte(g.intn(256)), byte(g.intn(256)), byte(g.intn(256))})
		hosts = append(hosts, a)
		nets = append(nets, netip.AddrFrom4([4]byte{byte(1 + g.intn(200)), byte(g.intn(256)), byte(g.intn(256)), 0}))
		ports = append(ports, uint16(i*31+7))
	}
	dc.addPlain(t, g, 8000, func(i int) []engine.Condition {
		switch i % 4 {
		case 0:
			return []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(hosts[i/4])}}
		case 1:
			return []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Prefix(netip.PrefixFrom(nets[i/4], 24))}}
		case 2:
			return []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(ports[i/4])}}
		}
		return []engine.Condition{{Field: engine.FieldIPLocalPort, Match: engine.MatchEqual, Value: engine.Uint16(ports[i/4])}}
	})
	for range 800 {
		vs := dc.pools.tuple(g, dc.layer)
		switch g.intn(4) {
		case 0:
			vs.Set(engine.FieldIPRemoteAddress, engine.Addr(pick(g, hosts)))
		case 1:
			n := pick(g, nets).As4()
			n[3] = byte(g.intn(256))
			vs.Set(engine.FieldIPRemoteAddress, engine.Addr(netip.AddrFrom4(n)))
		case 2:
			vs.Set(engine.FieldIPRemoteAddress, engine.Addr(netip.AddrFrom4([4]byte{byte(1 + g.intn(200)), byte(g.intn(256)), byte(g.intn(256)), byte(g.intn(256))})))
		}
		if g.chance(50) {
			vs.Set(engine.FieldIPRemotePort, engine.Uint16(pick(g, ports)))
		}
		if g.chance(50) {
			vs.Set(engine.FieldIPLocalPort, engine.Uint16(pick(g, ports)+uint16(g.intn(2))))
		}
		dc.check(t, vs)
	}
	dc.stats.require(t, "permit soft", "permit hard", "block hard")
}

// TestDifferentialBigBucketsV6 is TestDifferentialBigBuckets for v6:
// thousands of exact hosts and of prefixes from /8 to /120 (maps of every
// size, each with a presence bitmap), and filters keyed on an app or a
// port whose short v6 remote prefix only the quick check tests. Tuples hit
// those, miss them by the last bit inside a prefix, hit them with the
// first bit past it flipped, or carry a v4(-mapped) address.
func TestDifferentialBigBucketsV6(t *testing.T) {
	g := newDgen(nil, 3100)
	dc := buildDiffCase(t, g, caseSize{filters: 30, sublayers: 3, callouts: 3, layer: engine.LayerALEAuthConnectV6, selective: true})
	addr6 := func() netip.Addr {
		var b [16]byte
		for i := range b {
			b[i] = byte(g.intn(256))
		}
		b[0], b[1] = 0x20, byte(g.intn(4)) // shared top bits, as a region's networks have
		return netip.AddrFrom16(b)
	}
	var hosts []netip.Addr
	var nets []netip.Prefix
	for range 1500 {
		hosts = append(hosts, addr6())
		bits := pick(g, []int{8, 16, 24, 32, 33, 40, 48, 56, 63, 64, 64, 64, 65, 72, 96, 120})
		nets = append(nets, netip.PrefixFrom(addr6(), bits).Masked())
	}
	var ports []uint16
	for range 40 {
		ports = append(ports, uint16(g.intn(65536)))
	}
	netCond := func(n netip.Prefix) engine.Condition {
		return engine.Condition{Field: engine.FieldIPRemoteAddress, Match: pick(g, []engine.MatchType{engine.MatchEqual, engine.MatchPrefix}), Value: engine.Prefix(n)}
	}
	dc.addPlain(t, g, 6000, func(i int) []engine.Condition {
		h, n := hosts[i/4], nets[i/4]
		switch i % 4 {
		case 0:
			return []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(h)}}
		case 1:
			return []engine.Condition{netCond(n)}
		case 2: // keyed on the app up to /49, the quick check tests the prefix
			return []engine.Condition{netCond(n), {Field: engine.FieldALEAppID, Match: engine.MatchEqual, Value: engine.String(pick(g, dc.pools.apps))}}
		}
		// keyed on the port up to /34
		return []engine.Condition{netCond(n), {Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(pick(g, ports))}}
	})
	// flip returns a with bit i (from the top) inverted.
	flip := func(a netip.Addr, i int) netip.Addr {
		b := a.As16()
		b[i/8] ^= 0x80 >> (i % 8)
		return netip.AddrFrom16(b)
	}
	for range 1500 {
		vs := dc.pools.tuple(g, dc.layer)
		n := pick(g, nets)
		inside := n.Addr().As16() // n's address with random bits past the prefix
		for i := n.Bits(); i < 128; i++ {
			if g.chance(50) {
				inside[i/8] |= 0x80 >> (i % 8)
			}
		}
		var a netip.Addr
		switch g.intn(7) {
		case 0:
			a = pick(g, hosts)
		case 1:
			a = flip(pick(g, hosts), 127-g.intn(8))
		case 2:
			a = netip.AddrFrom16(inside)
		case 3:
			a = flip(netip.AddrFrom16(inside), max(0, n.Bits()-1)) // just outside
		case 4:
			a = flip(n.Addr(), min(127, n.Bits())) // just past the prefix: inside
		case 5:
			a = netip.AddrFrom4([4]byte{byte(g.intn(256)), byte(g.intn(256)), 0, 1})
			if g.chance(50) {
				a = netip.AddrFrom16(a.As16()) // v4-mapped; Addr unmaps it
			}
		default:
			a = addr6()
		}
		vs.Set(engine.FieldIPRemoteAddress, engine.Addr(a))
		if g.chance(60) {
			vs.Set(engine.FieldIPRemotePort, engine.Uint16(pick(g, ports)))
		}
		if g.chance(60) {
			vs.Set(engine.FieldALEAppID, engine.String(pick(g, dc.pools.apps)))
		}
		dc.check(t, vs)
	}
	dc.stats.require(t, "no match", "permit soft", "permit hard", "block soft", "block hard")
}

// FuzzClassify: the input seeds a generated filter set and tuples; the
// engine and the reference must agree on every one.
func FuzzClassify(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7})
	f.Add([]byte("fwp differential seed: callouts and sublayers"))
	f.Add([]byte{1, 9, 9, 9, 1, 0, 0, 255, 255, 3, 3, 3, 3, 70, 70, 70, 70, 70, 70})
	f.Add([]byte{5, 200, 4, 4, 2, 2, 2, 2, 99, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1})
	// The first byte picks the layer (diffLayers): v6 ones at 1, 3 and 5,
	// with pools of one /24 so that prefixes and addresses collide.
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{3, 8, 0, 255, 1, 255, 0, 7, 64, 64, 128, 120, 96, 48, 1, 2, 3})
	f.Add([]byte("\x01v6 AUTH_CONNECT: prefixes, ports and apps"))
	f.Add([]byte("\x05v6 FLOW_ESTABLISHED with callouts and sublayers"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4096 { // bounds one input's work; the PCG carries on after the bytes
			return
		}
		g := newDgen(data, 0xf00d)
		dc := buildDiffCase(t, g, caseSize{filters: 40, sublayers: 3, callouts: 4})
		dc.checkTuples(t, g, 16)
	})
}
