package calloute2e

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"fwp/client"
	"fwp/engine"
)

// The callout program: this test binary started with progEnv set runs
// prog(args) instead of the tests. It registers its callouts, prints
// "ready", then prints what it observes, one line each, until stdin
// closes or it is killed.

const progEnv = "FWP_CALLOUT_PROG"

var outMu sync.Mutex

func say(format string, args ...any) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Fprintf(os.Stdout, format+"\n", args...)
}

// diffCallout is a deterministic callout: its answer is a hash of the
// filter's key, the tuple and the rights it is given, as the engine's
// differential tests' callouts (engine/diff_test.go) with the key in place
// of the ID, so that two engines with different IDs agree. style: 0
// honours the right, 1 ignores it, 2 always clears it when deciding.
func diffCallout(salt uint64, style int) engine.ClassifyFunc {
	return func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		h := fnv.New64a()
		var b [16]byte
		binary.LittleEndian.PutUint64(b[:], salt)
		binary.LittleEndian.PutUint64(b[8:], uint64(out.Rights))
		h.Write(b[:])
		h.Write([]byte(req.Filter.Key))
		h.Write([]byte(req.Values.String()))
		x := h.Sum64()
		act := [...]engine.ActionType{engine.ActionPermit, engine.ActionBlock, engine.ActionContinue, engine.ActionBlock}[x%4]
		if style == 0 && !out.CanWrite() && act != engine.ActionBlock {
			return
		}
		out.Action = act
		if act == engine.ActionContinue {
			return
		}
		if style == 2 || (x>>8)%3 == 0 {
			out.Rights &^= engine.RightActionWrite
		}
		if act == engine.ActionBlock && (x>>16)%4 == 0 {
			out.Flags |= engine.OutAbsorb
		}
	}
}

// afterRegister, when a callout mode sets it, runs once the callout is
// registered.
var afterRegister func(*client.RemoteCallout) error

// progCallout returns the registration of a named behaviour.
func progCallout(mode string) engine.CalloutRegistration {
	switch {
	case strings.HasPrefix(mode, "diff:"): // diff:salt:style
		p := strings.Split(mode, ":")
		salt, _ := strconv.ParseUint(p[1], 10, 64)
		style, _ := strconv.Atoi(p[2])
		return engine.CalloutRegistration{Classify: diffCallout(salt, style)}
	}
	switch mode {
	case "permit", "block", "continue":
		act := map[string]engine.ActionType{"permit": engine.ActionPermit, "block": engine.ActionBlock, "continue": engine.ActionContinue}[mode]
		return engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			if out.CanWrite() || act == engine.ActionBlock {
				out.Action = act
			}
		}}
	case "hang": // never answers
		return engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			select {}
		}}
	case "hold": // pends every operation and never completes: for deaths mid-pend
		return engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			if _, err := req.PendOperation(); err != nil {
				out.Action = engine.ActionBlock
				say("pend-failed %v", err)
				return
			}
			say("pended %d", req.Values.Uint(engine.FieldIPRemotePort))
			out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
		}}
	case "holdclassify": // pends every classify at a redirect layer and never completes
		return engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			h, err := req.AcquireClassifyHandle()
			if err != nil {
				say("handle-failed %v", err)
				return
			}
			if _, err := req.Engine().PendClassify(h, out); err != nil {
				say("pend-failed %v", err)
				return
			}
			say("pended %d", req.Values.Uint(engine.FieldIPRemotePort))
		}}
	case "async": // the seed's out-of-band authorizer: odd remote ports pend, even answer at once
		a := &engine.AsyncAuthorizer{Decide: func(ctx context.Context, l engine.LayerID, vs engine.Values, m engine.Metadata) engine.ActionType {
			if vs.Uint(engine.FieldIPRemotePort)%4 == 1 {
				return engine.ActionPermit
			}
			return engine.ActionBlock
		}}
		async := a.Registration().Classify
		return engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			if req.Values.Uint(engine.FieldIPRemotePort)%2 == 0 && req.Values.Uint(engine.FieldFlags)&uint64(engine.FlagIsReauthorize) == 0 {
				if out.CanWrite() {
					out.Action = engine.ActionPermit
				}
				return
			}
			async(req, out)
		}}
	case "reauth": // tries to pend a reauthorization: CANNOT_PEND
		return engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
			_, err := req.PendOperation()
			say("pend reauth=%v err=%v", req.Values.Uint(engine.FieldFlags)&uint64(engine.FlagIsReauthorize) != 0, err)
			if err == nil {
				out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
				return
			}
			out.Action = engine.ActionPermit
		}}
	case "notify":
		return engine.CalloutRegistration{
			Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {},
			Notify: func(t engine.NotifyType, f *engine.Filter) {
				say("notify %s %s", t, f.Key)
			},
		}
	case "flow": // associates a context with each flow, counts calls per context
		var e2 *engine.Engine
		return engine.CalloutRegistration{
			Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
				e2 = req.Engine()
				if req.FlowContext == nil {
					err := e2.FlowAssociateContext(req.Meta.FlowHandle, req.Layer, req.Filter.Action.Callout, fmt.Sprintf("ctx-%d", req.Meta.FlowHandle))
					say("associate %d %v", req.Meta.FlowHandle, err)
				} else {
					say("context %d %v", req.Meta.FlowHandle, req.FlowContext)
				}
			},
			FlowDelete: func(l engine.LayerID, c engine.CalloutID, ctx any) {
				say("flowdelete %v", ctx)
			},
		}
	case "redirect", "redirect-async": // CONNECT_REDIRECT to 127.0.0.1:<port+1000> with records and context
		cr := &engine.ConnectRedirect{Async: mode == "redirect-async", Target: func(req *engine.ClassifyRequest) (engine.RedirectTarget, bool) {
			port := uint16(req.Values.Uint(engine.FieldIPRemotePort))
			return engine.RedirectTarget{To: netipAP("127.0.0.1", port+1000), TargetPID: 4242, Context: []byte(fmt.Sprintf("orig=%d", port))}, true
		}}
		// The handle is fwpd's, created once registered (Classify runs on
		// the connection's reader: it must not wait on fwpd itself).
		afterRegister = func(rc *client.RemoteCallout) error {
			h, err := rc.RedirectHandleCreate(context.Background())
			cr.Handle = h
			return err
		}
		return cr.Registration()
	case "half": // pends half (odd ports) and completes them from another goroutine
		return halfCallout()
	}
	panic("unknown callout mode " + mode)
}

// halfCallout pends odd remote ports and completes them from a goroutine of
// its own, in batches; even ports are permitted at once.
func halfCallout() engine.CalloutRegistration {
	type job struct {
		e *engine.Engine
		p *engine.Pend
	}
	jobs := make(chan job, 1<<16)
	go func() {
		for j := range jobs {
			_ = j.e.CompleteOperation(j.p, nil)
		}
	}()
	var mu sync.Mutex
	decided := map[uint64]bool{}
	return engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
		port := req.Values.Uint(engine.FieldIPRemotePort)
		id := req.Values.Uint(engine.FieldIPLocalPort)<<16 | port
		if port%2 == 0 {
			out.Action = engine.ActionPermit
			return
		}
		if req.Values.Uint(engine.FieldFlags)&uint64(engine.FlagIsReauthorize) != 0 {
			mu.Lock()
			ok := decided[id]
			delete(decided, id)
			mu.Unlock()
			if ok {
				out.Action = engine.ActionPermit
			} else {
				out.Action = engine.ActionBlock
			}
			return
		}
		p, err := req.PendOperation()
		if err != nil {
			out.Action = engine.ActionBlock
			return
		}
		mu.Lock()
		decided[id] = true
		mu.Unlock()
		jobs <- job{req.Engine(), p}
		out.Action, out.Flags = engine.ActionBlock, engine.OutAbsorb
	}}
}

// prog: socket deadline key=mode ...
func prog(args []string) error {
	socket := args[0]
	deadline, err := time.ParseDuration(args[1])
	if err != nil {
		return err
	}
	var rcs []*client.RemoteCallout
	for _, a := range args[2:] {
		key, mode, _ := strings.Cut(a, "=")
		afterRegister = nil
		reg := progCallout(mode)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		rc, err := client.RegisterCallout(ctx, key, reg, client.CalloutOptions{Socket: socket, Deadline: deadline})
		cancel()
		if err == nil && afterRegister != nil {
			err = afterRegister(rc)
		}
		if err != nil {
			say("error %v", err)
			return err
		}
		rcs = append(rcs, rc)
	}
	say("ready")
	done := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			if sc.Text() == "outstanding" {
				for _, rc := range rcs {
					o := rc.Engine().Outstanding()
					say("outstanding %s %d %d %d", rc.Key(), o.Pends, o.ClassifyHandles, o.FlowContexts)
				}
			}
		}
		close(done)
	}()
	for _, rc := range rcs {
		go func() {
			<-rc.Done()
			say("unregistered %s %v", rc.Key(), rc.Err())
		}()
	}
	<-done
	for _, rc := range rcs {
		rc.Close()
	}
	return nil
}

func netipAP(a string, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr(a), port)
}
