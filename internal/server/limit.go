package server

import (
	"log/slog"
	"net"
	"sync"
	"time"

	"fwp/internal/peercred"
)

// DefaultMaxConnections bounds the connections fwpd serves at once on
// each of its sockets.
const DefaultMaxConnections = 1024

// DefaultMaxConnectionsPerUser bounds those of any one user other than
// root, so that one local user cannot take every slot.
const DefaultMaxConnectionsPerUser = 64

// Limits are the connection bounds of a listener.
type Limits struct {
	// Max bounds the connections served at once (< 1 counts as 1). One
	// sixteenth of it is kept for root, so that an administrator gets in
	// while other users hold every other slot.
	Max int
	// PerUser bounds one user's connections, root's excepted (< 1: no
	// bound of its own). The user is the peer's uid (SO_PEERCRED); a peer
	// whose credentials cannot be read counts as one unknown user.
	PerUser int
	// Privileged says which peers may take the reserved slots (fwpd:
	// root and its administrators); nil means root only. It is asked once
	// per connection, at accept, with the connect-time credentials.
	Privileged func(peercred.Cred) bool
}

// refusalWarnEvery spaces the warnings about refused connections: a flood
// of connects must not become a flood of log lines.
const refusalWarnEvery = time.Minute

// LimitListener returns l serving at most lim.Max connections at once, at
// most lim.PerUser of them for any one user but root, and the last
// sixteenth of them only to root (or the lim.Privileged peers). A
// connection beyond a bound is closed as soon as it is accepted, rather
// than left queued: a queued one would hang
// its client until the client's own timeout with no sign of why, and would
// keep filling the kernel's backlog; a closed one fails at once (EOF, or
// Unavailable from gRPC) and the refusal is logged — each at debug level,
// and a warning with the count at most once a minute. A slot is free again
// when the connection Accept returned is closed; the connection exposes
// the one it wraps with NetConn (peercred.FromConn reads through it), which
// must not be closed directly.
func LimitListener(l net.Listener, lim Limits, log *slog.Logger) net.Listener {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	lim.Max = max(lim.Max, 1)
	return &limitListener{Listener: l, lim: lim, reserve: lim.Max / 16, byUser: map[uint32]int{}, log: log}
}

// unknownUser stands for peers whose credentials cannot be read (not a
// unix socket).
const unknownUser = ^uint32(0)

type limitListener struct {
	net.Listener
	lim     Limits
	reserve int // slots only root may take
	log     *slog.Logger

	mu       sync.Mutex
	open     int
	byUser   map[uint32]int // open connections by uid, root's included
	refused  int            // since the last warning
	lastWarn time.Time
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uid, privileged := unknownUser, false
		if cr, err := peercred.FromConn(c); err == nil {
			uid = cr.UID
			if l.lim.Privileged != nil {
				privileged = l.lim.Privileged(cr)
			} else {
				privileged = uid == 0
			}
		}
		if why := l.admit(uid, privileged); why != "" {
			l.refuse(uid, why) // logged before the peer can see the close
			c.Close()
			continue
		}
		return &limitedConn{Conn: c, l: l, uid: uid}, nil
	}
}

// admit takes a slot for uid, a reserved one if need be when privileged,
// or says why not.
func (l *limitListener) admit(uid uint32, privileged bool) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	limit := l.lim.Max - l.reserve
	if privileged {
		limit = l.lim.Max
	}
	if l.open >= limit {
		return "too many connections"
	}
	if uid != 0 && l.lim.PerUser > 0 && l.byUser[uid] >= l.lim.PerUser {
		return "too many connections of this user"
	}
	l.open++
	l.byUser[uid]++
	return ""
}

func (l *limitListener) release(uid uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open--
	if l.byUser[uid]--; l.byUser[uid] <= 0 {
		delete(l.byUser, uid)
	}
}

func (l *limitListener) refuse(uid uint32, why string) {
	l.log.Debug("connection refused: "+why, "addr", l.Addr().String(), "uid", int64(uid),
		"max_connections", l.lim.Max, "max_connections_per_user", l.lim.PerUser)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.refused++
	if now := time.Now(); now.Sub(l.lastWarn) >= refusalWarnEvery {
		l.log.Warn("refusing connections beyond --max-connections / --max-connections-per-user", "addr", l.Addr().String(),
			"max_connections", l.lim.Max, "max_connections_per_user", l.lim.PerUser, "refused", l.refused)
		l.refused, l.lastWarn = 0, now
	}
}

// limitedConn holds a slot of its listener until closed.
type limitedConn struct {
	net.Conn
	l    *limitListener
	uid  uint32
	once sync.Once
}

// Close frees the slot first, so that once the peer sees the connection
// end a new one is served.
func (c *limitedConn) Close() error {
	c.once.Do(func() { c.l.release(c.uid) })
	return c.Conn.Close()
}

// NetConn returns the wrapped connection, as tls.Conn.NetConn does.
func (c *limitedConn) NetConn() net.Conn { return c.Conn }
