//go:build linux

package nfqueue

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"fwp/datapath/linux/ebpf"
)

// A redirect a Go callout chooses at run time (ALE_CONNECT_REDIRECT) is
// carried out on the held SYN: the connect hook could not wait for the
// callout, so the program's socket is already connecting to the original
// destination when user space decides. The verdict gives the SYN both
// verdict bits (Permit|Block: the permit rule lets it on) and, in the low
// bits of its mark, the index of the proxy in the family's "proxies" map
// (an element is added once per proxy, not per flow: a flow costs no
// netlink transaction). The DNAT chain below (nat, output, -100, after
// fwp's output chain at -150) looks the index up, puts the socket's own
// mark back on the SYN (routing after the translation sees the mark the
// program set) and rewrites the destination; conntrack carries the
// translation for every later packet both ways, in the kernel. A SYN with
// both bits whose index is not in the map (the map was reset under it) is
// dropped: never let through to the original destination unproxied; the
// SYN sent again is answered by the path anew. The program's socket stays
// connected to the original destination, so its getpeername is transparent
// for free; the proxy's SO_ORIGINAL_DST is conntrack's (and fwp's
// getsockopt hook answers from the redirect the path records by 4-tuple,
// with the SOL_FWP records and context).
//
// The chain makes the namespace's traffic go through conntrack, which
// costs every flow there a little: it is installed only when a Go callout
// decides at CONNECT_REDIRECT (Options.Redirects, Path.EnableRedirects).

const (
	proxiesMap    = "proxies"
	redirectChain = "redirect"
	// proxyIndexMask: the mark bits that carry a proxy's index from the
	// verdict to the DNAT chain (restored from the socket's mark there).
	// The map holds at most this many proxies; past it it starts afresh.
	proxyIndexMask = 0xffff
)

func proxiesSet(t *nftables.Table) *nftables.Set {
	addr := nftables.TypeIPAddr
	if t.Family == nftables.TableFamilyIPv6 {
		addr = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: t, Name: proxiesMap, IsMap: true,
		KeyType:  nftables.TypeMark,
		DataType: nftables.MustConcatSetType(addr, nftables.TypeInetService)}
}

// 32-bit registers (NFT_REG32_00 is 8): a concatenation loads each part
// into the next register, ports padded to 4 bytes.
const reg32 = 8

// addRedirectChain adds the family's proxies map and DNAT chain to table
// t (queued on c). The first rule: a TCP packet with both verdict bits
// whose mark's index is in the map gets the socket's mark back and is
// DNATed to the map's (address . port); the second drops one whose index
// is not.
func addRedirectChain(c *nftables.Conn, t *nftables.Table, m Marks) error {
	set := proxiesSet(t)
	if err := c.AddSet(set, nil); err != nil {
		return fmt.Errorf("nftables: proxies map: %w", err)
	}
	alen, nfproto := uint32(4), uint32(unix.NFPROTO_IPV4)
	if t.Family == nftables.TableFamilyIPv6 {
		alen, nfproto = 16, unix.NFPROTO_IPV6
	}
	both := m.Permit | m.Block
	areg := alen / 4
	redirected := []expr.Any{
		pktMark(),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le32(both), Xor: le32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: le32(both)},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
	// Register 4 (the 128-bit one): 1 overlaps the 32-bit registers from
	// reg32 on, which hold the looked-up address and port.
	restore := []expr.Any{
		&expr.Socket{Key: expr.SocketKeyMark, Register: 4},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 4},
	}
	exprs := append(append([]expr.Any{}, redirected...),
		pktMark(),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le32(proxyIndexMask), Xor: le32(0)},
		&expr.Lookup{SourceRegister: 1, DestRegister: reg32, IsDestRegSet: true, SetName: set.Name, SetID: set.ID})
	exprs = append(exprs, restore...)
	exprs = append(exprs, &expr.NAT{Type: expr.NATTypeDestNAT, Family: nfproto, RegAddrMin: reg32, RegProtoMin: reg32 + areg, Specified: true})
	ch := c.AddChain(&nftables.Chain{Name: redirectChain, Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: exprs})
	drop := append(append(append([]expr.Any{}, redirected...), restore...), &expr.Verdict{Kind: expr.VerdictDrop})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: drop})
	return nil
}

// proxyElem encodes a proxies map element: the index as the mark register
// holds it, the address as it is and the port big-endian padded to 4 bytes.
func proxyElem(idx uint32, to netip.AddrPort) nftables.SetElement {
	b := to.Addr().Unmap().AsSlice()
	return nftables.SetElement{Key: le32(idx), Val: append(b, byte(to.Port()>>8), byte(to.Port()), 0, 0)}
}

// Redirector is what the path needs of the datapath to carry out a
// run-time redirect (ebpf.Datapath implements it); a Flows without it
// refuses such redirects.
type Redirector interface {
	CalloutRecords(cookie uint64) []uint32
	SetCalloutRedirect(f ebpf.CalloutFlow, r ebpf.CalloutRedirect) error
	CalloutRedirectProxy(cookie uint64) (netip.AddrPort, bool)
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
	// proxies: each family's index of the proxies in its map; next: the
	// last index given.
	proxies [2]map[netip.AddrPort]uint32
	next    [2]uint32
}

// EnableRedirects installs the DNAT chain (and so conntrack) in the served
// namespace, if not yet: from now on a redirect a Go callout chooses at
// run time is carried out. New connections only: one whose SYN passed
// conntrack before has no entry to translate.
func (p *Path) EnableRedirects() error {
	if _, ok := p.flows.(Redirector); !ok {
		return fmt.Errorf("%w: the datapath cannot record run-time redirects", ErrNotSupported)
	}
	if p.mask&proxyIndexMask != 0 {
		return fmt.Errorf("%w: run-time redirects carry the proxy's index in mark bits %#x, which the path's marks %#x overlap", ErrNotSupported, proxyIndexMask, p.mask)
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

// carryRedirect records the flow's redirect for the proxy API and returns
// the proxy's index in the DNAT map; the SYN then goes with both verdict
// bits and the index.
func (p *Path) carryRedirect(fl *flow) (uint32, error) {
	rdr, ok := p.flows.(Redirector)
	r := fl.redirect
	if !ok || r == nil || r.Connect == nil {
		return 0, fmt.Errorf("%w: no redirect to carry out", ErrNotSupported)
	}
	to := r.Connect.RemoteAddressAndPort
	if to.Addr().Unmap().Is4() != fl.remote.Addr().Unmap().Is4() || !to.IsValid() || to.Port() == 0 {
		return 0, fmt.Errorf("%w: redirect of %s -> %s to %s (another address family, or no port)", ErrNotSupported, fl.local, fl.remote, to)
	}
	c := &p.rd
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.on {
		return 0, fmt.Errorf("%w: run-time redirects are not enabled in the served namespace", ErrNotSupported)
	}
	handle := ebpf.KernelRedirectHandle(r.Connect.LocalRedirectHandle)
	if err := rdr.SetCalloutRedirect(fl.f, ebpf.CalloutRedirect{Proxy: to, Original: fl.remote, Handle: handle,
		TargetPID: r.Connect.LocalRedirectTargetPID, Context: r.Connect.LocalRedirectContext, Filter: fl.redirectFilter}); err != nil {
		return 0, err
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
			return 0, err
		}
		if c.targets == nil {
			c.targets = map[[2]uint32]bool{}
		}
		c.targets[[2]uint32{handle, pid}] = true
	}
	return c.proxyIndex(to)
}

// maxProxies bounds each family's proxies map (a variable for tests).
var maxProxies = proxyIndexMask

// proxyIndex returns to's index in its family's proxies map, adding it
// (one netlink transaction per new proxy) if it is not there. A full map
// starts afresh; numbering goes on from where it was, so an index a SYN
// in flight carries is not given to another proxy meanwhile (that SYN
// finds no element, is dropped, and the SYN sent again is answered anew).
// c.mu is held.
func (c *redirects) proxyIndex(to netip.AddrPort) (uint32, error) {
	i := 0
	if to.Addr().Unmap().Is6() {
		i = 1
	}
	if idx, ok := c.proxies[i][to]; ok {
		return idx, nil
	}
	set := proxiesSet(c.tables[i])
	if len(c.proxies[i]) >= maxProxies {
		c.conn.FlushSet(set)
		c.proxies[i] = nil
	}
	c.next[i] = c.next[i]%uint32(proxyIndexMask) + 1 // 1..mask: 0 is no index
	idx := c.next[i]
	if err := c.conn.SetAddElements(set, []nftables.SetElement{proxyElem(idx, to)}); err != nil {
		return 0, err
	}
	if err := c.conn.Flush(); err != nil {
		return 0, fmt.Errorf("nftables: add proxy %s to the redirect map: %w", to, err)
	}
	if c.proxies[i] == nil {
		c.proxies[i] = map[netip.AddrPort]uint32{}
	}
	c.proxies[i][to] = idx
	return idx, nil
}

// redirectProxy is the index of the proxy a decided flow was redirected
// to (for its SYN sent again), 0 if the flow's redirect is gone.
func (p *Path) redirectProxy(cookie uint64) uint32 {
	rdr, ok := p.flows.(Redirector)
	if !ok {
		return 0
	}
	to, ok := rdr.CalloutRedirectProxy(cookie)
	if !ok {
		return 0
	}
	c := &p.rd
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.on {
		return 0
	}
	idx, err := c.proxyIndex(to)
	if err != nil {
		return 0
	}
	return idx
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

// redirectElements counts the proxies maps' elements (both families), for
// leak checks.
func (p *Path) redirectElements() (int, error) {
	c := &p.rd
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.on {
		return 0, nil
	}
	n := 0
	for _, t := range c.tables {
		els, err := c.conn.GetSetElements(proxiesSet(t))
		if err != nil {
			return 0, err
		}
		n += len(els)
	}
	return n, nil
}
