package ebpf

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"fwp/engine"
)

// Host tables and collapsed runs (issue 15).
//
// A large address list is mostly v4 hosts of one class: those go to a
// sorted array the kernel binary-searches (fwp_hosts, filled with one
// copy into its mmapped memory) instead of the LPM trie, whose per-entry
// updates made a million-address list take seconds to apply.
//
// A run of separate host filters — filters that differ only in their one
// remote address (a v4 host), of one action and flags, consecutive in the
// layer's evaluation order (so in one sublayer, with no other filter's
// weight between theirs) — is compiled as one filter whose address
// condition is the list of their hosts: for any tuple, the run matches
// when one of its filters does, and decides what that filter would (same
// action, same hardness, the rest of the sublayer skipped), so WFP's
// arbitration against every other filter of the layer is unchanged. The
// decider's filter id, for net events and counters, is looked up by the
// remote address among the run's hosts (fwp_id_runs, fwp_host_ids): the
// first filter of the run in rank order holding it.

// hostTableMin is the fewest hosts of one class that go to a host table;
// smaller lists stay in the LPM trie. runMin is the fewest filters
// collapsed into a run. Variables for tests.
var (
	hostTableMin = 256
	runMin       = 64
)

// maxRuns is MAXRUNS in bpf/fwp.c: collapsed runs per layer.
const maxRuns = 64

// hostBlock is HOST_BLOCK in bpf/fwp.c: hosts per array element.
const hostBlock = 1024

// runBit marks a collapsed run's filter meta id (RUN_BIT).
const runBit = 1 << 63

// DefaultMaxHosts is the default of Options.MaxHosts: host table entries
// of both generations together (4 bytes each, and 4 more for filter ids;
// preallocated: 16 MiB).
const DefaultMaxHosts = 1 << 21

type hostTable struct {
	hosts []uint32 // sorted
	cls   uint32
}

// idRun is a collapsed run's hosts, sorted, and the filter id of each.
type idRun struct {
	hosts []uint32
	ids   []uint32
}

// runKey is what a run's filters share.
type runKey struct {
	sub    engine.SublayerID
	action engine.ActionType
	hard   bool
	rest   string // the other conditions, rendered ("" for none)
}

// runMember reports whether f can be part of a collapsed run, and the key
// runs group by: the layer is v4, the action permit or block, the filter
// has exactly one remote address condition, EQUAL to a host, and its id
// fits the kernel's 32-bit id table.
func runMember(f *engine.Filter) (netip.Addr, runKey, bool) {
	if f.Layer.V6() || uint64(f.ID) > 0xffffffff || (f.Action.Type != engine.ActionBlock && f.Action.Type != engine.ActionPermit) {
		return netip.Addr{}, runKey{}, false
	}
	var host netip.Addr
	k := runKey{sub: f.Sublayer, action: f.Action.Type, hard: f.Flags&engine.FilterClearActionRight != 0}
	var rest []string
	for _, c := range f.Conditions {
		if c.Field == engine.FieldIPRemoteAddress {
			if host.IsValid() || c.Match != engine.MatchEqual || c.Value.Type() != engine.TypeAddr || !c.Value.Addr().Is4() {
				return netip.Addr{}, runKey{}, false
			}
			host = c.Value.Addr()
			continue
		}
		if c.Value.Type() == engine.TypeRange || c.Value.Type() == engine.TypeList {
			return netip.Addr{}, runKey{}, false // their String is not their identity
		}
		// The other conditions, in order: a run's filters share them.
		rest = append(rest, c.String())
	}
	k.rest = strings.Join(rest, "|")
	return host, k, host.IsValid()
}

// collapseRuns replaces each run of at least runMin run members with one
// filter (the run's first, its address condition a list of the run's
// hosts) and returns the filters and the runs' id tables; runOf[i] is the
// run index + 1 of unit i (0 for a plain filter).
func collapseRuns(fs []*engine.Filter) (units []*engine.Filter, runs []idRun, runOf []int) {
	type m struct {
		host netip.Addr
		key  runKey
		ok   bool
	}
	ms := make([]m, len(fs))
	for i := range fs {
		h, k, ok := runMember(fs[i])
		ms[i] = m{h, k, ok}
	}
	for i := 0; i < len(fs); {
		j := i + 1
		if ms[i].ok {
			for j < len(fs) && ms[j].ok && ms[j].key == ms[i].key {
				j++
			}
		}
		if !ms[i].ok || j-i < runMin || len(runs) == maxRuns {
			for k := i; k < j; k++ {
				units = append(units, fs[k])
				runOf = append(runOf, 0)
			}
			i = j
			continue
		}
		type hid struct {
			host uint32
			id   uint32
			rank int
		}
		hs := make([]hid, 0, j-i)
		b := engine.NewListBuilder(engine.TypeAddr, j-i)
		for k := i; k < j; k++ {
			a := ms[k].host.As4()
			hs = append(hs, hid{binary.BigEndian.Uint32(a[:]), uint32(fs[k].ID), k})
			_ = b.Add(engine.Addr(ms[k].host))
		}
		// The first filter in rank order decides a host held twice.
		slices.SortFunc(hs, func(a, b hid) int { return cmp.Or(cmp.Compare(a.host, b.host), cmp.Compare(a.rank, b.rank)) })
		hs = slices.CompactFunc(hs, func(a, b hid) bool { return a.host == b.host })
		run := idRun{hosts: make([]uint32, len(hs)), ids: make([]uint32, len(hs))}
		for k, h := range hs {
			run.hosts[k], run.ids[k] = h.host, h.id
		}
		u := *fs[i] // a new filter: the engine's is not modified
		u.Conditions = make([]engine.Condition, 0, len(fs[i].Conditions))
		for _, c := range fs[i].Conditions {
			if c.Field == engine.FieldIPRemoteAddress {
				c.Value = engine.ListValue(b.List())
			}
			u.Conditions = append(u.Conditions, c)
		}
		units = append(units, &u)
		runs = append(runs, run)
		runOf = append(runOf, len(runs))
		i = j
	}
	return units, runs, runOf
}

// extractHosts moves the v4 hosts of the most common host class of each
// address field from the LPM entries to a host table, when there are at
// least hostTableMin of them.
func (lp *layerPolicy) extractHosts() {
	if lp.layer.V6() {
		return
	}
	for which := range lp.addrs {
		entries := lp.addrs[which]
		count := map[uint32]int{}
		for _, e := range entries {
			if e.prefix.Bits() == 32 {
				count[e.class]++
			}
		}
		best, n := uint32(0), 0
		for cls, c := range count {
			if c > n || c == n && cls < best {
				best, n = cls, c
			}
		}
		if n < hostTableMin {
			continue
		}
		t := hostTable{hosts: make([]uint32, 0, n), cls: best}
		kept := entries[:0]
		for _, e := range entries {
			if e.prefix.Bits() == 32 && e.class == best {
				a := e.prefix.Addr().As4()
				t.hosts = append(t.hosts, binary.BigEndian.Uint32(a[:]))
				continue
			}
			kept = append(kept, e)
		}
		lp.addrs[which] = kept
		slices.Sort(t.hosts) // sorted already (entries are); cheap to be sure
		lp.hosts[which] = t
	}
}

// hostsLen is the host table entries a layer needs: its host tables and
// the hosts of its runs that are not in the remote address host table.
func (lp *layerPolicy) hostsLen() int {
	n := 0
	for _, t := range lp.hosts {
		n += len(t.hosts)
	}
	for i, r := range lp.runs {
		n += len(lp.runExtra(i, r).hosts)
	}
	return n
}

// runExtra returns the hosts of run i that are not in the remote address
// host table (all of them, for runs after the first: the table's filter
// ids are the first run's).
func (lp *layerPolicy) runExtra(i int, r idRun) idRun {
	t := lp.hosts[0].hosts
	if i > 0 || len(t) == 0 {
		return r
	}
	var out idRun
	for k, h := range r.hosts {
		if _, ok := slices.BinarySearch(t, h); !ok {
			out.hosts = append(out.hosts, h)
			out.ids = append(out.ids, r.ids[k])
		}
	}
	return out
}

// tableIDs are the filter ids beside the remote address host table: the
// first run's filter of each host (0 for a host of no run).
func (lp *layerPolicy) tableIDs() []uint32 {
	t := lp.hosts[0].hosts
	ids := make([]uint32, len(t))
	if len(lp.runs) == 0 {
		return ids
	}
	r := lp.runs[0]
	j := 0
	for k, h := range t {
		for j < len(r.hosts) && r.hosts[j] < h {
			j++
		}
		if j < len(r.hosts) && r.hosts[j] == h {
			ids[k] = r.ids[j]
		}
	}
	return ids
}

// writeHosts writes the generation's host tables and id tables into its
// half of fwp_hosts and fwp_host_ids and their slices into fwp_host_runs
// and fwp_id_runs. The generation is not in use.
func (d *Datapath) writeHosts(gen uint32, p *Policy) error {
	half := int(d.objs.FwpHosts.MaxEntries()) * hostBlock / 2
	need := 0
	for _, lp := range p.layers {
		if lp != nil {
			need += lp.hostsLen()
		}
	}
	if need == 0 {
		return nil
	}
	if need > half {
		return fmt.Errorf("%w: the policy's host tables need %d entries, a generation holds %d (Options.MaxHosts)", ErrCapacity, need, half)
	}
	if d.hostMem == nil {
		var err error
		if d.hostMem, err = d.objs.FwpHosts.Memory(); err != nil {
			return fmt.Errorf("host table: %w", err)
		}
		if d.idMem, err = d.objs.FwpHostIds.Memory(); err != nil {
			return fmt.Errorf("host ids: %w", err)
		}
	}
	off := int(gen) * half
	put := func(hosts, ids []uint32) (uint32, error) {
		at := off
		buf := make([]byte, 4*len(hosts))
		for i, h := range hosts {
			binary.NativeEndian.PutUint32(buf[4*i:], h)
		}
		if _, err := d.hostMem.WriteAt(buf, int64(4*at)); err != nil {
			return 0, err
		}
		if ids != nil {
			for i, id := range ids {
				binary.NativeEndian.PutUint32(buf[4*i:], id)
			}
			if _, err := d.idMem.WriteAt(buf, int64(4*at)); err != nil {
				return 0, err
			}
		}
		off += len(hosts)
		return uint32(at), nil
	}
	for slot, lp := range p.layers {
		if lp == nil {
			continue
		}
		li := int(gen)*numSlots + slot
		table := fwpHostRun{}
		for which, t := range lp.hosts {
			if len(t.hosts) == 0 {
				continue
			}
			var ids []uint32
			if which == 0 {
				ids = lp.tableIDs()
			}
			at, err := put(t.hosts, ids)
			if err != nil {
				return fmt.Errorf("host table: %w", err)
			}
			hr := fwpHostRun{Off: at, Len: uint32(len(t.hosts)), Cls: t.cls}
			if which == 0 {
				table = hr
			}
			if err := d.objs.FwpHostRuns.Put(uint32(li*2+which), hr); err != nil {
				return mapErr("host tables", err)
			}
		}
		for i, r := range lp.runs {
			// The run's hosts: the first run's in the host table (Off,
			// Len), then those elsewhere (Cls, Pad: a second slice).
			run := fwpHostRun{}
			if i == 0 {
				run.Off, run.Len = table.Off, table.Len
			}
			extra := lp.runExtra(i, r)
			if len(extra.hosts) > 0 {
				at, err := put(extra.hosts, extra.ids)
				if err != nil {
					return fmt.Errorf("host ids: %w", err)
				}
				run.Cls, run.Pad = at, uint32(len(extra.hosts))
			}
			if err := d.objs.FwpIdRuns.Put(uint32(li*maxRuns+i), run); err != nil {
				return mapErr("runs", err)
			}
		}
	}
	return nil
}

// clearHosts empties the generation's host table and run slices.
func (d *Datapath) clearHosts(gen uint32) error {
	keys := make([]uint32, 0, numSlots*maxRuns)
	for i := range numSlots * 2 {
		keys = append(keys, uint32(int(gen)*numSlots*2+i))
	}
	if _, err := d.objs.FwpHostRuns.BatchUpdate(keys, make([]fwpHostRun, len(keys)), nil); err != nil {
		return fmt.Errorf("clear generation %d: host tables: %w", gen, err)
	}
	keys = keys[:0]
	for i := range numSlots * maxRuns {
		keys = append(keys, uint32(int(gen)*numSlots*maxRuns+i))
	}
	if _, err := d.objs.FwpIdRuns.BatchUpdate(keys, make([]fwpHostRun, len(keys)), nil); err != nil {
		return fmt.Errorf("clear generation %d: runs: %w", gen, err)
	}
	return nil
}
