package calloutwire

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"reflect"
	"testing"

	"fwp/engine"
)

func sampleMessages() []Message {
	var vs engine.Values
	vs.SetTuple(6, netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("[2001:db8::1]:443"))
	vs.Set(engine.FieldALEAppID, engine.String("/usr/bin/curl"))
	vs.Set(engine.FieldFlags, engine.Uint32(engine.FlagIsReauthorize))
	meta := &engine.Metadata{Present: engine.MetaProcessID | engine.MetaFlowHandle | engine.MetaRedirectRecords | engine.MetaRedirectContext,
		ProcessID: 77, ProcessPath: "/bin/x", FlowHandle: 9, OriginalDestination: netip.MustParseAddrPort("1.2.3.4:5"),
		RedirectRecords: engine.NewRedirectRecords(engine.RedirectRecord{Handle: 3, Callout: 4, Filter: 5, TargetPID: 6,
			Original: netip.MustParseAddrPort("1.1.1.1:1"), Redirected: netip.MustParseAddrPort("127.0.0.1:2")}),
		RedirectContext: []byte("ctx")}
	f := &engine.Filter{ID: 12, Key: "k", Name: "n", Layer: engine.LayerALEConnectRedirectV4, Sublayer: 3, EffectiveWeight: 1 << 61,
		Action: engine.Action{Type: engine.ActionCalloutUnknown, Callout: 7}, ProviderContext: 2, Flags: engine.FilterPermitIfCalloutUnregistered}
	prev := &engine.ConnectRequest{LocalAddressAndPort: netip.MustParseAddrPort("10.0.0.1:40000"), RemoteAddressAndPort: netip.MustParseAddrPort("1.1.1.1:80")}
	cur := &engine.ConnectRequest{LocalAddressAndPort: prev.LocalAddressAndPort, RemoteAddressAndPort: netip.MustParseAddrPort("127.0.0.1:3128"),
		LocalRedirectTargetPID: 42, LocalRedirectHandle: 5, LocalRedirectContext: []byte{1, 2}, ModifierFilterID: 11, PreviousVersion: prev}
	app := Applied{Connect: &engine.ConnectRequest{RemoteAddressAndPort: netip.MustParseAddrPort("127.0.0.1:1"), LocalRedirectTargetPID: 1,
		LocalRedirectHandle: 2, LocalRedirectContext: []byte("c")}, ApplyFlags: engine.ApplyReauthorizeIfModifiedByOthers}
	return []Message{
		Register{Key: "x", DeadlineMicros: 5000, Flags: engine.CalloutConditionalOnFlow},
		Registered{Code: CodeOK, Body: []byte{1}},
		Reply{ID: 3, Code: CodeAccessDenied, Msg: "no"},
		Classify{ID: 1, Layer: engine.LayerALEConnectRedirectV4, Values: &vs, Meta: meta, Filter: f, ProviderContext: []byte("pc"), Rights: 1, Connect: cur},
		Classify{ID: 2, Layer: engine.LayerALEBindRedirectV4, Values: &vs, Meta: &engine.Metadata{}, Filter: f,
			Bind: &engine.BindRequest{LocalAddressAndPort: netip.MustParseAddrPort("0.0.0.0:80"), ModifierFilterID: 1}},
		Answer{ID: 1, Out: engine.ClassifyOut{Action: engine.ActionBlock, Flags: engine.OutAbsorb}, PendKind: PendOperation, PendID: 8},
		Answer{ID: 2, Out: engine.ClassifyOut{Action: engine.ActionPermit, Rights: 1}, Applied: app},
		Answer{ID: 3, Applied: Applied{Bind: &engine.BindRequest{LocalAddressAndPort: netip.MustParseAddrPort("[::1]:9")}}},
		Complete{PendID: 8, Out: engine.ClassifyOut{Action: engine.ActionPermit}, Reinject: true, Applied: app},
		PendDone{PendID: 8},
		Notify{Kind: engine.NotifyAddFilter, Filter: *f},
		FlowDelete{Flow: 1, Layer: engine.LayerALEFlowEstablishedV4, Callout: 2},
		FlowContext{Flow: 1, Layer: engine.LayerALEFlowEstablishedV4, Callout: 2, Add: true},
		Request{ID: 4, Op: OpClassify, Body: AppendClassifyArgs(nil, &ClassifyArgs{Layer: engine.LayerALEAuthConnectV4, Values: vs, Meta: *meta})},
	}
}

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	msgs := sampleMessages()
	for _, m := range msgs {
		if err := w.Send(m); err != nil {
			t.Fatal(err)
		}
	}
	r := NewReader(&buf)
	for i, want := range msgs {
		got, err := r.Next()
		if err != nil {
			t.Fatalf("message %d (%s): %v", i, want.Type(), err)
		}
		// Compare encodings: values hold unexported fields and pointers.
		if a, b := AppendFrame(nil, got), AppendFrame(nil, want); !bytes.Equal(a, b) {
			t.Fatalf("message %d (%s) changed:\n got %+v\nwant %+v", i, want.Type(), got, want)
		}
		if reflect.TypeOf(got) != reflect.TypeOf(want) {
			t.Fatalf("message %d: %T, want %T", i, got, want)
		}
	}
	if _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("at the end: %v", err)
	}
	args, err := DecodeClassifyArgs(msgs[len(msgs)-1].(Request).Body)
	if err != nil || args.Values.Get(engine.FieldALEAppID).Str() != "/usr/bin/curl" || args.Meta.RedirectRecords.Len() != 1 {
		t.Fatalf("classify args: %+v %v", args, err)
	}
	res := Result{Out: engine.ClassifyOut{Action: engine.ActionPermit}, Filter: 3, Reason: engine.ReasonCalloutPermit, Records: []byte("r")}
	got, err := DecodeResult(AppendResult(nil, &res))
	if err != nil || got.Filter != 3 || string(got.Records) != "r" {
		t.Fatalf("result: %+v %v", got, err)
	}
}

// Every truncation of every sample frame is a typed error, never a panic
// or a silently shorter message.
func TestTruncatedAndMalformed(t *testing.T) {
	for _, m := range sampleMessages() {
		f := AppendFrame(nil, m)
		for n := 0; n < len(f); n++ {
			_, err := NewReader(bytes.NewReader(f[:n])).Next()
			if n == 0 {
				if !errors.Is(err, io.EOF) {
					t.Fatalf("%s: empty input: %v", m.Type(), err)
				}
				continue
			}
			if n < 4 {
				continue // a short header is io.ErrUnexpectedEOF
			}
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("%s truncated to %d of %d bytes: %v", m.Type(), n, len(f), err)
			}
		}
		// The body cut short with a consistent length: the decoder's own check.
		for n := 1; n < len(f)-4; n++ {
			if _, err := Decode(f[4 : 4+n]); !errors.Is(err, ErrMalformed) {
				t.Fatalf("%s body cut to %d bytes decoded: %v", m.Type(), n, err)
			}
		}
	}
	for _, bad := range [][]byte{
		{0, 0, 0, 0},                        // zero length
		{0xff, 0xff, 0xff, 0xff},            // too long
		{0, 0, 0, 1, 99},                    // unknown type
		{0, 0, 0, 2, byte(TPendDone), 0x80}, // unterminated varint
	} {
		if _, err := NewReader(bytes.NewReader(bad)).Next(); !errors.Is(err, ErrMalformed) {
			t.Fatalf("% x: %v", bad, err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	for _, m := range sampleMessages() {
		f.Add(AppendFrame(nil, m)[4:])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		// What decodes re-encodes to something that decodes the same.
		again, err := Decode(AppendFrame(nil, m)[4:])
		if err != nil {
			t.Fatalf("re-encoding of %+v does not decode: %v", m, err)
		}
		if a, b := AppendFrame(nil, again), AppendFrame(nil, m); !bytes.Equal(a, b) {
			t.Fatalf("unstable: %+v vs %+v", m, again)
		}
		if r, ok := m.(Request); ok {
			_, _ = DecodeClassifyArgs(r.Body)
			_, _ = DecodeResult(r.Body)
		}
		checkInPlace(t, b, m)
	})
}

// checkInPlace: the in-place decoders (DecodeClassify into a Classify a
// previous call filled, DecodeAnswer) agree with Decode on a frame Decode
// accepted.
func checkInPlace(t *testing.T, b []byte, m Message) {
	t.Helper()
	switch m := m.(type) {
	case Classify:
		var c Classify
		for _, s := range sampleMessages() { // dirty it with a full previous call
			if prev, ok := s.(Classify); ok {
				if err := DecodeClassify(AppendFrame(nil, prev)[4:], &c); err != nil {
					t.Fatal(err)
				}
				break
			}
		}
		if err := DecodeClassify(b, &c); err != nil {
			t.Fatalf("DecodeClassify refused what Decode took: %v", err)
		}
		if a, b := AppendFrame(nil, c), AppendFrame(nil, m); !bytes.Equal(a, b) {
			t.Fatalf("in place %+v, Decode %+v", c, m)
		}
	case Answer:
		var a Answer
		if err := DecodeAnswer(b, &a); err != nil || !bytes.Equal(AppendFrame(nil, a), AppendFrame(nil, m)) {
			t.Fatalf("DecodeAnswer %+v %v, Decode %+v", a, err, m)
		}
	}
}

// The in-place decoders on every sample, each decoded into a Classify the
// previous one filled (strings and bytes reused or not), and on every
// truncation: the same result as Decode, the same typed errors.
func TestDecodeInPlace(t *testing.T) {
	var c Classify
	for _, m := range sampleMessages() {
		f := AppendFrame(nil, m)[4:]
		checkInPlace(t, f, m)
		for n := 1; n < len(f); n++ {
			switch m.Type() {
			case TClassify:
				if err := DecodeClassify(f[:n], &c); !errors.Is(err, ErrMalformed) {
					t.Fatalf("classify cut to %d bytes: %v", n, err)
				}
			case TAnswer:
				var a Answer
				if err := DecodeAnswer(f[:n], &a); !errors.Is(err, ErrMalformed) {
					t.Fatalf("answer cut to %d bytes: %v", n, err)
				}
			}
		}
	}
	// A decoded string stays what it was when the next call differs.
	var vs engine.Values
	vs.Set(engine.FieldALEAppID, engine.String("/bin/a"))
	one := Classify{Layer: engine.LayerALEAuthConnectV4, Values: &vs, Meta: &engine.Metadata{}, Filter: &engine.Filter{Key: "k1"}}
	if err := DecodeClassify(AppendFrame(nil, one)[4:], &c); err != nil {
		t.Fatal(err)
	}
	app, key := c.Values.Get(engine.FieldALEAppID).Str(), c.Filter.Key
	vs.Set(engine.FieldALEAppID, engine.String("/bin/b"))
	one.Filter.Key = "k2"
	if err := DecodeClassify(AppendFrame(nil, one)[4:], &c); err != nil {
		t.Fatal(err)
	}
	if app != "/bin/a" || key != "k1" || c.Values.Get(engine.FieldALEAppID).Str() != "/bin/b" || c.Filter.Key != "k2" {
		t.Fatalf("kept %q %q, now %q %q", app, key, c.Values.Get(engine.FieldALEAppID).Str(), c.Filter.Key)
	}
	if DecodeClassify([]byte{byte(TAnswer)}, &c) == nil || DecodeAnswer([]byte{byte(TClassify)}, &Answer{}) == nil {
		t.Fatal("a frame of another type decoded")
	}
}
