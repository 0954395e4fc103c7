//go:build linux

package ebpf

// The inbound layers (ALE_AUTH_RECV_ACCEPT, ALE_AUTH_LISTEN) are enforced
// by bpf/inbound.h: cgroup_skb/ingress classifies inbound SYNs to the
// hooked cgroups' listeners and the first datagram of each inbound UDP
// flow; sockops classifies listen(). See docs/semantics.md, "Kernel
// callout path (issue 17)", inbound bullets.

// bumpInboundEpoch tells the inbound hooks that a new policy is in force:
// UDP flows and listens authorized under the old one are classified again
// at their next datagram or SYN (as WFP reauthorizes on a policy change).
// Called after the generation switch, so a flow classified by the new
// policy is never stamped with the old epoch. d.mu is held.
func (d *Datapath) bumpInboundEpoch() {
	var ep uint32
	_ = d.objs.FwpInEpoch.Lookup(uint32(0), &ep)
	// An array map's update cannot fail for a valid index; were it to,
	// old authorizations would stand until the next policy.
	_ = d.objs.FwpInEpoch.Put(uint32(0), ep+1)
}

// Inbound reports whether the policy has filters at AUTH_RECV_ACCEPT or
// AUTH_LISTEN (enforced by the ingress and sockops hooks).
func (p *Policy) Inbound() bool { return p.inbound }

// InboundFlows counts the UDP flows the ingress hook holds as authorized
// (a bounded LRU of InboundFlowsMax entries), for tests and metrics.
func (d *Datapath) InboundFlows() (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, ErrClosed
	}
	n := 0
	var k fwpInFlowKey
	it := d.objs.FwpInFlows.Iterate()
	var v [8]byte
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// InboundFlowsMax is the capacity of the inbound UDP flow table: the
// least recently used flow makes room (it is classified again at its next
// datagram, with the same answer under the same policy).
const InboundFlowsMax = 65536
