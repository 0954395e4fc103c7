package client

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"fwp/engine"
	"fwp/internal/calloutwire"
	"fwp/mgmt"
)

// CalloutSocket is the callout socket of the daemon serving socket: callout
// programs register there, and clients classify through fwpd's engine.
func CalloutSocket(socket string) string { return socket + ".callouts" }

// ErrCalloutUnregistered is a RemoteCallout's Err once its connection is
// gone (fwpd stopped, closed it, or Close was called).
var ErrCalloutUnregistered = errors.New("fwp: remote callout unregistered")

// ErrMalformedFrame: a frame on the callout socket did not decode (fwpd
// closes a connection that sends one, saying so).
var ErrMalformedFrame = calloutwire.ErrMalformed

// CalloutOptions configure a remote callout registration.
type CalloutOptions struct {
	// Socket is fwpd's API socket (default SocketFromEnv()); the callout
	// socket is CalloutSocket(Socket).
	Socket string
	// Deadline bounds fwpd's wait for each answer (0: fwpd's default of a
	// second); a callout that misses it is treated as unregistered for
	// that classification (its filter's PERMIT_IF_CALLOUT_UNREGISTERED).
	Deadline time.Duration
	// Flags are the registration's flags (CalloutConditionalOnFlow).
	Flags engine.CalloutFlags
}

// RemoteCallout is a callout registered with fwpd from this process. fwpd's
// engine calls its functions for every filter that names its key, with the
// same request an embedded callout gets. Inside Classify, req.Engine() is
// this process's engine (Engine): the callout pends, acquires and applies
// layer data, completes, associates flow contexts and creates redirect
// handles on it exactly as it would embedded, and what it does is carried
// to fwpd's engine. Classify runs on the connection's reading goroutine:
// as in WFP, it must not block (pend instead), nor wait on fwpd (such as
// RedirectHandleCreate: create handles once registered); a blocked
// Classify misses its deadline.
type RemoteCallout struct {
	key    string
	reg    engine.CalloutRegistration
	mirror *engine.Engine
	conn   *frameConn

	nextPend                  atomic.Uint64
	mu                        sync.Mutex
	pends                     map[uint64]*engine.Pend
	fwpdPendTimeout, deadline time.Duration

	// The reading goroutine's: the call being answered, decoded in place.
	call calloutwire.Classify
	in   engine.Invocation
}

// RegisterCallout registers reg's functions with fwpd for the callout key,
// for as long as the returned RemoteCallout is open and this process
// lives. It needs the admin right (mgmt.ErrAccessDenied); a key another
// live process registered is engine.ErrAlreadyExists. The callout object
// (a policy's callout with this key) may be added before or after.
func RegisterCallout(ctx context.Context, key string, reg engine.CalloutRegistration, opts CalloutOptions) (*RemoteCallout, error) {
	if reg.Classify == nil || key == "" {
		return nil, fmt.Errorf("%w: a remote callout needs a key and a classify function", engine.ErrInvalidArgument)
	}
	if opts.Socket == "" {
		opts.Socket = SocketFromEnv()
	}
	rc := &RemoteCallout{key: key, reg: reg, pends: map[uint64]*engine.Pend{}}
	fc, err := dialFrames(ctx, CalloutSocket(opts.Socket))
	if err != nil {
		return nil, err
	}
	rc.conn = fc
	if err := fc.w.Send(calloutwire.Register{Key: key, DeadlineMicros: uint64(opts.Deadline.Microseconds()), Flags: opts.Flags}); err != nil {
		// fwpd may have refused the connection before reading it: its
		// reply says why.
		_ = fc.c.SetReadDeadline(time.Now().Add(time.Second))
		if m, rerr := fc.r.Next(); rerr == nil {
			if rep, ok := m.(calloutwire.Reply); ok && rep.Code != calloutwire.CodeOK {
				err = replyErr(rep)
			}
		}
		fc.close(err)
		return nil, fmt.Errorf("fwp: registering callout %q: %w", key, err)
	}
	// The reply comes before any other frame.
	stop := context.AfterFunc(ctx, func() { fc.c.SetReadDeadline(time.Unix(1, 0)) })
	m, err := fc.r.Next()
	if !stop() {
		err = ctx.Err()
	}
	_ = fc.c.SetReadDeadline(time.Time{})
	if err != nil {
		fc.close(err)
		return nil, fmt.Errorf("fwp: registering callout %q: %w", key, err)
	}
	switch m := m.(type) {
	case calloutwire.Registered:
		if m.Code != calloutwire.CodeOK {
			fc.close(ErrCalloutUnregistered)
			return nil, fmt.Errorf("fwp: registering callout %q: %w", key, replyErr(calloutwire.Reply(m)))
		}
		d := &decoder{b: m.Body}
		rc.fwpdPendTimeout = time.Duration(d.uv()) * time.Microsecond
		rc.deadline = time.Duration(d.uv()) * time.Microsecond
	case calloutwire.Reply: // refused: the connection is closing
		fc.close(ErrCalloutUnregistered)
		return nil, fmt.Errorf("fwp: registering callout %q: %w", key, replyErr(m))
	default:
		fc.close(ErrCalloutUnregistered)
		return nil, fmt.Errorf("fwp: registering callout %q: %w: fwpd sent a %s frame first", key, calloutwire.ErrMalformed, m.Type())
	}
	// This process's engine outlives fwpd's pends by a margin, so that a
	// pend always resolves in fwpd first and fwpd says so (PendDone).
	rc.mirror = engine.New(engine.Options{PendTimeout: rc.fwpdPendTimeout + 5*time.Second, FlowContextHook: rc.flowHook})
	go rc.loop()
	return rc, nil
}

// RegisterCallout is the package's RegisterCallout on this client's daemon.
func (c *Client) RegisterCallout(ctx context.Context, key string, reg engine.CalloutRegistration, opts CalloutOptions) (*RemoteCallout, error) {
	opts.Socket = c.socket
	return RegisterCallout(ctx, key, reg, opts)
}

// Key is the registered callout key.
func (rc *RemoteCallout) Key() string { return rc.key }

// Engine is this process's engine, the one req.Engine() returns inside
// Classify.
func (rc *RemoteCallout) Engine() *engine.Engine { return rc.mirror }

// Deadline is the answer deadline fwpd applies to this registration.
func (rc *RemoteCallout) Deadline() time.Duration { return rc.deadline }

// Done is closed when the registration ends; Err then says why.
func (rc *RemoteCallout) Done() <-chan struct{} { return rc.conn.done }

// Err is why the registration ended (nil while it lives).
func (rc *RemoteCallout) Err() error { return rc.conn.error() }

// Close unregisters the callout: fwpd resolves the pends it still holds by
// their filters' PERMIT_IF_CALLOUT_UNREGISTERED flag.
func (rc *RemoteCallout) Close() error {
	rc.conn.close(ErrCalloutUnregistered)
	<-rc.conn.done
	return nil
}

// RedirectHandleCreate creates a redirect handle in fwpd's engine for this
// callout's redirects (FwpsRedirectHandleCreate0); it is destroyed with the
// registration. Use it, not Engine().RedirectHandleCreate: the records fwpd
// writes, and RedirectState, compare fwpd's handles.
func (rc *RemoteCallout) RedirectHandleCreate(ctx context.Context) (engine.RedirectHandle, error) {
	rep, err := rc.conn.call(ctx, calloutwire.OpRedirectHandle, nil)
	if err != nil {
		return 0, err
	}
	d := &decoder{b: rep}
	h := engine.RedirectHandle(d.uv())
	if d.err != nil || h == 0 {
		return 0, fmt.Errorf("%w: redirect handle reply", calloutwire.ErrMalformed)
	}
	return h, nil
}

// heldMarker is the layer data a callout program sees: the held connection
// stays in fwpd; handing it back (CompleteOperation with it) reinjects it.
type heldMarker struct{}

func (rc *RemoteCallout) loop() {
	fc := rc.conn
	err := fc.readLoop(rc.frame, rc.classifyFrame)
	fc.close(err)
	// Nothing will complete the pends held here any more: fwpd resolved
	// them when the connection went.
	rc.mu.Lock()
	ps := rc.pends
	rc.pends = map[uint64]*engine.Pend{}
	rc.mu.Unlock()
	for _, p := range ps {
		p.Cancel()
	}
}

func (rc *RemoteCallout) frame(m calloutwire.Message) error {
	switch m := m.(type) {
	case calloutwire.Classify:
		return rc.classify(&m)
	case calloutwire.PendDone:
		rc.mu.Lock()
		p := rc.pends[m.PendID]
		delete(rc.pends, m.PendID)
		rc.mu.Unlock()
		if p != nil {
			p.Cancel()
		}
	case calloutwire.Notify:
		if rc.reg.Notify != nil {
			rc.reg.Notify(m.Kind, &m.Filter)
		}
	case calloutwire.FlowDelete:
		// The flow ended in fwpd: the context here goes, and the hook
		// calls FlowDelete.
		_ = rc.mirror.FlowRemoveContext(m.Flow, m.Layer, m.Callout)
	default:
		return fmt.Errorf("%w: fwpd sent a %s frame to a callout", calloutwire.ErrMalformed, m.Type())
	}
	return nil
}

// classifyFrame decodes a Classify frame into the connection's one
// Classify (the reading goroutine's: calls are answered in order, on it)
// and answers it, allocating nothing for a plain call.
func (rc *RemoteCallout) classifyFrame(b []byte) error {
	if err := calloutwire.DecodeClassify(b, &rc.call); err != nil {
		return err
	}
	return rc.classify(&rc.call)
}

func (rc *RemoteCallout) classify(c *calloutwire.Classify) error {
	rc.in = engine.Invocation{Layer: c.Layer, Values: *c.Values, Meta: *c.Meta, Filter: *c.Filter,
		ProviderContext: c.ProviderContext, Rights: c.Rights, Connect: c.Connect, Bind: c.Bind, LayerData: heldMarker{}}
	inv := rc.mirror.Invoke(&rc.reg, &rc.in)
	rc.in = engine.Invocation{}
	a := calloutwire.Answer{ID: c.ID, Out: inv.Out}
	if p := inv.Pend; p != nil {
		id := rc.nextPend.Add(1)
		a.PendID = id
		a.PendKind = calloutwire.PendOperation
		if p.IsClassify() {
			a.PendKind = calloutwire.PendClassify
		}
		rc.mu.Lock()
		rc.pends[id] = p
		rc.mu.Unlock()
		// The answer goes out before the watcher may send the completion:
		// a callout may complete before Classify even returns.
		err := rc.conn.w.SendAnswer(&a)
		go rc.watch(id, p)
		return err
	}
	a.Applied = calloutwire.Applied{Connect: inv.Connect, Bind: inv.Bind, ApplyFlags: inv.ApplyFlags}
	return rc.conn.w.SendAnswer(&a)
}

// watch carries a pend's completion to fwpd.
func (rc *RemoteCallout) watch(id uint64, p *engine.Pend) {
	<-p.Done()
	rc.mu.Lock()
	_, mine := rc.pends[id]
	delete(rc.pends, id)
	rc.mu.Unlock()
	if !mine || p.Outcome() != engine.PendCompleted {
		return // fwpd resolved it (PendDone), or it timed out here too
	}
	c := calloutwire.Complete{PendID: id}
	if p.IsClassify() {
		out, conn, bind, fl := p.Completed()
		c.Out, c.Applied = out, calloutwire.Applied{Connect: conn, Bind: bind, ApplyFlags: fl}
	} else {
		c.Reinject = p.Reinjected() != nil
	}
	_ = rc.conn.w.Send(c)
}

func (rc *RemoteCallout) flowHook(flow engine.FlowHandle, layer engine.LayerID, callout engine.CalloutID, ctx any, added bool) {
	_ = rc.conn.w.Send(calloutwire.FlowContext{Flow: flow, Layer: layer, Callout: callout, Add: added})
	if !added && rc.reg.FlowDelete != nil {
		rc.reg.FlowDelete(layer, callout, ctx)
	}
}

// ---- classify through fwpd ----

// Classifier classifies through fwpd's engine, which calls the callouts
// registered with it (embedded or remote), waits for their pends and
// reauthorizes, as a datapath does. It is how a program's own datapath
// (and the tests and examples) reach remote callouts; it needs the admin
// right. Safe for concurrent use.
type Classifier struct{ conn *frameConn }

// DialClassifier connects to the callout socket of the daemon serving
// socket ("" for SocketFromEnv()).
func DialClassifier(ctx context.Context, socket string) (*Classifier, error) {
	if socket == "" {
		socket = SocketFromEnv()
	}
	fc, err := dialFrames(ctx, CalloutSocket(socket))
	if err != nil {
		return nil, err
	}
	go func() {
		fc.close(fc.readLoop(func(m calloutwire.Message) error {
			return fmt.Errorf("%w: fwpd sent a %s frame to a classifier", calloutwire.ErrMalformed, m.Type())
		}, nil))
	}()
	return &Classifier{conn: fc}, nil
}

// ClassifyResult is a classification's outcome in fwpd.
type ClassifyResult struct {
	engine.ClassifyOut
	Filter  engine.FilterID
	Callout engine.CalloutID
	Reason  engine.Reason
	// Connect is the final connect request at CONNECT_REDIRECT when a
	// callout applied one (Bind at BIND_REDIRECT); Original the remote (or
	// local) address before; Records the flow's redirect records as the
	// opaque blob a proxy carries (proxy.SetRedirectRecords).
	Connect  *engine.ConnectRequest
	Bind     *engine.BindRequest
	Original netip.AddrPort
	Records  []byte
}

// Permitted reports whether the classification permitted.
func (r ClassifyResult) Permitted() bool { return r.Action == engine.ActionPermit }

// Classify classifies at layer. It waits for pends, up to fwpd's pend
// timeout.
func (c *Classifier) Classify(ctx context.Context, layer engine.LayerID, vs *engine.Values, meta *engine.Metadata) (ClassifyResult, error) {
	a := calloutwire.ClassifyArgs{Layer: layer, Values: *vs}
	if meta != nil {
		a.Meta = *meta
	}
	rep, err := c.conn.call(ctx, calloutwire.OpClassify, calloutwire.AppendClassifyArgs(nil, &a))
	if err != nil {
		return ClassifyResult{}, err
	}
	r, err := calloutwire.DecodeResult(rep)
	if err != nil {
		return ClassifyResult{}, err
	}
	return ClassifyResult{ClassifyOut: r.Out, Filter: r.Filter, Callout: r.Callout, Reason: r.Reason,
		Connect: r.Redirect, Bind: r.Bind, Original: r.Original, Records: r.Records}, nil
}

// CalloutInfo is a remote callout as fwpd reports it (fwpctl callouts).
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

// ListCallouts lists the remote callouts: who registered them (pid, exe,
// uid), calls, pends, timeouts, errors and answer latency percentiles.
func (c *Classifier) ListCallouts(ctx context.Context) ([]CalloutInfo, error) {
	rep, err := c.conn.call(ctx, calloutwire.OpList, nil)
	if err != nil {
		return nil, err
	}
	var out []CalloutInfo
	if err := json.Unmarshal(rep, &out); err != nil {
		return nil, fmt.Errorf("%w: callout list: %w", calloutwire.ErrMalformed, err)
	}
	return out, nil
}

// FlowDeleted tells fwpd's engine that a flow ended: every flow context of
// it is removed and its callout's FlowDelete called (remote ones too).
func (c *Classifier) FlowDeleted(ctx context.Context, flow engine.FlowHandle) error {
	_, err := c.conn.call(ctx, calloutwire.OpFlowDeleted, binary.AppendUvarint(nil, uint64(flow)))
	return err
}

// Outstanding is fwpd's engine's Outstanding: what its callout runtime
// holds (pends, classify handles, flow contexts, redirect handles).
func (c *Classifier) Outstanding(ctx context.Context) (engine.Outstanding, error) {
	rep, err := c.conn.call(ctx, calloutwire.OpOutstanding, nil)
	if err != nil {
		return engine.Outstanding{}, err
	}
	var o engine.Outstanding
	if err := json.Unmarshal(rep, &o); err != nil {
		return o, fmt.Errorf("%w: outstanding: %w", calloutwire.ErrMalformed, err)
	}
	return o, nil
}

// Close closes the connection.
func (c *Classifier) Close() error {
	c.conn.close(io.EOF)
	<-c.conn.done
	return nil
}

// ---- the connection ----

type frameConn struct {
	c      net.Conn
	r      *calloutwire.Reader
	w      *calloutwire.Writer
	nextID atomic.Uint64

	mu   sync.Mutex
	reqs map[uint64]chan calloutwire.Reply
	err  error
	done chan struct{}
	once sync.Once
}

func dialFrames(ctx context.Context, path string) (*frameConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("fwp: connecting to fwpd's callout socket %s (is fwpd running?): %w", path, err)
	}
	return &frameConn{c: c, r: calloutwire.NewReader(c), w: calloutwire.NewWriter(c), reqs: map[uint64]chan calloutwire.Reply{}, done: make(chan struct{})}, nil
}

func (fc *frameConn) error() error {
	select {
	case <-fc.done:
		fc.mu.Lock()
		defer fc.mu.Unlock()
		return fc.err
	default:
		return nil
	}
}

func (fc *frameConn) close(err error) {
	fc.once.Do(func() {
		if err == nil || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
			err = ErrCalloutUnregistered
		}
		fc.mu.Lock()
		fc.err = err
		reqs := fc.reqs
		fc.reqs = nil
		fc.mu.Unlock()
		fc.c.Close()
		for _, ch := range reqs {
			close(ch)
		}
		close(fc.done)
	})
}

// readLoop reads frames until the connection ends: replies go to their
// callers, Classify frames to classify undecoded (when set), the rest to
// other.
func (fc *frameConn) readLoop(other func(calloutwire.Message) error, classify func([]byte) error) error {
	for {
		b, err := fc.r.Frame()
		if err != nil {
			return err
		}
		if classify != nil && calloutwire.Type(b[0]) == calloutwire.TClassify {
			if err := classify(b); err != nil {
				return err
			}
			continue
		}
		m, err := calloutwire.Decode(b)
		if err != nil {
			return err
		}
		if rep, ok := m.(calloutwire.Reply); ok {
			if rep.ID == 0 { // fwpd closes the connection, saying why
				return fmt.Errorf("fwp: fwpd closed the callout connection: %w", replyErr(rep))
			}
			fc.mu.Lock()
			ch := fc.reqs[rep.ID]
			delete(fc.reqs, rep.ID)
			fc.mu.Unlock()
			if ch != nil {
				ch <- rep
			}
			continue
		}
		if err := other(m); err != nil {
			return err
		}
	}
}

func (fc *frameConn) call(ctx context.Context, op uint8, body []byte) ([]byte, error) {
	id := fc.nextID.Add(1)
	ch := make(chan calloutwire.Reply, 1)
	fc.mu.Lock()
	if fc.reqs == nil {
		err := fc.err
		fc.mu.Unlock()
		return nil, err
	}
	fc.reqs[id] = ch
	fc.mu.Unlock()
	if err := fc.w.Send(calloutwire.Request{ID: id, Op: op, Body: body}); err != nil {
		// fwpd may have refused the connection before reading it: the
		// reader then ends with its reason.
		select {
		case <-fc.done:
			return nil, fc.error()
		case <-time.After(time.Second):
		}
		fc.close(err)
		return nil, fmt.Errorf("%w: %w", ErrCalloutUnregistered, err)
	}
	select {
	case rep, ok := <-ch:
		if !ok { // closed by close, which sets err first
			<-fc.done
			return nil, fc.error()
		}
		if rep.Code != calloutwire.CodeOK {
			return nil, replyErr(rep)
		}
		return rep.Body, nil
	case <-ctx.Done():
		fc.mu.Lock()
		delete(fc.reqs, id)
		fc.mu.Unlock()
		return nil, ctx.Err()
	}
}

// replyErr maps a reply's code to the typed errors of engine and mgmt.
func replyErr(r calloutwire.Reply) error {
	var base error
	switch r.Code {
	case calloutwire.CodeAlreadyExists:
		base = engine.ErrAlreadyExists
	case calloutwire.CodeAccessDenied:
		base = mgmt.ErrAccessDenied
	case calloutwire.CodeInvalidArgument:
		base = engine.ErrInvalidArgument
	case calloutwire.CodeNotFound:
		base = engine.ErrNotFound
	case calloutwire.CodeMalformed:
		base = calloutwire.ErrMalformed
	default:
		base = ErrCalloutUnregistered
	}
	return fmt.Errorf("%w: %s", base, r.Msg)
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uv() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = calloutwire.ErrMalformed
		return 0
	}
	d.b = d.b[n:]
	return v
}
