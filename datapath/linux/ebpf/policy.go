package ebpf

import (
	"cmp"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"

	"fwp/engine"
)

// Sizes shared with bpf/fwp.c.
const (
	numSlots      = 12  // (kind 0..5) * 2 + v6
	numFields     = 10  // fieldRAddr..fieldAll
	bitsetWords   = 256 // NWORDS
	MaxFilters    = bitsetWords * 64
	MaxRedirects  = 1024
	MaxContextLen = 128
	maxRecords    = 8
	portBlock     = 32
)

// The kernel's condition fields, in bpf/fwp.c's order.
const (
	fieldRAddr = iota
	fieldLAddr
	fieldRPort
	fieldLPort
	fieldProto
	fieldUID
	fieldCgroup
	fieldApp
	fieldGID
	fieldAll
)

var kernelField = map[engine.FieldID]int{
	engine.FieldIPRemoteAddress: fieldRAddr,
	engine.FieldIPLocalAddress:  fieldLAddr,
	engine.FieldIPRemotePort:    fieldRPort,
	engine.FieldIPLocalPort:     fieldLPort,
	engine.FieldIPProtocol:      fieldProto,
	engine.FieldALEUserID:       fieldUID,
	engine.FieldCgroupID:        fieldCgroup,
	engine.FieldALEAppID:        fieldApp,
	engine.FieldALEGroupID:      fieldGID,
}

// Filter actions in the kernel's metadata.
const (
	actBlock    = 1
	actPermit   = 2
	actRedirect = 3
	actCallout  = 4 // a Go callout decides: the flow is handed to user space
)

// filterMeta flags.
const (
	fmFailOpen      = 1 // PERMIT_IF_CALLOUT_UNREGISTERED
	fmCalloutsLater = 2 // a callout filter follows in the layer: a hard decision does not end the walk
)

// kernelKinds are the layers the hooks classify, in slot order.
var kernelKinds = []engine.LayerKind{
	engine.KindConnectRedirect, engine.KindAuthConnect, engine.KindBindRedirect, engine.KindResourceAssignment,
	engine.KindAuthRecvAccept, engine.KindAuthListen, // bpf/inbound.h
}

func slotOf(l engine.LayerID) (int, bool) {
	for i, k := range kernelKinds {
		if l.Kind() == k {
			s := 2 * i
			if l.V6() {
				s++
			}
			return s, true
		}
	}
	return 0, false
}

// BuiltinConnectRedirectKey is the callout key of fwp's built-in connect
// redirect. A CONNECT_REDIRECT filter with ActionCalloutUnknown whose
// callout's key is this key, or starts with it followed by "/" (one callout
// per provider, each its own redirect handle), is carried out in the kernel:
// its provider context (a RedirectConfig) names the proxy.
const BuiltinConnectRedirectKey = "fwp.builtin.connect_redirect"

// IsBuiltinConnectRedirect reports whether a callout key names the built-in
// connect redirect.
func IsBuiltinConnectRedirect(key string) bool {
	return key == BuiltinConnectRedirectKey || strings.HasPrefix(key, BuiltinConnectRedirectKey+"/")
}

// BuiltinBindRedirectKey is the callout key of fwp's built-in bind
// redirect: a BIND_REDIRECT filter with ActionCalloutUnknown calling it
// (this key, or this key + "/" + anything) moves the socket's local address
// or port to its provider context's BindRedirectConfig.
const BuiltinBindRedirectKey = "fwp.builtin.bind_redirect"

// IsBuiltinBindRedirect reports whether a callout key names the built-in
// bind redirect.
func IsBuiltinBindRedirect(key string) bool {
	return key == BuiltinBindRedirectKey || strings.HasPrefix(key, BuiltinBindRedirectKey+"/")
}

func (p *Policy) connectRedirectCfg(data []byte) (fwpRedirectCfg, error) {
	rc, err := ParseRedirectConfig(data)
	if err != nil {
		return fwpRedirectCfg{}, err
	}
	a := rc.Proxy.Addr().Unmap()
	if !p.isLocal(a) {
		return fwpRedirectCfg{}, fmt.Errorf("%w: proxy %s is not a local address: a connect redirect reaches only a proxy on this host (loopback, or an address of its interfaces)", ErrInvalidRedirect, rc.Proxy)
	}
	kc := fwpRedirectCfg{Port: rc.Proxy.Port(), Pid: rc.TargetPID, CtxLen: uint32(len(rc.Context))}
	if a.Is6() {
		kc.V6 = 1
	}
	copy(kc.Addr[:], a.AsSlice())
	copy(kc.Ctx[:], rc.Context)
	return kc, nil
}

// hostAddrs returns the addresses of the host's interfaces (in the
// caller's network namespace); a variable for tests.
var hostAddrs = func() ([]netip.Addr, error) {
	ias, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, ia := range ias {
		if n, ok := ia.(*net.IPNet); ok {
			if a, ok := netip.AddrFromSlice(n.IP); ok {
				out = append(out, a.Unmap())
			}
		}
	}
	return out, nil
}

// isLocal reports whether a proxy at a is on this host: loopback always;
// otherwise an address of its interfaces when the policy is compiled. A
// redirect to any other address would send the connection off the host
// to something that cannot ask for its original destination.
func (p *Policy) isLocal(a netip.Addr) bool {
	if a.IsLoopback() {
		return true
	}
	if p.local == nil {
		p.local = map[netip.Addr]bool{}
		addrs, _ := hostAddrs() // none readable: only loopback is local
		for _, h := range addrs {
			p.local[h.WithZone("")] = true
		}
	}
	return p.local[a]
}

func bindRedirectCfg(data []byte, v6 bool) (fwpRedirectCfg, error) {
	bc, err := ParseBindRedirectConfig(data)
	if err != nil {
		return fwpRedirectCfg{}, err
	}
	kc := fwpRedirectCfg{Port: bc.Local.Port()}
	a := bc.Local.Addr().Unmap()
	if a.IsUnspecified() {
		kc.KeepAddr = 1
	} else if a.Is6() != v6 {
		return kc, fmt.Errorf("%w: bind redirect to %s on a layer of the other family", ErrInvalidRedirect, bc.Local)
	}
	if a.Is6() {
		kc.V6 = 1
	}
	copy(kc.Addr[:], a.AsSlice())
	return kc, nil
}

// bitvec is a set of filter ranks.
type bitvec []uint64

func newBitvec(n int) bitvec    { return make(bitvec, (n+63)/64) }
func (b bitvec) set(r int)      { b[r>>6] |= 1 << (r & 63) }
func (b bitvec) clear(r int)    { b[r>>6] &^= 1 << (r & 63) }
func (b bitvec) has(r int) bool { return b[r>>6]&(1<<(r&63)) != 0 }
func (b bitvec) clone() bitvec  { return slices.Clone(b) }

// classes interns the distinct bitsets of one field of one layer.
type classes struct {
	ids  map[string]uint32
	sets []bitvec
}

func (c *classes) intern(b bitvec) uint32 {
	if c.ids == nil {
		c.ids = map[string]uint32{}
	}
	var sb strings.Builder
	for _, w := range b {
		for i := 0; i < 8; i++ {
			sb.WriteByte(byte(w >> (8 * i)))
		}
	}
	k := sb.String()
	if id, ok := c.ids[k]; ok {
		return id
	}
	id := uint32(len(c.sets))
	c.ids[k] = id
	c.sets = append(c.sets, b.clone())
	return id
}

type addrClass struct {
	prefix netip.Prefix
	class  uint32
}

// layerPolicy is one layer compiled for the kernel.
type layerPolicy struct {
	layer   engine.LayerID
	filters []fwpFilterMeta
	ids     []engine.FilterID
	active  uint32
	def     [numFields]uint32
	empty   [numFields]uint32
	classes [numFields]classes
	addrs   [2][]addrClass
	ports   [2][]uint16          // 65536 classes, nil when the field is inactive
	ints    [3]map[uint64]uint32 // proto, uid, cgroup id
	gids    map[uint64]uint32
	apps    map[AppIdentity]uint32
	// callouts: some filter calls a Go callout, so a hard permit does
	// not end the kernel's walk (a callout may veto it).
	callouts bool
	// hosts are the v4 host tables of the address fields, runs the
	// collapsed runs of host filters (hosts.go); members the engine
	// filters the layer enforces, live their ids.
	hosts   [2]hostTable
	runs    []idRun
	members int
	live    []uint64
}

// Policy is an engine policy compiled into the kernel's classification
// maps. Build it with Compile and install it with Datapath.Apply.
type Policy struct {
	layers    [numSlots]*layerPolicy
	redirects []fwpRedirectCfg
	// connectRedirects: some filter redirects connections, so the hooks
	// that serve redirected sockets are needed (Datapath.Apply).
	connectRedirects bool
	// local is the host's addresses, read once per Compile for the
	// redirects' proxies.
	local map[netip.Addr]bool
	// apps are the executables the app id conditions named, as resolved
	// when the policy was compiled (absent: no file at the path).
	apps map[string]appResolution
	// callouts: some filter is decided by a Go callout in user space
	// (ACT_CALLOUT): sockops indexes those flows, so the hooks that serve
	// redirected sockets are attached too.
	callouts bool
	// inbound: some filter is at AUTH_RECV_ACCEPT or AUTH_LISTEN, which
	// the ingress and sockops hooks enforce: they are attached with the
	// redirect hooks (Datapath.Apply).
	inbound bool
	// udpCallouts: some such filter matches UDP (calloutudp.go).
	udpCallouts bool
	// inboundCallouts: some such filter is at AUTH_RECV_ACCEPT: the
	// callout path queues inbound SYNs to the hooked cgroups' listeners
	// (inlisten.go).
	inboundCallouts bool
	// inboundUDPCallouts: some such filter matches UDP (inudp.go).
	inboundUDPCallouts bool
	// inPorts: the local ports the inbound callout filters can match
	// (inPortsAll: any).
	inPorts    []PortRange
	inPortsAll bool
}

// Callouts reports whether some filter of the policy is decided by a Go
// callout: such flows are handed to user space (package nfqueue).
func (p *Policy) Callouts() bool { return p.callouts }

// Filters returns the number of filters the policy enforces in the kernel.
func (p *Policy) Filters() int {
	n := 0
	for _, l := range p.layers {
		if l != nil {
			n += l.members
		}
	}
	return n
}

// Compile turns the filters of the view into a kernel policy. Every enabled
// filter must be one the kernel decides alone: PERMIT or BLOCK, or the
// built-in connect redirect, on CONNECT_REDIRECT, AUTH_CONNECT,
// BIND_REDIRECT, RESOURCE_ASSIGNMENT, AUTH_RECV_ACCEPT or AUTH_LISTEN, with
// conditions on addresses, ports, protocol, user, group and cgroup id,
// application and flags (the bits the hooks know: tuple_flags in
// bpf/fwp.c; the others are clear). Any other filter makes Compile
// fail with an error wrapping ErrNotSupported that names it: the kernel
// datapath never ignores a filter silently.
func Compile(view engine.View) (*Policy, error) {
	p := &Policy{apps: map[string]appResolution{}}
	// The engine's own filters, not copies: a million copies cost as much
	// as the compile (none is modified here).
	var byLayer [numSlots][]*engine.Filter
	for f := range view.SharedFilters(engine.FilterTemplate{}) {
		if f.Flags&engine.FilterDisabled != 0 {
			continue
		}
		slot, ok := slotOf(f.Layer)
		if !ok && FlowLayer(f.Layer) {
			continue // classified in user space from flow events (flowevents.go)
		}
		if !ok {
			return nil, engine.FilterError(f, fmt.Errorf("%w: on layer %s: the kernel datapath does not hook this layer", ErrNotSupported, f.Layer))
		}
		byLayer[slot] = append(byLayer[slot], f)
		if k := f.Layer.Kind(); k == engine.KindAuthRecvAccept || k == engine.KindAuthListen {
			p.inbound = true
		}
	}
	for slot, fs := range byLayer {
		if len(fs) == 0 {
			continue
		}
		lp, err := p.compileLayer(view, fs)
		if err != nil {
			return nil, err
		}
		p.layers[slot] = lp
	}
	return p, nil
}

func (p *Policy) compileLayer(view engine.View, given []*engine.Filter) (*layerPolicy, error) {
	layer := given[0].Layer
	fs, runs, runOf := collapseRuns(given)
	n := len(fs)
	if n > MaxFilters {
		return nil, fmt.Errorf("%w: %d filters on layer %s (%d after collapsing runs of host filters), the kernel datapath holds %d per layer", ErrCapacity, len(given), layer, n, MaxFilters)
	}
	lp := &layerPolicy{layer: layer, filters: make([]fwpFilterMeta, n), ids: make([]engine.FilterID, n), runs: runs, members: len(given)}
	lp.live = make([]uint64, len(given))
	for i, f := range given {
		lp.live[i] = uint64(f.ID)
	}
	// groups[f][rank] is the filter's conditions on kernel field f.
	var groups [numFields - 1][][]engine.Condition
	for i := range groups {
		groups[i] = make([][]engine.Condition, n)
	}
	// flagGroups[rank] is the filter's conditions on the flags, folded
	// into the protocol field (compileProto).
	flagGroups := make([][]engine.Condition, n)
	for rank, f := range fs {
		m, err := p.filterMeta(view, f)
		if err != nil {
			return nil, err
		}
		if r := runOf[rank]; r > 0 {
			m.Id = runBit | uint64(r-1) // the kernel finds the member by address
		}
		lp.filters[rank] = m
		lp.ids[rank] = f.ID
		if m.Action == actCallout {
			lp.callouts = true
			p.callouts = true
		}
		for _, c := range f.Conditions {
			if c.Field == engine.FieldFlags {
				if l := c.Value.List(); l != nil {
					flagGroups[rank] = append(flagGroups[rank], listConditions(c, l)...)
				} else {
					flagGroups[rank] = append(flagGroups[rank], c)
				}
				continue
			}
			kf, ok := kernelField[c.Field]
			if !ok {
				return nil, engine.FilterError(f, fmt.Errorf("%w: condition on %s: the kernel cannot match this field", ErrNotSupported, c.Field))
			}
			if l := c.Value.List(); l != nil && kf != fieldRAddr && kf != fieldLAddr {
				// An integer list is few values (ports, ids): its
				// conditions, as WFP holds them.
				groups[kf][rank] = append(groups[kf][rank], listConditions(c, l)...)
				continue
			}
			groups[kf][rank] = append(groups[kf][rank], c)
		}
	}
	// A hard decision ends the kernel's walk unless a callout filter
	// follows (it may veto a hard permit).
	later := false
	for i := n - 1; i >= 0; i-- {
		if later {
			lp.filters[i].Flags |= fmCalloutsLater
		}
		later = later || lp.filters[i].Action == actCallout
	}
	// Sublayer ends: the rank of the first filter of the next sublayer.
	for i := n - 1; i >= 0; i-- {
		switch {
		case i == n-1:
			lp.filters[i].SubEnd = uint32(n)
		case fs[i+1].Sublayer != fs[i].Sublayer:
			lp.filters[i].SubEnd = uint32(i + 1)
		default:
			lp.filters[i].SubEnd = lp.filters[i+1].SubEnd
		}
	}
	all := newBitvec(n)
	for r := range n {
		all.set(r)
	}
	lp.classes[fieldAll].intern(all)
	flagWild := newBitvec(n)
	flagged := false
	for r := range n {
		if len(flagGroups[r]) == 0 {
			flagWild.set(r)
		} else {
			flagged = true
		}
	}
	for f := range numFields - 1 {
		g := groups[f]
		wild := newBitvec(n)
		constrained := f == fieldProto && flagged
		for r := range n {
			if len(g[r]) == 0 {
				wild.set(r)
			} else {
				constrained = true
			}
		}
		if !constrained {
			continue // the kernel uses the all-filters bitset for the field
		}
		c := &lp.classes[f]
		lp.empty[f] = c.intern(wild)
		lp.def[f] = lp.empty[f]
		lp.active |= 1 << f
		var err error
		switch f {
		case fieldRAddr, fieldLAddr:
			err = lp.compileAddrs(f, g, wild)
		case fieldRPort, fieldLPort:
			err = lp.compilePorts(f, g, wild)
		case fieldProto:
			if flagged {
				lp.active |= activeFlags
				err = lp.compileProto(g, wild, flagGroups, flagWild)
			} else {
				err = lp.compileProto(g, wild, nil, nil)
			}
		case fieldApp:
			err = lp.compileApps(p, g, wild)
		default:
			err = lp.compileIDs(f, g, wild)
		}
		if re, ok := err.(rankError); ok {
			return nil, engine.FilterError(fs[re.rank], fmt.Errorf("layer %s: %w", layer, re.err))
		} else if err != nil {
			return nil, fmt.Errorf("layer %s: %w", layer, err)
		}
		if len(c.sets) > 0xffff {
			return nil, fmt.Errorf("%w: layer %s field %d needs %d classes", ErrCapacity, layer, f, len(c.sets))
		}
	}
	lp.extractHosts()
	return lp, nil
}

func (p *Policy) filterMeta(view engine.View, f *engine.Filter) (fwpFilterMeta, error) {
	m := fwpFilterMeta{Id: uint64(f.ID)}
	switch f.Action.Type {
	case engine.ActionBlock:
		m.Action, m.Hard = actBlock, 1 // a filter's block is hard
	case engine.ActionPermit:
		m.Action = actPermit
	case engine.ActionCalloutUnknown, engine.ActionCalloutTerminating, engine.ActionCalloutInspection:
		co, err := view.Callout(f.Action.Callout)
		kind := f.Layer.Kind()
		builtin := err == nil && f.Action.Type == engine.ActionCalloutUnknown &&
			(IsBuiltinConnectRedirect(co.Key) && kind == engine.KindConnectRedirect ||
				IsBuiltinBindRedirect(co.Key) && kind == engine.KindBindRedirect)
		if !builtin {
			m, err := goCalloutMeta(m, f)
			if err != nil {
				return m, engine.FilterError(f, err)
			}
			if f.Layer.Kind() == engine.KindAuthRecvAccept {
				p.inboundCallouts = true // inlisten.go
				p.inboundUDPCallouts = p.inboundUDPCallouts || protoOnly(f.Conditions, 17)
				p.noteInboundPorts(f.Conditions)
			} else {
				p.udpCallouts = p.udpCallouts || protoOnly(f.Conditions, 17)
			}
			return m, nil
		}
		if len(p.redirects) >= MaxRedirects {
			return m, engine.FilterError(f, fmt.Errorf("%w: more than %d redirect filters", ErrCapacity, MaxRedirects))
		}
		if f.ProviderContext == 0 {
			return m, engine.FilterError(f, fmt.Errorf("%w: a built-in redirect needs a provider context naming where to", ErrInvalidRedirect))
		}
		pc, err := view.ProviderContext(f.ProviderContext)
		if err != nil {
			return m, engine.FilterError(f, fmt.Errorf("%w: %v", ErrInvalidRedirect, err))
		}
		var kc fwpRedirectCfg
		if kind == engine.KindConnectRedirect {
			kc, err = p.connectRedirectCfg(pc.Data)
			p.connectRedirects = true
		} else {
			kc, err = bindRedirectCfg(pc.Data, f.Layer.V6())
		}
		if err != nil {
			return m, engine.FilterError(f, fmt.Errorf("provider context %q: %w", pc.Key, err))
		}
		kc.Handle = uint32(co.ID)
		m.Action, m.Redirect, m.Handle = actRedirect, uint32(len(p.redirects)), uint32(co.ID)
		p.redirects = append(p.redirects, kc)
	default:
		return m, engine.FilterError(f, fmt.Errorf("%w: action %s; the kernel datapath decides only permit, block and the built-in redirect", ErrNotSupported, f.Action.Type))
	}
	if f.Flags&engine.FilterClearActionRight != 0 {
		m.Hard = 1
	}
	return m, nil
}

// goCalloutMeta compiles a filter whose Go callout decides in user space:
// at CONNECT_REDIRECT and AUTH_CONNECT the kernel hands the flow over when
// its walk reaches the filter and the decision can still change (see
// docs/semantics.md, "Kernel callout path"). Only TCP flows are held (their
// SYN waits in a queue), so the filter must match TCP alone; at the bind
// layers there is no packet to hold and such filters stay refused.
func goCalloutMeta(m fwpFilterMeta, f *engine.Filter) (fwpFilterMeta, error) {
	kind := f.Layer.Kind()
	if kind != engine.KindConnectRedirect && kind != engine.KindAuthConnect && kind != engine.KindAuthRecvAccept {
		return m, fmt.Errorf("%w: it calls a Go callout (%s) at %s; the kernel datapath hands flows to Go callouts only at CONNECT_REDIRECT, AUTH_CONNECT and AUTH_RECV_ACCEPT (no packet to hold at the bind and listen layers)", ErrNotSupported, f.Action.Callout, f.Layer)
	}
	if kind == engine.KindAuthRecvAccept {
		// The inbound SYN, or the first datagram of an inbound UDP
		// flow, is held at netfilter's input hook.
		if !protoOnly(f.Conditions, 6) && !protoOnly(f.Conditions, 17) {
			return m, fmt.Errorf("%w: it calls a Go callout (%s) at %s; the kernel datapath holds inbound TCP connection requests (their SYN) and inbound UDP flows (their first datagram) for Go callouts there, one protocol per filter: add the condition %s == 6 or == 17", ErrNotSupported, f.Action.Callout, f.Layer, engine.FieldIPProtocol)
		}
	} else if !protoOnly(f.Conditions, 6) && !protoOnly(f.Conditions, 17) {
		return m, fmt.Errorf("%w: it calls a Go callout (%s); the kernel datapath holds only TCP flows (their SYN) and UDP flows (their first datagram) for Go callouts, one protocol per filter: add the condition %s == 6 or == 17", ErrNotSupported, f.Action.Callout, engine.FieldIPProtocol)
	}
	m.Action = actCallout
	if f.Flags&engine.FilterPermitIfCalloutUnregistered != 0 {
		m.Flags |= fmFailOpen
	}
	return m, nil
}

// protoOnly reports whether the conditions let only protocol proto match:
// the protocol conditions (ORed) are all EQUAL proto.
func protoOnly(cs []engine.Condition, proto uint64) bool {
	seen := false
	for _, c := range cs {
		if c.Field != engine.FieldIPProtocol {
			continue
		}
		if c.Match != engine.MatchEqual || c.Value.Uint() != proto {
			return false
		}
		seen = true
	}
	return seen
}

// addrSet is one address condition as a union of prefixes, or its complement.
type addrSet struct {
	prefixes []netip.Prefix
	neg      bool
}

func addrCondition(c engine.Condition) (addrSet, error) {
	v := c.Value
	one := func(v engine.Value) netip.Prefix {
		if v.Type() == engine.TypePrefix {
			return v.Prefix()
		}
		return netip.PrefixFrom(v.Addr(), v.Addr().BitLen())
	}
	switch c.Match {
	case engine.MatchEqual, engine.MatchPrefix:
		if l := v.List(); l != nil {
			return addrSet{prefixes: listPrefixes(l)}, nil
		}
		return addrSet{prefixes: []netip.Prefix{one(v)}}, nil
	case engine.MatchNotEqual, engine.MatchNotPrefix:
		return addrSet{prefixes: []netip.Prefix{one(v)}, neg: true}, nil
	case engine.MatchRange:
		return addrSet{prefixes: rangePrefixes(v.Low().Addr(), v.High().Addr())}, nil
	case engine.MatchGreater, engine.MatchGreaterOrEqual, engine.MatchLess, engine.MatchLessOrEqual:
		a := v.Addr()
		lo, hi := zeroAddr(a), maxAddr(a)
		switch c.Match {
		case engine.MatchGreater:
			if a == hi {
				return addrSet{}, nil
			}
			lo = a.Next()
		case engine.MatchGreaterOrEqual:
			lo = a
		case engine.MatchLess:
			if a == lo {
				return addrSet{}, nil
			}
			hi = a.Prev()
		default:
			hi = a
		}
		return addrSet{prefixes: rangePrefixes(lo, hi)}, nil
	}
	return addrSet{}, fmt.Errorf("%w: %s: the kernel cannot match addresses this way", ErrNotSupported, c)
}

// listPrefixes covers an address list with prefixes: an address each,
// the fewest prefixes for each merged range.
func listPrefixes(l *engine.List) []netip.Prefix {
	out := make([]netip.Prefix, 0, l.Len())
	for a := range l.Addrs() {
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	for lo, hi := range l.AddrRanges() {
		out = append(out, rangePrefixes(lo, hi)...)
	}
	return out
}

// listConditions is an integer list as the conditions it stands for: an
// EQUAL per integer, a RANGE per merged range.
func listConditions(c engine.Condition, l *engine.List) []engine.Condition {
	var out []engine.Condition
	for v := range l.Values() {
		one := engine.Condition{Field: c.Field, Match: engine.MatchEqual, Value: v}
		if v.Type() == engine.TypeRange {
			one.Match = engine.MatchRange
		}
		out = append(out, one)
	}
	return out
}

func zeroAddr(a netip.Addr) netip.Addr {
	if a.Is4() {
		return netip.IPv4Unspecified()
	}
	return netip.IPv6Unspecified()
}

func maxAddr(a netip.Addr) netip.Addr {
	if a.Is4() {
		return netip.AddrFrom4([4]byte{255, 255, 255, 255})
	}
	var b [16]byte
	for i := range b {
		b[i] = 0xff
	}
	return netip.AddrFrom16(b)
}

// rangePrefixes covers [lo, hi] with the fewest prefixes.
func rangePrefixes(lo, hi netip.Addr) []netip.Prefix {
	var out []netip.Prefix
	for lo.IsValid() && lo.Compare(hi) <= 0 {
		bitsN := lo.BitLen()
		// Widen the prefix while it stays aligned and inside the range.
		for bitsN > 0 {
			p, _ := lo.Prefix(bitsN - 1)
			if p.Addr() != lo || lastAddr(p).Compare(hi) > 0 {
				break
			}
			bitsN--
		}
		p := netip.PrefixFrom(lo, bitsN)
		out = append(out, p)
		last := lastAddr(p)
		if last == maxAddr(lo) {
			break
		}
		lo = last.Next()
	}
	return out
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// compileAddrs builds the LPM classes of an address field: one class per
// distinct prefix P, holding the filters that accept every address whose
// longest stored prefix is P.
func (lp *layerPolicy) compileAddrs(f int, g [][]engine.Condition, wild bitvec) error {
	type ref struct {
		rank, cond int
		neg        bool
	}
	type entry struct {
		pf netip.Prefix
		ref
	}
	total := 0
	for _, cs := range g {
		for _, c := range cs {
			total++
			if l := c.Value.List(); l != nil {
				total += l.Len()
			}
		}
	}
	entries := make([]entry, 0, total)
	conds := make([][]addrSet, len(g))
	var negRanks []int
	for r, cs := range g {
		hasNeg := false
		for i, c := range cs {
			s, err := addrCondition(c)
			if err != nil {
				return rankError{r, err}
			}
			conds[r] = append(conds[r], s)
			hasNeg = hasNeg || s.neg
			for _, pf := range s.prefixes {
				// Masked: ancestors sort first (see below).
				entries = append(entries, entry{pf.Masked(), ref{r, i, s.neg}})
			}
		}
		if hasNeg {
			negRanks = append(negRanks, r)
		}
	}
	c := &lp.classes[f]
	def := wild.clone()
	for _, r := range negRanks {
		def.set(r) // no stored prefix contains the address: every negated condition holds
	}
	lp.def[f] = c.intern(def)
	slices.SortFunc(entries, func(a, b entry) int {
		return cmp.Or(a.pf.Addr().Compare(b.pf.Addr()), cmp.Compare(a.pf.Bits(), b.pf.Bits()))
	})
	which := f - fieldRAddr
	// In (address, length) order a prefix's ancestors come before it: a
	// stack of the stored prefixes containing the current one carries what
	// they contribute, so each prefix costs its own refs, not a walk over
	// its 32 or 128 possible ancestors (a million-address list compiles in
	// about a second).
	type level struct {
		pf        netip.Prefix
		pos       bitvec
		contained map[[2]int]bool
	}
	var stack []level
	lp.addrs[which] = make([]addrClass, 0, len(entries))
	var last bitvec    // the bitset interned last, and its class: most
	var lastCls uint32 // prefixes of a long list share one
	var refs []ref
	var memoRefs []ref // the refs, parent and stack depth of the last new positive bitset
	var memoPos bitvec
	var memoParent *uint64
	memoDepth := -1
	for i := 0; i < len(entries); {
		pf := entries[i].pf
		refs = refs[:0]
		for ; i < len(entries) && entries[i].pf == pf; i++ {
			refs = append(refs, entries[i].ref)
		}
		for len(stack) > 0 && !(stack[len(stack)-1].pf.Bits() <= pf.Bits() && stack[len(stack)-1].pf.Contains(pf.Addr())) {
			stack = stack[:len(stack)-1]
		}
		var pos bitvec
		var contained map[[2]int]bool
		if len(stack) > 0 {
			top := stack[len(stack)-1]
			pos, contained = top.pos, top.contained
		} else {
			pos = wild
		}
		hasPos, hasNeg := false, false
		for _, e := range refs {
			if e.neg {
				hasNeg = true
			} else if !pos.has(e.rank) {
				hasPos = true
			}
		}
		if hasPos {
			// Siblings under one parent with the same filters (a long
			// list's hosts) share one bitset: bitsets are not modified
			// once on the stack.
			if len(memoRefs) > 0 && len(stack) == memoDepth && (len(stack) == 0 || &stack[len(stack)-1].pos[0] == memoParent) && slices.Equal(memoRefs, refs) {
				pos = memoPos
			} else {
				parent := pos
				pos = pos.clone()
				for _, e := range refs {
					if !e.neg {
						pos.set(e.rank)
					}
				}
				memoDepth, memoRefs, memoPos = len(stack), append(memoRefs[:0], refs...), pos
				memoParent = nil
				if len(parent) > 0 && len(stack) > 0 {
					memoParent = &parent[0]
				}
			}
		}
		if hasNeg {
			c2 := maps.Clone(contained)
			if c2 == nil {
				c2 = map[[2]int]bool{}
			}
			for _, e := range refs {
				if e.neg {
					c2[[2]int{e.rank, e.cond}] = true
				}
			}
			contained = c2
		}
		stack = append(stack, level{pf, pos, contained})
		b := pos
		if len(negRanks) > 0 {
			b = pos.clone()
			for _, r := range negRanks {
				for i, s := range conds[r] {
					if s.neg && !contained[[2]int{r, i}] {
						b.set(r)
						break
					}
				}
			}
		}
		if last == nil || !slices.Equal(last, b) {
			last, lastCls = b, c.intern(b)
		}
		lp.addrs[which] = append(lp.addrs[which], addrClass{pf, lastCls})
	}
	return nil
}

type interval struct{ lo, hi uint32 }

func intIntervals(c engine.Condition, max uint32) ([]interval, error) {
	v := uint32(c.Value.Uint())
	switch c.Match {
	case engine.MatchEqual:
		return []interval{{v, v}}, nil
	case engine.MatchNotEqual:
		var out []interval
		if v > 0 {
			out = append(out, interval{0, v - 1})
		}
		if v < max {
			out = append(out, interval{v + 1, max})
		}
		return out, nil
	case engine.MatchGreater:
		if v >= max {
			return nil, nil
		}
		return []interval{{v + 1, max}}, nil
	case engine.MatchGreaterOrEqual:
		return []interval{{v, max}}, nil
	case engine.MatchLess:
		if v == 0 {
			return nil, nil
		}
		return []interval{{0, v - 1}}, nil
	case engine.MatchLessOrEqual:
		return []interval{{0, v}}, nil
	case engine.MatchRange:
		return []interval{{uint32(c.Value.Low().Uint()), uint32(c.Value.High().Uint())}}, nil
	}
	return nil, fmt.Errorf("%w: %s: the kernel cannot match ports this way", ErrNotSupported, c)
}

// compilePorts gives every port its class, sweeping the ports once.
func (lp *layerPolicy) compilePorts(f int, g [][]engine.Condition, wild bitvec) error {
	type event struct {
		at   uint32
		rank int
		add  bool
	}
	var events []event
	for r, cs := range g {
		var ivs []interval
		for _, c := range cs {
			iv, err := intIntervals(c, 0xffff)
			if err != nil {
				return rankError{r, err}
			}
			ivs = append(ivs, iv...)
		}
		// Merge so that one filter's intervals never overlap.
		slices.SortFunc(ivs, func(a, b interval) int { return cmp.Compare(a.lo, b.lo) })
		var merged []interval
		for _, iv := range ivs {
			if k := len(merged) - 1; k >= 0 && iv.lo <= merged[k].hi+1 {
				merged[k].hi = max(merged[k].hi, iv.hi)
				continue
			}
			merged = append(merged, iv)
		}
		for _, iv := range merged {
			events = append(events, event{iv.lo, r, true}, event{iv.hi + 1, r, false})
		}
	}
	slices.SortStableFunc(events, func(a, b event) int { return cmp.Compare(a.at, b.at) })
	c := &lp.classes[f]
	ports := make([]uint16, 65536)
	cur := wild.clone() // interned by the caller, as the field's empty class
	next := 0
	for port := uint32(0); port < 65536; {
		for next < len(events) && events[next].at == port {
			if e := events[next]; e.add {
				cur.set(e.rank)
			} else {
				cur.clear(e.rank)
			}
			next++
		}
		cls := c.intern(cur)
		end := uint32(65536)
		if next < len(events) {
			end = events[next].at
		}
		for q := port; q < end; q++ {
			ports[q] = uint16(cls)
		}
		port = end
	}
	lp.ports[f-fieldRPort] = ports
	return nil
}

func matchInt(c engine.Condition, v uint64) bool {
	cv := c.Value.Uint()
	switch c.Match {
	case engine.MatchEqual:
		return v == cv
	case engine.MatchNotEqual:
		return v != cv
	case engine.MatchGreater:
		return v > cv
	case engine.MatchLess:
		return v < cv
	case engine.MatchGreaterOrEqual:
		return v >= cv
	case engine.MatchLessOrEqual:
		return v <= cv
	case engine.MatchRange:
		return v >= c.Value.Low().Uint() && v <= c.Value.High().Uint()
	case engine.MatchFlagsAllSet:
		return v&cv == cv
	case engine.MatchFlagsAnySet:
		return v&cv != 0
	case engine.MatchFlagsNoneSet:
		return v&cv == 0
	}
	return false
}

// rankError is a field compiler's error about the filter of one rank,
// which compileLayer names.
type rankError struct {
	rank int
	err  error
}

func (e rankError) Error() string { return e.err.Error() }
func (e rankError) Unwrap() error { return e.err }

// activeFlags in layer_cfg.active: the flags are folded into the protocol
// field's key (bpf/fwp.c ACTIVE_FLAGS).
const activeFlags = 1 << 31

// activeNoTrie << which in layer_cfg.active: the remote (0) or local (1)
// address field has no prefix in the LPM trie in this generation; the
// hook then skips the trie lookup after a host table miss (bpf/fwp.c
// ACTIVE_NO_TRIE).
const activeNoTrie = 1 << 16

// activeWord is the layer's layer_cfg.active as the hook reads it: the
// fields with conditions, the flags bit, and which address fields have an
// empty trie.
func (lp *layerPolicy) activeWord() uint32 {
	a := lp.active
	for which := range lp.addrs {
		if len(lp.addrs[which]) == 0 {
			a |= activeNoTrie << which
		}
	}
	return a
}

// flagIndexBits are the condition flags the hooks know, by their bit in
// the flags index the kernel computes (bpf/fwp.c tuple_flags: TF_*). Every
// other flag (IS_REAUTHORIZE: a hook classifies each connect once,
// IS_IPSEC_SECURED...) is clear in the kernel's flags value.
var flagIndexBits = [...]uint32{engine.FlagIsLoopback, engine.FlagIsWildcardBind, engine.FlagIsConnectionRedirected}

// flagsOf is the flags value of a flags index.
func flagsOf(idx uint64) uint64 {
	var v uint32
	for i, b := range flagIndexBits {
		if idx&(1<<i) != 0 {
			v |= b
		}
	}
	return uint64(v)
}

// flagIndices are the flags indices the hooks compute at a layer:
// loopback wherever there is a remote address, wildcard bind at the bind
// layers, connection redirected at AUTH_CONNECT.
func flagIndices(k engine.LayerKind) []uint64 {
	switch k {
	case engine.KindAuthConnect:
		return []uint64{0, 1, 4, 5}
	case engine.KindBindRedirect, engine.KindResourceAssignment:
		return []uint64{0, 2}
	case engine.KindAuthListen:
		return []uint64{0} // no remote endpoint (bpf/fwp.c tuple_flags)
	}
	return []uint64{0, 1}
}

// flagIndex is the flags index the hooks compute for the engine's flags
// value v (the bits they do not know dropped).
func flagIndex(v uint32) uint64 {
	var idx uint64
	for i, b := range flagIndexBits {
		if v&b != 0 {
			idx |= 1 << i
		}
	}
	return idx
}

// compileProto enumerates the 256 protocol numbers: every integer match
// works. With flag conditions (fg), the flags are folded into the key: the
// kernel looks up proto | flags index << 8, and each of the few flag values
// the layer's hook can compute is enumerated with each protocol.
func (lp *layerPolicy) compileProto(g [][]engine.Condition, wild bitvec, fg [][]engine.Condition, fwild bitvec) error {
	for _, gs := range [][][]engine.Condition{g, fg} {
		for r, cs := range gs {
			for _, c := range cs {
				if c.Match > engine.MatchFlagsNoneSet && c.Match != engine.MatchNotEqual {
					return rankError{r, fmt.Errorf("%w: %s", ErrNotSupported, c)}
				}
			}
		}
	}
	c := &lp.classes[fieldProto]
	m := map[uint64]uint32{}
	idxs := []uint64{0}
	if fg != nil {
		idxs = flagIndices(lp.layer.Kind())
		// A lookup that misses (none should) matches no filter with
		// conditions on either.
		def := wild.clone()
		for i := range def {
			def[i] &= fwild[i]
		}
		lp.def[fieldProto] = c.intern(def)
		lp.empty[fieldProto] = lp.def[fieldProto]
	}
	for _, idx := range idxs {
		fb := fwild
		if fg != nil {
			fb = fwild.clone()
			fv := flagsOf(idx)
			for r, cs := range fg {
				for _, cond := range cs {
					if matchInt(cond, fv) {
						fb.set(r)
						break
					}
				}
			}
		}
		for v := uint64(0); v < 256; v++ {
			b := wild.clone()
			for r, cs := range g {
				for _, cond := range cs {
					if matchInt(cond, v) {
						b.set(r)
						break
					}
				}
			}
			if fb != nil {
				for i := range b {
					b[i] &= fb[i]
				}
			}
			m[v|idx<<8] = c.intern(b)
		}
	}
	lp.ints[0] = m
	return nil
}

// compileIDs handles user, group and cgroup ids: EQUAL and NOT_EQUAL only, each
// mentioned id with its class, every other id in the default class.
func (lp *layerPolicy) compileIDs(f int, g [][]engine.Condition, wild bitvec) error {
	eq := map[uint64][]int{}
	var neRanks []int
	for r, cs := range g {
		hasNE := false
		for _, c := range cs {
			switch c.Match {
			case engine.MatchEqual:
				eq[c.Value.Uint()] = append(eq[c.Value.Uint()], r)
			case engine.MatchNotEqual:
				hasNE = true
				if _, ok := eq[c.Value.Uint()]; !ok {
					eq[c.Value.Uint()] = nil
				}
			default:
				return rankError{r, fmt.Errorf("%w: %s: the kernel matches ids only with equal and not_equal", ErrNotSupported, c)}
			}
		}
		if hasNE {
			neRanks = append(neRanks, r)
		}
	}
	c := &lp.classes[f]
	def := wild.clone()
	for _, r := range neRanks {
		def.set(r)
	}
	lp.def[f] = c.intern(def)
	m := map[uint64]uint32{}
	for v, ranks := range eq {
		b := wild.clone()
		for _, r := range ranks {
			b.set(r)
		}
		for _, r := range neRanks {
			for _, cond := range g[r] {
				if matchInt(cond, v) {
					b.set(r)
					break
				}
			}
		}
		m[v] = c.intern(b)
	}
	if f == fieldGID {
		lp.gids = m
	} else {
		lp.ints[f-fieldProto] = m
	}
	return nil
}

// kernelBitset returns the bitset in the kernel's layout: a summary word per 64
// words, one bit per nonzero word, then the words.
func kernelBitset(b bitvec) *fwpBitset {
	var k fwpBitset
	copy(k.W[:], b)
	for i, w := range b {
		if w != 0 {
			k.Sum[i/64] |= 1 << (i % 64)
		}
	}
	return &k
}
