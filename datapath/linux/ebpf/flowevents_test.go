//go:build linux

package ebpf

import (
	"errors"
	"testing"
	"unsafe"

	"fwp/engine"
)

func encodeFlowEvent(ev fwpreauthFlowEvent) []byte {
	return append([]byte(nil), unsafe.Slice((*byte)(unsafe.Pointer(&ev)), unsafe.Sizeof(ev))...)
}

func TestDecodeFlowEvent(t *testing.T) {
	raw := fwpreauthFlowEvent{Cookie: 42, Type: 1, Family: 2, Sport: 40000, Dport: 80}
	raw.Note.Proto, raw.Note.Tgid, raw.Note.Uid = 6, 7, 1000
	copy(raw.Src[:], []byte{127, 0, 0, 1})
	copy(raw.Dst[:], []byte{127, 0, 0, 2})
	ev, err := DecodeFlowEvent(encodeFlowEvent(raw))
	if err != nil {
		t.Fatal(err)
	}
	f := ev.Flow
	if ev.Type != FlowEstablished || f.Cookie != 42 || f.SocketLocal.String() != "127.0.0.1:40000" || f.SocketRemote.String() != "127.0.0.2:80" ||
		f.PID != 7 || f.UID != 1000 || f.Protocol != 6 || f.Layer != engine.LayerALEAuthConnectV4 {
		t.Fatalf("%+v", ev)
	}
	for name, b := range map[string][]byte{
		"short":      encodeFlowEvent(raw)[:flowEventSize-1],
		"bad type":   encodeFlowEvent(fwpreauthFlowEvent{Type: 3, Family: 2}),
		"bad family": encodeFlowEvent(fwpreauthFlowEvent{Type: 2, Family: 1}),
	} {
		if _, err := DecodeFlowEvent(b); !errors.Is(err, ErrBadFlowEvent) {
			t.Errorf("%s: %v, want ErrBadFlowEvent", name, err)
		}
	}
}

func FuzzDecodeFlowEvent(f *testing.F) {
	f.Add(encodeFlowEvent(fwpreauthFlowEvent{Type: 1, Family: 2}))
	f.Add(encodeFlowEvent(fwpreauthFlowEvent{Type: 2, Family: 10, Note: fwpreauthFlowNote{V6: 1, HasLaddr: 1}}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := DecodeFlowEvent(b)
		if err != nil {
			if !errors.Is(err, ErrBadFlowEvent) {
				t.Fatalf("error not ErrBadFlowEvent: %v", err)
			}
			return
		}
		if ev.Type != FlowEstablished && ev.Type != FlowClosed || !ev.Flow.SocketRemote.IsValid() || !ev.Flow.Remote.IsValid() {
			t.Fatalf("%+v", ev)
		}
	})
}
