//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"fwp/internal/unix"
)

// hook is one program and where it attaches. A redirect hook serves
// redirected sockets only (their original destination, 4-tuple index,
// SO_ORIGINAL_DST, cleanup): it is attached once a policy redirects
// connections, so that a policy without redirects costs a connection the
// classifying hooks alone.
type hook struct {
	name     string
	prog     *ebpf.Program
	at       ebpf.AttachType
	redirect bool
	// proxy: the hook serves a proxy's own sockets (its accepted and
	// outbound ones: getsockopt, setsockopt, sockops, sock_release), so it
	// is attached where redirect targets run too (AttachProxy).
	proxy bool
}

func (d *Datapath) hooks() []hook {
	p := &d.objs.fwpPrograms
	return []hook{
		{"connect4", p.FwpConnect4, ebpf.AttachCGroupInet4Connect, false, false},
		{"connect6", p.FwpConnect6, ebpf.AttachCGroupInet6Connect, false, false},
		{"sendmsg4", p.FwpSendmsg4, ebpf.AttachCGroupUDP4Sendmsg, false, false},
		{"sendmsg6", p.FwpSendmsg6, ebpf.AttachCGroupUDP6Sendmsg, false, false},
		{"bind4", p.FwpBind4, ebpf.AttachCGroupInet4Bind, false, false},
		{"bind6", p.FwpBind6, ebpf.AttachCGroupInet6Bind, false, false},
		{"recvmsg4", p.FwpRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg, true, false},
		{"recvmsg6", p.FwpRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg, true, false},
		{"getpeername4", p.FwpGetpeername4, ebpf.AttachCgroupInet4GetPeername, true, false},
		{"getpeername6", p.FwpGetpeername6, ebpf.AttachCgroupInet6GetPeername, true, false},
		{"sockops", p.FwpSockops, ebpf.AttachCGroupSockOps, true, true},
		{"getsockopt", p.FwpGetsockopt, ebpf.AttachCGroupGetsockopt, true, true},
		{"setsockopt", p.FwpSetsockopt, ebpf.AttachCGroupSetsockopt, true, true},
		{"sock_release", p.FwpSockRelease, ebpf.AttachCgroupInetSockRelease, true, true},
		{"egress", p.FwpEgress, ebpf.AttachCGroupInetEgress, true, false},
		{"ingress", p.FwpIngress, ebpf.AttachCGroupInetIngress, true, false}, // inbound.go
	}
}

// linkPin is where a hook's link on a cgroup is pinned with KeepHooks.
func (d *Datapath) linkPin(cgroupPath string, h hook) (string, error) {
	id, err := unix.CgroupID(cgroupPath)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return filepath.Join(d.opts.PinDir, fmt.Sprintf("link_%d_%s", id, h.name)), nil
}

// pinnedRedirectHooks reports whether an earlier datapath left redirect
// hooks pinned on the cgroup (it had redirects): they are adopted.
func (d *Datapath) pinnedRedirectHooks(cgroupPath string) bool {
	if d.opts.PinDir == "" || !d.opts.KeepHooks {
		return false
	}
	for _, h := range d.hooks() {
		if !h.redirect {
			continue
		}
		if pin, err := d.linkPin(cgroupPath, h); err == nil {
			if _, err := os.Stat(pin); err == nil {
				return true
			}
		}
	}
	return false
}

func (d *Datapath) mapsByName() map[string]*ebpf.Map {
	m := &d.objs.fwpMaps
	return map[string]*ebpf.Map{
		"fwp_addrs": m.FwpAddrs, "fwp_bitsets": m.FwpBitsets, "fwp_config": m.FwpConfig, "fwp_filters": m.FwpFilters,
		"fwp_ints": m.FwpInts, "fwp_layers": m.FwpLayers, "fwp_ports": m.FwpPorts, "fwp_redirects": m.FwpRedirects,
		"fwp_sock_records": m.FwpSockRecords, "fwp_sock_redirect": m.FwpSockRedirect, "fwp_tuple_redirect": m.FwpTupleRedirect,
		"fwp_events": m.FwpEvents, "fwp_hits": m.FwpHits, "fwp_proxy_ports": m.FwpProxyPorts, "fwp_udp_key": m.FwpUdpKey, "fwp_targets": m.FwpTargets,
		"fwp_counts": m.FwpCounts, "fwp_hosts": m.FwpHosts, "fwp_host_ids": m.FwpHostIds, "fwp_host_runs": m.FwpHostRuns,
		"fwp_id_runs":  m.FwpIdRuns,
		"fwp_sk_owner": m.FwpSkOwner, "fwp_in_epoch": m.FwpInEpoch, "fwp_in_flows": m.FwpInFlows, // inbound.go
		"fwp_in_listeners": m.FwpInListeners, "fwp_in_listen_idx": m.FwpInListenIdx, // inlisten.go
		"fwp_in_udp_owners": m.FwpInUdpOwners, // inudp.go

		"fwp_udp_replies": m.FwpUdpReplies, "fwp_udp_reply_counts": m.FwpUdpReplyCounts, // udpreply.go
	}
}

// pinnedMaps are the maps worth keeping across a restart (fwp_zero_state
// is constant: a new load has its own; fwp_targets is rewritten by the
// Apply that installs the stored policy before the hooks are attached).
var pinnedMaps = []string{"fwp_addrs", "fwp_bitsets", "fwp_config", "fwp_filters", "fwp_ints", "fwp_layers",
	"fwp_ports", "fwp_redirects", "fwp_sock_records", "fwp_sock_redirect", "fwp_tuple_redirect", "fwp_events", "fwp_hits",
	"fwp_proxy_ports", "fwp_udp_key", "fwp_counts", "fwp_hosts", "fwp_host_ids", "fwp_host_runs", "fwp_id_runs",
	// The inbound layers' socket owners, epoch and UDP flows: a listener
	// keeps its owner across a restart (the epoch with them, so a record
	// is never taken for the new policy's).
	"fwp_sk_owner", "fwp_in_epoch", "fwp_in_flows",
	// The listeners' owners by address, for the callout path (inlisten.go).
	"fwp_in_listeners", "fwp_in_listen_idx",
	// The UDP sockets' owners by cookie, for the callout path (inudp.go).
	"fwp_in_udp_owners",
	// The inbound UDP flows whose replies pass (udpreply.go), with the
	// epoch they are stamped with.
	"fwp_udp_replies"}

// EnsureBPFFS makes dir a directory on a bpffs: it creates it and, when
// its parent is not on a bpffs, mounts one on the parent (usually
// /sys/fs/bpf, absent on minimal systems).
func EnsureBPFFS(dir string) error {
	_, err := ensureBPFFS(dir)
	return err
}

// ensureBPFFS is EnsureBPFFS; it returns the directory it mounted a bpffs
// on, "" when there was one already.
func ensureBPFFS(dir string) (mounted string, err error) {
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return "", fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if ok, err := unix.IsBPFFS(parent); err != nil {
		return "", fmt.Errorf("%w: %v", ErrUnavailable, err)
	} else if !ok {
		if err := unix.MountBPF(parent); err != nil {
			return "", fmt.Errorf("%w: no bpffs at %s and mounting one failed: %v", ErrUnavailable, parent, err)
		}
		mounted = parent
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return mounted, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return mounted, nil
}

// unmountBPFFS undoes ensureBPFFS's mount, once the datapath's pins are
// gone: only when nothing else was pinned there meanwhile (a bpffs mount
// is its own instance, and an unmount would drop another's pins).
func (d *Datapath) unmountBPFFS() error {
	if d.mounted == "" {
		return nil
	}
	_ = os.Remove(d.opts.PinDir) // only when empty
	ents, err := os.ReadDir(d.mounted)
	if err != nil {
		return nil
	}
	for _, e := range ents {
		if n := e.Name(); n != "maps.debug" && n != "progs.debug" { // the kernel's own, in every bpffs
			return nil // in use: leave it
		}
	}
	err = unix.Unmount(d.mounted)
	d.mounted = ""
	return err
}

// adoptMaps opens the maps an earlier datapath pinned in PinDir when
// KeepHooks asks to adopt them, or removes stale pins otherwise. It
// returns the load options and the opened maps.
func (d *Datapath) adoptMaps(spec *ebpf.CollectionSpec) (*ebpf.CollectionOptions, []*ebpf.Map, error) {
	dir := d.opts.PinDir
	if dir == "" {
		return nil, nil, nil
	}
	mounted, err := ensureBPFFS(dir)
	d.mounted = mounted
	if err != nil {
		return nil, nil, err
	}
	if !d.opts.KeepHooks {
		// Left by a datapath that died without Close: its links went
		// with it, its maps are of no use.
		if err := removePins(dir); err != nil {
			return nil, nil, err
		}
		return nil, nil, nil
	}
	repl := map[string]*ebpf.Map{}
	var opened []*ebpf.Map
	for _, name := range pinnedMaps {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			for _, m := range opened {
				m.Close()
			}
			return nil, nil, fmt.Errorf("%w: open pinned map %s: %v", ErrUnavailable, name, err)
		}
		opened = append(opened, m)
		repl[name] = m
	}
	if len(opened) == 0 {
		return nil, nil, nil
	}
	fail := func(err error) (*ebpf.CollectionOptions, []*ebpf.Map, error) {
		for _, m := range opened {
			m.Close()
		}
		return nil, nil, err
	}
	// An older fwpd pinned fewer maps (features added since): those
	// present are adopted, the others start empty and are pinned by
	// afterLoad, as on a first start. The generation and policy live in
	// the maps every version pinned.
	for _, name := range []string{"fwp_config", "fwp_bitsets", "fwp_addrs", "fwp_ints", "fwp_filters", "fwp_layers"} {
		if repl[name] == nil {
			return fail(fmt.Errorf("%w: %s holds only some of the datapath's maps (not %s); remove it to start afresh", ErrUnavailable, dir, name))
		}
	}
	// Sizes the options set: the pinned maps keep theirs.
	for _, name := range append([]string{"fwp_bitsets", "fwp_addrs", "fwp_hosts", "fwp_host_ids"}, redirectRecordMaps...) {
		if m := repl[name]; m != nil {
			spec.Maps[name].MaxEntries = m.MaxEntries()
		}
	}
	// A map whose layout changed since cannot be adopted: said by name,
	// before anything is loaded.
	for _, name := range pinnedMaps {
		if m := repl[name]; m != nil {
			if err := spec.Maps[name].Compatible(m); err != nil {
				return fail(fmt.Errorf("%w: pinned map %s in %s is not the layout this fwpd uses (%v): an fwpd of another version pinned it; stop its hooks with that version, or remove %s to start afresh", ErrUnavailable, name, dir, err, dir))
			}
		}
	}
	d.adopted = map[string]bool{}
	for name := range repl {
		d.adopted[name] = true
	}
	return &ebpf.CollectionOptions{MapReplacements: repl}, opened, nil
}

// afterLoad pins the maps and, for adopted ones, recovers the active
// generation and the keys each generation wrote.
func (d *Datapath) afterLoad(adopted bool) error {
	if adopted {
		var cfg fwpConfig
		if err := d.objs.FwpConfig.Lookup(uint32(0), &cfg); err != nil {
			return fmt.Errorf("%w: read adopted generation: %v", ErrUnavailable, err)
		}
		d.gen = cfg.Gen
		if err := d.recoverKeys(); err != nil {
			return err
		}
	}
	if d.opts.PinDir == "" {
		return nil
	}
	byName := d.mapsByName()
	for _, name := range pinnedMaps {
		p := filepath.Join(d.opts.PinDir, name)
		if d.adopted[name] {
			continue // already pinned there
		}
		if err := byName[name].Pin(p); err != nil {
			return fmt.Errorf("%w: pin %s: %v", ErrUnavailable, p, err)
		}
	}
	return nil
}

func (d *Datapath) recoverKeys() error {
	var bk fwpBsKey
	var bv fwpBitset
	it := d.objs.FwpBitsets.Iterate()
	for it.Next(&bk, &bv) {
		d.written[bk.Glf>>16&1].bitsets = append(d.written[bk.Glf>>16&1].bitsets, bk)
	}
	var ak fwpAddrKey
	var av uint32
	it2 := d.objs.FwpAddrs.Iterate()
	for it2.Next(&ak, &av) {
		d.written[ak.Glf>>16&1].addrs = append(d.written[ak.Glf>>16&1].addrs, ak)
	}
	var ik fwpIntKey
	var iv uint32
	it3 := d.objs.FwpInts.Iterate()
	for it3.Next(&ik, &iv) {
		d.written[ik.Glf>>16&1].ints = append(d.written[ik.Glf>>16&1].ints, ik)
	}
	if err := errors.Join(it.Err(), it2.Err(), it3.Err()); err != nil {
		return fmt.Errorf("%w: read adopted policy: %v", ErrUnavailable, err)
	}
	return nil
}

func removePins(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "fwp_") || strings.HasPrefix(e.Name(), "link_") {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("%w: remove stale pin: %v", ErrUnavailable, err)
			}
		}
	}
	return nil
}

// attachHook links one program to the cgroup. With KeepHooks, a link an
// earlier datapath pinned for the same cgroup is adopted and switched to
// this program atomically (the hook never goes away); otherwise a new
// link is made, and pinned when KeepHooks is set.
func (d *Datapath) attachHook(cgroupPath string, h hook) (link.Link, error) {
	var pin string
	if d.opts.PinDir != "" && d.opts.KeepHooks {
		var err error
		if pin, err = d.linkPin(cgroupPath, h); err != nil {
			return nil, err
		}
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			if err := l.Update(h.prog); err != nil {
				l.Close()
				return nil, fmt.Errorf("%w: adopt pinned link %s: %v", ErrUnavailable, pin, err)
			}
			return l, nil
		}
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: h.at, Program: h.prog})
	if err != nil {
		return nil, fmt.Errorf("%w: attach %s to %s: %v", ErrUnavailable, h.at, cgroupPath, err)
	}
	if pin != "" {
		if err := l.Pin(pin); err != nil {
			l.Close()
			return nil, fmt.Errorf("%w: pin %s: %v", ErrUnavailable, pin, err)
		}
	}
	return l, nil
}
