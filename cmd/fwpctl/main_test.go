package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"fwp/internal/testutil"
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
		{}, // no command: the usage, and a usage error
		{"completion"},
		{"completion", "fish"},
	} {
		out, errs, code := runCapture(t, args...)
		if code != exitUsage || out != "" || !strings.Contains(errs, "usage") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, out, errs)
		}
	}
	for _, args := range [][]string{{"filter", "list", "--help"}, {"apply", "-h"}, {"filter", "--help"}, {"help", "events"}, {"completion", "--help"}} {
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

// fwpctl --help and fwpctl help are the manual: what each exit code means
// among the rest.
func TestManual(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"help"}, {"-h"}} {
		out, errs, code := runCapture(t, args...)
		if code != 0 || errs != "" {
			t.Fatalf("%v: exit %d, stderr %q", args, code, errs)
		}
		for _, want := range []string{"SYNOPSIS", "EXIT STATUS", "2   usage error", "3   access denied", "4   the daemon could not be reached", "FWPD_SOCKET", "completion bash|zsh"} {
			if !strings.Contains(out, want) {
				t.Errorf("%v: the manual lacks %q", args, want)
			}
		}
	}
}

// The bash completion script completes commands, subcommands and each
// command's own flags, as bash itself runs it.
func TestCompletionBash(t *testing.T) {
	script, errs, code := runCapture(t, "completion", "bash")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		testutil.Unavailable(t, err)
	}
	for line, want := range map[string]string{
		"fwpctl fil":              "filter",
		"fwpctl filter a":         "add",
		"fwpctl filter add --cal": "--callout",
		"fwpctl sublayer add --w": "--weight",
		"fwpctl apply -":          "-f -o --socket",
		"fwpctl events --fo":      "--follow",
		"fwpctl completion z":     "zsh",
		"fwpctl help vers":        "version",
		"fwpctl events -o j":      "json",
	} {
		prog := script + "\nCOMP_WORDS=(" + line + "); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _fwpctl; echo \"${COMPREPLY[*]}\"\n"
		out, err := exec.Command(bash, "--norc", "-c", prog).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != want {
			t.Errorf("%q completes to %q (%v), want %q", line, out, err, want)
		}
	}
	zsh, errs, code := runCapture(t, "completion", "zsh")
	if code != 0 || !strings.HasPrefix(zsh, "#compdef fwpctl") || !strings.Contains(zsh, "--follow") || !strings.Contains(zsh, "compdef _fwpctl fwpctl") {
		t.Fatalf("zsh: exit %d %s\n%s", code, errs, zsh)
	}
	if z, err := exec.LookPath("zsh"); err == nil { // optional: zsh is not in CI's install line
		p := filepath.Join(t.TempDir(), "_fwpctl")
		if err := os.WriteFile(p, []byte(zsh), 0o600); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(z, "-n", p).CombinedOutput(); err != nil {
			t.Fatalf("zsh -n: %v %s", err, out)
		}
	}
}
