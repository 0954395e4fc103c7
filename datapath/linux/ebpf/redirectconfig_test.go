package ebpf

import (
	"errors"
	"net/netip"
	"testing"

	"fwp/internal/unix"
)

func TestRedirectConfigRoundTrip(t *testing.T) {
	in := RedirectConfig{Proxy: netip.MustParseAddrPort("[::1]:8443"), TargetPID: 42, Context: []byte("ctx")}
	b, err := in.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	out, err := ParseRedirectConfig(b)
	if err != nil {
		t.Fatal(err)
	}
	if out.Proxy != in.Proxy || out.TargetPID != 42 || string(out.Context) != "ctx" {
		t.Fatalf("round trip: %+v", out)
	}
}

func TestRedirectConfigRejects(t *testing.T) {
	for _, s := range []string{
		``, `{}`, `{"proxy":"127.0.0.1:0"}`, `{"proxy":"0.0.0.0:80"}`, `{"proxy":"nope"}`,
		`{"proxy":"127.0.0.1:80","extra":1}`, `{"proxy":"127.0.0.1:80"} {}`,
		`{"proxy":"[fe80::1%eth0]:80"}`,
		`{"proxy":"127.0.0.1:80","context":"` + string(make([]byte, 0)) + `AAAA` + `AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}`,
	} {
		if _, err := ParseRedirectConfig([]byte(s)); !errors.Is(err, ErrInvalidRedirect) {
			t.Errorf("%q: err %v, want ErrInvalidRedirect", s, err)
		}
	}
}

func FuzzParseRedirectConfig(f *testing.F) {
	f.Add([]byte(`{"proxy":"127.0.0.1:8080","target_pid":7,"context":"aGk="}`))
	f.Add([]byte(`{"proxy":"[::1]:1"}`))
	f.Add([]byte(`{"proxy":"127.0.0.1:80","context":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzRoundTrip(t, b, ParseRedirectConfig, RedirectConfig.Marshal, func(a, b RedirectConfig) bool {
			return a.Proxy == b.Proxy && a.TargetPID == b.TargetPID && string(a.Context) == string(b.Context)
		})
	})
}

// fuzzRoundTrip checks that a parser fails only with ErrInvalidRedirect and
// that what it accepts marshals and parses back to the same value.
func fuzzRoundTrip[C any](t *testing.T, b []byte, parse func([]byte) (C, error), marshal func(C) ([]byte, error), equal func(a, b C) bool) {
	c, err := parse(b)
	if err != nil {
		if !errors.Is(err, ErrInvalidRedirect) {
			t.Fatalf("untyped error %v", err)
		}
		return
	}
	enc, err := marshal(c)
	if err != nil {
		t.Fatalf("valid config does not marshal: %v", err)
	}
	if c2, err := parse(enc); err != nil || !equal(c, c2) {
		t.Fatalf("round trip: %+v -> %+v (%v)", c, c2, err)
	}
}

func FuzzParseBindRedirectConfig(f *testing.F) {
	f.Add([]byte(`{"local":"127.0.0.1:9090"}`))
	f.Add([]byte(`{"local":"0.0.0.0:1"}`))
	f.Add([]byte(`{"local":"[::]:0"}`))
	f.Add([]byte(`{"local":"[::1]:0"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzRoundTrip(t, b, ParseBindRedirectConfig, BindRedirectConfig.Marshal, func(a, b BindRedirectConfig) bool { return a == b })
	})
}

// A record expires only once its socket has closed and the grace has
// passed: an open socket's (Released 0) never does.
func TestReleasedGrace(t *testing.T) {
	now, err := unix.MonotonicSeconds()
	if err != nil {
		t.Fatal(err)
	}
	grace := ReleasedGrace
	defer func() { ReleasedGrace = grace }()
	for _, c := range []struct {
		released, grace uint32
		want            bool
	}{
		{0, 0, false}, {0, 30, false},
		{now, 0, true}, {now, 30, false},
		{now - 29, 30, false}, {now - 30, 30, true}, {now - 1000, 30, true},
	} {
		ReleasedGrace = c.grace
		if got := isExpired(&fwpRedirectState{Released: c.released}); got != c.want {
			t.Errorf("released %d s ago (0: open), grace %d s: expired %v, want %v", now-c.released, c.grace, got, c.want)
		}
	}
}
