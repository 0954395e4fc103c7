package busypoll

import (
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Mode says when a Conn's reads spin before blocking.
type Mode uint8

const (
	// InFlight spins while a call is in flight: Begin was called more
	// often than End. A Begin finding the reader blocked wakes it to spin
	// (the waker's own CPU runs it: no other CPU is woken).
	InFlight Mode = iota
	// Linger spins on every read, for the window, before blocking: a read
	// loop that has just answered a call stays awake for the next one, and
	// blocks once the window passes with nothing read.
	Linger
)

// Available reports whether spinning can help here: with one CPU (or one
// P) the spinner only delays the peer it waits for.
func Available() bool { return runtime.NumCPU() > 1 && runtime.GOMAXPROCS(0) > 1 }

// Conn is a unix socket connection whose reads busy-poll (see Mode). It
// is a net.Conn; one goroutine reads it at a time. Begin and End are safe
// from any goroutine.
type Conn struct {
	*net.UnixConn
	rc     syscall.RawConn
	window time.Duration
	mode   Mode

	inflight atomic.Int32
	begun    atomic.Uint64 // Begins so far: a reader about to block checks none came meanwhile
	parked   atomic.Bool   // the reader is in (or entering) a blocking read
	kicked   atomic.Bool   // its read deadline is in the past to wake it

	mu       sync.Mutex // the read deadline, against kicks
	deadline time.Time  // the caller's read deadline

	// The reading goroutine's: one read attempt's buffer and outcome, set
	// by try (a method value made once, so that a read allocates nothing).
	p     []byte
	n     int
	errno syscall.Errno
	try   func(uintptr) bool

	stats struct{ spins, hits, kicks atomic.Uint64 }
}

// New returns c reading with mode for up to window before each block; a
// window of 0 (or !Available()) never spins: Read is c's.
func New(c *net.UnixConn, window time.Duration, mode Mode) (*Conn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	if !Available() {
		window = 0
	}
	bc := &Conn{UnixConn: c, rc: rc, window: max(window, 0), mode: mode}
	bc.try = bc.tryRead
	return bc, nil
}

// Window is how long a read spins before it blocks (0: never).
func (c *Conn) Window() time.Duration { return c.window }

// Stats counts spinning reads, those that found data while spinning, and
// the wake-ups of a blocked reader by Begin.
func (c *Conn) Stats() (spins, hits, kicks uint64) {
	return c.stats.spins.Load(), c.stats.hits.Load(), c.stats.kicks.Load()
}

// aLongTimeAgo is a read deadline that wakes a blocked reader at once.
var aLongTimeAgo = time.Unix(1, 0)

// Begin says a call whose answer this Conn will read is in flight: reads
// spin until End. A reader blocked meanwhile is woken to spin.
func (c *Conn) Begin() {
	c.inflight.Add(1)
	c.begun.Add(1)
	if c.window > 0 && c.mode == InFlight && c.parked.Load() && c.kicked.CompareAndSwap(false, true) {
		c.stats.kicks.Add(1)
		c.mu.Lock()
		_ = c.UnixConn.SetReadDeadline(aLongTimeAgo)
		c.mu.Unlock()
	}
}

// End says a call begun is answered (or given up).
func (c *Conn) End() { c.inflight.Add(-1) }

// SetReadDeadline sets the caller's read deadline (a kick's is internal).
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadline = t
	if c.kicked.Load() {
		return nil // unkick applies it
	}
	return c.UnixConn.SetReadDeadline(t)
}

// SetDeadline sets both deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.UnixConn.SetWriteDeadline(t)
}

func (c *Conn) unkick() {
	c.mu.Lock()
	c.kicked.Store(false)
	_ = c.UnixConn.SetReadDeadline(c.deadline)
	c.mu.Unlock()
}

func (c *Conn) spinning() bool {
	return c.window > 0 && (c.mode == Linger || c.inflight.Load() > 0)
}

// Read reads as net.Conn's Read does, spinning first when its mode says.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 || c.window == 0 {
		return c.UnixConn.Read(p)
	}
	for {
		seen := c.begun.Load()
		if c.spinning() {
			if n, err, done := c.spin(p); done {
				return n, err
			}
		}
		c.parked.Store(true)
		if c.mode == InFlight && c.begun.Load() != seen {
			// A call began while this read spun or decided not to: its
			// answer gets a window of its own (Begin may not have seen
			// the reader parked).
			c.parked.Store(false)
			continue
		}
		n, err := c.UnixConn.Read(p)
		c.parked.Store(false)
		if err != nil && c.kicked.Load() && errors.Is(err, os.ErrDeadlineExceeded) {
			c.unkick()
			continue
		}
		return n, err
	}
}

// spin retries a non-blocking read until data (or an error) comes, the
// window passes, or (InFlight) no call is in flight; done is false when it
// gave up, the caller then blocks.
func (c *Conn) spin(p []byte) (n int, err error, done bool) {
	c.stats.spins.Add(1)
	end := time.Now().Add(c.window)
	c.p = p
	defer func() { c.p = nil }()
	for {
		if err := c.rc.Read(c.try); err != nil {
			if c.kicked.Load() && errors.Is(err, os.ErrDeadlineExceeded) {
				c.unkick()
				continue
			}
			return 0, err, true
		}
		switch c.errno {
		case 0:
			c.stats.hits.Add(1)
			if c.n == 0 {
				return 0, io.EOF, true
			}
			return c.n, nil, true
		case syscall.EAGAIN:
		default:
			return 0, &net.OpError{Op: "read", Net: "unix", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError("read", c.errno)}, true
		}
		if c.mode == InFlight && c.inflight.Load() <= 0 || time.Now().After(end) {
			return 0, nil, false
		}
		// Whatever else this P has to run (the goroutine an answer was
		// just handed to) runs first, and whatever else the CPU has to
		// run (on a loaded machine, without it the spin was 2-4x worse).
		runtime.Gosched()
		syscall.Syscall(syscall.SYS_SCHED_YIELD, 0, 0, 0)
	}
}

// tryRead is one non-blocking read(2) attempt: it always returns true, so
// that RawConn.Read never waits in the poller.
func (c *Conn) tryRead(fd uintptr) bool {
	for {
		n, err := syscall.Read(int(fd), c.p)
		if err == syscall.EINTR {
			continue
		}
		c.n, c.errno = max(n, 0), 0
		if err != nil {
			c.n = 0
			c.errno, _ = err.(syscall.Errno)
			if c.errno == 0 {
				c.errno = syscall.EIO
			}
		}
		return true
	}
}
