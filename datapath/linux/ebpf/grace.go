package ebpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// A generation switch (Apply) is atomic for each hook run: a run reads the
// active generation once and looks everything up under it. But a run that
// read the old generation just before a switch may still be going — a
// preempted program — when the next Apply clears and rewrites that
// generation, and would then decide from a half-written policy (seen in
// TestKernelHostTableSoak: one permitted connect in 50,000 blocked while
// the policy was swapped every 10 ms). So Apply waits, after switching, for
// every hook run in flight to end: the kernel's RCU grace period, which
// the programs (all non-sleepable, run under rcu_read_lock) cannot outlast.
// User space has no synchronize_rcu of its own; an update of a map-in-map
// makes the bpf syscall wait for one (maybe_wait_bpf_programs: "so that
// userspace, when we return to it, knows that all non-sleepable programs
// that could be running use the new map value").

// graceMaps is a one-slot array of maps and the map it holds: storing it
// again is the wait.
type graceMaps struct {
	outer, inner *ebpf.Map
}

func newGraceMaps() (*graceMaps, error) {
	inner := &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}
	in, err := ebpf.NewMap(inner)
	if err != nil {
		return nil, fmt.Errorf("grace period map: %w", err)
	}
	out, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.ArrayOfMaps, KeySize: 4, ValueSize: 4, MaxEntries: 1, InnerMap: inner})
	if err != nil {
		in.Close()
		return nil, fmt.Errorf("grace period map: %w", err)
	}
	return &graceMaps{outer: out, inner: in}, nil
}

// wait returns once every BPF program run that started before it has
// ended.
func (g *graceMaps) wait() error {
	if err := g.outer.Put(uint32(0), g.inner); err != nil {
		return fmt.Errorf("waiting for the hooks' runs (RCU grace period): %w", err)
	}
	return nil
}

func (g *graceMaps) close() error {
	if g == nil {
		return nil
	}
	return errors.Join(g.outer.Close(), g.inner.Close())
}
