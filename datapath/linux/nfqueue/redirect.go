//go:build linux

package nfqueue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"fwp/datapath/linux/ebpf"
)

// A redirect a Go callout chooses at run time (ALE_CONNECT_REDIRECT) is
// carried out on the held SYN: the connect hook could not wait for the
// callout, so the program's socket is already connecting to the original
// destination when user space decides. The verdict gives the SYN both
// verdict bits (Permit|Block: the permit rule lets it on) after user space
// put the flow's 4-tuple -> proxy in the family's "redirect" map; the
// DNAT chain below (nat, output, -100, after fwp's output chain at -150)
// looks the tuple up and rewrites the destination, and conntrack carries
// the translation for every later packet both ways, in the kernel. The
// program's socket stays connected to the original destination, so its
// getpeername is transparent for free; the proxy's SO_ORIGINAL_DST is
// conntrack's (and fwp's getsockopt hook answers from the redirect the
// path records by 4-tuple, with the SOL_FWP records and context).
//
// The chain makes the namespace's traffic go through conntrack, which
// costs every flow there a little: it is installed only when a Go callout
// decides at CONNECT_REDIRECT (Options.Redirects, Path.EnableRedirects).

const (
	redirectMap   = "redirect"
	redirectChain = "redirect"
	// redirectTTL bounds a map entry's life, and so the map's size (the
	// redirect rate times it): the entry is needed only until the SYN
	// met the DNAT chain, which it does while the verdict is sent; later
	// packets, and the SYN sent again should the SYN-ACK be lost, follow
	// the connection's conntrack entry.
	redirectTTL = 5 * time.Second
)

func redirectSet(t *nftables.Table) *nftables.Set {
	addr := nftables.TypeIPAddr
	if t.Family == nftables.TableFamilyIPv6 {
		addr = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: t, Name: redirectMap, IsMap: true, HasTimeout: true, Timeout: redirectTTL,
		KeyType:  nftables.MustConcatSetType(addr, nftables.TypeInetService, addr, nftables.TypeInetService, nftables.TypeInteger),
		DataType: nftables.MustConcatSetType(addr, nftables.TypeInetService)}
}

// 32-bit registers (NFT_REG32_00 is 8): a concatenation loads each part
// into the next register, ports padded to 4 bytes.
const reg32 = 8

// addRedirectChain adds the family's redirect map and DNAT chain to table
// t (queued on c). The rule: a packet with both verdict bits, TCP, whose
// (saddr . sport . daddr . dport . sequence number) is in the map, is
// DNATed to the map's (address . port). The SYN's sequence number (random
// per connection) keeps a new connection reusing a 4-tuple from meeting
// an older connection's element (an element added again while an expired
// one with the same key awaits the set's garbage collection would not be
// found).
func addRedirectChain(c *nftables.Conn, t *nftables.Table, m Marks) error {
	set := redirectSet(t)
	if err := c.AddSet(set, nil); err != nil {
		return fmt.Errorf("nftables: redirect map: %w", err)
	}
	alen, nfproto := uint32(4), uint32(unix.NFPROTO_IPV4)
	if t.Family == nftables.TableFamilyIPv6 {
		alen, nfproto = 16, unix.NFPROTO_IPV6
	}
	saddrOff, daddrOff := uint32(12), uint32(16)
	if alen == 16 {
		saddrOff, daddrOff = 8, 24
	}
	both := m.Permit | m.Block
	areg := alen / 4
	exprs := []expr.Any{
		pktMark(),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le32(both), Xor: le32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: le32(both)},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: reg32, Base: expr.PayloadBaseNetworkHeader, Offset: saddrOff, Len: alen},
		&expr.Payload{DestRegister: reg32 + areg, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
		&expr.Payload{DestRegister: reg32 + areg + 1, Base: expr.PayloadBaseNetworkHeader, Offset: daddrOff, Len: alen},
		&expr.Payload{DestRegister: reg32 + 2*areg + 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Payload{DestRegister: reg32 + 2*areg + 2, Base: expr.PayloadBaseTransportHeader, Offset: 4, Len: 4},
		&expr.Lookup{SourceRegister: reg32, DestRegister: reg32, IsDestRegSet: true, SetName: set.Name, SetID: set.ID},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: nfproto, RegAddrMin: reg32, RegProtoMin: reg32 + areg, Specified: true},
	}
	ch := c.AddChain(&nftables.Chain{Name: redirectChain, Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: exprs})
	return nil
}

// redirectKey and redirectVal encode a map element: addresses as they
// are, ports big-endian padded to 4 bytes.
func redirectKey(local, remote netip.AddrPort, seq uint32) []byte {
	var b []byte
	for _, ap := range []netip.AddrPort{local, remote} {
		b = append(b, ap.Addr().Unmap().AsSlice()...)
		b = append(b, byte(ap.Port()>>8), byte(ap.Port()), 0, 0)
	}
	return binary.BigEndian.AppendUint32(b, seq)
}

func redirectVal(to netip.AddrPort) []byte {
	b := to.Addr().Unmap().AsSlice()
	return append(b, byte(to.Port()>>8), byte(to.Port()), 0, 0)
}

// Redirector is what the path needs of the datapath to carry out a
// run-time redirect (ebpf.Datapath implements it); a Flows without it
// refuses such redirects.
type Redirector interface {
	CalloutRecords(cookie uint64) []uint32
	SetCalloutRedirect(f ebpf.CalloutFlow, r ebpf.CalloutRedirect) error
	AllowRedirectTarget(handle, pid uint32) error
	RemoveRedirectTarget(handle, pid uint32) error
}

// redirects is the path's DNAT state: the maps' connection and the
// redirect targets it allowed (removed on Close).
type redirects struct {
	mu      sync.Mutex
	on      bool
	conn    *nftables.Conn
	tables  [2]*nftables.Table
	targets map[[2]uint32]bool
}

// EnableRedirects installs the DNAT chain (and so conntrack) in the served
// namespace, if not yet: from now on a redirect a Go callout chooses at
// run time is carried out. New connections only: one whose SYN passed
// conntrack before has no entry to translate.
func (p *Path) EnableRedirects() error {
	if _, ok := p.flows.(Redirector); !ok {
		return fmt.Errorf("%w: the datapath cannot record run-time redirects", ErrNotSupported)
	}
	r := &p.rd
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.on {
		return nil
	}
	c, err := conn(p.opts.NetNS)
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	for i, fam := range families {
		t := &nftables.Table{Family: fam, Name: TableName}
		if err := addRedirectChain(c, t, p.opts.Marks); err != nil {
			return err
		}
		r.tables[i] = t
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: install the redirect chain: %w", err)
	}
	r.conn, r.on = c, true
	return nil
}

// RedirectsEnabled reports whether run-time redirects are carried out.
func (p *Path) RedirectsEnabled() bool {
	p.rd.mu.Lock()
	defer p.rd.mu.Unlock()
	return p.rd.on
}

// ErrNotSupported: a run-time redirect this path cannot carry out.
var ErrNotSupported = errors.New("nfqueue: not supported")

// carryRedirect records the flow's redirect for the proxy API and puts its
// 4-tuple in the DNAT map; the SYN then goes with both verdict bits.
func (p *Path) carryRedirect(fl *flow) error {
	rdr, ok := p.flows.(Redirector)
	r := fl.redirect
	if !ok || r == nil || r.Connect == nil {
		return fmt.Errorf("%w: no redirect to carry out", ErrNotSupported)
	}
	to := r.Connect.RemoteAddressAndPort
	if to.Addr().Unmap().Is4() != fl.remote.Addr().Unmap().Is4() || !to.IsValid() || to.Port() == 0 {
		return fmt.Errorf("%w: redirect of %s -> %s to %s (another address family, or no port)", ErrNotSupported, fl.local, fl.remote, to)
	}
	c := &p.rd
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.on {
		return fmt.Errorf("%w: run-time redirects are not enabled in the served namespace", ErrNotSupported)
	}
	handle := ebpf.KernelRedirectHandle(r.Connect.LocalRedirectHandle)
	if err := rdr.SetCalloutRedirect(fl.f, ebpf.CalloutRedirect{Proxy: to, Original: fl.remote, Handle: handle,
		TargetPID: r.Connect.LocalRedirectTargetPID, Context: r.Connect.LocalRedirectContext, Filter: fl.redirectFilter}); err != nil {
		return err
	}
	if pid := r.Connect.LocalRedirectTargetPID; pid != 0 && !c.targets[[2]uint32{handle, pid}] {
		if len(c.targets) >= 4096 {
			// Bounded: the oldest permissions go (a proxy of theirs
			// loses setsockopt(SOL_FWP) as non-root until its next
			// redirect).
			for k := range c.targets {
				_ = rdr.RemoveRedirectTarget(k[0], k[1])
				delete(c.targets, k)
			}
		}
		if err := rdr.AllowRedirectTarget(handle, pid); err != nil {
			return err
		}
		if c.targets == nil {
			c.targets = map[[2]uint32]bool{}
		}
		c.targets[[2]uint32{handle, pid}] = true
	}
	i := 0
	if fl.local.Addr().Unmap().Is6() {
		i = 1
	}
	set := redirectSet(c.tables[i])
	el := []nftables.SetElement{{Key: redirectKey(fl.local, fl.remote, fl.seq), Val: redirectVal(to)}}
	if err := c.conn.SetAddElements(set, el); err != nil {
		return err
	}
	if err := c.conn.Flush(); err != nil {
		// The tuple is there with another proxy (a 4-tuple reused within
		// redirectTTL): replace it.
		if err := c.conn.SetDeleteElements(set, el); err != nil {
			return err
		}
		if err := c.conn.SetAddElements(set, el); err != nil {
			return err
		}
		if err := c.conn.Flush(); err != nil {
			return fmt.Errorf("nftables: redirect %s -> %s to %s: %w", fl.local, fl.remote, to, err)
		}
	}
	return nil
}

// closeRedirects takes back the redirect targets the path allowed.
func (p *Path) closeRedirects() {
	c := &p.rd
	c.mu.Lock()
	defer c.mu.Unlock()
	if rdr, ok := p.flows.(Redirector); ok {
		for k := range c.targets {
			_ = rdr.RemoveRedirectTarget(k[0], k[1])
		}
	}
	c.targets = nil
	c.on = false
}

// redirectElements counts the redirect maps' elements (both families),
// for leak checks.
func (p *Path) redirectElements() (int, error) {
	c := &p.rd
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.on {
		return 0, nil
	}
	n := 0
	for _, t := range c.tables {
		els, err := c.conn.GetSetElements(redirectSet(t))
		if err != nil {
			return 0, err
		}
		n += len(els)
	}
	return n, nil
}
