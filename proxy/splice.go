package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
)

// Splice copies both ways between two connections until both directions
// end, half-closing each side's sending direction as its source ends, and
// returns the bytes copied a→b and b→a. It uses io.Copy, so between two
// TCP sockets Linux moves the bytes with splice(2). The caller closes the
// connections afterwards.
func Splice(a, b net.Conn) (aToB, bToA int64, err error) {
	var wg sync.WaitGroup
	var errBA error
	wg.Add(1)
	go func() {
		defer wg.Done()
		bToA, errBA = io.Copy(a, b)
		closeWrite(a)
	}()
	aToB, errAB := io.Copy(b, a)
	closeWrite(b)
	wg.Wait()
	return aToB, bToA, errors.Join(errAB, errBA)
}

// closeWrite ends the sending direction: a half-close where the connection
// has one, else a full close (the peer then sees EOF either way).
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if cw.CloseWrite() == nil {
			return
		}
	}
	c.Close()
}
