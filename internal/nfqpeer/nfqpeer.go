//go:build linux

package nfqpeer

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
)

// Peer reads one queue and accepts every packet.
type Peer struct {
	nf       *nfqueue.Nfqueue
	cancel   context.CancelFunc
	accepted atomic.Uint64
	errs     atomic.Uint64
}

// Start binds queue num in the network namespace netns (an open fd of
// /proc/.../ns/net; 0: the caller's) and answers its packets until Close.
func Start(netns int, num uint16) (*Peer, error) {
	nf, err := nfqueue.Open(&nfqueue.Config{
		NetNS:        netns,
		NfQueue:      num,
		MaxPacketLen: 128, // the headers: a peer reads the tuple
		MaxQueueLen:  8192,
		Copymode:     nfqueue.NfQnlCopyPacket,
		WriteTimeout: 15 * time.Millisecond,
	})
	if err != nil {
		return nil, fmt.Errorf("nfqpeer: open queue %d: %w", num, err)
	}
	if err := nf.SetOption(netlink.NoENOBUFS, true); err != nil {
		nf.Close()
		return nil, fmt.Errorf("nfqpeer: queue %d: %w", num, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Peer{nf: nf, cancel: cancel}
	err = nf.RegisterWithErrorFunc(ctx, func(a nfqueue.Attribute) int {
		if a.PacketID == nil {
			return 0
		}
		if err := nf.SetVerdict(*a.PacketID, nfqueue.NfAccept); err != nil {
			p.errs.Add(1)
			return 0
		}
		p.accepted.Add(1)
		return 0
	}, func(err error) int {
		// A read timeout or a closed socket ends the loop; anything
		// else is counted and the loop goes on.
		if ctx.Err() != nil || errors.Is(err, context.Canceled) {
			return 1
		}
		p.errs.Add(1)
		return 0
	})
	if err != nil {
		cancel()
		nf.Close()
		return nil, fmt.Errorf("nfqpeer: register queue %d: %w", num, err)
	}
	return p, nil
}

// Accepted counts the packets answered; Errors the verdicts or reads
// that failed.
func (p *Peer) Accepted() uint64 { return p.accepted.Load() }
func (p *Peer) Errors() uint64   { return p.errs.Load() }

// Close stops the loop and unbinds the queue.
func (p *Peer) Close() error {
	p.cancel()
	return p.nf.Close()
}
