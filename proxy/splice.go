package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
)

// Splice copies both ways between two connections until both directions
// end, half-closing each side's sending direction as its source ends, and
// returns the bytes copied a→b and b→a. The caller closes the connections
// afterwards.
//
// Each direction copies through a buffer that grows while reads fill it
// (a bulk transfer, up to 4 MiB) and drops back to 32 KiB on a small read
// (interactive traffic, or an idle connection), so bulk flows wake the
// proxy rarely and idle ones hold little memory. Measured against
// splice(2) (io.Copy between TCP sockets) on loopback, where client, proxy
// and server share the CPUs, the big buffer moves more: docs/benchmarks.md.
func Splice(a, b net.Conn) (aToB, bToA int64, err error) {
	var wg sync.WaitGroup
	var errBA error
	wg.Add(1)
	go func() {
		defer wg.Done()
		bToA, errBA = relay(a, b)
		closeWrite(a)
	}()
	aToB, errAB := relay(b, a)
	closeWrite(b)
	wg.Wait()
	return aToB, bToA, errors.Join(errAB, errBA)
}

// Buffer size classes: minBuf << class.
const (
	minBuf   = 32 << 10
	maxClass = 7 // 4 MiB
)

var bufPools [maxClass + 1]sync.Pool

func getBuf(class int) *[]byte {
	if p, ok := bufPools[class].Get().(*[]byte); ok {
		return p
	}
	b := make([]byte, minBuf<<class)
	return &b
}

// relay copies src to dst until src ends (nil error on EOF).
func relay(dst io.Writer, src io.Reader) (n int64, err error) {
	class := 0
	buf := getBuf(class)
	defer func() { bufPools[class].Put(buf) }()
	for {
		nr, rerr := src.Read(*buf)
		if nr > 0 {
			nw, werr := dst.Write((*buf)[:nr])
			n += int64(nw)
			if werr != nil {
				return n, werr
			}
			if nw != nr {
				return n, io.ErrShortWrite
			}
		}
		if rerr == io.EOF {
			return n, nil
		}
		if rerr != nil {
			return n, rerr
		}
		next := class
		switch {
		case nr == len(*buf) && class < maxClass:
			next++
		case nr <= minBuf/2 && class > 0:
			next = 0
		}
		if next != class {
			bufPools[class].Put(buf)
			class = next
			buf = getBuf(class)
		}
	}
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
