package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"fwp/api"
	"fwp/fleet"
)

// fleetFlags are the flags of the fleet subcommands: where etcd is.
type fleetFlags struct {
	ep      fleet.Endpoint
	prefix  string
	timeout time.Duration
}

func newFleetFlags(name, help string) (*flag.FlagSet, *common, *fleetFlags) {
	fs, c := newFlags("fleet "+name, help)
	ff := &fleetFlags{}
	fs.StringVar(&ff.ep.URLs, "etcd-endpoints", os.Getenv("FWP_ETCD_ENDPOINTS"), "comma-separated etcd client URLs (env FWP_ETCD_ENDPOINTS)")
	fs.StringVar(&ff.prefix, "etcd-prefix", "/fwp/", "the fleet's etcd key prefix (as fwpd --etcd-prefix)")
	fs.StringVar(&ff.ep.Cert, "etcd-cert", "", "TLS client certificate for etcd (PEM)")
	fs.StringVar(&ff.ep.Key, "etcd-key", "", "TLS client key for etcd (PEM)")
	fs.StringVar(&ff.ep.CACert, "etcd-cacert", "", "CA bundle that signed etcd's server certificates (PEM)")
	fs.DurationVar(&ff.timeout, "etcd-timeout", 15*time.Second, "give up on etcd after this long")
	return fs, c, ff
}

func (ff *fleetFlags) dial() (*clientv3.Client, error) {
	if ff.ep.URLs == "" {
		return nil, usageErr("--etcd-endpoints (or FWP_ETCD_ENDPOINTS) is needed")
	}
	cl, err := fleet.Dial(ff.ep)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", api.ErrUnavailable, err)
	}
	return cl, nil
}

// ctx bounds a fleet command: etcd unreachable is an error in seconds.
func (ff *fleetFlags) ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, ff.timeout)
}

// etcdErr marks a failure to reach etcd as unavailable (exit 4); a
// refused document stays an ordinary failure.
func etcdErr(err error) error {
	if errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.Unavailable || status.Code(err) == codes.DeadlineExceeded {
		return fmt.Errorf("%w: etcd: %w", api.ErrUnavailable, err)
	}
	return err
}

func fleetCmd(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usageErr("fleet apply|delete|status")
	}
	switch args[0] {
	case "apply":
		return fleetApply(ctx, args[1:])
	case "delete":
		return fleetDelete(ctx, args[1:])
	case "status":
		return fleetStatus(ctx, args[1:])
	}
	return usageErr("fleet: unknown subcommand %q (apply, delete, status)", args[0])
}

func fleetApply(ctx context.Context, args []string) error {
	fs, c, ff := newFleetFlags("apply -f FILE [--name NAME]", "Writes a fleet policy document to etcd in one transaction, after checking it\nas every fwpd following the fleet will (same parser, same checks, a dry run\nof each known host's resulting policy). Invalid documents are not written.")
	var file, name string
	fs.StringVar(&file, "f", "", "policy document (YAML, as fwpctl apply takes, with an optional nodes section; - for standard input)")
	fs.StringVar(&name, "name", "", "document name (default: the file's base name without extension)")
	pos, err := parse(fs, c, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 || file == "" {
		return usageErr("fleet apply needs -f FILE and nothing else")
	}
	if name == "" {
		if file == "-" {
			return usageErr("fleet apply -f - needs --name")
		}
		name = strings.TrimSuffix(filepath.Base(file), filepath.Ext(file))
	}
	data, err := readPolicy(file)
	if err != nil {
		return err
	}
	if _, err := fleet.ParseDocument(name, data); err != nil {
		return err // before dialing: a bad document needs no etcd to be refused
	}
	cl, err := ff.dial()
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := ff.ctx(ctx)
	defer cancel()
	rev, err := fleet.PutDocument(ctx, cl, ff.prefix, name, data)
	if err != nil {
		return etcdErr(err)
	}
	if c.json() {
		return printJSON(map[string]any{"document": name, "revision": rev})
	}
	fmt.Fprintf(stdout, "wrote %s at revision %d\n", name, rev)
	return nil
}

func fleetDelete(ctx context.Context, args []string) error {
	fs, c, ff := newFleetFlags("delete NAME", "Deletes a fleet policy document, after checking that the policy without it\nstill holds together.")
	pos, err := parse(fs, c, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("fleet delete takes one document name")
	}
	cl, err := ff.dial()
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := ff.ctx(ctx)
	defer cancel()
	rev, err := fleet.PutDocument(ctx, cl, ff.prefix, pos[0], nil)
	if err != nil {
		return etcdErr(err)
	}
	if c.json() {
		return printJSON(map[string]any{"document": pos[0], "revision": rev})
	}
	fmt.Fprintf(stdout, "deleted %s at revision %d\n", pos[0], rev)
	return nil
}

type fleetStatusJSON struct {
	Revision  int64             `json:"revision"`
	Documents []string          `json:"documents"`
	Invalid   map[string]string `json:"invalid,omitempty"`
	Nodes     []fleet.Status    `json:"nodes"`
}

func fleetStatus(ctx context.Context, args []string) error {
	fs, c, ff := newFleetFlags("status [--local FILE]", "Lists the fleet's documents and hosts: which revision each host enforces,\nits policy's hash and its last error. With --local, shows the status this\nhost's fwpd keeps in FILE (its state directory's fleet-status.json), which\nneeds no etcd.")
	var local string
	fs.StringVar(&local, "local", "", "read this host's status file instead of etcd")
	pos, err := parse(fs, c, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("fleet status takes no arguments")
	}
	var out fleetStatusJSON
	if local != "" {
		b, err := os.ReadFile(local)
		if err != nil {
			return err
		}
		var s fleet.Status
		if err := json.Unmarshal(b, &s); err != nil {
			return fmt.Errorf("%s: %w", local, err)
		}
		out.Nodes = []fleet.Status{s}
	} else {
		cl, err := ff.dial()
		if err != nil {
			return err
		}
		defer cl.Close()
		ctx, cancel := ff.ctx(ctx)
		defer cancel()
		docs, errs, rev, err := fleet.Documents(ctx, cl, ff.prefix)
		if err != nil {
			return fmt.Errorf("%w: %w", api.ErrUnavailable, err)
		}
		out.Revision = rev
		for _, d := range docs {
			out.Documents = append(out.Documents, d.Name)
		}
		for n, e := range errs {
			out.Documents = append(out.Documents, n)
			if out.Invalid == nil {
				out.Invalid = map[string]string{}
			}
			out.Invalid[n] = e.Error()
		}
		sort.Strings(out.Documents)
		if out.Nodes, _, err = fleet.Nodes(ctx, cl, ff.prefix); err != nil {
			return err
		}
	}
	if c.json() {
		return printJSON(out)
	}
	if local == "" {
		fmt.Fprintf(stdout, "revision %d, %d documents: %s\n", out.Revision, len(out.Documents), strings.Join(out.Documents, " "))
		for n, e := range out.Invalid {
			fmt.Fprintf(stdout, "invalid document %s: %s\n", n, e)
		}
	}
	table("NODE\tREVISION\tHASH\tOBJECTS\tCONNECTED\tDATAPATH\tLAST ERROR", func(w io.Writer) {
		for _, s := range out.Nodes {
			lastErr := "-"
			if s.LastError != nil {
				lastErr = fmt.Sprintf("rev %d: %s", s.LastError.Revision, s.LastError.Error)
			}
			fmt.Fprintf(w, "%s\t%d\t%s\t%d\t%v\t%s\t%s\n", s.Node, s.Revision, dash(s.Hash), s.Objects, s.Connected, dash(s.Datapath), lastErr)
		}
	})
	return nil
}
