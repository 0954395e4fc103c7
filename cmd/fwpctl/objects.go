package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"strconv"
	"strings"

	"fwp/mgmt"
)

// listFlag collects a repeatable flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

// commaList splits a comma-separated flag value.
func commaList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func objectCommand(kind mgmt.Kind) func(context.Context, []string) error {
	name := kind.String()
	if kind == mgmt.KindProviderContext {
		name = "context"
	}
	return func(ctx context.Context, args []string) error {
		if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
			w := stdout
			if len(args) == 0 {
				w = stderr
			}
			fmt.Fprintf(w, "usage: fwpctl %s add|delete|list|show [flags]\n\nRun fwpctl %s SUBCOMMAND --help for its flags.\n", name, name)
			if len(args) == 0 {
				return usageErr("%s needs a subcommand", name)
			}
			return nil
		}
		switch args[0] {
		case "add":
			return add(ctx, kind, name, args[1:])
		case "delete", "del", "rm":
			return del(ctx, kind, name, args[1:])
		case "list", "ls":
			return list(ctx, kind, name, args[1:])
		case "show", "get":
			return show(ctx, kind, name, args[1:])
		}
		return usageErr("unknown %s subcommand %q (add, delete, list, show)", name, args[0])
	}
}

func add(ctx context.Context, kind mgmt.Kind, name string, args []string) error {
	fs, c := newFlags(name+" add --key KEY [flags]", "Adds a "+kind.String()+" (in an implicit transaction).")
	var key, oname, desc, provider, lifetime string
	fs.StringVar(&key, "key", "", "the object's unique key")
	fs.StringVar(&oname, "name", "", "display name")
	fs.StringVar(&provider, "provider", "", "owning provider's key")
	fs.StringVar(&lifetime, "lifetime", "", "static (default), persistent or boottime")
	var data, dataHex, weight, layer, flags, sublayer, action, callout, pctx string
	var conds listFlag
	switch kind {
	case mgmt.KindProvider:
		fs.StringVar(&desc, "description", "", "description")
	case mgmt.KindProviderContext:
		fs.StringVar(&data, "data", "", "data as a string")
		fs.StringVar(&dataHex, "data-hex", "", "data as hex bytes")
	case mgmt.KindSublayer:
		fs.StringVar(&weight, "weight", "0", "weight 0..65535, higher is evaluated first")
	case mgmt.KindCallout:
		fs.StringVar(&layer, "layer", "", "applicable layer (see fwpctl layers)")
		fs.StringVar(&flags, "flags", "", "comma-separated: conditional_on_flow, uses_provider_context")
	case mgmt.KindFilter:
		fs.StringVar(&desc, "description", "", "description")
		fs.StringVar(&layer, "layer", "", "layer (see fwpctl layers)")
		fs.StringVar(&sublayer, "sublayer", "", "sublayer key (default the universal sublayer)")
		fs.StringVar(&weight, "weight", "auto", "auto, index:N (0-15) or a 64-bit number")
		fs.Var(&conds, "cond", `condition "FIELD MATCH VALUE" or "FIELD=VALUE" (repeatable)`)
		fs.StringVar(&action, "action", "", "block, permit, callout_terminating, callout_inspection or callout_unknown")
		fs.StringVar(&callout, "callout", "", "callout key, for the callout actions")
		fs.StringVar(&pctx, "context", "", "provider context key")
		fs.StringVar(&flags, "flags", "", "comma-separated: clear_action_right, permit_if_callout_unregistered, disabled, indexed")
	}
	pos, err := parse(fs, c, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected arguments %q", pos)
	}
	if key == "" {
		return usageErr("--key is required")
	}
	lt, err := mgmt.ParseLifetime(lifetime)
	if err != nil {
		return fmt.Errorf("%w: --lifetime: %v", errUsage, err)
	}
	var o mgmt.Object
	switch kind {
	case mgmt.KindProvider:
		o.Provider = &mgmt.Provider{Key: key, Name: oname, Description: desc, Lifetime: lt}
	case mgmt.KindProviderContext:
		b := []byte(data)
		if dataHex != "" {
			if data != "" {
				return usageErr("give --data or --data-hex, not both")
			}
			if b, err = hex.DecodeString(strings.TrimPrefix(dataHex, "0x")); err != nil {
				return usageErr("--data-hex: %v", err)
			}
		}
		o.ProviderContext = &mgmt.ProviderContext{Key: key, Name: oname, Provider: provider, Data: b, Lifetime: lt}
	case mgmt.KindSublayer:
		w, err := strconv.ParseUint(weight, 0, 16)
		if err != nil {
			return usageErr("--weight %q is not a number in 0..65535", weight)
		}
		o.Sublayer = &mgmt.Sublayer{Key: key, Name: oname, Provider: provider, Weight: uint16(w), Lifetime: lt}
	case mgmt.KindCallout:
		o.Callout = &mgmt.Callout{Key: key, Name: oname, Provider: provider, Layer: layer, Flags: commaList(flags), Lifetime: lt}
	case mgmt.KindFilter:
		f := &mgmt.Filter{Key: key, Name: oname, Description: desc, Layer: layer, Sublayer: sublayer, Provider: provider,
			Weight: weight, Action: action, Callout: callout, ProviderContext: pctx, Flags: commaList(flags), Lifetime: lt}
		for _, s := range conds {
			cond, err := parseCond(s)
			if err != nil {
				return err
			}
			f.Conditions = append(f.Conditions, cond)
		}
		o.Filter = f
	}
	cl, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer cl.Close()
	res, err := cl.Apply(ctx, []mgmt.Op{{Add: &o}})
	if err != nil {
		return uncertain(err, "fwpctl "+name+" show "+key)
	}
	for _, w := range res.Warnings {
		fmt.Fprintln(stderr, "fwpctl: warning:", w)
	}
	ref := res.Added[0]
	if c.json() {
		return printJSON(ref)
	}
	fmt.Fprintf(stdout, "added %s (id %d)\n", ref, ref.ID)
	return nil
}

// parseCond reads "FIELD MATCH VALUE" or "FIELD=VALUE".
func parseCond(s string) (mgmt.Condition, error) {
	if f, v, ok := strings.Cut(s, "="); ok && !strings.ContainsAny(strings.TrimSpace(f), " \t") {
		return mgmt.Condition{Field: strings.TrimSpace(f), Match: "equal", Value: strings.TrimSpace(v)}, nil
	}
	parts := strings.Fields(s)
	if len(parts) != 3 {
		return mgmt.Condition{}, usageErr(`--cond %q: want "FIELD MATCH VALUE" or "FIELD=VALUE"`, s)
	}
	return mgmt.Condition{Field: parts[0], Match: parts[1], Value: parts[2]}, nil
}

func del(ctx context.Context, kind mgmt.Kind, name string, args []string) error {
	fs, c := newFlags(name+" delete KEY...", "Deletes objects by key, all in one transaction.")
	pos, err := parse(fs, c, args)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		return usageErr("delete needs at least one key")
	}
	var ops []mgmt.Op
	for _, k := range pos {
		ops = append(ops, mgmt.Op{Delete: &mgmt.Ref{Kind: kind, Key: k}})
	}
	cl, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer cl.Close()
	res, err := cl.Apply(ctx, ops)
	if err != nil {
		return uncertain(err, "fwpctl "+name+" list")
	}
	if c.json() {
		return printJSON(res.Deleted)
	}
	for _, r := range res.Deleted {
		fmt.Fprintf(stdout, "deleted %s\n", r)
	}
	return nil
}

func list(ctx context.Context, kind mgmt.Kind, name string, args []string) error {
	fs, c := newFlags(name+" list [flags]", "Lists objects, sorted (filters in evaluation order).")
	var t mgmt.Template
	fs.StringVar(&t.Provider, "provider", "", "only this provider's objects")
	if kind == mgmt.KindCallout || kind == mgmt.KindFilter {
		fs.StringVar(&t.Layer, "layer", "", "only this layer")
	}
	if kind == mgmt.KindFilter {
		fs.StringVar(&t.Sublayer, "sublayer", "", "only this sublayer")
		fs.StringVar(&t.Callout, "callout", "", "only filters calling this callout")
		fs.StringVar(&t.Action, "action", "", "only this action type")
	}
	cl, err := connect(ctx, fs, c, args)
	if err != nil {
		return err
	}
	defer cl.Close()
	objs, err := cl.List(ctx, kind, t)
	if err != nil {
		return err
	}
	if c.json() {
		return printJSON(unwrap(objs))
	}
	printTable(kind, objs)
	return nil
}

func show(ctx context.Context, kind mgmt.Kind, name string, args []string) error {
	fs, c := newFlags(name+" show KEY", "Shows one object.")
	pos, err := parse(fs, c, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("show needs exactly one key")
	}
	cl, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer cl.Close()
	o, err := cl.Get(ctx, mgmt.Ref{Kind: kind, Key: pos[0]})
	if err != nil {
		return err
	}
	if c.json() {
		return printJSON(unwrap([]mgmt.Object{o})[0])
	}
	printTable(kind, []mgmt.Object{o})
	return nil
}

// unwrap returns the held objects themselves, for JSON output.
func unwrap(objs []mgmt.Object) []any {
	out := make([]any, 0, len(objs))
	for _, o := range objs {
		switch o.Kind() {
		case mgmt.KindProvider:
			out = append(out, o.Provider)
		case mgmt.KindProviderContext:
			out = append(out, o.ProviderContext)
		case mgmt.KindSublayer:
			out = append(out, o.Sublayer)
		case mgmt.KindCallout:
			out = append(out, o.Callout)
		case mgmt.KindFilter:
			out = append(out, o.Filter)
		}
	}
	return out
}

func lifetimeOr(l mgmt.Lifetime) string {
	if l == mgmt.LifetimeDefault {
		return "builtin"
	}
	return l.String()
}

func printTable(kind mgmt.Kind, objs []mgmt.Object) {
	switch kind {
	case mgmt.KindProvider:
		table("ID\tKEY\tNAME\tLIFETIME\tSESSION\tDESCRIPTION", func(w io.Writer) {
			for _, o := range objs {
				p := o.Provider
				fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%d\t%s\n", p.ID, p.Key, dash(p.Name), lifetimeOr(p.Lifetime), p.Session, dash(p.Description))
			}
		})
	case mgmt.KindProviderContext:
		table("ID\tKEY\tNAME\tPROVIDER\tLIFETIME\tSESSION\tDATA", func(w io.Writer) {
			for _, o := range objs {
				c := o.ProviderContext
				fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%d\t%s\n", c.ID, c.Key, dash(c.Name), dash(c.Provider), lifetimeOr(c.Lifetime), c.Session, contextData(c))
			}
		})
	case mgmt.KindSublayer:
		table("ID\tKEY\tNAME\tPROVIDER\tWEIGHT\tLIFETIME\tSESSION", func(w io.Writer) {
			for _, o := range objs {
				s := o.Sublayer
				fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%d\t%s\t%d\n", s.ID, s.Key, dash(s.Name), dash(s.Provider), s.Weight, lifetimeOr(s.Lifetime), s.Session)
			}
		})
	case mgmt.KindCallout:
		table("ID\tKEY\tNAME\tLAYER\tPROVIDER\tFLAGS\tLIFETIME\tSESSION", func(w io.Writer) {
			for _, o := range objs {
				c := o.Callout
				fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", c.ID, c.Key, dash(c.Name), c.Layer, dash(c.Provider), dash(strings.Join(c.Flags, ",")), lifetimeOr(c.Lifetime), c.Session)
			}
		})
	case mgmt.KindFilter:
		table("ID\tKEY\tPROVIDER\tLAYER\tSUBLAYER\tWEIGHT\tACTION\tCONDITIONS\tFLAGS\tLIFETIME\tSESSION", func(w io.Writer) {
			for _, o := range objs {
				f := o.Filter
				var cs []string
				for _, c := range f.Conditions {
					v := c.Value
					if c.List != nil {
						v = c.List.String() // a summary: lists can hold millions
					}
					cs = append(cs, c.Field+" "+c.Match+" "+v)
				}
				act := f.Action
				if f.Callout != "" {
					act += "(" + f.Callout + ")"
				}
				fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s=%#x\t%s\t%s\t%s\t%s\t%d\n", f.ID, f.Key, dash(f.Provider), f.Layer, dash(f.Sublayer), f.Weight, f.EffectiveWeight,
					act, dash(strings.Join(cs, " && ")), dash(strings.Join(f.Flags, ",")), lifetimeOr(f.Lifetime), f.Session)
			}
		})
	}
}
