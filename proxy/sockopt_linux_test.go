//go:build linux

package proxy_test

import (
	"errors"
	"net"
	"testing"

	"fwp/proxy"
)

// Without fwp's hooks on the test's sockets, the socket options get the
// kernel's own answer (no such option): ErrNotSupported, so that callers
// fall back to a backend; kernel records are still accepted by
// SetRedirectRecords (the hook may answer at dial time), other bytes are
// not without a backend.
func TestKernelSockoptsWithoutHooks(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a := <-accepted
	defer a.Close()
	if _, _, err := proxy.QueryKernelRedirect(a); !errors.Is(err, proxy.ErrNotSupported) {
		t.Fatalf("QueryKernelRedirect without hooks: %v, want ErrNotSupported", err)
	}
	if _, err := proxy.QueryRedirectRecords(a); !errors.Is(err, proxy.ErrNotSupported) {
		t.Fatalf("QueryRedirectRecords without hooks or backends: %v, want ErrNotSupported", err)
	}
	for name, c := range map[string]struct {
		recs []byte
		ok   bool
	}{
		"kernel records":   {[]byte("fwpk\x01\x00\x00\x00"), true},
		"eight handles":    {append([]byte("fwpk"), make([]byte, 32)...), true},
		"nine handles":     {append([]byte("fwpk"), make([]byte, 36)...), false},
		"no handle":        {[]byte("fwpk"), false},
		"not the kernel's": {[]byte("abcd\x01\x00\x00\x00"), false},
		"odd length":       {[]byte("fwpk\x01\x00\x00"), false},
	} {
		d := &net.Dialer{}
		err := proxy.SetRedirectRecords(d, c.recs)
		if (err == nil) != c.ok {
			t.Errorf("%s: SetRedirectRecords: %v", name, err)
		}
		if err != nil {
			continue
		}
		// No hook takes them: the dial says so rather than connecting
		// without them.
		if conn, err := d.Dial("tcp4", ln.Addr().String()); !errors.Is(err, proxy.ErrNotSupported) {
			if conn != nil {
				conn.Close()
			}
			t.Errorf("%s: dial without a hook to take the records: %v, want ErrNotSupported", name, err)
		}
	}
}
