package engine_test

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The engine is embeddable anywhere because it imports only the standard
// library. This test parses every non-test Go file of the package (whatever
// its build tags) and fails on any other import.

// modulePath reads the module's own path from go.mod: it has no dot, so
// without this check "fwp/..." would pass for the standard library.
func modulePath(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if m, ok := strings.CutPrefix(strings.TrimSpace(line), "module "); ok {
			return strings.Trim(strings.TrimSpace(m), `"`)
		}
	}
	t.Fatal("go.mod has no module line")
	return ""
}

// isStd reports whether an import path is in the standard library: no dot
// in its first element, not cgo's "C", not this module.
func isStd(path, module string) bool {
	first, _, _ := strings.Cut(path, "/")
	return !strings.Contains(first, ".") && path != "C" && first != module
}

func TestIsStd(t *testing.T) {
	for path, want := range map[string]bool{
		"fmt": true, "net/netip": true, "crypto/rand": true, "unsafe": true,
		"golang.org/x/sys/unix": false, "github.com/cilium/ebpf": false, "example.com": false,
		"C": false, "fwp/internal/unix": false, "fwp": false, "fwpx/y": true,
	} {
		if got := isStd(path, "fwp"); got != want {
			t.Errorf("isStd(%q) = %v, want %v", path, got, want)
		}
	}
}

func TestEngineImportsOnlyStd(t *testing.T) {
	module := modulePath(t)
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	checked := 0
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		checked++
		for _, imp := range f.Imports {
			path, err := strconv.Unquote(imp.Path.Value)
			if err != nil {
				t.Fatal(err)
			}
			if !isStd(path, module) {
				t.Errorf("%s imports %q: package engine may import only the standard library", fset.Position(imp.Pos()), path)
			}
		}
	}
	if checked < 5 {
		t.Fatalf("checked only %d files: is the test running in the engine directory?", checked)
	}
}
