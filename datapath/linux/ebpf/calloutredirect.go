//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"fwp/engine"
)

// GoRedirectHandleBit tags the kernel redirect records (the u32 handles of
// fwp_sock_records and of the SOL_FWP options) that name a redirect a Go
// callout chose at run time: the rest of the word is its
// engine.RedirectHandle. Records without the bit name a built-in redirect
// callout by its CalloutID, so the two kinds never collide.
const GoRedirectHandleBit = 0x80000000

// KernelRedirectHandle is the record word of a Go callout's redirect
// handle (GoRedirectHandleBit set).
func KernelRedirectHandle(h engine.RedirectHandle) uint32 {
	return GoRedirectHandleBit | uint32(h)&^GoRedirectHandleBit
}

// EngineRedirectRecords turns a socket's kernel records into the engine's,
// for a Go callout's RedirectState: a Go callout's handle as itself, a
// built-in redirect's CalloutID as a handle no RedirectHandleCreate gives
// (bit 32 set), so a Go callout never takes a built-in redirect for its own.
func EngineRedirectRecords(words []uint32) *engine.RedirectRecords {
	if len(words) == 0 {
		return nil
	}
	recs := make([]engine.RedirectRecord, 0, len(words))
	for _, w := range words {
		if w&GoRedirectHandleBit != 0 {
			recs = append(recs, engine.RedirectRecord{Handle: engine.RedirectHandle(w &^ GoRedirectHandleBit)})
		} else {
			recs = append(recs, engine.RedirectRecord{Handle: engine.RedirectHandle(1<<32 | uint64(w)), Callout: engine.CalloutID(w)})
		}
	}
	return engine.NewRedirectRecords(recs...)
}

// CalloutRecords returns the redirect records the flow's socket carries
// (a proxy set them with setsockopt(SOL_FWP) before connect; the connect
// hook moved them by cookie when it handed the flow over at
// CONNECT_REDIRECT).
func (d *Datapath) CalloutRecords(cookie uint64) []uint32 {
	return d.redirects().Records(cookie)
}

// CalloutRedirect is a redirect a Go callout chose at run time for a TCP
// flow handed to user space: the proxy the flow's SYN is sent to instead
// (package nfqueue rewrites it with conntrack's DNAT) and what the proxy
// API answers on the proxy's accepted connection.
type CalloutRedirect struct {
	Proxy     netip.AddrPort
	Original  netip.AddrPort // the destination the program connected to
	Handle    uint32         // the record word (KernelRedirectHandle)
	TargetPID uint32         // who may query the redirect and set its records (0: root only)
	Context   []byte         // at most 128 bytes
	Filter    engine.FilterID
}

// SetCalloutRedirect records a run-time redirect of the flow f, before its
// SYN is let on towards the proxy: by socket cookie (the client's close
// drops it) and by the 4-tuple the proxy sees (client address and port,
// proxy address and port), as the built-in redirect does, so SOL_FWP's
// records, context and original destination, and SO_ORIGINAL_DST, answer
// on the proxy's accepted connection.
func (d *Datapath) SetCalloutRedirect(f CalloutFlow, r CalloutRedirect) error {
	if len(r.Context) > len(fwpRedirectState{}.Ctx) {
		return fmt.Errorf("%w: redirect context of %d bytes, at most %d", ErrCapacity, len(r.Context), len(fwpRedirectState{}.Ctx))
	}
	if f.raw.Indexed == 0 {
		return fmt.Errorf("%w: flow %d has no 4-tuple yet", ErrNoCalloutFlow, f.Cookie)
	}
	p, o := r.Proxy.Addr().Unmap(), r.Original.Addr().Unmap()
	st := fwpRedirectState{
		OrigPort: r.Original.Port(), ProxyPort: r.Proxy.Port(), Proto: f.Protocol,
		Handle: r.Handle, TargetPid: r.TargetPID, Pid: f.PID, Uid: f.UID, Gid: f.GID,
		Cookie: f.Cookie, FilterId: uint64(r.Filter), CgroupId: f.CgroupID, Comm: f.raw.Comm, CtxLen: uint32(len(r.Context)),
	}
	copy(st.OrigAddr[:], o.AsSlice())
	copy(st.ProxyAddr[:], p.AsSlice())
	if o.Is6() {
		st.OrigV6 = 1
	}
	if p.Is6() {
		st.ProxyV6 = 1
	}
	copy(st.Ctx[:], r.Context)
	k := fwpTupleKey{Client: f.raw.Key.Local, ClientPort: f.raw.Key.LocalPort, ProxyPort: r.Proxy.Port(), V6: st.ProxyV6}
	copy(k.Proxy[:], p.AsSlice())
	if k.V6 != f.raw.Key.V6 {
		return fmt.Errorf("%w: flow %s -> %s cannot reach proxy %s (another address family)", ErrInvalidRedirect, f.Local, f.Remote, r.Proxy)
	}
	if err := d.objs.FwpSockRedirect.Put(f.Cookie, &st); err != nil {
		return mapErr("run-time redirect", err)
	}
	if err := d.objs.FwpTupleRedirect.Put(&k, &st); err != nil {
		_ = d.objs.FwpSockRedirect.Delete(f.Cookie)
		return mapErr("run-time redirect", err)
	}
	d.runtimeRecords.Add(1)
	return nil
}

// CalloutRedirectProxy returns the proxy a run-time redirect recorded for
// the socket cookie (SetCalloutRedirect), while the socket is open.
func (d *Datapath) CalloutRedirectProxy(cookie uint64) (netip.AddrPort, bool) {
	var st fwpRedirectState
	if err := d.objs.FwpSockRedirect.Lookup(cookie, &st); err != nil {
		return netip.AddrPort{}, false
	}
	return st.export().Proxy, true
}

// AllowRedirectTarget lets the process pid set records naming the kernel
// redirect handle on its outbound sockets (setsockopt(SOL_FWP)), as a
// built-in redirect's target_pid may: a Go callout's RedirectTarget.
// TargetPID. RemoveRedirectTarget takes it back.
func (d *Datapath) AllowRedirectTarget(handle, pid uint32) error {
	if pid == 0 {
		return nil
	}
	if err := d.objs.FwpTargets.Put(fwpTargetKey{Handle: handle, Pid: pid}, uint8(1)); err != nil {
		return mapErr("redirect targets", err)
	}
	return nil
}

// RemoveRedirectTarget undoes AllowRedirectTarget.
func (d *Datapath) RemoveRedirectTarget(handle, pid uint32) error {
	err := d.objs.FwpTargets.Delete(fwpTargetKey{Handle: handle, Pid: pid})
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	return nil
}

// CalloutRedirects reports whether a Go callout decides at
// CONNECT_REDIRECT (v4 or v6): such a callout may redirect at run time,
// which needs package nfqueue's DNAT chain (and conntrack) in the served
// namespace.
func (p *Policy) CalloutRedirects() bool {
	return slices.ContainsFunc(p.layers[:2], func(l *layerPolicy) bool { return l != nil && l.callouts })
}

// VerdictRedirect is noted on a callout flow's record when a Go callout
// redirected it: a SYN sent again is let on towards the proxy the same way.
const VerdictRedirect = 3

// RedirectCounts returns how many redirects the maps hold by socket cookie
// and by 4-tuple, for leak checks.
func (d *Datapath) RedirectCounts() (sock, tuple int, err error) {
	count := func(m *ebpf.Map, k any) (int, error) {
		n := 0
		var v []byte
		it := m.Iterate()
		for it.Next(k, &v) {
			n++
		}
		return n, it.Err()
	}
	var c uint64
	if sock, err = count(d.objs.FwpSockRedirect, &c); err != nil {
		return 0, 0, err
	}
	var k fwpTupleKey
	tuple, err = count(d.objs.FwpTupleRedirect, &k)
	return sock, tuple, err
}
