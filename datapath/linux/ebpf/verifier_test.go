//go:build linux

package ebpf

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"fwp/engine"
	"fwp/internal/testutil"
)

// verifierBudget bounds the instructions the verifier processes per
// program (the kernel's limit is 1M): a guard on the headroom left for
// the evaluator to grow, independent of machine speed.
const verifierBudget = 200_000

var processedRe = regexp.MustCompile(`processed (\d+) insns`)

// TestVerifierHeadroom loads the programs with verifier statistics and
// checks every program stays well inside the verifier's budget. With -v it
// prints each program's processed instructions and the load time.
func TestVerifierHeadroom(t *testing.T) {
	testutil.RequireRoot(t)
	spec, err := loadFwp()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats},
	})
	if err != nil {
		testutil.Unavailable(t, err)
	}
	defer coll.Close()
	t.Logf("load: %v", time.Since(start).Round(time.Millisecond))
	names := make([]string, 0, len(coll.Programs))
	for name := range coll.Programs {
		names = append(names, name)
	}
	slices.Sort(names)
	var total int
	for _, name := range names {
		m := processedRe.FindStringSubmatch(coll.Programs[name].VerifierLog)
		if m == nil {
			t.Fatalf("%s: no \"processed N insns\" in the verifier log", name)
		}
		n, _ := strconv.Atoi(m[1])
		total += n
		t.Logf("%-20s %7d insns processed", name, n)
		if n > verifierBudget {
			t.Errorf("%s: the verifier processed %d instructions, over the budget of %d", name, n, verifierBudget)
		}
	}
	t.Logf("%-20s %7d insns processed", "total", total)
}

// TestKernelMatchesEngineLarge checks the kernel's walk against the engine
// across every bitset word and summary chunk: the random policies of
// TestKernelMatchesEngine stay within the first word. 12,000 random filters
// (mixed actions, weights, sublayers, hard and soft) mostly match one of
// 300 remote ports, so each port's verdict depends on exact ranks spread
// over the whole layer.
func TestKernelMatchesEngineLarge(t *testing.T) {
	d, cg := kernelSetup(t)
	r := rand.New(rand.NewPCG(6, 6))
	const ports = 300
	port := func() engine.Value { return engine.Uint16(uint16(1 + r.IntN(ports))) }
	e := buildEngine(t, func(tx *engine.Txn) error {
		subs := []engine.SublayerID{engine.UniversalSublayer}
		for i := range 3 {
			id, err := tx.AddSublayer(engine.Sublayer{Name: fmt.Sprint("s", i), Weight: uint16(r.IntN(4) * 100)})
			if err != nil {
				return err
			}
			subs = append(subs, id)
		}
		for i := range 12000 {
			kind := engine.KindAuthConnect
			if i%4 == 0 {
				kind = engine.KindConnectRedirect
			}
			f := engine.Filter{Layer: engine.LayerFor(kind, false), Sublayer: subs[r.IntN(len(subs))],
				Weight: engine.WeightExact(uint64(r.IntN(1000))),
				Action: engine.Action{Type: []engine.ActionType{engine.ActionPermit, engine.ActionPermit, engine.ActionPermit, engine.ActionBlock}[r.IntN(4)]}}
			if r.IntN(2) == 0 {
				f.Flags |= engine.FilterClearActionRight
			}
			switch r.IntN(10) {
			case 0: // a range of ports, UDP only
				lo := 1 + r.IntN(ports)
				f.Conditions = []engine.Condition{
					{Field: engine.FieldIPRemotePort, Match: engine.MatchRange, Value: engine.Range(engine.Uint16(uint16(lo)), engine.Uint16(uint16(lo+r.IntN(5))))},
					{Field: engine.FieldIPProtocol, Match: engine.MatchEqual, Value: engine.Uint8(17)},
				}
			case 1: // loopback and a port
				f.Conditions = []engine.Condition{
					{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Prefix(netip.MustParsePrefix("127.0.0.0/8"))},
					{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: port()},
				}
			case 2: // another network: never matches the probes
				f.Conditions = []engine.Condition{{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Prefix(netip.MustParsePrefix("10.0.0.0/8"))}}
			default:
				f.Conditions = []engine.Condition{{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: port()}}
			}
			if _, err := tx.AddFilter(f); err != nil {
				return err
			}
		}
		return nil
	})
	apply(t, d, e)
	h := testutil.StartHelper(t, cg, "probe")
	var ops []probeOp
	var tuples []tuple
	for p := 1; p <= ports; p++ {
		tp := tuple{proto: 17, remote: netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(p)), cgroup: cg.ID}
		op := probeOp{Net: "udp4", Remote: tp.remote.String()}
		if p%3 == 0 { // some TCP: each is a refused handshake
			tp.proto, op.Net = 6, "tcp4"
		}
		ops = append(ops, op)
		tuples = append(tuples, tp)
	}
	got := probe(t, h, ops)
	blocked := 0
	for i, tp := range tuples {
		switch got[i] {
		case "eperm", "ok", "refused":
		default:
			t.Fatalf("op %+v: %s", ops[i], got[i])
		}
		if got[i] == "eperm" {
			blocked++
		}
		if want := engineBlocks(e, tp); (got[i] == "eperm") != want {
			t.Errorf("op %+v: kernel %s, engine blocks=%v", ops[i], got[i], want)
		}
	}
	t.Logf("%d of %d connects blocked", blocked, len(ops))
	if blocked == 0 || blocked == len(ops) {
		t.Errorf("%d of %d connects blocked: the test proves nothing", blocked, len(ops))
	}
}
