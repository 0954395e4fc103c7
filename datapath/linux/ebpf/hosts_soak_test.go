//go:build linux

package ebpf

import (
	"encoding/json"
	"errors"
	"net"
	"os"
	"runtime"
	"strconv"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
	"fwp/internal/unix"
)

func init() { testutil.RegisterHelper("hostsoak", hostSoakHelper) }

// hostSoakHelper connects args[2] times, alternately to args[0] and
// args[1] (port 9, nothing listens), and counts the outcomes per address.
func hostSoakHelper(args []string) error {
	n, err := strconv.Atoi(args[2])
	if err != nil {
		return err
	}
	counts := [2]map[string]int{{}, {}}
	for i := range n {
		c, err := net.Dial("tcp4", args[i%2]+":9")
		o := "other"
		switch {
		case err == nil:
			c.Close()
			o = "permit"
		case errors.Is(err, unix.EPERM):
			o = "block"
		case errors.Is(err, unix.ECONNREFUSED):
			o = "permit"
		}
		counts[i%2][o]++
	}
	return json.NewEncoder(os.Stdout).Encode(counts)
}

// TestKernelHostTableSoak: soakOps connects (half to a host every policy
// blocks, half to one none does) while the policy alternates, as fast as
// Apply goes, between a 20,000-host list (a host table) and 2,000 host
// filters (a collapsed run); every connect gets its verdict, and nothing
// grows: the run and table slices of the inactive generation are
// cleared, the process's fds and goroutines stay put.
func TestKernelHostTableSoak(t *testing.T) {
	d, cg := kernelSetup(t)
	list := blocklistPolicy(t, 0, 20_000)
	run := buildEngine(t, func(tx *engine.Txn) error {
		for i := range 2_000 {
			if _, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
				engine.Condition{Field: engine.FieldIPRemoteAddress, Match: engine.MatchEqual, Value: engine.Addr(listAddr(i))})); err != nil {
				return err
			}
		}
		return nil
	})
	var ps []*Policy
	for _, e := range []*engine.Engine{list, run} {
		p, err := Compile(e.View())
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	if len(ps[0].layers[2].hosts[0].hosts) != 20_000 || len(ps[1].layers[2].runs) != 1 {
		t.Fatalf("the policies do not use a host table and a run")
	}
	if err := d.Apply(ps[0]); err != nil {
		t.Fatal(err)
	}
	fds, gs := countFDs(), runtime.NumGoroutine()
	listed, unlisted := listAddr(1234), listAddr(7).Next()
	done := make(chan []byte, 1)
	start := time.Now()
	go func() {
		out, err := testutil.RunHelperFilesTimeout(cg, "hostsoak", nil, nil, 10*time.Minute, listed.String(), unlisted.String(), strconv.Itoa(soakOps))
		if err != nil {
			out = []byte(err.Error())
		}
		done <- out
	}()
	applies := 0
	var out []byte
loop:
	for {
		select {
		case out = <-done:
			break loop
		default:
		}
		if err := d.Apply(ps[applies%2]); err != nil {
			t.Fatal(err)
		}
		applies++
	}
	var counts [2]map[string]int
	if err := json.Unmarshal(out, &counts); err != nil {
		t.Fatalf("helper: %s", out)
	}
	t.Logf("%d connects, %d applies in %v: %v", soakOps, applies, time.Since(start), counts)
	if counts[0]["block"] != (soakOps+1)/2 || counts[1]["permit"] != soakOps/2 {
		t.Fatalf("verdicts: listed %v, unlisted %v; want every listed connect blocked, every unlisted one permitted", counts[0], counts[1])
	}
	if applies < 2 {
		t.Fatalf("only %d applies during the soak", applies)
	}
	// The inactive generation holds nothing but what the active one
	// wrote before it: its slices are cleared at the next Apply, and
	// nothing else is left behind.
	inactive := 1 - d.gen
	if err := d.clearGen(inactive); err != nil {
		t.Fatal(err)
	}
	var r fwpHostRun
	for k := range uint32(numSlots * maxRuns) {
		if err := d.objs.FwpIdRuns.Lookup(uint32(inactive)*numSlots*maxRuns+k, &r); err != nil || r != (fwpHostRun{}) {
			t.Fatalf("run slice %d of the cleared generation: %+v %v", k, r, err)
		}
	}
	for k := range uint32(numSlots * 2) {
		if err := d.objs.FwpHostRuns.Lookup(uint32(inactive)*numSlots*2+k, &r); err != nil || r != (fwpHostRun{}) {
			t.Fatalf("host table %d of the cleared generation: %+v %v", k, r, err)
		}
	}
	if n := countFDs(); n > fds+1 {
		t.Errorf("fds grew from %d to %d", fds, n)
	}
	time.Sleep(50 * time.Millisecond)
	if n := runtime.NumGoroutine(); n > gs+1 {
		t.Errorf("goroutines grew from %d to %d", gs, n)
	}
}

// TestKernelHostTableCapacity: a policy whose host tables do not fit a
// generation is refused with ErrCapacity and the policy in force stays.
func TestKernelHostTableCapacity(t *testing.T) {
	testutil.RequireRoot(t)
	d, err := Load(Options{MaxHosts: 2048}) // a block of 1024 per generation
	if err != nil {
		testutil.Unavailable(t, err)
	}
	t.Cleanup(func() { d.Close() })
	small, err := Compile(blocklistPolicy(t, 0, 1000).View())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Apply(small); err != nil {
		t.Fatal(err)
	}
	big, err := Compile(blocklistPolicy(t, 0, 5000).View())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Apply(big); !errors.Is(err, ErrCapacity) {
		t.Fatalf("a 5,000-host list in a 1,024-host generation: %v, want ErrCapacity", err)
	}
	var r fwpHostRun
	if err := d.objs.FwpHostRuns.Lookup(uint32((int(d.gen)*numSlots+2)*2), &r); err != nil || r.Len != 1000 {
		t.Fatalf("the policy in force lost its host table: %+v %v", r, err)
	}
}
