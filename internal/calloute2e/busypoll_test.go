package calloute2e

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"fwp/client"
	"fwp/engine"
	"fwp/internal/peercred"
	"fwp/internal/server"
)

// startHostBusyPoll is startHost with fwpd's reader busy-polling for up to
// window while a call is in flight (0: never).
func startHostBusyPoll(tb testing.TB, layer engine.LayerID, key string, window time.Duration) *host {
	tb.Helper()
	dir, err := os.MkdirTemp("", "fwpcobp")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	h := &host{e: engine.New(engine.Options{}), sock: filepath.Join(dir, "s")}
	l, err := net.Listen("unix", client.CalloutSocket(h.sock))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { l.Close() })
	co := server.NewCallouts(h.e, func(peercred.Cred) bool { return true }, nil)
	co.SetBusyPoll(window)
	go co.Serve(l)
	err = h.e.Update(func(tx *engine.Txn) error {
		id, err := tx.AddCallout(engine.Callout{Key: key, Layer: layer})
		if err != nil {
			return err
		}
		h.cid = id
		_, err = tx.AddFilter(engine.Filter{Layer: layer, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: id}})
		return err
	})
	if err != nil {
		tb.Fatal(err)
	}
	return h
}

// cpuTicks is a process's user+system CPU time in clock ticks.
func cpuTicks(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
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

// TestBusyPollAB measures busy polling (internal/busypoll) on both sides
// of a remote callout call against none, in one run with the arms
// alternated: two hosts (fwpd's callout service in this process), one
// whose reader spins while a call is in flight and whose program lingers
// after each read (FWP_BUSYPOLL, FWP_BUSYPOLL_PROG: the windows, default
// the packages' defaults; FWP_BUSYPOLL_ROUNDS), one with
// both off; the same callout embedded as the base. Per round: back-to-back
// calls (arms alternated call by call), spaced calls (1 ms apart: an
// isolated connect, which the program's linger cannot catch), and 64
// concurrent classifications (arms in turn, order alternated). It logs
// and asserts nothing about time (docs/benchmarks.md).
func TestBusyPollAB(t *testing.T) {
	if testing.Short() || raceOn {
		t.Skip("a measurement: not under -short or the race detector")
	}
	window := server.DefaultCalloutBusyPoll
	if w := os.Getenv("FWP_BUSYPOLL"); w != "" {
		var err error
		if window, err = time.ParseDuration(w); err != nil {
			t.Fatal(err)
		}
	}
	progWindow := window
	if w := os.Getenv("FWP_BUSYPOLL_PROG"); w != "" {
		var err error
		if progWindow, err = time.ParseDuration(w); err != nil {
			t.Fatal(err)
		}
	}
	rounds := 3
	if r, err := strconv.Atoi(os.Getenv("FWP_BUSYPOLL_ROUNDS")); err == nil && r > 0 {
		rounds = r
	}
	on := startHostBusyPoll(t, connV4, "co-permit", window)
	off := startHostBusyPoll(t, connV4, "co-permit", 0)
	t.Setenv("FWP_PROG_BUSYPOLL", progWindow.String())
	pOn := on.startProg(t, "co-permit=permit")
	defer pOn.kill()
	t.Setenv("FWP_PROG_BUSYPOLL", "-1s")
	pOff := off.startProg(t, "co-permit=permit")
	defer pOff.kill()
	if n, err := strconv.Atoi(os.Getenv("FWP_BUSYPOLL_HOSTPROCS")); err == nil && n > 0 {
		// The host's GOMAXPROCS once both connections are up (busypoll
		// decides at accept): with 1, no other thread of the host can be
		// woken to take the spinning reader.
		defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(n))
	}
	emb := engine.New(engine.Options{})
	emb.Update(func(tx *engine.Txn) error {
		id, _ := tx.AddCallout(engine.Callout{Key: "co-permit", Layer: connV4})
		_, err := tx.AddFilter(engine.Filter{Layer: connV4, Action: engine.Action{Type: engine.ActionCalloutTerminating, Callout: id}})
		return err
	})
	emb.RegisterCallout("co-permit", progCallout("permit"))
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.1.1:80"))
	classify := func(e *engine.Engine) time.Duration {
		s := time.Now()
		if r := e.Classify(connV4, &vs, nil); r.Action != engine.ActionPermit {
			t.Fatalf("%+v", r)
		}
		return time.Since(s)
	}
	for range 1000 { // warm up
		classify(on.e)
		classify(off.e)
	}
	t.Logf("busy-poll window: fwpd %v, program %v (negative: off); %d rounds", window, progWindow, rounds)
	for round := range rounds {
		// Back to back, alternated call by call.
		const n = 10000
		var ron, roff, re []time.Duration
		cOn, cOff := cpuTicks(pOn.cmd.Process.Pid), cpuTicks(pOff.cmd.Process.Pid)
		ld := loadavg()
		for i := range 3 * n {
			switch (i + round) % 3 {
			case 0:
				ron = append(ron, classify(on.e))
			case 1:
				roff = append(roff, classify(off.e))
			case 2:
				re = append(re, classify(emb))
			}
		}
		e50, e99 := percentile(re, .5), percentile(re, .99)
		t.Logf("round %d back-to-back (load %s): added p50/p99 spin %v / %v, no spin %v / %v (embedded %v / %v); program CPU per call spin %v, no spin %v",
			round, ld, percentile(ron, .5)-e50, percentile(ron, .99)-e99, percentile(roff, .5)-e50, percentile(roff, .99)-e99, e50, e99,
			ticksPerCall(cpuTicks(pOn.cmd.Process.Pid)-cOn, n), ticksPerCall(cpuTicks(pOff.cmd.Process.Pid)-cOff, n))
		// Spaced: one call, then 1 ms of nothing.
		const m = 1500
		ron, roff, re = ron[:0], roff[:0], re[:0]
		ld = loadavg()
		for i := range 3 * m {
			switch (i + round) % 3 {
			case 0:
				ron = append(ron, classify(on.e))
			case 1:
				roff = append(roff, classify(off.e))
			case 2:
				re = append(re, classify(emb))
			}
			time.Sleep(time.Millisecond)
		}
		e50, e99 = percentile(re, .5), percentile(re, .99)
		t.Logf("round %d spaced 1 ms (load %s): added p50/p99 spin %v / %v, no spin %v / %v",
			round, ld, percentile(ron, .5)-e50, percentile(ron, .99)-e99, percentile(roff, .5)-e50, percentile(roff, .99)-e99)
		// 64 concurrent, the arms in turn.
		tp := func(e *engine.Engine) float64 {
			const par, per = 64, 40000 / 64
			var wg sync.WaitGroup
			start := time.Now()
			for range par {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var vs engine.Values
					vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.1.1.1:80"))
					for range per {
						e.Classify(connV4, &vs, nil)
					}
				}()
			}
			wg.Wait()
			return float64(par*per) / time.Since(start).Seconds()
		}
		ld = loadavg()
		var tOn, tOff float64
		if round%2 == 0 {
			tOn, tOff = tp(on.e), tp(off.e)
		} else {
			tOff, tOn = tp(off.e), tp(on.e)
		}
		t.Logf("round %d 64 concurrent (load %s): spin %.0f/s, no spin %.0f/s", round, ld, tOn, tOff)
	}
}

func ticksPerCall(ticks int64, n int) time.Duration {
	return time.Duration(ticks) * 10 * time.Millisecond / time.Duration(n) // USER_HZ 100
}
