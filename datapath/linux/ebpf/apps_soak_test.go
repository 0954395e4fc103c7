//go:build linux

package ebpf

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"

	"fwp/engine"
	"fwp/internal/testutil"
	"fwp/internal/unix"
)

func init() { testutil.RegisterHelper("appsoak", appSoakHelper) }

type appSoakResult struct {
	Blocked, Refused int
	FirstErr         string
	FDs, Goroutines  [2]int
}

// appSoakHelper connects args[0] times from one process (the test binary:
// the policy's application), alternately to a port its app filter blocks
// (EPERM) and to one nothing listens on (refused).
func appSoakHelper(args []string) error {
	n, err := strconv.Atoi(args[0])
	if err != nil {
		return err
	}
	var res appSoakResult
	res.FDs[0], res.Goroutines[0] = countFDs(), runtime.NumGoroutine()
	for i := range n {
		addr, want := "127.0.0.1:9", unix.EPERM
		if i%2 == 1 {
			addr, want = "127.0.0.1:8", unix.ECONNREFUSED
		}
		c, err := net.Dial("tcp4", addr)
		if err == nil {
			c.Close()
		}
		switch {
		case errors.Is(err, want) && want == unix.EPERM:
			res.Blocked++
		case errors.Is(err, want):
			res.Refused++
		case res.FirstErr == "":
			res.FirstErr = fmt.Sprintf("connect %d to %s: %v", i, addr, err)
		}
	}
	res.FDs[1], res.Goroutines[1] = countFDs(), runtime.NumGoroutine()
	return json.NewEncoder(os.Stdout).Encode(res)
}

// TestKernelAppSoak: soakOps connects of one application matched by an app
// id filter in one datapath lifetime, while another application of the
// policy is replaced (renamed over) 200 times and the policy
// followed each time (watch, compile, apply). Every connect must get its
// verdict, and the class map, fds and goroutines must not grow.
func TestKernelAppSoak(t *testing.T) {
	d, cg := kernelSetup(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := appDir(t)
	other := filepath.Join(dir, "other")
	copyFile(t, "/usr/bin/true", other)
	e := buildEngine(t, func(tx *engine.Txn) error {
		for _, app := range []string{self, other} {
			if _, err := tx.AddFilter(blockFilter(engine.LayerALEAuthConnectV4,
				engine.Condition{Field: engine.FieldALEAppID, Match: engine.MatchEqual, Value: engine.String(app)},
				engine.Condition{Field: engine.FieldIPRemotePort, Match: engine.MatchEqual, Value: engine.Uint16(9)})); err != nil {
				return err
			}
		}
		return nil
	})
	apply(t, d, e)
	ints0, fds0, gor0 := mapEntries(t, d.objs.FwpInts), countFDs(), runtime.NumGoroutine()

	type result struct {
		out []byte
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		out, err := testutil.RunHelperFiles(cg, "appsoak", nil, nil, strconv.Itoa(soakOps))
		done <- result{out, err}
	}()
	replaced := 0
	for ; replaced < 200; replaced++ {
		w, err := WatchApps([]string{self, other})
		if err != nil {
			t.Fatal(err)
		}
		copyFile(t, "/usr/bin/true", other+".new")
		if err := os.Rename(other+".new", other); err != nil {
			t.Fatal(err)
		}
		select {
		case <-w.Changed():
		case <-time.After(5 * time.Second):
			t.Fatalf("replacement %d: the watcher missed it", replaced)
		}
		w.Close()
		p, err := Compile(e.View())
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Apply(p); err != nil {
			t.Fatal(err)
		}
		if p.AppsChanged() {
			t.Fatalf("replacement %d: compiled policy already stale", replaced)
		}
	}
	followed := time.Since(start)
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	var res appSoakResult
	if err := json.Unmarshal(r.out, &res); err != nil {
		t.Fatalf("%v: %s", err, r.out)
	}
	t.Logf("%d blocked and %d refused connects of the app in %v, %d replacements followed in %v", res.Blocked, res.Refused, time.Since(start), replaced, followed)
	if res.Blocked+res.Refused != soakOps || res.Blocked != (soakOps+1)/2 {
		t.Fatalf("of %d connects: %d blocked, %d refused; first error: %s", soakOps, res.Blocked, res.Refused, res.FirstErr)
	}
	if res.FDs[1] > res.FDs[0] || res.Goroutines[1] > res.Goroutines[0] {
		t.Fatalf("the helper grew: fds %d -> %d, goroutines %d -> %d", res.FDs[0], res.FDs[1], res.Goroutines[0], res.Goroutines[1])
	}
	// Each generation holds one policy's classes: the one in force and
	// the one before it.
	if n := mapEntries(t, d.objs.FwpInts); n > 2*ints0 {
		t.Errorf("fwp_ints: %d entries after %d replacements, %d before", n, replaced, ints0)
	}
	if n := countFDs(); n > fds0 {
		t.Errorf("fds: %d after, %d before", n, fds0)
	}
	time.Sleep(10 * time.Millisecond) // exited watcher goroutines
	if n := runtime.NumGoroutine(); n > gor0+1 {
		t.Errorf("goroutines: %d after, %d before", n, gor0)
	}
}
