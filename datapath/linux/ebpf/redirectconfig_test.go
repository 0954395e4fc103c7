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
// passed: an open socket's (Released 0) never does. The clock is given,
// not read: kernel times are small after a boot (a machine up 960 s has no
// "1000 s ago"), so every case runs at a few uptimes, the first ones
// shorter than what the cases subtract.
func TestReleasedGrace(t *testing.T) {
	for _, now := range []uint32{1, 2, 31, 999, 1000, 5000, 1 << 31, ^uint32(0)} {
		for _, c := range []struct {
			ago   int64 // seconds since the close; -1 open (Released 0)
			grace uint32
			want  bool
		}{
			{-1, 0, false}, {-1, 30, false},
			{0, 0, true}, {0, 30, false},
			{29, 30, false}, {30, 30, true}, {1000, 30, true},
		} {
			released := uint32(0)
			if c.ago >= 0 {
				if c.ago >= int64(now) {
					continue // before the boot: the kernel cannot have stamped it
				}
				released = now - uint32(c.ago)
			}
			if got := expiredAt(released, now, c.grace); got != c.want {
				t.Errorf("at %d s after boot, released %d s ago (-1: open), grace %d s: expired %v, want %v", now, c.ago, c.grace, got, c.want)
			}
		}
	}
	// The kernel stamps whole seconds of the same clock and 1 for a close
	// in the first second (0 means open), so a stamp may be a second ahead
	// of the now read here: not expired, not "136 years ago".
	if expiredAt(1, 0, 30) || expiredAt(6, 5, 30) {
		t.Error("a stamp a second ahead of now counts as expired")
	}
	// isExpired reads the real clock: a record closed at this second is
	// young, one closed at the first second after boot is older than a
	// grace of 0.
	now, err := unix.MonotonicSeconds()
	if err != nil {
		t.Fatal(err)
	}
	grace := ReleasedGrace
	defer func() { ReleasedGrace = grace }()
	ReleasedGrace = 30
	if isExpired(&fwpRedirectState{Released: now}) || isExpired(&fwpRedirectState{}) {
		t.Error("a record released now, or an open one, is expired")
	}
	ReleasedGrace = 0
	if !isExpired(&fwpRedirectState{Released: 1}) {
		t.Error("a record released at boot is not past a grace of 0")
	}
}
