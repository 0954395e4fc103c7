package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"fwp/api"
	"fwp/client"
	"fwp/mgmt"
)

// callouts lists the callout objects with their remote registrations: who
// registered each (pid, exe, uid) and how it answers.
func callouts(ctx context.Context, args []string) error {
	fs, c := newFlags("callouts", "Lists callouts with the program registered for each (pid, exe, uid), its calls,\npends, timeouts, errors and answer latency percentiles (remote callouts, see\nclient.RegisterCallout). Needs the admin right.")
	pos, err := parse(fs, c, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected arguments %q", pos)
	}
	cl, err := client.DialClassifier(ctx, c.socket)
	if err != nil {
		return fmt.Errorf("%w: %w", api.ErrUnavailable, err)
	}
	defer cl.Close()
	infos, err := cl.ListCallouts(ctx)
	if err != nil {
		return err
	}
	mc, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer mc.Close()
	objs, err := mc.List(ctx, mgmt.KindCallout, mgmt.Template{})
	if err != nil {
		return err
	}
	type row struct {
		Key    string              `json:"key"`
		Layer  string              `json:"layer,omitempty"`
		Object bool                `json:"object"` // the callout object exists
		Remote *client.CalloutInfo `json:"remote,omitempty"`
	}
	byKey := map[string]*row{}
	var rows []*row
	for _, o := range objs {
		r := &row{Key: o.Callout.Key, Layer: o.Callout.Layer, Object: true}
		byKey[r.Key] = r
		rows = append(rows, r)
	}
	for i := range infos {
		r := byKey[infos[i].Key]
		if r == nil {
			r = &row{Key: infos[i].Key}
			rows = append(rows, r)
		}
		r.Remote = &infos[i]
	}
	if c.json() {
		return printJSON(rows)
	}
	table("KEY\tLAYER\tREGISTERED\tPID\tUID\tEXE\tCALLS\tPENDS\tHELD\tTIMEOUTS\tERRORS\tP50\tP90\tP99", func(w io.Writer) {
		for _, r := range rows {
			layer := r.Layer
			if !r.Object {
				layer = "(no object)"
			}
			i := r.Remote
			if i == nil {
				fmt.Fprintf(w, "%s\t%s\tno\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\n", r.Key, layer)
				continue
			}
			reg, pid, uid, exe := "no (gone)", "-", "-", "-"
			if i.Registered {
				reg, pid, uid, exe = "yes", fmt.Sprint(i.PID), fmt.Sprint(i.UID), i.Exe
			}
			us := func(v uint64) string { return (time.Duration(v) * time.Microsecond).String() }
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t≤%s\t≤%s\t≤%s\n", r.Key, layer, reg, pid, uid, exe,
				i.Calls, i.Pends, i.Held, i.Timeouts, i.Errors, us(i.P50US), us(i.P90US), us(i.P99US))
		}
	})
	return nil
}
