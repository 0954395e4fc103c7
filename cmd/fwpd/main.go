package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"fwp/client"
	"fwp/datapath/linux/ebpf"
	"fwp/engine"
	"fwp/internal/metrics"
	"fwp/internal/server"
	"fwp/internal/trust"
	"fwp/internal/version"
	"fwp/mgmt"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "fwpd:", err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// errUsage marks a bad command line (exit code 2).
var errUsage = errors.New("usage")

type config struct {
	socket, stateDir, metricsAddr, logLevel, logFormat string
	metricsTokenFile                                   string
	adminGroups, adminUsers, readerGroups, readerUsers string
	noRootAdmin                                        bool
	txnTimeout                                         time.Duration
	maxMsgBytes, maxConns, maxConnsPerUser             int
	allowEvents                                        bool
	kernel                                             kernelConfig
	fleet                                              fleetConfig
}

func run(args []string) error {
	var c config
	fs := flag.NewFlagSet("fwpd", flag.ContinueOnError)
	fs.StringVar(&c.socket, "socket", client.SocketFromEnv(), "unix socket to serve on (env FWPD_SOCKET)")
	fs.StringVar(&c.stateDir, "state-dir", "/var/lib/fwp", "directory of the persistent store")
	fs.StringVar(&c.adminGroups, "admin-group", "", "comma-separated groups (names or gids) whose members may change policy")
	fs.StringVar(&c.adminUsers, "admin-user", "", "comma-separated users (names or uids) who may change policy")
	fs.StringVar(&c.readerGroups, "reader-group", "", "comma-separated groups (names or gids) whose members may list and explain the policy, read net events and subscribe (provider-context data shown as length and sha256 only)")
	fs.StringVar(&c.readerUsers, "reader-user", "", "comma-separated users (names or uids) with the reader role")
	fs.BoolVar(&c.noRootAdmin, "no-root-admin", false, "do not make root an administrator by default (root then needs --admin-user/--admin-group)")
	fs.StringVar(&c.metricsAddr, "metrics-addr", "", "serve Prometheus /metrics on this address (e.g. 127.0.0.1:9465); off when empty")
	fs.StringVar(&c.metricsTokenFile, "metrics-token-file", "", "require this file's token as a bearer credential on /metrics (Prometheus: authorization.credentials_file); the file must be owned by root or fwpd's user and not readable by others")
	fs.DurationVar(&c.txnTimeout, "txn-timeout", mgmt.DefaultTxnTimeout, "how long a write waits for another session's transaction")
	fs.IntVar(&c.maxMsgBytes, "max-msg-bytes", 64<<20, "largest request accepted")
	fs.IntVar(&c.maxConns, "max-connections", server.DefaultMaxConnections,
		"connections served at once on the socket, and again on its records side socket; more are closed at once (the last 1/16 only for root and administrators; on the records socket, root)")
	fs.IntVar(&c.maxConnsPerUser, "max-connections-per-user", server.DefaultMaxConnectionsPerUser,
		"connections one user other than root may hold at once on each socket")
	fs.BoolVar(&c.allowEvents, "allow-events", false, "record classify-allow net events too (drops are always recorded)")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.logFormat, "log-format", "text", "text or json")
	c.kernel.flags(fs)
	showVersion := fs.Bool("version", false, "print the build (module version, VCS revision) and exit")
	c.fleet.flags(fs)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: fwpd [flags]\n\nfwp's daemon: serves the management API on a unix socket.\n\nflags:")
		fs.PrintDefaults()
		fmt.Fprintln(fs.Output(), "\nexit status: 0 stopped by SIGTERM/SIGINT (or --help, --version), 1 error, 2 usage error")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	if *showVersion {
		fmt.Println("fwpd", version.Get())
		return nil
	}
	log, err := newLogger(c.logLevel, c.logFormat)
	if err != nil {
		return err
	}
	if c.maxConns < 1 {
		return fmt.Errorf("--max-connections: %d is not a positive number", c.maxConns)
	}
	if c.maxConnsPerUser < 1 {
		return fmt.Errorf("--max-connections-per-user: %d is not a positive number", c.maxConnsPerUser)
	}
	groupID := func(s string) (string, error) {
		g, err := user.LookupGroup(s)
		if err != nil {
			return "", err
		}
		return g.Gid, nil
	}
	userID := func(s string) (string, error) {
		u, err := user.Lookup(s)
		if err != nil {
			return "", err
		}
		return u.Uid, nil
	}
	gids, err := ids(c.adminGroups, groupID)
	if err != nil {
		return fmt.Errorf("--admin-group: %w", err)
	}
	uids, err := ids(c.adminUsers, userID)
	if err != nil {
		return fmt.Errorf("--admin-user: %w", err)
	}
	readerGIDs, err := ids(c.readerGroups, groupID)
	if err != nil {
		return fmt.Errorf("--reader-group: %w", err)
	}
	readerUIDs, err := ids(c.readerUsers, userID)
	if err != nil {
		return fmt.Errorf("--reader-user: %w", err)
	}

	eng := engine.New(engine.Options{AllowEvents: c.allowEvents})
	var met *metrics.Metrics
	var metToken []byte
	opts := mgmt.Options{StateDir: c.stateDir, TxnTimeout: c.txnTimeout, Logger: log}
	if c.metricsTokenFile != "" {
		if c.metricsAddr == "" {
			return fmt.Errorf("--metrics-token-file needs --metrics-addr")
		}
		if metToken, err = metrics.ReadToken(c.metricsTokenFile); err != nil {
			return err
		}
	}
	if c.metricsAddr != "" {
		met = metrics.New(eng)
		opts.OnCommit = met.ObserveCommit
	}
	kern, err := loadKernel(c.kernel, log)
	if err != nil {
		return err
	}
	defer kern.close()
	kern.setEngine(eng)
	// Each commit reauthorizes the live flows (reauth.go).
	observe := opts.OnCommit
	opts.OnCommit = func(d time.Duration) {
		if observe != nil {
			observe(d)
		}
		kern.committed()
	}
	// The built-in callouts are registered with the engine whatever the
	// datapath, so explain, counters and events agree with the hooks.
	opts.BeforeCommit = func(v engine.View) error {
		if err := ebpf.RegisterBuiltinCallouts(eng, v); err != nil {
			return err
		}
		if kern != nil {
			return kern.beforeCommit(v)
		}
		return nil
	}
	m, err := mgmt.New(eng, opts)
	if err != nil {
		return err
	}
	defer m.Close()
	if kern != nil {
		if err := kern.attach(); err != nil {
			return err
		}
	}

	l, err := listen(c.socket)
	if err != nil {
		return err
	}
	cfg := server.Config{Manager: m, Logger: log, AdminUIDs: uids, AdminGIDs: gids, ReaderUIDs: readerUIDs, ReaderGIDs: readerGIDs,
		NoRootAdmin: c.noRootAdmin, MaxMsgBytes: c.maxMsgBytes, MaxConnections: c.maxConns, MaxConnectionsPerUser: c.maxConnsPerUser}
	if kern != nil {
		cfg.Redirects = kern.d // proxies without root query the redirect maps through fwpd
	}
	srv := server.New(cfg)
	// The records side channel, answering "not supported" without a kernel
	// datapath so proxies get a typed error rather than a missing socket.
	rl, err := listen(client.RecordsSocket(c.socket))
	if err != nil {
		l.Close()
		return err
	}
	defer os.Remove(client.RecordsSocket(c.socket))
	defer rl.Close()
	rs := recordsServer{log: log}
	if kern != nil {
		rs.d = kern.d
	}
	go rs.serve(server.LimitListener(rl, server.Limits{Max: c.maxConns, PerUser: c.maxConnsPerUser}, log))
	// The callout socket: callout programs register remote callouts, and
	// clients classify through the engine (internal/server/callouts.go).
	cl, err := listen(client.CalloutSocket(c.socket))
	if err != nil {
		l.Close()
		return err
	}
	defer os.Remove(client.CalloutSocket(c.socket))
	defer cl.Close()
	if met != nil {
		met.Registry().MustRegister(srv.Callouts().Collector())
	}
	go srv.Callouts().Serve(server.LimitListener(cl, server.Limits{Max: c.maxConns, PerUser: c.maxConnsPerUser}, log))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if met != nil {
		kern.serve(ctx, eng, met.Registry())
		if kern != nil {
			met.AddClassifyCounts(kern.d.ClassifyCounts)
		}
	} else {
		kern.serve(ctx, eng, nil)
	}
	if met != nil {
		ms, err := met.Serve(ctx, c.metricsAddr, metToken)
		if err != nil {
			return err
		}
		log.Info("metrics listening", "addr", ms, "token", metToken != nil)
		if ap, err := netip.ParseAddrPort(ms); err == nil && !ap.Addr().IsLoopback() && metToken == nil {
			log.Warn("metrics served beyond loopback without a token: anyone who reaches it reads every filter's key and counts (--metrics-token-file)", "addr", ms)
		}
	}
	var reg *prometheus.Registry
	if met != nil {
		reg = met.Registry()
	}
	stopFleet, err := startFleet(ctx, c.fleet, m, eng, reg, c.kernel.datapath, c.stateDir, log)
	if err != nil {
		return err
	}
	defer stopFleet()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	log.Info("fwpd listening", "socket", c.socket, "state_dir", c.stateDir, "pid", os.Getpid())
	// The socket listens (clients' connections queue until Serve accepts
	// them) and the datapath is attached: ready, for a Type=notify unit.
	if err := sdNotify(fmt.Sprintf("READY=1\nMAINPID=%d\nSTATUS=serving on %s", os.Getpid(), c.socket)); err != nil {
		log.Warn("telling the service manager fwpd is ready", "err", err)
	}
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	_ = sdNotify("STOPPING=1")
	srv.GracefulStop(5 * time.Second)
	os.Remove(c.socket)
	return nil
}

func newLogger(level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	o := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, o)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, o)), nil
	}
	return nil, fmt.Errorf("--log-format: %q is not text or json", format)
}

// ids reads a comma-separated list of numeric IDs or names.
func ids(list string, lookup func(string) (string, error)) ([]uint32, error) {
	var out []uint32
	for _, s := range strings.Split(list, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if _, err := strconv.ParseUint(s, 10, 32); err != nil {
			if s, err = lookup(s); err != nil {
				return nil, err
			}
		}
		n, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return nil, err
		}
		out = append(out, uint32(n))
	}
	return out, nil
}

// listen opens the socket. A stale socket file (no daemon behind it) is
// replaced; a live one is an error, so two daemons never share a state.
func listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	// In a directory others can write, another user could take the
	// socket's name first and impersonate fwpd to its clients.
	if err := trust.Dir("socket directory", filepath.Dir(path)); err != nil {
		return nil, err
	}
	if _, err := os.Stat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another daemon is serving %s", path)
		}
		os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	// Anyone may connect: a proxy running as any user must reach
	// QueryRedirect and the records socket. What a caller may do is
	// decided per call from SO_PEERCRED (see docs/security.md).
	if err := os.Chmod(path, 0o666); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}
