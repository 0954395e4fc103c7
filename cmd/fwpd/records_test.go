package main

import (
	"encoding/binary"
	"errors"
	"net"
	"os"
	"syscall"
	"testing"

	"fwp/client"
	"fwp/proxy"
)

// FuzzReadRecordsRequest: any bytes a peer sends on the records socket give
// records of the declared length with the passed socket, or a typed error;
// never a panic or a leaked descriptor.
func FuzzReadRecordsRequest(f *testing.F) {
	f.Add([]byte{0, 4, 'f', 'w', 'p', 'k'}, true)
	f.Add([]byte{0, 8, 'f', 'w', 'p', 'k', 1, 0, 0, 0}, true)
	f.Add([]byte{0xff, 0xff, 1}, true)
	f.Add([]byte{0, 2, 1, 2}, false)
	f.Add([]byte{0}, true)
	f.Fuzz(func(t *testing.T, req []byte, passFD bool) {
		a, b := socketPair(t)
		defer a.Close()
		var oob []byte
		if passFD {
			oob = syscall.UnixRights(int(os.Stdin.Fd()))
		}
		if _, _, err := a.WriteMsgUnix(req, oob, nil); err != nil && len(req) > 0 {
			return // larger than the socket buffer: not an input a peer can send
		}
		a.CloseWrite()
		recs, fd, err := readRecordsRequest(b)
		b.Close()
		if fd >= 0 {
			syscall.Close(fd)
		}
		if err != nil {
			if !errors.Is(err, proxy.ErrInvalidArgument) {
				t.Fatalf("error %v does not wrap proxy.ErrInvalidArgument", err)
			}
			return
		}
		if !passFD || fd < 0 {
			t.Fatal("a request without a socket was accepted")
		}
		if n := int(binary.BigEndian.Uint16(req)); len(recs) < n || n > client.MaxRecordsRequest {
			t.Fatalf("declared %d bytes, read %d", n, len(recs))
		}
	})
}

func socketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}
