package calloute2e

import (
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"fwp/engine"
)

// cpuTicks is a process's user+system CPU time in clock ticks.
func cpuTicks(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	k, _ := strconv.ParseInt(f[12], 10, 64)
	return u + k
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// TestAddedLatencyIdle is TestAddedLatency for isolated calls, as a
// connect is: each call (remote, embedded, and a one-byte round trip over
// a unix socket to a Go process, alternated) follows 1 ms of nothing, so
// that both processes' threads are parked and their CPUs may be halted
// when it starts, where TestAddedLatency's back-to-back calls find them
// awake. Rounds (FWP_IDLE_ROUNDS, default 3) each log the load average,
// the added p50/p99, and the program's CPU time per call. It asserts
// nothing about time (docs/benchmarks.md).
func TestAddedLatencyIdle(t *testing.T) {
	if testing.Short() || raceOn {
		t.Skip("a measurement: not under -short or the race detector")
	}
	rounds := 3
	if r, err := strconv.Atoi(os.Getenv("FWP_IDLE_ROUNDS")); err == nil && r > 0 {
		rounds = r
	}
	h := startHost(t, connV4, "co-permit")
	p := h.startProg(t, "co-permit=permit")
	defer p.kill()
	// FWP_IDLE_PROG_PROCS=n: a second host whose program runs with
	// GOMAXPROCS=n, a fourth arm.
	var h2 *host
	var p2 *proc
	if procs := os.Getenv("FWP_IDLE_PROG_PROCS"); procs != "" {
		h2 = startHost(t, connV4, "co-permit")
		t.Setenv("GOMAXPROCS", procs)
		p2 = h2.startProg(t, "co-permit=permit")
		defer p2.kill()
		os.Unsetenv("GOMAXPROCS")
	}
	arms := 3
	if h2 != nil {
		arms = 4
	}
	emb := engine.New(engine.Options{})
	emb.Update(func(tx *engine.Txn) error {
		id, _ := tx.AddCallout(engine.Callout{Key: "co-permit", Layer: connV4})
		_, err := tx.AddFilter(engine.Filter{Layer: connV4, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: id}})
		return err
	})
	emb.RegisterCallout("co-permit", progCallout("permit"))
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
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.1.1:80"))
	b := []byte{1}
	for range 200 { // warm up
		h.e.Classify(connV4, &vs, nil)
	}
	const n = 1500
	for round := range rounds {
		var re, ee, ue, re2 []time.Duration
		ld, c0 := loadavg(), cpuTicks(p.cmd.Process.Pid)
		for i := range arms * n {
			time.Sleep(time.Millisecond)
			s := time.Now()
			switch (i + round) % arms {
			case 3:
				h2.e.Classify(connV4, &vs, nil)
				re2 = append(re2, time.Since(s))
			case 0:
				if r := h.e.Classify(connV4, &vs, nil); r.Action != engine.ActionPermit || r.Reason != engine.ReasonCalloutPermit {
					t.Fatalf("%+v", r)
				}
				re = append(re, time.Since(s))
			case 1:
				emb.Classify(connV4, &vs, nil)
				ee = append(ee, time.Since(s))
			case 2:
				uc.Write(b)
				io.ReadFull(uc, b)
				ue = append(ue, time.Since(s))
			}
		}
		cpu := time.Duration(cpuTicks(p.cmd.Process.Pid)-c0) * 10 * time.Millisecond / n // USER_HZ 100
		e50, e99 := percentile(ee, .5), percentile(ee, .99)
		t.Logf("round %d, 1 ms apart (load %s): added p50/p99 %v / %v (remote %v / %v, embedded %v / %v); unix-socket floor %v / %v; program CPU per call %v",
			round, ld, percentile(re, .5)-e50, percentile(re, .99)-e99, percentile(re, .5), percentile(re, .99), e50, e99,
			percentile(ue, .5), percentile(ue, .99), cpu)
		if h2 != nil {
			t.Logf("round %d: added p50/p99 with the program at GOMAXPROCS=%s: %v / %v", round, os.Getenv("FWP_IDLE_PROG_PROCS"),
				percentile(re2, .5)-e50, percentile(re2, .99)-e99)
		}
	}
}
