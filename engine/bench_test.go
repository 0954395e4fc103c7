package engine_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"fwp/engine"
)

// The benchmarks run a realistic policy: what a host firewall with a large
// blocklist looks like. Most filters are remote-address entries (exact
// addresses and prefixes of several lengths); then per-application rules
// (app id, often with a remote port), application rules toward networks,
// service rules on remote ports (exact and ranges), listener rules on local
// ports, and a few rules with no indexable condition. Four sublayers of
// different weights, permit and block, no callouts.

const benchLayer = engine.LayerALEAuthConnectV4

// benchLayer6 carries the v6 variant of the policy (newBenchPolicy6): the
// same shape with v6 addresses, whose blocklist is mostly exact hosts and
// /64s, with some /48–/56 networks and /72–/120 prefixes, a third of
// them with a remote port.
const benchLayer6 = engine.LayerALEAuthConnectV6

// benchPolicy is a generated policy and the tuples to classify against it.
type benchPolicy struct {
	layer   engine.LayerID
	filters []engine.Filter // Sublayer holds an index into the four sublayers
	tuples  []engine.Values
}

var benchCommonPorts = []uint16{443, 80, 53, 22, 25, 110, 143, 993, 995, 3306, 5432, 6379, 8080, 8443, 9000, 123}

func benchApps() []string {
	dirs := []string{"/usr/bin/", "/usr/sbin/", "/usr/lib/", "/opt/", "/usr/local/bin/", "/snap/bin/", "/home/user/.local/bin/"}
	apps := make([]string, 1000)
	for i := range apps {
		apps[i] = fmt.Sprintf("%sapp-%03d/bin/prog%d", dirs[i%len(dirs)], i, i%7)
	}
	return apps
}

func randAddr4(r *rand.Rand) netip.Addr {
	// Public-looking space: first octet 1..223, avoiding 10/8 (local side).
	a := byte(1 + r.IntN(222))
	if a == 10 || a == 127 {
		a++
	}
	return netip.AddrFrom4([4]byte{a, byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(256))})
}

// randAddr6 draws a global unicast address (2000::/4) with random bits
// throughout, as hosts under SLAAC or privacy addresses have.
func randAddr6(r *rand.Rand) netip.Addr {
	var b [16]byte
	for i := range b {
		b[i] = byte(r.IntN(256))
	}
	b[0] = 0x20 | b[0]&0x0f
	return netip.AddrFrom16(b)
}

func newBenchPolicy(n int, seed uint64) *benchPolicy { return newBenchPolicyFamily(n, seed, false) }

func newBenchPolicy6(n int, seed uint64) *benchPolicy { return newBenchPolicyFamily(n, seed, true) }

// newBenchPolicyFamily generates the policy on benchLayer, or on
// benchLayer6 with v6 addresses. The v4 policy draws exactly the random
// numbers it drew before the v6 variant existed, so its figures compare
// across versions.
func newBenchPolicyFamily(n int, seed uint64, v6 bool) *benchPolicy {
	r := rand.New(rand.NewPCG(seed, 0xbe7c4))
	apps := benchApps()
	p := &benchPolicy{layer: benchLayer}
	if v6 {
		p.layer = benchLayer6
	}
	var known []netip.Addr // addresses inside filters, for hitting tuples
	proto := func() engine.Condition {
		return engine.Condition{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8([]uint8{6, 6, 6, 17}[r.IntN(4)])}
	}
	remotePrefix := func() engine.Condition {
		if v6 {
			a := randAddr6(r)
			known = append(known, a)
			return blockEntry(r, a, blockShares6)
		}
		a := randAddr4(r)
		known = append(known, a)
		return blockEntry(r, a, blockShares4)
	}
	remotePort := func() engine.Condition {
		if r.IntN(3) > 0 {
			return engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(benchCommonPorts[r.IntN(len(benchCommonPorts))])}
		}
		lo := uint16(1024 + r.IntN(60000))
		return engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(lo), engine.Uint16(lo+uint16(r.IntN(100))))}
	}
	// portCond is a port below maxLo, or one time in rangeOneIn a range of
	// up to width ports from it.
	portCond := func(f engine.FieldID, maxLo, rangeOneIn, width int) engine.Condition {
		lo := uint16(1 + r.IntN(maxLo))
		if r.IntN(rangeOneIn) == 0 {
			return engine.Condition{Field: f, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(lo), engine.Uint16(lo+uint16(r.IntN(width))))}
		}
		return engine.Condition{Field: f, Match: engine.MatchEqual, Value: engine.Uint16(lo)}
	}
	app := func() engine.Condition {
		return engine.Condition{Field: engine.FieldALEAppID, Match: engine.MatchEqual, Value: engine.String(apps[r.IntN(len(apps))])}
	}
	for i := range n {
		var conds []engine.Condition
		act := engine.ActionBlock
		switch k := r.IntN(100); {
		case i < 8: // a handful with nothing to index
			conds = []engine.Condition{{Field: engine.FieldALEUserID, Match: engine.MatchEqual, Value: engine.Uint32(uint32(60000 + i))}}
		case k < 55: // blocklist entries
			conds = []engine.Condition{remotePrefix()}
			if r.IntN(4) == 0 {
				conds = append(conds, proto())
			}
			if v6 && r.IntN(3) == 0 {
				conds = append(conds, remotePort())
			}
		case k < 80: // application rules
			act = engine.ActionPermit
			conds = []engine.Condition{app()}
			if r.IntN(3) > 0 {
				conds = append(conds, remotePort())
			}
			if r.IntN(2) == 0 {
				conds = append(conds, proto())
			}
		case k < 88: // application toward a network
			act = engine.ActionPermit
			conds = []engine.Condition{app(), remotePrefix()}
		case k < 95: // service rules on remote ports
			conds = []engine.Condition{portCond(engine.FieldIPRemotePort, 65000, 2, 50), proto()}
		default: // listener rules on local ports
			act = engine.ActionPermit
			conds = []engine.Condition{portCond(engine.FieldIPLocalPort, 30000, 3, 20), proto()}
		}
		if r.IntN(10) == 0 {
			act = engine.ActionBlock + engine.ActionPermit - act // the other one
		}
		w := engine.WeightAuto()
		if r.IntN(5) == 0 {
			w = engine.WeightIndex(uint8(r.IntN(16)))
		}
		p.filters = append(p.filters, engine.Filter{Layer: p.layer, Sublayer: engine.SublayerID(r.IntN(4)),
			Weight: w, Conditions: conds, Action: engine.Action{Type: act}})
	}
	p.tuples = make([]engine.Values, 4096)
	for i := range p.tuples {
		var remote netip.Addr
		if v6 {
			remote = randAddr6(r)
		} else {
			remote = randAddr4(r)
		}
		if r.IntN(4) == 0 && len(known) > 0 { // a quarter go where some filter points
			remote = known[r.IntN(len(known))]
		}
		rport := benchCommonPorts[r.IntN(len(benchCommonPorts))]
		if r.IntN(5) == 0 {
			rport = uint16(1024 + r.IntN(64000))
		}
		laddr := netip.AddrFrom4([4]byte{10, 0, byte(r.IntN(4)), byte(2 + r.IntN(200))})
		if v6 { // a ULA host
			laddr = netip.AddrFrom16([16]byte{0xfd, 0, 0, 0, 0, 0, 0, byte(r.IntN(4)), 15: byte(2 + r.IntN(200))})
		}
		local := netip.AddrPortFrom(laddr, uint16(32768+r.IntN(28000)))
		vs := &p.tuples[i]
		vs.SetTuple([]uint8{6, 6, 6, 17}[r.IntN(4)], local, netip.AddrPortFrom(remote, rport))
		a := apps[r.IntN(len(apps))]
		if r.IntN(10) == 0 {
			a = "/usr/bin/unknown-tool"
		}
		vs.Set(engine.FieldALEAppID, engine.String(a))
		vs.Set(engine.FieldALEUserID, engine.Uint32(uint32(1000+r.IntN(3))))
		vs.Set(engine.FieldFlags, engine.Uint32(0))
	}
	return p
}

// prefixShare says that draws below k (of 1000) block a prefix of bits.
type prefixShare struct{ k, bits int }

// Blocklists are mostly single hosts (70 %), then v4 /24s or v6 /64s;
// short prefixes are rare (there are only ~220 v4 /8s to block at all).
var (
	blockShares4 = []prefixShare{{3, 8}, {10, 12}, {50, 16}, {80, 20}, {300, 24}}
	blockShares6 = []prefixShare{{20, 48}, {40, 56}, {200, 64}, {215, 72}, {230, 80}, {245, 88},
		{260, 96}, {275, 104}, {290, 112}, {300, 120}}
)

// blockEntry returns a blocklist condition on a or on a prefix of it.
func blockEntry(r *rand.Rand, a netip.Addr, shares []prefixShare) engine.Condition {
	bits := a.BitLen()
	k := r.IntN(1000)
	for _, s := range shares {
		if k < s.k {
			bits = s.bits
			break
		}
	}
	if bits == a.BitLen() {
		return engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(a)}
	}
	return engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Prefix(netip.PrefixFrom(a, bits).Masked())}
}

// install adds the policy's filters to a new engine in one transaction.
func (p *benchPolicy) install(tb testing.TB) *engine.Engine {
	e := engine.New(engine.Options{EventCapacity: 1024})
	err := e.Update(func(tx *engine.Txn) error {
		var subs [4]engine.SublayerID
		for i, w := range []uint16{0xc000, 0x8000, 0x4000, 0x1000} {
			id, err := tx.AddSublayer(engine.Sublayer{Key: fmt.Sprintf("bench-%d", i), Weight: w})
			if err != nil {
				return err
			}
			subs[i] = id
		}
		for _, f := range p.filters {
			f.Sublayer = subs[f.Sublayer]
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	return e
}

func BenchmarkClassify(b *testing.B) { benchClassify(b, newBenchPolicy) }

// BenchmarkClassifyV6 is BenchmarkClassify on the v6 policy.
func BenchmarkClassifyV6(b *testing.B) { benchClassify(b, newBenchPolicy6) }

func benchClassify(b *testing.B, gen func(n int, seed uint64) *benchPolicy) {
	for _, n := range []int{100, 10000, 100000} {
		b.Run(fmt.Sprintf("filters=%d", n), func(b *testing.B) {
			p := gen(n, uint64(n))
			e := p.install(b)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				e.Classify(p.layer, &p.tuples[i&4095], nil)
				i++
			}
		})
	}
}

// BenchmarkClassifyScaling interleaves batches of classifications on the
// 100-filter and the 100k-filter policy in one loop and reports their ratio:
// other load on the machine then slows both alike, so the ratio is steadier
// than one computed from BenchmarkClassify's separate sub-benchmarks.
func BenchmarkClassifyScaling(b *testing.B) { benchScaling(b, newBenchPolicy) }

// BenchmarkClassifyScalingV6 is BenchmarkClassifyScaling on the v6 policy.
func BenchmarkClassifyScalingV6(b *testing.B) { benchScaling(b, newBenchPolicy6) }

func benchScaling(b *testing.B, gen func(n int, seed uint64) *benchPolicy) {
	small, large := gen(100, 100), gen(100000, 100000)
	es, el := small.install(b), large.install(b)
	const batch = 256
	var ts, tl time.Duration
	calls, i := 0, 0
	b.ReportAllocs()
	for b.Loop() {
		t0 := time.Now()
		for j := range batch {
			es.Classify(small.layer, &small.tuples[(i+j)&4095], nil)
		}
		t1 := time.Now()
		for j := range batch {
			el.Classify(large.layer, &large.tuples[(i+j)&4095], nil)
		}
		tl += time.Since(t1)
		ts += t1.Sub(t0)
		i += batch
		calls += batch
	}
	b.ReportMetric(float64(ts.Nanoseconds())/float64(calls), "ns/classify@100")
	b.ReportMetric(float64(tl.Nanoseconds())/float64(calls), "ns/classify@100k")
	b.ReportMetric(float64(tl)/float64(ts), "ratio")
}

// BenchmarkCommit times one transaction that adds 100k filters and commits
// them: validation, the automatic weights and the layer's compilation.
func BenchmarkCommit(b *testing.B) {
	p := newBenchPolicy(100000, 7)
	b.ReportAllocs()
	for b.Loop() {
		p.install(b)
	}
}

// TestClassifyZeroAllocs: the plain filter path (no callouts) allocates
// nothing, whether a tuple is permitted, blocked or matches nothing.
func TestClassifyZeroAllocs(t *testing.T) {
	for _, gen := range []func(int, uint64) *benchPolicy{newBenchPolicy, newBenchPolicy6} {
		p := gen(2000, 3)
		e := p.install(t)
		kinds := map[string]int{}
		for i := range 256 {
			vs := &p.tuples[i]
			r := e.Classify(p.layer, vs, nil)
			kinds[r.Action.String()+map[bool]string{true: " by a filter", false: " by no filter"}[r.Filter != 0]]++
			if allocs := testing.AllocsPerRun(20, func() { e.Classify(p.layer, vs, nil) }); allocs != 0 {
				t.Fatalf("Classify of %s allocates %.1f times per call (%s)", vs, allocs, r)
			}
		}
		t.Logf("%s tuples: %v", engine.LayerByID(p.layer).Name, kinds)
		for _, k := range []string{"permit by a filter", "block by a filter", "permit by no filter"} {
			if kinds[k] == 0 {
				t.Errorf("%s: no tuple was %q: the test does not cover that path", engine.LayerByID(p.layer).Name, k)
			}
		}
	}
}
