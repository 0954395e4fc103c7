package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// report keeps the host's status under its lease: written when it
// changes, the lease kept alive in between. A failure marks the host
// disconnected; the next success, connected.
func (f *Follower) report(ctx context.Context) {
	cl := f.cfg.Client
	ttl := f.cfg.LeaseTTL
	every := max(ttl/3, 50*time.Millisecond)
	opTimeout := min(every, 2*time.Second)
	var lease clientv3.LeaseID
	t := time.NewTicker(every)
	defer t.Stop()
	refresh := time.Now()
	for {
		err := func() error {
			octx, cancel := context.WithTimeout(ctx, opTimeout)
			defer cancel()
			if lease == 0 {
				g, err := cl.Grant(octx, max(int64(ttl/time.Second), 1))
				if err != nil {
					return err
				}
				lease = g.ID
				f.statMu.Lock()
				f.dirty = true
				f.statMu.Unlock()
			}
			f.statMu.Lock()
			dirty := f.dirty || time.Since(refresh) > 3*ttl
			f.dirty = false
			f.statMu.Unlock()
			if !dirty {
				_, err := cl.KeepAliveOnce(octx, lease)
				if errors.Is(err, rpctypes.ErrLeaseNotFound) {
					lease = 0 // expired while we were away: a new one, and the status again
				}
				return err
			}
			s := f.Status()
			s.Connected = true // as seen by whoever reads it
			b, _ := json.Marshal(s)
			_, err := cl.Put(octx, f.nodeKey, string(b), clientv3.WithLease(lease))
			if err != nil {
				f.statMu.Lock()
				f.dirty = true
				f.statMu.Unlock()
				if errors.Is(err, rpctypes.ErrLeaseNotFound) {
					lease = 0
				}
				return err
			}
			refresh = time.Now()
			return nil
		}()
		if ctx.Err() != nil {
			break
		}
		f.setConnected(err == nil)
		if err != nil && lease == 0 {
			// retry at once with a new lease
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		select {
		case <-ctx.Done():
		case <-t.C:
		case <-f.kick:
		}
		if ctx.Err() != nil {
			break
		}
	}
	// Leave the list at once on a clean stop.
	if lease != 0 {
		rctx, cancel := context.WithTimeout(context.Background(), time.Second)
		cl.Revoke(rctx, lease)
		cancel()
	}
}
