package main

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
)

// reauthorizer reauthorizes the live flows of the hooked cgroups after
// each commit (WFP reauthorizes existing connections when the filters
// change): the engine classifies each again with IS_REAUTHORIZE and the
// kernel resets those the new policy blocks. --no-reauthorize-established
// turns it off.
type reauthorizer struct {
	on   bool
	kick chan struct{} // a commit happened: one pass covers any number of them

	passes, flows, resets, errors atomic.Uint64
	lastNanos                     atomic.Int64
}

// enableReauth loads the socket iterators; a kernel without them (before
// 6.5) leaves established flows alone, with a warning.
func (k *kernel) enableReauth(on bool) {
	k.reauth.kick = make(chan struct{}, 1)
	if !on {
		k.log.Info("reauthorization of established flows off (--no-reauthorize-established)")
		return
	}
	if err := k.d.EnableReauthorization(); err != nil {
		k.log.Warn("established flows are not reauthorized after policy changes", "err", err)
		return
	}
	k.reauth.on = true
}

// committed is mgmt's OnCommit: the policy in force changed.
func (k *kernel) committed() {
	if k == nil || !k.reauth.on {
		return
	}
	select {
	case k.reauth.kick <- struct{}{}:
	default: // a pass is due already; it will see this policy
	}
}

// reauthLoop runs a pass after commits until ctx ends, and records a
// flow_reset net event for every flow it reset.
func (k *kernel) reauthLoop(ctx context.Context, eng *engine.Engine) {
	if !k.reauth.on {
		return
	}
	var paths ebpf.ProcessPaths
	for {
		select {
		case <-ctx.Done():
			return
		case <-k.reauth.kick:
		}
		k.mu.Lock()
		p := k.policy
		k.mu.Unlock()
		start := time.Now()
		pass, err := k.d.Reauthorize(eng, p)
		k.reauth.lastNanos.Store(int64(time.Since(start)))
		k.reauth.passes.Add(1)
		k.reauth.flows.Add(uint64(pass.Flows))
		k.reauth.resets.Add(uint64(len(pass.Resets)))
		if err != nil {
			k.reauth.errors.Add(1)
			k.log.Error("reauthorizing established flows", "err", err)
		}
		for _, r := range pass.Resets {
			f := &r.Flow
			eng.RecordNetEvent(engine.NetEvent{Type: engine.EventFlowReset, Layer: f.Layer, Filter: r.Result.Filter, Callout: r.Result.Callout,
				Reason: r.Result.Reason, Protocol: f.Protocol, Local: f.SocketLocal, Remote: f.SocketRemote, AppID: paths.Path(f.PID, f.Comm),
				UserID: f.UID, GroupID: f.GID, CgroupID: f.CgroupID, ProcessID: f.PID})
		}
		if len(pass.Resets) > 0 {
			k.log.Info("reset established flows the new policy blocks", "reset", len(pass.Resets), "flows", pass.Flows, "took", time.Since(start))
		}
	}
}

var (
	reauthDesc = prometheus.NewDesc("fwp_kernel_reauthorize_total",
		"Reauthorization of established flows after policy changes: passes, flows classified again, flows reset, failed passes.", []string{"what"}, nil)
	reauthLastDesc = prometheus.NewDesc("fwp_kernel_reauthorize_last_pass_seconds",
		"How long the last reauthorization pass took (walking the sockets, classifying, resetting).", nil, nil)
)

type reauthCollector struct{ r *reauthorizer }

func (reauthCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- reauthDesc
	ch <- reauthLastDesc
}

func (c reauthCollector) Collect(ch chan<- prometheus.Metric) {
	for what, n := range map[string]uint64{"passes": c.r.passes.Load(), "flows": c.r.flows.Load(), "resets": c.r.resets.Load(), "errors": c.r.errors.Load()} {
		ch <- prometheus.MustNewConstMetric(reauthDesc, prometheus.CounterValue, float64(n), what)
	}
	ch <- prometheus.MustNewConstMetric(reauthLastDesc, prometheus.GaugeValue, time.Duration(c.r.lastNanos.Load()).Seconds())
}
