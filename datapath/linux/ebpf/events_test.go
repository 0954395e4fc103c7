//go:build linux

package ebpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"
	"testing"

	"fwp/engine"
)

// The Go mirror of struct event must have its size: the ring buffer
// records are decoded by layout.
func TestRawEventLayout(t *testing.T) {
	if n := binary.Size(rawEvent{}); n != rawEventSize {
		t.Fatalf("rawEvent is %d bytes, struct event %d", n, rawEventSize)
	}
}

func encodeRaw(t testing.TB, r rawEvent) []byte {
	var b bytes.Buffer
	if err := binary.Write(&b, binary.LittleEndian, r); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestDecodeEvent(t *testing.T) {
	r := rawEvent{FilterID: 42, CgroupID: 7, PID: 100, UID: 1000, GID: 1001, RPort: 8080, LPort: 40000,
		ProxyPort: 3128, Type: uint8(EventRedirect), Slot: 1, Proto: 6, V6: 1, HasLAddr: 1, ProxyV6: 0}
	copy(r.RAddr[:], netip.MustParseAddr("2001:db8::1").AsSlice())
	copy(r.LAddr[:], netip.MustParseAddr("2001:db8::2").AsSlice())
	copy(r.ProxyAddr[:], []byte{127, 0, 0, 1})
	copy(r.Comm[:], "curl")
	e, err := DecodeEvent(encodeRaw(t, r))
	if err != nil {
		t.Fatal(err)
	}
	want := Event{Type: EventRedirect, Layer: engine.LayerFor(engine.KindConnectRedirect, true), Filter: 42, Protocol: 6,
		Local: netip.MustParseAddrPort("[2001:db8::2]:40000"), Remote: netip.MustParseAddrPort("[2001:db8::1]:8080"),
		Proxy: netip.MustParseAddrPort("127.0.0.1:3128"), PID: 100, UID: 1000, GID: 1001, CgroupID: 7, Comm: "curl"}
	if e != want {
		t.Fatalf("got %+v\nwant %+v", e, want)
	}
	for name, b := range map[string][]byte{
		"short":    make([]byte, rawEventSize-1),
		"bad type": encodeRaw(t, rawEvent{Type: 9}),
		"bad slot": encodeRaw(t, rawEvent{Type: 1, Slot: numSlots}),
	} {
		if _, err := DecodeEvent(b); !errors.Is(err, ErrBadEvent) {
			t.Errorf("%s: %v, want ErrBadEvent", name, err)
		}
	}
}

func FuzzDecodeEvent(f *testing.F) {
	f.Add(encodeRaw(f, rawEvent{Type: 1, Slot: 2, Proto: 17}))
	f.Add(encodeRaw(f, rawEvent{Type: 2, Slot: 7, V6: 1, HasLAddr: 1}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := DecodeEvent(b)
		if err != nil {
			if !errors.Is(err, ErrBadEvent) {
				t.Fatalf("error not ErrBadEvent: %v", err)
			}
			return
		}
		if e.Layer.Kind() != engine.KindConnectRedirect && e.Layer.Kind() != engine.KindAuthConnect &&
			e.Layer.Kind() != engine.KindBindRedirect && e.Layer.Kind() != engine.KindResourceAssignment &&
			e.Layer.Kind() != engine.KindAuthRecvAccept && e.Layer.Kind() != engine.KindAuthListen {
			t.Fatalf("event of layer %s, which no hook classifies", e.Layer)
		}
	})
}

func TestRecordsRoundTrip(t *testing.T) {
	for _, hs := range [][]uint32{{}, {1}, {7, 1 << 31, 3}, {1, 2, 3, 4, 5, 6, 7, 8}} {
		got, err := DecodeRecords(EncodeRecords(hs))
		if err != nil || !slices.Equal(got, hs) {
			t.Errorf("%v: got %v, %v", hs, got, err)
		}
	}
	for name, b := range map[string][]byte{
		"engine records": []byte("FWPR\x00\x01"),
		"odd length":     append(EncodeRecords([]uint32{1}), 0),
		"too many":       EncodeRecords([]uint32{1, 2, 3, 4, 5, 6, 7, 8, 9}),
		"empty":          nil,
	} {
		if _, err := DecodeRecords(b); !errors.Is(err, ErrInvalidRedirect) {
			t.Errorf("%s: %v, want ErrInvalidRedirect", name, err)
		}
	}
}

func FuzzDecodeRecords(f *testing.F) {
	f.Add(EncodeRecords([]uint32{1, 2}))
	f.Add([]byte("fwpk\x01"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		hs, err := DecodeRecords(b)
		if err != nil {
			if !errors.Is(err, ErrInvalidRedirect) {
				t.Fatalf("error not ErrInvalidRedirect: %v", err)
			}
			return
		}
		if !bytes.Equal(EncodeRecords(hs), b) {
			t.Fatalf("%x decodes to %v, which encodes differently", b, hs)
		}
	})
}
