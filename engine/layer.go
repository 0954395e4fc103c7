package engine

import (
	"fmt"
	"strings"
)

// LayerID names one filtering layer. The values are fwp's own (WFP's layer
// IDs are GUIDs and runtime numbers that differ per Windows build).
type LayerID uint16

// The ALE layers, v4 and v6 each, in the order a connection meets them.
const (
	LayerInvalid LayerID = iota
	LayerALEConnectRedirectV4
	LayerALEConnectRedirectV6
	LayerALEBindRedirectV4
	LayerALEBindRedirectV6
	LayerALEResourceAssignmentV4
	LayerALEResourceAssignmentV6
	LayerALEResourceReleaseV4
	LayerALEResourceReleaseV6
	LayerALEAuthListenV4
	LayerALEAuthListenV6
	LayerALEAuthConnectV4
	LayerALEAuthConnectV6
	LayerALEAuthRecvAcceptV4
	LayerALEAuthRecvAcceptV6
	LayerALEFlowEstablishedV4
	LayerALEFlowEstablishedV6
	LayerALEEndpointClosureV4
	LayerALEEndpointClosureV6
	numLayers
)

// NumLayers is the number of layers in the catalog (LayerID 1..NumLayers).
const NumLayers = int(numLayers) - 1

// FieldID names one classifiable field (WFP's FWPM_CONDITION_*).
type FieldID uint8

// The fields. Linux additions carry the WFP concept they stand for.
const (
	FieldInvalid FieldID = iota
	FieldIPLocalAddress
	FieldIPRemoteAddress
	FieldIPLocalPort
	FieldIPRemotePort
	FieldIPProtocol
	FieldIPLocalInterface
	FieldALEAppID   // executable path (WFP: ALE_APP_ID)
	FieldALEUserID  // uid (WFP: ALE_USER_ID, a token)
	FieldALEGroupID // gid
	FieldFlags      // FWP_CONDITION_FLAG_* bits
	FieldDirection  // Direction
	FieldALEOriginalRemoteAddress
	FieldALEOriginalRemotePort
	FieldCgroupID    // cgroup v2 id (WFP: app container / service SID)
	FieldCgroupPath  // cgroup v2 path
	FieldCompartment // network namespace inode (WFP: COMPARTMENT_ID)
	numFields
)

// NumFields is the number of fields (FieldID 1..NumFields).
const NumFields = int(numFields) - 1

// Type is the type of a field or of a condition value.
type Type uint8

// Value types. A condition on a field of type T takes a value of type T,
// or a Range of T; an address field also takes a Prefix.
const (
	TypeEmpty Type = iota
	TypeUint8
	TypeUint16
	TypeUint32
	TypeUint64
	TypeAddr
	TypePrefix
	TypeRange
	TypeBytes
	TypeString
	// TypeList is a list condition's value: many values of the field's
	// type, which the condition ORs (ListValue).
	TypeList
)

var typeNames = [...]string{"empty", "uint8", "uint16", "uint32", "uint64", "addr", "prefix", "range", "bytes", "string", "list"}

func (t Type) String() string {
	if int(t) < len(typeNames) {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

func (t Type) isInt() bool { return t >= TypeUint8 && t <= TypeUint64 }

type fieldInfo struct {
	name string
	typ  Type
	doc  string
}

var fields = [numFields]fieldInfo{
	FieldIPLocalAddress:           {"ip_local_address", TypeAddr, "local IP address"},
	FieldIPRemoteAddress:          {"ip_remote_address", TypeAddr, "remote IP address"},
	FieldIPLocalPort:              {"ip_local_port", TypeUint16, "local transport port"},
	FieldIPRemotePort:             {"ip_remote_port", TypeUint16, "remote transport port"},
	FieldIPProtocol:               {"ip_protocol", TypeUint8, "IP protocol number (6 tcp, 17 udp, 1 icmp, 58 icmpv6)"},
	FieldIPLocalInterface:         {"ip_local_interface", TypeUint32, "interface index"},
	FieldALEAppID:                 {"ale_app_id", TypeString, "executable path of the process (WFP app id)"},
	FieldALEUserID:                {"ale_user_id", TypeUint32, "uid of the process"},
	FieldALEGroupID:               {"ale_group_id", TypeUint32, "gid of the process"},
	FieldFlags:                    {"flags", TypeUint32, "FWP_CONDITION_FLAG_* bits (loopback, reauthorize, connection redirected...)"},
	FieldDirection:                {"direction", TypeUint32, "0 outbound, 1 inbound"},
	FieldALEOriginalRemoteAddress: {"ale_original_remote_address", TypeAddr, "destination before a connect redirect"},
	FieldALEOriginalRemotePort:    {"ale_original_remote_port", TypeUint16, "destination port before a connect redirect"},
	FieldCgroupID:                 {"cgroup_id", TypeUint64, "cgroup v2 id (WFP app container / service SID)"},
	FieldCgroupPath:               {"cgroup_path", TypeString, "cgroup v2 path"},
	FieldCompartment:              {"compartment", TypeUint64, "network namespace inode (WFP compartment)"},
}

// Name is the field's stable name, used in policy files and the CLI.
func (f FieldID) Name() string {
	if f > FieldInvalid && f < numFields {
		return fields[f].name
	}
	return fmt.Sprintf("field(%d)", uint8(f))
}

func (f FieldID) String() string { return f.Name() }

// Type is the type of the field's value.
func (f FieldID) Type() Type {
	if f > FieldInvalid && f < numFields {
		return fields[f].typ
	}
	return TypeEmpty
}

// Doc says what the field holds.
func (f FieldID) Doc() string {
	if f > FieldInvalid && f < numFields {
		return fields[f].doc
	}
	return ""
}

// FieldByName finds a field by its name (case-insensitive).
func FieldByName(name string) (FieldID, bool) {
	for f := FieldID(1); f < numFields; f++ {
		if strings.EqualFold(fields[f].name, name) {
			return f, true
		}
	}
	return FieldInvalid, false
}

// Condition flag bits of FieldFlags, with WFP's values.
const (
	FlagIsLoopback             uint32 = 0x00000001
	FlagIsIPsecSecured         uint32 = 0x00000002
	FlagIsReauthorize          uint32 = 0x00000004
	FlagIsWildcardBind         uint32 = 0x00000008
	FlagIsRawEndpoint          uint32 = 0x00000010
	FlagIsImplicitBind         uint32 = 0x00000200
	FlagIsReclassify           uint32 = 0x00020000
	FlagIsConnectionRedirected uint32 = 0x00100000
)

// Direction of a flow (WFP's FWP_DIRECTION).
type Direction uint32

const (
	DirectionOutbound Direction = 0
	DirectionInbound  Direction = 1
)

func (d Direction) String() string {
	if d == DirectionInbound {
		return "inbound"
	}
	return "outbound"
}

// LayerKind groups the v4 and v6 layer of one ALE stage.
type LayerKind uint8

const (
	KindInvalid LayerKind = iota
	KindConnectRedirect
	KindBindRedirect
	KindResourceAssignment
	KindResourceRelease
	KindAuthListen
	KindAuthConnect
	KindAuthRecvAccept
	KindFlowEstablished
	KindEndpointClosure
)

// Layer describes one layer: its name, family and field schema.
type Layer struct {
	ID     LayerID
	Name   string // WFP's name without the FWPM_LAYER_ prefix, e.g. ALE_AUTH_CONNECT_V4
	Kind   LayerKind
	V6     bool
	Fields []FieldID
	// CanPendOperation: a callout may PendOperation here (seed 002).
	CanPendOperation bool
	// CanPendClassify: a callout may PendClassify here (seeds 001, 003).
	CanPendClassify bool
	// Writable is the kind of writable layer data a redirect callout gets.
	Writable WritableKind

	fieldSet uint64
}

// WritableKind is the kind of writable layer data of a layer.
type WritableKind uint8

const (
	WritableNone WritableKind = iota
	WritableConnectRequest
	WritableBindRequest
)

// HasField reports whether f is in the layer's schema.
func (l *Layer) HasField(f FieldID) bool { return l != nil && f < 64 && l.fieldSet&(1<<f) != 0 }

var layers [numLayers]Layer

func init() {
	local := []FieldID{FieldIPLocalAddress, FieldIPLocalPort, FieldIPProtocol}
	proc := []FieldID{FieldALEAppID, FieldALEUserID, FieldALEGroupID, FieldCgroupID, FieldCgroupPath, FieldCompartment, FieldFlags}
	tuple := append(append([]FieldID{}, local...), FieldIPRemoteAddress, FieldIPRemotePort)
	join := func(parts ...[]FieldID) []FieldID {
		var out []FieldID
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	type def struct {
		kind   LayerKind
		name   string
		fields []FieldID
		pendOp bool
		pendCl bool
		wr     WritableKind
	}
	defs := []def{
		{KindConnectRedirect, "ALE_CONNECT_REDIRECT", join(tuple, proc, []FieldID{FieldIPLocalInterface}), false, true, WritableConnectRequest},
		{KindBindRedirect, "ALE_BIND_REDIRECT", join(local, proc), false, true, WritableBindRequest},
		{KindResourceAssignment, "ALE_RESOURCE_ASSIGNMENT", join(local, proc), true, false, WritableNone},
		{KindResourceRelease, "ALE_RESOURCE_RELEASE", join(local, proc), false, false, WritableNone},
		{KindAuthListen, "ALE_AUTH_LISTEN", join(local, proc), true, false, WritableNone},
		{KindAuthConnect, "ALE_AUTH_CONNECT", join(tuple, proc, []FieldID{FieldIPLocalInterface, FieldDirection, FieldALEOriginalRemoteAddress, FieldALEOriginalRemotePort}), true, false, WritableNone},
		{KindAuthRecvAccept, "ALE_AUTH_RECV_ACCEPT", join(tuple, proc, []FieldID{FieldIPLocalInterface, FieldDirection}), true, false, WritableNone},
		{KindFlowEstablished, "ALE_FLOW_ESTABLISHED", join(tuple, proc, []FieldID{FieldIPLocalInterface, FieldDirection, FieldALEOriginalRemoteAddress, FieldALEOriginalRemotePort}), false, false, WritableNone},
		{KindEndpointClosure, "ALE_ENDPOINT_CLOSURE", join(tuple, proc), false, true, WritableNone},
	}
	id := LayerID(1)
	for _, d := range defs {
		for _, v6 := range []bool{false, true} {
			suffix := "_V4"
			if v6 {
				suffix = "_V6"
			}
			l := Layer{ID: id, Name: d.name + suffix, Kind: d.kind, V6: v6, Fields: d.fields,
				CanPendOperation: d.pendOp, CanPendClassify: d.pendCl, Writable: d.wr}
			for _, f := range d.fields {
				l.fieldSet |= 1 << f
			}
			layers[id] = l
			id++
		}
	}
	if id != numLayers {
		panic("engine: layer catalog out of step with LayerID constants")
	}
}

// LayerByID returns the layer's description, or nil for an unknown ID.
func LayerByID(id LayerID) *Layer {
	if id == LayerInvalid || id >= numLayers {
		return nil
	}
	return &layers[id]
}

// Layers returns every layer, in LayerID order.
func Layers() []*Layer {
	out := make([]*Layer, 0, NumLayers)
	for id := LayerID(1); id < numLayers; id++ {
		out = append(out, &layers[id])
	}
	return out
}

// LayerByName finds a layer by name, with or without the FWPM_LAYER_ prefix,
// case-insensitive.
func LayerByName(name string) (LayerID, bool) {
	n := strings.TrimPrefix(strings.ToUpper(name), "FWPM_LAYER_")
	for id := LayerID(1); id < numLayers; id++ {
		if layers[id].Name == n {
			return id, true
		}
	}
	return LayerInvalid, false
}

// Valid reports whether id names a layer of the catalog.
func (id LayerID) Valid() bool { return id > LayerInvalid && id < numLayers }

func (id LayerID) String() string {
	if id.Valid() {
		return layers[id].Name
	}
	return fmt.Sprintf("layer(%d)", uint16(id))
}

// Kind is the ALE stage of the layer.
func (id LayerID) Kind() LayerKind {
	if id.Valid() {
		return layers[id].Kind
	}
	return KindInvalid
}

// V6 reports whether the layer is the IPv6 one.
func (id LayerID) V6() bool { return id.Valid() && layers[id].V6 }

// Sibling returns the layer of the same kind for the other IP family.
func (id LayerID) Sibling() LayerID {
	if !id.Valid() {
		return LayerInvalid
	}
	if layers[id].V6 {
		return id - 1
	}
	return id + 1
}

// LayerFor returns the layer of kind k for the IP family v6.
func LayerFor(k LayerKind, v6 bool) LayerID {
	if k == KindInvalid || k > KindEndpointClosure {
		return LayerInvalid
	}
	id := LayerID(1 + 2*(int(k)-1))
	if v6 {
		id++
	}
	return id
}
