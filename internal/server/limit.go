package server

import (
	"log/slog"
	"net"
	"sync"
	"time"
)

// DefaultMaxConnections bounds the connections fwpd serves at once on
// each of its sockets.
const DefaultMaxConnections = 1024

// refusalWarnEvery spaces the warnings about refused connections: a flood
// of connects must not become a flood of log lines.
const refusalWarnEvery = time.Minute

// LimitListener returns l serving at most n connections at once (n < 1
// counts as 1). A connection beyond the bound is closed as soon as it is
// accepted, rather than left queued: a queued one would hang its client
// until the client's own timeout with no sign of why, and would keep
// filling the kernel's backlog; a closed one fails at once (EOF, or
// Unavailable from gRPC) and the refusal is logged — each at debug level,
// and a warning with the count at most once a minute. A slot is free
// again when the connection Accept returned is closed; the connection
// exposes the one it wraps with NetConn (peercred.FromConn reads through
// it), which must not be closed directly.
func LimitListener(l net.Listener, n int, log *slog.Logger) net.Listener {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &limitListener{Listener: l, slots: make(chan struct{}, max(n, 1)), log: log}
}

type limitListener struct {
	net.Listener
	slots chan struct{} // one element per open connection
	log   *slog.Logger

	mu       sync.Mutex
	refused  int // since the last warning
	lastWarn time.Time
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.slots <- struct{}{}:
			return &limitedConn{Conn: c, slots: l.slots}, nil
		default:
			c.Close()
			l.refuse()
		}
	}
}

func (l *limitListener) refuse() {
	l.log.Debug("connection refused: too many connections", "addr", l.Addr().String(), "max_connections", cap(l.slots))
	l.mu.Lock()
	defer l.mu.Unlock()
	l.refused++
	if now := time.Now(); now.Sub(l.lastWarn) >= refusalWarnEvery {
		l.log.Warn("refusing connections beyond --max-connections", "addr", l.Addr().String(),
			"max_connections", cap(l.slots), "refused", l.refused)
		l.refused, l.lastWarn = 0, now
	}
}

// limitedConn holds a slot of its listener until closed.
type limitedConn struct {
	net.Conn
	slots chan struct{}
	once  sync.Once
}

// Close frees the slot first, so that once the peer sees the connection
// end a new one is served.
func (c *limitedConn) Close() error {
	c.once.Do(func() { <-c.slots })
	return c.Conn.Close()
}

// NetConn returns the wrapped connection, as tls.Conn.NetConn does.
func (c *limitedConn) NetConn() net.Conn { return c.Conn }
