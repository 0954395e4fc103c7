package policy

import (
	"context"
	"errors"
	"strings"
	"testing"

	"fwp/engine"
	"fwp/mgmt"
)

// A datapath's refusal at commit, about an object the file added, names
// the object by key and by the file:line it came from, as the parser's
// errors do — not by an engine ID the user never saw.
func TestCommitRefusalNamesKeyAndLine(t *testing.T) {
	errRefused := errors.New("the datapath cannot do this")
	m, err := mgmt.New(engine.New(engine.Options{}), mgmt.Options{
		BeforeCommit: func(v engine.View) error {
			for _, f := range v.Filters(engine.FilterTemplate{}) {
				if f.Key == "bad" {
					return engine.FilterError(&f, errRefused)
				}
			}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	const file = `filters:
  - {key: good, layer: ALE_AUTH_CONNECT_V4, action: block}
  - key: bad
    layer: ALE_AUTH_CONNECT_V4
    action: permit
`
	pol, err := Parse("host.yaml", []byte(file))
	if err != nil {
		t.Fatal(err)
	}
	sid := m.OpenSession(mgmt.SessionInfo{Name: "t", PID: 1}).ID
	_, err = m.Apply(context.Background(), sid, pol.Ops)
	if !errors.Is(err, errRefused) || !errors.Is(err, engine.ErrTxnAborted) {
		t.Fatalf("apply: %v", err)
	}
	if msg := err.Error(); !strings.Contains(msg, `host.yaml:3: filter "bad" (#`) || strings.Contains(msg, "filter#") {
		t.Fatalf("the refusal does not name the filter by key and line: %v", msg)
	}
	// Deleting a provider still in use names both objects by key.
	if _, err := m.Apply(context.Background(), sid, mustParse(t, `providers: [{key: acme}]
provider_contexts: [{key: ctx, provider: acme, data: x}]`).Ops); err != nil {
		t.Fatal(err)
	}
	err = m.Delete(context.Background(), sid, mgmt.Ref{Kind: mgmt.KindProvider, Key: "acme"})
	if !errors.Is(err, engine.ErrInUse) || !strings.Contains(err.Error(), `provider "acme" (#`) || !strings.Contains(err.Error(), `referenced by provider_context "ctx" (#`) {
		t.Fatalf("delete of a provider in use: %v", err)
	}
}

func mustParse(t *testing.T, s string) *Policy {
	t.Helper()
	p, err := Parse("t.yaml", []byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return p
}
