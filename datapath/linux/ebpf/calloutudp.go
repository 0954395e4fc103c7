//go:build linux

package ebpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// SetCalloutUDP tells the hooks whether the callout path holds the first
// datagram of UDP flows (package nfqueue's UDP rules are installed in the
// served namespace). Until it does, a UDP flow whose classification
// reaches a Go callout takes its filter's flag in the hook.
func (d *Datapath) SetCalloutUDP(on bool) error {
	v := uint32(0)
	if on {
		v = 1
	}
	if err := d.objs.FwpCalloutUdp.Put(uint32(0), v); err != nil {
		return fmt.Errorf("callout udp: %w", err)
	}
	return nil
}

// CalloutFlowByCookie finds the flow waiting for a Go callout by its
// socket's cookie: a UDP socket has no sockops to index it by 4-tuple, so
// user space finds the cookie of a queued datagram's socket (sock_diag)
// and the record with it.
func (d *Datapath) CalloutFlowByCookie(cookie uint64) (CalloutFlow, error) {
	var f fwpCalloutFlow
	if err := d.objs.FwpCalloutFlows.Lookup(&cookie, &f); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return CalloutFlow{}, fmt.Errorf("%w: socket %d", ErrNoCalloutFlow, cookie)
		}
		return CalloutFlow{}, err
	}
	return f.export(), nil
}

// UDPCallouts reports whether a Go callout filter matches UDP: the
// callout path must hold UDP flows' first datagrams (nfqueue's UDP rules,
// which bring conntrack into the served namespace).
func (p *Policy) UDPCallouts() bool { return p.udpCallouts }
