//go:build !linux

package inproc

import (
	"net"
	"net/netip"
)

// Elsewhere the datapath does not read these: the metadata stays absent.

func netnsInode() uint64                      { return 0 }
func processCgroupID() uint64                 { return 0 }
func connectedInfo(any) (mtu, boundIf uint32) { return 0, 0 }
func enablePktinfo(*net.UDPConn)              {}
func pktinfoIfindex([]byte) uint32            { return 0 }

const oobSize = 0

func readMsg(u *net.UDPConn, b, _ []byte) (n, oobn int, src netip.AddrPort, err error) {
	n, src, err = u.ReadFromUDPAddrPort(b)
	return n, 0, src, err
}
