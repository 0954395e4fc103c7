//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"fwp/engine"
)

// Mark bits of the kernel callout path (bpf/fwp.c FWP_MARK_*). The connect
// hook sets MarkQueueOpen or MarkQueueClosed on a socket whose flow a Go
// callout decides (by its filter's PERMIT_IF_CALLOUT_UNREGISTERED flag:
// whether the flow passes when no one reads the queue); the verdict of user
// space sets MarkPermit or MarkBlock on the held packet. Other bits of the
// socket's mark are kept.
const (
	MarkMask        = 0x0f000000
	MarkQueueOpen   = 0x01000000
	MarkQueueClosed = 0x02000000
	MarkPermit      = 0x04000000
	MarkBlock       = 0x08000000
)

// ErrNoCalloutFlow is returned for a 4-tuple the hooks did not hand to user
// space (or whose socket is gone).
var ErrNoCalloutFlow = errors.New("ebpf: no flow waiting for a callout")

// CalloutFlow is what the connect hook captured for a TCP flow whose
// classification reached a Go callout, in the hook, for the engine's
// classify in user space.
type CalloutFlow struct {
	Cookie     uint64          // the socket's cookie: the flow handle
	Layer      engine.LayerID  // where the kernel's walk met the callout
	Filter     engine.FilterID // the callout filter it stopped at
	Protocol   uint8
	Remote     netip.AddrPort // the destination classified (the proxy's when Redirected)
	Local      netip.AddrPort // the local address/port when bound at connect; zero parts were absent
	PID, TID   uint32         // process (tgid) and thread
	UID, GID   uint32
	CgroupID   uint64
	Comm       string
	Redirected bool // the kernel redirected it at CONNECT_REDIRECT before AUTH_CONNECT
	FailOpen   bool // the filter's PERMIT_IF_CALLOUT_UNREGISTERED
	// Verdict is what user space decided for the flow already (a SYN
	// sent again gets the same answer): 0 not yet, VerdictPermit or
	// VerdictBlock.
	Verdict uint8

	raw fwpCalloutFlow
}

// Verdicts noted on a callout flow's record.
const (
	VerdictPermit = 1
	VerdictBlock  = 2
)

func flowKeyOf(local, remote netip.AddrPort) fwpFlowKey {
	l, r := local.Addr().Unmap(), remote.Addr().Unmap()
	k := fwpFlowKey{LocalPort: local.Port(), RemotePort: remote.Port()}
	if l.Is6() {
		k.V6 = 1
	}
	copy(k.Local[:], l.AsSlice())
	copy(k.Remote[:], r.AsSlice())
	return k
}

func (f *fwpCalloutFlow) export() CalloutFlow {
	comm := make([]byte, 0, 16)
	for _, c := range f.Comm {
		if c == 0 {
			break
		}
		comm = append(comm, byte(c))
	}
	kind := engine.KindAuthConnect
	if f.Slot/2 == 0 {
		kind = engine.KindConnectRedirect
	}
	c := CalloutFlow{
		Cookie: f.Cookie, Layer: engine.LayerFor(kind, f.V6 != 0), Filter: engine.FilterID(f.FilterId), Protocol: f.Proto,
		Remote: netip.AddrPortFrom(addrOf(f.Raddr, f.V6), f.Rport),
		PID:    f.Tgid, TID: f.Pid, UID: f.Uid, GID: f.Gid, CgroupID: f.CgroupId, Comm: string(comm),
		Redirected: f.Redirected != 0, FailOpen: f.FailOpen != 0, Verdict: f.Verdict, raw: *f,
	}
	var la netip.Addr
	if f.HasLaddr != 0 {
		la = addrOf(f.Laddr, f.V6)
	} else if f.V6 != 0 {
		la = netip.IPv6Unspecified()
	} else {
		la = netip.IPv4Unspecified()
	}
	var lp uint16
	if f.HasLport != 0 {
		lp = f.Lport
	}
	c.Local = netip.AddrPortFrom(la, lp)
	return c
}

// CalloutFlow finds the flow waiting for a Go callout whose first packet
// goes from local to remote (as the queued packet carries them). It takes
// no lock: the queue readers call it per packet.
func (d *Datapath) CalloutFlow(local, remote netip.AddrPort) (CalloutFlow, error) {
	k := flowKeyOf(local, remote)
	var f fwpCalloutFlow
	if err := d.objs.FwpCalloutTuples.Lookup(&k, &f); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return CalloutFlow{}, fmt.Errorf("%w: %s -> %s", ErrNoCalloutFlow, local, remote)
		}
		return CalloutFlow{}, err
	}
	return f.export(), nil
}

// CalloutFlowDecided notes user space's verdict on the flow's record, so a
// SYN the program sends again is answered the same without a second
// classification; the record goes when the socket closes (sock_release).
func (d *Datapath) CalloutFlowDecided(f CalloutFlow, verdict uint8) error {
	raw := f.raw
	raw.Verdict = verdict
	if raw.Indexed == 0 {
		// A UDP flow: its record is by cookie only.
		if err := d.objs.FwpCalloutFlows.Update(&raw.Cookie, &raw, ebpf.UpdateExist); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
		return nil
	}
	k := raw.Key
	// Only if still this socket's: a record the socket's close removed
	// stays gone, and one a new socket on the same 4-tuple wrote since
	// (its SYN not yet classified) is not given this flow's verdict.
	// (The window left is the one between the two calls.)
	var cur fwpCalloutFlow
	if err := d.objs.FwpCalloutTuples.Lookup(&k, &cur); err != nil || cur.Cookie != raw.Cookie {
		return nil
	}
	if err := d.objs.FwpCalloutTuples.Update(&k, &raw, ebpf.UpdateExist); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	return nil
}

// CalloutFlowCounts returns how many flows wait in the callout maps (by
// cookie and by 4-tuple), for leak checks.
func (d *Datapath) CalloutFlowCounts() (flows, tuples int, err error) {
	count := func(m *ebpf.Map, k any) (int, error) {
		n := 0
		it := m.Iterate()
		var v []byte
		for it.Next(k, &v) {
			n++
		}
		return n, it.Err()
	}
	var c uint64
	if flows, err = count(d.objs.FwpCalloutFlows, &c); err != nil {
		return 0, 0, err
	}
	var k fwpFlowKey
	tuples, err = count(d.objs.FwpCalloutTuples, &k)
	return flows, tuples, err
}

// SetCalloutNamespace tells the hooks which network namespace (by its
// cookie, SO_NETNS_COOKIE) a callout path serves; 0 when none does. A flow
// handed to a Go callout in any other namespace, where nothing would read
// its queue, is decided by its filter's PERMIT_IF_CALLOUT_UNREGISTERED flag
// in the hook at once (a fail-closed filter's connect fails with EPERM).
func (d *Datapath) SetCalloutNamespace(cookie uint64) error {
	if err := d.objs.FwpCalloutCfg.Put(uint32(0), fwpCalloutCfg{Netns: cookie}); err != nil {
		return fmt.Errorf("callout namespace: %w", err)
	}
	return nil
}
