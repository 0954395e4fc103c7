package client

import (
	"errors"
	"net"
	"os"
	"syscall"
	"time"
)

// ErrConnectionLimit is in the error of a Dial that fwpd refused because
// it serves as many connections as --max-connections (or the caller's
// user --max-connections-per-user) allow.
var ErrConnectionLimit = errors.New("fwp: fwpd is at its connection limit")

// diagnose says why a socket could not be used: nothing there, nobody
// listening, no permission, or a daemon that accepts and at once closes
// the connection, which fwpd does only at its connection limit (a gRPC
// server otherwise speaks first: its HTTP/2 settings).
func diagnose(socket string) (string, error) {
	const hint = "; the socket is set by --socket or $FWPD_SOCKET"
	c, err := net.DialTimeout("unix", socket, time.Second)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "no socket there: is fwpd running?" + hint, nil
	case errors.Is(err, syscall.ECONNREFUSED):
		return "nothing listens on it: is fwpd running?" + hint, nil
	case errors.Is(err, os.ErrPermission):
		return "no permission to use the socket", nil
	case err != nil:
		return "is fwpd running there?" + hint, nil
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	var b [1]byte
	if n, err := c.Read(b[:]); n == 0 && err != nil && !isTimeout(err) {
		return "it closes new connections at once: --max-connections or --max-connections-per-user is reached; try again when other clients are done (fwpctl sessions lists them)", ErrConnectionLimit
	}
	return "fwpd answers there now: try again", nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
