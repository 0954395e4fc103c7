package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"fwp/engine"
	"fwp/mgmt"
)

// ErrConflict: the documents kept changing while a write was checked.
var ErrConflict = errors.New("fleet: the policy changed while the document was checked; try again")

// Check dry-runs the fleet policy docs on an in-memory manager for each
// node, and for a host each document selects by its own nodes section, so
// that a writer refuses what the followers would refuse (all but what
// only the datapath can judge).
func Check(ctx context.Context, docs []*Document, nodes []Node) error {
	cands := slices.Clone(nodes)
	cands = append(cands, Node{Name: "fwp-check-any"})
	for _, d := range docs {
		if sel := d.Policy.Nodes; sel != nil {
			if len(sel.Hosts) > 0 {
				cands = append(cands, Node{Name: sel.Hosts[0]})
			}
			if len(sel.Labels) > 0 {
				cands = append(cands, Node{Name: "fwp-check-labels", Labels: sel.Labels})
			}
		}
	}
	seen := map[string]bool{}
	for _, n := range cands {
		// Hosts that select the same documents get the same policy.
		var names []string
		for _, d := range docs {
			if d.Selects(n) {
				names = append(names, d.Name)
			}
		}
		sort.Strings(names)
		sig := strings.Join(names, "\x00")
		if seen[sig] {
			continue
		}
		seen[sig] = true
		m, err := mgmt.New(engine.New(engine.Options{}), mgmt.Options{})
		if err != nil {
			return err
		}
		a, err := NewApplier(m, n)
		if err == nil {
			_, err = a.Apply(ctx, 1, docs)
			a.Close()
		}
		m.Close()
		if err != nil {
			return fmt.Errorf("for host %s: %w", n.Name, err)
		}
	}
	return nil
}

// Documents reads and parses every document; the error of a document
// that does not parse is in its place in errs.
func Documents(ctx context.Context, cl *clientv3.Client, prefix string) (docs []*Document, errs map[string]error, rev int64, err error) {
	pfx := PoliciesPrefix(prefix)
	resp, err := cl.Get(ctx, pfx, clientv3.WithPrefix())
	if err != nil {
		return nil, nil, 0, err
	}
	errs = map[string]error{}
	for _, kv := range resp.Kvs {
		name := strings.TrimPrefix(string(kv.Key), pfx)
		d, err := ParseDocument(name, kv.Value)
		if err != nil {
			errs[name] = err
			continue
		}
		docs = append(docs, d)
	}
	return docs, errs, resp.Header.Revision, nil
}

// PutDocument checks the document data named name as the followers will
// (with the other documents and the known hosts) and writes it in one
// transaction, or deletes it when data is nil. It returns the revision
// written.
func PutDocument(ctx context.Context, cl *clientv3.Client, prefix, name string, data []byte) (int64, error) {
	var doc *Document
	if data != nil {
		var err error
		if doc, err = ParseDocument(name, data); err != nil {
			return 0, err
		}
	} else if err := CheckName("document", name); err != nil {
		return 0, err
	}
	for range 5 {
		docs, errs, rev, err := Documents(ctx, cl, prefix)
		if err != nil {
			return 0, err
		}
		delete(errs, name)
		for n, e := range errs {
			return 0, fmt.Errorf("document %s in etcd does not parse (fix or delete it first): %w", n, e)
		}
		docs = slices.DeleteFunc(docs, func(d *Document) bool { return d.Name == name })
		if doc != nil {
			docs = append(docs, doc)
		}
		nodes, _, err := Nodes(ctx, cl, prefix)
		if err != nil {
			return 0, err
		}
		var ns []Node
		for _, s := range nodes {
			ns = append(ns, Node{Name: s.Node, Labels: s.Labels})
		}
		if err := Check(ctx, docs, ns); err != nil {
			return 0, err
		}
		key := PoliciesPrefix(prefix) + name
		op := clientv3.OpDelete(key)
		if data != nil {
			op = clientv3.OpPut(key, string(data))
		}
		// Written only if no document changed since they were checked.
		tr, err := cl.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(PoliciesPrefix(prefix)), "<", rev+1).WithPrefix()).
			Then(op).Commit()
		if err != nil {
			return 0, err
		}
		if tr.Succeeded {
			return tr.Header.Revision, nil
		}
	}
	return 0, ErrConflict
}

// Nodes lists the hosts' statuses, by name.
func Nodes(ctx context.Context, cl *clientv3.Client, prefix string) ([]Status, int64, error) {
	resp, err := cl.Get(ctx, NodesPrefix(prefix), clientv3.WithPrefix())
	if err != nil {
		return nil, 0, err
	}
	var out []Status
	for _, kv := range resp.Kvs {
		var s Status
		if err := json.Unmarshal(kv.Value, &s); err != nil {
			s = Status{Node: strings.TrimPrefix(string(kv.Key), NodesPrefix(prefix)), LastError: &ErrorReport{Error: "unreadable status: " + err.Error()}}
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Node < out[j].Node })
	return out, resp.Header.Revision, nil
}
