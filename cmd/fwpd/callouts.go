package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"fwp/datapath/linux/ebpf"
	"fwp/datapath/linux/nfqueue"
	"fwp/engine"
)

// calloutConfig is the kernel callout path's part of the command line.
type calloutConfig struct {
	queueBase uint
	queueLen  uint
	holdLimit time.Duration
	netns     string
}

func (c *calloutConfig) flags(fs *flag.FlagSet) {
	fs.UintVar(&c.queueBase, "callout-queue-base", 7000, "first NFQUEUE number of the kernel callout path (one queue per CPU from there)")
	fs.UintVar(&c.queueLen, "callout-queue-len", 8192, "packets each queue of the kernel callout path holds; beyond it a new flow is decided by its filter's fail-open/closed flag at once (counted, with a net event)")
	fs.StringVar(&c.netns, "callout-netns", "", "network namespace (a path such as /proc/PID/ns/net or /run/netns/NAME) whose traffic the kernel callout path serves: its nftables tables and queues go there (default: fwpd's own)")
	fs.DurationVar(&c.holdLimit, "callout-hold-limit", 15*time.Second, "longest a flow waits for a Go callout whatever it does (keep it below connect's SYN timer)")
}

// calloutPath is fwpd's kernel callout path (package nfqueue), started with
// the first policy whose filters call Go callouts at the kernel's layers:
// fwp's nftables tables are installed in fwpd's network namespace then,
// never for a policy without such filters.
type calloutPath struct {
	cfg  calloutConfig
	log  *slog.Logger
	eng  *engine.Engine
	mu   sync.Mutex
	path *nfqueue.Path
	ns   *os.File
}

func (c *calloutPath) start(d *ebpf.Datapath) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.path != nil {
		return nil
	}
	if c.eng == nil || c.cfg.queueBase > 65535 {
		return fmt.Errorf("kernel callout path: bad configuration (--callout-queue-base %d)", c.cfg.queueBase)
	}
	eng := c.eng
	opts := nfqueue.Options{QueueBase: uint16(c.cfg.queueBase), MaxLen: uint32(min(c.cfg.queueLen, 1<<31)), HoldLimit: c.cfg.holdLimit, Log: c.log,
		// A flow the kernel decided by its filter's flag (the queue full):
		// a net event, with the filter and process when the hook's record
		// is still there.
		OnFallback: func(fb nfqueue.Fallback) {
			ev := engine.NetEvent{Type: engine.EventClassifyDrop, Reason: engine.ReasonCalloutUnregisteredBlock, Protocol: fb.Protocol,
				Local: fb.Local, Remote: fb.Remote, UserID: fb.UID, GroupID: fb.GID}
			if fb.FailOpen {
				ev.Type, ev.Reason = engine.EventClassifyAllow, engine.ReasonCalloutUnregisteredPermit
			}
			if f, err := d.CalloutFlow(fb.Local, fb.Remote); err == nil {
				ev.Layer, ev.Filter, ev.ProcessID, ev.CgroupID = f.Layer, f.Filter, f.PID, f.CgroupID
			}
			eng.RecordNetEvent(ev)
		}}
	if c.cfg.netns != "" {
		ns, err := os.Open(c.cfg.netns)
		if err != nil {
			return fmt.Errorf("kernel callout path: --callout-netns: %w", err)
		}
		opts.NetNS = int(ns.Fd())
		c.ns = ns
	}
	p, err := nfqueue.Start(c.eng, d, opts)
	if err != nil {
		if c.ns != nil {
			c.ns.Close()
			c.ns = nil
		}
		return fmt.Errorf("kernel callout path: %w", err)
	}
	c.path = p
	c.log.Info("kernel callout path started", "queue_base", c.cfg.queueBase)
	return nil
}

// enableRedirects lets the running callout path carry out redirects Go
// callouts choose at run time (package nfqueue, redirect.go).
func (c *calloutPath) enableRedirects() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.path == nil {
		return fmt.Errorf("kernel callout path: not started")
	}
	if c.path.RedirectsEnabled() {
		return nil
	}
	if err := c.path.EnableRedirects(); err != nil {
		return fmt.Errorf("kernel callout path: run-time redirects: %w", err)
	}
	c.log.Info("kernel callout path: run-time redirects enabled (DNAT chain and conntrack in the served namespace)")
	return nil
}

// enableUDP lets the running callout path hold UDP flows' first
// datagrams for Go callouts (package nfqueue, udp.go).
func (c *calloutPath) enableUDP() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.path == nil {
		return fmt.Errorf("kernel callout path: not started")
	}
	if err := c.path.EnableUDP(); err != nil {
		return fmt.Errorf("kernel callout path: UDP flows: %w", err)
	}
	return nil
}

// enableInbound lets the running callout path hold inbound SYNs to the
// cgroup's listeners for Go callouts at AUTH_RECV_ACCEPT (package
// nfqueue, inbound.go), on the ports the policy's callout filters can
// match (those of earlier policies stay queued while the path runs).
func (c *calloutPath) enableInbound(cgroup string, p *ebpf.Policy) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.path == nil {
		return fmt.Errorf("kernel callout path: not started")
	}
	ports, all := p.InboundCalloutPorts()
	if all {
		ports = nil
	}
	first := !c.path.InboundEnabled()
	if err := c.path.EnableInbound(ports, cgroup); err != nil {
		return fmt.Errorf("kernel callout path: inbound requests: %w", err)
	}
	if !first {
		return nil
	}
	c.log.Info("kernel callout path: inbound connection requests held for Go callouts", "cgroup", cgroup)
	return nil
}

// enableInboundUDP lets the running callout path hold the first datagram
// of inbound UDP flows to the hooked cgroup's sockets for Go callouts at
// AUTH_RECV_ACCEPT (package nfqueue, inudp.go).
func (c *calloutPath) enableInboundUDP() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.path == nil {
		return fmt.Errorf("kernel callout path: not started")
	}
	if c.path.InboundUDPEnabled() {
		return nil
	}
	if err := c.path.EnableInboundUDP(); err != nil {
		return fmt.Errorf("kernel callout path: inbound UDP flows: %w", err)
	}
	c.log.Info("kernel callout path: inbound UDP flows' first datagrams held for Go callouts")
	return nil
}

func (c *calloutPath) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.path == nil {
		return
	}
	if err := c.path.Close(); err != nil {
		c.log.Error("kernel callout path close", "err", err)
	}
	st := c.path.Stats()
	c.log.Info("kernel callout path stopped", "queued", st.Queued, "permitted", st.Permitted, "blocked", st.Blocked, "pended", st.Pended)
	c.path = nil
	if c.ns != nil {
		c.ns.Close()
		c.ns = nil
	}
}

// setEngine gives the callout path the engine whose callouts decide.
func (k *kernel) setEngine(e *engine.Engine) {
	if k != nil {
		k.co.eng = e
	}
}

var calloutDesc = prometheus.NewDesc("fwp_callout_path_flows_total",
	"Flows the kernel callout path handled, by outcome (queued, permitted, blocked, pended, resent, no_metadata, redirected, redirect_refused, verdict_errors; flag_permitted and flag_refused: SYNs the kernel decided by their filter's fail-open/closed flag because the queue was full or unread).", []string{"outcome"}, nil)

var calloutHeldDesc = prometheus.NewDesc("fwp_callout_path_held",
	"Flows the kernel callout path holds for a pending Go callout right now.", nil, nil)

// calloutCollector exports the callout path's counters (none until it
// starts).
type calloutCollector struct{ c *calloutPath }

func (calloutCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- calloutDesc
	ch <- calloutHeldDesc
}

func (cc calloutCollector) Collect(ch chan<- prometheus.Metric) {
	cc.c.mu.Lock()
	p := cc.c.path
	cc.c.mu.Unlock()
	if p == nil {
		return
	}
	st := p.Stats()
	for outcome, n := range map[string]uint64{"queued": st.Queued, "permitted": st.Permitted, "blocked": st.Blocked, "pended": st.Pended,
		"resent": st.Resent, "no_metadata": st.NoFlow, "redirected": st.Redirected, "redirect_refused": st.Redirects, "verdict_errors": st.Errors} {
		ch <- prometheus.MustNewConstMetric(calloutDesc, prometheus.CounterValue, float64(n), outcome)
	}
	ch <- prometheus.MustNewConstMetric(calloutHeldDesc, prometheus.GaugeValue, float64(st.Held))
	// SYNs the kernel decided by their filter's flag without user space
	// (a full queue; or no reader, counted once fwpd is back).
	if open, closed, err := p.Fallbacks(); err == nil {
		ch <- prometheus.MustNewConstMetric(calloutDesc, prometheus.CounterValue, float64(open), "flag_permitted")
		ch <- prometheus.MustNewConstMetric(calloutDesc, prometheus.CounterValue, float64(closed), "flag_refused")
	}
}
