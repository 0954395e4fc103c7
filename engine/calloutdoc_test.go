package engine

import (
	"os"
	"strings"
	"testing"
)

// Seed 003's inline and out-of-band modification types change traffic;
// connect and bind redirection (seed 001) change where a flow goes. The
// helpers' table must not present one as the other (issue 12, item 8).
func TestCalloutTypesDocDoesNotCallRedirectModification(t *testing.T) {
	b, err := os.ReadFile("callouttypes.go")
	if err != nil {
		t.Fatal(err)
	}
	for i, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "//") {
			continue
		}
		l := strings.ToLower(line)
		if strings.Contains(l, "modification") && (strings.Contains(line, "ConnectRedirect") || strings.Contains(line, "BindRedirect")) {
			t.Errorf("callouttypes.go:%d labels a redirect helper as a modification callout: %s", i+1, strings.TrimSpace(line))
		}
	}
}
