package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
	"fwp/internal/unix"
)

// kernelConfig is the kernel datapath's part of the command line.
type kernelConfig struct {
	datapath  string // "kernel" or "none"
	cgroup    string
	bpffsDir  string
	keepHooks bool
	classes   uint
	callouts  calloutConfig
}

func (k *kernelConfig) flags(fs *flag.FlagSet) {
	fs.StringVar(&k.datapath, "datapath", "kernel", `"kernel": enforce the policy on the sockets of --cgroup with eBPF hooks (needs root); "none": serve the policy only`)
	fs.StringVar(&k.cgroup, "cgroup", "", "cgroup v2 directory whose processes the kernel datapath filters (default: the cgroup2 root from /proc/mounts)")
	fs.StringVar(&k.bpffsDir, "bpffs-dir", "/sys/fs/bpf/fwp", "bpffs directory for the datapath's pins (redirect maps for proxies; hooks with --keep-hooks-on-exit); a bpffs is mounted on its parent if absent")
	fs.UintVar(&k.classes, "kernel-max-classes", 0, "bound the kernel datapath's class bitsets (about 2 KiB of kernel memory each; 0: 65536)")
	fs.BoolVar(&k.keepHooks, "keep-hooks-on-exit", false, "pin the hooks so the policy stays enforced after fwpd exits; the next fwpd adopts them")
	k.callouts.flags(fs)
}

// kernel is fwpd's eBPF datapath: every commit's policy is compiled and
// installed before the commit takes effect.
type kernel struct {
	d      *ebpf.Datapath
	cgroup string
	log    *slog.Logger
	lock   *os.File // held while the datapath is ours
	co     calloutPath
}

// loadKernel loads the datapath (adopting pinned hooks and maps with
// --keep-hooks-on-exit); nil for --datapath none. The hooks are attached
// by attach, once the stored policy is installed.
func loadKernel(c kernelConfig, log *slog.Logger) (*kernel, error) {
	switch c.datapath {
	case "none":
		log.Info("kernel datapath off (--datapath none): serving policy only")
		return nil, nil
	case "kernel":
	default:
		return nil, fmt.Errorf("--datapath: %q is not kernel or none", c.datapath)
	}
	if c.cgroup == "" {
		root, err := unix.FindCgroup2()
		if err != nil {
			return nil, fmt.Errorf("kernel datapath: %w: %v; mount cgroup2, pass --cgroup, or run with --datapath none", ebpf.ErrUnavailable, err)
		}
		c.cgroup = root
	}
	lock, err := lockPins(c.bpffsDir)
	if err != nil {
		return nil, err
	}
	d, err := ebpf.Load(ebpf.Options{PinDir: c.bpffsDir, KeepHooks: c.keepHooks, MaxClasses: uint32(min(c.classes, 1<<32-1))})
	if err != nil {
		os.Remove(lock.Name())
		lock.Close()
		return nil, fmt.Errorf("kernel datapath: %w (or run with --datapath none)", err)
	}
	return &kernel{d: d, cgroup: c.cgroup, log: log, lock: lock, co: calloutPath{cfg: c.callouts, log: log}}, nil
}

// lockPins makes sure no other fwpd uses the same pin directory (a new
// one would take its maps for stale and remove them). bpffs holds no
// regular files, so the lock is a file in the temporary directory named
// after the pin directory; the kernel drops it when fwpd dies.
func lockPins(dir string) (*os.File, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(abs))
	f, err := os.OpenFile(filepath.Join(os.TempDir(), "fwpd-pins-"+hex.EncodeToString(sum[:8])+".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("kernel datapath: lock %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("kernel datapath: another fwpd uses --bpffs-dir %s (%v)", dir, err)
	}
	return f, nil
}

// beforeCommit is mgmt's BeforeCommit: a policy the kernel cannot enforce
// (a Go callout, an unsupported condition) or that does not fit its maps
// refuses the commit, so what fwpctl shows is what the kernel enforces.
func (k *kernel) beforeCommit(v engine.View) error {
	p, err := ebpf.Compile(v)
	if err != nil {
		return fmt.Errorf("kernel datapath refuses the policy: %w", err)
	}
	// Flows handed to Go callouts need the callout path before the
	// policy marks any.
	if p.Callouts() {
		if err := k.co.start(k.d); err != nil {
			return fmt.Errorf("kernel datapath refuses the policy: %w", err)
		}
	}
	if err := k.d.Apply(p); err != nil {
		return fmt.Errorf("kernel datapath refuses the policy: %w", err)
	}
	return nil
}

func (k *kernel) attach() error {
	if err := k.d.Attach(k.cgroup); err != nil {
		return fmt.Errorf("kernel datapath: %w", err)
	}
	k.log.Info("kernel datapath attached", "cgroup", k.cgroup)
	return nil
}

// close detaches the hooks, unless they are pinned to outlive fwpd.
func (k *kernel) close() {
	if k == nil {
		return
	}
	k.co.close()
	if err := k.d.Close(); err != nil {
		k.log.Error("kernel datapath close", "err", err)
	}
	os.Remove(k.lock.Name()) // still held: no other fwpd can be using it
	k.lock.Close()
}

// serve feeds the kernel's drops and redirects to the engine's net events
// (fwpctl events --follow) until ctx ends, and, with metrics on, exports
// the kernel's per-filter counters; it also clears closed UDP clients'
// redirect records past their grace period.
func (k *kernel) serve(ctx context.Context, eng *engine.Engine, reg *prometheus.Registry) {
	if k == nil {
		return
	}
	if reg != nil {
		reg.MustRegister(kernelCollector{k.d, eng})
		reg.MustRegister(calloutCollector{&k.co})
	}
	go func() {
		t := time.NewTicker(time.Duration(ebpf.ReleasedGrace) * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if n, err := k.d.SweepReleased(); err != nil {
					k.log.Debug("sweeping closed UDP redirect records", "err", err)
				} else if n > 0 {
					k.log.Debug("swept closed UDP redirect records", "n", n)
				}
			}
		}
	}()
	var paths ebpf.ProcessPaths
	go func() {
		err := k.d.ReadEvents(ctx, func(e ebpf.Event) {
			t := engine.EventClassifyDrop
			if e.Type == ebpf.EventRedirect {
				t = engine.EventClassifyRedirect
			}
			reason, callout := e.Explain(eng.View())
			eng.RecordNetEvent(engine.NetEvent{Type: t, Layer: e.Layer, Filter: e.Filter, Callout: callout, Reason: reason, Protocol: e.Protocol,
				Local: e.Local, Remote: e.Remote, AppID: paths.Path(e.PID, e.Comm), UserID: e.UID, GroupID: e.GID, CgroupID: e.CgroupID, ProcessID: e.PID})
		})
		if err != nil {
			k.log.Error("kernel events stopped", "err", err)
		}
	}()
}

var kernelHitsDesc = prometheus.NewDesc("fwp_kernel_filter_decisions_total",
	"Classifications each filter decided in the kernel datapath's hooks (per-CPU counters, summed).", []string{"filter_id", "filter_key"}, nil)

type kernelCollector struct {
	d   *ebpf.Datapath
	eng *engine.Engine
}

func (kernelCollector) Describe(ch chan<- *prometheus.Desc) { ch <- kernelHitsDesc }

func (c kernelCollector) Collect(ch chan<- prometheus.Metric) {
	hits, err := c.d.FilterHits()
	if err != nil {
		return
	}
	v := c.eng.View()
	for id, n := range hits {
		key := ""
		if f, err := v.Filter(id); err == nil {
			key = f.Key
		}
		ch <- prometheus.MustNewConstMetric(kernelHitsDesc, prometheus.CounterValue, float64(n), strconv.FormatUint(uint64(id), 10), key)
	}
}
