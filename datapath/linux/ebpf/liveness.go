//go:build linux

package ebpf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// The liveness sweep. Per-socket state lives in maps keyed by the socket's
// cookie (redirect records, records a proxy set, owners of inbound UDP
// sockets, flows handed to the callout path) and, in the engine, as flow
// contexts under the cookie as flow handle. sock_release ends the maps'
// entries and the flow's closure report ends its contexts. A report lost
// to a full ring (counted), or a release that did not run, leaves them
// behind: the LRU maps lose capacity (and evict live entries sooner),
// the engine's contexts stay until fwpd exits.
//
// SweepDead finds those cookies by asking the kernel which sockets exist:
// a socket iterator per network namespace writes the cookie of every full
// TCP socket (connecting, listening, established, closing) and every bound
// UDP socket. A cookie is dead when no namespace holds it at two
// consecutive sweeps: a socket between its connect hook and its hashing
// (microseconds) is missed by one walk, never by two. A TCP socket the
// program still holds after its connection failed (closed, unhashed) is
// dead to the sweep too: its connection has ended.
//
// Namespaces walked: those of every process (/proc/*/ns/net) and those
// kept by name (/run/netns). A socket whose namespace neither names — held
// only through a descriptor passed out of it — is not seen: its state
// would be swept while it lives. Nor is a socket never bound (records a
// proxy set on a socket it has not connected yet) or one whose connection
// failed while the program keeps it open: their state goes too, once two
// sweeps minutes apart (fwpd's --kernel-liveness-interval) have missed it.

// DeadSweep is the result of one SweepDead.
type DeadSweep struct {
	// Candidates is how many cookies were looked for; Namespaces how
	// many namespaces were walked.
	Candidates, Namespaces int
	// Records is how many sockets' map state was deleted (confirmed
	// dead); Flows the flow handles confirmed dead, for the engine's
	// FlowDeleted.
	Records int
	Flows   []uint64
}

// SweepDead sweeps the per-socket state of sockets that no longer exist.
// flows are the kernel flow handles (socket cookies) the caller holds
// contexts for; those confirmed dead come back in the result. It needs
// EnableReauthorization (the iterators are loaded with it).
func (d *Datapath) SweepDead(flows []uint64) (DeadSweep, error) {
	var res DeadSweep
	r, err := d.iterators()
	if err != nil {
		return res, err
	}
	// Candidates first, then the walk: a socket made after the listing
	// is no candidate; one listed and alive is in its namespace's hash.
	cand := map[uint64]uint8{}
	const fromMaps, fromFlows = 1, 2
	var k uint64
	for _, m := range []*ebpf.Map{d.objs.FwpSockRedirect, d.objs.FwpSockRecords, d.objs.FwpInUdpOwners, d.objs.FwpCalloutFlows} {
		v := make([]byte, m.ValueSize())
		it := m.Iterate()
		for it.Next(&k, v) {
			cand[k] |= fromMaps
		}
		if err := it.Err(); err != nil {
			return res, fmt.Errorf("liveness sweep: %s: %w", m, err)
		}
	}
	for _, c := range flows {
		cand[c] |= fromFlows
	}
	res.Candidates = len(cand)
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(cand) == 0 {
		r.dead = nil
		return res, nil
	}
	if err := r.attachLiveness(); err != nil {
		return res, err
	}
	nss, err := systemNamespaces()
	if err != nil {
		return res, err
	}
	defer func() {
		for _, f := range nss {
			f.Close()
		}
	}()
	res.Namespaces = len(nss)
	for _, ns := range nss {
		for _, it := range r.live {
			// A namespace that cannot be walked (gone since it was
			// opened is not possible: the file holds it) fails the
			// whole sweep: nothing is deleted on a partial view.
			if err := liveCookies(it, ns, func(c uint64) { delete(cand, c) }); err != nil {
				return res, err
			}
		}
	}
	// cand now holds the cookies no namespace has: dead if the last
	// sweep found them dead too.
	next := make(map[uint64]bool, len(cand))
	for c, from := range cand {
		if !r.dead[c] {
			next[c] = true
			continue
		}
		if from&fromMaps != 0 {
			d.forgetSocket(c)
			res.Records++
		}
		if from&fromFlows != 0 {
			res.Flows = append(res.Flows, c)
		}
	}
	r.dead = next
	d.swept.Add(uint64(res.Records))
	return res, nil
}

// forgetSocket deletes what sock_release would have for the socket cookie.
// A redirect's 4-tuple record is deleted only while it is still this
// socket's (a new flow may have taken the 4-tuple).
func (d *Datapath) forgetSocket(cookie uint64) {
	var tk fwpTupleKey
	if d.objs.FwpUdpKey.Lookup(cookie, &tk) == nil {
		var s fwpRedirectState
		if d.objs.FwpTupleRedirect.Lookup(tk, &s) == nil && s.Cookie == cookie {
			d.objs.FwpTupleRedirect.Delete(tk)
		}
		d.objs.FwpUdpKey.Delete(cookie)
	}
	if d.objs.FwpSockRedirect.Delete(cookie) == nil {
		d.sweptRedirects.Add(1)
	}
	d.objs.FwpSockRecords.Delete(cookie)
	d.objs.FwpInUdpOwners.Delete(cookie)
	var cf fwpCalloutFlow
	if d.objs.FwpCalloutFlows.Lookup(cookie, &cf) == nil {
		if cf.Indexed != 0 {
			var s fwpCalloutFlow
			if d.objs.FwpCalloutTuples.Lookup(cf.Key, &s) == nil && s.Cookie == cookie {
				d.objs.FwpCalloutTuples.Delete(cf.Key)
			}
		}
		d.objs.FwpCalloutFlows.Delete(cookie)
	}
}

// attachLiveness attaches the liveness iterators once; r.mu is held.
func (r *reauthObjs) attachLiveness() error {
	if r.live[0] != nil {
		return nil
	}
	for i, p := range []*ebpf.Program{r.objs.FwpLiveTcp, r.objs.FwpLiveUdp} {
		it, err := link.AttachIter(link.IterOptions{Program: p})
		if err != nil {
			if i == 1 {
				r.live[0].Close()
				r.live[0] = nil
			}
			return fmt.Errorf("%w: socket iterator: %v", ErrUnavailable, err)
		}
		r.live[i] = it
	}
	return nil
}

// liveCookies runs the iterator it in netns and calls fn per cookie.
func liveCookies(it *link.Iter, netns *os.File, fn func(uint64)) error {
	rc, err := openIter(it, netns)
	if err != nil {
		return fmt.Errorf("liveness sweep: socket iterator: %w", err)
	}
	defer rc.Close()
	br := bufio.NewReaderSize(rc, 64<<10)
	var b [8]byte
	for {
		if _, err := io.ReadFull(br, b[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("liveness sweep: reading the socket iterator: %w", err)
		}
		fn(binary.NativeEndian.Uint64(b[:]))
	}
}

// systemNamespaces opens every network namespace a process is in or
// /run/netns names, each once.
func systemNamespaces() ([]*os.File, error) {
	var ns namespaces
	ns.add("/proc/thread-self/ns/net")
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("liveness sweep: %w", err)
	}
	for _, e := range ents {
		if n := e.Name(); n[0] >= '0' && n[0] <= '9' {
			ns.add("/proc/" + n + "/ns/net")
		}
	}
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), ".") {
				ns.add(filepath.Join("/run/netns", e.Name()))
			}
		}
	}
	return ns.files, nil
}
