package engine

import (
	"fmt"
	"net/netip"
	"strconv"
)

// Each object kind has its own ID type, so a filter ID cannot be passed
// where a callout ID is wanted. IDs are assigned by the engine, start at 1
// and are never reused within one engine.
type (
	ProviderID        uint32
	ProviderContextID uint64
	SublayerID        uint32
	FilterID          uint64
	CalloutID         uint32
)

func (id ProviderID) String() string        { return "provider#" + strconv.FormatUint(uint64(id), 10) }
func (id ProviderContextID) String() string { return "context#" + strconv.FormatUint(uint64(id), 10) }
func (id SublayerID) String() string        { return "sublayer#" + strconv.FormatUint(uint64(id), 10) }
func (id FilterID) String() string          { return "filter#" + strconv.FormatUint(uint64(id), 10) }
func (id CalloutID) String() string         { return "callout#" + strconv.FormatUint(uint64(id), 10) }

// Provider identifies the product that owns objects (WFP's FWPM_PROVIDER0).
type Provider struct {
	ID          ProviderID
	Key         string // unique; generated when empty
	Name        string
	Description string
}

// ProviderContext is provider data a filter hands to its callout
// (WFP's FWPM_PROVIDER_CONTEXT0), e.g. a proxy's address for a redirect.
type ProviderContext struct {
	ID       ProviderContextID
	Key      string
	Name     string
	Provider ProviderID // optional
	Data     []byte
}

// UniversalSublayer is the sublayer a filter with Sublayer 0 goes to
// (WFP's FWPM_SUBLAYER_UNIVERSAL). It exists in every engine.
const UniversalSublayer SublayerID = 1

// Sublayer groups filters; each sublayer reaches its own decision and the
// sublayers' decisions are arbitrated (WFP's FWPM_SUBLAYER0).
type Sublayer struct {
	ID       SublayerID
	Key      string
	Name     string
	Provider ProviderID // optional
	Weight   uint16     // higher is evaluated first
}

// ActionType is a filter's action, and what a callout returns.
type ActionType uint8

const (
	ActionBlock              ActionType = 1
	ActionPermit             ActionType = 2
	ActionCalloutTerminating ActionType = 3 // callout must return permit or block
	ActionCalloutInspection  ActionType = 4 // callout must return continue
	ActionCalloutUnknown     ActionType = 5 // callout may return anything
	ActionContinue           ActionType = 6 // a callout's "no opinion"
)

var actionNames = map[ActionType]string{
	ActionBlock: "block", ActionPermit: "permit", ActionCalloutTerminating: "callout_terminating",
	ActionCalloutInspection: "callout_inspection", ActionCalloutUnknown: "callout_unknown", ActionContinue: "continue",
}

func (a ActionType) String() string {
	if s, ok := actionNames[a]; ok {
		return s
	}
	return fmt.Sprintf("action(%d)", uint8(a))
}

// ActionTypeByName finds an action type by name (case-insensitive).
func ActionTypeByName(name string) (ActionType, bool) {
	for a, n := range actionNames {
		if equalFoldASCII(n, name) {
			return a, true
		}
	}
	return 0, false
}

func equalFoldASCII(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// IsCallout reports whether the action calls a callout.
func (a ActionType) IsCallout() bool {
	return a == ActionCalloutTerminating || a == ActionCalloutInspection || a == ActionCalloutUnknown
}

// Action is a filter's action (WFP's FWPM_ACTION0).
type Action struct {
	Type    ActionType
	Callout CalloutID // for the callout action types
}

// FilterFlags are a filter's flags (WFP's FWPM_FILTER_FLAG_*).
type FilterFlags uint32

const (
	// FilterClearActionRight makes the filter's decision hard: lower
	// sublayers cannot override it (only a callout veto can block a hard permit).
	FilterClearActionRight FilterFlags = 1 << 0
	// FilterPermitIfCalloutUnregistered makes a terminating filter whose
	// callout is not registered permit instead of block: fail-open.
	FilterPermitIfCalloutUnregistered FilterFlags = 1 << 1
	// FilterDisabled keeps the filter in the engine but out of classification.
	FilterDisabled FilterFlags = 1 << 2
	// FilterIndexed is accepted for WFP compatibility; fwp indexes every filter.
	FilterIndexed FilterFlags = 1 << 3

	filterFlagsAll = FilterClearActionRight | FilterPermitIfCalloutUnregistered | FilterDisabled | FilterIndexed
)

func (f FilterFlags) String() string {
	s := ""
	add := func(b FilterFlags, n string) {
		if f&b != 0 {
			if s != "" {
				s += "|"
			}
			s += n
		}
	}
	add(FilterClearActionRight, "clear_action_right")
	add(FilterPermitIfCalloutUnregistered, "permit_if_callout_unregistered")
	add(FilterDisabled, "disabled")
	add(FilterIndexed, "indexed")
	if s == "" {
		return "none"
	}
	return s
}

// Weight is a filter's weight as given: automatic (the zero value), a range
// index 0–15 (top four bits; the rest auto-assigned), or an explicit uint64.
type Weight struct {
	kind  uint8 // 0 auto, 1 index, 2 exact
	value uint64
}

// WeightAuto lets the engine assign the weight from the conditions; it is
// range index 0 with the low 60 bits auto-assigned.
func WeightAuto() Weight { return Weight{} }

// WeightIndex sets the top four bits to i (0–15); the rest is auto-assigned.
func WeightIndex(i uint8) Weight { return Weight{kind: 1, value: uint64(i)} }

// WeightExact is an explicit 64-bit weight.
func WeightExact(w uint64) Weight { return Weight{kind: 2, value: w} }

// IsAuto, IsIndex and IsExact tell the weight's kind; Value is the index or
// the explicit weight.
func (w Weight) IsAuto() bool  { return w.kind == 0 }
func (w Weight) IsIndex() bool { return w.kind == 1 }
func (w Weight) IsExact() bool { return w.kind == 2 }
func (w Weight) Value() uint64 { return w.value }

func (w Weight) String() string {
	switch w.kind {
	case 1:
		return "index:" + strconv.FormatUint(w.value, 10)
	case 2:
		return strconv.FormatUint(w.value, 10)
	}
	return "auto"
}

// effective computes the 64-bit weight the filter is sorted by.
// Auto-assigned low bits grow with the conditions' specificity, so that
// within one range index more specific filters come first.
func (w Weight) effective(conds []Condition) (uint64, error) {
	const low = 1<<60 - 1
	switch w.kind {
	case 2:
		return w.value, nil
	case 1:
		if w.value > 15 {
			return 0, fmt.Errorf("%w: range index %d is not in 0..15", ErrInvalidWeight, w.value)
		}
	}
	var score uint64
	for _, c := range conds {
		score += c.specificity()
	}
	return w.value<<60 | min(score, low), nil
}

// Filter is one filter (WFP's FWPM_FILTER0).
type Filter struct {
	ID              FilterID // assigned by the engine
	Key             string   // unique; generated when empty
	Name            string
	Description     string
	Layer           LayerID
	Sublayer        SublayerID // 0: the universal sublayer
	Provider        ProviderID // optional
	Weight          Weight
	EffectiveWeight uint64 // set by the engine
	Conditions      []Condition
	Action          Action
	ProviderContext ProviderContextID // optional; its data reaches the callout
	Flags           FilterFlags
}

// CalloutFlags are a callout's flags.
type CalloutFlags uint32

const (
	// CalloutConditionalOnFlow: the callout is only called for flows that
	// have a context associated with it (FWP_CALLOUT_FLAG_CONDITIONAL_ON_FLOW).
	CalloutConditionalOnFlow CalloutFlags = 1 << 0
	// CalloutUsesProviderContext: filters using it should name a provider context.
	CalloutUsesProviderContext CalloutFlags = 1 << 1
	// CalloutExplainable, in a registration: the classify function only
	// computes its answer from the request (no pend, no flow context, no
	// state of its own), so Explain calls it instead of taking the
	// callout for unregistered. A datapath's built-in callouts are such.
	CalloutExplainable CalloutFlags = 1 << 2
)

// Callout is the management object of a callout (WFP's FWPM_CALLOUT0): its
// key, its applicable layer. The functions are registered separately with
// RegisterCallout, as a driver does with FwpsCalloutRegister; a filter whose
// callout has no registration acts as the PERMIT_IF_CALLOUT_UNREGISTERED
// flag says.
type Callout struct {
	ID       CalloutID
	Key      string // unique; the registration is looked up by it
	Name     string
	Provider ProviderID // optional
	Layer    LayerID    // the applicable layer
	Flags    CalloutFlags
}

// NotifyType says why a callout's notify function is called.
type NotifyType uint8

const (
	NotifyAddFilter NotifyType = iota + 1
	NotifyDeleteFilter
)

func (n NotifyType) String() string {
	if n == NotifyAddFilter {
		return "add_filter"
	}
	return "delete_filter"
}

// ClassifyFunc is a callout's classify function (WFP's classifyFn). It reads
// the request and writes its decision into out, honouring out.Rights: with
// the ACTION_WRITE right cleared it may only veto (return block). req and
// out are valid only during the call, as in WFP: keep neither (a pended
// classify is completed through its Pend, not through out).
type ClassifyFunc func(req *ClassifyRequest, out *ClassifyOut)

// NotifyFunc is called when a filter using the callout is added or deleted.
type NotifyFunc func(t NotifyType, f *Filter)

// FlowDeleteFunc is called once when a flow with a context of this callout ends.
type FlowDeleteFunc func(layer LayerID, callout CalloutID, flowContext any)

// CalloutRegistration holds a callout's Go functions (WFP's FWPS_CALLOUT).
type CalloutRegistration struct {
	Classify   ClassifyFunc
	Notify     NotifyFunc     // optional
	FlowDelete FlowDeleteFunc // optional
	Flags      CalloutFlags   // CalloutConditionalOnFlow
}

// Rights is the set of rights in a ClassifyOut.
type Rights uint32

// RightActionWrite is FWPS_RIGHT_ACTION_WRITE: whoever holds it may set the
// action; without it a callout may only veto.
const RightActionWrite Rights = 1

// OutFlags are ClassifyOut flags.
type OutFlags uint32

const (
	// OutAbsorb drops silently: no net event for the block (FWPS_CLASSIFY_OUT_FLAG_ABSORB).
	OutAbsorb OutFlags = 1 << 0
	// OutBufferLimitReached mirrors WFP's flag; fwp does not set it.
	OutBufferLimitReached OutFlags = 1 << 1
)

// ClassifyOut is a classify's outcome (WFP's FWPS_CLASSIFY_OUT0).
type ClassifyOut struct {
	Action ActionType
	Rights Rights
	Flags  OutFlags
}

// CanWrite reports whether the ACTION_WRITE right is held.
func (o *ClassifyOut) CanWrite() bool { return o.Rights&RightActionWrite != 0 }

// MetaField is one bit of Metadata.Present (WFP's FWPS_METADATA_FIELD_*).
type MetaField uint32

const (
	MetaProcessID MetaField = 1 << iota
	MetaProcessPath
	MetaUserID // WFP: token
	MetaFlowHandle
	MetaCompletionHandle
	MetaPacketDirection
	MetaTransportEndpointHandle
	MetaOriginalDestination
	MetaLocalRedirectTargetPID
	MetaRedirectRecords
	MetaSourceInterfaceIndex
	MetaDestinationInterfaceIndex
	MetaCompartmentID
	MetaParentEndpointHandle
	MetaCgroupID
	MetaRedirectContext
	MetaPathMTU       // WFP: FWPS_METADATA_FIELD_PATH_MTU
	MetaRemoteScopeID // WFP: FWPS_METADATA_FIELD_REMOTE_SCOPE_ID
)

// FlowHandle identifies a flow (a connection or a UDP association).
type FlowHandle uint64

// Metadata is the metadata of one classification (WFP's
// FWPS_INCOMING_METADATA_VALUES0): a field is valid only when its bit is in
// Present. A datapath sets what it truly knows and leaves the rest absent.
type Metadata struct {
	Present                   MetaField
	ProcessID                 uint32
	ProcessPath               string
	UserID                    uint32
	GroupID                   uint32
	FlowHandle                FlowHandle
	CompletionHandle          CompletionHandle // set by the engine where a pend is possible
	Direction                 Direction
	TransportEndpointHandle   uint64
	OriginalDestination       netip.AddrPort
	LocalRedirectTargetPID    uint32
	RedirectRecords           *RedirectRecords
	SourceInterfaceIndex      uint32
	DestinationInterfaceIndex uint32
	CompartmentID             uint64
	ParentEndpointHandle      uint64
	CgroupID                  uint64
	// RedirectContext is the redirecting callout's context bytes, seen at
	// AUTH_CONNECT after a redirect (WFP keeps them for the proxy's query).
	RedirectContext []byte
	// PathMTU is the path MTU of a connected socket (IP_MTU).
	PathMTU uint32
	// RemoteScopeID is the scope (interface index) of a zoned IPv6 remote
	// address, such as a link-local one: the zone the values drop.
	RemoteScopeID uint32
}

// Has reports whether a metadata field is present (FWPS_IS_METADATA_FIELD_PRESENT).
func (m *Metadata) Has(f MetaField) bool { return m != nil && m.Present&f != 0 }
