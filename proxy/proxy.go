package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"syscall"

	"fwp/engine"
)

// Errors, after the ioctls' failures.
var (
	ErrNotFound        = errors.New("fwp proxy: not a redirected connection")       // WSAENOTCONN / no record
	ErrInvalidArgument = errors.New("fwp proxy: invalid argument")                  // WSAEINVAL
	ErrNotSupported    = errors.New("fwp proxy: not supported by this datapath")    // WSAEOPNOTSUPP
	ErrAccessDenied    = errors.New("fwp proxy: caller is not the redirect target") // WSAEACCES
	ErrNotSocket       = errors.New("fwp proxy: not a socket")                      // WSAENOTSOCK
)

// isSocket reports whether c is an operating-system socket, or a wrapper
// of one that shows its IP addresses (what a kernel datapath knows by
// tuple or cookie): net.Pipe and the like are not.
func isSocket(c interface{ LocalAddr() net.Addr }) bool {
	if _, ok := c.(syscall.Conn); ok {
		return true
	}
	switch c.LocalAddr().(type) {
	case *net.TCPAddr, *net.UDPAddr:
		return true
	}
	return false
}

// Redirect is what a datapath knows about a connection a callout redirected
// to a local proxy.
type Redirect struct {
	// Records are the flow's redirect records, opaque to the proxy.
	Records []byte
	// Context is the redirecting callout's context bytes (may be nil).
	Context []byte
	// TargetPID is the local redirect target the callout named; only that
	// process may read Context. 0: the callout named none.
	TargetPID uint32
}

// Accepted is implemented by accepted connections whose datapath knows how
// they were redirected (fwp's in-process datapath).
type Accepted interface {
	// ProxyRedirect returns the connection's redirect and the process id of
	// the process that accepted it, or an error wrapping ErrNotFound.
	ProxyRedirect() (r Redirect, acceptorPID uint32, err error)
}

// AcceptedDatagrams is implemented by unconnected packet sockets whose
// datapath knows how the datagrams they receive were redirected (fwp's
// in-process PacketConn): a UDP proxy keeps one socket for many clients,
// so the redirect is found by the datagram's source.
type AcceptedDatagrams interface {
	// ProxyDatagramRedirect returns the redirect of the datagrams from
	// (unmapped) and the process id of the process that receives them, or
	// an error wrapping ErrNotFound.
	ProxyDatagramRedirect(from netip.AddrPort) (r Redirect, receiverPID uint32, err error)
}

// DatagramBackend is a Backend that also answers for datagrams a plain
// net.PacketConn received (a kernel datapath, by the socket's local address
// and the datagram's source). Backends without it give ErrNotSupported for
// datagrams.
type DatagramBackend interface {
	Backend
	// QueryDatagram returns the redirect of the datagrams from (unmapped)
	// that pc receives, or an error wrapping ErrNotFound.
	QueryDatagram(pc net.PacketConn, from netip.AddrPort) (Redirect, error)
}

// RecordsSetter is implemented by dialers that carry redirect records on
// the connections they make (fwp's in-process Dialer).
type RecordsSetter interface {
	SetRedirectRecords(records []byte) error
}

// Backend is a datapath that answers for plain sockets: a kernel datapath
// finds an accepted connection by 4-tuple or socket cookie and attaches
// records to a socket before it connects.
type Backend interface {
	// QueryAccepted returns the redirect of an accepted connection, or an
	// error wrapping ErrNotFound when the backend does not know it.
	QueryAccepted(conn net.Conn) (Redirect, error)
	// SetRecords attaches records to a socket about to connect (called from
	// a net.Dialer's Control hook); ErrNotSupported when it cannot.
	SetRecords(network, address string, c syscall.RawConn, records []byte) error
}

var backends struct {
	mu   sync.RWMutex
	list []*Backend
}

// Register adds a backend and returns the function that removes it.
func Register(b Backend) (unregister func()) {
	p := &b
	backends.mu.Lock()
	backends.list = append(backends.list, p)
	backends.mu.Unlock()
	return func() {
		backends.mu.Lock()
		backends.list = slices.DeleteFunc(backends.list, func(x *Backend) bool { return x == p })
		backends.mu.Unlock()
	}
}

func registered() []Backend {
	backends.mu.RLock()
	defer backends.mu.RUnlock()
	out := make([]Backend, len(backends.list))
	for i, p := range backends.list {
		out[i] = *p
	}
	return out
}

// lookup finds the redirect of an accepted connection and the pid of the
// process that holds it.
func lookup(conn net.Conn) (Redirect, uint32, error) {
	if conn == nil {
		return Redirect{}, 0, fmt.Errorf("%w: nil connection", ErrInvalidArgument)
	}
	// Unwrap layered connections (tls.Conn and the like) to the socket.
	for {
		if a, ok := conn.(Accepted); ok {
			return a.ProxyRedirect()
		}
		u, ok := conn.(interface{ NetConn() net.Conn })
		if !ok || u.NetConn() == nil || u.NetConn() == conn {
			break
		}
		conn = u.NetConn()
	}
	if !isSocket(conn) {
		return Redirect{}, 0, fmt.Errorf("%w: %T", ErrNotSocket, conn)
	}
	// The kernel datapath's socket options first: no daemon, no maps to
	// open. A refusal stands; without an answer the backends may know.
	r, _, kerr := QueryKernelRedirect(conn)
	switch {
	case kerr == nil:
		return r, uint32(os.Getpid()), nil
	case errors.Is(kerr, ErrAccessDenied), errors.Is(kerr, ErrInvalidArgument):
		return Redirect{}, 0, kerr
	}
	bs := registered()
	if len(bs) == 0 {
		if errors.Is(kerr, ErrNotFound) {
			return Redirect{}, 0, kerr
		}
		return Redirect{}, 0, fmt.Errorf("%w: no datapath knows %T connections", ErrNotSupported, conn)
	}
	for _, b := range bs {
		r, err := b.QueryAccepted(conn)
		if err == nil {
			return r, uint32(os.Getpid()), nil
		}
		if !errors.Is(err, ErrNotFound) {
			return Redirect{}, 0, err
		}
	}
	return Redirect{}, 0, fmt.Errorf("%w: %s -> %s", ErrNotFound, conn.RemoteAddr(), conn.LocalAddr())
}

// ConnTuple returns a connection's local and remote addresses when it is a
// TCP connection or a UDP socket connected to its peer (a UDP proxy
// connects a socket to each client): what a kernel backend looks a
// redirect up by.
func ConnTuple(conn net.Conn) (local, remote netip.AddrPort, ok bool) {
	switch la := conn.LocalAddr().(type) {
	case *net.TCPAddr:
		if ra, isTCP := conn.RemoteAddr().(*net.TCPAddr); isTCP {
			local, remote = la.AddrPort(), ra.AddrPort()
		}
	case *net.UDPAddr:
		if ra, isUDP := conn.RemoteAddr().(*net.UDPAddr); isUDP {
			local, remote = la.AddrPort(), ra.AddrPort()
		}
	}
	return local, remote, local.IsValid() && remote.IsValid()
}

// QueryRedirectRecords returns the redirect records of an accepted
// connection (SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS). The bytes are
// opaque: pass them to SetRedirectRecords for the outbound connection.
func QueryRedirectRecords(conn net.Conn) ([]byte, error) {
	r, _, err := lookup(conn)
	if err != nil {
		return nil, err
	}
	return recordsOf(r)
}

func recordsOf(r Redirect) ([]byte, error) {
	if len(r.Records) == 0 {
		return nil, fmt.Errorf("%w: the connection carries no redirect records", ErrNotFound)
	}
	return slices.Clone(r.Records), nil
}

// QueryRedirectContext returns the redirecting callout's context of an
// accepted connection (SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT). Only the
// process the callout named as local redirect target may read it: the
// context can hold the flow's secrets.
func QueryRedirectContext(conn net.Conn) ([]byte, error) {
	r, pid, err := lookup(conn)
	if err != nil {
		return nil, err
	}
	return redirectContext(r, pid)
}

// redirectContext gives the context only to the redirect target pid.
func redirectContext(r Redirect, pid uint32) ([]byte, error) {
	if r.TargetPID == 0 || r.TargetPID != pid {
		return nil, fmt.Errorf("%w: redirect target pid %d, caller pid %d", ErrAccessDenied, r.TargetPID, pid)
	}
	if r.Context == nil {
		return nil, fmt.Errorf("%w: the callout set no redirect context", ErrNotFound)
	}
	return slices.Clone(r.Context), nil
}

// lookupDatagram finds the redirect of the datagrams from that pc
// receives, and the pid of the process that holds pc.
func lookupDatagram(pc net.PacketConn, from net.Addr) (Redirect, uint32, error) {
	if pc == nil {
		return Redirect{}, 0, fmt.Errorf("%w: nil packet connection", ErrInvalidArgument)
	}
	ua, ok := from.(*net.UDPAddr)
	if !ok || ua == nil {
		return Redirect{}, 0, fmt.Errorf("%w: datagram source %T is not a UDP address", ErrInvalidArgument, from)
	}
	src := ua.AddrPort()
	if !src.IsValid() || src.Port() == 0 {
		return Redirect{}, 0, fmt.Errorf("%w: datagram source %v", ErrInvalidArgument, from)
	}
	// A dual-stack socket reports IPv4 sources as v4-mapped; datapaths
	// index them as IPv4.
	src = netip.AddrPortFrom(src.Addr().Unmap().WithZone(""), src.Port())
	if a, ok := pc.(AcceptedDatagrams); ok {
		return a.ProxyDatagramRedirect(src)
	}
	if !isSocket(pc) {
		return Redirect{}, 0, fmt.Errorf("%w: %T", ErrNotSocket, pc)
	}
	var asked bool
	for _, b := range registered() {
		db, ok := b.(DatagramBackend)
		if !ok {
			continue
		}
		asked = true
		r, err := db.QueryDatagram(pc, src)
		if err == nil {
			return r, uint32(os.Getpid()), nil
		}
		if !errors.Is(err, ErrNotFound) {
			return Redirect{}, 0, err
		}
	}
	if !asked {
		return Redirect{}, 0, fmt.Errorf("%w: no datapath knows the datagrams of %T sockets", ErrNotSupported, pc)
	}
	return Redirect{}, 0, fmt.Errorf("%w: datagrams from %s", ErrNotFound, src)
}

// QueryDatagramRedirectRecords is QueryRedirectRecords for a UDP proxy's
// unconnected socket: the records of the flow whose datagram pc received
// from the source from (as ReadFrom returned it). Same errors.
func QueryDatagramRedirectRecords(pc net.PacketConn, from net.Addr) ([]byte, error) {
	r, _, err := lookupDatagram(pc, from)
	if err != nil {
		return nil, err
	}
	return recordsOf(r)
}

// QueryDatagramRedirectContext is QueryRedirectContext for a UDP proxy's
// unconnected socket and a datagram's source, with the same access rule:
// only the redirect target process reads the context.
func QueryDatagramRedirectContext(pc net.PacketConn, from net.Addr) ([]byte, error) {
	r, pid, err := lookupDatagram(pc, from)
	if err != nil {
		return nil, err
	}
	return redirectContext(r, pid)
}

// SetRedirectRecords makes the connections a dialer makes carry records
// (SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS). dialer is a RecordsSetter
// (fwp's in-process Dialer) or a *net.Dialer, whose Control hook then hands
// the records to a registered kernel backend before the socket connects;
// without such a backend a *net.Dialer gets ErrNotSupported, since a plain
// socket would silently drop them.
func SetRedirectRecords(dialer any, records []byte) error {
	if len(records) == 0 || len(records) > engine.MaxRedirectRecordsSize {
		return fmt.Errorf("%w: %d bytes of redirect records", ErrInvalidArgument, len(records))
	}
	switch d := dialer.(type) {
	case nil:
		return fmt.Errorf("%w: nil dialer", ErrInvalidArgument)
	case RecordsSetter:
		return d.SetRedirectRecords(records)
	case *net.Dialer:
		if d == nil {
			return fmt.Errorf("%w: nil dialer", ErrInvalidArgument)
		}
		bs := registered()
		kernel := kernelRecords(records)
		if len(bs) == 0 && !kernel {
			return fmt.Errorf("%w: no kernel datapath is registered to carry records on a net.Dialer", ErrNotSupported)
		}
		recs := slices.Clone(records)
		prevCtx, prev := d.ControlContext, d.Control
		d.ControlContext = func(ctx context.Context, network, address string, c syscall.RawConn) error {
			switch {
			case prevCtx != nil:
				if err := prevCtx(ctx, network, address, c); err != nil {
					return err
				}
			case prev != nil:
				if err := prev(network, address, c); err != nil {
					return err
				}
			}
			return setRecords(bs, network, address, c, recs)
		}
		return nil
	}
	return fmt.Errorf("%w: cannot set redirect records on a %T", ErrNotSupported, dialer)
}

// setRecords hands records to the first backend that takes them.
func setRecords(bs []Backend, network, address string, c syscall.RawConn, recs []byte) error {
	// The kernel's setsockopt first; the backends when no hook answers
	// for the socket.
	var firstErr error
	if kernelRecords(recs) {
		err := setKernelRecords(c, recs)
		if err == nil || !errors.Is(err, errNoHook) || len(bs) == 0 {
			if errors.Is(err, errNoHook) {
				err = fmt.Errorf("%w: %w", ErrNotSupported, err)
			}
			return err
		}
		firstErr = err
	}
	for _, b := range bs {
		err := b.SetRecords(network, address, c, recs)
		if err == nil {
			return nil
		}
		if firstErr == nil || errors.Is(firstErr, errNoHook) || !errors.Is(err, ErrNotSupported) {
			firstErr = err
		}
	}
	return firstErr
}

type recordsKey struct{}

// WithRedirectRecords returns a context carrying redirect records for the
// one dial made with it: SetRedirectRecords per connection, as WFP's
// SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS is per socket. A proxy that
// shares one dialer among its connections passes each outbound dial the
// records of the connection it serves, and no dial can take another's.
// fwp's in-process Dialer reads them from DialContext's context (its Net
// needs no hook); a net.Dialer needs ControlRedirectRecords as its
// ControlContext to hand them to a kernel backend.
func WithRedirectRecords(ctx context.Context, records []byte) context.Context {
	return context.WithValue(ctx, recordsKey{}, slices.Clone(records))
}

// RedirectRecordsFrom returns the records ctx carries (WithRedirectRecords),
// checked for size.
func RedirectRecordsFrom(ctx context.Context) ([]byte, bool, error) {
	recs, ok := ctx.Value(recordsKey{}).([]byte)
	if !ok {
		return nil, false, nil
	}
	if len(recs) == 0 || len(recs) > engine.MaxRedirectRecordsSize {
		return nil, true, fmt.Errorf("%w: %d bytes of redirect records", ErrInvalidArgument, len(recs))
	}
	return recs, true, nil
}

// ControlRedirectRecords is a net.Dialer ControlContext hook for the
// per-connection records: it hands the records of the dial's context
// (WithRedirectRecords) to a registered kernel backend before the socket
// connects. A dial whose context carries none is left alone; records with
// no backend to carry them are ErrNotSupported, as a plain socket would
// silently drop them.
func ControlRedirectRecords(ctx context.Context, network, address string, c syscall.RawConn) error {
	recs, ok, err := RedirectRecordsFrom(ctx)
	if !ok || err != nil {
		return err
	}
	bs := registered()
	if len(bs) == 0 && !kernelRecords(recs) {
		return fmt.Errorf("%w: no kernel datapath is registered to carry records on a net.Dialer", ErrNotSupported)
	}
	return setRecords(bs, network, address, c, recs)
}
