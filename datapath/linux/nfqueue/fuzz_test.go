//go:build linux

package nfqueue

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

// FuzzParsePacket: any attribute bytes the queue socket could deliver are
// read without a panic, and a packet id is reported only when present.
func FuzzParsePacket(f *testing.F) {
	hdr := cfgAttr(attrPacketHdr, []byte{0, 0, 0, 7, 0x08, 0x00, 3})
	mark := cfgAttr(attrMark, []byte{0x01, 0, 0, 0})
	f.Add(append(append([]byte{}, hdr...), mark...))
	f.Add(cfgAttr(attrPayload, make([]byte, 40)))
	f.Add([]byte{4, 0, 1, 0})
	f.Add([]byte{0xff, 0xff, 1, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var p packet
		if parsePacket(b, &p) && len(b) < 8 {
			t.Fatalf("a packet id from %d bytes", len(b))
		}
	})
}

// FuzzParseTCP: any payload is read without a panic; a tuple comes back
// only from an IPv4 or IPv6 header naming TCP, with the ports it carries.
func FuzzParseTCP(f *testing.F) {
	v4 := make([]byte, 40)
	v4[0], v4[9] = 0x45, 6
	copy(v4[12:], []byte{127, 0, 0, 1, 127, 0, 0, 2})
	binary.BigEndian.PutUint16(v4[20:], 40000)
	binary.BigEndian.PutUint16(v4[22:], 80)
	f.Add(v4)
	v6 := make([]byte, 60)
	v6[0], v6[6] = 0x60, 6
	v6[23], v6[39] = 1, 1
	f.Add(v6)
	f.Add([]byte{0x4f, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		l, r, ok := parseTCP(b)
		if !ok {
			return
		}
		if len(b) < 24 || (b[0]>>4 != 4 && b[0]>>4 != 6) || !l.IsValid() || !r.IsValid() {
			t.Fatalf("tuple %v %v from %x", l, r, b)
		}
		if b[0]>>4 == 4 && l.Addr() != netip.AddrFrom4([4]byte(b[12:16])) {
			t.Fatalf("source %v from %x", l, b)
		}
	})
}

// FuzzParseLogged: any NFLOG attribute bytes (a fallback rule's copy) and
// any payload are read without a panic (parseFlow for TCP and UDP, and
// tcpSeq); a fallback comes back only with a TCP or UDP tuple.
func FuzzParseLogged(f *testing.F) {
	v4 := make([]byte, 40)
	v4[0], v4[9] = 0x45, 17
	f.Add(append(cfgAttr(nflogAttrPay, v4), cfgAttr(nflogAttrMark, []byte{0x02, 0, 0, 0})...))
	f.Add(cfgAttr(nflogAttrUID, []byte{0, 0, 3, 232}))
	f.Add([]byte{0xff, 0xff, 9, 0, 0})
	m := Marks{QueueOpen: 1, QueueClosed: 2, Permit: 4, Block: 8}
	f.Fuzz(func(t *testing.T, b []byte) {
		_ = tcpSeq(b)
		if _, _, proto, ok := parseFlow(b); ok && proto != 6 && proto != 17 {
			t.Fatalf("protocol %d from %x", proto, b)
		}
		if fb, ok := parseLogged(b, m); ok && (fb.Protocol != 6 && fb.Protocol != 17 || !fb.Local.IsValid()) {
			t.Fatalf("fallback %+v from %x", fb, b)
		}
	})
}
