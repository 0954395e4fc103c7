package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"fwp/api"
	"fwp/client"
	"fwp/mgmt"
	"fwp/policy"
)

func apply(ctx context.Context, args []string) error {
	fs, c := newFlags("apply -f FILE", "Applies a policy file (YAML; see package policy) in one transaction:\nall of it or, on any error, nothing. Errors say file:line and why.")
	var file string
	fs.StringVar(&file, "f", "", "policy file (- for standard input)")
	pos, err := parse(fs, c, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 || file == "" {
		return usageErr("apply needs -f FILE and nothing else")
	}
	data, err := readPolicy(file)
	if err != nil {
		return err
	}
	cl, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer cl.Close()
	files, err := readValuesFiles(file, data)
	if err != nil {
		return err
	}
	res, err := cl.ApplyPolicyFiles(ctx, file, data, files)
	if err != nil {
		return uncertain(err, "fwpctl filter list (or fwpctl KIND show KEY for an object of "+file+")")
	}
	for _, w := range res.Warnings {
		fmt.Fprintln(stderr, "fwpctl: warning:", w)
	}
	if c.json() {
		return printJSON(res)
	}
	fmt.Fprintf(stdout, "applied %s: %d added, %d deleted\n", file, len(res.Added), len(res.Deleted))
	return nil
}

// readPolicy reads a policy file, at most policy.MaxSize bytes: a larger
// one fails here, before it is read whole into memory and sent.
func readPolicy(file string) ([]byte, error) {
	r := io.Reader(os.Stdin)
	if file != "-" {
		f, err := os.Open(file)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	data, err := io.ReadAll(io.LimitReader(r, policy.MaxSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > policy.MaxSize {
		return nil, fmt.Errorf("%w: %s is larger than %d MiB, the limit of a policy file; split it", mgmt.ErrTooLarge, file, policy.MaxSize>>20)
	}
	return data, nil
}

// readValuesFiles reads the values files a policy names (values_file),
// relative to the policy file's directory, to send with it.
func readValuesFiles(file string, data []byte) (map[string][]byte, error) {
	names, err := policy.ValuesFileNames(file, data)
	if err != nil || len(names) == 0 {
		return nil, err
	}
	dir := "."
	if file != "-" {
		dir = filepath.Dir(file)
	}
	out := make(map[string][]byte, len(names))
	for _, name := range names {
		path := name
		if !filepath.IsAbs(path) {
			path = filepath.Join(dir, name)
		}
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("values file of %s: %w", file, err)
		}
		b, err := io.ReadAll(io.LimitReader(f, policy.MaxValuesFile+1))
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("values file %s: %w", path, err)
		}
		if len(b) > policy.MaxValuesFile {
			return nil, fmt.Errorf("%w: values file %s is larger than %d MiB", mgmt.ErrTooLarge, path, policy.MaxValuesFile>>20)
		}
		out[name] = b
	}
	return out, nil
}

var protocols = map[string]string{"tcp": "6", "udp": "17", "icmp": "1", "icmpv6": "58"}

func explain(ctx context.Context, args []string) error {
	fs, c := newFlags("explain --layer LAYER [tuple flags]", "Says which filter decides a tuple (the best terminating match) and shows\nthe arbitration trace. Callouts are not called.")
	var layer, remote, local, proto, app, uid, gid string
	var fields listFlag
	fs.StringVar(&layer, "layer", "", "layer (see fwpctl layers)")
	fs.StringVar(&remote, "remote", "", "remote ADDR:PORT (or ADDR)")
	fs.StringVar(&local, "local", "", "local ADDR:PORT (or ADDR)")
	fs.StringVar(&proto, "proto", "", "tcp, udp, icmp, icmpv6 or a number")
	fs.StringVar(&app, "app", "", "executable path (ale_app_id)")
	fs.StringVar(&uid, "uid", "", "user id (ale_user_id)")
	fs.StringVar(&gid, "gid", "", "group id (ale_group_id)")
	fs.Var(&fields, "field", "any field as NAME=VALUE (repeatable)")
	pos, err := parse(fs, c, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 || layer == "" {
		return usageErr("explain needs --layer and takes no arguments")
	}
	vals := map[string]string{}
	endpoint := func(s, addrField, portField string) error {
		if s == "" {
			return nil
		}
		if ap, err := netip.ParseAddrPort(s); err == nil {
			vals[addrField], vals[portField] = ap.Addr().String(), strconv.Itoa(int(ap.Port()))
			return nil
		}
		if a, err := netip.ParseAddr(s); err == nil {
			vals[addrField] = a.String()
			return nil
		}
		return usageErr("%q is not ADDR:PORT or ADDR", s)
	}
	if err := endpoint(remote, "ip_remote_address", "ip_remote_port"); err != nil {
		return err
	}
	if err := endpoint(local, "ip_local_address", "ip_local_port"); err != nil {
		return err
	}
	if proto != "" {
		if n, ok := protocols[strings.ToLower(proto)]; ok {
			proto = n
		}
		vals["ip_protocol"] = proto
	}
	for k, v := range map[string]string{"ale_app_id": app, "ale_user_id": uid, "ale_group_id": gid} {
		if v != "" {
			vals[k] = v
		}
	}
	for _, f := range fields {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return usageErr("--field %q: want NAME=VALUE", f)
		}
		vals[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	cl, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer cl.Close()
	x, err := cl.Explain(ctx, layer, vals)
	if err != nil {
		return err
	}
	if c.json() {
		return printJSON(x)
	}
	fmt.Fprintf(stdout, "layer:    %s\ntuple:    %s\n", x.Layer, dash(x.Values))
	hard := "soft"
	if x.Hard {
		hard = "hard"
	}
	if x.FilterID == 0 {
		fmt.Fprintf(stdout, "decision: %s (%s)\n", x.Action, x.Reason)
	} else {
		fmt.Fprintf(stdout, "decision: %s, %s, by filter %s (#%d) in sublayer %s: %s\n", x.Action, hard, x.FilterKey, x.FilterID, x.SublayerKey, x.Reason)
	}
	if len(x.Steps) == 0 {
		fmt.Fprintln(stdout, "no filter matched")
		return nil
	}
	fmt.Fprintln(stdout)
	table("SUBLAYER\tFILTER\tACTION\tRETURNED\tWRITE\tNOTE", func(w io.Writer) {
		for _, s := range x.Steps {
			fmt.Fprintf(w, "%s\t%s(#%d)\t%s\t%s\t%v->%v\t%s\n", s.SublayerKey, s.FilterKey, s.FilterID, s.FilterAction, s.Returned, s.WriteBefore, s.WriteAfter, dash(s.Note))
		}
	})
	return nil
}

func events(ctx context.Context, args []string) error {
	fs, c := newFlags("events [--follow] [--since SEQ]", "Lists the recorded net events; --follow then streams new ones until interrupted,\nand fails (exit 4) when fwpd goes away. With -o json: an array, or one object\nper line when following.")
	var follow bool
	var since uint64
	fs.BoolVar(&follow, "follow", false, "keep streaming new events")
	fs.Uint64Var(&since, "since", 0, "only events with this sequence number or later")
	cl, err := connect(ctx, fs, c, args)
	if err != nil {
		return err
	}
	defer cl.Close()
	names := filterNames{cl: cl}
	header := []string{"SEQ", "TIME", "TYPE", "LAYER", "FILTER", "PROTO", "LOCAL", "REMOTE", "APP", "UID", "GID", "CGROUP", "REASON"}
	cells := func(e client.NetEvent) []string {
		return []string{strconv.FormatUint(e.Seq, 10), localTime(e.Time, true), e.Type, e.Layer, names.name(ctx, e.FilterID),
			protoName(e.Protocol), dash(e.Local), dash(e.Remote), dash(e.AppID), strconv.FormatUint(uint64(e.UserID), 10),
			strconv.FormatUint(uint64(e.GroupID), 10), strconv.FormatUint(e.CgroupID, 10), e.Reason}
	}
	if !follow {
		evs, err := cl.NetEvents(ctx, since)
		if err != nil {
			return err
		}
		if c.json() {
			if evs == nil {
				evs = []client.NetEvent{}
			}
			return printJSON(evs)
		}
		table(strings.Join(header, "\t"), func(w io.Writer) {
			for _, e := range evs {
				fmt.Fprintln(w, strings.Join(cells(e), "\t"))
			}
		})
		return nil
	}
	// Streaming: columns padded to widths that only grow, since a
	// tabwriter aligns only what it holds before a flush.
	st := streamTable{w: stdout, widths: []int{5, 23, 13, 26, 16, 5, 21, 21, 16, 5, 5, 6}}
	if !c.json() {
		st.row(header)
	}
	err = cl.FollowNetEvents(ctx, since, func(e client.NetEvent) error {
		if c.json() {
			b, _ := jsonLine(e)
			_, err := stdout.Write(b)
			return err
		}
		st.row(cells(e))
		return nil
	})
	if ctx.Err() != nil {
		return nil // interrupted: the normal end of --follow
	}
	return goneErr(err, "the event stream")
}

// goneErr is the error of a stream that ended while fwpctl still
// followed it: fwpd stopped, restarted or dropped the session.
func goneErr(err error, what string) error {
	if err == nil || errors.Is(err, api.ErrUnavailable) {
		if err == nil {
			err = api.ErrUnavailable
		}
		return fmt.Errorf("fwpd went away (stopped, restarted or closed the connection), ending %s: %w", what, err)
	}
	return err
}

// streamTable prints rows whose columns are padded to the widest cell
// seen so far (at least the initial widths); the last column is not padded.
type streamTable struct {
	w      io.Writer
	widths []int
}

func (t *streamTable) row(cells []string) {
	var b strings.Builder
	for i, c := range cells {
		if i == len(cells)-1 || i >= len(t.widths) {
			b.WriteString(c)
			break
		}
		t.widths[i] = max(t.widths[i], len(c))
		b.WriteString(c)
		b.WriteString(strings.Repeat(" ", t.widths[i]-len(c)+2))
	}
	b.WriteByte('\n')
	io.WriteString(t.w, b.String())
}

// filterNames names filters by key for the events table, from one listing
// (again when an unknown ID shows up, at most once a second). A filter
// deleted since, or one fwpctl may not list, stays #ID.
type filterNames struct {
	cl     *client.Client
	keys   map[uint64]string
	listed time.Time
}

func (n *filterNames) name(ctx context.Context, id uint64) string {
	if id == 0 {
		return "-"
	}
	if _, ok := n.keys[id]; !ok && time.Since(n.listed) > time.Second {
		n.listed = time.Now()
		if objs, err := n.cl.List(ctx, mgmt.KindFilter, mgmt.Template{}); err == nil {
			n.keys = map[uint64]string{}
			for _, o := range objs {
				n.keys[o.Filter.ID] = o.Filter.Key
			}
		}
	}
	if k, ok := n.keys[id]; ok {
		return fmt.Sprintf("%s(#%d)", k, id)
	}
	return fmt.Sprintf("#%d", id)
}

var protoNames = map[uint32]string{1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}

func protoName(p uint32) string {
	if n, ok := protoNames[p]; ok {
		return n
	}
	if p == 0 {
		return "-"
	}
	return strconv.FormatUint(uint64(p), 10)
}

// localTime is how tables show times: the local zone, no offset noise.
func localTime(t time.Time, ms bool) string {
	if t.IsZero() {
		return "-"
	}
	if ms {
		return t.Local().Format("2006-01-02 15:04:05.000")
	}
	return t.Local().Format("2006-01-02 15:04:05")
}

// processApp is a process's executable path, or its comm in brackets when
// the path cannot be read (another user's process), as the kernel
// datapath's events show applications.
func processApp(pid uint32) string {
	if pid == 0 {
		return "-"
	}
	p := "/proc/" + strconv.FormatUint(uint64(pid), 10)
	if exe, err := os.Readlink(p + "/exe"); err == nil {
		return exe
	}
	if comm, err := os.ReadFile(p + "/comm"); err == nil {
		return "[" + strings.TrimSpace(string(comm)) + "]"
	}
	return "-"
}

func sessions(ctx context.Context, args []string) error {
	fs, c := newFlags("sessions", "Lists the daemon's open sessions (this command's own included).")
	cl, err := connect(ctx, fs, c, args)
	if err != nil {
		return err
	}
	defer cl.Close()
	ss, err := cl.Sessions(ctx)
	if err != nil {
		return err
	}
	if c.json() {
		return printJSON(ss)
	}
	table("ID\tPID\tUID\tNAME\tAPP\tDYNAMIC\tADMIN\tTXN\tOPENED", func(w io.Writer) {
		for _, s := range ss {
			fmt.Fprintf(w, "%d\t%d\t%d\t%s\t%s\t%v\t%v\t%v\t%s\n", s.ID, s.PID, s.UID, dash(s.Name), processApp(s.PID), s.Dynamic, s.Admin, s.InTransaction, localTime(s.OpenedAt, false))
		}
	})
	return nil
}

func watch(ctx context.Context, args []string) error {
	fs, c := newFlags("watch [--kind KIND]...", "Prints other sessions' committed changes until interrupted.")
	var kinds listFlag
	fs.Var(&kinds, "kind", "provider, provider_context, sublayer, callout or filter (repeatable; default all)")
	pos, err := parse(fs, c, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected arguments %q", pos)
	}
	var ks []mgmt.Kind
	for _, k := range kinds {
		kk, err := mgmt.ParseKind(k)
		if err != nil {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		ks = append(ks, kk)
	}
	cl, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer cl.Close()
	ch, err := cl.Subscribe(ctx, ks...)
	if err != nil {
		return err
	}
	st := streamTable{w: stdout, widths: []int{7, 16, 24, 6}}
	if !c.json() {
		st.row([]string{"CHANGE", "KIND", "KEY", "ID", "SESSION"})
	}
	for ch := range ch {
		if c.json() {
			b, _ := jsonLine(ch)
			stdout.Write(b)
			continue
		}
		st.row([]string{ch.Type.String(), ch.Kind.String(), ch.Key, strconv.FormatUint(ch.ID, 10), strconv.FormatUint(ch.Session, 10)})
	}
	if ctx.Err() != nil {
		return nil // interrupted
	}
	return goneErr(nil, "the subscription")
}

// uncertain explains an error of a write whose request was sent: when the
// daemon went away before answering, it may have committed the write or
// not (a commit is all or nothing), and check says how to find out.
func uncertain(err error, check string) error {
	if !errors.Is(err, api.ErrUnavailable) {
		return err
	}
	return fmt.Errorf("%w\nfwpd went away during the change: fwpctl cannot know whether the transaction committed "+
		"(a commit is all or nothing). Once fwpd runs again, check with: %s", err, check)
}
