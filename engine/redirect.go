package engine

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"sync"
)

// RedirectHandle identifies a redirecting callout in redirect records
// (FwpsRedirectHandleCreate0). A callout creates one and uses it for all
// its redirects.
type RedirectHandle uint64

// RedirectHandleCreate creates a redirect handle for a provider.
func (e *Engine) RedirectHandleCreate(provider string) RedirectHandle {
	h := RedirectHandle(e.rt.nextRedir.Add(1))
	e.rt.redirectsMu.Lock()
	e.rt.redirects[h] = provider
	e.rt.redirectsMu.Unlock()
	return h
}

func (e *Engine) redirectHandleLive(h RedirectHandle) bool {
	e.rt.redirectsMu.Lock()
	_, ok := e.rt.redirects[h]
	e.rt.redirectsMu.Unlock()
	return ok
}

// RedirectHandleDestroy destroys a redirect handle (FwpsRedirectHandleDestroy0).
// Later applies that name it are refused; records issued with it stay
// valid (they are authenticated by the engine, not by the handle).
func (e *Engine) RedirectHandleDestroy(h RedirectHandle) error {
	e.rt.redirectsMu.Lock()
	defer e.rt.redirectsMu.Unlock()
	if _, ok := e.rt.redirects[h]; !ok {
		return fmt.Errorf("%w: redirect handle %d", ErrNotFound, h)
	}
	delete(e.rt.redirects, h)
	return nil
}

// ConnectRequest is the writable layer data of CONNECT_REDIRECT
// (FWPS_CONNECT_REQUEST0). PreviousVersion chains the versions applied
// before, each with the filter that applied it.
type ConnectRequest struct {
	LocalAddressAndPort    netip.AddrPort // read-only: only the bind layer changes it
	RemoteAddressAndPort   netip.AddrPort
	LocalRedirectTargetPID uint32
	LocalRedirectHandle    RedirectHandle
	LocalRedirectContext   []byte
	PreviousVersion        *ConnectRequest
	ModifierFilterID       FilterID // 0 for the datapath's original version
}

// BindRequest is the writable layer data of BIND_REDIRECT (FWPS_BIND_REQUEST0).
type BindRequest struct {
	LocalAddressAndPort netip.AddrPort
	PreviousVersion     *BindRequest
	ModifierFilterID    FilterID
}

// ApplyFlags are ApplyModifiedLayerData's flags.
type ApplyFlags uint32

// ApplyReauthorizeIfModifiedByOthers: classify again if a later callout
// modifies the data after this one (FWPS_CLASSIFY_FLAG_REAUTHORIZE_IF_MODIFIED_BY_OTHERS).
const ApplyReauthorizeIfModifiedByOthers ApplyFlags = 1

// MaxRedirectContext bounds a redirect context.
const MaxRedirectContext = 4096

// redirectState is the writable layer data of one flow at a redirect layer,
// shared by the classify, its handles and its pend.
type redirectState struct {
	mu        sync.Mutex
	layer     LayerID
	connect   *ConnectRequest
	bind      *BindRequest
	original  netip.AddrPort
	modified  bool
	records   []RedirectRecord // the flow's records, then this classify's
	reauthBy  []FilterID       // filters that asked to be reauthorized
	reauth    bool             // a pass is due: read and written under mu
	lastBy    FilterID
	handles   []*classifyHandle
	passCount int // reauthorization passes run so far
	// foreignHandles: the classifying engine is another (Invoke, a
	// remote callout's process): redirect handles are its, and it
	// validates them when it replays the apply.
	foreignHandles bool
}

func (cs *classifyState) redirect() *redirectState {
	if cs.rd != nil {
		return cs.rd
	}
	rd := &redirectState{layer: cs.layer}
	vs := cs.vs
	local := addrPort(vs.v[FieldIPLocalAddress], vs.v[FieldIPLocalPort])
	switch LayerByID(cs.layer).Writable {
	case WritableConnectRequest:
		remote := addrPort(vs.v[FieldIPRemoteAddress], vs.v[FieldIPRemotePort])
		rd.connect = &ConnectRequest{LocalAddressAndPort: local, RemoteAddressAndPort: remote}
		rd.original = remote
	case WritableBindRequest:
		rd.bind = &BindRequest{LocalAddressAndPort: local}
		rd.original = local
	}
	if cs.meta.Has(MetaRedirectRecords) && cs.meta.RedirectRecords != nil {
		rd.records = slices.Clone(cs.meta.RedirectRecords.recs)
	}
	cs.rd = rd
	return rd
}

func (rd *redirectState) releaseHandles() {
	rd.mu.Lock()
	hs := rd.handles
	rd.mu.Unlock()
	for _, h := range hs {
		h.e.ReleaseClassifyHandle(ClassifyHandle{h})
	}
}

func addrPort(a, p Value) netip.AddrPort {
	if a.t != TypeAddr {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(a.ip, uint16(p.n))
}

// AcquireConnectRequest returns a writable copy of the current connect
// request, its PreviousVersion the current one
// (FwpsAcquireWritableLayerDataPointer0 at CONNECT_REDIRECT).
func (e *Engine) AcquireConnectRequest(h ClassifyHandle) (*ConnectRequest, error) {
	ch, err := h.check(e)
	if err != nil {
		return nil, err
	}
	ch.rd.mu.Lock()
	defer ch.rd.mu.Unlock()
	if ch.rd.connect == nil {
		return nil, fmt.Errorf("%w: layer %s has no connect request", ErrInvalidLayerData, ch.layer)
	}
	cur := ch.rd.connect
	w := *cur
	w.LocalRedirectContext = slices.Clone(cur.LocalRedirectContext)
	w.PreviousVersion = cur
	return &w, nil
}

// AcquireBindRequest is AcquireConnectRequest for BIND_REDIRECT.
func (e *Engine) AcquireBindRequest(h ClassifyHandle) (*BindRequest, error) {
	ch, err := h.check(e)
	if err != nil {
		return nil, err
	}
	ch.rd.mu.Lock()
	defer ch.rd.mu.Unlock()
	if ch.rd.bind == nil {
		return nil, fmt.Errorf("%w: layer %s has no bind request", ErrInvalidLayerData, ch.layer)
	}
	w := *ch.rd.bind
	w.PreviousVersion = ch.rd.bind
	return &w, nil
}

// ApplyConnectRequest applies a modified connect request
// (FwpsApplyModifiedLayerData0). The local address and port may not change
// here. A changed remote appends a redirect record to the flow's records;
// it, or a changed LocalRedirectHandle, needs a handle from
// RedirectHandleCreate not yet destroyed (else ErrInvalidParameter, and
// nothing is applied).
func (e *Engine) ApplyConnectRequest(h ClassifyHandle, w *ConnectRequest, flags ApplyFlags) error {
	ch, err := h.check(e)
	if err != nil {
		return err
	}
	rd := ch.rd
	rd.mu.Lock()
	defer rd.mu.Unlock()
	if rd.connect == nil || w == nil {
		return fmt.Errorf("%w: no connect request at %s", ErrInvalidLayerData, ch.layer)
	}
	cur := rd.connect
	w.RemoteAddressAndPort = netip.AddrPortFrom(w.RemoteAddressAndPort.Addr().Unmap(), w.RemoteAddressAndPort.Port())
	if w.LocalAddressAndPort != cur.LocalAddressAndPort {
		return fmt.Errorf("%w: only the bind redirect layer may change the local address and port", ErrInvalidLayerData)
	}
	if !w.RemoteAddressAndPort.IsValid() || w.RemoteAddressAndPort.Addr().Unmap().Is4() != cur.RemoteAddressAndPort.Addr().Unmap().Is4() {
		return fmt.Errorf("%w: remote %s is not a valid address of the flow's family", ErrInvalidLayerData, w.RemoteAddressAndPort)
	}
	if len(w.LocalRedirectContext) > MaxRedirectContext {
		return fmt.Errorf("%w: redirect context of %d bytes exceeds %d", ErrInvalidLayerData, len(w.LocalRedirectContext), MaxRedirectContext)
	}
	if (w.RemoteAddressAndPort != cur.RemoteAddressAndPort || w.LocalRedirectHandle != cur.LocalRedirectHandle) &&
		!rd.foreignHandles && !e.redirectHandleLive(w.LocalRedirectHandle) {
		// Seed 001 step 5.4: a redirect carries the handle
		// FwpsRedirectHandleCreate0 returned; it names the callout in the
		// flow's records, which is what keeps chained proxies from looping.
		return fmt.Errorf("%w: redirect handle %d was not created by RedirectHandleCreate, or was destroyed", ErrInvalidParameter, w.LocalRedirectHandle)
	}
	if w.RemoteAddressAndPort != cur.RemoteAddressAndPort {
		if len(rd.records) >= MaxRedirectRecords {
			return fmt.Errorf("%w: the flow already has %d redirect records", ErrInvalidLayerData, len(rd.records))
		}
		rd.records = append(rd.records, RedirectRecord{
			Handle: w.LocalRedirectHandle, Callout: ch.filter.callout, Filter: ch.filter.id,
			TargetPID: w.LocalRedirectTargetPID, Original: cur.RemoteAddressAndPort, Redirected: w.RemoteAddressAndPort,
		})
	}
	v := *w
	v.LocalRedirectContext = slices.Clone(w.LocalRedirectContext)
	v.PreviousVersion = cur
	v.ModifierFilterID = ch.filter.id
	rd.connect = &v
	rd.noteApply(ch.filter.id, flags)
	return nil
}

// ApplyBindRequest applies a modified bind request.
func (e *Engine) ApplyBindRequest(h ClassifyHandle, w *BindRequest, flags ApplyFlags) error {
	ch, err := h.check(e)
	if err != nil {
		return err
	}
	rd := ch.rd
	rd.mu.Lock()
	defer rd.mu.Unlock()
	if rd.bind == nil || w == nil {
		return fmt.Errorf("%w: no bind request at %s", ErrInvalidLayerData, ch.layer)
	}
	cur := rd.bind
	if !w.LocalAddressAndPort.IsValid() || w.LocalAddressAndPort.Addr().Unmap().Is4() != cur.LocalAddressAndPort.Addr().Unmap().Is4() {
		return fmt.Errorf("%w: local %s is not a valid address of the socket's family", ErrInvalidLayerData, w.LocalAddressAndPort)
	}
	v := *w
	v.PreviousVersion = cur
	v.ModifierFilterID = ch.filter.id
	rd.bind = &v
	rd.noteApply(ch.filter.id, flags)
	return nil
}

// takeReauth reports whether a reauthorization pass is due and within
// the bound, and counts it.
func (rd *redirectState) takeReauth() bool {
	rd.mu.Lock()
	defer rd.mu.Unlock()
	if !rd.reauth || rd.passCount >= maxReauthPasses {
		return false
	}
	rd.reauth = false
	rd.passCount++
	return true
}

func (rd *redirectState) noteApply(by FilterID, flags ApplyFlags) {
	for _, f := range rd.reauthBy {
		if f != by {
			rd.reauth = true
		}
	}
	if flags&ApplyReauthorizeIfModifiedByOthers != 0 && !slices.Contains(rd.reauthBy, by) {
		rd.reauthBy = append(rd.reauthBy, by)
	}
	rd.modified, rd.lastBy = true, by
}

// Redirect is what a redirect layer's classification changed.
type Redirect struct {
	Layer    LayerID
	Connect  *ConnectRequest // final version at CONNECT_REDIRECT
	Bind     *BindRequest    // final version at BIND_REDIRECT
	Original netip.AddrPort  // remote (connect) or local (bind) before this classification
	Records  *RedirectRecords
}

// Remote is the destination to connect to.
func (r *Redirect) Remote() netip.AddrPort {
	if r == nil || r.Connect == nil {
		return netip.AddrPort{}
	}
	return r.Connect.RemoteAddressAndPort
}

// Redirected reports whether the destination (or bound address) changed.
func (r *Redirect) Redirected() bool {
	switch {
	case r == nil:
		return false
	case r.Connect != nil:
		return r.Connect.RemoteAddressAndPort != r.Original
	case r.Bind != nil:
		return r.Bind.LocalAddressAndPort != r.Original
	}
	return false
}

// ApplyTo fills the AUTH_CONNECT values and metadata of a redirected flow:
// IS_CONNECTION_REDIRECTED, the original destination, the redirect target
// PID, the records and the context (seed 001).
func (r *Redirect) ApplyTo(vs *Values, meta *Metadata) {
	if r == nil || r.Connect == nil || !r.Redirected() {
		return
	}
	c := r.Connect
	vs.Set(FieldFlags, Uint32(uint32(vs.Uint(FieldFlags))|FlagIsConnectionRedirected))
	vs.Set(FieldIPRemoteAddress, Addr(c.RemoteAddressAndPort.Addr()))
	vs.Set(FieldIPRemotePort, Uint16(c.RemoteAddressAndPort.Port()))
	vs.Set(FieldALEOriginalRemoteAddress, Addr(r.Original.Addr()))
	vs.Set(FieldALEOriginalRemotePort, Uint16(r.Original.Port()))
	if meta == nil {
		return
	}
	meta.Present |= MetaOriginalDestination | MetaRedirectRecords
	meta.OriginalDestination = r.Original
	meta.RedirectRecords = r.Records
	if c.LocalRedirectTargetPID != 0 {
		meta.Present |= MetaLocalRedirectTargetPID
		meta.LocalRedirectTargetPID = c.LocalRedirectTargetPID
	}
	if c.LocalRedirectContext != nil {
		meta.Present |= MetaRedirectContext
		meta.RedirectContext = c.LocalRedirectContext
	}
}

// result is what the classification applied, nil when nothing. The lock:
// a pended callout's goroutine may apply while the classification ends.
func (rd *redirectState) result() *Redirect {
	rd.mu.Lock()
	defer rd.mu.Unlock()
	if !rd.modified {
		return nil
	}
	r := &Redirect{Layer: rd.layer, Connect: rd.connect, Bind: rd.bind, Original: rd.original}
	if len(rd.records) > 0 {
		r.Records = &RedirectRecords{recs: slices.Clone(rd.records)}
	}
	return r
}

// RedirectState is a connection's redirect state for one redirect handle
// (FWPS_CONNECTION_REDIRECT_STATE).
type RedirectState uint8

const (
	NotRedirected RedirectState = iota
	RedirectedBySelf
	RedirectedByOther
	PreviouslyRedirectedBySelf
)

func (s RedirectState) String() string {
	return [...]string{"not_redirected", "redirected_by_self", "redirected_by_other", "previously_redirected_by_self"}[s]
}

// QueryConnectionRedirectState tells a callout how a flow with these records
// was redirected, relative to its handle (FwpsQueryConnectionRedirectState0):
// a callout must not redirect a flow it redirected before, or chained
// proxies loop for ever.
func QueryConnectionRedirectState(records *RedirectRecords, h RedirectHandle) RedirectState {
	if records == nil || len(records.recs) == 0 {
		return NotRedirected
	}
	n := len(records.recs)
	if records.recs[n-1].Handle == h {
		return RedirectedBySelf
	}
	for _, r := range records.recs[:n-1] {
		if r.Handle == h {
			return PreviouslyRedirectedBySelf
		}
	}
	return RedirectedByOther
}

// RedirectState is QueryConnectionRedirectState on the flow's records as
// they stand in this classification (including redirects that
// higher-priority callouts applied just now).
func (r *ClassifyRequest) RedirectState(h RedirectHandle) RedirectState {
	if r.cs == nil {
		return NotRedirected
	}
	if r.cs.rd != nil {
		r.cs.rd.mu.Lock()
		defer r.cs.rd.mu.Unlock()
		return QueryConnectionRedirectState(&RedirectRecords{recs: r.cs.rd.records}, h)
	}
	if r.Meta.Has(MetaRedirectRecords) {
		return QueryConnectionRedirectState(r.Meta.RedirectRecords, h)
	}
	return NotRedirected
}

// RedirectRecord is one redirect of a flow.
type RedirectRecord struct {
	Handle     RedirectHandle
	Callout    CalloutID
	Filter     FilterID
	TargetPID  uint32
	Original   netip.AddrPort
	Redirected netip.AddrPort
}

// RedirectRecords are a flow's redirect records. They are immutable; to a
// proxy they are an opaque blob (MarshalRedirectRecords).
type RedirectRecords struct{ recs []RedirectRecord }

// NewRedirectRecords builds records, for datapaths and tests.
func NewRedirectRecords(recs ...RedirectRecord) *RedirectRecords {
	return &RedirectRecords{recs: slices.Clone(recs)}
}

// Len is the number of records.
func (r *RedirectRecords) Len() int {
	if r == nil {
		return 0
	}
	return len(r.recs)
}

// Records returns a copy of the records, oldest first.
func (r *RedirectRecords) Records() []RedirectRecord {
	if r == nil {
		return nil
	}
	return slices.Clone(r.recs)
}

// Last returns the newest record.
func (r *RedirectRecords) Last() (RedirectRecord, bool) {
	if r.Len() == 0 {
		return RedirectRecord{}, false
	}
	return r.recs[len(r.recs)-1], true
}

// The records blob: "FWPR", version 1, count, then count records of
// recordSize bytes, then a 16-byte HMAC-SHA256 tag under the engine's key,
// so a proxy can carry the blob but not forge one that dodges a redirect.
const (
	MaxRedirectRecords     = 16
	recordsMagic           = "FWPR"
	recordsVersion         = 1
	recordsHeader          = 6
	recordSize             = 8 + 4 + 8 + 4 + 19 + 19
	recordsTag             = 16
	MaxRedirectRecordsSize = recordsHeader + MaxRedirectRecords*recordSize + recordsTag
)

// MarshalRedirectRecords encodes and authenticates records as the opaque
// blob a proxy carries from its accepted connection to its outbound one.
func (e *Engine) MarshalRedirectRecords(r *RedirectRecords) []byte {
	b := encodeRecords(r)
	return append(b, e.recordsTag(b)...)
}

// UnmarshalRedirectRecords decodes a blob and checks that this engine
// issued it. Malformed input gets ErrRedirectRecords; a blob with a bad
// tag, ErrRecordsNotTrusted.
func (e *Engine) UnmarshalRedirectRecords(b []byte) (*RedirectRecords, error) {
	r, err := ParseRedirectRecords(b)
	if err != nil {
		return nil, err
	}
	body := b[:len(b)-recordsTag]
	if !hmac.Equal(e.recordsTag(body), b[len(b)-recordsTag:]) {
		return nil, ErrRecordsNotTrusted
	}
	return r, nil
}

func (e *Engine) recordsTag(body []byte) []byte {
	m := hmac.New(sha256.New, e.rt.recordKey[:])
	m.Write(body)
	return m.Sum(nil)[:recordsTag]
}

func encodeRecords(r *RedirectRecords) []byte {
	n := r.Len()
	b := make([]byte, 0, recordsHeader+n*recordSize+recordsTag)
	b = append(b, recordsMagic...)
	b = append(b, recordsVersion, byte(n))
	for i := 0; i < n; i++ {
		rec := &r.recs[i]
		b = binary.BigEndian.AppendUint64(b, uint64(rec.Handle))
		b = binary.BigEndian.AppendUint32(b, uint32(rec.Callout))
		b = binary.BigEndian.AppendUint64(b, uint64(rec.Filter))
		b = binary.BigEndian.AppendUint32(b, rec.TargetPID)
		b = appendAddrPort(b, rec.Original)
		b = appendAddrPort(b, rec.Redirected)
	}
	return b
}

func appendAddrPort(b []byte, ap netip.AddrPort) []byte {
	var a [16]byte
	fam := byte(0)
	switch {
	case ap.Addr().Is4():
		fam = 4
		a4 := ap.Addr().As4()
		copy(a[:], a4[:])
	case ap.Addr().Is6():
		fam = 6
		a = ap.Addr().As16()
	}
	b = append(b, fam)
	b = append(b, a[:]...)
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

// ParseRedirectRecords decodes a records blob without checking its tag.
// It accepts only the canonical encoding, so that decoding and encoding
// again give the same bytes.
func ParseRedirectRecords(b []byte) (*RedirectRecords, error) {
	if len(b) < recordsHeader+recordsTag {
		return nil, fmt.Errorf("%w: %d bytes is shorter than the header", ErrRedirectRecords, len(b))
	}
	if len(b) > MaxRedirectRecordsSize {
		return nil, fmt.Errorf("%w: %d bytes exceeds the %d-byte limit", ErrRedirectRecords, len(b), MaxRedirectRecordsSize)
	}
	if string(b[:4]) != recordsMagic {
		return nil, fmt.Errorf("%w: bad magic", ErrRedirectRecords)
	}
	if b[4] != recordsVersion {
		return nil, fmt.Errorf("%w: unsupported version %d", ErrRedirectRecords, b[4])
	}
	n := int(b[5])
	if n > MaxRedirectRecords {
		return nil, fmt.Errorf("%w: %d records exceeds %d", ErrRedirectRecords, n, MaxRedirectRecords)
	}
	if want := recordsHeader + n*recordSize + recordsTag; len(b) != want {
		return nil, fmt.Errorf("%w: %d records need %d bytes, got %d", ErrRedirectRecords, n, want, len(b))
	}
	r := &RedirectRecords{recs: make([]RedirectRecord, n)}
	p := b[recordsHeader:]
	for i := 0; i < n; i++ {
		rec := &r.recs[i]
		rec.Handle = RedirectHandle(binary.BigEndian.Uint64(p))
		rec.Callout = CalloutID(binary.BigEndian.Uint32(p[8:]))
		rec.Filter = FilterID(binary.BigEndian.Uint64(p[12:]))
		rec.TargetPID = binary.BigEndian.Uint32(p[20:])
		var err error
		if rec.Original, err = parseAddrPort(p[24:43]); err != nil {
			return nil, fmt.Errorf("record %d original: %w", i, err)
		}
		if rec.Redirected, err = parseAddrPort(p[43:62]); err != nil {
			return nil, fmt.Errorf("record %d redirected: %w", i, err)
		}
		p = p[recordSize:]
	}
	return r, nil
}

func parseAddrPort(b []byte) (netip.AddrPort, error) {
	port := binary.BigEndian.Uint16(b[17:])
	switch b[0] {
	case 0:
		for _, c := range b[1:] {
			if c != 0 {
				return netip.AddrPort{}, fmt.Errorf("%w: non-zero bytes in an empty address", ErrRedirectRecords)
			}
		}
		return netip.AddrPort{}, nil
	case 4:
		for _, c := range b[5:17] {
			if c != 0 {
				return netip.AddrPort{}, fmt.Errorf("%w: non-zero padding after an IPv4 address", ErrRedirectRecords)
			}
		}
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[1:5])), port), nil
	case 6:
		a := netip.AddrFrom16([16]byte(b[1:17]))
		if a.Is4In6() {
			return netip.AddrPort{}, fmt.Errorf("%w: v4-mapped address must be encoded as IPv4", ErrRedirectRecords)
		}
		return netip.AddrPortFrom(a, port), nil
	}
	return netip.AddrPort{}, fmt.Errorf("%w: address family %d", ErrRedirectRecords, b[0])
}
