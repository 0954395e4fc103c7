//go:build linux

package nfqueue

import (
	"strings"
	"testing"
	"time"

	"fwp/internal/testutil"
)

// Where nothing reads the queue — a namespace the path does not serve, or
// after the path closed — the hook decides a callout flow by its filter's
// flag at once: fail-open passes, fail-closed is refused (curl exit 7, no
// SYN timer), and nothing is queued.
func TestUnservedNamespaceTakesFlag(t *testing.T) {
	fx := newFixture(t, pendTimeout)
	other := testutil.StartHelper(t, fx.cg, "client")
	if line, err := other.Call(nil); err != nil || strings.TrimSpace(string(line)) != "ready" {
		t.Fatalf("helper: %q %v", line, err)
	}
	check := func(where string, call func(string) []string) {
		t.Helper()
		before := fx.path.Stats().Queued
		if f := call("curl 8004"); f[0] != "0" || f[1] != "200" {
			t.Fatalf("%s, fail-open filter: curl %v, want 200", where, f)
		}
		f := call("curl 8005")
		took, _ := time.ParseDuration(f[2] + "s")
		if f[0] != "7" || took >= pendTimeout {
			t.Fatalf("%s, fail-closed filter: curl %v, want exit 7 at once", where, f)
		}
		if q := fx.path.Stats().Queued - before; q != 0 {
			t.Fatalf("%s: %d SYNs queued, want none", where, q)
		}
	}
	check("another namespace", func(cmd string) []string {
		line, err := other.Call([]byte(cmd))
		if err != nil {
			t.Fatal(err)
		}
		return strings.Fields(string(line))
	})
	if err := fx.path.Close(); err != nil {
		t.Fatal(err)
	}
	check("path closed", func(cmd string) []string { return fx.call(t, cmd) })
	if n, err := Rules(int(fx.netns.Fd())); err != nil || n != -1 {
		t.Fatalf("after Close: %d rules in fwp's tables (%v), want no table", n, err)
	}
}

// Closing the path answers the flows it holds by their filter's flag:
// the callouts go away with it. A pended flow of a fail-closed filter is
// refused, one of a fail-open filter connects.
func TestCloseAnswersHeldFlows(t *testing.T) {
	fx := newFixture(t, 10*time.Second)
	results := make(chan string, 2)
	for _, port := range []string{"8006", "8004"} { // portHeld (fail-closed), portFailOpen
		go func() {
			line, err := fx.h.Call([]byte("dial " + port + " 1 1"))
			if err != nil {
				results <- err.Error()
				return
			}
			results <- port + " " + strings.TrimSpace(string(line))
		}()
		deadline := time.Now().Add(5 * time.Second)
		for fx.path.Stats().Held == 0 {
			if time.Now().After(deadline) {
				t.Fatalf("port %s: the flow was not held", port)
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err := fx.path.Close(); err != nil {
			t.Fatal(err)
		}
		got := <-results
		want := port + " 1 0"
		if port == "8006" {
			want = port + " 0 1"
		}
		if !strings.HasPrefix(got, want) {
			t.Fatalf("held flow at Close: %q, want %q...", got, want)
		}
		var err error
		if fx.path, err = Start(fx.eng, fx.dp, Options{NetNS: int(fx.netns.Fd())}); err != nil {
			t.Fatal(err)
		}
	}
	fx.checkClean(t)
}
