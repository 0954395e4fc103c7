package testutil

import "encoding/binary"

// DNSQuery is an A question for fwp.test with the given id, as dig sends.
func DNSQuery(id uint16) []byte {
	q := make([]byte, 12, 32)
	binary.BigEndian.PutUint16(q[0:2], id)
	binary.BigEndian.PutUint16(q[2:4], 0x0100)
	binary.BigEndian.PutUint16(q[4:6], 1)
	q = append(q, 3, 'f', 'w', 'p', 4, 't', 'e', 's', 't', 0)
	return append(q, 0, 1, 0, 1)
}

// DNSAnswer answers one A question with 10.1.2.3 (nil for anything else):
// the tests' DNS server.
func DNSAnswer(q []byte) []byte {
	if len(q) < 12 || binary.BigEndian.Uint16(q[4:6]) != 1 {
		return nil
	}
	end := 12
	for end < len(q) && q[end] != 0 {
		end += int(q[end]) + 1
	}
	end += 5 // zero byte, type, class
	if end > len(q) {
		return nil
	}
	a := append([]byte(nil), q[:end]...)
	binary.BigEndian.PutUint16(a[2:4], 0x8180)
	binary.BigEndian.PutUint16(a[6:8], 1)
	binary.BigEndian.PutUint16(a[8:10], 0)
	binary.BigEndian.PutUint16(a[10:12], 0)
	return append(a, 0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 1, 2, 3)
}
