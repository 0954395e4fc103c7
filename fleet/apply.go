package fleet

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"fwp/engine"
	"fwp/mgmt"
)

type objKey struct {
	kind mgmt.Kind
	key  string
}

func (k objKey) String() string { return k.kind.String() + " " + k.key }

// AppliedObject is one object the fleet added, with its digest.
type AppliedObject struct {
	Kind mgmt.Kind `json:"kind"`
	Key  string    `json:"key"`
	Sum  string    `json:"sum"`
}

// State is what a host enforces of the fleet policy: the revision, the
// policy's hash and the fleet's objects. It is stored as the data of the
// provider context StateKey, committed with the policy it describes.
type State struct {
	Revision int64           `json:"revision"`
	Hash     string          `json:"hash"`
	Objects  []AppliedObject `json:"objects,omitempty"`
}

// Applier applies fleet policies to a manager, touching only the objects
// it recorded as the fleet's.
type Applier struct {
	m     *mgmt.Manager
	sid   uint64
	node  Node
	state State // committed
	// rev is the newest revision whose policy is in force: state.Revision,
	// or later when later revisions changed nothing for this node.
	rev        int64
	haveOwner  bool // the fleet provider exists
	haveRecord bool // the state context exists
}

// NewApplier opens a session on m for node and reads the state it left.
func NewApplier(m *mgmt.Manager, node Node) (*Applier, error) {
	a := &Applier{m: m, node: node}
	a.sid = m.OpenSession(mgmt.SessionInfo{Name: "fleet"}).ID
	if _, err := m.Get(a.sid, mgmt.Ref{Kind: mgmt.KindProvider, Key: ProviderKey}); err == nil {
		a.haveOwner = true
	}
	o, err := m.Get(a.sid, mgmt.Ref{Kind: mgmt.KindProviderContext, Key: StateKey})
	switch {
	case err == nil && o.ProviderContext != nil:
		if err := json.Unmarshal(o.ProviderContext.Data, &a.state); err != nil {
			return nil, fmt.Errorf("fleet: the record %s is damaged: %w", StateKey, err)
		}
		a.haveRecord = true
	case errors.Is(err, engine.ErrNotFound):
		a.state.Hash = hashOf(nil)
	default:
		return nil, err
	}
	a.rev = a.state.Revision
	return a, nil
}

// rewind forgets the applied revision (not the objects), so that a policy
// at a lower revision — from a new etcd cluster — is applied.
func (a *Applier) rewind() { a.rev = 0 }

// Close ends the applier's session.
func (a *Applier) Close() { a.m.CloseSession(a.sid) }

// State returns the committed state.
func (a *Applier) State() State { return a.state }

// Revision returns the newest revision whose policy is in force.
func (a *Applier) Revision() int64 { return a.rev }

type wanted struct {
	key objKey
	obj mgmt.Object
	sum string
	pos string
}

// Want computes the objects the documents give node, in the order they
// must be added, with their digests. Two documents adding the same object
// is an error.
func Want(docs []*Document, node Node) ([]wanted, error) {
	docs = slices.Clone(docs)
	sort.Slice(docs, func(i, j int) bool { return docs[i].Name < docs[j].Name })
	byKind := make([][]wanted, 6)
	where := map[objKey]string{}
	for _, d := range docs {
		if !d.Selects(node) {
			continue
		}
		for _, op := range d.Policy.Ops {
			o := normalize(op.Add)
			key, _ := objectHead(&o)
			k := objKey{o.Kind(), key}
			if prev, dup := where[k]; dup {
				return nil, fmt.Errorf("%s: %w: %s %q is also added by %s", op.Pos, ErrInvalidDocument, k.kind, key, prev)
			}
			where[k] = op.Pos
			b, err := json.Marshal(o)
			if err != nil {
				return nil, err
			}
			sum := sha256.Sum256(b)
			byKind[k.kind] = append(byKind[k.kind], wanted{key: k, obj: o, sum: hex.EncodeToString(sum[:12]), pos: op.Pos})
		}
	}
	var out []wanted
	for _, ws := range byKind {
		out = append(out, ws...)
	}
	return out, nil
}

// hashOf is the policy's hash: a digest of its objects' digests.
func hashOf(objs []AppliedObject) string {
	objs = slices.Clone(objs)
	slices.SortFunc(objs, func(a, b AppliedObject) int {
		if a.Kind != b.Kind {
			return int(a.Kind) - int(b.Kind)
		}
		return strings.Compare(a.Key, b.Key)
	})
	h := sha256.New()
	for _, o := range objs {
		fmt.Fprintf(h, "%s/%s=%s\n", o.Kind, o.Key, o.Sum)
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// Result says what Apply did.
type Result struct {
	Revision         int64
	Hash             string
	Added, Deleted   int
	Committed        bool // false: nothing changed for this node
	Objects          int
	PreviousRevision int64
}

// Apply makes the fleet policy of docs at revision rev the one in force,
// in one transaction, or changes nothing and returns the error.
func (a *Applier) Apply(ctx context.Context, rev int64, docs []*Document) (Result, error) {
	want, err := Want(docs, a.node)
	if err != nil {
		return Result{}, err
	}
	// What is in force: the recorded objects that still exist (an
	// administrator may have deleted one locally; it is added again).
	cur := map[objKey]string{}
	for _, o := range a.state.Objects {
		if _, err := a.m.Get(a.sid, mgmt.Ref{Kind: o.Kind, Key: o.Key}); err == nil {
			cur[objKey{o.Kind, o.Key}] = o.Sum
		}
	}
	wantSet := map[objKey]*wanted{}
	changed := map[objKey]bool{}
	for i := range want {
		w := &want[i]
		wantSet[w.key] = w
		if cur[w.key] != w.sum {
			changed[w.key] = true
		}
	}
	gone := map[objKey]bool{}
	for k := range cur {
		if wantSet[k] == nil {
			gone[k] = true
		}
	}
	// An object that refers to a replaced or removed one is replaced too
	// (mgmt refuses to delete what is referenced).
	for again := true; again; {
		again = false
		for _, w := range want {
			if changed[w.key] {
				continue
			}
			for _, r := range refs(w.obj) {
				if changed[r] || gone[r] {
					changed[w.key], again = true, true
					break
				}
			}
		}
	}
	next := State{Revision: rev}
	for _, w := range want {
		next.Objects = append(next.Objects, AppliedObject{Kind: w.key.kind, Key: w.key.key, Sum: w.sum})
	}
	next.Hash = hashOf(next.Objects)
	res := Result{Revision: rev, Hash: next.Hash, Objects: len(want), PreviousRevision: a.rev}
	if len(changed) == 0 && len(gone) == 0 && len(cur) == len(a.state.Objects) {
		a.rev = max(a.rev, rev)
		return res, nil
	}
	var ops []mgmt.Op
	// Deletions, referrers first: filters, callouts, sublayers, contexts,
	// providers.
	var dels []objKey
	for k := range cur {
		if gone[k] || changed[k] {
			dels = append(dels, k)
		}
	}
	slices.SortFunc(dels, func(x, y objKey) int {
		if x.kind != y.kind {
			return int(y.kind) - int(x.kind)
		}
		return strings.Compare(x.key, y.key)
	})
	for _, k := range dels {
		ops = append(ops, mgmt.Op{Pos: "fleet: removing " + k.String(), Delete: &mgmt.Ref{Kind: k.kind, Key: k.key}})
	}
	if a.haveRecord {
		ops = append(ops, mgmt.Op{Delete: &mgmt.Ref{Kind: mgmt.KindProviderContext, Key: StateKey}})
	}
	if !a.haveOwner {
		ops = append(ops, mgmt.Op{Add: &mgmt.Object{Provider: &mgmt.Provider{Key: ProviderKey, Name: "fwp fleet policy", Description: "objects of the policy kept in etcd (fwpd --policy-source etcd)", Lifetime: mgmt.LifetimePersistent}}})
	}
	for _, w := range want {
		if changed[w.key] {
			ops = append(ops, mgmt.Op{Pos: w.pos, Add: &w.obj})
			res.Added++
		}
	}
	res.Deleted = len(dels)
	data, err := json.Marshal(next)
	if err != nil {
		return Result{}, err
	}
	ops = append(ops, mgmt.Op{Add: &mgmt.Object{ProviderContext: &mgmt.ProviderContext{Key: StateKey, Name: "fleet state", Provider: ProviderKey, Data: data, Lifetime: mgmt.LifetimePersistent}}})
	if _, err := a.m.Apply(ctx, a.sid, ops); err != nil {
		return Result{}, err
	}
	a.state, a.rev, a.haveOwner, a.haveRecord = next, rev, true, true
	res.Committed = true
	return res, nil
}
