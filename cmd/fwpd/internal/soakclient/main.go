// Command soakclient is the client side of fwpd's kernel soak test
// (TestE2EKernelSoak), a process of its own built without the race
// detector, started in the test's cgroup and network namespace.
//
//	soakclient SOCKET OPS
//
// It makes OPS HTTP requests and OPS DNS flows (a socket each) that the
// policy redirects to the example proxy, OPS connects the policy blocks,
// and OPS redirect queries to fwpd (SOCKET) for a connection it holds,
// checks every one, and prints a JSON summary.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"fwp/client"
	"fwp/internal/testutil"
	"fwp/internal/unix"
)

// Result is what the test reads.
type Result struct {
	TCP, UDP, Blocked, Queries int
	Took                       [4]time.Duration // per phase
	FirstErr                   string
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: soakclient SOCKET OPS")
		os.Exit(2)
	}
	n, err := strconv.Atoi(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	json.NewEncoder(os.Stdout).Encode(soak(os.Args[1], n))
}

func soak(sock string, n int) (res Result) {
	var mu sync.Mutex
	fail := func(err error) {
		mu.Lock()
		if res.FirstErr == "" {
			res.FirstErr = err.Error()
		}
		mu.Unlock()
	}
	// Servers close first (TIME_WAIT stays on their side); the wide range
	// keeps 2n loopback connections from running out of ports (this
	// namespace only).
	_ = os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("1024 65535"), 0)
	_ = os.WriteFile("/proc/sys/net/ipv4/tcp_tw_reuse", []byte("1"), 0)
	phase := 0
	run := func(op func(i int) error) int {
		start := time.Now()
		defer func() { res.Took[phase] = time.Since(start); phase++ }()
		var ok atomic.Int64
		var wg sync.WaitGroup
		const workers = 4
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < n; i += workers {
					if err := op(i); err != nil {
						fail(err)
						continue
					}
					ok.Add(1)
				}
			}()
		}
		wg.Wait()
		return int(ok.Load())
	}
	res.TCP = run(func(i int) error {
		c, err := net.DialTimeout("tcp4", "127.0.0.1:8080", 5*time.Second)
		if err != nil {
			return fmt.Errorf("http dial: %w", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET /soak-%d HTTP/1.0\r\nHost: soak\r\n\r\n", i)
		b, err := io.ReadAll(c)
		if err != nil || !strings.Contains(string(b), fmt.Sprintf(" /soak-%d\n", i)) {
			return fmt.Errorf("http answer %q: %v", b, err)
		}
		return nil
	})
	res.UDP = run(func(i int) error {
		c, err := net.Dial("udp4", "127.0.0.1:53")
		if err != nil {
			return fmt.Errorf("dns dial: %w", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		q := testutil.DNSQuery(uint16(i))
		if _, err := c.Write(q); err != nil {
			return fmt.Errorf("dns write: %w", err)
		}
		buf := make([]byte, 512)
		m, err := c.Read(buf)
		if err != nil || string(buf[:m]) != string(testutil.DNSAnswer(q)) {
			return fmt.Errorf("dns answer %x (from %s): %v", buf[:m], c.LocalAddr(), err)
		}
		return nil
	})
	res.Blocked = run(func(int) error {
		c, err := net.DialTimeout("tcp4", "127.0.0.3:80", 5*time.Second)
		if err == nil {
			c.Close()
			return errors.New("a blocked connect went through")
		}
		if !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("blocked connect: %w, want EPERM", err)
		}
		return nil
	})
	// fwpd's redirect query, for a connection the helper holds open.
	hl, err := net.Listen("tcp4", "127.0.0.1:3132")
	if err != nil {
		fail(err)
		return res
	}
	defer hl.Close()
	c, err := net.Dial("tcp4", "127.0.0.1:8081")
	if err != nil {
		fail(fmt.Errorf("hold dial: %w", err))
		return res
	}
	defer c.Close()
	a, err := hl.Accept()
	if err != nil {
		fail(err)
		return res
	}
	defer a.Close()
	local, remote := a.LocalAddr().(*net.TCPAddr).AddrPort(), a.RemoteAddr().(*net.TCPAddr).AddrPort()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cl, err := client.Dial(ctx, sock, client.Options{})
	if err != nil {
		fail(err)
		return res
	}
	defer cl.Close()
	res.Queries = run(func(int) error {
		r, orig, err := cl.QueryRedirect(ctx, local, remote)
		if err != nil || orig.String() != "127.0.0.1:8081" || len(r.Records) == 0 {
			return fmt.Errorf("query %s <- %s: %s %v", local, remote, orig, err)
		}
		return nil
	})
	return res
}
