package fleet

import (
	"context"
	"testing"
)

// FuzzParseDocument: any bytes give a document or an error, never a
// panic; a document that parses gives a policy (or an error) for any host.
func FuzzParseDocument(f *testing.F) {
	for _, s := range []string{
		docBase,
		"nodes: {hosts: [h1], labels: {role: web}}\nfilters:\n  - {key: x, layer: ALE_AUTH_CONNECT_V4, action: block}\n",
		"nodes: ~\n",
		"nodes: {labels: ~, hosts: ~}\n",
		"nodes: {hosts: ''}\n",
		"nodes: {labels: {a: [1]}}\n",
		"nodes: &a {hosts: *a}\n",
		"delete:\n  - {kind: filter, key: x}\n",
		"lifetime: static\nproviders: [{key: p}]\n",
	} {
		f.Add(s)
	}
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDocument("doc", []byte(s))
		if err != nil {
			return
		}
		n := Node{Name: "h1", Labels: map[string]string{"role": "web"}}
		d.Selects(n)
		if len(d.Policy.Ops) > 50 {
			return // the dry run below is the slow part
		}
		_ = Check(ctx, []*Document{d}, []Node{n})
	})
}
