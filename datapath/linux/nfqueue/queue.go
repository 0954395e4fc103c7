//go:build linux

package nfqueue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// The nfnetlink_queue protocol (linux/netfilter/nfnetlink_queue.h).
const (
	nfnlSubsysQueue = 3

	msgPacket  = 0
	msgVerdict = 1
	msgConfig  = 2

	attrPacketHdr  = 1
	attrVerdictHdr = 2
	attrMark       = 3
	attrPayload    = 10
	attrUID        = 16
	attrGID        = 17

	cfgCmd         = 1
	cfgParams      = 2
	cfgQueueMaxLen = 3
	cfgMask        = 4
	cfgFlags       = 5

	cmdBind   = 1
	cmdUnbind = 2

	copyPacket = 2

	cfgFlagFailOpen = 0x01
	cfgFlagGSO      = 0x04
	cfgFlagUIDGID   = 0x08

	verdictDrop   = 0
	verdictAccept = 1
	verdictRepeat = 4

	// copyRange covers an IPv6 header and a TCP header with options: the
	// tuple is all the queue needs from the packet.
	copyRange = 128
)

// queue is one NFQUEUE number read by one netlink socket. Its reader runs
// on a locked OS thread pinned to the queue's CPU (the SYN was queued on
// that CPU by the fanout), reads with plain blocking recvfrom and answers
// in the same loop: measured on this kernel, a wake-up on another CPU or a
// hop through the Go scheduler costs more than the whole decision.
// Verdicts of pended flows are written from other goroutines; a netlink
// send is one atomic syscall, so no lock is needed.
type queue struct {
	fd      int
	num     uint16
	cpu     int
	maxLen  uint32
	seq     atomic.Uint32
	closed  atomic.Bool
	recvBuf []byte
}

// openQueue binds queue num in the network namespace netns (an open fd of
// /proc/.../ns/net, 0 for the caller's): the netlink socket is created
// there, on a thread moved into it for the call.
func openQueue(netns int, num uint16, cpu int, maxLen uint32) (*queue, error) {
	fd, err := socketIn(netns)
	if err != nil {
		return nil, err
	}
	q := &queue{fd: fd, num: num, cpu: cpu, maxLen: maxLen, recvBuf: make([]byte, 64<<10)}
	// The read loop must wake now and then to see Close.
	tv := unix.Timeval{Usec: 200_000}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("nfqueue %d: SO_RCVTIMEO: %w", num, err)
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20)
	// A full socket buffer must not stop the loop with ENOBUFS: the
	// kernel drops (or, fail-open, passes) what does not fit.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_NO_ENOBUFS, 1)
	if err := q.config(cfgAttr(cfgCmd, []byte{cmdBind, 0, 0, 0})); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("nfqueue %d: bind: %w", num, err)
	}
	params := make([]byte, 5)
	binary.BigEndian.PutUint32(params, copyRange)
	params[4] = copyPacket
	var flags [4]byte
	// Fail open: a full queue lets the packet on to the next chain
	// (table.go's fallback chain decides it by the filter's flag) rather
	// than dropping it.
	binary.BigEndian.PutUint32(flags[:], cfgFlagFailOpen|cfgFlagGSO|cfgFlagUIDGID)
	var ml [4]byte
	binary.BigEndian.PutUint32(ml[:], maxLen)
	if err := q.config(cfgAttr(cfgParams, params), cfgAttr(cfgQueueMaxLen, ml[:]), cfgAttr(cfgFlags, flags[:]), cfgAttr(cfgMask, flags[:])); err != nil {
		q.unbind()
		unix.Close(fd)
		return nil, fmt.Errorf("nfqueue %d: configure: %w", num, err)
	}
	return q, nil
}

// socketIn opens a NETLINK_NETFILTER socket in the namespace netns.
func socketIn(netns int) (int, error) {
	open := func() (int, error) {
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
		if err != nil {
			return -1, fmt.Errorf("nfqueue: netlink socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("nfqueue: bind netlink socket: %w", err)
		}
		return fd, nil
	}
	if netns <= 0 {
		return open()
	}
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// The thread enters netns for the socket call and comes back; one
		// that cannot come back stays locked and ends with the goroutine
		// (a thread that ends kills the children it started with
		// Pdeathsig, so threads are not thrown away lightly).
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{-1, fmt.Errorf("nfqueue: %w", err)}
			return
		}
		defer self.Close()
		if err := unix.Setns(netns, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{-1, fmt.Errorf("nfqueue: setns: %w", err)}
			return
		}
		fd, err := open()
		if unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{fd, err}
	}()
	r := <-ch
	return r.fd, r.err
}

func cfgAttr(typ uint16, data []byte) []byte {
	n := 4 + len(data)
	b := make([]byte, (n+3)&^3)
	binary.NativeEndian.PutUint16(b[0:], uint16(n))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[4:], data)
	return b
}

// message builds a netlink message of the queue subsystem.
func (q *queue) message(typ uint16, flags uint16, attrs ...[]byte) []byte {
	n := unix.NLMSG_HDRLEN + 4
	for _, a := range attrs {
		n += len(a)
	}
	b := make([]byte, n)
	binary.NativeEndian.PutUint32(b[0:], uint32(n))
	binary.NativeEndian.PutUint16(b[4:], nfnlSubsysQueue<<8|typ)
	binary.NativeEndian.PutUint16(b[6:], unix.NLM_F_REQUEST|flags)
	binary.NativeEndian.PutUint32(b[8:], q.seq.Add(1))
	b[16] = unix.AF_UNSPEC
	b[17] = 0 // NFNETLINK_V0
	binary.BigEndian.PutUint16(b[18:], q.num)
	off := 20
	for _, a := range attrs {
		off += copy(b[off:], a)
	}
	return b
}

// config sends a configuration message and waits for its acknowledgement.
func (q *queue) config(attrs ...[]byte) error {
	msg := q.message(msgConfig, unix.NLM_F_ACK, attrs...)
	seq := binary.NativeEndian.Uint32(msg[8:])
	if err := unix.Sendto(q.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	for {
		n, _, err := unix.Recvfrom(q.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return err
		}
		for b := buf[:n]; len(b) >= unix.NLMSG_HDRLEN; {
			l := int(binary.NativeEndian.Uint32(b))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				break
			}
			typ := binary.NativeEndian.Uint16(b[4:])
			if typ == unix.NLMSG_ERROR && binary.NativeEndian.Uint32(b[8:]) == seq && l >= unix.NLMSG_HDRLEN+4 {
				if e := int32(binary.NativeEndian.Uint32(b[16:])); e != 0 {
					return unix.Errno(-e)
				}
				return nil
			}
			b = b[(l+3)&^3:]
		}
	}
}

func (q *queue) unbind() {
	_ = q.config(cfgAttr(cfgCmd, []byte{cmdUnbind, 0, 0, 0}))
}

// verdict answers a held packet: accept, drop or repeat (the chain runs
// again) with the packet mark set to mark.
func (q *queue) verdict(id uint32, verdict uint32, mark uint32, setMark bool) error {
	var hdr [8]byte
	binary.BigEndian.PutUint32(hdr[0:], verdict)
	binary.BigEndian.PutUint32(hdr[4:], id)
	attrs := [][]byte{cfgAttr(attrVerdictHdr, hdr[:])}
	if setMark {
		var m [4]byte
		binary.BigEndian.PutUint32(m[:], mark)
		attrs = append(attrs, cfgAttr(attrMark, m[:]))
	}
	msg := q.message(msgVerdict, 0, attrs...)
	for {
		err := unix.Sendto(q.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// packet is one queued packet as the reader hands it over.
type packet struct {
	id       uint32
	mark     uint32
	hasMark  bool
	uid, gid uint32
	hasUID   bool
	hook     uint8  // the netfilter hook that queued it (hookInput: an inbound SYN, inbound.go)
	payload  []byte // valid until the next read
}

// read blocks for the next batch of packets and calls fn for each; it
// returns unix.EAGAIN when the read timed out.
func (q *queue) read(fn func(*packet)) error {
	n, _, err := unix.Recvfrom(q.fd, q.recvBuf, 0)
	if err != nil {
		return err
	}
	b := q.recvBuf[:n]
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return nil
		}
		typ := binary.NativeEndian.Uint16(b[4:])
		if typ == nfnlSubsysQueue<<8|msgPacket && l >= unix.NLMSG_HDRLEN+4 {
			var p packet
			if parsePacket(b[unix.NLMSG_HDRLEN+4:l], &p) {
				fn(&p)
			}
		}
		b = b[min((l+3)&^3, len(b)):]
	}
	return nil
}

// parsePacket reads the attributes of a queued packet.
func parsePacket(b []byte, p *packet) bool {
	hasID := false
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b))
		typ := binary.NativeEndian.Uint16(b[2:]) & 0x3fff
		if l < 4 || l > len(b) {
			return false
		}
		v := b[4:l]
		switch typ {
		case attrPacketHdr:
			if len(v) >= 4 {
				p.id, hasID = binary.BigEndian.Uint32(v), true
			}
			if len(v) >= 7 { // packet_id, hw_protocol, hook
				p.hook = v[6]
			}
		case attrMark:
			if len(v) >= 4 {
				p.mark, p.hasMark = binary.BigEndian.Uint32(v), true
			}
		case attrUID:
			if len(v) >= 4 {
				p.uid, p.hasUID = binary.BigEndian.Uint32(v), true
			}
		case attrGID:
			if len(v) >= 4 {
				p.gid = binary.BigEndian.Uint32(v)
			}
		case attrPayload:
			p.payload = v
		}
		b = b[min((l+3)&^3, len(b)):]
	}
	return hasID
}

func (q *queue) close() {
	if q.closed.Swap(true) {
		return
	}
	q.unbind()
	unix.Close(q.fd)
}
