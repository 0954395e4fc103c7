//go:build linux

package ebpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// Go callouts at ALE_AUTH_RECV_ACCEPT for inbound UDP (bpf/inbound.h): the
// first datagram of an inbound UDP flow to a socket of the hooked cgroups
// is queued by the callout path at netfilter's input hook, before any
// socket hook runs. The path finds the receiving socket's cookie with
// sock_diag (as for outbound UDP flows) and its owner — the binding
// process, which the inbound layers classify with — in fwp_in_udp_owners,
// which the bind hook fills for UDP sockets (and the sendmsg hook for a
// socket the kernel bound at its first send) and sock_release empties.
// The ingress hook, whose walk stops at the callout filter, passes a
// datagram carrying MarkPermit and records the flow (fwp_in_flows), and
// applies the filter's PERMIT_IF_CALLOUT_UNREGISTERED to one without.

// UDPOwner returns the owner the hooks recorded for the UDP socket with
// the cookie (Listener's fields: the socket's cookie, the binding
// process's pid, uid, gid, cgroup, comm and executable). It takes no lock:
// the queue readers call it per first datagram.
func (d *Datapath) UDPOwner(cookie uint64) (Listener, error) {
	var o fwpSkOwner
	if err := d.objs.FwpInUdpOwners.Lookup(&cookie, &o); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Listener{}, fmt.Errorf("%w: UDP socket %d", ErrNoListener, cookie)
		}
		return Listener{}, err
	}
	l := fwpInListener{Cookie: cookie, O: o}
	return l.export(), nil
}

// UDPOwnerCount returns the number of UDP socket owner records, for leak
// checks.
func (d *Datapath) UDPOwnerCount() (int, error) {
	var k uint64
	var v []byte
	n := 0
	it := d.objs.FwpInUdpOwners.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// InboundUDPCallouts reports whether a Go callout filter at
// AUTH_RECV_ACCEPT matches UDP: the callout path must hold inbound UDP
// flows' first datagrams (nfqueue's input chain with its UDP rules, which
// bring conntrack into the served namespace).
func (p *Policy) InboundUDPCallouts() bool { return p.inboundUDPCallouts }
