package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"fwp/policy"
)

// runCapture runs fwpctl in-process and returns its stdout, stderr and
// exit code.
func runCapture(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	stdout, stderr = &out, &errb
	t.Cleanup(func() { stdout, stderr = os.Stdout, os.Stderr })
	code := run(args)
	return out.String(), errb.String(), code
}

// Results, and only they, go to stdout: a usage error must not put text
// in front of a script's -o json.
func TestUsageGoesToTheRightStream(t *testing.T) {
	for _, args := range [][]string{
		{"filter", "list", "-o", "json", "--bogus"},
		{"events", "--since", "x", "-o", "json"},
		{"filter"},
		{"nope"},
		{"explain", "-o", "yaml", "--layer", "L"},
	} {
		out, errs, code := runCapture(t, args...)
		if code != exitUsage || out != "" || !strings.Contains(errs, "usage") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, out, errs)
		}
	}
	for _, args := range [][]string{{"filter", "list", "--help"}, {"apply", "-h"}, {"filter", "--help"}, {"--help"}} {
		out, errs, code := runCapture(t, args...)
		if code != 0 || !strings.Contains(out, "usage: fwpctl") || errs != "" {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, out, errs)
		}
	}
}

// An oversized policy file fails before it is read whole or sent.
func TestApplyTooLargeFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "huge.yaml")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(policy.MaxSize + 1); err != nil { // sparse: no disk used
		t.Fatal(err)
	}
	f.Close()
	// No daemon: reaching it would fail with exit 4, not 1.
	_, errs, code := runCapture(t, "apply", "-f", p, "--socket", filepath.Join(t.TempDir(), "none.sock"))
	if code != exitFailure || !strings.Contains(errs, "larger than 16 MiB") || !strings.Contains(errs, "huge.yaml") {
		t.Fatalf("exit %d: %s", code, errs)
	}
}
