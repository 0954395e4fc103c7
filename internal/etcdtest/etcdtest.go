package etcdtest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Binary is the etcd server binary; $ETCD overrides it.
func Binary() (string, error) {
	if b := os.Getenv("ETCD"); b != "" {
		return b, nil
	}
	return exec.LookPath("etcd")
}

// Cluster is a running etcd cluster.
type Cluster struct {
	t       testing.TB
	bin     string
	Members []*Member
	// TLS, when the cluster was started with it: PEM files of the CA that
	// signed the servers' and the client's certificates, and the client's.
	TLS *TLSFiles
}

// Options configure a cluster.
type Options struct {
	// TLS serves clients over TLS and requires a client certificate.
	TLS bool
}

// Member is one etcd member.
type Member struct {
	Name               string
	ClientURL, PeerURL string
	dir                string
	args               []string
	mu                 sync.Mutex
	cmd                *exec.Cmd
	log                *bytes.Buffer
	done               chan struct{}
}

// Start starts an n-member cluster and waits until it answers. A test
// without the etcd binary is skipped (failed when CI is set).
func Start(t testing.TB, n int) *Cluster { t.Helper(); return StartWith(t, n, Options{}) }

// StartWith starts an n-member cluster with options.
func StartWith(t testing.TB, n int, o Options) *Cluster {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("etcd is not installed (apt-get install etcd-server; .ci/run does): %v", err)
		}
		t.Skipf("etcd is not installed (apt-get install etcd-server): %v", err)
	}
	// Data in memory when it can be: etcd fsyncs every write, and tests
	// write thousands.
	base := ""
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		base = "/dev/shm"
	}
	dir, err := os.MkdirTemp(base, "etcdtest")
	if err != nil {
		t.Fatal(err)
	}
	c := &Cluster{t: t, bin: bin}
	scheme := "http://"
	if o.TLS {
		if c.TLS, err = writeTLS(filepath.Join(dir, "tls")); err != nil {
			t.Fatal(err)
		}
		scheme = "https://"
	}
	var initial []string
	for i := range n {
		m := &Member{Name: fmt.Sprintf("m%d", i), ClientURL: scheme + freeAddr(t), PeerURL: "http://" + freeAddr(t), dir: filepath.Join(dir, fmt.Sprintf("m%d", i))}
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	for _, m := range c.Members {
		m.args = []string{
			"--name", m.Name, "--data-dir", m.dir,
			"--listen-client-urls", m.ClientURL, "--advertise-client-urls", m.ClientURL,
			"--listen-peer-urls", m.PeerURL, "--initial-advertise-peer-urls", m.PeerURL,
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", filepath.Base(dir),
			// Fast elections on loopback: a killed member's loss is noticed
			// in a fraction of a second.
			"--heartbeat-interval", "50", "--election-timeout", "500",
			"--logger", "zap", "--log-level", "error",
		}
		if c.TLS != nil {
			m.args = append(m.args, "--cert-file", c.TLS.ServerCert, "--key-file", c.TLS.ServerKey,
				"--client-cert-auth", "--trusted-ca-file", c.TLS.CA)
		}
		if err := c.startMember(m); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, m := range c.Members {
			m.Kill()
		}
		os.RemoveAll(dir)
	})
	c.WaitHealthy(t, 30*time.Second)
	return c
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func (c *Cluster) startMember(m *Member) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		return fmt.Errorf("etcd member %s is running", m.Name)
	}
	cmd := exec.Command(c.bin, m.args...)
	m.log = &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = m.log, m.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	m.cmd, m.done = cmd, make(chan struct{})
	done := m.done
	go func() { cmd.Wait(); close(done) }()
	return nil
}

// Kill kills the member (SIGKILL) and waits for it to exit.
func (m *Member) Kill() { m.signal(syscall.SIGKILL) }

// Stop stops the member (SIGTERM) and waits for it to exit.
func (m *Member) Stop() { m.signal(syscall.SIGTERM) }

func (m *Member) signal(sig syscall.Signal) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return
	}
	m.cmd.Process.Signal(sig)
	<-m.done
	m.cmd = nil
}

// Restart starts a stopped member again with its data.
func (c *Cluster) Restart(m *Member) {
	c.t.Helper()
	if err := c.startMember(m); err != nil {
		c.t.Fatal(err)
	}
}

// Endpoints lists the client URLs of every member.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, m := range c.Members {
		eps = append(eps, m.ClientURL)
	}
	return eps
}

// Client returns a client of the cluster, closed when the test ends.
func (c *Cluster) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	cfg := clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()}
	if c.TLS != nil {
		tc, err := transport.TLSInfo{CertFile: c.TLS.ClientCert, KeyFile: c.TLS.ClientKey, TrustedCAFile: c.TLS.CA}.ClientConfig()
		if err != nil {
			t.Fatal(err)
		}
		cfg.TLS = tc
	}
	cl, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// WaitHealthy waits until a linearizable read succeeds.
func (c *Cluster) WaitHealthy(t testing.TB, d time.Duration) {
	t.Helper()
	cl := c.Client(t)
	deadline := time.Now().Add(d)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := cl.Get(ctx, "health")
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			var logs strings.Builder
			for _, m := range c.Members {
				m.mu.Lock()
				if m.log != nil {
					fmt.Fprintf(&logs, "--- %s\n%s", m.Name, m.log.String())
				}
				m.mu.Unlock()
			}
			t.Fatalf("etcd cluster not healthy after %s: %v\n%s", d, err, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Metrics scrapes every running member's /metrics and returns each
// sample ("name{labels}") summed over the members.
func (c *Cluster) Metrics() map[string]float64 {
	out := map[string]float64{}
	for _, m := range c.Members {
		resp, err := http.Get(m.ClientURL + "/metrics")
		if err != nil {
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, line := range strings.Split(string(b), "\n") {
			if line == "" || line[0] == '#' {
				continue
			}
			i := strings.LastIndexByte(line, ' ')
			if i < 0 {
				continue
			}
			v, err := strconv.ParseFloat(line[i+1:], 64)
			if err == nil {
				out[line[:i]] += v
			}
		}
	}
	return out
}

// Sum adds the samples of metric name whose labels contain every one of
// the given "k=\"v\"" strings.
func Sum(ms map[string]float64, name string, labels ...string) float64 {
	var s float64
	for k, v := range ms {
		if k != name && !strings.HasPrefix(k, name+"{") {
			continue
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(k, l) {
				ok = false
			}
		}
		if ok {
			s += v
		}
	}
	return s
}
