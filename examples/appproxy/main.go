package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"

	"fwp/client"
	"fwp/engine"
	"fwp/mgmt"
)

type route struct {
	proxy netip.AddrPort
	pid   uint32
}

type routes map[string]route

func (r routes) String() string { return fmt.Sprint(map[string]route(r)) }

func (r routes) Set(s string) error {
	app, to, ok := strings.Cut(s, "=")
	if !ok || app == "" {
		return fmt.Errorf("%q is not APP=PROXY[@PID]", s)
	}
	addr, pid, _ := strings.Cut(to, "@")
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return fmt.Errorf("%q: %w", s, err)
	}
	var p uint64
	if pid != "" {
		if p, err = strconv.ParseUint(pid, 10, 32); err != nil {
			return fmt.Errorf("%q: pid: %w", s, err)
		}
	}
	r[app] = route{ap, uint32(p)}
	return nil
}

func main() {
	rs := routes{}
	socket := flag.String("socket", client.SocketFromEnv(), "fwpd's socket (env FWPD_SOCKET)")
	key := flag.String("key", "appproxy", "the callout key prefix")
	flag.Var(rs, "route", "APP=PROXY[@PID]: send APP's connections to PROXY (repeatable)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *socket, *key, rs); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "appproxy:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, socket, key string, rs routes) error {
	api, err := client.Dial(ctx, socket, client.Options{Name: "appproxy", Dynamic: true})
	if err != nil {
		return err
	}
	defer api.Close()
	layers := []engine.LayerID{engine.LayerALEConnectRedirectV4, engine.LayerALEConnectRedirectV6}
	var ops []mgmt.Op
	for _, l := range layers {
		ops = append(ops,
			mgmt.Op{Add: &mgmt.Object{Callout: &mgmt.Callout{Key: key + "-" + l.String(), Layer: l.String(), Name: "appproxy"}}},
			mgmt.Op{Add: &mgmt.Object{Filter: &mgmt.Filter{Key: key + "-" + l.String(), Layer: l.String(), Action: "callout_unknown",
				Callout: key + "-" + l.String(), Flags: []string{"permit_if_callout_unregistered"}, Name: "appproxy: per-application proxies"}}})
	}
	if _, err := api.Apply(ctx, ops); err != nil {
		return fmt.Errorf("adding the callouts and filters: %w", err)
	}
	var done []<-chan struct{}
	target := func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
		r, ok := rs[req.Values.Get(engine.FieldALEAppID).Str()]
		if !ok || r.proxy.Addr().Is4() == req.Layer.V6() {
			return engine.RedirectTarget{}, false
		}
		orig := netip.AddrPortFrom(req.Values.Get(engine.FieldIPRemoteAddress).Addr(), uint16(req.Values.Uint(engine.FieldIPRemotePort)))
		return engine.RedirectTarget{To: r.proxy, TargetPID: r.pid, Context: []byte(orig.String())}, true
	}
	for _, l := range layers {
		// The recipe needs fwpd's redirect handle, which exists once the
		// callout is registered: until then the callout has no opinion.
		var cr atomic.Pointer[engine.ConnectRedirect]
		classify := func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			if c := cr.Load(); c != nil {
				c.Registration().Classify(req, out)
			}
		}
		rc, err := client.RegisterCallout(ctx, key+"-"+l.String(), engine.CalloutRegistration{Classify: classify}, client.CalloutOptions{Socket: socket})
		if err != nil {
			return err
		}
		defer rc.Close()
		// The handle is fwpd's: the records fwpd writes name it, and the
		// redirect-state check compares it.
		h, err := rc.RedirectHandleCreate(ctx)
		if err != nil {
			return err
		}
		cr.Store(&engine.ConnectRedirect{Handle: h, Target: target})
		done = append(done, rc.Done())
	}
	fmt.Println("appproxy: ready")
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-done[0]:
	case <-done[1]:
	}
	return errors.New("fwpd closed the callout connection")
}
