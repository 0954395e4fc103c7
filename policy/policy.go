package policy

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"fwp/engine"
	"fwp/mgmt"
)

// MaxSize bounds a policy file. Parsing holds some 30 times the file's
// size in memory (YAML nodes): 16 MiB, some 80,000 filters, costs the
// daemon about half a GiB while it parses (64 MiB cost 2 GiB).
const MaxSize = 16 << 20

// Error is a policy file error at a position. It matches
// mgmt.ErrInvalidPolicy and, when there is one, the underlying typed error
// (engine.ErrInvalidValue, engine.ErrInvalidLayer, ...).
type Error struct {
	File         string
	Line, Column int
	Msg          string
	Err          error
}

func (e *Error) Error() string {
	s := fmt.Sprintf("%s:%d:%d: %s", e.File, e.Line, e.Column, e.Msg)
	if e.Err != nil {
		if e.Msg != "" {
			s += ": "
		}
		s += e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() []error {
	if e.Err == nil {
		return []error{mgmt.ErrInvalidPolicy}
	}
	return []error{mgmt.ErrInvalidPolicy, e.Err}
}

// Policy is a parsed file: the ops to apply, in order, each with its
// file:line position.
type Policy struct {
	Ops []mgmt.Op
	// Nodes is the document's nodes section: the fleet hosts it applies
	// to (package fleet); nil when absent. Only fleet documents have one.
	Nodes *Selector
}

// Selector names the hosts a fleet document applies to: a host is
// selected when it is listed in Hosts, or when Labels is not empty and the
// host carries every one of them. An empty selector selects every host.
//
//	nodes:
//	  hosts: [web-1, web-2]
//	  labels: {role: web, zone: a}
type Selector struct {
	Hosts  []string          `json:"hosts,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
}

// Selects reports whether the selector picks the host with these labels.
func (s *Selector) Selects(host string, labels map[string]string) bool {
	if s == nil || (len(s.Hosts) == 0 && len(s.Labels) == 0) {
		return true
	}
	for _, h := range s.Hosts {
		if h == host {
			return true
		}
	}
	if len(s.Labels) == 0 {
		return false
	}
	for k, v := range s.Labels {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

type parser struct {
	file     string
	lifetime mgmt.Lifetime
	opts     Options
}

// Options are what Parse is given besides the policy file.
type Options struct {
	// ValuesFiles holds the values files the policy names (values_file),
	// by name as the policy writes them. The parser never opens a file: a
	// client reads them (ValuesFileNames) and sends them with the policy,
	// so a daemon parsing a request reads nothing the caller names.
	ValuesFiles map[string][]byte
}

// MaxValuesFile bounds one values file: a million IPv6 prefixes fit.
const MaxValuesFile = 48 << 20

func (p *parser) errf(n *yaml.Node, err error, format string, a ...any) error {
	line, col := 1, 1
	if n != nil {
		line, col = max(n.Line, 1), max(n.Column, 1)
	}
	return &Error{File: p.file, Line: line, Column: col, Msg: fmt.Sprintf(format, a...), Err: err}
}

func (p *parser) pos(n *yaml.Node) string { return fmt.Sprintf("%s:%d", p.file, n.Line) }

// Parse reads a policy file; name is used in error positions.
func Parse(name string, data []byte) (*Policy, error) { return ParseWith(name, data, Options{}) }

// ParseWith reads a policy file whose list conditions may name values
// files, given in opts.
func ParseWith(name string, data []byte, opts Options) (*Policy, error) {
	p := &parser{file: name, opts: opts}
	if len(data) > MaxSize {
		return nil, &Error{File: name, Line: 1, Column: 1, Msg: fmt.Sprintf("file is %d bytes, the limit is %d", len(data), MaxSize), Err: mgmt.ErrTooLarge}
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, p.yamlErr(err)
	}
	pol := &Policy{}
	if doc.Kind == 0 || len(doc.Content) == 0 {
		return pol, nil // empty file: nothing to do
	}
	root := doc.Content[0]
	if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
		return pol, nil
	}
	if root.Kind != yaml.MappingNode {
		return nil, p.errf(root, nil, "the policy must be a mapping of sections (providers, sublayers, filters, ...)")
	}
	sections := map[string]*yaml.Node{}
	var nodes *Selector
	err := p.fields(root, func(k string, v *yaml.Node) error {
		switch k {
		case "lifetime":
			s, err := p.str(v)
			if err != nil {
				return err
			}
			if p.lifetime, err = mgmt.ParseLifetime(s); err != nil {
				return p.errf(v, err, "")
			}
		case "providers", "provider_contexts", "sublayers", "callouts", "filters", "delete":
			sections[k] = v
		case "nodes":
			sel, err := p.selector(v)
			if err != nil {
				return err
			}
			nodes = sel
		default:
			return p.errf(v, nil, "unknown section %q (lifetime, nodes, providers, provider_contexts, sublayers, callouts, filters, delete)", k)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	pol.Nodes = nodes
	type section struct {
		name string
		item func(*yaml.Node) (mgmt.Op, error)
	}
	for _, s := range []section{
		{"delete", p.deleteOp}, {"providers", p.provider}, {"provider_contexts", p.context},
		{"sublayers", p.sublayer}, {"callouts", p.callout}, {"filters", p.filter},
	} {
		n := sections[s.name]
		if n == nil || (n.Kind == yaml.ScalarNode && n.Tag == "!!null") {
			continue
		}
		if n.Kind != yaml.SequenceNode {
			return nil, p.errf(n, nil, "%s must be a list", s.name)
		}
		for _, it := range n.Content {
			if it.Kind != yaml.MappingNode {
				return nil, p.errf(it, nil, "each entry of %s must be a mapping", s.name)
			}
			op, err := s.item(it)
			if err != nil {
				return nil, err
			}
			op.Pos = p.pos(it)
			pol.Ops = append(pol.Ops, op)
		}
	}
	return pol, nil
}

// yamlErr turns a yaml.v3 error ("yaml: line N: ...") into a positioned Error.
func (p *parser) yamlErr(err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	line := 1
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		if i := strings.IndexByte(rest, ':'); i > 0 {
			if n, err := strconv.Atoi(rest[:i]); err == nil {
				line, msg = n, strings.TrimSpace(rest[i+1:])
			}
		}
	}
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) > 0 {
		msg = te.Errors[0]
	}
	return &Error{File: p.file, Line: line, Column: 1, Msg: "YAML syntax: " + msg}
}

// fields walks a mapping, refusing duplicate and non-string keys.
func (p *parser) fields(n *yaml.Node, fn func(k string, v *yaml.Node) error) error {
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			return p.errf(k, nil, "a key must be a plain name")
		}
		if seen[k.Value] {
			return p.errf(k, nil, "%q is given twice", k.Value)
		}
		seen[k.Value] = true
		if err := fn(k.Value, v); err != nil {
			return err
		}
	}
	return nil
}

func (p *parser) str(v *yaml.Node) (string, error) {
	if v.Kind == yaml.AliasNode && v.Alias != nil {
		v = v.Alias
	}
	if v.Kind != yaml.ScalarNode {
		return "", p.errf(v, engine.ErrTypeMismatch, "want a single value, not a %s", kindName(v))
	}
	if v.Tag == "!!null" {
		return "", nil
	}
	return v.Value, nil
}

func (p *parser) strs(v *yaml.Node) ([]string, error) {
	if v.Kind == yaml.ScalarNode {
		if v.Tag == "!!null" {
			return nil, nil
		}
		return []string{v.Value}, nil
	}
	if v.Kind != yaml.SequenceNode {
		return nil, p.errf(v, engine.ErrTypeMismatch, "want a list of names, not a %s", kindName(v))
	}
	var out []string
	for _, it := range v.Content {
		s, err := p.str(it)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// layer reads a layer name.
func (p *parser) layer(v *yaml.Node) (string, engine.LayerID, error) {
	s, err := p.str(v)
	if err != nil {
		return "", 0, err
	}
	l, err := mgmt.ParseLayer(s)
	if err != nil {
		return "", 0, p.errf(v, err, "")
	}
	return s, l, nil
}

// flags reads a list of flag names and checks them with check.
func (p *parser) flags(v *yaml.Node, check func([]string) error) ([]string, error) {
	names, err := p.strs(v)
	if err != nil {
		return nil, err
	}
	if err := check(names); err != nil {
		return nil, p.errf(v, err, "")
	}
	return names, nil
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "mapping"
	case yaml.SequenceNode:
		return "list"
	case yaml.AliasNode:
		return "alias"
	}
	return "value"
}

// common reads the keys every object has; other keys go to fn.
type common struct {
	key, name, provider string
	lifetime            mgmt.Lifetime
	keyNode             *yaml.Node
}

func (p *parser) object(n *yaml.Node, what string, fn func(k string, v *yaml.Node) (bool, error)) (common, error) {
	c := common{lifetime: p.lifetime}
	err := p.fields(n, func(k string, v *yaml.Node) error {
		var err error
		switch k {
		case "key":
			c.key, err = p.str(v)
			c.keyNode = v
		case "name":
			c.name, err = p.str(v)
		case "provider":
			c.provider, err = p.str(v)
		case "lifetime":
			var s string
			if s, err = p.str(v); err == nil {
				if c.lifetime, err = mgmt.ParseLifetime(s); err != nil {
					err = p.errf(v, err, "")
				}
			}
		default:
			ok, ferr := fn(k, v)
			if ferr != nil {
				return ferr
			}
			if !ok {
				return p.errf(v, nil, "unknown %s attribute %q", what, k)
			}
		}
		return err
	})
	if err == nil && strings.TrimSpace(c.key) == "" {
		err = p.errf(n, engine.ErrInvalidArgument, "a %s needs a key", what)
	}
	return c, err
}

func (p *parser) provider(n *yaml.Node) (mgmt.Op, error) {
	var desc string
	c, err := p.object(n, "provider", func(k string, v *yaml.Node) (bool, error) {
		if k == "description" {
			s, err := p.str(v)
			desc = s
			return true, err
		}
		return false, nil
	})
	if err != nil {
		return mgmt.Op{}, err
	}
	if c.provider != "" {
		return mgmt.Op{}, p.errf(n, nil, "a provider has no provider")
	}
	return mgmt.Op{Add: &mgmt.Object{Provider: &mgmt.Provider{Key: c.key, Name: c.name, Description: desc, Lifetime: c.lifetime}}}, nil
}

func (p *parser) context(n *yaml.Node) (mgmt.Op, error) {
	var data []byte
	var have bool
	c, err := p.object(n, "provider context", func(k string, v *yaml.Node) (bool, error) {
		switch k {
		case "data", "data_hex":
			if have {
				return true, p.errf(v, nil, "give data or data_hex, not both")
			}
			have = true
			s, err := p.str(v)
			if err != nil {
				return true, err
			}
			if k == "data" {
				data = []byte(s)
				return true, nil
			}
			h := strings.TrimPrefix(strings.TrimPrefix(strings.TrimSpace(s), "0x"), "0X")
			if data, err = hex.DecodeString(h); err != nil {
				return true, p.errf(v, engine.ErrInvalidValue, "data_hex %q is not hex", s)
			}
			return true, nil
		}
		return false, nil
	})
	if err != nil {
		return mgmt.Op{}, err
	}
	return mgmt.Op{Add: &mgmt.Object{ProviderContext: &mgmt.ProviderContext{Key: c.key, Name: c.name, Provider: c.provider, Data: data, Lifetime: c.lifetime}}}, nil
}

func (p *parser) sublayer(n *yaml.Node) (mgmt.Op, error) {
	var w uint16
	c, err := p.object(n, "sublayer", func(k string, v *yaml.Node) (bool, error) {
		if k != "weight" {
			return false, nil
		}
		s, err := p.str(v)
		if err != nil {
			return true, err
		}
		x, err := strconv.ParseUint(strings.TrimSpace(s), 0, 16)
		if err != nil {
			return true, p.errf(v, engine.ErrInvalidWeight, "sublayer weight %q is not a number in 0..65535", s)
		}
		w = uint16(x)
		return true, nil
	})
	if err != nil {
		return mgmt.Op{}, err
	}
	return mgmt.Op{Add: &mgmt.Object{Sublayer: &mgmt.Sublayer{Key: c.key, Name: c.name, Provider: c.provider, Weight: w, Lifetime: c.lifetime}}}, nil
}

func (p *parser) callout(n *yaml.Node) (mgmt.Op, error) {
	var co mgmt.Callout
	var layerNode *yaml.Node
	c, err := p.object(n, "callout", func(k string, v *yaml.Node) (bool, error) {
		var err error
		switch k {
		case "layer":
			layerNode = v
			co.Layer, _, err = p.layer(v)
		case "flags":
			co.Flags, err = p.flags(v, func(s []string) error { _, err := mgmt.ParseCalloutFlags(s); return err })
		default:
			return false, nil
		}
		return true, err
	})
	if err != nil {
		return mgmt.Op{}, err
	}
	if layerNode == nil {
		return mgmt.Op{}, p.errf(n, engine.ErrInvalidLayer, "callout %q needs a layer", c.key)
	}
	co.Key, co.Name, co.Provider, co.Lifetime = c.key, c.name, c.provider, c.lifetime
	return mgmt.Op{Add: &mgmt.Object{Callout: &co}}, nil
}

func (p *parser) filter(n *yaml.Node) (mgmt.Op, error) {
	var f mgmt.Filter
	var layer engine.LayerID
	var layerNode, actionNode, condNode *yaml.Node
	c, err := p.object(n, "filter", func(k string, v *yaml.Node) (bool, error) {
		var err error
		switch k {
		case "description":
			f.Description, err = p.str(v)
		case "layer":
			layerNode = v
			f.Layer, layer, err = p.layer(v)
		case "sublayer":
			f.Sublayer, err = p.str(v)
		case "weight":
			if f.Weight, err = p.str(v); err == nil {
				if _, werr := mgmt.ParseWeight(f.Weight); werr != nil {
					err = p.errf(v, werr, "")
				}
			}
		case "conditions":
			condNode = v
		case "action":
			actionNode = v
			if f.Action, err = p.str(v); err == nil {
				if a, ok := engine.ActionTypeByName(f.Action); !ok || a == engine.ActionContinue {
					err = p.errf(v, engine.ErrInvalidAction, "%q (block, permit, callout_terminating, callout_inspection, callout_unknown)", f.Action)
				}
			}
		case "callout":
			f.Callout, err = p.str(v)
		case "provider_context":
			f.ProviderContext, err = p.str(v)
		case "flags":
			f.Flags, err = p.flags(v, func(s []string) error { _, err := mgmt.ParseFilterFlags(s); return err })
		default:
			return false, nil
		}
		return true, err
	})
	if err != nil {
		return mgmt.Op{}, err
	}
	if layerNode == nil {
		return mgmt.Op{}, p.errf(n, engine.ErrInvalidLayer, "filter %q needs a layer", c.key)
	}
	if actionNode == nil {
		return mgmt.Op{}, p.errf(n, engine.ErrInvalidAction, "filter %q needs an action", c.key)
	}
	if condNode != nil {
		if f.Conditions, err = p.conditions(condNode, layer); err != nil {
			return mgmt.Op{}, err
		}
	}
	f.Key, f.Name, f.Provider, f.Lifetime = c.key, c.name, c.provider, c.lifetime
	return mgmt.Op{Add: &mgmt.Object{Filter: &f}}, nil
}

func (p *parser) conditions(n *yaml.Node, layer engine.LayerID) ([]mgmt.Condition, error) {
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return nil, nil
	}
	if n.Kind != yaml.SequenceNode {
		return nil, p.errf(n, engine.ErrInvalidCondition, "conditions must be a list of {field, match, value}")
	}
	var out []mgmt.Condition
	for _, it := range n.Content {
		if it.Kind != yaml.MappingNode {
			return nil, p.errf(it, engine.ErrInvalidCondition, "a condition is a mapping {field, match, value}")
		}
		var c mgmt.Condition
		var haveField, haveValue bool
		var valueNode, valuesNode, fileNode *yaml.Node
		err := p.fields(it, func(k string, v *yaml.Node) error {
			var err error
			switch k {
			case "field":
				c.Field, err = p.str(v)
				haveField = true
			case "match":
				c.Match, err = p.str(v)
			case "value":
				c.Value, err = p.str(v)
				haveValue, valueNode = true, v
			case "values":
				valuesNode = v
			case "values_file":
				fileNode = v
			default:
				return p.errf(v, engine.ErrInvalidCondition, "unknown condition attribute %q (field, match, value, values, values_file)", k)
			}
			return err
		})
		if err != nil {
			return nil, err
		}
		if n := btoi(haveValue) + btoi(valuesNode != nil) + btoi(fileNode != nil); !haveField || n != 1 {
			return nil, p.errf(it, engine.ErrInvalidCondition, "a condition needs a field and one of value, values or values_file")
		}
		if valuesNode != nil || fileNode != nil {
			if err := p.listValues(&c, layer, valuesNode, fileNode); err != nil {
				return nil, err
			}
			out = append(out, c)
			continue
		}
		if _, err := mgmt.ParseCondition(layer, c); err != nil {
			return nil, p.errf(valueNode, err, "")
		}
		out = append(out, c)
	}
	return out, nil
}

func (p *parser) deleteOp(n *yaml.Node) (mgmt.Op, error) {
	var r mgmt.Ref
	var haveKind bool
	err := p.fields(n, func(k string, v *yaml.Node) error {
		s, err := p.str(v)
		if err != nil {
			return err
		}
		switch k {
		case "kind":
			haveKind = true
			if r.Kind, err = mgmt.ParseKind(s); err != nil {
				return p.errf(v, err, "")
			}
		case "key":
			r.Key = s
		default:
			return p.errf(v, nil, "unknown delete attribute %q (kind, key)", k)
		}
		return nil
	})
	if err != nil {
		return mgmt.Op{}, err
	}
	if !haveKind || r.Key == "" {
		return mgmt.Op{}, p.errf(n, engine.ErrInvalidArgument, "a delete needs a kind and a key")
	}
	return mgmt.Op{Delete: &r}, nil
}

// selector reads a nodes section: {hosts: [names], labels: {k: v}}.
func (p *parser) selector(n *yaml.Node) (*Selector, error) {
	sel := &Selector{}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return sel, nil
	}
	if n.Kind != yaml.MappingNode {
		return nil, p.errf(n, engine.ErrInvalidArgument, "nodes must be a mapping {hosts: [...], labels: {k: v}}")
	}
	err := p.fields(n, func(k string, v *yaml.Node) error {
		switch k {
		case "hosts":
			hs, err := p.strs(v)
			if err != nil {
				return err
			}
			for _, h := range hs {
				if strings.TrimSpace(h) == "" {
					return p.errf(v, engine.ErrInvalidArgument, "an empty host name")
				}
			}
			sel.Hosts = hs
		case "labels":
			if v.Kind == yaml.ScalarNode && v.Tag == "!!null" {
				return nil
			}
			if v.Kind != yaml.MappingNode {
				return p.errf(v, engine.ErrInvalidArgument, "labels must be a mapping {name: value}")
			}
			sel.Labels = map[string]string{}
			return p.fields(v, func(lk string, lv *yaml.Node) error {
				s, err := p.str(lv)
				if err != nil {
					return err
				}
				if strings.TrimSpace(lk) == "" {
					return p.errf(lv, engine.ErrInvalidArgument, "an empty label name")
				}
				sel.Labels[lk] = s
				return nil
			})
		default:
			return p.errf(v, nil, "unknown nodes attribute %q (hosts, labels)", k)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return sel, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// listValues fills a list condition's values from a YAML sequence or a
// values file, checking each against the field (errors name the file and
// line of the value). An EQUAL list on an address or integer field is
// built into one engine.List (mgmt.Listable), a few bytes per value;
// other lists keep their values as text, one engine condition each.
func (p *parser) listValues(c *mgmt.Condition, layer engine.LayerID, seq, file *yaml.Node) error {
	node := firstNonNil(seq, file)
	f, fok := engine.FieldByName(strings.TrimSpace(c.Field))
	var add func(string) error
	var b *engine.ListBuilder
	if fok && mgmt.Listable(f, c.Match) {
		if _, err := mgmt.ParseCondition(layer, mgmt.Condition{Field: c.Field, Match: c.Match, Value: "0"}); err != nil && !errors.Is(err, engine.ErrInvalidValue) {
			return p.errf(node, err, "")
		}
		l := engine.LayerByID(layer)
		b = engine.NewListBuilder(f.Type(), 0)
		add = func(s string) error {
			v, err := engine.ParseValue(f.Type(), s)
			if err != nil {
				return fmt.Errorf("field %s: %w", f, err)
			}
			a := v.Addr()
			if v.Type() == engine.TypeRange {
				a = v.Low().Addr()
			}
			if l != nil && a.IsValid() && a.Is4() == l.V6 {
				return fmt.Errorf("%w: address %s does not belong on layer %s", engine.ErrInvalidValue, v, l.Name)
			}
			return b.Add(v)
		}
	} else {
		add = func(v string) error {
			one := *c
			one.Value, one.Values = v, nil
			if _, err := mgmt.ParseCondition(layer, one); err != nil {
				return err
			}
			c.Values = append(c.Values, v)
			return nil
		}
	}
	n := 0
	if seq != nil {
		if seq.Kind != yaml.SequenceNode {
			return p.errf(seq, engine.ErrInvalidCondition, "values must be a list")
		}
		for _, it := range seq.Content {
			v, err := p.str(it)
			if err != nil {
				return err
			}
			if n >= mgmt.MaxListValues {
				return p.errf(it, engine.ErrInvalidCondition, "more than %d values", mgmt.MaxListValues)
			}
			if err := add(v); err != nil {
				return p.errf(it, err, "")
			}
			n++
		}
	} else {
		name, err := p.str(file)
		if err != nil {
			return err
		}
		data, ok := p.opts.ValuesFiles[name]
		if !ok {
			return p.errf(file, mgmt.ErrInvalidPolicy, "values file %q was not sent with the policy", name)
		}
		if len(data) > MaxValuesFile {
			return p.errf(file, mgmt.ErrTooLarge, "values file %q is %d bytes, the limit is %d", name, len(data), MaxValuesFile)
		}
		if b != nil {
			b = engine.NewListBuilder(f.Type(), bytes.Count(data, []byte{'\n'})+1)
		}
		if n, err = eachValue(name, data, add); err != nil {
			return err
		}
	}
	if n == 0 {
		// An empty list would match nothing; WFP has no such condition.
		return p.errf(node, engine.ErrInvalidCondition, "the list has no values")
	}
	if b != nil {
		c.List, c.Values = b.List(), nil
	}
	return nil
}

func firstNonNil(a, b *yaml.Node) *yaml.Node {
	if a != nil {
		return a
	}
	return b
}

// eachValue reads a values file as blocklists are published: one value
// per line; blank lines, and what follows a '#' or ';', are comments. It
// returns the number of values.
func eachValue(name string, data []byte, add func(string) error) (int, error) {
	n := 0
	for line := 1; len(data) > 0; line++ {
		l := data
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			l, data = data[:i], data[i+1:]
		} else {
			data = nil
		}
		if i := bytes.IndexAny(l, "#;"); i >= 0 {
			l = l[:i]
		}
		l = bytes.TrimSpace(l)
		if len(l) == 0 {
			continue
		}
		if n >= mgmt.MaxListValues {
			return 0, &Error{File: name, Line: line, Column: 1, Err: engine.ErrInvalidCondition, Msg: fmt.Sprintf("more than %d values", mgmt.MaxListValues)}
		}
		if err := add(string(l)); err != nil {
			return 0, &Error{File: name, Line: line, Column: 1, Err: err}
		}
		n++
	}
	return n, nil
}

// ValuesFileNames returns the values files a policy's list conditions name
// (values_file), for a client to read and send with it (Options).
func ValuesFileNames(name string, data []byte) ([]string, error) {
	if len(data) > MaxSize {
		return nil, &Error{File: name, Line: 1, Column: 1, Msg: fmt.Sprintf("file is %d bytes, the limit is %d", len(data), MaxSize), Err: mgmt.ErrTooLarge}
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, (&parser{file: name}).yamlErr(err)
	}
	seen := map[string]bool{}
	var out []string
	var walk func(n *yaml.Node)
	walk = func(n *yaml.Node) {
		if n.Kind == yaml.MappingNode {
			for i := 0; i+1 < len(n.Content); i += 2 {
				if k, v := n.Content[i], n.Content[i+1]; k.Value == "values_file" && v.Kind == yaml.ScalarNode && !seen[v.Value] {
					seen[v.Value] = true
					out = append(out, v.Value)
				}
			}
		}
		for _, c := range n.Content {
			walk(c)
		}
	}
	walk(&doc)
	return out, nil
}
