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
	// policy is the kernel policy in force (k.policy), read without k.mu:
	// the flow event reader must not wait for a commit's compile.
	policy atomic.Pointer[ebpf.Policy]

	// The flow layers (ALE_FLOW_ESTABLISHED, ALE_ENDPOINT_CLOSURE) run from
	// the hooks' flow events once a policy has filters there.
	flowStarted bool
	flowStop    context.CancelFunc
	flowDone    chan struct{}
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
		p := k.reauth.policy.Load()
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

var flowLostDesc = prometheus.NewDesc("fwp_kernel_flow_events_lost_total",
	"Flow establishment and closure reports the kernel could not queue for fwpd (the flow layers missed them).", nil, nil)

type reauthCollector struct {
	r *reauthorizer
	d *ebpf.Datapath
}

func (reauthCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- reauthDesc
	ch <- reauthLastDesc
	ch <- flowLostDesc
}

func (c reauthCollector) Collect(ch chan<- prometheus.Metric) {
	if c.d != nil {
		if n, err := c.d.FlowEventsLost(); err == nil {
			ch <- prometheus.MustNewConstMetric(flowLostDesc, prometheus.CounterValue, float64(n))
		}
	}
	for what, n := range map[string]uint64{"passes": c.r.passes.Load(), "flows": c.r.flows.Load(), "resets": c.r.resets.Load(), "errors": c.r.errors.Load()} {
		ch <- prometheus.MustNewConstMetric(reauthDesc, prometheus.CounterValue, float64(n), what)
	}
	ch <- prometheus.MustNewConstMetric(reauthLastDesc, prometheus.GaugeValue, time.Duration(c.r.lastNanos.Load()).Seconds())
}

// startFlowLayers turns the kernel's flow events on and runs the flow
// layers' filters for them, from the first policy that has filters at
// ALE_FLOW_ESTABLISHED or ALE_ENDPOINT_CLOSURE, or Go callouts on the
// kernel path (callouts: their flow contexts end at the flow's closure),
// until fwpd exits. k.mu is held.
func (k *kernel) startFlowLayers(v engine.View, callouts bool) error {
	if k.reauth.flowStarted || !ebpf.HasFlowLayerFilters(v) && !callouts {
		return nil
	}
	if err := k.d.EnableFlowEvents(); err != nil {
		return err
	}
	fl := &ebpf.FlowLayers{Engine: k.co.eng, Policy: k.reauth.policy.Load}
	ctx, cancel := context.WithCancel(context.Background())
	k.reauth.flowStarted, k.reauth.flowStop, k.reauth.flowDone = true, cancel, make(chan struct{})
	go func() {
		defer close(k.reauth.flowDone)
		if err := k.d.ReadFlowEvents(ctx, func(ev ebpf.FlowEvent) { fl.Handle(ev) }); err != nil {
			k.log.Error("kernel flow events stopped", "err", err)
		}
	}()
	k.log.Info("flow layers on: ALE_FLOW_ESTABLISHED and ALE_ENDPOINT_CLOSURE run for the kernel's flows (TCP; UDP: closure only), and their flow contexts end with them")
	return nil
}

// stopFlowLayers ends the flow event reader (close).
func (k *kernel) stopFlowLayers() {
	if k.reauth.flowStop != nil {
		k.reauth.flowStop()
		<-k.reauth.flowDone
	}
}
