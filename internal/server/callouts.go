package server

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"fwp/engine"
	"fwp/internal/calloutwire"
	"fwp/internal/peercred"
)

// DefaultCalloutDeadline bounds a remote callout's answer to one classify
// unless its registration asks for another: far under the engine's pend
// timeout (10 s), so that a hung callout program costs a connection a
// second at most, and far over a live program's answer (tens of µs).
const DefaultCalloutDeadline = time.Second

// maxCalloutDeadline bounds what a registration may ask for.
const maxCalloutDeadline = 30 * time.Second

// calloutWriteTimeout: a callout program that stops reading its socket is
// as dead as one that exited; fwpd's classifications must not wait on it.
// A connection with no registration (a classifier) only delays its own
// replies, and gets longer (clientWriteTimeout).
const (
	calloutWriteTimeout = 2 * time.Second
	clientWriteTimeout  = 30 * time.Second
)

// Callouts serves the callout socket (client.CalloutSocket): a callout
// program registers a callout key and fwpd's engine then calls it for
// every filter that names the key, like an embedded callout — a remote
// registration is an ordinary engine.CalloutRegistration whose functions
// are frames on the program's connection, so every caller of the engine's
// Classify (the classify requests served here, and the kernel callout path
// later) reaches it the same way. Clients also classify through the
// engine here (OpClassify) and list the registrations (OpList).
//
// A registration lives as long as its connection: when the program exits,
// is killed, or its connection breaks, the callout is unregistered at once,
// every classification waiting on it and every pend it holds resolves by
// its filter's PERMIT_IF_CALLOUT_UNREGISTERED flag, and its flow contexts
// and redirect handles are removed.
type Callouts struct {
	eng   *engine.Engine
	log   *slog.Logger
	admin func(peercred.Cred) bool

	mu   sync.Mutex
	regs map[string]*remoteReg
	// stats of keys whose program went away, kept for fwpctl callouts
	// and /metrics: counters must not go down when a program restarts.
	gone map[string]*calloutStats
}

// NewCallouts returns the callout service over eng. admin decides who may
// register, classify and list (the management API's administrators).
func NewCallouts(eng *engine.Engine, admin func(peercred.Cred) bool, log *slog.Logger) *Callouts {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Callouts{eng: eng, log: log, admin: admin, regs: map[string]*remoteReg{}, gone: map[string]*calloutStats{}}
}

// Callouts returns the server's callout service (one per server).
func (s *Server) Callouts() *Callouts {
	s.calloutsOnce.Do(func() { s.callouts = NewCallouts(s.m.Engine(), s.isAdmin, s.log) })
	return s.callouts
}

// Serve accepts callout connections on l until it is closed.
func (h *Callouts) Serve(l net.Listener) error {
	var backoff time.Duration
	for {
		c, err := l.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			h.log.Warn("callout socket: accept failed", "err", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		go h.serveConn(c)
	}
}

type calloutConn struct {
	h          *Callouts
	c          net.Conn
	cred       peercred.Cred
	exe        string
	w          *calloutwire.Writer
	reg        *remoteReg // after a Register
	wg         sync.WaitGroup
	closeOnce  sync.Once
	registered atomic.Bool

	// flows maps the flow handles a classifying client names (its own
	// datapath's) to handles of fwpd's engine, made for this connection:
	// two clients' flow 1 are two flows, neither is a kernel flow (whose
	// handle is its socket cookie), and a client can end only its own.
	// Its flows end when the connection does.
	flowMu sync.Mutex
	flows  map[engine.FlowHandle]engine.FlowHandle
}

// maxClientFlows bounds one connection's live flows (a client that never
// says FlowDeleted would grow the map without end).
const maxClientFlows = 1 << 20

// engineFlow returns the engine's handle for the client's flow, made on
// first sight.
func (cc *calloutConn) engineFlow(f engine.FlowHandle) (engine.FlowHandle, error) {
	cc.flowMu.Lock()
	defer cc.flowMu.Unlock()
	if g, ok := cc.flows[f]; ok {
		return g, nil
	}
	if len(cc.flows) >= maxClientFlows {
		return 0, fmt.Errorf("%d live flows on this connection: end some (FlowDeleted) first", len(cc.flows))
	}
	if cc.flows == nil {
		cc.flows = map[engine.FlowHandle]engine.FlowHandle{}
	}
	g := cc.h.eng.NewFlowHandle()
	cc.flows[f] = g
	return g, nil
}

// flowDeleted ends the client's flow f (if it named it before).
func (cc *calloutConn) flowDeleted(f engine.FlowHandle) {
	cc.flowMu.Lock()
	g, ok := cc.flows[f]
	delete(cc.flows, f)
	cc.flowMu.Unlock()
	if ok {
		cc.h.eng.FlowDeleted(g)
	}
}

// endFlows ends every flow the connection's client named.
func (cc *calloutConn) endFlows() {
	cc.flowMu.Lock()
	flows := cc.flows
	cc.flows = nil
	cc.flowMu.Unlock()
	for _, g := range flows {
		cc.h.eng.FlowDeleted(g)
	}
}

// shutdown ends the connection; a read(2) in progress returns first.
func (cc *calloutConn) shutdown() {
	cc.closeOnce.Do(func() {
		cc.c.Close()
	})
}

type deadlineWriter struct {
	c          net.Conn
	registered *atomic.Bool
}

func (d deadlineWriter) Write(b []byte) (int, error) {
	t := clientWriteTimeout
	if d.registered.Load() {
		t = calloutWriteTimeout
	}
	_ = d.c.SetWriteDeadline(time.Now().Add(t))
	return d.c.Write(b)
}

func (h *Callouts) serveConn(c net.Conn) {
	cc := &calloutConn{h: h, c: c}
	cc.w = calloutwire.NewWriter(deadlineWriter{c, &cc.registered})
	cred, err := peercred.FromConn(c)
	if err != nil {
		h.log.Warn("callout socket: no peer credentials", "err", err)
		c.Close()
		return
	}
	cc.cred = cred
	cc.exe, _ = os.Readlink("/proc/" + strconv.FormatUint(uint64(cred.PID), 10) + "/exe")
	// Everything on this socket is an administrator's: registering,
	// classifying through the engine, listing who registered.
	if !h.admin(cred) {
		_ = cc.refuse(calloutwire.CodeAccessDenied, "the callout socket needs the admin right (uid %d)", cred.UID)
		cc.shutdown()
		return
	}
	// read returns only when the connection ends, always with the reason.
	if err = cc.read(); !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		h.log.Warn("callout connection closed", "pid", cred.PID, "uid", cred.UID, "err", err)
	}
	cc.shutdown()
	if cc.reg != nil {
		cc.reg.close()
	}
	cc.wg.Wait()
	cc.endFlows()
}

// errClosedByFwpd ends a connection fwpd refuses to go on with.
var errClosedByFwpd = errors.New("closed by fwpd")

// firstFrameTimeout: a peer that connects and says nothing must not hold
// a connection slot.
const firstFrameTimeout = 10 * time.Second

func (cc *calloutConn) read() error {
	r := calloutwire.NewReader(cc.c)
	_ = cc.c.SetReadDeadline(time.Now().Add(firstFrameTimeout))
	for first := true; ; first = false {
		b, err := r.Frame()
		if first && err == nil {
			_ = cc.c.SetReadDeadline(time.Time{})
		}
		var m calloutwire.Message
		if err == nil {
			if calloutwire.Type(b[0]) == calloutwire.TAnswer && cc.reg != nil {
				// Every call's answer: decoded in place, no Message boxed.
				var a calloutwire.Answer
				if err = calloutwire.DecodeAnswer(b, &a); err == nil {
					cc.reg.answer(a)
					continue
				}
			} else {
				m, err = calloutwire.Decode(b)
			}
		}
		if err != nil {
			if errors.Is(err, calloutwire.ErrMalformed) {
				// Tell the program why before closing: a typed error, not a
				// silent hang-up.
				_ = cc.w.Send(calloutwire.Reply{Code: calloutwire.CodeMalformed, Msg: err.Error()})
				if cc.reg != nil {
					cc.reg.stats.errors.Add(1)
				}
			}
			return err
		}
		if err := cc.handle(m); err != nil {
			return err
		}
	}
}

func (cc *calloutConn) handle(m calloutwire.Message) error {
	h := cc.h
	switch m := m.(type) {
	case calloutwire.Register:
		if cc.reg != nil {
			return cc.refuse(calloutwire.CodeInvalidArgument, "this connection already registered %q", cc.reg.key)
		}
		r, err := h.register(cc, m)
		if err != nil {
			code := calloutwire.CodeInvalidArgument
			if errors.Is(err, engine.ErrAlreadyExists) {
				code = calloutwire.CodeAlreadyExists
			}
			_ = cc.w.Send(calloutwire.Registered{Code: code, Msg: err.Error()})
			return nil // the program may try another key
		}
		cc.reg = r
		cc.registered.Store(true)
		var body []byte
		body = binary.AppendUvarint(body, uint64(h.eng.PendTimeout().Microseconds()))
		body = binary.AppendUvarint(body, uint64(r.deadline.Microseconds()))
		if err := cc.w.Send(calloutwire.Registered{Code: calloutwire.CodeOK, Body: body}); err != nil {
			return err
		}
		r.start()
		return nil
	case calloutwire.Answer:
		if cc.reg == nil {
			return cc.refuse(calloutwire.CodeInvalidArgument, "an answer on a connection with no registration")
		}
		cc.reg.answer(m)
		return nil
	case calloutwire.Complete:
		if cc.reg == nil {
			return cc.refuse(calloutwire.CodeInvalidArgument, "a completion on a connection with no registration")
		}
		cc.reg.complete(m)
		return nil
	case calloutwire.FlowContext:
		if cc.reg == nil {
			return cc.refuse(calloutwire.CodeInvalidArgument, "a flow context on a connection with no registration")
		}
		cc.reg.flowContext(m)
		return nil
	case calloutwire.Request:
		switch m.Op {
		case calloutwire.OpClassify:
			// A classification may pend for up to the pend timeout: it
			// must not hold up the connection's other frames.
			cc.wg.Add(1)
			go func() {
				defer cc.wg.Done()
				_ = cc.w.Send(cc.classify(m))
			}()
			return nil
		case calloutwire.OpFlowDeleted:
			flow, n := binary.Uvarint(m.Body)
			if n <= 0 || n != len(m.Body) || flow == 0 {
				return cc.w.Send(calloutwire.Reply{ID: m.ID, Code: calloutwire.CodeInvalidArgument, Msg: "a flow handle"})
			}
			cc.flowDeleted(engine.FlowHandle(flow))
			return cc.w.Send(calloutwire.Reply{ID: m.ID})
		case calloutwire.OpOutstanding:
			b, _ := json.Marshal(h.eng.Outstanding())
			return cc.w.Send(calloutwire.Reply{ID: m.ID, Body: b})
		case calloutwire.OpList:
			b, _ := json.Marshal(h.List())
			return cc.w.Send(calloutwire.Reply{ID: m.ID, Body: b})
		case calloutwire.OpRedirectHandle:
			if cc.reg == nil {
				return cc.w.Send(calloutwire.Reply{ID: m.ID, Code: calloutwire.CodeInvalidArgument, Msg: "a redirect handle needs a registration"})
			}
			rh := h.eng.RedirectHandleCreate("remote:" + cc.reg.key)
			cc.reg.mu.Lock()
			cc.reg.redirectHandles = append(cc.reg.redirectHandles, rh)
			cc.reg.mu.Unlock()
			return cc.w.Send(calloutwire.Reply{ID: m.ID, Body: binary.AppendUvarint(nil, uint64(rh))})
		}
		return cc.w.Send(calloutwire.Reply{ID: m.ID, Code: calloutwire.CodeInvalidArgument, Msg: fmt.Sprintf("unknown op %d", m.Op)})
	}
	return cc.refuse(calloutwire.CodeMalformed, "a %s frame is not sent to fwpd", m.Type())
}

// refuse answers with a typed error and closes the connection.
func (cc *calloutConn) refuse(code uint8, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	_ = cc.w.Send(calloutwire.Reply{Code: code, Msg: msg})
	return fmt.Errorf("%w: %s", errClosedByFwpd, msg)
}

// remoteReg is one live registration.
type remoteReg struct {
	h        *Callouts
	key      string
	conn     *calloutConn
	deadline time.Duration
	flags    engine.CalloutFlags
	since    time.Time
	stats    *calloutStats
	nextID   atomic.Uint64

	mu      sync.Mutex
	closed  bool
	waiting map[uint64]chan calloutwire.Answer
	pends   map[uint64]*heldPend
	// A completion may overtake the pend it completes: the reader hands
	// the answer to the classifying goroutine, which holds the pend later.
	expect          map[uint64]struct{}             // pends answered, not yet held
	early           map[uint64]calloutwire.Complete // their completions, come first
	redirectHandles []engine.RedirectHandle

	// Notifications of filters present at registration wait for the
	// Registered reply, in order.
	notifyMu    sync.Mutex
	started     bool
	earlyNotify []calloutwire.Notify
}

type heldPend struct {
	p         *engine.Pend
	h         engine.ClassifyHandle
	hasHandle bool
	layerData any
	failOpen  bool
}

func (h *Callouts) register(cc *calloutConn, m calloutwire.Register) (*remoteReg, error) {
	if m.Key == "" {
		return nil, fmt.Errorf("%w: a registration needs a callout key", engine.ErrInvalidArgument)
	}
	d := DefaultCalloutDeadline
	if m.DeadlineMicros > 0 {
		d = min(time.Duration(m.DeadlineMicros)*time.Microsecond, maxCalloutDeadline)
	}
	r := &remoteReg{h: h, key: m.Key, conn: cc, deadline: d, flags: m.Flags, since: time.Now(),
		waiting: map[uint64]chan calloutwire.Answer{}, pends: map[uint64]*heldPend{},
		expect: map[uint64]struct{}{}, early: map[uint64]calloutwire.Complete{}}
	h.mu.Lock()
	if old, ok := h.regs[m.Key]; ok {
		h.mu.Unlock()
		return nil, fmt.Errorf("%w: callout %q is registered by pid %d", engine.ErrAlreadyExists, m.Key, old.conn.cred.PID)
	}
	r.stats = h.gone[m.Key]
	delete(h.gone, m.Key)
	if r.stats == nil {
		r.stats = &calloutStats{}
	}
	h.regs[m.Key] = r
	h.mu.Unlock()
	err := h.eng.RegisterCallout(m.Key, engine.CalloutRegistration{
		// A remote answer is a round trip to another process, which may
		// be slow or hung: datapaths classify such flows off their
		// packet-reading threads (engine.CalloutMayBlock).
		Classify: r.classify, Notify: r.notify, FlowDelete: r.flowDelete, Flags: m.Flags | engine.CalloutMayBlock,
	})
	if err != nil {
		h.mu.Lock()
		delete(h.regs, m.Key)
		h.gone[m.Key] = r.stats
		h.mu.Unlock()
		if errors.Is(err, engine.ErrCalloutAlreadyRegistered) {
			err = fmt.Errorf("%w: %w", engine.ErrAlreadyExists, err)
		}
		return nil, err
	}
	h.log.Info("callout registered", "key", m.Key, "pid", cc.cred.PID, "uid", cc.cred.UID, "exe", cc.exe, "deadline", d)
	return r, nil
}

// start lets the notifications of filters already present go out, after
// the Registered reply (RegisterCallout calls notify before it returns).
func (r *remoteReg) start() {
	r.notifyMu.Lock()
	defer r.notifyMu.Unlock()
	r.started = true
	for _, n := range r.earlyNotify {
		_ = r.conn.w.Send(n)
	}
	r.earlyNotify = nil
}

func (r *remoteReg) failOut(f *engine.Filter, out *engine.ClassifyOut) {
	if f.Flags&engine.FilterPermitIfCalloutUnregistered != 0 {
		out.Action = engine.ActionPermit
	} else {
		out.Action = engine.ActionBlock
	}
}

func (r *remoteReg) failEvent(req *engine.ClassifyRequest, permit bool) {
	ev := engine.NetEvent{Type: engine.EventCalloutFailure, Layer: req.Layer, Filter: req.Filter.ID, Callout: req.Filter.Action.Callout,
		Reason: engine.ReasonCalloutUnregisteredBlock}
	if permit {
		ev.Reason = engine.ReasonCalloutUnregisteredPermit
	}
	vs := req.Values
	ev.Protocol = uint8(vs.Uint(engine.FieldIPProtocol))
	if a := vs.Get(engine.FieldIPLocalAddress).Addr(); a.IsValid() {
		ev.Local = netipAddrPort(a, vs.Uint(engine.FieldIPLocalPort))
	}
	if a := vs.Get(engine.FieldIPRemoteAddress).Addr(); a.IsValid() {
		ev.Remote = netipAddrPort(a, vs.Uint(engine.FieldIPRemotePort))
	}
	ev.AppID = vs.Get(engine.FieldALEAppID).Str()
	if req.Meta.Has(engine.MetaProcessID) {
		ev.ProcessID = req.Meta.ProcessID
	}
	r.h.eng.RecordNetEvent(ev)
}

var answerChans = sync.Pool{New: func() any { return make(chan calloutwire.Answer, 1) }}

var timers = sync.Pool{New: func() any {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return t
}}

// classify is the engine's classifyFn for a remote callout: the request
// goes out as a frame, the answer comes back and is applied here, with
// this engine's own pend, handle and redirect calls, as an embedded callout
// would make them.
func (r *remoteReg) classify(req *engine.ClassifyRequest, out *engine.ClassifyOut) {
	start := time.Now()
	st := r.stats
	st.calls.Add(1)
	e := req.Engine()
	l := engine.LayerByID(req.Layer)
	var h engine.ClassifyHandle
	hasHandle := false
	msg := calloutwire.Classify{Layer: req.Layer, Values: req.Values, Meta: req.Meta, Filter: req.Filter,
		ProviderContext: req.ProviderContext, Rights: out.Rights}
	if l.Writable != engine.WritableNone || l.CanPendClassify {
		var err error
		if h, err = req.AcquireClassifyHandle(); err == nil {
			hasHandle = true
			switch l.Writable {
			case engine.WritableConnectRequest:
				if w, err := e.AcquireConnectRequest(h); err == nil {
					msg.Connect = w.PreviousVersion
				}
			case engine.WritableBindRequest:
				if w, err := e.AcquireBindRequest(h); err == nil {
					msg.Bind = w.PreviousVersion
				}
			}
		}
	}
	release := func() {
		if hasHandle {
			e.ReleaseClassifyHandle(h)
		}
	}
	id := r.nextID.Add(1)
	msg.ID = id
	ch := answerChans.Get().(chan calloutwire.Answer)
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		answerChans.Put(ch)
		release()
		r.failOut(req.Filter, out)
		return
	}
	r.waiting[id] = ch
	r.mu.Unlock()
	if err := r.conn.w.SendClassify(&msg); err != nil {
		r.conn.shutdown() // the reader ends, and close answers every waiter
	}
	t := timers.Get().(*time.Timer)
	t.Reset(r.deadline)
	var a calloutwire.Answer
	ok := true
	select {
	case a = <-ch:
	case <-t.C:
		r.mu.Lock()
		if _, still := r.waiting[id]; still {
			delete(r.waiting, id)
			ok = false
		}
		r.mu.Unlock()
		if ok { // answered as the timer fired
			a = <-ch
		}
	}
	t.Stop()
	timers.Put(t)
	if !ok {
		st.timeouts.Add(1)
		r.failOut(req.Filter, out)
		r.failEvent(req, out.Action == engine.ActionPermit)
		release()
		return
	}
	answerChans.Put(ch)
	if a.ID == 0 { // the connection died: close answered
		r.failOut(req.Filter, out)
		r.failEvent(req, out.Action == engine.ActionPermit)
		release()
		return
	}
	st.latency.observe(time.Since(start))
	switch a.PendKind {
	case calloutwire.PendOperation:
		p, err := req.PendOperation()
		if err != nil {
			// The program's engine agreed to a pend this one refuses: the
			// answer cannot be honoured.
			st.errors.Add(1)
			r.dropPend(a.PendID)
			r.failOut(req.Filter, out)
			release()
			return
		}
		st.pends.Add(1)
		*out = a.Out
		r.hold(a.PendID, &heldPend{p: p, layerData: req.LayerData, failOpen: req.Filter.Flags&engine.FilterPermitIfCalloutUnregistered != 0})
		release()
		return
	case calloutwire.PendClassify:
		if !hasHandle {
			st.errors.Add(1)
			r.dropPend(a.PendID)
			r.failOut(req.Filter, out)
			return
		}
		p, err := e.PendClassify(h, out)
		if err != nil {
			st.errors.Add(1)
			r.dropPend(a.PendID)
			r.failOut(req.Filter, out)
			release()
			return
		}
		st.pends.Add(1)
		r.hold(a.PendID, &heldPend{p: p, h: h, hasHandle: true, failOpen: req.Filter.Flags&engine.FilterPermitIfCalloutUnregistered != 0})
		return
	}
	if hasHandle {
		if err := r.apply(e, h, a.Applied); err != nil {
			st.errors.Add(1)
			r.h.log.Debug("remote callout: applying its layer data failed", "key", r.key, "err", err)
		}
	}
	*out = a.Out
	release()
}

func (r *remoteReg) apply(e *engine.Engine, h engine.ClassifyHandle, a calloutwire.Applied) error {
	switch {
	case a.Connect != nil:
		w, err := e.AcquireConnectRequest(h)
		if err != nil {
			return err
		}
		w.RemoteAddressAndPort = a.Connect.RemoteAddressAndPort
		w.LocalRedirectTargetPID = a.Connect.LocalRedirectTargetPID
		w.LocalRedirectHandle = a.Connect.LocalRedirectHandle
		w.LocalRedirectContext = a.Connect.LocalRedirectContext
		return e.ApplyConnectRequest(h, w, a.ApplyFlags)
	case a.Bind != nil:
		w, err := e.AcquireBindRequest(h)
		if err != nil {
			return err
		}
		w.LocalAddressAndPort = a.Bind.LocalAddressAndPort
		return e.ApplyBindRequest(h, w, a.ApplyFlags)
	}
	return nil
}

// hold keeps a pend until the program completes it, fwpd resolves it
// (timeout, cancel) or the program goes away.
func (r *remoteReg) hold(id uint64, hp *heldPend) {
	r.mu.Lock()
	delete(r.expect, id)
	c, early := r.early[id]
	delete(r.early, id)
	if r.closed {
		r.mu.Unlock()
		r.failPend(hp)
		return
	}
	if early {
		r.mu.Unlock()
		r.completeHeld(hp, c)
		return
	}
	if _, dup := r.pends[id]; dup || id == 0 {
		r.mu.Unlock()
		r.stats.errors.Add(1)
		r.failPend(hp)
		return
	}
	r.pends[id] = hp
	r.stats.held.Add(1)
	r.mu.Unlock()
	r.conn.wg.Add(1)
	go func() {
		defer r.conn.wg.Done()
		<-hp.p.Done()
		r.mu.Lock()
		cur, mine := r.pends[id]
		mine = mine && cur == hp
		if mine {
			delete(r.pends, id)
			r.stats.held.Add(-1)
		}
		r.mu.Unlock()
		if mine { // resolved by fwpd (timeout, cancel): the program drops its side
			if hp.hasHandle {
				r.h.eng.ReleaseClassifyHandle(hp.h)
			}
			_ = r.conn.w.Send(calloutwire.PendDone{PendID: id})
		}
	}()
}

func (r *remoteReg) dropPend(id uint64) {
	r.mu.Lock()
	delete(r.expect, id)
	delete(r.early, id)
	r.mu.Unlock()
	if id != 0 {
		_ = r.conn.w.Send(calloutwire.PendDone{PendID: id})
	}
}

// failPend resolves a held pend as the callout's absence says. A
// fail-closed one is blocked at once: a completion would be decided by
// its reauthorization, and the filter whose flag says "closed" may be
// gone by then (the program's dynamic session ends with it).
func (r *remoteReg) failPend(hp *heldPend) {
	e := r.h.eng
	if !hp.failOpen {
		_ = e.FailPendClosed(hp.p)
		if hp.hasHandle {
			e.ReleaseClassifyHandle(hp.h)
		}
		return
	}
	// Fail open: a pended classify completes with a permit; a completed
	// operation is reauthorized, and the reauthorization finds the callout
	// unregistered (the flag permits) or its filter gone, while the rest
	// of the policy still decides. At AUTH_RECV_ACCEPT the held data is
	// reinjected and authorized again.
	if hp.hasHandle {
		_ = e.CompleteClassify(hp.h, engine.ClassifyOut{Action: engine.ActionPermit, Rights: engine.RightActionWrite})
		e.ReleaseClassifyHandle(hp.h)
		return
	}
	_ = e.CompleteOperation(hp.p, hp.layerData)
}

func (r *remoteReg) answer(a calloutwire.Answer) {
	r.mu.Lock()
	ch, ok := r.waiting[a.ID]
	delete(r.waiting, a.ID)
	if ok && a.ID != 0 && a.PendKind != calloutwire.PendNone && len(r.expect) < maxExpected {
		r.expect[a.PendID] = struct{}{}
	}
	r.mu.Unlock()
	if !ok || a.ID == 0 {
		// Too late (the deadline passed) or never asked: a pend it took is
		// dropped on its side.
		if a.PendKind != calloutwire.PendNone {
			r.dropPend(a.PendID)
		}
		return
	}
	ch <- a
}

func (r *remoteReg) complete(c calloutwire.Complete) {
	r.mu.Lock()
	hp, ok := r.pends[c.PendID]
	if ok {
		delete(r.pends, c.PendID)
		r.stats.held.Add(-1)
	} else if _, exp := r.expect[c.PendID]; exp {
		r.early[c.PendID] = c // hold completes it
	}
	r.mu.Unlock()
	if !ok {
		return // not held yet (above), or resolved by fwpd meanwhile (PendDone is on its way)
	}
	r.completeHeld(hp, c)
}

// maxExpected bounds the answered pends not yet held: the classifying
// goroutines hold them within microseconds.
const maxExpected = 1 << 20

func (r *remoteReg) completeHeld(hp *heldPend, c calloutwire.Complete) {
	e := r.h.eng
	if hp.hasHandle {
		if err := r.apply(e, hp.h, c.Applied); err != nil {
			r.stats.errors.Add(1)
		}
		_ = e.CompleteClassify(hp.h, c.Out)
		e.ReleaseClassifyHandle(hp.h)
		return
	}
	var reinject any
	if c.Reinject {
		reinject = hp.layerData
	}
	_ = e.CompleteOperation(hp.p, reinject)
}

// remoteFlow is the flow context fwpd keeps for a remote callout: the
// context itself stays in the program; this one makes CONDITIONAL_ON_FLOW
// and flowDeleteFn work in fwpd's engine.
type remoteFlow struct {
	r    *remoteReg
	flow engine.FlowHandle
}

func (r *remoteReg) flowContext(m calloutwire.FlowContext) {
	c, err := r.h.eng.View().CalloutByKey(r.key)
	if err != nil || c.ID != m.Callout {
		r.stats.errors.Add(1)
		return
	}
	if m.Add {
		if err := r.h.eng.FlowAssociateContext(m.Flow, m.Layer, m.Callout, remoteFlow{r, m.Flow}); err != nil {
			r.stats.errors.Add(1)
		}
		return
	}
	_ = r.h.eng.FlowRemoveContext(m.Flow, m.Layer, m.Callout)
}

func (r *remoteReg) flowDelete(layer engine.LayerID, callout engine.CalloutID, ctx any) {
	rf, ok := ctx.(remoteFlow)
	if !ok || rf.r != r {
		return
	}
	_ = r.conn.w.Send(calloutwire.FlowDelete{Flow: rf.flow, Layer: layer, Callout: callout})
}

func (r *remoteReg) notify(t engine.NotifyType, f *engine.Filter) {
	n := calloutwire.Notify{Kind: t, Filter: *f}
	r.notifyMu.Lock()
	defer r.notifyMu.Unlock()
	if !r.started {
		r.earlyNotify = append(r.earlyNotify, n)
		return
	}
	_ = r.conn.w.Send(n)
}

// close unregisters: classifications waiting get the filter's default,
// held pends resolve by their filter's flag, flow contexts and redirect
// handles go.
func (r *remoteReg) close() {
	h := r.h
	// Unregister first: a completed operation's reauthorization must find
	// the callout gone.
	_ = h.eng.UnregisterCallout(r.key)
	r.mu.Lock()
	r.closed = true
	waiting := r.waiting
	r.waiting = map[uint64]chan calloutwire.Answer{}
	pends := r.pends
	r.pends = map[uint64]*heldPend{}
	r.stats.held.Add(-int64(len(pends)))
	rhs := r.redirectHandles
	r.redirectHandles = nil
	r.mu.Unlock()
	for _, ch := range waiting {
		ch <- calloutwire.Answer{} // ID 0: failed
	}
	for _, hp := range pends {
		r.failPend(hp)
	}
	for _, rh := range rhs {
		_ = h.eng.RedirectHandleDestroy(rh)
	}
	if n := len(waiting) + len(pends); n > 0 {
		r.stats.errors.Add(1)
	}
	h.mu.Lock()
	if h.regs[r.key] == r {
		delete(h.regs, r.key)
		h.gone[r.key] = r.stats
	}
	h.mu.Unlock()
	h.log.Info("callout unregistered", "key", r.key, "pid", r.conn.cred.PID, "in_flight", len(waiting), "pends", len(pends))
}

// classify serves OpClassify: a classification through fwpd's engine that
// calls remote callouts, waits for pends and reauthorizes, as a datapath
// does.
func (cc *calloutConn) classify(m calloutwire.Request) calloutwire.Reply {
	h := cc.h
	a, err := calloutwire.DecodeClassifyArgs(m.Body)
	if err != nil {
		return calloutwire.Reply{ID: m.ID, Code: calloutwire.CodeMalformed, Msg: err.Error()}
	}
	if !a.Layer.Valid() {
		return calloutwire.Reply{ID: m.ID, Code: calloutwire.CodeInvalidArgument, Msg: "no layer"}
	}
	if a.Meta.Has(engine.MetaFlowHandle) && a.Meta.FlowHandle != 0 {
		if a.Meta.FlowHandle, err = cc.engineFlow(a.Meta.FlowHandle); err != nil {
			return calloutwire.Reply{ID: m.ID, Code: calloutwire.CodeUnavailable, Msg: err.Error()}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), h.eng.PendTimeout()+time.Second)
	defer cancel()
	// At AUTH_RECV_ACCEPT a completed pend reinjects the held data: here
	// it is the classification itself.
	res, err := h.eng.ClassifyWait(ctx, a.Layer, &a.Values, &a.Meta, classifyHeld{})
	if err != nil {
		return calloutwire.Reply{ID: m.ID, Code: calloutwire.CodeUnavailable, Msg: err.Error()}
	}
	out := calloutwire.Result{Out: res.ClassifyOut, Filter: res.Filter, Callout: res.Callout, Reason: res.Reason}
	if rd := res.Redirect; rd != nil {
		out.Redirect, out.Bind, out.Original = rd.Connect, rd.Bind, rd.Original
		if rd.Records.Len() > 0 {
			out.Records = h.eng.MarshalRedirectRecords(rd.Records)
		}
	}
	return calloutwire.Reply{ID: m.ID, Body: calloutwire.AppendResult(nil, &out)}
}

type classifyHeld struct{}

// ---- visibility ----

type calloutStats struct {
	calls, pends, timeouts, errors atomic.Uint64
	held                           atomic.Int64
	latency                        latencyHist
}

// latencyHist counts answer latencies in power-of-two microsecond buckets.
type latencyHist struct{ b [32]atomic.Uint64 }

func (l *latencyHist) observe(d time.Duration) {
	us := uint64(max(d.Microseconds(), 0))
	l.b[min(bits.Len64(us), 31)].Add(1)
}

// quantile is the upper bound, in µs, of the bucket holding quantile q.
func (l *latencyHist) quantile(q float64) uint64 {
	var n [32]uint64
	var total uint64
	for i := range l.b {
		n[i] = l.b[i].Load()
		total += n[i]
	}
	if total == 0 {
		return 0
	}
	want := uint64(q*float64(total)) + 1
	var acc uint64
	for i, c := range n {
		acc += c
		if acc >= want {
			return 1 << i
		}
	}
	return 1 << 31
}

// CalloutInfo is one remote callout, for fwpctl callouts and /metrics.
type CalloutInfo struct {
	Key        string    `json:"key"`
	Registered bool      `json:"registered"`
	PID        uint32    `json:"pid,omitempty"`
	UID        uint32    `json:"uid,omitempty"`
	Exe        string    `json:"exe,omitempty"`
	Since      time.Time `json:"since,omitzero"`
	DeadlineUS int64     `json:"deadline_us,omitempty"`
	Calls      uint64    `json:"calls"`
	Pends      uint64    `json:"pends"`
	Held       int64     `json:"pends_held"`
	Timeouts   uint64    `json:"timeouts"`
	Errors     uint64    `json:"errors"`
	P50US      uint64    `json:"latency_p50_us"`
	P90US      uint64    `json:"latency_p90_us"`
	P99US      uint64    `json:"latency_p99_us"`
}

func (s *calloutStats) info(key string) CalloutInfo {
	return CalloutInfo{Key: key, Calls: s.calls.Load(), Pends: s.pends.Load(), Held: s.held.Load(), Timeouts: s.timeouts.Load(),
		Errors: s.errors.Load(), P50US: s.latency.quantile(0.5), P90US: s.latency.quantile(0.9), P99US: s.latency.quantile(0.99)}
}

// List returns the remote callouts, live ones and ones whose program went
// away, by key.
func (h *Callouts) List() []CalloutInfo {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []CalloutInfo
	for k, r := range h.regs {
		i := r.stats.info(k)
		i.Registered, i.PID, i.UID, i.Exe, i.Since, i.DeadlineUS = true, r.conn.cred.PID, r.conn.cred.UID, r.conn.exe, r.since, r.deadline.Microseconds()
		out = append(out, i)
	}
	for k, s := range h.gone {
		out = append(out, s.info(k))
	}
	slices.SortFunc(out, func(a, b CalloutInfo) int { return strings.Compare(a.Key, b.Key) })
	return out
}

func netipAddrPort(a netip.Addr, port uint64) netip.AddrPort {
	return netip.AddrPortFrom(a, uint16(port))
}
