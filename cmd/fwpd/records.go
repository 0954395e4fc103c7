package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"syscall"
	"time"

	"fwp/client"
	"fwp/datapath/linux/ebpf"
	"fwp/internal/peercred"
	"fwp/internal/unix"
	"fwp/proxy"
)

// recordsServer serves client.RecordsSocket: a proxy without root passes
// its outbound socket (SCM_RIGHTS) with the redirect records to put on it.
// gRPC cannot carry a file descriptor, and holding the socket is the proof
// that it is the caller's. One request per connection:
//
//	request: uint16 big-endian length, that many bytes of records; one fd
//	reply:   "ok\n" or "<code> <message>\n" (see client.ProxyBackend)
type recordsServer struct {
	d   *ebpf.Datapath // nil with --datapath none
	log *slog.Logger
	// timeout bounds reading a request (0: recordsTimeout): a peer that
	// connects and sends nothing must not hold a connection slot (see
	// --max-connections).
	timeout time.Duration
}

// recordsTimeout is fwpd's records request timeout: a request is one
// small write, so this is generous.
const recordsTimeout = 5 * time.Second

// recordsReplyTimeout bounds writing the reply, from after the request.
const recordsReplyTimeout = time.Second

// serve accepts until l is closed. Other accept errors (EMFILE when the
// process is out of descriptors) pass, so they must not end the channel:
// it backs off and goes on.
func (s recordsServer) serve(l net.Listener) {
	var backoff time.Duration
	for {
		c, err := l.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("records socket: accept failed", "err", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		go s.handle(c)
	}
}

func (s recordsServer) handle(c net.Conn) {
	defer c.Close()
	timeout := s.timeout
	if timeout <= 0 {
		timeout = recordsTimeout
	}
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	err := s.set(c)
	reply := "ok"
	if err != nil {
		code := "error"
		for _, e := range []struct {
			err  error
			code string
		}{{proxy.ErrAccessDenied, "access_denied"}, {proxy.ErrInvalidArgument, "invalid_argument"}, {proxy.ErrNotSupported, "not_supported"}} {
			if errors.Is(err, e.err) {
				code = e.code
				break
			}
		}
		reply = code + " " + strings.ReplaceAll(err.Error(), "\n", " ")
		s.log.Debug("redirect records refused", "err", err)
	}
	// A fresh bound, so a peer that timed out still learns why.
	_ = c.SetWriteDeadline(time.Now().Add(recordsReplyTimeout))
	_, _ = c.Write([]byte(reply + "\n"))
}

func (s recordsServer) set(c net.Conn) error {
	uc, err := peercred.UnixConn(c)
	if err != nil {
		return fmt.Errorf("%w: %v", proxy.ErrAccessDenied, err)
	}
	cred, err := peercred.FromConn(uc)
	if err != nil {
		return fmt.Errorf("%w: %v", proxy.ErrAccessDenied, err)
	}
	recs, fd, err := readRecordsRequest(uc)
	if fd >= 0 {
		defer syscall.Close(fd)
	}
	if err != nil {
		return err
	}
	if s.d == nil {
		return fmt.Errorf("%w: fwpd runs without a kernel datapath", proxy.ErrNotSupported)
	}
	hs, err := ebpf.DecodeRecords(recs)
	if err != nil || len(hs) == 0 {
		return fmt.Errorf("%w: not redirect records of the kernel datapath", proxy.ErrInvalidArgument)
	}
	fam, typ, connected, err := unix.SocketState(fd)
	switch {
	case err != nil:
		return fmt.Errorf("%w: %v", proxy.ErrInvalidArgument, err)
	case fam != syscall.AF_INET && fam != syscall.AF_INET6:
		return fmt.Errorf("%w: the passed socket is not an IPv4 or IPv6 socket", proxy.ErrInvalidArgument)
	case typ != syscall.SOCK_STREAM && typ != syscall.SOCK_DGRAM:
		return fmt.Errorf("%w: the passed socket is not TCP or UDP", proxy.ErrInvalidArgument)
	case connected:
		return fmt.Errorf("%w: the passed socket is already connected", proxy.ErrInvalidArgument)
	}
	// The last record is the redirect the caller's accepted connection
	// came through (see ebpf.ProxyBackend.QueryTuple): only its target may
	// let a connection escape it.
	if last := hs[len(hs)-1]; cred.UID != 0 && !s.d.IsRedirectTarget(last, cred.PID) {
		return fmt.Errorf("%w: pid %d is not the target of redirect %d", proxy.ErrAccessDenied, cred.PID, last)
	}
	cookie, err := unix.SocketCookie(fd)
	if err != nil {
		return fmt.Errorf("%w: %v", proxy.ErrInvalidArgument, err)
	}
	return s.d.SetRedirectRecords(cookie, hs...)
}

// readRecordsRequest reads one request; fd is -1 when none was passed, and
// any extra descriptors are closed.
func readRecordsRequest(c *net.UnixConn) (recs []byte, fd int, err error) {
	fd = -1
	buf := make([]byte, 0, 2+client.MaxRecordsRequest)
	oob := make([]byte, syscall.CmsgSpace(4*4))
	for len(buf) < 2 || len(buf) < 2+int(binary.BigEndian.Uint16(buf)) {
		n, oobn, _, _, rerr := c.ReadMsgUnix(buf[len(buf):cap(buf)], oob)
		// n is -1 on an error such as the read deadline: slicing with it
		// would panic and take the daemon down.
		buf = buf[:len(buf)+max(n, 0)]
		if oobn > 0 {
			msgs, perr := syscall.ParseSocketControlMessage(oob[:oobn])
			if perr == nil {
				for _, m := range msgs {
					fds, _ := syscall.ParseUnixRights(&m)
					for _, f := range fds {
						if fd < 0 {
							fd = f
						} else {
							syscall.Close(f)
						}
					}
				}
			}
		}
		if len(buf) >= 2 && int(binary.BigEndian.Uint16(buf)) > client.MaxRecordsRequest {
			return nil, fd, fmt.Errorf("%w: records of %d bytes, at most %d", proxy.ErrInvalidArgument, binary.BigEndian.Uint16(buf), client.MaxRecordsRequest)
		}
		if rerr != nil {
			return nil, fd, fmt.Errorf("%w: short request: %w", proxy.ErrInvalidArgument, rerr)
		}
	}
	if fd < 0 {
		return nil, fd, fmt.Errorf("%w: no socket passed", proxy.ErrInvalidArgument)
	}
	return buf[2:], fd, nil
}
