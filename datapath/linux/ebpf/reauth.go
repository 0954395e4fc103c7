//go:build linux

package ebpf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"fwp/engine"
	fwpunix "fwp/internal/unix"
)

// LiveFlow is a connected socket of the hooked cgroups that the connect
// hook let connect: what AUTH_CONNECT classified then, and the socket now.
// Reauthorization classifies it again from these values.
type LiveFlow struct {
	Cookie   uint64         // the socket's cookie: the flow handle
	Layer    engine.LayerID // ALE_AUTH_CONNECT_V4 or _V6, as classified
	Protocol uint8
	// Remote and Local are the tuple AUTH_CONNECT classified: the proxy
	// when the kernel redirected the flow, a local address or port only
	// when the socket was bound at connect (zero parts were absent).
	Remote, Local netip.AddrPort
	// SocketLocal and SocketRemote are the socket's addresses now.
	SocketLocal, SocketRemote netip.AddrPort
	PID                       uint32 // the connecting process (tgid)
	UID, GID                  uint32
	CgroupID                  uint64      // the connecting task's cgroup
	App                       AppIdentity // its executable; zero for none
	Comm                      string
	Redirected                bool // the kernel's built-in redirect ran before AUTH_CONNECT
	// Inbound: an accepted TCP connection (Layer is ALE_AUTH_RECV_ACCEPT;
	// Remote is the client, Local the socket's address, the owner ids
	// the listener's).
	Inbound bool
	// CloseWait: the peer has closed its side (TCP CLOSE_WAIT).
	CloseWait bool
}

// reauthFlowSize is sizeof(struct reauth_flow).
const reauthFlowSize = 192

// The iterator's records are read straight into fwpreauthReauthFlow.
var _ [reauthFlowSize - unsafe.Sizeof(fwpreauthReauthFlow{})]byte
var _ [unsafe.Sizeof(fwpreauthReauthFlow{}) - reauthFlowSize]byte

// reauthObjs are the socket iterators (bpf/reauth.c), loaded by
// EnableReauthorization.
type reauthObjs struct {
	objs    fwpreauthObjects
	iters   [4]*link.Iter // dump tcp, destroy tcp, dump udp, destroy udp
	mu      sync.Mutex    // one pass at a time: fwp_reauth_kill is shared
	cgroups map[uint64]bool
	// flowEvents: the flow event programs are attached with the hooks
	// (EnableFlowEvents).
	flowEvents bool
	// live are the liveness iterators (tcp, udp), attached at the first
	// SweepDead; dead the cookies the last sweep found in no namespace.
	live [2]*link.Iter
	dead map[uint64]bool
}

func (r *reauthObjs) close() error {
	if r == nil {
		return nil
	}
	var errs []error
	for _, it := range append(r.iters[:], r.live[:]...) {
		if it != nil {
			errs = append(errs, it.Close())
		}
	}
	return errors.Join(append(errs, r.objs.Close())...)
}

// EnableReauthorization loads the socket iterators that reauthorize live
// flows and turns on the connect hook's per-socket notes (sockets
// connected before have none, and are never reauthorized). It needs a
// kernel with bpf_sock_destroy (6.5); without it the error wraps
// ErrUnavailable. Calling it again does nothing.
func (d *Datapath) EnableReauthorization() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	return d.loadLive()
}

// loadLive loads bpf/reauth.c's programs (once) and turns the notes on;
// d.mu is held.
func (d *Datapath) loadLive() error {
	if d.reauth != nil {
		return nil
	}
	spec, err := loadFwpreauth()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	r := &reauthObjs{cgroups: map[uint64]bool{}}
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{"fwp_sk_flow": d.objs.FwpSkFlow, "fwp_in_listeners": d.objs.FwpInListeners, "fwp_in_listen_idx": d.objs.FwpInListenIdx}}
	if err := spec.LoadAndAssign(&r.objs, opts); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("%w: reauthorization needs socket iterators with bpf_sock_destroy (Linux 6.5): %v", ErrUnavailable, ve)
		}
		return fmt.Errorf("%w: reauthorization needs socket iterators with bpf_sock_destroy (Linux 6.5): %v", ErrUnavailable, err)
	}
	for i, p := range []*ebpf.Program{r.objs.FwpReauthTcp, r.objs.FwpDestroyTcp, r.objs.FwpReauthUdp, r.objs.FwpDestroyUdp} {
		it, err := link.AttachIter(link.IterOptions{Program: p})
		if err != nil {
			r.close()
			return fmt.Errorf("%w: socket iterator: %v", ErrUnavailable, err)
		}
		r.iters[i] = it
	}
	// The flow sockops program goes beside the hooks from now on: it
	// notes listeners and accepted sockets for the pass; it reports, and
	// the sock_release program joins it, from EnableFlowEvents.
	added := map[string][]link.Link{}
	for path := range d.links {
		ls, err := r.attachFlowHooks(path, r.liveProgs())
		if err != nil {
			for _, ls := range added {
				for _, l := range ls {
					l.Close()
				}
			}
			r.close()
			return err
		}
		added[path] = ls
	}
	if err := d.objs.FwpNoteCfg.Put(uint32(0), uint32(1)); err != nil {
		for _, ls := range added {
			for _, l := range ls {
				l.Close()
			}
		}
		r.close()
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	for path, ls := range added {
		d.links[path] = append(d.links[path], ls...)
	}
	d.reauth = r
	return nil
}

// syncCgroups makes fwp_reauth_cgroups the cgroups the hooks are attached
// to now; d.mu is held.
func (d *Datapath) syncCgroups() error {
	r := d.reauth
	want := map[uint64]bool{}
	for path := range d.links {
		id, err := fwpunix.CgroupID(path)
		if err != nil {
			continue // removed since: its sockets are gone or elsewhere
		}
		want[id] = true
	}
	for id := range r.cgroups {
		if !want[id] {
			if err := r.objs.FwpReauthCgroups.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return err
			}
			delete(r.cgroups, id)
		}
	}
	for id := range want {
		if !r.cgroups[id] {
			if err := r.objs.FwpReauthCgroups.Put(id, uint8(1)); err != nil {
				return err
			}
			r.cgroups[id] = true
		}
	}
	return nil
}

// hookedCgroupPaths are the cgroups the hooks are attached to.
func (d *Datapath) hookedCgroupPaths() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]string, 0, len(d.links))
	for p := range d.links {
		out = append(out, p)
	}
	return out
}

// iterators returns the socket iterators' objects (EnableReauthorization).
func (d *Datapath) iterators() (*reauthObjs, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrClosed
	}
	if d.reauth == nil {
		return nil, fmt.Errorf("%w: reauthorization is not enabled", ErrUnavailable)
	}
	return d.reauth, nil
}

// namespaces is a set of open network namespace files, each once.
type namespaces struct {
	seen  map[[2]uint64]bool
	files []*os.File
}

// add opens the namespace at path (a /proc/PID/ns/net or a bind mount);
// a path that is gone (the process exited) is skipped.
func (n *namespaces) add(path string) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	var st unix.Stat_t
	id := [2]uint64{}
	if unix.Fstat(int(f.Fd()), &st) == nil {
		id = [2]uint64{st.Dev, st.Ino}
	}
	if id == ([2]uint64{}) || n.seen[id] {
		f.Close()
		return
	}
	if n.seen == nil {
		n.seen = map[[2]uint64]bool{}
	}
	n.seen[id] = true
	n.files = append(n.files, f)
}

// HookedNamespaces opens the network namespaces the sockets of the hooked
// cgroups may live in: the caller's and those of every process in the
// hooked cgroups and below (a socket iterator walks one namespace). The
// caller closes them.
func (d *Datapath) HookedNamespaces() ([]*os.File, error) {
	var ns namespaces
	ns.add("/proc/thread-self/ns/net")
	for _, root := range d.hookedCgroupPaths() {
		filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
			if err != nil || !e.IsDir() {
				return nil
			}
			b, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for _, pid := range strings.Fields(string(b)) {
				ns.add("/proc/" + pid + "/ns/net")
			}
			return nil
		})
	}
	return ns.files, nil
}

// inNetns runs fn on a thread in the network namespace netns (nil: the
// caller's). A thread that cannot come back stays locked and ends with
// its goroutine.
func inNetns(netns *os.File, fn func() error) error {
	if netns == nil {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer self.Close()
		if err := unix.Setns(int(netns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		err = fn()
		if unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// openIter opens one pass of an iterator over the namespace's sockets (the
// kernel takes the namespace of the opening thread).
func openIter(it *link.Iter, netns *os.File) (io.ReadCloser, error) {
	var rc io.ReadCloser
	err := inNetns(netns, func() error {
		var err error
		rc, err = it.Open()
		return err
	})
	return rc, err
}

// LiveFlows returns the live flows of the hooked cgroups in the network
// namespace netns (nil: the caller's): connected TCP sockets (established
// or half-closed by the peer) and connected UDP sockets that the connect
// hook noted.
func (d *Datapath) LiveFlows(netns *os.File) ([]LiveFlow, error) {
	var out []LiveFlow
	err := d.liveFlows(netns, func(f *LiveFlow) { out = append(out, *f) })
	return out, err
}

func (d *Datapath) liveFlows(netns *os.File, fn func(*LiveFlow)) error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return ErrClosed
	}
	r := d.reauth
	if r == nil {
		d.mu.Unlock()
		return fmt.Errorf("%w: reauthorization is not enabled", ErrUnavailable)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	err := d.syncCgroups()
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("reauthorize: hooked cgroups: %w", err)
	}
	for _, it := range []*link.Iter{r.iters[0], r.iters[2]} {
		rc, err := openIter(it, netns)
		if err != nil {
			return fmt.Errorf("reauthorize: socket iterator: %w", err)
		}
		br := bufio.NewReaderSize(rc, 64<<10)
		// The records are the C struct as the kernel lays it out: read
		// into the generated struct's memory (bpfel, as the host).
		var raw fwpreauthReauthFlow
		buf := unsafe.Slice((*byte)(unsafe.Pointer(&raw)), unsafe.Sizeof(raw))
		for {
			if _, err = io.ReadFull(br, buf); err != nil {
				break
			}
			f := raw.export()
			fn(&f)
		}
		rc.Close()
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("reauthorize: reading the socket iterator: %w", err)
		}
	}
	return nil
}

func (r *fwpreauthReauthFlow) export() LiveFlow {
	n := &r.Note
	comm := make([]byte, 0, 16)
	for _, c := range n.Comm {
		if c == 0 {
			break
		}
		comm = append(comm, byte(c))
	}
	kind := engine.KindAuthConnect
	if n.Inbound != 0 {
		kind = engine.KindAuthRecvAccept
	}
	f := LiveFlow{
		Cookie: r.Cookie, Layer: engine.LayerFor(kind, n.V6 != 0), Protocol: n.Proto, Inbound: n.Inbound != 0,
		Remote: netip.AddrPortFrom(addrOf(n.Raddr, n.V6), n.Rport),
		PID:    n.Tgid, UID: n.Uid, GID: n.Gid, CgroupID: n.CgroupId, App: AppIdentity{Dev: n.AppDev, Ino: n.AppIno},
		Comm: string(comm), Redirected: n.Redirected != 0, CloseWait: r.State == 8,
	}
	var la netip.Addr
	switch {
	case n.HasLaddr != 0:
		la = addrOf(n.Laddr, n.V6)
	case n.V6 != 0:
		la = netip.IPv6Unspecified()
	default:
		la = netip.IPv4Unspecified()
	}
	var lp uint16
	if n.HasLport != 0 {
		lp = n.Lport
	}
	f.Local = netip.AddrPortFrom(la, lp)
	sv6 := uint8(0)
	if r.Family == unix.AF_INET6 {
		sv6 = 1
	}
	f.SocketLocal = netip.AddrPortFrom(addrOf(r.Src, sv6).Unmap(), r.Sport)
	f.SocketRemote = netip.AddrPortFrom(addrOf(r.Dst, sv6).Unmap(), r.Dport)
	return f
}

// DestroyFlows ends the sockets of the given cookies in the network
// namespace netns (nil: the caller's) that are still live flows of the
// hooked cgroups, with bpf_sock_destroy: a TCP peer gets a reset and the
// program's next call on the socket fails with ECONNABORTED; a connected
// UDP socket is disconnected with the same error. It returns the cookies
// of the sockets it ended.
func (d *Datapath) DestroyFlows(netns *os.File, cookies []uint64) ([]uint64, error) {
	r, err := d.iterators()
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var done []uint64
	max := int(r.objs.FwpReauthKill.MaxEntries())
	for len(cookies) > 0 {
		chunk := cookies[:min(len(cookies), max)]
		cookies = cookies[len(chunk):]
		vals := make([]uint8, len(chunk))
		for i := range vals {
			vals[i] = 1
		}
		if _, err := r.objs.FwpReauthKill.BatchUpdate(chunk, vals, nil); err != nil {
			for _, c := range chunk {
				if err := r.objs.FwpReauthKill.Put(c, uint8(1)); err != nil {
					r.clearKill()
					return done, fmt.Errorf("reauthorize: %w", err)
				}
			}
		}
		for _, it := range []*link.Iter{r.iters[1], r.iters[3]} {
			rc, err := openIter(it, netns)
			if err != nil {
				r.clearKill()
				return done, fmt.Errorf("reauthorize: socket iterator: %w", err)
			}
			b, err := io.ReadAll(rc)
			rc.Close()
			for i := 0; i+8 <= len(b); i += 8 {
				done = append(done, binary.LittleEndian.Uint64(b[i:]))
			}
			if err != nil {
				r.clearKill()
				return done, fmt.Errorf("reauthorize: reading the socket iterator: %w", err)
			}
		}
		// Cookies not found (closed meanwhile, or in another namespace)
		// are left: clear them, the map is the next pass's too.
		r.clearKill()
	}
	return done, nil
}

// clearKill empties fwp_reauth_kill; r.mu is held.
func (r *reauthObjs) clearKill() {
	var k uint64
	var keys []uint64
	var v uint8
	it := r.objs.FwpReauthKill.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	for _, k := range keys {
		_ = r.objs.FwpReauthKill.Delete(k)
	}
}

// ReauthCounts reports the entries of the reauthorization maps (cookies
// waiting for a destroy pass, hooked cgroups), for leak checks.
func (d *Datapath) ReauthCounts() (kill, cgroups int, err error) {
	d.mu.Lock()
	r := d.reauth
	d.mu.Unlock()
	if r == nil {
		return 0, 0, nil
	}
	count := func(m *ebpf.Map) (int, error) {
		n := 0
		var k uint64
		var v uint8
		it := m.Iterate()
		for it.Next(&k, &v) {
			n++
		}
		return n, it.Err()
	}
	if kill, err = count(r.objs.FwpReauthKill); err != nil {
		return
	}
	cgroups, err = count(r.objs.FwpReauthCgroups)
	return
}

// appPath is the application id the engine sees for a live flow: the
// policy's own path for an executable an app id condition names (so the
// engine's comparison agrees with the kernel's, which compares files),
// else the process's executable when it still runs it, else a name that
// equals no path. Empty for none (a kernel thread).
func appPath(p *Policy, f *LiveFlow) string {
	if f.App == (AppIdentity{}) {
		return ""
	}
	if p != nil {
		if path, ok := p.appPathOf(f.App); ok {
			return path
		}
	}
	exe := "/proc/" + strconv.FormatUint(uint64(f.PID), 10) + "/exe"
	if id, err := ResolveApp(exe); err == nil && id == f.App {
		if path, err := os.Readlink(exe); err == nil {
			return path
		}
	}
	return "[" + f.Comm + " " + f.App.String() + "]"
}

// appPathOf returns the path an app id condition of the policy names for
// the executable (the first in order when several name the same file).
func (p *Policy) appPathOf(id AppIdentity) (string, bool) {
	best := ""
	for path, r := range p.apps {
		if r.ok && r.id == id && (best == "" || path < best) {
			best = path
		}
	}
	return best, best != ""
}

// Reset is a live flow a reauthorization ended, with the engine's
// decision that blocked it.
type Reset struct {
	Flow   LiveFlow
	Result engine.Result
}

// ReauthPass is what one reauthorization pass did.
type ReauthPass struct {
	Namespaces int     // network namespaces walked
	Flows      int     // live flows classified again
	Inbound    int     // of them, accepted connections (at AUTH_RECV_ACCEPT)
	Blocked    int     // of them, blocked by the policy
	Resets     []Reset // the sockets destroyed (a blocked flow closed meanwhile is not)
}

// direction is the flow's: inbound for an accepted connection.
func (f *LiveFlow) direction() engine.Direction {
	if f.Inbound {
		return engine.DirectionInbound
	}
	return engine.DirectionOutbound
}

// ReauthValues sets vs and meta to the engine's inputs for reauthorizing
// the live flow at its layer (f.Layer): for an outbound flow, at
// ALE_AUTH_CONNECT, the values the connect hook
// classified (as package nfqueue gives them for a new flow, so a policy
// that did not change decides the same), with FLAGS' IS_REAUTHORIZE, and
// the original destination of a flow the kernel redirected (orig, when
// valid); for an accepted connection, at ALE_AUTH_RECV_ACCEPT, its
// tuple, the listener's owner and direction inbound (as the ingress hook
// and package nfqueue classify it). app is the application id (appPath).
func ReauthValues(f *LiveFlow, app string, orig netip.AddrPort, vs *engine.Values, meta *engine.Metadata) {
	vs.Reset()
	vs.Set(engine.FieldIPProtocol, engine.Uint8(f.Protocol))
	vs.Set(engine.FieldIPRemoteAddress, engine.Addr(f.Remote.Addr()))
	vs.Set(engine.FieldIPRemotePort, engine.Uint16(f.Remote.Port()))
	if a := f.Local.Addr(); a.IsValid() && !a.IsUnspecified() {
		vs.Set(engine.FieldIPLocalAddress, engine.Addr(a))
	}
	if f.Local.Port() != 0 {
		vs.Set(engine.FieldIPLocalPort, engine.Uint16(f.Local.Port()))
	}
	vs.Set(engine.FieldALEUserID, engine.Uint32(f.UID))
	vs.Set(engine.FieldALEGroupID, engine.Uint32(f.GID))
	vs.Set(engine.FieldCgroupID, engine.Uint64(f.CgroupID))
	if app != "" {
		vs.Set(engine.FieldALEAppID, engine.String(app))
	}
	flags := engine.FlagIsReauthorize
	if f.Remote.Addr().IsLoopback() {
		flags |= engine.FlagIsLoopback
	}
	if f.Redirected {
		flags |= engine.FlagIsConnectionRedirected
		if orig.IsValid() {
			vs.Set(engine.FieldALEOriginalRemoteAddress, engine.Addr(orig.Addr()))
			vs.Set(engine.FieldALEOriginalRemotePort, engine.Uint16(orig.Port()))
		}
	}
	vs.Set(engine.FieldFlags, engine.Uint32(flags))
	dir := f.direction()
	vs.Set(engine.FieldDirection, engine.Uint32(uint32(dir)))
	*meta = engine.Metadata{}
	meta.Present = engine.MetaProcessID | engine.MetaUserID | engine.MetaFlowHandle | engine.MetaPacketDirection |
		engine.MetaTransportEndpointHandle | engine.MetaCgroupID
	meta.ProcessID = f.PID
	meta.UserID, meta.GroupID = f.UID, f.GID
	meta.FlowHandle = engine.FlowHandle(f.Cookie)
	meta.Direction = dir
	meta.TransportEndpointHandle = f.Cookie
	meta.CgroupID = f.CgroupID
	if app != "" && !strings.HasPrefix(app, "[") {
		meta.Present |= engine.MetaProcessPath
		meta.ProcessPath = app
	}
}

// Reauthorize classifies every live flow of the hooked cgroups again, as
// WFP reauthorizes a flow when the filters change: at ALE_AUTH_CONNECT,
// with IS_REAUTHORIZE, by the engine (its policy in force, Go callouts
// included; p is the kernel policy compiled from it, for the application
// ids), and destroys the sockets of the flows it now blocks. A flow the
// policy still permits is left alone. EnableReauthorization must have
// been called.
func (d *Datapath) Reauthorize(eng *engine.Engine, p *Policy) (ReauthPass, error) {
	var pass ReauthPass
	nss, err := d.HookedNamespaces()
	if err != nil {
		return pass, err
	}
	defer func() {
		for _, ns := range nss {
			ns.Close()
		}
	}()
	pass.Namespaces = len(nss)
	var vs engine.Values
	var meta engine.Metadata
	var errs []error
	// Resolved once per process and executable in a pass (a stat and a
	// readlink of /proc/PID/exe).
	type appKey struct {
		pid uint32
		id  AppIdentity
	}
	apps := map[appKey]string{}
	for i, ns := range nss {
		if i == 0 {
			ns = nil // the caller's own: no thread switch
		}
		blocked := map[uint64]Reset{}
		var kill []uint64
		err := d.liveFlows(ns, func(f *LiveFlow) {
			pass.Flows++
			if f.Inbound {
				pass.Inbound++
			}
			var orig netip.AddrPort
			if f.Redirected {
				if st, err := d.RedirectByCookie(f.Cookie); err == nil {
					orig = st.Original
				}
			}
			ak := appKey{f.PID, f.App}
			app, ok := apps[ak]
			if !ok {
				app = appPath(p, f)
				apps[ak] = app
			}
			ReauthValues(f, app, orig, &vs, &meta)
			res := eng.Classify(f.Layer, &vs, &meta)
			if res.Pend != nil {
				// Pending during a reauthorization fails (CANNOT_PEND)
				// in the engine; never hold a live flow on it.
				res.Pend.Cancel()
				return
			}
			if !res.Permitted() {
				pass.Blocked++
				blocked[f.Cookie] = Reset{Flow: *f, Result: res}
				kill = append(kill, f.Cookie)
			}
		})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if len(kill) == 0 {
			continue
		}
		done, err := d.DestroyFlows(ns, kill)
		for _, c := range done {
			pass.Resets = append(pass.Resets, blocked[c])
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return pass, errors.Join(errs...)
}
