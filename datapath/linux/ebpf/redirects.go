//go:build linux

package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/cilium/ebpf"

	"fwp/internal/unix"
	"fwp/proxy"
)

// Redirects is the per-connection redirect state a proxy reads and writes:
// the maps of a Datapath in this process, or those a datapath in another
// process (fwpd) pinned, opened with OpenRedirects.
type Redirects struct {
	tuple, sock, records *ebpf.Map
	owned                bool
}

func (d *Datapath) redirects() *Redirects {
	return &Redirects{tuple: d.objs.FwpTupleRedirect, sock: d.objs.FwpSockRedirect, records: d.objs.FwpSockRecords}
}

// OpenRedirects opens the redirect maps a datapath pinned in pinDir (its
// Options.PinDir; fwpd's --bpffs-dir). It needs the rights to open the pins
// (root), as reading the maps shows every redirected connection's context.
func OpenRedirects(pinDir string) (*Redirects, error) {
	r := &Redirects{owned: true}
	for _, x := range []struct {
		m    **ebpf.Map
		name string
	}{{&r.tuple, "fwp_tuple_redirect"}, {&r.sock, "fwp_sock_redirect"}, {&r.records, "fwp_sock_records"}} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, x.name), nil)
		if err != nil {
			r.Close()
			return nil, fmt.Errorf("%w: open the datapath's redirect maps in %s: %v", ErrUnavailable, pinDir, err)
		}
		*x.m = m
	}
	return r, nil
}

// Close releases maps OpenRedirects opened.
func (r *Redirects) Close() error {
	if !r.owned {
		return nil
	}
	var errs []error
	for _, m := range []*ebpf.Map{r.tuple, r.sock, r.records} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	return errors.Join(errs...)
}

// SetRedirectRecords marks a socket (by its SO_COOKIE) as carrying records
// of the given redirect handles; see Datapath.SetRedirectRecords.
func (r *Redirects) SetRedirectRecords(cookie uint64, handles ...uint32) error {
	if len(handles) > maxRecords {
		return fmt.Errorf("%w: %d redirect records, at most %d", ErrCapacity, len(handles), maxRecords)
	}
	rec := fwpRecords{N: uint32(len(handles))}
	copy(rec.Handles[:], handles)
	return r.records.Put(cookie, rec)
}

// Records returns the redirect handles a socket was marked with.
func (r *Redirects) Records(cookie uint64) []uint32 {
	var rec fwpRecords
	if r.records.Lookup(cookie, &rec) != nil {
		return nil
	}
	return slices.Clone(rec.Handles[:min(int(rec.N), maxRecords)])
}

// QueryRedirect finds the redirect of a TCP connection a proxy accepted, or
// of a UDP flow it receives: local is the proxy's address (the accepted
// socket's local address, or the address the datagram came to), remote the
// client's (the peer, or the datagram's source). Without a record the error
// wraps ErrNoRedirect.
//
// A local address that is a wildcard (a UDP proxy bound to 0.0.0.0 or ::)
// does not say which address the datagram came to, and the index is by
// the redirect's proxy address: the UDP records of remote to any address
// on local's port are looked up by a walk of the index (linear in its
// size), and when two disagree the answer is ErrNoRedirect, not a guess.
func (r *Redirects) QueryRedirect(local, remote netip.AddrPort) (RedirectState, error) {
	if local.Addr().IsUnspecified() {
		return r.queryWildcard(local.Port(), remote)
	}
	var k fwpTupleKey
	c, p := remote.Addr().Unmap(), local.Addr().Unmap()
	if c.Is6() != p.Is6() {
		return RedirectState{}, fmt.Errorf("%w: %s -> %s mixes address families", ErrNoRedirect, remote, local)
	}
	if c.Is6() {
		k.V6 = 1
	}
	copy(k.Client[:], c.AsSlice())
	copy(k.Proxy[:], p.AsSlice())
	k.ClientPort, k.ProxyPort = remote.Port(), local.Port()
	var s fwpRedirectState
	if err := r.tuple.Lookup(k, &s); err != nil || r.expired(k, &s) {
		// A UDP client on a wildcard address is indexed with a zero
		// client address (the kernel picks the source per datagram).
		k.Client = [16]byte{}
		if err := r.tuple.Lookup(k, &s); err != nil || s.Proto != syscall.IPPROTO_UDP || r.expired(k, &s) {
			return RedirectState{}, fmt.Errorf("%w: %s -> %s", ErrNoRedirect, remote, local)
		}
	}
	return s.export(), nil
}

// ReleasedGrace is how long a UDP client's 4-tuple record outlives its
// socket: datagrams it sent may still wait in the proxy's queue. After it
// the record is gone, so that a later sender on the same address and port
// is not taken for the redirected one. It also bounds the UDP flow rate
// the index holds: released records stay until swept (fwpd sweeps every
// ReleasedGrace/2), and past 65,536 records the kernel's LRU evicts, live
// ones too — about 65,536 / (1.5 × ReleasedGrace) new flows a second.
var ReleasedGrace uint32 = 10 // seconds

// expired reports whether s, found under k, is the record of a UDP socket
// closed more than ReleasedGrace ago, and then deletes it.
func (r *Redirects) expired(k fwpTupleKey, s *fwpRedirectState) bool {
	if !isExpired(s) {
		return false
	}
	r.deleteIfExpired(k, s.Cookie)
	return true
}

// deleteIfExpired deletes the record under k if it is still the expired
// one of the socket cookie: a new flow on the same 4-tuple may have
// written its own since it was read (a client port reused), which must
// stay. (The window left is the one between this lookup and the delete.)
func (r *Redirects) deleteIfExpired(k fwpTupleKey, cookie uint64) bool {
	var s fwpRedirectState
	if r.tuple.Lookup(k, &s) != nil || s.Cookie != cookie || !isExpired(&s) {
		return false
	}
	return r.tuple.Delete(k) == nil
}

// SweepReleased deletes the 4-tuple records of UDP sockets closed more
// than ReleasedGrace ago (queries skip them anyway; this frees the index
// of those nobody asks about) and returns how many.
func (r *Redirects) SweepReleased() (int, error) {
	_, n, err := r.sweep(nil, time.Time{}, 0, false)
	return n, err
}

func isExpired(s *fwpRedirectState) bool {
	if s.Released == 0 {
		return false
	}
	now, err := unix.MonotonicSeconds()
	return err == nil && expiredAt(s.Released, now, ReleasedGrace)
}

// expiredAt reports whether a record the kernel stamped released (seconds
// of CLOCK_MONOTONIC, 0 for an open socket) is past grace at now. Kernel
// times are small after a boot: the difference is taken in int64, never
// as uint32 (where a stamp a second ahead of now, as the kernel's rounding
// can give, would wrap to 136 years ago).
func expiredAt(released, now, grace uint32) bool {
	return released != 0 && int64(now)-int64(released) >= int64(grace)
}

// queryWildcard finds the UDP redirect of datagrams from remote to any
// proxy address on port: an exact client match first, then a client
// indexed with a zero address (an unconnected sender on a wildcard).
func (r *Redirects) queryWildcard(port uint16, remote netip.AddrPort) (RedirectState, error) {
	c := remote.Addr().Unmap()
	client := c.AsSlice()
	var k fwpTupleKey
	var s fwpRedirectState
	var found [2]*fwpRedirectState // exact client, zero client
	var ambiguous [2]bool
	it := r.tuple.Iterate()
	type staleKey struct {
		k      fwpTupleKey
		cookie uint64
	}
	var stale []staleKey // deleted after the walk, which a delete could restart
	defer func() {
		for _, st := range stale {
			r.deleteIfExpired(st.k, st.cookie)
		}
	}()
	for it.Next(&k, &s) {
		if k.ProxyPort != port || k.ClientPort != remote.Port() || (k.V6 == 1) != c.Is6() || s.Proto != syscall.IPPROTO_UDP {
			continue
		}
		if isExpired(&s) {
			stale = append(stale, staleKey{k, s.Cookie})
			continue
		}
		j := 1
		if string(k.Client[:len(client)]) == string(client) {
			j = 0
		} else if k.Client != ([16]byte{}) {
			continue
		}
		if found[j] != nil && *found[j] != s {
			ambiguous[j] = true
		}
		st := s
		found[j] = &st
	}
	if err := it.Err(); err != nil {
		return RedirectState{}, fmt.Errorf("%w: %s -> *:%d: walking the redirect index: %v", ErrNoRedirect, remote, port, err)
	}
	for j, st := range found {
		if st == nil {
			continue
		}
		if ambiguous[j] {
			return RedirectState{}, fmt.Errorf("%w: %s -> *:%d: redirected to several addresses on the port; bind the proxy to one", ErrNoRedirect, remote, port)
		}
		return st.export(), nil
	}
	return RedirectState{}, fmt.Errorf("%w: %s -> *:%d", ErrNoRedirect, remote, port)
}

// RedirectByCookie returns the redirect recorded for a client socket.
func (r *Redirects) RedirectByCookie(cookie uint64) (RedirectState, error) {
	var s fwpRedirectState
	if err := r.sock.Lookup(cookie, &s); err != nil {
		return RedirectState{}, fmt.Errorf("%w: socket cookie %d", ErrNoRedirect, cookie)
	}
	return s.export(), nil
}

// recordsMagic starts the kernel datapath's redirect records, so that
// records of another datapath are told apart.
var recordsMagic = []byte("fwpk")

// EncodeRecords is the opaque form of a chain of redirect handles that
// proxy.QueryRedirectRecords returns and proxy.SetRedirectRecords takes.
func EncodeRecords(handles []uint32) []byte {
	b := slices.Clone(recordsMagic)
	for _, h := range handles {
		b = binary.LittleEndian.AppendUint32(b, h)
	}
	return b
}

// DecodeRecords reverses EncodeRecords; other bytes give an error wrapping
// ErrInvalidRedirect.
func DecodeRecords(b []byte) ([]uint32, error) {
	if len(b) < len(recordsMagic) || string(b[:len(recordsMagic)]) != string(recordsMagic) || (len(b)-len(recordsMagic))%4 != 0 {
		return nil, fmt.Errorf("%w: not kernel redirect records", ErrInvalidRedirect)
	}
	b = b[len(recordsMagic):]
	if len(b)/4 > maxRecords {
		return nil, fmt.Errorf("%w: %d redirect records, at most %d", ErrInvalidRedirect, len(b)/4, maxRecords)
	}
	hs := make([]uint32, 0, len(b)/4)
	for ; len(b) > 0; b = b[4:] {
		hs = append(hs, binary.LittleEndian.Uint32(b))
	}
	return hs, nil
}

// ProxyBackend answers the proxy package's functions for plain sockets of
// the kernel datapath (register it with proxy.Register):
//
//   - QueryRedirectRecords of an accepted TCP connection (or a UDP socket
//     connected to the client; QueryTuple for a datagram's source): found
//     by its 4-tuple; the records are the chain of redirect handles the client
//     socket carried (a proxy's outbound connection) plus this redirect's;
//   - QueryRedirectContext: the filter's context bytes or, when it set
//     none, the original destination in text form ("10.0.0.1:80"); the
//     proxy package gives it only to the redirect's target pid;
//   - QueryDatagramRedirectRecords / QueryDatagramRedirectContext on a UDP
//     proxy's unconnected socket: found by the socket's local address and
//     the datagram's source (a wildcard-bound socket: by its port, see
//     Redirects.QueryRedirect);
//   - SetRedirectRecords on a *net.Dialer: the records are put on the
//     socket by its SO_COOKIE in the dialer's Control hook, before connect.
type ProxyBackend struct{ R *Redirects }

// QueryAccepted implements proxy.Backend.
func (b ProxyBackend) QueryAccepted(conn net.Conn) (proxy.Redirect, error) {
	local, remote, ok := proxy.ConnTuple(conn)
	if !ok {
		return proxy.Redirect{}, fmt.Errorf("%w: not a TCP or UDP connection", proxy.ErrNotFound)
	}
	r, _, err := b.QueryTuple(local, remote)
	return r, err
}

// QueryDatagram implements proxy.DatagramBackend: the redirect of the
// datagrams from that pc, a UDP socket, receives.
func (b ProxyBackend) QueryDatagram(pc net.PacketConn, from netip.AddrPort) (proxy.Redirect, error) {
	local, ok := pc.LocalAddr().(*net.UDPAddr)
	if !ok || local == nil {
		return proxy.Redirect{}, fmt.Errorf("%w: %T is not a UDP socket", proxy.ErrNotFound, pc)
	}
	r, _, err := b.QueryTuple(local.AddrPort(), from)
	return r, err
}

// QueryTuple is QueryAccepted by the accepted socket's local and remote
// addresses, with the original destination: what fwpd answers for a proxy
// that cannot open the maps itself.
func (b ProxyBackend) QueryTuple(local, remote netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	st, err := b.R.QueryRedirect(local, remote)
	if err != nil {
		return proxy.Redirect{}, netip.AddrPort{}, fmt.Errorf("%w: %w", proxy.ErrNotFound, err)
	}
	ctx := st.Context
	if len(ctx) == 0 {
		ctx = []byte(st.Original.String())
	}
	chain := append(b.R.Records(st.Cookie), st.Handle)
	if len(chain) > maxRecords {
		chain = chain[len(chain)-maxRecords:]
	}
	return proxy.Redirect{Records: EncodeRecords(chain), Context: ctx, TargetPID: st.TargetPID}, st.Original, nil
}

// SetRecords implements proxy.Backend.
func (b ProxyBackend) SetRecords(network, address string, c syscall.RawConn, records []byte) error {
	hs, err := DecodeRecords(records)
	if err != nil {
		return fmt.Errorf("%w: %w", proxy.ErrNotSupported, err)
	}
	var cookie uint64
	var cerr error
	if err := c.Control(func(fd uintptr) { cookie, cerr = unix.SocketCookie(int(fd)) }); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	return b.R.SetRedirectRecords(cookie, hs...)
}

// QueryProxyRedirect is ProxyBackend.QueryTuple on this datapath's maps,
// for fwpd answering proxies that cannot open the maps themselves.
func (d *Datapath) QueryProxyRedirect(local, remote netip.AddrPort) (proxy.Redirect, netip.AddrPort, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return proxy.Redirect{}, netip.AddrPort{}, ErrClosed
	}
	return ProxyBackend{R: d.redirects()}.QueryTuple(local, remote)
}

// SweepReleased is Redirects.SweepReleased on this datapath's maps, and
// also sweeps the TCP records no proxy socket will end (see
// UnacceptedGrace); fwpd runs it every ReleasedGrace/2.
func (d *Datapath) SweepReleased() (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, ErrClosed
	}
	var n int
	var err error
	d.unaccepted, n, err = d.redirects().sweep(d.unaccepted, time.Now(), UnacceptedGrace, true)
	return n, err
}

// RedirectRecordCounts are the redirect records by socket made since Load
// (by the connect hook for built-in redirects, by SetCalloutRedirect for
// run-time ones) and those sock_release ended. Made less Released is the
// open redirected sockets' records, plus any a release never ended.
type RedirectRecordCounts struct {
	Made, Released uint64
	// Swept are the records SweepDead deleted: their sockets were gone
	// and no release had ended them.
	Swept uint64
}

// RedirectRecordCounts reads the counts.
func (d *Datapath) RedirectRecordCounts() (RedirectRecordCounts, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return RedirectRecordCounts{}, ErrClosed
	}
	var c RedirectRecordCounts
	if err := d.objs.FwpRecMade.Get(&c.Made); err != nil {
		return c, fmt.Errorf("read redirect record counts: %w", err)
	}
	if err := d.objs.FwpRecReleased.Get(&c.Released); err != nil {
		return c, fmt.Errorf("read redirect record counts: %w", err)
	}
	c.Made += d.runtimeRecords.Load()
	c.Swept = d.sweptRedirects.Load()
	return c, nil
}

// UnacceptedGrace is how long a TCP redirect's 4-tuple record outlives its
// client's socket when no proxy socket was seen established for it: the
// proxy's accepted socket ends the record when it closes, but a connection
// whose handshake never completed at the proxy (the client's reset overtook
// its ACK, a SYN-ACK was lost) has no such socket, and a proxy in a cgroup
// with neither the hooks nor the proxy hooks has no sockops program to
// report one. Such records would
// stay until the LRU evicted them — live ones too once the map is full. The
// grace leaves a proxy that accepts late the time to query.
var UnacceptedGrace = 30 * time.Second

type unacceptedSeen struct {
	cookie uint64
	since  time.Time
}

// sweep walks the 4-tuple index once. It deletes the UDP records released
// more than ReleasedGrace ago and, with unaccepted, the TCP records never
// accepted whose client socket has closed (its record by cookie is gone),
// once they have been so for grace: prev holds those seen at earlier
// sweeps; the result is the set for the next sweep.
func (r *Redirects) sweep(prev map[fwpTupleKey]unacceptedSeen, now time.Time, grace time.Duration, unaccepted bool) (map[fwpTupleKey]unacceptedSeen, int, error) {
	var next map[fwpTupleKey]unacceptedSeen
	if unaccepted {
		next = make(map[fwpTupleKey]unacceptedSeen, len(prev))
	}
	type staleKey struct {
		k      fwpTupleKey
		cookie uint64
		tcp    bool
	}
	var stale []staleKey // deleted after the walk, which a delete could restart
	var k fwpTupleKey
	var s, c fwpRedirectState
	// The clock once for the walk, not a system call per released record.
	clock, cerr := unix.MonotonicSeconds()
	it := r.tuple.Iterate()
	for it.Next(&k, &s) {
		if cerr == nil && expiredAt(s.Released, clock, ReleasedGrace) {
			stale = append(stale, staleKey{k, s.Cookie, false})
			continue
		}
		if !unaccepted || s.Proto != syscall.IPPROTO_TCP || s.Accepted != 0 {
			continue
		}
		if err := r.sock.Lookup(s.Cookie, &c); err == nil {
			continue // the client is still open
		}
		seen, ok := prev[k]
		if !ok || seen.cookie != s.Cookie {
			seen = unacceptedSeen{cookie: s.Cookie, since: now}
		}
		if now.Sub(seen.since) >= grace {
			stale = append(stale, staleKey{k, s.Cookie, true})
			continue
		}
		next[k] = seen
	}
	if err := it.Err(); err != nil {
		return prev, 0, err
	}
	n := 0
	for _, st := range stale {
		// Read again: a new flow reusing the 4-tuple since the walk
		// wrote a fresh record under the key (TestE2EKernelSoak lost one
		// DNS flow in 100,000 so). The window left is the one between
		// this lookup and the delete, microseconds, for a reuse.
		if !st.tcp {
			if r.deleteIfExpired(st.k, st.cookie) {
				n++
			}
			continue
		}
		if r.tuple.Lookup(st.k, &s) != nil || s.Cookie != st.cookie || s.Accepted != 0 {
			continue
		}
		if r.tuple.Delete(st.k) == nil {
			n++
		}
	}
	return next, n, nil
}

// IsRedirectTarget reports whether pid is the target process of a redirect
// by handle in the active policy: the process fwpd lets put records naming
// that redirect on its outbound sockets.
func (d *Datapath) IsRedirectTarget(handle, pid uint32) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return pid != 0 && slices.Contains(d.targets[handle], pid)
}
