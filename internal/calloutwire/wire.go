package calloutwire

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync"

	"fwp/engine"
)

// ErrMalformed is a frame that does not decode: truncated, too large, of an
// unknown type or with a field out of range. The connection that sent it is
// closed.
var ErrMalformed = errors.New("calloutwire: malformed frame")

// MaxFrame bounds a frame; a larger length closes the connection.
const MaxFrame = 1 << 20

// maxChain bounds a connect or bind request's PreviousVersion chain.
const maxChain = 32

// Type is a frame's type.
type Type uint8

// The frames. "c→d": from a callout program (or a classify client) to fwpd.
const (
	TRegister    Type = iota + 1 // c→d Register
	TRegistered                  // d→c Reply (ID 0): the registration's outcome
	TClassify                    // d→c Classify
	TAnswer                      // c→d Answer
	TComplete                    // c→d Complete
	TPendDone                    // d→c PendDone: fwpd resolved a pend itself
	TNotify                      // d→c Notify
	TFlowDelete                  // d→c FlowDelete
	TFlowContext                 // c→d FlowContext
	TRequest                     // c→d Request
	TReply                       // d→c Reply
	numTypes
)

// Ops of a Request.
const (
	OpRedirectHandle uint8 = iota + 1 // create a redirect handle in fwpd's engine; Reply.Body: uvarint handle
	OpList                            // the registrations; Reply.Body: JSON []Info
	OpClassify                        // classify through fwpd's engine; Body: ClassifyArgs, Reply.Body: Result
	OpFlowDeleted                     // a flow ended (Engine.FlowDeleted); Body: uvarint flow handle
	OpOutstanding                     // Engine.Outstanding; Reply.Body: JSON
)

// Reply codes.
const (
	CodeOK uint8 = iota
	CodeAlreadyExists
	CodeAccessDenied
	CodeInvalidArgument
	CodeNotFound
	CodeMalformed
	CodeUnavailable
	CodeInternal
)

// Register asks fwpd to call this connection for the callout key.
type Register struct {
	Key string
	// DeadlineMicros bounds each answer (0: fwpd's default).
	DeadlineMicros uint64
	Flags          engine.CalloutFlags
}

// Reply answers a Register (ID 0) or a Request.
type Reply struct {
	ID   uint64
	Code uint8
	Msg  string
	Body []byte
}

// Classify is one call of the callout by fwpd's engine.
type Classify struct {
	ID              uint64
	Layer           engine.LayerID
	Values          *engine.Values
	Meta            *engine.Metadata // nil: none
	Filter          *engine.Filter
	ProviderContext []byte
	Rights          engine.Rights
	Connect         *engine.ConnectRequest
	Bind            *engine.BindRequest
}

// Pend kinds of an Answer.
const (
	PendNone uint8 = iota
	PendOperation
	PendClassify
)

// Answer is the callout's answer to a Classify.
type Answer struct {
	ID       uint64
	Out      engine.ClassifyOut
	PendKind uint8
	PendID   uint64 // the program's name for the pend, for Complete
	Applied
}

// Applied is layer data a callout applied: a connect request's writable
// fields or a bind request's local address.
type Applied struct {
	Connect    *engine.ConnectRequest // only Remote, TargetPID, Handle, Context are read
	Bind       *engine.BindRequest
	ApplyFlags engine.ApplyFlags
}

// Complete completes a pend (CompleteOperation or CompleteClassify).
type Complete struct {
	PendID   uint64
	Out      engine.ClassifyOut // CompleteClassify's output
	Reinject bool               // CompleteOperation at AUTH_RECV_ACCEPT: deliver the held data
	Applied
}

// PendDone tells the program that fwpd resolved a pend without it (timed
// out, canceled, answer deadline), so it drops its side.
type PendDone struct{ PendID uint64 }

// Notify is a notifyFn call.
type Notify struct {
	Kind   engine.NotifyType
	Filter engine.Filter
}

// FlowDelete is a flowDeleteFn call.
type FlowDelete struct {
	Flow    engine.FlowHandle
	Layer   engine.LayerID
	Callout engine.CalloutID
}

// FlowContext says the program associated (Add) or removed a flow context.
type FlowContext struct {
	Flow    engine.FlowHandle
	Layer   engine.LayerID
	Callout engine.CalloutID
	Add     bool
}

// Request is a call with a Reply of the same ID.
type Request struct {
	ID   uint64
	Op   uint8
	Body []byte
}

// ClassifyArgs is an OpClassify body.
type ClassifyArgs struct {
	Layer  engine.LayerID
	Values engine.Values
	Meta   engine.Metadata
}

// Result is an OpClassify reply body.
type Result struct {
	Out      engine.ClassifyOut
	Filter   engine.FilterID
	Callout  engine.CalloutID
	Reason   engine.Reason
	Redirect *engine.ConnectRequest // the final connect request when redirected
	Original netip.AddrPort
	Records  []byte // authenticated by fwpd's engine
	Bind     *engine.BindRequest
}

// ---- frames ----

// Writer writes frames; concurrent senders' frames are coalesced into one
// write while another write is in progress (no goroutine, no timer: a
// lone frame goes out at once, a burst in few syscalls).
type Writer struct {
	w        io.Writer
	mu       sync.Mutex
	buf      []byte
	spare    []byte
	flushing bool
	err      error
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Send encodes m and writes it, with the frames of concurrent senders.
func (w *Writer) Send(m Message) error {
	w.mu.Lock()
	if w.err != nil {
		err := w.err
		w.mu.Unlock()
		return err
	}
	w.buf = AppendFrame(w.buf, m)
	return w.flushLocked()
}

// SendClassify is Send for the frame of every remote callout call, without
// boxing it in a Message (an allocation per call).
func (w *Writer) SendClassify(m *Classify) error {
	w.mu.Lock()
	if w.err != nil {
		err := w.err
		w.mu.Unlock()
		return err
	}
	at := len(w.buf)
	w.buf = append(w.buf, 0, 0, 0, 0, byte(TClassify))
	w.buf = m.appendTo(w.buf)
	binary.BigEndian.PutUint32(w.buf[at:], uint32(len(w.buf)-at-4))
	return w.flushLocked()
}

// SendAnswer is Send for the answer to a Classify, without boxing.
func (w *Writer) SendAnswer(m *Answer) error {
	w.mu.Lock()
	if w.err != nil {
		err := w.err
		w.mu.Unlock()
		return err
	}
	at := len(w.buf)
	w.buf = append(w.buf, 0, 0, 0, 0, byte(TAnswer))
	w.buf = m.appendTo(w.buf)
	binary.BigEndian.PutUint32(w.buf[at:], uint32(len(w.buf)-at-4))
	return w.flushLocked()
}

// flushLocked writes what is queued unless another sender is writing (it
// then writes this frame too); it unlocks w.mu.
func (w *Writer) flushLocked() error {
	if w.flushing {
		w.mu.Unlock()
		return nil
	}
	w.flushing = true
	for len(w.buf) > 0 && w.err == nil {
		b := w.buf
		w.buf = w.spare[:0]
		w.mu.Unlock()
		_, err := w.w.Write(b)
		w.mu.Lock()
		w.spare = b[:0]
		if err != nil {
			w.err = err
		}
	}
	w.flushing = false
	err := w.err
	w.mu.Unlock()
	return err
}

// WriteRaw writes bytes as they are (tests of malformed input).
func (w *Writer) WriteRaw(b []byte) error {
	_, err := w.w.Write(b)
	return err
}

// Message is a frame's content.
type Message interface {
	Type() Type
	appendTo(b []byte) []byte
}

func (Register) Type() Type    { return TRegister }
func (Classify) Type() Type    { return TClassify }
func (Answer) Type() Type      { return TAnswer }
func (Complete) Type() Type    { return TComplete }
func (PendDone) Type() Type    { return TPendDone }
func (Notify) Type() Type      { return TNotify }
func (FlowDelete) Type() Type  { return TFlowDelete }
func (FlowContext) Type() Type { return TFlowContext }
func (Request) Type() Type     { return TRequest }
func (Reply) Type() Type       { return TReply }

// Registered is the Reply to a Register.
type Registered Reply

func (Registered) Type() Type { return TRegistered }
func (r Registered) appendTo(b []byte) []byte {
	return Reply(r).appendTo(b)
}

// AppendFrame appends m's frame: a 4-byte big-endian length of what
// follows, the type byte, the body.
func AppendFrame(b []byte, m Message) []byte {
	at := len(b)
	b = append(b, 0, 0, 0, 0, byte(m.Type()))
	b = m.appendTo(b)
	binary.BigEndian.PutUint32(b[at:], uint32(len(b)-at-4))
	return b
}

// Reader reads frames.
type Reader struct {
	r   *bufio.Reader
	buf []byte
	hdr [4]byte // a field: on the stack it would escape through io.ReadFull
}

// NewReader returns a Reader on r.
func NewReader(r io.Reader) *Reader { return &Reader{r: bufio.NewReaderSize(r, 64<<10)} }

// Next reads one frame and decodes it. A clean end of stream is io.EOF;
// anything malformed wraps ErrMalformed.
func (r *Reader) Next() (Message, error) {
	b, err := r.Frame()
	if err != nil {
		return nil, err
	}
	return Decode(b)
}

// Frame reads one frame and returns its type byte and body, undecoded,
// valid until the next read: the frames of every call (Classify, Answer)
// are decoded from it in place (DecodeClassify, DecodeAnswer), the rest
// with Decode.
func (r *Reader) Frame() ([]byte, error) {
	if _, err := io.ReadFull(r.r, r.hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(r.hdr[:])
	if n == 0 || n > MaxFrame {
		return nil, fmt.Errorf("%w: frame length %d (1..%d)", ErrMalformed, n, MaxFrame)
	}
	if cap(r.buf) < int(n) {
		r.buf = make([]byte, n)
	}
	b := r.buf[:n]
	if _, err := io.ReadFull(r.r, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: truncated frame of %d bytes", ErrMalformed, n)
		}
		return nil, err
	}
	return b, nil
}

// DecodeAnswer decodes an Answer frame (type byte and body) into a.
func DecodeAnswer(b []byte, a *Answer) error {
	if len(b) == 0 || Type(b[0]) != TAnswer {
		return fmt.Errorf("%w: not an answer frame", ErrMalformed)
	}
	d := &dec{b: b[1:]}
	d.answer(a)
	return d.frameEnd(TAnswer)
}

// DecodeClassify decodes a Classify frame (type byte and body) into c,
// reusing c's Values, Meta and Filter (allocated when nil), and the
// strings and bytes of the previous call that are equal in this one (the
// filter's key, the application...): a callout program that decodes every
// call into one Classify allocates nothing for the common call. What c
// held before is overwritten; strings and byte slices handed out earlier
// stay valid (they are never written to).
func DecodeClassify(b []byte, c *Classify) error {
	if len(b) == 0 || Type(b[0]) != TClassify {
		return fmt.Errorf("%w: not a classify frame", ErrMalformed)
	}
	if c.Values == nil {
		c.Values = new(engine.Values)
	}
	if c.Meta == nil {
		c.Meta = new(engine.Metadata)
	}
	if c.Filter == nil {
		c.Filter = new(engine.Filter)
	}
	d := &dec{b: b[1:], reuse: true}
	d.classify(c)
	return d.frameEnd(TClassify)
}

func (d *dec) frameEnd(t Type) error {
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d trailing bytes", len(d.b))
	}
	if d.err != nil {
		return fmt.Errorf("%w: %s frame: %w", ErrMalformed, t, d.err)
	}
	return nil
}

func (d *dec) classify(c *Classify) {
	c.ID = d.uv()
	c.Layer = d.layer()
	d.values(c.Values)
	d.meta(c.Meta)
	d.filter(c.Filter)
	c.ProviderContext = d.bytesLike(c.ProviderContext)
	c.Rights = engine.Rights(d.u32())
	c.Connect = d.connectChain()
	c.Bind = d.bindChain()
}

func (d *dec) answer(a *Answer) {
	a.ID = d.uv()
	a.Out = d.out()
	a.PendKind = d.u8()
	if a.PendKind > PendClassify {
		d.fail("pend kind %d", a.PendKind)
	}
	a.PendID = d.uv()
	a.Applied = d.applied()
}

// Decode decodes one frame's type byte and body.
func Decode(b []byte) (Message, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: empty frame", ErrMalformed)
	}
	d := &dec{b: b[1:]}
	var m Message
	switch Type(b[0]) {
	case TRegister:
		m = Register{Key: d.str(), DeadlineMicros: d.uv(), Flags: engine.CalloutFlags(d.u32())}
	case TRegistered:
		m = Registered(d.reply())
	case TReply:
		m = d.reply()
	case TClassify:
		var c Classify
		c.Values, c.Meta, c.Filter = new(engine.Values), new(engine.Metadata), new(engine.Filter)
		d.classify(&c)
		m = c
	case TAnswer:
		var a Answer
		d.answer(&a)
		m = a
	case TComplete:
		var c Complete
		c.PendID = d.uv()
		c.Out = d.out()
		c.Reinject = d.bool()
		c.Applied = d.applied()
		m = c
	case TPendDone:
		m = PendDone{PendID: d.uv()}
	case TNotify:
		var n Notify
		n.Kind = engine.NotifyType(d.u8())
		d.filter(&n.Filter)
		m = n
	case TFlowDelete:
		m = FlowDelete{Flow: engine.FlowHandle(d.uv()), Layer: d.layer(), Callout: engine.CalloutID(d.u32())}
	case TFlowContext:
		m = FlowContext{Flow: engine.FlowHandle(d.uv()), Layer: d.layer(), Callout: engine.CalloutID(d.u32()), Add: d.bool()}
	case TRequest:
		m = Request{ID: d.uv(), Op: d.u8(), Body: d.bytes()}
	default:
		return nil, fmt.Errorf("%w: unknown frame type %d", ErrMalformed, b[0])
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d trailing bytes", len(d.b))
	}
	if d.err != nil {
		return nil, fmt.Errorf("%w: %s frame: %w", ErrMalformed, Type(b[0]), d.err)
	}
	return m, nil
}

func (t Type) String() string {
	names := [...]string{"", "register", "registered", "classify", "answer", "complete", "pend_done", "notify", "flow_delete", "flow_context", "request", "reply"}
	if t > 0 && t < numTypes {
		return names[t]
	}
	return fmt.Sprintf("type#%d", uint8(t))
}

func (m Register) appendTo(b []byte) []byte {
	b = appendStr(b, m.Key)
	b = binary.AppendUvarint(b, m.DeadlineMicros)
	return binary.AppendUvarint(b, uint64(m.Flags))
}

func (m Reply) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.ID)
	b = append(b, m.Code)
	b = appendStr(b, m.Msg)
	return appendBytes(b, m.Body)
}

func (m Classify) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.ID)
	b = binary.AppendUvarint(b, uint64(m.Layer))
	b = AppendValues(b, m.Values)
	b = AppendMeta(b, m.Meta)
	b = appendFilter(b, m.Filter)
	b = appendBytes(b, m.ProviderContext)
	b = binary.AppendUvarint(b, uint64(m.Rights))
	b = appendConnectChain(b, m.Connect)
	return appendBindChain(b, m.Bind)
}

func (m Answer) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.ID)
	b = appendOut(b, m.Out)
	b = append(b, m.PendKind)
	b = binary.AppendUvarint(b, m.PendID)
	return m.Applied.appendTo(b)
}

func (m Complete) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.PendID)
	b = appendOut(b, m.Out)
	b = appendBool(b, m.Reinject)
	return m.Applied.appendTo(b)
}

func (m PendDone) appendTo(b []byte) []byte { return binary.AppendUvarint(b, m.PendID) }

func (m Notify) appendTo(b []byte) []byte {
	b = append(b, byte(m.Kind))
	return appendFilter(b, &m.Filter)
}

func (m FlowDelete) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, uint64(m.Flow))
	b = binary.AppendUvarint(b, uint64(m.Layer))
	return binary.AppendUvarint(b, uint64(m.Callout))
}

func (m FlowContext) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, uint64(m.Flow))
	b = binary.AppendUvarint(b, uint64(m.Layer))
	b = binary.AppendUvarint(b, uint64(m.Callout))
	return appendBool(b, m.Add)
}

func (m Request) appendTo(b []byte) []byte {
	b = binary.AppendUvarint(b, m.ID)
	b = append(b, m.Op)
	return appendBytes(b, m.Body)
}

func (a Applied) appendTo(b []byte) []byte {
	switch {
	case a.Connect != nil:
		c := a.Connect
		b = append(b, 1)
		b = appendAddrPort(b, c.RemoteAddressAndPort)
		b = binary.AppendUvarint(b, uint64(c.LocalRedirectTargetPID))
		b = binary.AppendUvarint(b, uint64(c.LocalRedirectHandle))
		b = appendBytes(b, c.LocalRedirectContext)
	case a.Bind != nil:
		b = append(b, 2)
		b = appendAddrPort(b, a.Bind.LocalAddressAndPort)
	default:
		b = append(b, 0)
	}
	return binary.AppendUvarint(b, uint64(a.ApplyFlags))
}

func (d *dec) applied() Applied {
	var a Applied
	switch d.u8() {
	case 0:
	case 1:
		c := &engine.ConnectRequest{}
		c.RemoteAddressAndPort = d.addrPort()
		c.LocalRedirectTargetPID = d.u32()
		c.LocalRedirectHandle = engine.RedirectHandle(d.uv())
		c.LocalRedirectContext = d.bytes()
		if len(c.LocalRedirectContext) > engine.MaxRedirectContext {
			d.fail("redirect context of %d bytes", len(c.LocalRedirectContext))
		}
		a.Connect = c
	case 2:
		a.Bind = &engine.BindRequest{LocalAddressAndPort: d.addrPort()}
	default:
		d.fail("applied kind")
	}
	a.ApplyFlags = engine.ApplyFlags(d.u32())
	return a
}

// AppendClassifyArgs encodes an OpClassify body.
func AppendClassifyArgs(b []byte, a *ClassifyArgs) []byte {
	b = binary.AppendUvarint(b, uint64(a.Layer))
	b = AppendValues(b, &a.Values)
	return AppendMeta(b, &a.Meta)
}

// DecodeClassifyArgs decodes an OpClassify body.
func DecodeClassifyArgs(b []byte) (ClassifyArgs, error) {
	d := &dec{b: b}
	var a ClassifyArgs
	a.Layer = d.layer()
	d.values(&a.Values)
	d.meta(&a.Meta)
	return a, d.end()
}

// AppendResult encodes an OpClassify reply body.
func AppendResult(b []byte, r *Result) []byte {
	b = appendOut(b, r.Out)
	b = binary.AppendUvarint(b, uint64(r.Filter))
	b = binary.AppendUvarint(b, uint64(r.Callout))
	b = append(b, byte(r.Reason))
	b = appendConnectChain(b, r.Redirect)
	b = appendAddrPort(b, r.Original)
	b = appendBytes(b, r.Records)
	return appendBindChain(b, r.Bind)
}

// DecodeResult decodes an OpClassify reply body.
func DecodeResult(b []byte) (Result, error) {
	d := &dec{b: b}
	var r Result
	r.Out = d.out()
	r.Filter = engine.FilterID(d.uv())
	r.Callout = engine.CalloutID(d.u32())
	r.Reason = engine.Reason(d.u8())
	r.Redirect = d.connectChain()
	r.Original = d.addrPort()
	r.Records = d.bytes()
	r.Bind = d.bindChain()
	return r, d.end()
}

func (d *dec) end() error {
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d trailing bytes", len(d.b))
	}
	if d.err != nil {
		return fmt.Errorf("%w: %w", ErrMalformed, d.err)
	}
	return nil
}

// ---- primitives ----

func appendStr(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendBytes(b, s []byte) []byte {
	if s == nil {
		return append(b, 0)
	}
	b = binary.AppendUvarint(b, uint64(len(s))+1)
	return append(b, s...)
}

func appendBool(b []byte, v bool) []byte {
	if v {
		return append(b, 1)
	}
	return append(b, 0)
}

func appendOut(b []byte, o engine.ClassifyOut) []byte {
	b = append(b, byte(o.Action))
	b = binary.AppendUvarint(b, uint64(o.Rights))
	return binary.AppendUvarint(b, uint64(o.Flags))
}

func appendAddrPort(b []byte, ap netip.AddrPort) []byte {
	switch a := ap.Addr(); {
	case !a.IsValid():
		return append(b, 0)
	case a.Is4():
		b = append(b, 4)
		s := a.As4()
		b = append(b, s[:]...)
	default:
		b = append(b, 6)
		s := a.As16()
		b = append(b, s[:]...)
	}
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

func appendAddr(b []byte, a netip.Addr) []byte {
	switch {
	case !a.IsValid():
		return append(b, 0)
	case a.Is4():
		s := a.As4()
		return append(append(b, 4), s[:]...)
	}
	s := a.As16()
	return append(append(b, 6), s[:]...)
}

// AppendValues encodes the set fields: a count, then field, type, value.
func AppendValues(b []byte, vs *engine.Values) []byte {
	at := len(b)
	b = append(b, 0)
	n := 0
	for f := engine.FieldID(1); int(f) <= engine.NumFields; f++ {
		v := vs.Get(f)
		if v.IsEmpty() {
			continue
		}
		n++
		b = append(b, byte(f), byte(v.Type()))
		switch v.Type() {
		case engine.TypeUint8, engine.TypeUint16, engine.TypeUint32, engine.TypeUint64:
			b = binary.AppendUvarint(b, v.Uint())
		case engine.TypeAddr:
			b = appendAddr(b, v.Addr())
		default: // strings and blobs
			b = appendStr(b, v.Str())
		}
	}
	b[at] = byte(n)
	return b
}

// AppendMeta encodes the metadata present (the completion handle is
// never sent: it is only valid in the classifying process).
func AppendMeta(b []byte, m *engine.Metadata) []byte {
	if m == nil {
		return append(b, 0)
	}
	p := m.Present &^ engine.MetaCompletionHandle
	b = binary.AppendUvarint(b, uint64(p))
	if p == 0 {
		return b
	}
	b = binary.AppendUvarint(b, uint64(m.ProcessID))
	b = appendStr(b, m.ProcessPath)
	b = binary.AppendUvarint(b, uint64(m.UserID))
	b = binary.AppendUvarint(b, uint64(m.GroupID))
	b = binary.AppendUvarint(b, uint64(m.FlowHandle))
	b = binary.AppendUvarint(b, uint64(m.Direction))
	b = binary.AppendUvarint(b, m.TransportEndpointHandle)
	b = appendAddrPort(b, m.OriginalDestination)
	b = binary.AppendUvarint(b, uint64(m.LocalRedirectTargetPID))
	recs := m.RedirectRecords.Records()
	b = append(b, byte(len(recs)))
	for _, r := range recs {
		b = binary.AppendUvarint(b, uint64(r.Handle))
		b = binary.AppendUvarint(b, uint64(r.Callout))
		b = binary.AppendUvarint(b, uint64(r.Filter))
		b = binary.AppendUvarint(b, uint64(r.TargetPID))
		b = appendAddrPort(b, r.Original)
		b = appendAddrPort(b, r.Redirected)
	}
	b = binary.AppendUvarint(b, uint64(m.SourceInterfaceIndex))
	b = binary.AppendUvarint(b, uint64(m.DestinationInterfaceIndex))
	b = binary.AppendUvarint(b, m.CompartmentID)
	b = binary.AppendUvarint(b, m.ParentEndpointHandle)
	b = binary.AppendUvarint(b, m.CgroupID)
	return appendBytes(b, m.RedirectContext)
}

func appendFilter(b []byte, f *engine.Filter) []byte {
	b = binary.AppendUvarint(b, uint64(f.ID))
	b = appendStr(b, f.Key)
	b = appendStr(b, f.Name)
	b = binary.AppendUvarint(b, uint64(f.Layer))
	b = binary.AppendUvarint(b, uint64(f.Sublayer))
	b = binary.AppendUvarint(b, uint64(f.Provider))
	b = binary.AppendUvarint(b, f.EffectiveWeight)
	b = append(b, byte(f.Action.Type))
	b = binary.AppendUvarint(b, uint64(f.Action.Callout))
	b = binary.AppendUvarint(b, uint64(f.ProviderContext))
	return binary.AppendUvarint(b, uint64(f.Flags))
}

func appendConnectChain(b []byte, c *engine.ConnectRequest) []byte {
	var chain []*engine.ConnectRequest
	for v := c; v != nil && len(chain) < maxChain; v = v.PreviousVersion {
		chain = append(chain, v)
	}
	b = append(b, byte(len(chain)))
	for _, v := range chain {
		b = appendAddrPort(b, v.LocalAddressAndPort)
		b = appendAddrPort(b, v.RemoteAddressAndPort)
		b = binary.AppendUvarint(b, uint64(v.LocalRedirectTargetPID))
		b = binary.AppendUvarint(b, uint64(v.LocalRedirectHandle))
		b = appendBytes(b, v.LocalRedirectContext)
		b = binary.AppendUvarint(b, uint64(v.ModifierFilterID))
	}
	return b
}

func appendBindChain(b []byte, c *engine.BindRequest) []byte {
	var chain []*engine.BindRequest
	for v := c; v != nil && len(chain) < maxChain; v = v.PreviousVersion {
		chain = append(chain, v)
	}
	b = append(b, byte(len(chain)))
	for _, v := range chain {
		b = appendAddrPort(b, v.LocalAddressAndPort)
		b = binary.AppendUvarint(b, uint64(v.ModifierFilterID))
	}
	return b
}

type dec struct {
	b   []byte
	err error
	// reuse: strings and bytes equal to the ones being overwritten are
	// kept rather than allocated again (DecodeClassify).
	reuse bool
}

// strLike is str, returning old when it has the same bytes.
func (d *dec) strLike(old string) string {
	b := d.take(d.uv())
	if d.reuse && string(b) == old { // compared without a copy
		return old
	}
	return string(b)
}

// bytesLike is bytes, returning old when it has the same bytes.
func (d *dec) bytesLike(old []byte) []byte {
	n := d.uv()
	if n == 0 {
		return nil
	}
	b := d.take(n - 1)
	if d.reuse && old != nil && string(b) == string(old) {
		return old
	}
	return append([]byte{}, b...)
}

func (d *dec) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf(format, args...)
	}
	d.b = nil
}

func (d *dec) u8() uint8 {
	if len(d.b) < 1 {
		d.fail("truncated")
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *dec) bool() bool {
	switch d.u8() {
	case 0:
		return false
	case 1:
		return true
	}
	d.fail("bad bool")
	return false
}

func (d *dec) uv() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("truncated or overlong varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *dec) u32() uint32 {
	v := d.uv()
	if v > 1<<32-1 {
		d.fail("%d overflows 32 bits", v)
		return 0
	}
	return uint32(v)
}

func (d *dec) take(n uint64) []byte {
	if n > uint64(len(d.b)) {
		d.fail("truncated: %d bytes wanted, %d left", n, len(d.b))
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *dec) str() string { return string(d.take(d.uv())) }

func (d *dec) bytes() []byte {
	n := d.uv()
	if n == 0 {
		return nil
	}
	return append([]byte{}, d.take(n-1)...)
}

func (d *dec) layer() engine.LayerID {
	v := d.uv()
	l := engine.LayerID(v)
	if v > uint64(engine.NumLayers) || (v != 0 && !l.Valid()) {
		d.fail("layer %d", v)
		return 0
	}
	return l
}

func (d *dec) out() engine.ClassifyOut {
	a := engine.ActionType(d.u8())
	if a > engine.ActionContinue {
		d.fail("action %d", a)
	}
	return engine.ClassifyOut{Action: a, Rights: engine.Rights(d.u32()), Flags: engine.OutFlags(d.u32())}
}

func (d *dec) addr() netip.Addr {
	switch d.u8() {
	case 0:
		return netip.Addr{}
	case 4:
		b := d.take(4)
		if b == nil {
			return netip.Addr{}
		}
		return netip.AddrFrom4([4]byte(b))
	case 6:
		b := d.take(16)
		if b == nil {
			return netip.Addr{}
		}
		return netip.AddrFrom16([16]byte(b))
	}
	d.fail("address family")
	return netip.Addr{}
}

func (d *dec) addrPort() netip.AddrPort {
	a := d.addr()
	if !a.IsValid() { // no port follows
		return netip.AddrPort{}
	}
	p := d.take(2)
	if p == nil || !a.IsValid() {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(a, binary.BigEndian.Uint16(p))
}

func (d *dec) values(vs *engine.Values) {
	var old engine.Values
	if d.reuse {
		old = *vs
		*vs = engine.Values{}
	}
	n := int(d.u8())
	for range n {
		f := engine.FieldID(d.u8())
		t := engine.Type(d.u8())
		if f == 0 || int(f) > engine.NumFields || f.Type() != t {
			d.fail("field %d of type %d", f, t)
			return
		}
		var v engine.Value
		switch t {
		case engine.TypeUint8, engine.TypeUint16, engine.TypeUint32, engine.TypeUint64:
			v = engine.Uint64(d.uv())
		case engine.TypeAddr:
			v = engine.Addr(d.addr())
		case engine.TypeString:
			v = engine.String(d.strLike(old.Get(f).Str()))
		case engine.TypeBytes:
			if o := old.Get(f); d.reuse && o.Type() == engine.TypeBytes {
				v = o
				if b := d.take(d.uv()); string(b) != o.Str() {
					v = engine.Bytes(b)
				}
			} else {
				v = engine.Bytes(d.take(d.uv()))
			}
		default:
			d.fail("field %s of type %s", f, t)
			return
		}
		if d.err != nil {
			return
		}
		vs.Set(f, v)
		if vs.Get(f).IsEmpty() {
			d.fail("field %s: value out of range", f)
			return
		}
	}
}

func (d *dec) meta(m *engine.Metadata) {
	var old engine.Metadata
	if d.reuse {
		old = *m
	}
	*m = engine.Metadata{Present: engine.MetaField(d.u32()) &^ engine.MetaCompletionHandle}
	if m.Present == 0 {
		return
	}
	m.ProcessID = d.u32()
	m.ProcessPath = d.strLike(old.ProcessPath)
	m.UserID = d.u32()
	m.GroupID = d.u32()
	m.FlowHandle = engine.FlowHandle(d.uv())
	m.Direction = engine.Direction(d.u32())
	m.TransportEndpointHandle = d.uv()
	m.OriginalDestination = d.addrPort()
	m.LocalRedirectTargetPID = d.u32()
	n := d.u8()
	if n > engine.MaxRedirectRecords {
		d.fail("%d redirect records", n)
		return
	}
	if n > 0 {
		recs := make([]engine.RedirectRecord, n)
		for i := range recs {
			recs[i] = engine.RedirectRecord{Handle: engine.RedirectHandle(d.uv()), Callout: engine.CalloutID(d.u32()),
				Filter: engine.FilterID(d.uv()), TargetPID: d.u32(), Original: d.addrPort(), Redirected: d.addrPort()}
		}
		m.RedirectRecords = engine.NewRedirectRecords(recs...)
	}
	m.SourceInterfaceIndex = d.u32()
	m.DestinationInterfaceIndex = d.u32()
	m.CompartmentID = d.uv()
	m.ParentEndpointHandle = d.uv()
	m.CgroupID = d.uv()
	m.RedirectContext = d.bytesLike(old.RedirectContext)
}

func (d *dec) filter(f *engine.Filter) {
	f.ID = engine.FilterID(d.uv())
	f.Key = d.strLike(f.Key)
	f.Name = d.strLike(f.Name)
	f.Layer = d.layer()
	f.Sublayer = engine.SublayerID(d.u32())
	f.Provider = engine.ProviderID(d.u32())
	f.EffectiveWeight = d.uv()
	f.Action.Type = engine.ActionType(d.u8())
	f.Action.Callout = engine.CalloutID(d.u32())
	f.ProviderContext = engine.ProviderContextID(d.uv())
	f.Flags = engine.FilterFlags(d.u32())
}

func (d *dec) connectChain() *engine.ConnectRequest {
	n := int(d.u8())
	if n > maxChain {
		d.fail("chain of %d versions", n)
		return nil
	}
	var head, prev *engine.ConnectRequest
	for range n {
		v := &engine.ConnectRequest{LocalAddressAndPort: d.addrPort(), RemoteAddressAndPort: d.addrPort(),
			LocalRedirectTargetPID: d.u32(), LocalRedirectHandle: engine.RedirectHandle(d.uv()),
			LocalRedirectContext: d.bytes(), ModifierFilterID: engine.FilterID(d.uv())}
		if d.err != nil {
			return nil
		}
		if head == nil {
			head = v
		} else {
			prev.PreviousVersion = v
		}
		prev = v
	}
	return head
}

func (d *dec) bindChain() *engine.BindRequest {
	n := int(d.u8())
	if n > maxChain {
		d.fail("chain of %d versions", n)
		return nil
	}
	var head, prev *engine.BindRequest
	for range n {
		v := &engine.BindRequest{LocalAddressAndPort: d.addrPort(), ModifierFilterID: engine.FilterID(d.uv())}
		if d.err != nil {
			return nil
		}
		if head == nil {
			head = v
		} else {
			prev.PreviousVersion = v
		}
		prev = v
	}
	return head
}

func (d *dec) reply() Reply {
	return Reply{ID: d.uv(), Code: d.u8(), Msg: d.str(), Body: d.bytes()}
}
