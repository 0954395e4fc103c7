package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"fwp/engine"
	"fwp/fleet"
	"fwp/internal/version"
	"fwp/mgmt"
)

// fleetConfig is the fleet policy's part of the command line.
type fleetConfig struct {
	source            string
	endpoints, prefix string
	cert, key, cacert string
	node, labels      string
	leaseTTL          time.Duration
}

func (c *fleetConfig) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.source, "policy-source", "local", `"local": policy from fwpctl only; "etcd": also follow the fleet policy kept in etcd (see --etcd-*)`)
	fs.StringVar(&c.endpoints, "etcd-endpoints", "", "comma-separated etcd client URLs (with --policy-source etcd)")
	fs.StringVar(&c.prefix, "etcd-prefix", "/fwp/", "etcd key prefix of the fleet: documents under PREFIXpolicies/, host statuses under PREFIXnodes/")
	fs.StringVar(&c.cert, "etcd-cert", "", "TLS client certificate for etcd (PEM)")
	fs.StringVar(&c.key, "etcd-key", "", "TLS client key for etcd (PEM)")
	fs.StringVar(&c.cacert, "etcd-cacert", "", "CA bundle that signed etcd's server certificates (PEM)")
	fs.StringVar(&c.node, "node-name", "", "this host's name in the fleet (default: the hostname)")
	fs.StringVar(&c.labels, "node-labels", "", "this host's labels, k=v,k=v: documents select hosts by name or labels")
	fs.DurationVar(&c.leaseTTL, "etcd-lease-ttl", 10*time.Second, "how long this host's status outlives it in etcd")
}

func parseLabels(s string) (map[string]string, error) {
	out := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if kv = strings.TrimSpace(kv); kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok || strings.TrimSpace(k) == "" {
			return nil, fmt.Errorf("--node-labels: %q is not k=v", kv)
		}
		out[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	return out, nil
}

// startFleet starts following the fleet policy with --policy-source etcd;
// the returned function stops it (and removes the host from the list).
func startFleet(ctx context.Context, c fleetConfig, m *mgmt.Manager, eng *engine.Engine, reg *prometheus.Registry, datapath, stateDir string, log *slog.Logger) (func(), error) {
	switch c.source {
	case "local":
		return func() {}, nil
	case "etcd":
	default:
		return nil, fmt.Errorf("--policy-source: %q is not local or etcd", c.source)
	}
	labels, err := parseLabels(c.labels)
	if err != nil {
		return nil, err
	}
	if c.node == "" {
		if c.node, err = os.Hostname(); err != nil {
			return nil, err
		}
	}
	cl, err := fleet.Dial(fleet.Endpoint{URLs: c.endpoints, Cert: c.cert, Key: c.key, CACert: c.cacert})
	if err != nil {
		return nil, fmt.Errorf("--etcd-endpoints: %w", err)
	}
	statusFile := ""
	if stateDir != "" {
		statusFile = filepath.Join(stateDir, "fleet-status.json")
	}
	f, err := fleet.NewFollower(fleet.Config{Client: cl, Prefix: c.prefix, Manager: m, Node: fleet.Node{Name: c.node, Labels: labels},
		Version: version.Get().String(), Datapath: datapath, LeaseTTL: c.leaseTTL, StatusFile: statusFile, Logger: log,
		Counters: func() map[string]uint64 { return counters(eng) }})
	if err != nil {
		cl.Close()
		return nil, err
	}
	if reg != nil {
		gauge := func(name, help string, v func(fleet.Status) float64) {
			reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return v(f.Status()) }))
		}
		gauge("fwp_fleet_connected", "1 while etcd is reachable; 0: the host enforces its last fleet policy without news.", func(s fleet.Status) float64 {
			if s.Connected {
				return 1
			}
			return 0
		})
		gauge("fwp_fleet_revision", "etcd revision of the fleet policy in force.", func(s fleet.Status) float64 { return float64(s.Revision) })
		gauge("fwp_fleet_error_revision", "etcd revision of the last fleet policy refused (0: none).", func(s fleet.Status) float64 {
			if s.LastError == nil {
				return 0
			}
			return float64(s.LastError.Revision)
		})
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "fwp_fleet_commits_total", Help: "Fleet policy transactions committed."},
			func() float64 { return float64(f.Status().Commits) }))
	}
	fctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); f.Run(fctx) }()
	log.Info("following the fleet policy", "endpoints", c.endpoints, "prefix", c.prefix, "node", c.node, "labels", c.labels)
	return func() { cancel(); <-done; cl.Close() }, nil
}

// counters is the summary a host reports: filters and classifications.
func counters(eng *engine.Engine) map[string]uint64 {
	out := map[string]uint64{}
	v := eng.View()
	for _, l := range engine.Layers() {
		out["filters"] += uint64(v.FilterCount(l.ID))
	}
	for _, n := range eng.ClassifyCounts() {
		out["permit"] += n.Permit
		out["block"] += n.Block
		out["veto"] += n.Veto
		out["pend"] += n.Pend
	}
	return out
}
