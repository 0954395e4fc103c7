package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"fwp/client"
	"fwp/engine"
	"fwp/mgmt"
)

func main() {
	var c config
	flag.StringVar(&c.Socket, "socket", client.SocketFromEnv(), "fwpd's socket (env FWPD_SOCKET)")
	flag.StringVar(&c.Key, "key", "askuser", "the callout key (and the prefix of the filters it adds)")
	flag.StringVar(&c.Auto, "auto", "", "answer every prompt with allow or block instead of asking")
	flag.StringVar(&c.Remember, "remember", "persistent", "lifetime of the remembered filters: persistent, static (until fwpd restarts) or dynamic (until askuser exits)")
	flag.BoolVar(&c.FailClosed, "fail-closed", false, "block held and new TCP connections while askuser is not running: its callouts and catch-all filters then outlive it, with -remember's lifetime (default: they go with it, and connections are permitted)")
	flag.Parse()
	if c.Auto != "" && c.Auto != "allow" && c.Auto != "block" {
		fmt.Fprintln(os.Stderr, "askuser: -auto is allow or block")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, c, os.Stdin, os.Stdout); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "askuser:", err)
		os.Exit(1)
	}
}

type config struct {
	Socket, Key, Auto, Remember string
	FailClosed                  bool
}

// pair is what a person answers for: an application and a destination.
type pair struct {
	app    string
	remote netip.AddrPort
	proto  uint8
}

type held struct {
	e *engine.Engine
	p *engine.Pend
}

type asker struct {
	c    config
	api  *client.Client // dynamic session: the callouts and catch-all filters
	keep *client.Client // the remembered filters, unless -remember=dynamic
	in   *bufio.Reader
	out  io.Writer
	// prompts go one at a time; the pends of one pair wait for one answer
	mu      sync.Mutex
	waiting map[pair][]held
	decided map[pair]engine.ActionType // until the filter is in place
	queue   chan pair
	seq     int
	lt      mgmt.Lifetime
}

func run(ctx context.Context, c config, in io.Reader, out io.Writer) error {
	api, err := client.Dial(ctx, c.Socket, client.Options{Name: "askuser", Dynamic: true})
	if err != nil {
		return err
	}
	defer api.Close()
	lt, err := mgmt.ParseLifetime(c.Remember)
	if err != nil || lt == mgmt.LifetimeBootTime {
		return fmt.Errorf("-remember: %q is not persistent, static or dynamic", c.Remember)
	}
	keep := api
	if lt != mgmt.LifetimeDynamic {
		if keep, err = client.Dial(ctx, c.Socket, client.Options{Name: "askuser (remembered)"}); err != nil {
			return err
		}
		defer keep.Close()
	}
	a := &asker{c: c, api: api, keep: keep, lt: lt, in: bufio.NewReader(in), out: out, waiting: map[pair][]held{}, decided: map[pair]engine.ActionType{}, queue: make(chan pair, 1024)}
	// The callout objects and the catch-all filters that call it: in this
	// dynamic session, so that they go with askuser; under -fail-closed
	// with the remembered filters' lifetime, so that while askuser is not
	// running (killed, not yet started after a reboot) the catch-all
	// filters stay and their flag refuses every new TCP connection they
	// match (a callout that is not registered: fail closed). A previous
	// run's are reused.
	owner := api
	if c.FailClosed {
		owner = keep
	}
	var ops []mgmt.Op
	for _, l := range []engine.LayerID{engine.LayerALEAuthConnectV4, engine.LayerALEAuthConnectV6} {
		ops = append(ops, mgmt.Op{Add: &mgmt.Object{Callout: &mgmt.Callout{Key: c.Key + "-" + l.String(), Layer: l.String(), Name: "askuser"}}})
		// TCP: the connections the kernel datapath can hold for a Go
		// callout (it refuses a callout filter that could meet UDP).
		f := &mgmt.Filter{Key: c.Key + "-catchall-" + l.String(), Layer: l.String(), Action: "callout_terminating",
			Callout: c.Key + "-" + l.String(), Weight: "1", Name: "askuser: ask for new TCP connections",
			Conditions: []mgmt.Condition{{Field: "ip_protocol", Match: "equal", Value: "6"}}}
		if !c.FailClosed {
			f.Flags = []string{"permit_if_callout_unregistered"}
		}
		ops = append(ops, mgmt.Op{Add: &mgmt.Object{Filter: f}})
	}
	for _, op := range ops {
		if _, err := owner.Apply(ctx, []mgmt.Op{op}); err != nil && !(c.FailClosed && errors.Is(err, engine.ErrAlreadyExists)) {
			return fmt.Errorf("adding the callouts and filters: %w", err)
		}
	}
	var rcs []*client.RemoteCallout
	for _, l := range []engine.LayerID{engine.LayerALEAuthConnectV4, engine.LayerALEAuthConnectV6} {
		rc, err := client.RegisterCallout(ctx, c.Key+"-"+l.String(), engine.CalloutRegistration{Classify: a.classify},
			client.CalloutOptions{Socket: c.Socket})
		if err != nil {
			return err
		}
		defer rc.Close()
		rcs = append(rcs, rc)
	}
	fmt.Fprintln(out, "askuser: ready")
	go a.prompts(ctx)
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-rcs[0].Done():
		return rcs[0].Err()
	case <-rcs[1].Done():
		return rcs[1].Err()
	}
}

// classify is the callout: a reauthorization gets the answer; a new pair
// is pended and queued for a prompt. It never blocks.
func (a *asker) classify(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
	if !out.CanWrite() {
		return // a hard decision above stands
	}
	vs := req.Values
	p := pair{app: vs.Get(engine.FieldALEAppID).Str(), proto: uint8(vs.Uint(engine.FieldIPProtocol)),
		remote: netip.AddrPortFrom(vs.Get(engine.FieldIPRemoteAddress).Addr(), uint16(vs.Uint(engine.FieldIPRemotePort)))}
	a.mu.Lock()
	defer a.mu.Unlock()
	if act, ok := a.decided[p]; ok {
		out.Action = act
		return
	}
	if uint32(vs.Uint(engine.FieldFlags))&engine.FlagIsReauthorize != 0 {
		out.Action = engine.ActionBlock // no answer kept: fail closed
		return
	}
	pend, err := req.PendOperation()
	if err != nil {
		out.Action = engine.ActionBlock
		return
	}
	first := len(a.waiting[p]) == 0
	a.waiting[p] = append(a.waiting[p], held{req.Engine(), pend})
	if first {
		select {
		case a.queue <- p:
		default: // too many questions at once: this one is not asked
			a.waiting[p] = a.waiting[p][:len(a.waiting[p])-1]
			_ = req.Engine().CompleteOperation(pend, nil)
			a.decided[p] = engine.ActionBlock
			go a.forget(p)
		}
	}
	out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
}

// forget drops a kept answer once its reauthorizations are done (the
// filter decides from then on).
func (a *asker) forget(p pair) {
	time.Sleep(time.Minute)
	a.mu.Lock()
	delete(a.decided, p)
	a.mu.Unlock()
}

func (a *asker) prompts(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case p := <-a.queue:
			act := a.ask(p)
			a.remember(ctx, p, act)
			a.mu.Lock()
			ps := a.waiting[p]
			delete(a.waiting, p)
			a.decided[p] = act
			a.mu.Unlock()
			for _, h := range ps {
				_ = h.e.CompleteOperation(h.p, nil)
			}
			go a.forget(p)
		}
	}
}

func (a *asker) ask(p pair) engine.ActionType {
	app := p.app
	if app == "" {
		app = "(unknown application)"
	}
	switch a.c.Auto {
	case "allow":
		fmt.Fprintf(a.out, "askuser: %s -> %s: allow (auto)\n", app, p.remote)
		return engine.ActionPermit
	case "block":
		fmt.Fprintf(a.out, "askuser: %s -> %s: block (auto)\n", app, p.remote)
		return engine.ActionBlock
	}
	fmt.Fprintf(a.out, "askuser: allow %s to connect to %s? [y/N] ", app, p.remote)
	line, _ := a.in.ReadString('\n')
	if s := strings.ToLower(strings.TrimSpace(line)); s == "y" || s == "yes" {
		return engine.ActionPermit
	}
	return engine.ActionBlock
}

// remember adds the answer as a filter above the catch-all one.
func (a *asker) remember(ctx context.Context, p pair, act engine.ActionType) {
	layer := engine.LayerALEAuthConnectV4
	if p.remote.Addr().Is6() {
		layer = engine.LayerALEAuthConnectV6
	}
	a.seq++
	conds := []mgmt.Condition{
		{Field: "ip_remote_address", Match: "equal", Value: p.remote.Addr().String()},
		{Field: "ip_remote_port", Match: "equal", Value: fmt.Sprint(p.remote.Port())},
		{Field: "ip_protocol", Match: "equal", Value: fmt.Sprint(p.proto)},
	}
	if p.app != "" {
		conds = append(conds, mgmt.Condition{Field: "ale_app_id", Match: "equal", Value: p.app})
	}
	key := fmt.Sprintf("%s-%s-%d-%d", a.c.Key, map[engine.ActionType]string{engine.ActionPermit: "allow", engine.ActionBlock: "block"}[act], time.Now().UnixNano(), a.seq)
	f := &mgmt.Filter{Key: key, Layer: layer.String(), Action: act.String(), Weight: "10", Conditions: conds, Lifetime: a.lt,
		Name: fmt.Sprintf("askuser: %s %s -> %s", act, p.app, p.remote)}
	if _, err := a.keep.Add(ctx, mgmt.Object{Filter: f}); err != nil {
		fmt.Fprintf(a.out, "askuser: remembering %s -> %s: %v\n", p.app, p.remote, err)
		return
	}
	fmt.Fprintf(a.out, "askuser: remembered as filter %s\n", key)
}
