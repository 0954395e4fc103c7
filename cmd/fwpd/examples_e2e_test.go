package main_test

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"fwp/internal/testutil"
)

// repoFile reads a file of the repository (tests run in cmd/fwpd).
func repoFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// docPolicy is the policy a doc.go shows: its first indented comment
// block with a filters section.
func docPolicy(t *testing.T, name string) string {
	t.Helper()
	var blocks []string
	var cur strings.Builder
	for _, l := range strings.Split(repoFile(t, name), "\n") {
		if s, ok := strings.CutPrefix(l, "//\t"); ok {
			cur.WriteString(s + "\n")
			continue
		}
		if cur.Len() > 0 {
			blocks = append(blocks, cur.String())
			cur.Reset()
		}
	}
	for _, b := range blocks {
		if strings.Contains(b, "filters:") {
			return b
		}
	}
	t.Fatalf("%s shows no policy", name)
	return ""
}

// readmePolicy is the README's "Try it" policy.
func readmePolicy(t *testing.T) string {
	s := repoFile(t, "README.md")
	_, after, ok := strings.Cut(s, "cat > /tmp/policy.yaml <<'YAML'\n")
	body, _, ok2 := strings.Cut(after, "\nYAML\n")
	if !ok || !ok2 {
		t.Fatal("README.md has no Try it policy")
	}
	return body
}

func examplePolicies(t *testing.T) []string {
	files, err := filepath.Glob(filepath.Join("..", "..", "examples", "policies", "*.yaml"))
	if err != nil || len(files) < 4 {
		t.Fatalf("examples/policies: %v %v", files, err)
	}
	sort.Strings(files)
	return files
}

// Every file of examples/policies applies cleanly, without a warning, and
// so do the README's and the doc.go files' policies, all in one daemon:
// their keys do not collide.
func TestE2EExamplePolicies(t *testing.T) {
	d := startDaemon(t, shortDir(t))
	for _, f := range examplePolicies(t) {
		out, errs, code := d.ctl("apply", "-f", f)
		if code != 0 || errs != "" || !strings.Contains(out, "added") {
			t.Errorf("%s: exit %d, %q, %q", f, code, out, errs)
		}
	}
	dir := t.TempDir()
	// policy/doc.go's list condition reads a values file beside the policy.
	write(t, dir, "drop.txt", "192.0.2.0/24 # a documentation network\n198.51.100.7\n")
	for name, pol := range map[string]string{
		"README.md":                     readmePolicy(t),
		"policy/doc.go":                 docPolicy(t, "policy/doc.go"),
		"examples/redirectproxy/doc.go": strings.ReplaceAll(docPolicy(t, "examples/redirectproxy/doc.go"), "PID", "0"),
	} {
		out, errs, code := d.ctl("apply", "-f", write(t, dir, strings.ReplaceAll(name, "/", "_")+".yaml", pol))
		if code != 0 || errs != "" {
			t.Errorf("%s's policy after the examples: exit %d, %q, %q", name, code, out, errs)
		}
	}
	keys := strings.Join(d.filterKeys(), " ")
	for _, k := range []string{"hostfw-block-telnet-smb", "apps-curl-web-only", "proxy-web-to-3131", "async-ask-before-connect"} {
		if !strings.Contains(keys, k) {
			t.Errorf("filter %s missing: %s", k, keys)
		}
	}
}

// With the kernel datapath the host firewall and the transparent proxy
// apply as they are; the files that need the in-process datapath are
// refused, naming the filter the kernel cannot decide, as they say.
func TestE2EKernelExamplePolicies(t *testing.T) {
	testutil.RequireRoot(t)
	cg := testutil.NewCgroup(t)
	d := startKernelDaemon(t, cg, kernelDir(t))
	for _, f := range examplePolicies(t) {
		_, errs, code := d.ctl("apply", "-f", f)
		switch filepath.Base(f) {
		case "per-application.yaml":
			if code != 1 || !strings.Contains(errs, `filter "apps-`) || !strings.Contains(errs, "not supported by the kernel datapath") {
				t.Errorf("%s: exit %d, %q", f, code, errs)
			}
		case "pending-callout.yaml":
			if code != 1 || !strings.Contains(errs, `filter "async-ask-before-connect"`) {
				t.Errorf("%s: exit %d, %q", f, code, errs)
			}
		default:
			if code != 0 {
				t.Errorf("%s: exit %d, %q", f, code, errs)
			}
		}
	}
}
