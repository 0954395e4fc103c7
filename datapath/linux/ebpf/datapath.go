//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"

	"fwp/internal/unix"
)

// Options configure a Datapath.
type Options struct {
	// MaxClasses bounds the class bitsets (both generations together); 0
	// keeps the default 65536. Each costs about 2 KiB of kernel memory while used.
	MaxClasses uint32
	// MaxAddresses bounds the address prefixes the address conditions
	// store in the kernel's LPM trie (both generations together); 0 keeps
	// the default DefaultMaxAddresses. Entries are allocated as they are
	// written, not reserved (see docs/benchmarks.md for the bytes each).
	MaxAddresses uint32
	// MaxHosts bounds the host table entries (hosts.go), both generations
	// together; 0 keeps DefaultMaxHosts. They are preallocated: 8 bytes
	// each (the host and a filter id). A policy whose tables do not fit
	// a generation (half) is refused with ErrCapacity.
	MaxHosts uint32
	// MaxRedirectRecords bounds each redirect record map (by socket, by
	// 4-tuple, UDP keys, proxies' records); 0 keeps the default 65536.
	// They are LRU maps, preallocated: a record of a live connection is
	// evicted once the map is full. A closed UDP client's record stays a
	// grace period (ReleasedGrace) for the datagrams still queued to its
	// proxy, and goes at the sweep after (every half grace): the 4-tuple
	// map holds the UDP flows of the last 10–15 s, about 4,400 new flows a
	// second at the defaults. The four maps take about 880 bytes of kernel
	// memory a record (TestMaxRedirectRecords): 57 MB at the default.
	MaxRedirectRecords uint32
	// PinDir, a directory on a bpffs, holds the maps' pins while the
	// datapath is loaded, so proxies in other processes find the redirect
	// maps (OpenRedirects). Maps already pinned there by an earlier
	// datapath are adopted with their policy when KeepHooks is set, and
	// discarded otherwise.
	PinDir string
	// KeepHooks pins the links too and makes Close leave programs, maps
	// and pins in place: the policy stays enforced after the process
	// exits, and the next Load with the same PinDir adopts it.
	KeepHooks bool
}

// redirectRecordMaps are the maps MaxRedirectRecords sizes.
var redirectRecordMaps = []string{"fwp_sock_redirect", "fwp_tuple_redirect", "fwp_udp_key", "fwp_sock_records"}

// Datapath is the loaded eBPF programs and maps. Load it once, Attach it to
// a cgroup v2 and Apply compiled policies; Close detaches everything.
type Datapath struct {
	mu      sync.Mutex
	objs    fwpObjects
	links   map[string][]link.Link // by cgroup path
	gen     uint32                 // the active generation
	written [2]genKeys
	closed  bool
	opts    Options
	// targets are the redirect target pids of each redirect handle in the
	// active policy, for checking who may put records on a socket.
	targets map[uint32][]uint32
	// noBatch: maps whose type has no batch update (putAll).
	noBatch map[*ebpf.Map]bool
	// redirectHooks: the redirect hooks are attached (or are to be, to
	// each cgroup attached), since a policy redirected connections.
	redirectHooks bool
	// ingressHook: the ingress hook alone is attached (or is to be), since
	// a policy had outbound filters (udpreply.go).
	ingressHook bool
	// mounted is the directory Load mounted a bpffs on for PinDir (none
	// was there): Close unmounts it, unless the hooks stay (KeepHooks).
	mounted string
	// proxyLinks are the proxy hooks alone on cgroups where proxies run
	// (AttachProxy, redirect targets' cgroups), by cgroup path.
	proxyLinks map[string][]link.Link
	// targetKeys are the (handle, target pid) pairs in fwp_targets.
	targetKeys map[fwpTargetKey]bool
	// hostMem and idMem are fwp_hosts and fwp_host_ids mapped (hosts.go).
	hostMem, idMem *ebpf.Memory
	// reauth: the socket iterators, once EnableReauthorization loaded them.
	reauth *reauthObjs
	// unaccepted: TCP redirect records whose client has closed and whose
	// proxy side was never seen established, with when a sweep first saw
	// them so (SweepReleased).
	unaccepted map[fwpTupleKey]unacceptedSeen
	// grace waits for the hooks' runs in flight after a switch (grace.go).
	grace *graceMaps
	// runtimeRecords counts the records SetCalloutRedirect made
	// (RedirectRecordCounts).
	runtimeRecords atomic.Uint64
	// swept counts the sockets whose map state SweepDead deleted,
	// sweptRedirects those of them with a redirect record.
	swept, sweptRedirects atomic.Uint64
	// adopted names the maps Load adopted from PinDir (KeepHooks); an
	// older fwpd's pins lack the maps added since.
	adopted map[string]bool
}

// genKeys are the hash-map keys one generation wrote, deleted before the
// generation is rewritten.
type genKeys struct {
	bitsets []fwpBsKey
	addrs   []fwpAddrKey
	ints    []fwpIntKey
}

// loadSpec is the programs' spec Load loads: the embedded object; a
// benchmark comparing two builds of bpf/fwp.c side by side replaces it.
var loadSpec = loadFwp

// Load loads and verifies the programs and creates the maps. It needs root
// (CAP_BPF and CAP_NET_ADMIN); without it the error wraps ErrUnavailable
// and says what is missing.
func Load(opts Options) (*Datapath, error) {
	if unix.Geteuid() != 0 {
		return nil, fmt.Errorf("%w: loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN)", ErrUnavailable)
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("%w: memlock rlimit: %v", ErrUnavailable, err)
	}
	spec, err := loadSpec()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	spec.Maps["fwp_addrs"].MaxEntries = DefaultMaxAddresses
	if opts.MaxAddresses > 0 {
		spec.Maps["fwp_addrs"].MaxEntries = opts.MaxAddresses
	}
	hosts := uint32(DefaultMaxHosts)
	if opts.MaxHosts > 0 {
		hosts = opts.MaxHosts
	}
	blocks := max((hosts+2*hostBlock-1)/(2*hostBlock)*2, 2) // whole blocks, an even half each
	spec.Maps["fwp_hosts"].MaxEntries = blocks
	spec.Maps["fwp_host_ids"].MaxEntries = blocks
	if opts.MaxRedirectRecords > 0 {
		for _, name := range redirectRecordMaps {
			spec.Maps[name].MaxEntries = opts.MaxRedirectRecords
		}
	}
	if opts.MaxClasses > 0 {
		spec.Maps["fwp_bitsets"].MaxEntries = opts.MaxClasses
	}
	d := &Datapath{opts: opts}
	copts, adopted, err := d.adoptMaps(spec)
	if err != nil {
		d.unmountBPFFS()
		return nil, err
	}
	defer func() {
		for _, m := range adopted {
			m.Close() // LoadAndAssign cloned them
		}
	}()
	if err := spec.LoadAndAssign(&d.objs, copts); err != nil {
		if !opts.KeepHooks {
			d.unmountBPFFS()
		}
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("%w: the kernel refused the programs: %v", ErrUnavailable, ve)
		}
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if err := d.afterLoad(len(adopted) > 0); err != nil {
		d.objs.Close()
		if !opts.KeepHooks {
			os.RemoveAll(opts.PinDir)
			d.unmountBPFFS()
		}
		return nil, err
	}
	return d, nil
}

// Attach attaches the hooks to the cgroup v2 directory path as bpf_links:
// sockets created by processes in that cgroup (and below) are classified.
// The redirect hooks join once a policy redirects connections (Apply), or
// at once when they already did (a policy in force, or pinned by an
// earlier datapath with KeepHooks).
func (d *Datapath) Attach(cgroupPath string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	// The kernel's own refusal of anything else is "bad file descriptor".
	switch v, err := unix.CgroupVersion(cgroupPath); {
	case err != nil:
		return fmt.Errorf("%w: cgroup %v", ErrUnavailable, err)
	case v == 1:
		return fmt.Errorf("%w: %s is not a cgroup v2 directory (it is on a cgroup v1 hierarchy); give a directory of the cgroup2 mount (see /proc/mounts)", ErrUnavailable, cgroupPath)
	case v != 2:
		return fmt.Errorf("%w: %s is not a cgroup v2 directory (not on a cgroup file system); give a directory of the cgroup2 mount (see /proc/mounts)", ErrUnavailable, cgroupPath)
	}
	if !d.redirectHooks && d.pinnedRedirectHooks(cgroupPath) {
		// Adopt them here, and have every cgroup attached so far get them.
		if err := d.attachRedirectHooks(); err != nil {
			return err
		}
	}
	links, err := d.attachHooks(cgroupPath, func(h hook) bool {
		return !h.redirect || d.redirectHooks || (d.ingressHook && h.name == ingressHookName)
	})
	if err != nil {
		return err
	}
	live, err := d.attachLive(cgroupPath) // flowevents.go
	if err != nil {
		for _, l := range links {
			l.Close()
		}
		return err
	}
	links = append(links, live...)
	if d.links == nil {
		d.links = map[string][]link.Link{}
	}
	d.links[cgroupPath] = append(d.links[cgroupPath], links...)
	return nil
}

// attachHooks attaches the hooks want picks to one cgroup: all or none.
func (d *Datapath) attachHooks(cgroupPath string, want func(hook) bool) ([]link.Link, error) {
	var links []link.Link
	for _, h := range d.hooks() {
		if !want(h) {
			continue
		}
		l, err := d.attachHook(cgroupPath, h)
		if err != nil {
			for _, l := range links {
				l.Close()
			}
			return nil, err
		}
		links = append(links, l)
	}
	return links, nil
}

// attachRedirectHooks attaches the redirect hooks to every cgroup the
// datapath is attached to, all or none; they stay until Detach or Close
// (a redirected socket outlives the policy that redirected it). d.mu is
// held.
func (d *Datapath) attachRedirectHooks() error {
	if d.redirectHooks {
		return nil
	}
	added := map[string][]link.Link{}
	for path := range d.links {
		links, err := d.attachHooks(path, func(h hook) bool { return h.redirect && !(d.ingressHook && h.name == ingressHookName) })
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
	d.redirectHooks = true
	return nil
}

// Detach removes the hooks from one cgroup; the maps and the policy stay.
func (d *Datapath) Detach(cgroupPath string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	for _, l := range d.links[cgroupPath] {
		if d.opts.KeepHooks {
			_ = l.Unpin() // a pinned link would outlive Close
		}
		errs = append(errs, l.Close())
	}
	delete(d.links, cgroupPath)
	for _, l := range d.proxyLinks[cgroupPath] {
		if d.opts.KeepHooks {
			_ = l.Unpin()
		}
		errs = append(errs, l.Close())
	}
	delete(d.proxyLinks, cgroupPath)
	return errors.Join(errs...)
}

// Close detaches the hooks and frees the maps: nothing stays in the kernel.
func (d *Datapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	for _, m := range []map[string][]link.Link{d.links, d.proxyLinks} {
		for _, ls := range m {
			for _, l := range ls {
				errs = append(errs, l.Close())
			}
		}
	}
	errs = append(errs, d.reauth.close(), d.objs.Close(), d.grace.close())
	if !d.opts.KeepHooks && d.opts.PinDir != "" {
		errs = append(errs, os.RemoveAll(d.opts.PinDir))
		errs = append(errs, d.unmountBPFFS())
	}
	return errors.Join(errs...)
}

func glf(gen uint32, slot, field int) uint32 { return gen<<16 | uint32(slot)<<8 | uint32(field) }

// Apply installs a compiled policy atomically: it is written beside the
// active one and switched by a single write of the generation, so a
// connection is classified wholly by the old or wholly by the new policy.
// It returns once every hook run that read the old generation has ended
// (an RCU grace period, 8–24 ms here: grace.go), so the next Apply may
// rewrite it and no classification after Apply uses the old policy.
// On error the active policy is left in force.
func (d *Datapath) Apply(p *Policy) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	// Before the policy takes effect: its first redirected connection
	// needs them.
	if p.connectRedirects || p.callouts || p.inbound {
		if err := d.attachRedirectHooks(); err != nil {
			return err
		}
		if err := d.attachTargets(p); err != nil {
			return err
		}
	}
	// Inbound UDP flows are recorded for their replies (udpreply.go).
	if p.outboundFilters() {
		if err := d.attachIngressHook(); err != nil {
			return err
		}
	}
	// Who may set records naming each redirect (the setsockopt hook):
	// the new policy's targets join before it takes effect, the old
	// ones leave after.
	targets := map[fwpTargetKey]bool{}
	for _, r := range p.redirects {
		if r.Pid != 0 {
			targets[fwpTargetKey{Handle: r.Handle, Pid: r.Pid}] = true
		}
	}
	var added []fwpTargetKey
	committed := false
	defer func() {
		if !committed { // the old policy stays: so do its targets alone
			for _, k := range added {
				_ = d.objs.FwpTargets.Delete(k)
			}
		}
	}()
	for k := range targets {
		if !d.targetKeys[k] {
			if err := d.objs.FwpTargets.Put(k, uint8(1)); err != nil {
				return mapErr("redirect targets", err)
			}
			added = append(added, k)
		}
	}
	next := 1 - d.gen
	if err := d.clearGen(next); err != nil {
		return err
	}
	if err := d.writeGen(next, p); err != nil {
		return err
	}
	if err := d.objs.FwpConfig.Put(uint32(0), fwpConfig{Gen: next}); err != nil {
		return fmt.Errorf("switch generation: %w", err)
	}
	d.gen = next
	committed = true
	// Runs that read the old generation end before Apply returns, so the
	// next Apply may rewrite it (grace.go), and no connect after Apply is
	// decided by the old policy.
	if d.grace == nil {
		g, err := newGraceMaps()
		if err != nil {
			return err
		}
		d.grace = g
	}
	if err := d.grace.wait(); err != nil {
		return err
	}
	d.bumpInboundEpoch()
	for k := range d.targetKeys {
		if !targets[k] {
			_ = d.objs.FwpTargets.Delete(k) // best effort: only a stale permission
		}
	}
	d.targetKeys = targets
	d.pruneHits(p)
	d.targets = make(map[uint32][]uint32)
	for _, r := range p.redirects {
		if r.Pid != 0 {
			d.targets[r.Handle] = append(d.targets[r.Handle], r.Pid)
		}
	}
	return nil
}

func (d *Datapath) clearGen(gen uint32) error {
	w := &d.written[gen]
	del := func(m *ebpf.Map, k any) error {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("clear generation %d: %w", gen, err)
		}
		return nil
	}
	for _, k := range w.bitsets {
		if err := del(d.objs.FwpBitsets, k); err != nil {
			return err
		}
	}
	// Batched where the map type allows (a million-address list); a key
	// already gone makes the batch stop, and the loop finishes it.
	if len(w.addrs) > 0 {
		if _, err := d.objs.FwpAddrs.BatchDelete(w.addrs, nil); err != nil {
			for _, k := range w.addrs {
				if err := del(d.objs.FwpAddrs, k); err != nil {
					return err
				}
			}
		}
	}
	for _, k := range w.ints {
		if err := del(d.objs.FwpInts, k); err != nil {
			return err
		}
	}
	*w = genKeys{}
	if err := d.clearHosts(gen); err != nil {
		return err
	}
	for slot := range numSlots {
		if err := d.objs.FwpLayers.Put(uint32(int(gen)*numSlots+slot), fwpLayerCfg{}); err != nil {
			return fmt.Errorf("clear generation %d: %w", gen, err)
		}
	}
	return nil
}

func mapErr(what string, err error) error {
	if errors.Is(err, os.ErrInvalid) || strings.Contains(err.Error(), "no space") || strings.Contains(err.Error(), "argument list too long") {
		return fmt.Errorf("%w: %s: %v", ErrCapacity, what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// DefaultMaxAddresses is the default of Options.MaxAddresses: two
// generations of a policy with two million address prefixes.
const DefaultMaxAddresses = 1 << 22

// putAll writes many entries, in batches where the map type has them (one
// system call per batch instead of per entry: a million-address list).
func (d *Datapath) putAll(m *ebpf.Map, keys, vals any) error {
	n := reflect.ValueOf(keys).Len()
	if n == 0 {
		return nil
	}
	if !d.noBatch[m] {
		_, err := m.BatchUpdate(keys, vals, nil)
		if err == nil {
			return nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return err
		}
		if d.noBatch == nil {
			d.noBatch = map[*ebpf.Map]bool{}
		}
		d.noBatch[m] = true
	}
	kv, vv := reflect.ValueOf(keys), reflect.ValueOf(vals)
	for i := range n {
		if err := m.Put(kv.Index(i).Addr().Interface(), vv.Index(i).Addr().Interface()); err != nil {
			return err
		}
	}
	return nil
}

func (d *Datapath) writeGen(gen uint32, p *Policy) error {
	w := &d.written[gen]
	if err := d.writeHosts(gen, p); err != nil {
		return err
	}
	for i, rc := range p.redirects {
		if err := d.objs.FwpRedirects.Put(uint32(int(gen)*MaxRedirects+i), rc); err != nil {
			return mapErr("redirects", err)
		}
		// Before the switch to this generation: a socket redirected to the
		// port must find it marked at its first getpeername.
		if rc.Port != 0 {
			if err := d.objs.FwpProxyPorts.Put(uint32(rc.Port), uint8(1)); err != nil {
				return mapErr("proxy ports", err)
			}
		}
	}
	for slot, lp := range p.layers {
		if lp == nil {
			continue
		}
		li := int(gen)*numSlots + slot
		for f := range numFields {
			for cls, b := range lp.classes[f].sets {
				k := fwpBsKey{Glf: glf(gen, slot, f), Cls: uint32(cls)}
				w.bitsets = append(w.bitsets, k)
				if err := d.objs.FwpBitsets.Put(k, kernelBitset(b)); err != nil {
					return mapErr("class bitsets", err)
				}
			}
		}
		for which, entries := range lp.addrs {
			keys := make([]fwpAddrKey, len(entries))
			vals := make([]uint32, len(entries))
			for i, e := range entries {
				k := &keys[i]
				k.Prefixlen, k.Glf = uint32(32+e.prefix.Bits()), glf(gen, slot, fieldRAddr+which)
				a := e.prefix.Addr().As16()
				if e.prefix.Addr().Is4() {
					copy(k.Addr[:], a[12:])
				} else {
					k.Addr = a
				}
				vals[i] = e.class
			}
			w.addrs = append(w.addrs, keys...)
			if err := d.putAll(d.objs.FwpAddrs, keys, vals); err != nil {
				return mapErr("address classes", err)
			}
		}
		for which, ports := range lp.ports {
			if ports == nil {
				continue
			}
			base := ((int(gen)*numSlots+slot)*2 + which) * (65536 / portBlock)
			keys := make([]uint32, 65536/portBlock)
			vals := make([]fwpPortBlock, 65536/portBlock)
			for i := range keys {
				keys[i] = uint32(base + i)
				copy(vals[i].Cls[:], ports[i*portBlock:(i+1)*portBlock])
			}
			if _, err := d.objs.FwpPorts.BatchUpdate(keys, vals, nil); err != nil {
				return mapErr("port classes", err)
			}
		}
		for which, m := range lp.ints {
			for v, cls := range m {
				k := fwpIntKey{Glf: glf(gen, slot, fieldProto+which), Val: v}
				w.ints = append(w.ints, k)
				if err := d.objs.FwpInts.Put(k, cls); err != nil {
					return mapErr("id classes", err)
				}
			}
		}
		for v, cls := range lp.gids {
			k := fwpIntKey{Glf: glf(gen, slot, fieldGID), Val: v}
			w.ints = append(w.ints, k)
			if err := d.objs.FwpInts.Put(k, cls); err != nil {
				return mapErr("group classes", err)
			}
		}
		for id, cls := range lp.apps {
			k := fwpIntKey{Glf: glf(gen, slot, fieldApp), Dev: id.Dev, Val: id.Ino}
			w.ints = append(w.ints, k)
			if err := d.objs.FwpInts.Put(k, cls); err != nil {
				return mapErr("app classes", err)
			}
		}
		keys := make([]uint32, len(lp.filters))
		for i := range keys {
			keys[i] = uint32(li*MaxFilters + i)
		}
		if _, err := d.objs.FwpFilters.BatchUpdate(keys, lp.filters, nil); err != nil {
			return mapErr("filters", err)
		}
		cfg := fwpLayerCfg{Nfilters: uint32(len(lp.filters)), Nwords: uint32((len(lp.filters) + 63) / 64), Active: lp.activeWord(),
			DefaultClass: lp.def, EmptyClass: lp.empty}
		if err := d.objs.FwpLayers.Put(uint32(li), cfg); err != nil {
			return mapErr("layers", err)
		}
	}
	return nil
}

// SetRedirectRecords marks a socket (by its SO_COOKIE) as carrying records
// of the given redirect handles (callout IDs of built-in redirects): its
// connect is not redirected again by those redirects, which is how a proxy's
// outbound connection avoids a loop. Call it before connect.
func (d *Datapath) SetRedirectRecords(cookie uint64, handles ...uint32) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	return d.redirects().SetRedirectRecords(cookie, handles...)
}

// RedirectState is what the kernel recorded about one redirected connection.
type RedirectState struct {
	Original  netip.AddrPort // the destination the client asked for
	Proxy     netip.AddrPort // where it was sent
	Protocol  uint8
	Handle    uint32 // the redirect's handle: its callout ID
	TargetPID uint32 // the process allowed to query the context
	PID       uint32 // the connecting process (tgid)
	UID, GID  uint32
	CgroupID  uint64
	Comm      string
	Cookie    uint64 // the client socket's cookie
	Context   []byte
}

func addrOf(b [16]byte, v6 uint8) netip.Addr {
	if v6 != 0 {
		return netip.AddrFrom16(b)
	}
	return netip.AddrFrom4([4]byte(b[:4]))
}

func (s *fwpRedirectState) export() RedirectState {
	comm := make([]byte, 0, 16)
	for _, c := range s.Comm {
		if c == 0 {
			break
		}
		comm = append(comm, byte(c))
	}
	n := min(int(s.CtxLen), MaxContextLen)
	return RedirectState{
		Original: netip.AddrPortFrom(addrOf(s.OrigAddr, s.OrigV6), s.OrigPort),
		Proxy:    netip.AddrPortFrom(addrOf(s.ProxyAddr, s.ProxyV6), s.ProxyPort),
		Protocol: s.Proto, Handle: s.Handle, TargetPID: s.TargetPid, PID: s.Pid, UID: s.Uid, GID: s.Gid,
		CgroupID: s.CgroupId, Comm: string(comm), Cookie: s.Cookie, Context: append([]byte(nil), s.Ctx[:n]...),
	}
}

// QueryRedirect finds the redirect of a TCP connection the proxy accepted:
// local is the accepted socket's local address (the proxy's), remote its
// peer (the client). Without a record the error wraps ErrNoRedirect.
func (d *Datapath) QueryRedirect(local, remote netip.AddrPort) (RedirectState, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return RedirectState{}, ErrClosed
	}
	return d.redirects().QueryRedirect(local, remote)
}

// RedirectByCookie returns the redirect recorded for a client socket.
func (d *Datapath) RedirectByCookie(cookie uint64) (RedirectState, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return RedirectState{}, ErrClosed
	}
	return d.redirects().RedirectByCookie(cookie)
}

// EnableStats turns on the kernel's run-time accounting of BPF programs
// (BPF_ENABLE_STATS) until the returned closer is closed.
func EnableStats() (io.Closer, error) {
	c, err := ebpf.EnableStats(unix.BPFStatsRunTime)
	if err != nil {
		return nil, fmt.Errorf("%w: BPF_ENABLE_STATS: %v", ErrUnavailable, err)
	}
	return c, nil
}

// HookStats is a hook program's run count and total run time, from the
// kernel's bpf_stats (counted only while EnableStats is in force).
type HookStats struct {
	Runs    uint64
	RunTime time.Duration
}

// Stats returns the run statistics of each hook program by name (connect4,
// sendmsg6, ...; flow_sockops and flow_release once reauthorization is on).
func (d *Datapath) Stats() (map[string]HookStats, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrClosed
	}
	p := &d.objs.fwpPrograms
	progs := map[string]*ebpf.Program{
		"connect4": p.FwpConnect4, "connect6": p.FwpConnect6, "sendmsg4": p.FwpSendmsg4, "sendmsg6": p.FwpSendmsg6,
		"recvmsg4": p.FwpRecvmsg4, "recvmsg6": p.FwpRecvmsg6, "getpeername4": p.FwpGetpeername4, "getpeername6": p.FwpGetpeername6,
		"bind4": p.FwpBind4, "bind6": p.FwpBind6, "sockops": p.FwpSockops, "getsockopt": p.FwpGetsockopt, "setsockopt": p.FwpSetsockopt,
		"sock_release": p.FwpSockRelease, "egress": p.FwpEgress, "ingress": p.FwpIngress,
	}
	if d.reauth != nil { // reauth.c's flow programs, attached beside the hooks
		progs["flow_sockops"], progs["flow_release"] = d.reauth.objs.FwpFlowSockops, d.reauth.objs.FwpFlowRelease
	}
	out := map[string]HookStats{}
	for name, prog := range progs {
		st, err := prog.Stats()
		if err != nil {
			return nil, fmt.Errorf("stats of %s: %w", name, err)
		}
		out[name] = HookStats{Runs: st.RunCount, RunTime: st.Runtime}
	}
	return out, nil
}
