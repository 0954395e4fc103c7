package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"fwp/datapath/linux/ebpf"
	"fwp/engine"
	"fwp/internal/trust"
	"fwp/internal/unix"
)

// kernelConfig is the kernel datapath's part of the command line.
type kernelConfig struct {
	datapath  string // "kernel" or "none"
	cgroup    string
	bpffsDir  string
	keepHooks bool
	classes   uint
	lockWait  time.Duration
	// proxyCgroups: "auto", "none" or cgroup v2 directories (comma
	// separated) where transparent proxies run (see resolveProxyCgroups).
	proxyCgroups string
	addrs        uint
	hosts        uint
	redirects    uint
	callouts     calloutConfig
	// noReauth: --no-reauthorize-established (reauth.go).
	noReauth bool
	// liveness: --kernel-liveness-interval (livenessLoop).
	liveness time.Duration
}

func (k *kernelConfig) flags(fs *flag.FlagSet) {
	fs.StringVar(&k.datapath, "datapath", "kernel", `"kernel": enforce the policy on the sockets of --cgroup with eBPF hooks (needs root); "none": serve the policy only`)
	fs.StringVar(&k.cgroup, "cgroup", "", "cgroup v2 directory whose processes the kernel datapath filters (default: the cgroup2 root from /proc/mounts)")
	fs.StringVar(&k.bpffsDir, "bpffs-dir", "/sys/fs/bpf/fwp", "bpffs directory for the datapath's pins (redirect maps for proxies; hooks with --keep-hooks-on-exit); a bpffs is mounted on its parent if absent")
	fs.UintVar(&k.classes, "kernel-max-classes", 0, "bound the kernel datapath's class bitsets (about 2 KiB of kernel memory each; 0: 65536)")
	fs.DurationVar(&k.lockWait, "bpffs-lock-wait", pinsLockWait, "how long to wait for another fwpd (one exiting, say) to let go of --bpffs-dir")
	fs.UintVar(&k.addrs, "kernel-max-addresses", 0, "bound the address prefixes of the kernel's policy, both generations (48 bytes of kernel memory each while used; 0: 4194304, two 2M-address policies)")
	fs.UintVar(&k.hosts, "kernel-max-hosts", 0, "bound the host table of large address lists and host filter runs, both generations (8 bytes of kernel memory each, preallocated; 0: 2097152, two policies of a million hosts)")
	fs.UintVar(&k.redirects, "kernel-max-redirect-records", 0, "bound the redirect record maps (by socket, by 4-tuple; LRU, preallocated: about 880 bytes of kernel memory a record). A closed UDP client's record stays 10–15 s for its queued datagrams, so the default holds about 4,400 new redirected UDP flows a second; a full map evicts live records (0: 65536)")
	fs.BoolVar(&k.keepHooks, "keep-hooks-on-exit", false, "pin the hooks so the policy stays enforced after fwpd exits; the next fwpd adopts them")
	fs.StringVar(&k.proxyCgroups, "proxy-cgroup", "auto", `cgroup v2 directories (comma separated) where transparent proxies run: their sockets get the proxy hooks (SO_ORIGINAL_DST, SOL_FWP socket options). "auto": the cgroup2 root when fwpd itself runs on it and --cgroup is a child, else none; "none". Each redirect's target_pid's cgroup gets them anyway`)
	k.callouts.flags(fs)
	fs.DurationVar(&k.liveness, "kernel-liveness-interval", 2*time.Minute, "how often to sweep the kernel state and flow contexts of sockets that are gone when no release or closure report ended them (a report lost to a full ring); state goes at the second sweep that finds no socket. 0: never")
	fs.BoolVar(&k.noReauth, "no-reauthorize-established", false, "leave established connections alone when a committed policy blocks them (default: reauthorize them and reset those it blocks)")
}

// resolveProxyCgroups turns --proxy-cgroup into directories. The proxy
// hooks on the cgroup2 root run for every socket of the machine, so "auto"
// picks it only where fwpd is not confined to a cgroup of its own (then it
// governs the machine anyway).
func resolveProxyCgroups(flag, cgroup string) ([]string, error) {
	switch flag {
	case "none", "":
		return nil, nil
	case "auto":
		root, err := unix.FindCgroup2()
		if err != nil {
			return nil, nil
		}
		onRoot, err := ebpf.ProcessOnCgroupRoot()
		if err != nil || !onRoot || filepath.Clean(cgroup) == filepath.Clean(root) {
			return nil, nil
		}
		return []string{root}, nil
	}
	var out []string
	for _, p := range strings.Split(flag, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out, nil
}

// kernel is fwpd's eBPF datapath: every commit's policy is compiled and
// installed before the commit takes effect.
type kernel struct {
	d      *ebpf.Datapath
	cgroup string
	// proxyCgroups get the proxy hooks (--proxy-cgroup).
	proxyCgroups []string
	log          *slog.Logger
	lock         *os.File // held while the datapath is ours

	// The policy in force and the view it was compiled from, so that it
	// is compiled again when a file its app id conditions name is
	// replaced (followApps); watch watches those files.
	mu      sync.Mutex
	view    engine.View
	policy  *ebpf.Policy
	watch   *ebpf.AppWatcher
	watched string        // the watched paths, joined
	kick    chan struct{} // the watcher changed, or a file did before it watched
	co      calloutPath
	reauth  reauthorizer
	// liveness is the liveness sweep's interval (0: none); sweptSockets
	// and sweptFlows count what it ended.
	liveness                 time.Duration
	sweptSockets, sweptFlows atomic.Uint64
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
	lock, err := lockPins(c.bpffsDir, c.lockWait, log)
	if err != nil {
		return nil, err
	}
	if err := checkPins(c.bpffsDir, c.keepHooks); err != nil {
		os.Remove(lock.Name())
		lock.Close()
		return nil, err
	}
	d, err := ebpf.Load(ebpf.Options{PinDir: c.bpffsDir, KeepHooks: c.keepHooks, MaxClasses: uint32(min(c.classes, 1<<32-1)),
		MaxAddresses: uint32(min(c.addrs, 1<<32-1)), MaxHosts: uint32(min(c.hosts, 1<<32-1)),
		MaxRedirectRecords: uint32(min(c.redirects, 1<<32-1))})
	if err != nil {
		os.Remove(lock.Name())
		lock.Close()
		return nil, fmt.Errorf("kernel datapath: %w (or run with --datapath none)", err)
	}
	proxies, err := resolveProxyCgroups(c.proxyCgroups, c.cgroup)
	if err != nil {
		d.Close()
		os.Remove(lock.Name())
		lock.Close()
		return nil, err
	}
	k := &kernel{d: d, cgroup: c.cgroup, proxyCgroups: proxies, log: log, lock: lock, kick: make(chan struct{}, 1), co: calloutPath{cfg: c.callouts, log: log}, liveness: c.liveness}
	k.enableReauth(!c.noReauth)
	return k, nil
}

// pinsLockWait bounds how long a new fwpd waits for the previous one to
// let go of --bpffs-dir: a process killed with SIGKILL holds its lock
// until the kernel has torn down its maps (more than a second with tens of
// thousands of filters), and a restart (systemd's Restart=) comes sooner.
const pinsLockWait = 10 * time.Second

// pinsLockDir holds the pin directories' lock files: root's own
// /run/fwp/locks, where no other user can make a file first (/run/fwp is
// the systemd unit's RuntimeDirectory, writable under ProtectSystem). A
// lock file in the shared /tmp could be made (and held for ever) by any
// local user at its predictable name, and fwpd would refuse to start.
// fwpd without root (no kernel datapath; tests) uses the temporary
// directory.
func pinsLockDir() (string, error) {
	if os.Geteuid() != 0 {
		return os.TempDir(), nil
	}
	const run, dir = "/run/fwp", "/run/fwp/locks"
	for _, d := range []struct {
		path string
		mode os.FileMode
	}{{run, 0o755}, {dir, 0o700}} { // /run/fwp: the socket's too, searchable
		if err := os.Mkdir(d.path, d.mode); err != nil && !errors.Is(err, os.ErrExist) {
			return "", err
		}
	}
	return dir, trust.Dir("pin lock directory", dir)
}

// lockPins makes sure no other fwpd uses the same pin directory (a new
// one would take its maps for stale and remove them), waiting up to wait
// for one that is exiting. bpffs holds no regular files, so the lock is a
// file named after the pin directory in pinsLockDir; the kernel drops it
// when fwpd dies. The file must be fwpd's own: one another user made
// could be held by them forever.
func lockPins(dir string, wait time.Duration, log *slog.Logger) (*os.File, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	ldir, err := pinsLockDir()
	if err != nil {
		return nil, fmt.Errorf("kernel datapath: lock %s: %w", dir, err)
	}
	sum := sha256.Sum256([]byte(abs))
	name := filepath.Join(ldir, "fwpd-pins-"+hex.EncodeToString(sum[:8])+".lock")
	f, err := os.OpenFile(name, os.O_CREATE|os.O_RDWR|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("kernel datapath: lock %s: %w", dir, err)
	}
	if err := trust.File("--bpffs-dir lock file", name); err != nil {
		f.Close()
		return nil, fmt.Errorf("kernel datapath: %w (remove it)", err)
	}
	deadline := time.Now().Add(wait)
	for waited := false; ; waited = true {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			if waited {
				log.Info("the previous fwpd let go of --bpffs-dir", "dir", dir)
			}
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			f.Close()
			if waited {
				return nil, fmt.Errorf("kernel datapath: another fwpd uses --bpffs-dir %s, still after %s (%v)", dir, wait, err)
			}
			return nil, fmt.Errorf("kernel datapath: another fwpd uses --bpffs-dir %s (%v)", dir, err)
		}
		if !waited {
			log.Warn("another fwpd uses --bpffs-dir, waiting for it to exit", "dir", dir, "lock", name, "up_to", wait)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkPins refuses a pin directory another user can write: its pins are
// what proxies read redirects from and, with --keep-hooks-on-exit, the
// hooks and policy maps fwpd adopts, so each pin is checked too.
func checkPins(dir string, keepHooks bool) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil // ebpf.Load makes it, mode 0700
	}
	if err := trust.Dir("--bpffs-dir", dir); err != nil {
		return fmt.Errorf("kernel datapath: %w", err)
	}
	if !keepHooks {
		return nil // stale pins are removed, not adopted
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("kernel datapath: %w", err)
	}
	for _, e := range ents {
		if err := trust.File("pin adopted with --keep-hooks-on-exit", filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("kernel datapath: %w", err)
		}
	}
	return nil
}

// beforeCommit is mgmt's BeforeCommit: a policy the kernel cannot enforce
// (a Go callout, an unsupported condition) or that does not fit its maps
// refuses the commit, so what fwpctl shows is what the kernel enforces.
func (k *kernel) beforeCommit(v engine.View) error {
	k.mu.Lock()
	defer k.mu.Unlock()
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
	// A Go callout at CONNECT_REDIRECT may redirect at run time: the
	// callout path's DNAT chain (and conntrack) only then.
	if p.CalloutRedirects() {
		if err := k.co.enableRedirects(); err != nil {
			return fmt.Errorf("kernel datapath refuses the policy: %w", err)
		}
	}
	// A Go callout filter matching UDP: the first datagrams are held
	// (conntrack in the served namespace) only then.
	if p.UDPCallouts() {
		if err := k.co.enableUDP(); err != nil {
			return fmt.Errorf("kernel datapath refuses the policy: %w", err)
		}
	}
	// A Go callout filter at AUTH_RECV_ACCEPT: inbound SYNs to the hooked
	// cgroup's listeners are queued (the input chain) only then.
	if p.InboundCallouts() {
		if err := k.co.enableInbound(k.cgroup, p); err != nil {
			return fmt.Errorf("kernel datapath refuses the policy: %w", err)
		}
	}
	// One matching UDP: inbound datagrams of new flows too (conntrack).
	if p.InboundUDPCallouts() {
		if err := k.co.enableInboundUDP(); err != nil {
			return fmt.Errorf("kernel datapath refuses the policy: %w", err)
		}
	}
	// Flow layer filters need the flow events before the policy is in
	// force; so do Go callouts on the kernel path, whose flow contexts
	// (FlowAssociateContext with the socket cookie) end when the socket's
	// closure is reported — without the events they would never end.
	if err := k.startFlowLayers(v, p.Callouts()); err != nil { // reauth.go
		return fmt.Errorf("kernel datapath refuses the policy: its flow layers: %w", err)
	}
	if err := k.d.Apply(p); err != nil {
		return fmt.Errorf("kernel datapath refuses the policy: %w", err)
	}
	k.view, k.policy = v, p
	k.reauth.policy.Store(p)
	k.watchApps(false)
	return nil
}

// watchApps watches the files the policy's app id conditions name (anew
// when renew is set: a directory may have appeared), then kicks followApps
// if one changed since the policy was compiled: watching first misses
// nothing. k.mu is held.
func (k *kernel) watchApps(renew bool) {
	paths := k.policy.AppPaths()
	key := strings.Join(paths, "\x00")
	if renew || key != k.watched {
		if k.watch != nil {
			k.watch.Close()
			k.watch = nil
		}
		k.watched = ""
		if len(paths) > 0 {
			w, err := ebpf.WatchApps(paths)
			if err != nil {
				k.log.Error("watching the policy's applications (a replaced file is followed only at the next commit)", "err", err)
			} else {
				k.watch, k.watched = w, key
			}
		}
	}
	select {
	case k.kick <- struct{}{}: // the loop picks up the new watcher
	default:
	}
}

// followApps compiles the policy in force again when a file its app id
// conditions name was replaced (a package upgrade renames a new file over
// the old), so the rule follows the file the path names.
func (k *kernel) followApps() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.policy == nil || !k.policy.AppsChanged() {
		return
	}
	// Watch again before compiling: the new file's directory may be new.
	old := k.policy
	k.watchApps(true)
	p, err := ebpf.Compile(k.view)
	if err == nil {
		err = k.d.Apply(p)
	}
	if err != nil {
		k.log.Error("an application file was replaced; recompiling the kernel policy failed (the old one stays)", "err", err)
		k.policy = old
		return
	}
	k.policy = p
	k.reauth.policy.Store(p)
	k.log.Info("an application file was replaced: kernel policy recompiled to follow it", "apps", p.AppPaths())
}

// appsLoop runs followApps whenever the watcher reports a change.
func (k *kernel) appsLoop(ctx context.Context) {
	for {
		k.mu.Lock()
		var changed <-chan struct{}
		if k.watch != nil {
			changed = k.watch.Changed()
		}
		k.mu.Unlock()
		select {
		case <-ctx.Done():
			k.mu.Lock()
			if k.watch != nil {
				k.watch.Close()
				k.watch = nil
			}
			k.mu.Unlock()
			return
		case <-changed:
			k.followApps()
		case <-k.kick:
			k.followApps()
		}
	}
}

func (k *kernel) attach() error {
	if err := k.d.Attach(k.cgroup); err != nil {
		return fmt.Errorf("kernel datapath: %w", err)
	}
	for _, p := range k.proxyCgroups {
		if err := k.d.AttachProxy(p); err != nil {
			return fmt.Errorf("kernel datapath: --proxy-cgroup: %w", err)
		}
	}
	k.log.Info("kernel datapath attached", "cgroup", k.cgroup, "proxy_cgroups", k.proxyCgroups)
	return nil
}

// close detaches the hooks, unless they are pinned to outlive fwpd.
func (k *kernel) close() {
	if k == nil {
		return
	}
	k.co.close()
	k.stopFlowLayers()
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
		reg.MustRegister(kernelCollector{k.d, eng, k})
		reg.MustRegister(calloutCollector{&k.co})
	}
	go func() {
		t := time.NewTicker(time.Duration(ebpf.ReleasedGrace) * time.Second / 2)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if n, err := k.d.SweepReleased(); err != nil {
					k.log.Debug("sweeping redirect records of closed sockets", "err", err)
				} else if n > 0 {
					k.log.Debug("swept redirect records of closed sockets", "n", n)
				}
			}
		}
	}()
	go k.livenessLoop(ctx, eng)
	go k.appsLoop(ctx)
	go k.reauthLoop(ctx, eng)
	if reg != nil {
		reg.MustRegister(reauthCollector{&k.reauth, k.d})
	}
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
	k   *kernel
}

var kernelRecordsDesc = prometheus.NewDesc("fwp_kernel_redirect_records_total",
	"Redirect records by socket the kernel datapath made (event=made) and ended with their socket (event=released); the difference is the records of open redirected sockets, plus any a release never ended.", []string{"event"}, nil)

var kernelSweptDesc = prometheus.NewDesc("fwp_kernel_liveness_swept_total",
	"Sockets whose kernel state (what=sockets) and flows whose contexts (what=flows) the liveness sweep ended: their socket was gone and no release or closure report had ended them.", []string{"what"}, nil)

func (kernelCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- kernelHitsDesc
	ch <- kernelRecordsDesc
	ch <- kernelSweptDesc
}

func (c kernelCollector) Collect(ch chan<- prometheus.Metric) {
	if rc, err := c.d.RedirectRecordCounts(); err == nil {
		ch <- prometheus.MustNewConstMetric(kernelRecordsDesc, prometheus.CounterValue, float64(rc.Made), "made")
		ch <- prometheus.MustNewConstMetric(kernelRecordsDesc, prometheus.CounterValue, float64(rc.Released), "released")
		ch <- prometheus.MustNewConstMetric(kernelRecordsDesc, prometheus.CounterValue, float64(rc.Swept), "swept")
	}
	ch <- prometheus.MustNewConstMetric(kernelSweptDesc, prometheus.CounterValue, float64(c.k.sweptSockets.Load()), "sockets")
	ch <- prometheus.MustNewConstMetric(kernelSweptDesc, prometheus.CounterValue, float64(c.k.sweptFlows.Load()), "flows")
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

// livenessLoop runs the liveness sweep (ebpf.SweepDead) every k.liveness
// (--kernel-liveness-interval): state is deleted at the second sweep that
// finds no socket, so it outlives its socket by one to two intervals, and
// a live socket is never missed by two walks. It sweeps the kernel
// maps' entries of sockets no release ended, and the engine's flow
// contexts of kernel flows (socket cookies: handles without the top bit
// NewFlowHandle sets) whose closure report was lost. Each dead flow's
// contexts end with FlowDeleted (their flowDeleteFn, once); no
// ENDPOINT_CLOSURE is classified for them (the report that had its values
// is what was lost).
func (k *kernel) livenessLoop(ctx context.Context, eng *engine.Engine) {
	if k.liveness <= 0 {
		return
	}
	t := time.NewTicker(k.liveness)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var flows []uint64
		for _, h := range eng.FlowHandles() {
			if h>>63 == 0 {
				flows = append(flows, uint64(h))
			}
		}
		res, err := k.d.SweepDead(flows)
		if err != nil {
			k.log.Debug("liveness sweep", "err", err)
			continue
		}
		for _, f := range res.Flows {
			eng.FlowDeleted(engine.FlowHandle(f))
		}
		k.sweptSockets.Add(uint64(res.Records))
		k.sweptFlows.Add(uint64(len(res.Flows)))
		if res.Records > 0 || len(res.Flows) > 0 {
			k.log.Info("liveness sweep ended the state of closed sockets", "sockets", res.Records, "flows", len(res.Flows), "namespaces", res.Namespaces)
		}
	}
}
