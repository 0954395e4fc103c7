//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"fwp/engine"
)

// Go callouts at ALE_AUTH_RECV_ACCEPT (bpf/inbound.h): an inbound SYN to a
// listener of the hooked cgroups is queued by the callout path at
// netfilter's input hook — before any socket hook runs, so nothing the
// ingress hook captures exists yet. The listener's owner, which the
// inbound layers classify with, is recorded at listen() by address
// (fwp_in_listeners), where the callout path finds it for the packet's
// destination. The ingress hook, whose walk stops at the callout filter,
// passes a SYN carrying MarkPermit (the queue verdict's) and applies the
// filter's PERMIT_IF_CALLOUT_UNREGISTERED to one without.

// ErrNoListener is returned for an inbound request whose listener has no
// owner record (it listened before the hooks were attached, or the
// bounded map evicted it).
var ErrNoListener = errors.New("ebpf: no recorded listener")

// Listener is what the hooks recorded of a listening TCP socket of the
// hooked cgroups: its owner, the process that called listen() (the inbound
// layers' user, group, cgroup and application).
type Listener struct {
	Cookie   uint64 // the listening socket's: the transport endpoint handle
	PID      uint32 // the owner's process (tgid)
	UID, GID uint32
	CgroupID uint64
	Comm     string
	App      AppIdentity // its executable; zero for none
}

// InboundCallouts reports whether a Go callout filter is at
// AUTH_RECV_ACCEPT: the callout path must queue inbound SYNs to the
// hooked cgroups' listeners (nfqueue's input chain).
func (p *Policy) InboundCallouts() bool { return p.inboundCallouts }

// PortRange is an inclusive range of ports.
type PortRange struct{ Lo, Hi uint16 }

// InboundCalloutPorts returns the local ports the Go callout filters at
// AUTH_RECV_ACCEPT can match (all: any port): an inbound SYN to another
// port never reaches such a filter in the kernel's walk, so the callout
// path need not queue it.
func (p *Policy) InboundCalloutPorts() (ports []PortRange, all bool) {
	return slices.Clone(p.inPorts), p.inPortsAll
}

// noteInboundPorts adds the local ports an inbound callout filter's
// conditions let match: its local-port conditions (ORed); none, or one
// of another kind, is any port.
func (p *Policy) noteInboundPorts(cs []engine.Condition) {
	var rs []PortRange
	for _, c := range cs {
		if c.Field != engine.FieldIPLocalPort {
			continue
		}
		switch c.Match {
		case engine.MatchEqual:
			rs = append(rs, PortRange{uint16(c.Value.Uint()), uint16(c.Value.Uint())})
		case engine.MatchRange:
			rs = append(rs, PortRange{uint16(c.Value.Low().Uint()), uint16(c.Value.High().Uint())})
		default:
			p.inPortsAll = true
			return
		}
	}
	if len(rs) == 0 {
		p.inPortsAll = true
		return
	}
	p.inPorts = append(p.inPorts, rs...)
}

func listenKey(netns uint64, a netip.Addr, port uint16, v6 bool) fwpInListenKey {
	k := fwpInListenKey{Netns: netns, Lport: port}
	if v6 {
		k.V6 = 1
		b := a.As16()
		copy(k.Laddr[:], b[:])
	} else {
		b := a.As4()
		copy(k.Laddr[:], b[:])
	}
	return k
}

// Listener finds the owner of the listener an inbound request to local
// reaches in the network namespace netns (a cookie, SO_NETNS_COOKIE), as
// the kernel's lookup would: a socket bound to that address before one
// bound to the wildcard; for IPv4, an IPv4 socket before a dual-stack one.
// It takes no lock: the queue readers call it per packet.
func (d *Datapath) Listener(netns uint64, local netip.AddrPort) (Listener, error) {
	a, port := local.Addr().Unmap(), local.Port()
	var keys [4]fwpInListenKey
	n := 0
	if a.Is4() {
		keys[0] = listenKey(netns, a, port, false)
		keys[1] = listenKey(netns, netip.AddrFrom16(a.As16()), port, true) // ::ffff:a
		keys[2] = listenKey(netns, netip.IPv4Unspecified(), port, false)
		keys[3] = listenKey(netns, netip.IPv6Unspecified(), port, true)
		n = 4
	} else {
		keys[0] = listenKey(netns, a, port, true)
		keys[1] = listenKey(netns, netip.IPv6Unspecified(), port, true)
		n = 2
	}
	var l fwpInListener
	for _, k := range keys[:n] {
		err := d.objs.FwpInListeners.Lookup(&k, &l)
		if err == nil {
			return l.export(), nil
		}
		if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return Listener{}, err
		}
	}
	return Listener{}, fmt.Errorf("%w for %s", ErrNoListener, local)
}

func (l *fwpInListener) export() Listener {
	comm := make([]byte, 0, 16)
	for _, c := range l.O.Comm {
		if c == 0 {
			break
		}
		comm = append(comm, byte(c))
	}
	x := Listener{Cookie: l.Cookie, PID: l.O.Tgid, UID: l.O.Uid, GID: l.O.Gid, CgroupID: l.O.CgroupId, Comm: string(comm)}
	if l.O.HasApp != 0 {
		x.App = AppIdentity{Dev: l.O.AppDev, Ino: l.O.AppIno}
	}
	return x
}

// ListenerApp is the application id the engine sees for a listener's
// owner, as for reauthorized flows: the policy's own path for an
// executable an app id condition of p names (the kernel compares files,
// the engine strings), else the process's executable while it still runs
// it, else a bracketed name no path equals; "" for none. p may be nil.
func ListenerApp(p *Policy, l Listener) string {
	return appPath(p, &LiveFlow{App: l.App, PID: l.PID, Comm: l.Comm})
}

// ListenerCounts returns the sizes of the listener maps (by address, by
// cookie), for leak checks.
func (d *Datapath) ListenerCounts() (byAddr, byCookie int, err error) {
	var k fwpInListenKey
	var v []byte
	it := d.objs.FwpInListeners.Iterate()
	for it.Next(&k, &v) {
		byAddr++
	}
	if err = it.Err(); err != nil {
		return
	}
	var c uint64
	it = d.objs.FwpInListenIdx.Iterate()
	for it.Next(&c, &v) {
		byCookie++
	}
	err = it.Err()
	return
}
