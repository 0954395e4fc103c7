//go:build linux

package nfqueue

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"golang.org/x/sys/unix"
)

// Fallback is one flow the kernel decided by its filter's flag without user
// space (the fallback chains: the queue full, or unread), as the NFLOG
// copy of its first packet tells it: for net events.
type Fallback struct {
	Local, Remote netip.AddrPort
	Protocol      uint8
	FailOpen      bool // let on (else refused)
	UID, GID      uint32
	HasUID        bool
}

// The nfnetlink_log protocol (linux/netfilter/nfnetlink_log.h).
const (
	nfnlSubsysULOG  = 4
	nflogMsgPacket  = 0
	nflogMsgConfig  = 1
	nflogCfgCmd     = 1
	nflogCfgMode    = 2
	nflogCmdBind    = 1
	nflogCmdPfBind  = 3
	nflogAttrMark   = 2
	nflogAttrPay    = 9
	nflogAttrUID    = 11
	nflogAttrGID    = 14
	nflogCopyPacket = 2
)

// fallbackGroup is the NFLOG group of the fallback rules: the queue base
// (fwp's own number range) in the served namespace.
func (p *Path) fallbackGroup() uint16 { return p.opts.QueueBase }

// nflog is the reader of the fallback rules' NFLOG group.
type nflog struct {
	q *queue // the netlink plumbing of a queue, on the ULOG subsystem
}

// openNflog binds the NFLOG group in the namespace. The rules log to it
// with or without a reader; without one (or a full socket) copies are lost,
// never the packets.
func openNflog(netns int, group uint16) (*nflog, error) {
	fd, err := socketIn(netns)
	if err != nil {
		return nil, err
	}
	q := &queue{fd: fd, num: group, recvBuf: make([]byte, 64<<10)}
	tv := unix.Timeval{Usec: 200_000}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 1<<20)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_NO_ENOBUFS, 1)
	l := &nflog{q: q}
	mode := make([]byte, 6)
	binary.BigEndian.PutUint32(mode, copyRange)
	mode[4] = nflogCopyPacket
	if err := l.config(cfgAttr(nflogCfgCmd, []byte{nflogCmdBind})); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := l.config(cfgAttr(nflogCfgMode, mode)); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return l, nil
}

func (l *nflog) config(attrs ...[]byte) error {
	q := l.q
	msg := q.message(nflogMsgConfig, unix.NLM_F_ACK, attrs...)
	binary.NativeEndian.PutUint16(msg[4:], nfnlSubsysULOG<<8|nflogMsgConfig)
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
			ln := int(binary.NativeEndian.Uint32(b))
			if ln < unix.NLMSG_HDRLEN || ln > len(b) {
				break
			}
			if binary.NativeEndian.Uint16(b[4:]) == unix.NLMSG_ERROR && binary.NativeEndian.Uint32(b[8:]) == seq && ln >= unix.NLMSG_HDRLEN+4 {
				if e := int32(binary.NativeEndian.Uint32(b[16:])); e != 0 {
					return unix.Errno(-e)
				}
				return nil
			}
			b = b[(ln+3)&^3:]
		}
	}
}

// read reads one batch of logged packets and calls fn for each.
func (l *nflog) read(m Marks, fn func(Fallback)) error {
	q := l.q
	n, _, err := unix.Recvfrom(q.fd, q.recvBuf, 0)
	if err != nil {
		return err
	}
	b := q.recvBuf[:n]
	for len(b) >= unix.NLMSG_HDRLEN {
		ln := int(binary.NativeEndian.Uint32(b))
		if ln < unix.NLMSG_HDRLEN || ln > len(b) {
			return nil
		}
		if binary.NativeEndian.Uint16(b[4:]) == nfnlSubsysULOG<<8|nflogMsgPacket && ln >= unix.NLMSG_HDRLEN+4 {
			if fb, ok := parseLogged(b[unix.NLMSG_HDRLEN+4:ln], m); ok {
				fn(fb)
			}
		}
		b = b[min((ln+3)&^3, len(b)):]
	}
	return nil
}

func parseLogged(b []byte, m Marks) (Fallback, bool) {
	var fb Fallback
	var mark uint32
	var payload []byte
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b))
		typ := binary.NativeEndian.Uint16(b[2:]) & 0x3fff
		if l < 4 || l > len(b) {
			return fb, false
		}
		v := b[4:l]
		switch typ {
		case nflogAttrMark:
			if len(v) >= 4 {
				mark = binary.BigEndian.Uint32(v)
			}
		case nflogAttrUID:
			if len(v) >= 4 {
				fb.UID, fb.HasUID = binary.BigEndian.Uint32(v), true
			}
		case nflogAttrGID:
			if len(v) >= 4 {
				fb.GID = binary.BigEndian.Uint32(v)
			}
		case nflogAttrPay:
			payload = v
		}
		b = b[min((l+3)&^3, len(b)):]
	}
	local, remote, proto, ok := parseFlow(payload)
	if !ok {
		return fb, false
	}
	fb.Local, fb.Remote, fb.Protocol = local, remote, proto
	fb.FailOpen = mark&m.QueueOpen != 0
	return fb, true
}

func (l *nflog) close() { unix.Close(l.q.fd) }
