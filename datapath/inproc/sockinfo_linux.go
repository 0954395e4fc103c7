//go:build linux

package inproc

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"fwp/internal/unix"
)

// What the kernel tells a Linux process about its sockets, for the
// classifications' metadata (seed 004). Anything that cannot be read is
// reported as 0: unknown, left absent.

// netnsInode is the inode of this process's network namespace, fwp's
// compartment id (as the kernel datapath reports it).
func netnsInode() uint64 {
	var st syscall.Stat_t
	if syscall.Stat("/proc/self/ns/net", &st) != nil {
		return 0
	}
	return st.Ino
}

// processCgroupID is the id of this process's cgroup v2 (the inode of its
// directory, what bpf_get_current_cgroup_id reports).
func processCgroupID() uint64 {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		path, ok := strings.CutPrefix(line, "0::")
		if !ok {
			continue
		}
		root, err := unix.FindCgroup2()
		if err != nil {
			return 0
		}
		id, err := unix.CgroupID(filepath.Join(root, path))
		if err != nil {
			return 0
		}
		return id
	}
	return 0
}

func rawConn(c any) syscall.RawConn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// connectedInfo is a connected socket's path MTU (IP_MTU / IPV6_MTU) and
// the interface it is bound to (SO_BINDTOIFINDEX; 0 when not bound).
func connectedInfo(c any) (mtu, boundIf uint32) {
	rc := rawConn(c)
	if rc == nil {
		return 0, 0
	}
	_ = rc.Control(func(fd uintptr) {
		level, opt := syscall.IPPROTO_IP, syscall.IP_MTU
		if dom, err := syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_DOMAIN); err == nil && dom == syscall.AF_INET6 {
			level, opt = syscall.IPPROTO_IPV6, syscall.IPV6_MTU
		}
		if v, err := syscall.GetsockoptInt(int(fd), level, opt); err == nil && v > 0 {
			mtu = uint32(v)
		}
		const soBindToIfindex = 62 // SO_BINDTOIFINDEX, Linux 5.0
		if v, err := syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, soBindToIfindex); err == nil && v > 0 {
			boundIf = uint32(v)
		}
	})
	return mtu, boundIf
}

// enablePktinfo asks the kernel to tell each received datagram's arrival
// interface (IP_PKTINFO; IPV6_RECVPKTINFO on a v6 socket).
func enablePktinfo(u *net.UDPConn) {
	if rc := rawConn(u); rc != nil {
		_ = rc.Control(func(fd uintptr) {
			_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, syscall.IP_PKTINFO, 1)
			_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IPV6, syscall.IPV6_RECVPKTINFO, 1)
		})
	}
}

// oobSize holds one IPv6 packet-info control message (the larger).
const oobSize = 64

func readMsg(u *net.UDPConn, b, oob []byte) (n, oobn int, src netip.AddrPort, err error) {
	n, oobn, _, src, err = u.ReadMsgUDPAddrPort(b, oob)
	if err != nil { // ReadMsg may report -1 with an error; ReadFrom reports 0
		return 0, 0, src, err
	}
	return n, oobn, src, nil
}

// pktinfoIfindex is the arrival interface a datagram's control messages
// name; 0 when they name none.
func pktinfoIfindex(oob []byte) uint32 {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return 0
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level == syscall.IPPROTO_IP && m.Header.Type == syscall.IP_PKTINFO && len(m.Data) >= syscall.SizeofInet4Pktinfo:
			return binary.NativeEndian.Uint32(m.Data[0:4]) // Inet4Pktinfo.Ifindex
		case m.Header.Level == syscall.IPPROTO_IPV6 && m.Header.Type == syscall.IPV6_PKTINFO && len(m.Data) >= syscall.SizeofInet6Pktinfo:
			return binary.NativeEndian.Uint32(m.Data[16:20]) // Inet6Pktinfo.Ifindex
		}
	}
	return 0
}
