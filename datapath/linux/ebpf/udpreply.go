//go:build linux

package ebpf

import (
	"fmt"

	"github.com/cilium/ebpf/link"
)

// UDP flows on the send side (bpf/udpreply.h): a datagram an unconnected
// socket of the hooked cgroups receives and AUTH_RECV_ACCEPT lets in (a
// filter's permit, no filter, a Go callout's permit) makes a flow, as
// WFP's ALE makes one, and so does a send AUTH_CONNECT permits; the
// socket's later sends to that remote (replies, or the flow's next
// datagrams) pass the sendmsg hook without a classification at
// CONNECT_REDIRECT and AUTH_CONNECT. The ingress hook records inbound
// flows while the policy has filters at the outbound layers (else no send
// is refused or redirected): it is attached with the first such policy.
// See docs/semantics.md, "UDP flows on the send side".

// outboundFilters reports whether the policy has filters at
// CONNECT_REDIRECT or AUTH_CONNECT (v4 or v6), which an unconnected UDP
// send could meet: the ingress hook records inbound UDP flows for their
// replies then.
func (p *Policy) outboundFilters() bool {
	for _, k := range []int{slotConnectRedirect, slotConnectRedirect + 1, slotAuthConnect, slotAuthConnect + 1} {
		if l := p.layers[k]; l != nil && l.members > 0 {
			return true
		}
	}
	return false
}

// Slots of the outbound layers (bpf/fwp.c: SLOT_CONNECT_REDIRECT,
// SLOT_AUTH_CONNECT; + 1 for v6).
const (
	slotConnectRedirect = 0
	slotAuthConnect     = 2
)

// ingressHookName is the hook that records inbound UDP flows; it is one
// of the redirect hooks, attached alone before them when a policy needs
// it for replies only.
const ingressHookName = "ingress"

// attachIngressHook attaches the ingress hook to every cgroup the datapath
// is attached to (all or none), unless the redirect hooks, which include
// it, are; it stays until Detach or Close. d.mu is held.
func (d *Datapath) attachIngressHook() error {
	if d.redirectHooks || d.ingressHook {
		return nil
	}
	added := map[string][]link.Link{}
	for path := range d.links {
		links, err := d.attachHooks(path, func(h hook) bool { return h.name == ingressHookName })
		if err != nil {
			for _, ls := range added {
				for _, l := range ls {
					l.Close()
				}
			}
			return err
		}
		added[path] = links
	}
	for path, links := range added {
		d.links[path] = append(d.links[path], links...)
	}
	d.ingressHook = true
	return nil
}

// UDPReplyStats counts the work of the UDP reply exemption since Load.
type UDPReplyStats struct {
	// Replies: unconnected sends that passed as a recorded flow's (a reply
	// within an inbound flow, or a later send of one the socket started),
	// without a classification.
	Replies uint64
	// Recorded: UDP flows recorded for their later sends: inbound ones
	// (the ingress hook) and those a permitted first send started.
	Recorded uint64
}

// UDPReplyStats reads the counters of the UDP reply exemption.
func (d *Datapath) UDPReplyStats() (UDPReplyStats, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return UDPReplyStats{}, ErrClosed
	}
	var s UDPReplyStats
	for i, dst := range []*uint64{&s.Replies, &s.Recorded} {
		var per []uint64
		if err := d.objs.FwpUdpReplyCounts.Lookup(uint32(i), &per); err != nil {
			return UDPReplyStats{}, fmt.Errorf("udp reply counts: %w", err)
		}
		for _, v := range per {
			*dst += v
		}
	}
	return s, nil
}

// UDPReplyFlows counts the inbound UDP flows held for their replies (a
// bounded LRU of UDPReplyFlowsMax), for tests and metrics.
func (d *Datapath) UDPReplyFlows() (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, ErrClosed
	}
	n := 0
	var k fwpUdpReplyKey
	var v fwpUdpReply
	it := d.objs.FwpUdpReplies.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// UDPReplyFlowsMax is the capacity of the reply table: the least recently
// used flow makes room (its next reply is classified as a first send, and
// the remote's next datagram records the flow again).
const UDPReplyFlowsMax = 65536
