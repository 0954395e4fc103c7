package engine_test

import (
	"strings"
	"testing"

	"fwp/engine"
)

var layerNames = []string{
	"ALE_CONNECT_REDIRECT", "ALE_BIND_REDIRECT", "ALE_RESOURCE_ASSIGNMENT", "ALE_RESOURCE_RELEASE",
	"ALE_AUTH_LISTEN", "ALE_AUTH_CONNECT", "ALE_AUTH_RECV_ACCEPT", "ALE_FLOW_ESTABLISHED", "ALE_ENDPOINT_CLOSURE",
}

func TestLayerCatalog(t *testing.T) {
	ls := engine.Layers()
	if len(ls) != 18 || engine.NumLayers != 18 {
		t.Fatalf("%d layers (NumLayers %d), want 18", len(ls), engine.NumLayers)
	}
	names := map[string]bool{}
	for i, l := range ls {
		if l.ID != engine.LayerID(i+1) || !l.ID.Valid() || engine.LayerByID(l.ID) != l {
			t.Errorf("layer %d: ID %d, LayerByID mismatch", i, l.ID)
		}
		if names[l.Name] {
			t.Errorf("duplicate layer name %s", l.Name)
		}
		names[l.Name] = true
		if l.ID.String() != l.Name || l.ID.V6() != l.V6 || l.ID.Kind() != l.Kind {
			t.Errorf("%s: accessors disagree", l.Name)
		}
	}
	for _, n := range layerNames {
		for _, fam := range []string{"_V4", "_V6"} {
			if !names[n+fam] {
				t.Errorf("missing layer %s%s", n, fam)
			}
		}
	}
	for _, id := range []engine.LayerID{engine.LayerInvalid, 19, 1000} {
		if id.Valid() || engine.LayerByID(id) != nil || id.Sibling() != engine.LayerInvalid || id.Kind() != engine.KindInvalid || id.V6() {
			t.Errorf("layer %d should be invalid", id)
		}
		if !strings.HasPrefix(id.String(), "layer(") {
			t.Errorf("invalid layer prints as %q", id)
		}
	}
}

// Each v4 layer has a v6 sibling of the same kind and schema.
func TestLayerSiblings(t *testing.T) {
	for _, l := range engine.Layers() {
		s := engine.LayerByID(l.ID.Sibling())
		if s == nil || s.V6 == l.V6 || s.Kind != l.Kind || s.ID.Sibling() != l.ID {
			t.Fatalf("%s: sibling %v", l.Name, s)
		}
		base := strings.TrimSuffix(strings.TrimSuffix(l.Name, "_V4"), "_V6")
		if want := base + map[bool]string{false: "_V4", true: "_V6"}[l.V6]; l.Name != want {
			t.Errorf("%s: family suffix does not match V6=%v", l.Name, l.V6)
		}
		if !strings.HasPrefix(s.Name, base) {
			t.Errorf("%s and %s are not one stage", l.Name, s.Name)
		}
		if len(s.Fields) != len(l.Fields) {
			t.Errorf("%s and %s differ in schema", l.Name, s.Name)
		}
		for _, f := range l.Fields {
			if !s.HasField(f) {
				t.Errorf("%s has %s, %s does not", l.Name, f, s.Name)
			}
		}
		if got := engine.LayerFor(l.Kind, l.V6); got != l.ID {
			t.Errorf("LayerFor(%d, %v) = %s, want %s", l.Kind, l.V6, got, l.Name)
		}
	}
	if engine.LayerFor(engine.KindInvalid, false) != engine.LayerInvalid || engine.LayerFor(99, true) != engine.LayerInvalid {
		t.Error("LayerFor of an invalid kind")
	}
}

func TestLayerByName(t *testing.T) {
	for _, tt := range []struct {
		name string
		want engine.LayerID
		ok   bool
	}{
		{"ALE_AUTH_CONNECT_V4", engine.LayerALEAuthConnectV4, true},
		{"FWPM_LAYER_ALE_AUTH_CONNECT_V6", engine.LayerALEAuthConnectV6, true},
		{"fwpm_layer_ale_bind_redirect_v4", engine.LayerALEBindRedirectV4, true},
		{"ale_endpoint_closure_v6", engine.LayerALEEndpointClosureV6, true},
		{"ALE_AUTH_CONNECT", 0, false},
		{"INBOUND_TRANSPORT_V4", 0, false},
		{"", 0, false},
	} {
		got, ok := engine.LayerByName(tt.name)
		if got != tt.want || ok != tt.ok {
			t.Errorf("LayerByName(%q) = %v, %v; want %v, %v", tt.name, got, ok, tt.want, tt.ok)
		}
	}
	for _, l := range engine.Layers() {
		if id, ok := engine.LayerByName(l.Name); !ok || id != l.ID {
			t.Errorf("LayerByName(%s) = %v", l.Name, id)
		}
	}
}

func TestFieldByName(t *testing.T) {
	seen := map[string]bool{}
	for f := engine.FieldID(1); int(f) <= engine.NumFields; f++ {
		name := f.Name()
		if name == "" || seen[name] || f.String() != name || f.Doc() == "" || f.Type() == engine.TypeEmpty {
			t.Errorf("field %d: name %q type %s doc %q", f, name, f.Type(), f.Doc())
		}
		seen[name] = true
		for _, n := range []string{name, strings.ToUpper(name)} {
			if got, ok := engine.FieldByName(n); !ok || got != f {
				t.Errorf("FieldByName(%q) = %v, %v", n, got, ok)
			}
		}
	}
	for _, n := range []string{"", "ip_remote", "nope"} {
		if _, ok := engine.FieldByName(n); ok {
			t.Errorf("FieldByName(%q) found something", n)
		}
	}
	for _, f := range []engine.FieldID{0, engine.FieldID(engine.NumFields + 1), 255} {
		if f.Type() != engine.TypeEmpty || f.Doc() != "" || !strings.HasPrefix(f.Name(), "field(") {
			t.Errorf("invalid field %d: %q %s", f, f.Name(), f.Type())
		}
	}
	types := map[engine.FieldID]engine.Type{
		engine.FieldIPLocalAddress: engine.TypeAddr, engine.FieldIPRemoteAddress: engine.TypeAddr,
		engine.FieldIPLocalPort: engine.TypeUint16, engine.FieldIPRemotePort: engine.TypeUint16,
		engine.FieldIPProtocol: engine.TypeUint8, engine.FieldALEAppID: engine.TypeString,
		engine.FieldALEUserID: engine.TypeUint32, engine.FieldFlags: engine.TypeUint32,
		engine.FieldALEOriginalRemoteAddress: engine.TypeAddr, engine.FieldALEOriginalRemotePort: engine.TypeUint16,
		engine.FieldCgroupID: engine.TypeUint64, engine.FieldCgroupPath: engine.TypeString, engine.FieldCompartment: engine.TypeUint64,
	}
	for f, typ := range types {
		if f.Type() != typ {
			t.Errorf("%s is %s, want %s", f, f.Type(), typ)
		}
	}
}

// The schemas follow WFP's per-layer condition lists, with fwp's Linux fields.
func TestLayerSchemas(t *testing.T) {
	local := []engine.FieldID{engine.FieldIPLocalAddress, engine.FieldIPLocalPort, engine.FieldIPProtocol}
	remote := []engine.FieldID{engine.FieldIPRemoteAddress, engine.FieldIPRemotePort}
	process := []engine.FieldID{engine.FieldALEAppID, engine.FieldALEUserID, engine.FieldCgroupID, engine.FieldCgroupPath, engine.FieldCompartment, engine.FieldFlags}
	orig := []engine.FieldID{engine.FieldALEOriginalRemoteAddress, engine.FieldALEOriginalRemotePort}
	type schema struct {
		has, lacks []engine.FieldID
	}
	cat := func(parts ...[]engine.FieldID) []engine.FieldID {
		var out []engine.FieldID
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	dir := []engine.FieldID{engine.FieldDirection}
	want := map[engine.LayerKind]schema{
		engine.KindConnectRedirect:    {cat(local, remote, process), cat(orig, dir)},
		engine.KindBindRedirect:       {cat(local, process), cat(remote, orig, dir)},
		engine.KindResourceAssignment: {cat(local, process), cat(remote, orig)},
		engine.KindResourceRelease:    {cat(local, process), cat(remote, orig)},
		engine.KindAuthListen:         {cat(local, process), cat(remote, orig)},
		engine.KindAuthConnect:        {cat(local, remote, process, orig, dir), nil},
		engine.KindAuthRecvAccept:     {cat(local, remote, process, dir), orig},
		engine.KindFlowEstablished:    {cat(local, remote, process, orig, dir), nil},
		engine.KindEndpointClosure:    {cat(local, remote, process), orig},
	}
	for _, l := range engine.Layers() {
		s, ok := want[l.Kind]
		if !ok {
			t.Fatalf("%s: unexpected kind %d", l.Name, l.Kind)
		}
		for _, f := range s.has {
			if !l.HasField(f) {
				t.Errorf("%s lacks %s", l.Name, f)
			}
		}
		for _, f := range s.lacks {
			if l.HasField(f) {
				t.Errorf("%s has %s", l.Name, f)
			}
		}
		seen := map[engine.FieldID]bool{}
		for _, f := range l.Fields {
			if seen[f] || f.Type() == engine.TypeEmpty || !l.HasField(f) {
				t.Errorf("%s: field %s duplicated or invalid", l.Name, f)
			}
			seen[f] = true
		}
		if l.HasField(0) || l.HasField(200) {
			t.Errorf("%s: HasField of an invalid field", l.Name)
		}
	}
	var nilLayer *engine.Layer
	if nilLayer.HasField(engine.FieldIPProtocol) {
		t.Error("nil layer has a field")
	}
}

// Where a callout may pend and what layer data it may write (design.md,
// Pend and Redirection).
func TestLayerCapabilities(t *testing.T) {
	op := map[engine.LayerKind]bool{engine.KindAuthConnect: true, engine.KindAuthRecvAccept: true, engine.KindAuthListen: true, engine.KindResourceAssignment: true}
	cl := map[engine.LayerKind]bool{engine.KindConnectRedirect: true, engine.KindBindRedirect: true, engine.KindEndpointClosure: true}
	wr := map[engine.LayerKind]engine.WritableKind{engine.KindConnectRedirect: engine.WritableConnectRequest, engine.KindBindRedirect: engine.WritableBindRequest}
	for _, l := range engine.Layers() {
		if l.CanPendOperation != op[l.Kind] || l.CanPendClassify != cl[l.Kind] || l.Writable != wr[l.Kind] {
			t.Errorf("%s: pend operation %v, pend classify %v, writable %d", l.Name, l.CanPendOperation, l.CanPendClassify, l.Writable)
		}
	}
}
