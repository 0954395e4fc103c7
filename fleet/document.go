package fleet

import (
	"errors"
	"fmt"
	"regexp"

	"fwp/mgmt"
	"fwp/policy"
)

// Reserved keys: the fleet's provider and the record of what it applied.
const (
	ProviderKey = "fwp.fleet"
	StateKey    = "fwp.fleet.state"
)

// ErrInvalidDocument is a document the fleet refuses (beyond policy's
// errors, which match mgmt.ErrInvalidPolicy): a delete section, a
// lifetime other than persistent, a reserved key, a bad name.
var ErrInvalidDocument = errors.New("fleet: invalid policy document")

// Document is a parsed fleet policy document.
type Document struct {
	Name   string
	Policy *policy.Policy
}

// Selects reports whether the document applies to node.
func (d *Document) Selects(n Node) bool { return d.Policy.Nodes.Selects(n.Name, n.Labels) }

// Node names a host and its labels.
type Node struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// CheckName checks a document or node name: letters, digits, '.', '_',
// '-', at most 128, so that it is one etcd key segment.
func CheckName(what, name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: %s name %q: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalidDocument, what, name)
	}
	return nil
}

// ParseDocument parses a document with policy.Parse and applies the
// fleet's rules. Errors carry "name:line:column".
func ParseDocument(name string, data []byte) (*Document, error) {
	if err := CheckName("document", name); err != nil {
		return nil, err
	}
	pol, err := policy.Parse(name, data)
	if err != nil {
		return nil, err
	}
	for _, op := range pol.Ops {
		if op.Delete != nil {
			return nil, fmt.Errorf("%s: %w: a fleet document has no delete section: the fleet policy is the documents themselves (delete or change the document that adds %s)", op.Pos, ErrInvalidDocument, op.Delete)
		}
		o := op.Add
		key, l := objectHead(o)
		if key == ProviderKey || key == StateKey {
			return nil, fmt.Errorf("%s: %w: %s %q is reserved for the fleet's own records", op.Pos, ErrInvalidDocument, o.Kind(), key)
		}
		if l != mgmt.LifetimeDefault && l != mgmt.LifetimePersistent {
			return nil, fmt.Errorf("%s: %w: %s %q is %s; fleet objects are persistent (leave lifetime out)", op.Pos, ErrInvalidDocument, o.Kind(), key, l)
		}
	}
	return &Document{Name: name, Policy: pol}, nil
}

// objectHead returns an object's key and lifetime.
func objectHead(o *mgmt.Object) (string, mgmt.Lifetime) {
	switch {
	case o.Provider != nil:
		return o.Provider.Key, o.Provider.Lifetime
	case o.ProviderContext != nil:
		return o.ProviderContext.Key, o.ProviderContext.Lifetime
	case o.Sublayer != nil:
		return o.Sublayer.Key, o.Sublayer.Lifetime
	case o.Callout != nil:
		return o.Callout.Key, o.Callout.Lifetime
	case o.Filter != nil:
		return o.Filter.Key, o.Filter.Lifetime
	}
	return "", 0
}

// normalize returns a copy of o as the fleet adds it: persistent, and
// owned by the fleet's provider when it names none.
func normalize(o *mgmt.Object) mgmt.Object {
	var c mgmt.Object
	owner := func(p string) string {
		if p == "" {
			return ProviderKey
		}
		return p
	}
	switch {
	case o.Provider != nil:
		v := *o.Provider
		v.Lifetime = mgmt.LifetimePersistent
		c.Provider = &v
	case o.ProviderContext != nil:
		v := *o.ProviderContext
		v.Lifetime, v.Provider = mgmt.LifetimePersistent, owner(v.Provider)
		c.ProviderContext = &v
	case o.Sublayer != nil:
		v := *o.Sublayer
		v.Lifetime, v.Provider = mgmt.LifetimePersistent, owner(v.Provider)
		c.Sublayer = &v
	case o.Callout != nil:
		v := *o.Callout
		v.Lifetime, v.Provider = mgmt.LifetimePersistent, owner(v.Provider)
		c.Callout = &v
	case o.Filter != nil:
		v := *o.Filter
		v.Lifetime, v.Provider = mgmt.LifetimePersistent, owner(v.Provider)
		c.Filter = &v
	}
	return c
}

// refs lists the objects o refers to.
func refs(o mgmt.Object) []objKey {
	var out []objKey
	add := func(k mgmt.Kind, key string) {
		if key != "" {
			out = append(out, objKey{k, key})
		}
	}
	switch {
	case o.ProviderContext != nil:
		add(mgmt.KindProvider, o.ProviderContext.Provider)
	case o.Sublayer != nil:
		add(mgmt.KindProvider, o.Sublayer.Provider)
	case o.Callout != nil:
		add(mgmt.KindProvider, o.Callout.Provider)
	case o.Filter != nil:
		f := o.Filter
		add(mgmt.KindProvider, f.Provider)
		add(mgmt.KindSublayer, f.Sublayer)
		add(mgmt.KindCallout, f.Callout)
		add(mgmt.KindProviderContext, f.ProviderContext)
	}
	return out
}
