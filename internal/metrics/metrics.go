package metrics

import (
	"bytes"
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"fwp/engine"
	"fwp/internal/trust"
)

// Metrics holds fwpd's metrics over one engine.
type Metrics struct {
	eng    *engine.Engine
	reg    *prometheus.Registry
	commit prometheus.Histogram

	mu     sync.Mutex
	counts []func() ([]engine.ClassifyCount, error)
}

// New registers the metrics of eng.
func New(eng *engine.Engine) *Metrics {
	m := &Metrics{eng: eng, reg: prometheus.NewRegistry()}
	m.commit = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "fwp_commit_duration_seconds",
		Help:    "Duration of committed transactions (store write and engine swap).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
	})
	m.reg.MustRegister(m.commit, collector{m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// AddClassifyCounts adds a datapath's own classification counts (the
// kernel's, decided in its hooks without the engine) to
// fwp_classifications_total.
func (m *Metrics) AddClassifyCounts(f func() ([]engine.ClassifyCount, error)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.counts = append(m.counts, f)
}

// classifyCounts sums the engine's counts and every datapath's by layer.
func (m *Metrics) classifyCounts() []engine.ClassifyCount {
	all := m.eng.ClassifyCounts()
	at := make(map[engine.LayerID]int, len(all))
	for i, n := range all {
		at[n.Layer] = i
	}
	m.mu.Lock()
	sources := m.counts
	m.mu.Unlock()
	for _, f := range sources {
		more, err := f()
		if err != nil {
			continue // a closed datapath: what it counted is gone with it
		}
		for _, n := range more {
			i, ok := at[n.Layer]
			if !ok {
				at[n.Layer] = len(all)
				all = append(all, n)
				continue
			}
			all[i].Permit += n.Permit
			all[i].Block += n.Block
			all[i].Veto += n.Veto
			all[i].Pend += n.Pend
		}
	}
	return all
}

// ObserveCommit records a commit's duration (mgmt.Options.OnCommit).
func (m *Metrics) ObserveCommit(d time.Duration) { m.commit.Observe(d.Seconds()) }

// Registry returns the registry, for tests.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Serve serves /metrics on addr until ctx ends. It returns the address
// listened on. With a token, every request must carry it as
// "Authorization: Bearer TOKEN" (Prometheus: authorization.credentials_file);
// others get 401.
func (m *Metrics) Serve(ctx context.Context, addr string, token []byte) (string, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return "", err
	}
	mux := http.NewServeMux()
	var h http.Handler = promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
	if len(token) > 0 {
		h = bearer(token, h)
	}
	mux.Handle("/metrics", h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return
		}
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	return l.Addr().String(), nil
}

// bearer admits the requests that carry token as a bearer credential,
// compared in constant time.
func bearer(token []byte, h http.Handler) http.Handler {
	want := append([]byte("Bearer "), token...)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="fwpd metrics"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// ErrTokenFile: a metrics token file fwpd will not use.
var ErrTokenFile = errors.New("metrics token file refused")

// ReadToken reads a bearer token from path: one line, surrounding space
// trimmed. The file and the directories above it must be trusted (owned
// by root or fwpd's user, not writable by others: trust.File), and the
// file readable by its owner and group only — a token others can read
// admits them.
func ReadToken(path string) ([]byte, error) {
	if err := trust.File("metrics token file", path); err != nil {
		return nil, err
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if st.Mode().Perm()&0o004 != 0 {
		return nil, fmt.Errorf("%w: %s is readable by others (mode %#o): chmod o-r", ErrTokenFile, path, st.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	tok := bytes.TrimSpace(b)
	if len(tok) < 16 || bytes.ContainsAny(tok, "\r\n") {
		return nil, fmt.Errorf("%w: %s: the token must be one line of at least 16 characters", ErrTokenFile, path)
	}
	return tok, nil
}

// collector reads the engine's gauges at scrape time.
type collector struct{ m *Metrics }

var (
	filtersDesc = prometheus.NewDesc("fwp_filters", "Filters per layer.", []string{"layer"}, nil)
	pendsDesc   = prometheus.NewDesc("fwp_pends_outstanding", "Pended operations and classifies not yet completed.", nil, nil)
	flowsDesc   = prometheus.NewDesc("fwp_flow_contexts", "Flow contexts associated by callouts.", nil, nil)
	classDesc   = prometheus.NewDesc("fwp_classifications_total", "Classifications by layer and outcome (permit, block, veto, pend): the engine's and the kernel datapath's hooks'.", []string{"layer", "action"}, nil)
)

func (collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- filtersDesc
	ch <- pendsDesc
	ch <- flowsDesc
	ch <- classDesc
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	v := c.m.eng.View()
	for _, l := range engine.Layers() {
		ch <- prometheus.MustNewConstMetric(filtersDesc, prometheus.GaugeValue, float64(v.FilterCount(l.ID)), l.Name)
	}
	o := c.m.eng.Outstanding()
	ch <- prometheus.MustNewConstMetric(pendsDesc, prometheus.GaugeValue, float64(o.Pends))
	ch <- prometheus.MustNewConstMetric(flowsDesc, prometheus.GaugeValue, float64(o.FlowContexts))
	for _, n := range c.m.classifyCounts() {
		for _, kv := range []struct {
			action string
			n      uint64
		}{{"permit", n.Permit}, {"block", n.Block}, {"veto", n.Veto}, {"pend", n.Pend}} {
			ch <- prometheus.MustNewConstMetric(classDesc, prometheus.CounterValue, float64(kv.n), n.Layer.String(), kv.action)
		}
	}
}
