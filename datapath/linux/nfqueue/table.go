//go:build linux

package nfqueue

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"
)

// TableName is the name of fwp's nftables tables (one per family, ip and
// ip6, in the namespace of the traffic). Nothing else of the namespace's
// firewall is touched.
const TableName = "fwp"

// Marks are the mark bits the rules match and set (ebpf.Mark* in fwpd).
type Marks struct {
	QueueOpen   uint32 // socket: queue the flow's SYN, let it pass when no one reads the queue
	QueueClosed uint32 // socket: queue the flow's SYN, drop it when no one reads the queue
	Permit      uint32 // verdict: the flow may proceed
	Block       uint32 // verdict: refuse the flow (TCP reset: ECONNREFUSED at once)
}

func (m Marks) valid() error {
	bits := []uint32{m.QueueOpen, m.QueueClosed, m.Permit, m.Block}
	var all uint32
	for _, b := range bits {
		if b == 0 || all&b != 0 {
			return fmt.Errorf("nfqueue: marks must be four distinct nonzero bit sets, got %#x", bits)
		}
		all |= b
	}
	return nil
}

func le32(v uint32) []byte { return binaryutil.NativeEndian.PutUint32(v) }

// markHas loads the packet's mark and compares its bits m with nonzero.
func markHas(load expr.Any, m uint32) []expr.Any {
	return []expr.Any{
		load,
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: le32(m), Xor: le32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: le32(0)},
	}
}

func pktMark() expr.Any { return &expr.Meta{Key: expr.MetaKeyMARK, Register: 1} }

// nfqueueTarget is xtables' NFQUEUE target (revision 3: xt_NFQ_info_v3 —
// queue number, queue count, flags) through nft's compat expression: this
// kernel has no native nft queue statement.
func nfqueueTarget(base, total uint16, bypass bool) *expr.Target {
	const (
		flagBypass     = 0x01
		flagCPUFanout  = 0x02
		infoSizeAlined = 8 // XT_ALIGN(6)
	)
	info := make([]byte, infoSizeAlined)
	binary.NativeEndian.PutUint16(info[0:], base)
	binary.NativeEndian.PutUint16(info[2:], total)
	flags := uint16(flagCPUFanout)
	if bypass {
		flags |= flagBypass
	}
	binary.NativeEndian.PutUint16(info[4:], flags)
	u := xt.Unknown(info)
	return &expr.Target{Name: "NFQUEUE", Rev: 3, Info: &u}
}

// rules is the output chain, in order: a held packet given the permit
// mark passes; one given the block mark is refused (a TCP reset); a SYN
// (no ACK, RST or FIN) whose socket carries a queue mark goes to the
// queues, one per CPU (fanout by the sending CPU), bypassed when no one
// reads them only for fail-open filters. Nothing else of the flow matches:
// after the SYN the socket's packets pass, and a SYN sent again finds the
// verdict noted on the hook's record. No conntrack: a 4-tuple reused by a
// new socket while an old connection's entry lingers must come up again.
func rules(m Marks, base, total uint16) [][]expr.Any {
	var rs [][]expr.Any
	rs = append(rs, append(markHas(pktMark(), m.Permit), &expr.Verdict{Kind: expr.VerdictAccept}))
	tcp := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
	rs = append(rs, append(append(markHas(pktMark(), m.Block), tcp...), &expr.Reject{Type: unix.NFT_REJECT_TCP_RST}))
	rs = append(rs, append(markHas(pktMark(), m.Block), &expr.Verdict{Kind: expr.VerdictDrop}))
	// Both bypassed when no one reads (fwpd stopped or killed): the
	// fallback chain then decides by the filter's flag.
	for _, mark := range []uint32{m.QueueOpen, m.QueueClosed} {
		r := append(markHas(pktMark(), mark), synOnly()...)
		rs = append(rs, append(r, nfqueueTarget(base, total, true)))
	}
	return rs
}

const fin, syn, rst, ack = 0x01, 0x02, 0x04, 0x10

// synOnly matches a TCP packet with SYN set and ACK, RST and FIN clear.
func synOnly() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{fin | syn | rst | ack}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{syn}},
	}
}

// fallbackChain is the base chain right after fwp's output chain: a SYN
// that still carries a queue mark here was not taken by the queues — no
// reader (fwpd stopped or killed: the queue rules bypass) or a full queue
// (the queues fail open into this chain) — and is decided by its filter's
// flag at once, counted: fail-closed refused with a TCP reset (connect
// fails with ECONNREFUSED, no SYN timer), fail-open let on. A held SYN's
// verdict clears the queue bits, so nothing user space decided comes
// here. The counters are Path.Fallbacks.
const fallbackChain = "fallback"

func fallbackRules(m Marks, group uint16) [][]expr.Any {
	return [][]expr.Any{
		append(append(markHas(pktMark(), m.QueueClosed), synOnly()...), &expr.Counter{}, logTo(group), &expr.Reject{Type: unix.NFT_REJECT_TCP_RST}),
		append(append(markHas(pktMark(), m.QueueOpen), synOnly()...), &expr.Counter{}, logTo(group)),
	}
}

// logTo copies the packet to the NFLOG group (Options.OnFallback's net
// events; lost, never the packet, when no one reads).
func logTo(group uint16) *expr.Log {
	return &expr.Log{Key: 1 << unix.NFTA_LOG_GROUP, Group: group}
}

func conn(netns int) (*nftables.Conn, error) {
	if netns > 0 {
		return nftables.New(nftables.WithNetNSFd(netns))
	}
	return nftables.New()
}

var families = []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6}

// installTable replaces fwp's tables in the network namespace netns (an
// open /proc/.../ns/net; 0: the caller's) with the callout path's rules.
func installTable(netns int, m Marks, base, total uint16) error {
	c, err := conn(netns)
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	if err := deleteTables(c); err != nil {
		return err
	}
	for _, fam := range families {
		t := c.AddTable(&nftables.Table{Family: fam, Name: TableName})
		// Before NAT (-100): a SYN a Go callout redirects must still
		// meet the DNAT chain (redirect.go) after its verdict.
		ch := c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle})
		for _, r := range rules(m, base, total) {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r})
		}
		fb := c.AddChain(&nftables.Chain{Name: fallbackChain, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityRef(*nftables.ChainPriorityMangle + 1)})
		for _, r := range fallbackRules(m, base) {
			c.AddRule(&nftables.Rule{Table: t, Chain: fb, Exprs: r})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: install table %s: %w", TableName, err)
	}
	return nil
}

// deleteTables queues the deletion of fwp's tables that exist.
func deleteTables(c *nftables.Conn) error {
	ts, err := c.ListTables()
	if err != nil {
		return fmt.Errorf("nftables: list tables: %w", err)
	}
	for _, t := range ts {
		if t.Name == TableName && (t.Family == nftables.TableFamilyIPv4 || t.Family == nftables.TableFamilyIPv6) {
			c.DelTable(t)
		}
	}
	return nil
}

// removeTable deletes fwp's tables from the namespace.
func removeTable(netns int) error {
	c, err := conn(netns)
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	if err := deleteTables(c); err != nil {
		return err
	}
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("nftables: remove table %s: %w", TableName, err)
	}
	return nil
}

// tableRules counts the rules of fwp's tables in the namespace (-1 when
// there is no table), for tests and leak checks.
func tableRules(netns int) (int, error) {
	c, err := conn(netns)
	if err != nil {
		return 0, err
	}
	ts, err := c.ListTables()
	if err != nil {
		return 0, err
	}
	n := -1
	for _, t := range ts {
		if t.Name != TableName {
			continue
		}
		if n < 0 {
			n = 0
		}
		chains, err := c.ListChainsOfTableFamily(t.Family)
		if err != nil {
			return 0, err
		}
		for _, ch := range chains {
			if ch.Table.Name != TableName {
				continue
			}
			rs, err := c.GetRules(t, ch)
			if err != nil {
				return 0, err
			}
			n += len(rs)
		}
	}
	return n, nil
}

// fallbackCounts reads the fallback chain's counters of both families:
// SYNs decided by their filter's flag without user space.
func fallbackCounts(netns int) (open, closed uint64, err error) {
	c, err := conn(netns)
	if err != nil {
		return 0, 0, err
	}
	for _, fam := range families {
		t := &nftables.Table{Family: fam, Name: TableName}
		rs, err := c.GetRules(t, &nftables.Chain{Name: fallbackChain, Table: t})
		if err != nil {
			return 0, 0, err
		}
		if urs, err := c.GetRules(t, &nftables.Chain{Name: udpFallbackChain, Table: t}); err == nil {
			rs = append(rs, urs...) // same order: closed, then open
		}
		for i, r := range rs {
			for _, e := range r.Exprs {
				if ctr, ok := e.(*expr.Counter); ok {
					if i%2 == 0 {
						closed += ctr.Packets
					} else {
						open += ctr.Packets
					}
				}
			}
		}
	}
	return open, closed, nil
}
