package metrics

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"fwp/engine"
	"fwp/internal/trust"
)

// With a token, /metrics answers only a request carrying it as a bearer
// credential; without one it answers anyone (the default, for loopback).
func TestServeBearerToken(t *testing.T) {
	m := New(engine.New(engine.Options{}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	token := []byte("s3cret-token-0123456789")
	addr, err := m.Serve(ctx, "127.0.0.1:0", token)
	if err != nil {
		t.Fatal(err)
	}
	open, err := m.Serve(ctx, "127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	get := func(addr, auth string) int {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://"+addr+"/metrics", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode == 200 && !strings.Contains(string(b), "fwp_pends_outstanding") {
			t.Fatalf("200 without the metrics: %.200s", b)
		}
		return resp.StatusCode
	}
	for _, c := range []struct {
		addr, auth string
		want       int
	}{
		{addr, "", 401},
		{addr, "Bearer wrong", 401},
		{addr, "Bearer s3cret-token-012345678", 401}, // a prefix
		{addr, "Basic czNjcmV0", 401},
		{addr, "Bearer " + string(token), 200},
		{open, "", 200},
	} {
		if got := get(c.addr, c.auth); got != c.want {
			t.Errorf("%s with %q: %d, want %d", c.addr, c.auth, got, c.want)
		}
	}
}

// ReadToken takes a token only from a file others can neither write nor
// read, in trusted directories, one line of at least 16 characters.
func TestReadToken(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if tok, err := ReadToken(write("good", "  abcdefghijklmnopqrstuvwxyz\n", 0o640)); err != nil || string(tok) != "abcdefghijklmnopqrstuvwxyz" {
		t.Fatalf("good token: %q, %v", tok, err)
	}
	for name, c := range map[string]struct {
		content string
		mode    os.FileMode
		want    error
	}{
		"world-readable": {"abcdefghijklmnopqrstuvwxyz", 0o644, ErrTokenFile},
		"world-writable": {"abcdefghijklmnopqrstuvwxyz", 0o602, trust.ErrUntrusted},
		"short":          {"abc", 0o600, ErrTokenFile},
		"two lines":      {"abcdefghijklmnop\nqrstuvwxyz", 0o600, ErrTokenFile},
	} {
		if _, err := ReadToken(write(name, c.content, c.mode)); !errors.Is(err, c.want) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: %v, want %v naming the file", name, err, c.want)
		}
	}
	if _, err := ReadToken(filepath.Join(dir, "missing")); err == nil {
		t.Error("a missing file was read")
	}
}
